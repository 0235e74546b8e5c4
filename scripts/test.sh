#!/usr/bin/env bash
# The whole test suite, set-up included: unit tests, device models through guest memory, tiny
# guests under /dev/kvm, the image pipeline against a real registry, and Linux guests in the vm
# sandbox. Where this host has VMX/SVM every test binary runs here. Where it has not (e.g.
# KVM-PVM), the host level runs everything but the Linux guests (FNVM_TEST_SANDBOXES=process),
# then the nested level runs the Linux-guest binaries inside one L1 Linux with emulated SVM
# (scripts/nested.sh; FNVM_TEST_SANDBOXES=vm). Every binary is built here, never inside L1.
#
# Usage: scripts/test.sh [TEST_ARGS]...   (TEST_ARGS go to every test binary, e.g. a filter)
# Environment: FNVM_TEST_NESTED=0 skips the nested level (says so loudly); =1 forces it even
# where the host has VMX/SVM. FNVM_TEST_HOST=0 skips the host level (says so loudly).
# FNVM_TEST_FUZZ=0 skips the fuzz smoke (says so loudly).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
log() { printf 'test.sh: %s\n' "$*" >&2; }

FNVM_PROFILE=release scripts/setup.sh tests
target="${CARGO_TARGET_DIR:-$root/target}"
export FNVM_AGENT_BIN="$target/x86_64-unknown-linux-gnu/release/fnvm-agent"
export FNVM_HELLO_BIN="$target/x86_64-unknown-linux-gnu/release/fnvm-hello"
# The guest kernel (built once, cached machine-wide): the Linux-guest tests boot it.
log "the guest kernel (cached by the hash of its inputs)"
FNVM_TEST_KERNEL="$(bash guest-kernel/build.sh)"
export FNVM_TEST_KERNEL

# Which binaries have Linux guests, and what each level runs of them (libtest arguments).
# Tests that only make sense without VMX/SVM (the refusals) run on the host only.
declare -A host_args nested_args
host_args[fnvm:test:linux_guest]="--exact linux_is_refused_at_once_without_hardware_virtualization"
nested_args[fnvm:test:linux_guest]="--skip linux_is_refused_at_once_without_hardware_virtualization"
host_args[fnvm:test:snapshot_start]="--exact snapshot_starts_outside_the_vm_sandbox_are_refused_with_the_reason"
nested_args[fnvm:test:snapshot_start]="--skip snapshot_starts_outside_the_vm_sandbox_are_refused_with_the_reason"
# The whole-system tests with vm rows: every test of run_function (one at a time: L1 has two
# vCPUs, and two emulated guests at once starve each other), the demo, the device-isolation
# attack, serve's deploy-to-restart test and its instance pool (scale-out, timeouts, a killed
# instance, log attribution, idle reclaim); the other serve tests exercise API paths the two
# sandboxes share and run on the host. The host runs every test of them in the process sandbox.
host_args[fnvm:test:run_function]=""
nested_args[fnvm:test:run_function]="--test-threads 1"
host_args[fnvm:test:run_demo]=""
nested_args[fnvm:test:run_demo]=""
host_args[fnvm:test:run_isolation]=""
nested_args[fnvm:test:run_isolation]=""
# Docker's seccomp profile as a function meets it (busybox and python3), in the guest too.
host_args[fnvm:test:run_seccomp]=""
nested_args[fnvm:test:run_seccomp]=""
host_args[fnvm:test:service_api]=""
nested_args[fnvm:test:service_api]="--exact deploy_by_digest_with_credentials_invoke_web_logs_and_restart"
host_args[fnvm:test:service_pool]=""
nested_args[fnvm:test:service_pool]=""
# VM egress (issue 15): passt per instance, the policy as host rules by uid, snapshot starts.
host_args[fnvm:test:egress_vm]=""
nested_args[fnvm:test:egress_vm]="--test-threads 1"
# `fnvm bench` on the busybox and python3 images: with snapshot starts in the vm sandbox.
host_args[fnvm:test:bench_command]=""
nested_args[fnvm:test:bench_command]=""
# The process sandbox's own tests on L1's cgroup v2 (the host here is cgroup v1): agents born
# in their cgroup (clone3 CLONE_INTO_CGROUP), the memory and pids limits, cleanup; and the
# shared spawn's (the agent's and a VMM's first process).
nested_args[fnvm:lib:fnvm]="sandbox::process sandbox::spawn --test-threads 1"
# The nested level's order: the quick, most telling binaries first.
nested_order=(fnvm:test:linux_guest fnvm:test:snapshot_start fnvm:test:run_isolation
  fnvm:test:run_seccomp fnvm:test:run_demo fnvm:test:service_api fnvm:test:service_pool
  fnvm:test:bench_command fnvm:test:run_function fnvm:test:egress_vm)
