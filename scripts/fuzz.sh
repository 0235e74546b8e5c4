#!/usr/bin/env bash
# Runs the fuzz targets of every parser of hostile input (fuzz/fuzz_targets/*.rs, one crate
# so the dependencies build once) with cargo-fuzz and libFuzzer, and prints a table.
#
# Usage: scripts/fuzz.sh --smoke                  every target for 20 s (what CI runs)
#        scripts/fuzz.sh --time SECS [TARGET...]  longer, every target or the ones named
#        scripts/fuzz.sh --clippy                 clippy -D warnings on the fuzz crate
# Environment: FNVM_FUZZ_JOBS (default 2) targets at once, never more than the cores;
# FNVM_FUZZ_WORK (default fuzz/target/fuzz-work) where found inputs and logs go. The
# checked-in seeds (fuzz/corpus/TARGET) are read, never written: a run's new inputs go to
# the work directory (kept between runs, so longer runs build on earlier ones). A crash,
# leak or timeout leaves its input in fuzz/artifacts/TARGET/ and fails the script.
#
# Toolchain: stable, with RUSTC_BOOTSTRAP=1 for cargo-fuzz's -Z flags (only the stable
# toolchain is guaranteed on CI). Release build (-O) with AddressSanitizer (cargo-fuzz's
# default sanitizer, so libFuzzer's leak detection is on); fnvm's own crates also get overflow
# checks and debug assertions (fuzz/Cargo.toml's profile overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
log() { printf 'fuzz.sh: %s\n' "$*" >&2; }

secs="" targets=()
case "${1:-}" in
  --smoke) secs=20; shift ;;
  --time) secs="${2:?--time needs seconds}"; shift 2; targets=("$@") ;;
  --clippy) ;;
  *) sed -n '5,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
all=()
for f in fuzz/fuzz_targets/*.rs; do all+=("$(basename "$f" .rs)"); done
[ "${#targets[@]}" -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
  [ -f "fuzz/fuzz_targets/$t.rs" ] || { log "no such target: $t (have: ${all[*]})"; exit 2; }
done

export RUSTC_BOOTSTRAP=1
# The fuzz crate always builds in fuzz/target (its flags are its own; a CARGO_TARGET_DIR meant
# for the workspace would mix the two and hide the binaries from cargo-fuzz).
unset CARGO_TARGET_DIR
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz (cached in ~/.cargo/bin)"
  cargo install cargo-fuzz --locked
fi

if [ "${1:-}" = --clippy ]; then
  # clippy-driver as the workspace's compiler: only the fuzz crate is linted, and its
  # dependencies are the sanitizer build's own (no second build of them in check mode).
  log "clippy on the fuzz crate"
  cd fuzz
  CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__" \
    RUSTC_WORKSPACE_WRAPPER="$(command -v clippy-driver)" nice cargo fuzz build -O
  exit
fi

log "building ${#targets[@]} fuzz target(s) (release, AddressSanitizer)"
build_args=()
[ "${#targets[@]}" -eq "${#all[@]}" ] || build_args=("${targets[@]}")
if [ "${#build_args[@]}" -eq 0 ]; then
  (cd fuzz && nice cargo fuzz build -O)
else
  for t in "${build_args[@]}"; do (cd fuzz && nice cargo fuzz build -O "$t"); done
fi
bin="$root/fuzz/target/x86_64-unknown-linux-gnu/release"

work="${FNVM_FUZZ_WORK:-$root/fuzz/target/fuzz-work}"
jobs="${FNVM_FUZZ_JOBS:-2}"
cores="$(nproc)"
[ "$jobs" -le "$cores" ] || jobs="$cores"
mkdir -p "$work"

# run TARGET: one libFuzzer run; writes $work/TARGET.log and $work/TARGET.result.
run() {
  local t="$1" rc=0 start="$SECONDS"
  mkdir -p "$work/corpus/$t" "$root/fuzz/artifacts/$t"
  (cd "$work" && nice -n 10 "$bin/$t" "$work/corpus/$t" "$root/fuzz/corpus/$t" \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$root/fuzz/artifacts/$t/" >"$work/$t.log" 2>&1) || rc=$?
  local runs rate files elapsed=$((SECONDS - start))
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log" | tail -1)"
  rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/$t.log" | tail -1)"
  files="$(find "$work/corpus/$t" "$root/fuzz/corpus/$t" -type f | wc -l)"
  local result=ok
  if [ "$rc" -ne 0 ]; then
    result="FAILED (exit $rc: $(grep -m1 -o -E 'ERROR: [A-Za-z]+: [a-z-]+|deadly signal|timeout|out-of-memory|panicked at [^ ]+' "$work/$t.log" || echo see log))"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$elapsed" "${runs:-?}" "${rate:-?}" "$files" "$result" >"$work/$t.result"
}

log "running ${#targets[@]} target(s) for $secs s each, $jobs at a time (logs: $work)"
running=0
for t in "${targets[@]}"; do
  rm -f "$work/$t.result"
  run "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait

status=0
{
  printf '%-16s %7s %12s %9s %7s  %s\n' target seconds runs execs/s corpus result
  for t in "${targets[@]}"; do
    if [ -f "$work/$t.result" ]; then
      IFS=$'\t' read -r name s runs rate files result <"$work/$t.result"
    else
      name="$t" s="$secs" runs="?" rate="?" files="?" result="FAILED (no result)"
    fi
    [ "$result" = ok ] || status=1
    printf '%-16s %7s %12s %9s %7s  %s\n' "$name" "$s" "$runs" "$rate" "$files" "$result"
  done
} >&2
[ "$status" -eq 0 ] || log "a fuzz target failed: its input is in fuzz/artifacts/TARGET/, its log in $work"
exit "$status"