# The VMM's own tests under a real (emulated-SVM) KVM too; the stock-Linux one of tiny_guests
# needs VMX/SVM and runs only there (FNVM_TEST_KERNEL is the cached guest kernel).
host_args[fnvm-vmm:test:tiny_guests]="--skip linux_guest_without_root_panics_and_the_vmm_names_it"
nested_args[fnvm-vmm:test:tiny_guests]=""
host_args[fnvm-vmm:test:snapshot]=""
nested_args[fnvm-vmm:test:snapshot]=""
nested_order+=(fnvm-vmm:test:tiny_guests fnvm-vmm:test:snapshot)

hardware=0
grep -q -w -E 'vmx|svm' /proc/cpuinfo && hardware=1
nested="${FNVM_TEST_NESTED:-}"
[ -n "$nested" ] || nested=$((1 - hardware))

# Build every test binary once; cargo's JSON messages name the executables.
log "building the test binaries (release)"
binaries="$(mktemp)"
results="$target/test-results"
rm -rf "$results"
trap 'rm -f "$binaries"' EXIT
cargo test --locked --release --workspace --no-run --message-format=json |
  jq -r 'select(.reason == "compiler-artifact" and .profile.test and .executable != null)
    | [ ((.package_id | capture("#(?<n>[^@]+)@")? | .n)
          // (.manifest_path | split("/") | .[-2])) + ":" + .target.kind[0] + ":" + .target.name,
        (.manifest_path | rtrimstr("/Cargo.toml")), .executable ] | @tsv' |
  sort -u >"$binaries"
[ -s "$binaries" ] || { log "error: cargo built no test binaries"; exit 1; }

# plan FILE LEVEL: one line per binary to run at LEVEL (host or nested).
plan() {
  local file="$1" level="$2" label dir exe args
  shift 2
  : >"$file.unsorted"
  while IFS=$'\t' read -r label dir exe; do
    if [ "$level" = host ]; then
      if [ "$nested" = 1 ] && [ -n "${host_args[$label]+set}" ]; then
        args="${host_args[$label]}"
      else
        args=""
      fi
    else
      [ -n "${nested_args[$label]+set}" ] || continue
      args="${nested_args[$label]}"
    fi
    local order=0 i
    for i in "${!nested_order[@]}"; do [ "${nested_order[$i]}" = "$label" ] && order=$((i + 1)); done
    # shellcheck disable=SC2086 # the table's arguments are words
    {
      printf '%03d\t%s\t%s\t%s' "$order" "$label" "$dir" "$exe"
      for a in $args "$@"; do printf '\t%s' "$a"; done
      printf '\n'
    } >>"$file.unsorted"
  done <"$binaries"
  sort -n "$file.unsorted" | cut -f2- >"$file"
  rm -f "$file.unsorted"
}

mkdir -p "$results/host" "$results/nested"
host_status=0
if [ "$nested" = 1 ]; then
  export FNVM_TEST_SANDBOXES=process
fi
if [ "${FNVM_TEST_HOST:-1}" = 0 ]; then
  log "!!! FNVM_TEST_HOST=0: the host level did NOT run !!!"
else
  plan "$results/host.plan" host "$@"
  log "host level: $(wc -l <"$results/host.plan") test binaries"
  scripts/lib/nested-tests.sh "$results/host.plan" "$results/host" || host_status=$?
  log "host level: doc tests"
  cargo test --locked --release --workspace --doc -- "$@" || host_status=1
fi

nested_status=0
if [ "$nested" = 1 ]; then
  # Everything the nested tests need is made here first: L1 only reads it.
  log "nested level: preparing the guest kernel and L1"
  scripts/nested.sh --prepare >/dev/null
  plan "$results/nested.plan" nested "$@"
  log "nested level: $(wc -l <"$results/nested.plan") test binaries inside L1 (emulated SVM)"
  FNVM_TEST_SANDBOXES=vm FNVM_TEST_RETRY_FAILED=1 scripts/nested.sh --rw "$results/nested" -- \
    scripts/lib/nested-tests.sh "$results/nested.plan" "$results/nested" || nested_status=$?
elif [ "$hardware" = 0 ]; then
  log "!!! FNVM_TEST_NESTED=0: the Linux-guest tests did NOT run (no VMX/SVM here) !!!"
fi

# The fuzz smoke: every fuzz target of a parser of hostile input for 20 s (scripts/fuzz.sh
# --smoke, its own crate in fuzz/); a crash, leak or hang fails the suite. FNVM_TEST_FUZZ=0
# skips it (says so loudly).
fuzz_status=0
if [ "${FNVM_TEST_FUZZ:-1}" = 0 ]; then
  log "!!! FNVM_TEST_FUZZ=0: the fuzz smoke did NOT run !!!"
else
  log "fuzz smoke: every fuzz target for 20 s"
  scripts/fuzz.sh --smoke || fuzz_status=1
fi

# Every planned binary must have its result: a level whose runner died part-way (L1 reported
# a status, but binaries never ran) fails, whatever status came back.
missing() { # PLAN DIR
  local label rest
  while IFS=$'\t' read -r label rest; do
    [ -f "$2/$label.result" ] || { log "!!! $label did not run"; return 1; }
  done <"$1"
}
if [ "${FNVM_TEST_HOST:-1}" != 0 ]; then missing "$results/host.plan" "$results/host" || host_status=1; fi
if [ "$nested" = 1 ]; then missing "$results/nested.plan" "$results/nested" || nested_status=1; fi

# The summary: how many tests ran at which level.
summary() { # DIR LABEL
  local dir="$1" name="$2" passed=0 failed=0 ignored=0 bins=0 bad=() f status p fl ig secs re
  local retried=0
  for f in "$dir"/*.result; do
    [ -f "$f" ] || continue
    read -r status p fl ig secs re <"$f"
    passed=$((passed + p)) failed=$((failed + fl)) ignored=$((ignored + ig)) bins=$((bins + 1))
    retried=$((retried + ${re:-0}))
    [ "$status" -eq 0 ] || bad+=("$(basename "$f" .result)")
  done
  printf 'test.sh: %-44s %4d passed, %d failed, %d ignored in %d binaries%s\n' "$name:" \
    "$passed" "$failed" "$ignored" "$bins" "${bad[*]:+ (failing: ${bad[*]})}" >&2
  [ "$retried" -eq 0 ] || printf 'test.sh: !!! %s: %d test(s) failed once and were retried (see *.retry.log)\n' \
    "$name" "$retried" >&2
}
echo >&2
summary "$results/host" "host level (FNVM_TEST_SANDBOXES=${FNVM_TEST_SANDBOXES:-process,vm})"
if [ "$nested" = 1 ]; then
  summary "$results/nested" "nested level (L1, emulated SVM, vm sandbox)"
  for f in "$results"/nested/*.result; do
    [ -f "$f" ] || continue
    read -r status p fl ig secs re <"$f"
    printf 'test.sh:   %-40s %3d passed %3d failed in %4d s (emulation)%s\n' \
      "$(basename "$f" .result)" "$p" "$fl" "$secs" "${re:+$([ "$re" -gt 0 ] && echo ", $re retried")}" >&2
  done
  [ "$nested_status" -eq 0 ] || log "nested level FAILED (status $nested_status)"
fi
[ "$host_status" -eq 0 ] || log "host level FAILED"
[ "$fuzz_status" -eq 0 ] || log "fuzz smoke FAILED (scripts/fuzz.sh prints which target)"
log "logs: $results"
[ "$host_status" -eq 0 ] && [ "$nested_status" -eq 0 ] && [ "$fuzz_status" -eq 0 ]
