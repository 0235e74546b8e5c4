#!/usr/bin/env bash
# The nested level: runs a command inside an "L1" Linux under QEMU's software emulation (TCG)
# of an AMD CPU with SVM, so /dev/kvm there has hardware virtualization (emulated) even when this
# host's has none (KVM-PVM). The host's root is shared read-only (9p) under a tmpfs overlay: the
# same paths, binaries and caches work inside; writes inside vanish with L1.
#
# Usage: scripts/nested.sh [--rw DIR]... [--] COMMAND [ARG]...
#        scripts/nested.sh --prepare      (only build the cache; prints its directory)
#   --rw DIR   share the host directory DIR read-write at the same path inside L1 (results,
#              logs); DIR must exist and may not be / .
# The command runs in the current directory with the current environment (exported variables),
# its stdout and stderr streamed to this script's stdout; its exit status is this script's.
# L1's kernel log is kept and printed when L1 fails.
#
# An L1 crash (a kernel panic or lockup of the emulated L1: no exit status came back, or L1's
# heartbeat stopped for FNVM_NESTED_HANG seconds, default 120) is said loudly and the command
# is run again in a fresh L1 (up to FNVM_NESTED_ATTEMPTS runs, default 4); the command should
# therefore be safe to run again (e.g. skip work recorded as done in a --rw directory). Exit
# status 125: L1 crashed on every attempt, or the level itself could not start (never the
# command's own status).
#
# Everything L1 needs comes from Debian packages: qemu-system-x86, the distribution kernel
# (linux-image-amd64's current linux-image-6.1.0-N-amd64, extracted, never installed) and an
# initramfs of busybox-static and the kernel's own modules. They are cached under
# $FNVM_NESTED_CACHE (default /var/cache/fnvm/nested, or ~/.cache/fnvm/nested when that is not
# writable) in a directory named by the hash of the inputs: a second run builds nothing.
#
# Environment: FNVM_NESTED_MEM (default 8G), FNVM_NESTED_CPUS (2), FNVM_NESTED_CPU (QEMU CPU
# model, default EPYC,+svm,+npt minus what TCG lacks), FNVM_NESTED_TIMEOUT (seconds per L1 run, default 3600),
# FNVM_NESTED_HANG (seconds without L1's heartbeat before it counts as crashed, default 120),
# FNVM_NESTED_TCG_THREAD (QEMU's TCG threading: multi, or single), FNVM_NESTED_PIN (1: the
# command runs on L1's last CPU only, the default; 0: on all), FNVM_NESTED_HOLD (1: two idle
# KVM VMs are held open in L1 while the command runs, the default; 0: none),
# FNVM_NESTED_KERNEL_PKG (the L1 kernel package, default linux-image-amd64's dependency).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
init_script="$here/lib/nested-init.sh"
log() { printf 'nested: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 125; }
loud() {
  printf '\nnested: ********************************************************************\n' >&2
  printf 'nested: *** %s\n' "$@" >&2
  printf 'nested: ********************************************************************\n' >&2
}

# The modules L1 needs; their dependencies are resolved from modules.dep. loop and ext4: the
# process sandbox's tests run in L1 too, for its cgroup v2 (Debian's default hierarchy); crc32c_generic:
# ext4's metadata checksums (without it mount fails with ENOENT). The VM sandbox's egress
# (src/network/host_filter.rs): nf_tables with nft_fib_inet (`fib daddr type local`, pulling in
# nft_fib_ipv4/6) and nft_reject_inet (`reject`, pulling in nf_reject_ipv4/6); veth for the
# egress tests' TestHost; dummy for L1's uplink (the default route passt needs); tun for the
# process sandbox's pasta (its namespace's eth0). All are modules
# in Debian's 6.1 kernel, none built in; L1 cannot autoload modules (its / is the host's, without
# this kernel's /lib/modules), so init loads them.
modules=(virtio_pci 9pnet_virtio 9p overlay kvm_amd loop ext4 crc32c_generic
  nf_tables nft_fib_inet nft_reject_inet veth dummy tun)

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

ensure_packages() {
  local need=() p
  # python3: scripts/lib/kvm-hold.py, run inside L1.
  for p in qemu-system-x86 busybox-static cpio python3; do installed "$p" || need+=("$p"); done
  [ "${#need[@]}" -eq 0 ] && return
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing Debian packages: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
}

cache_root() {
  if [ -n "${FNVM_NESTED_CACHE:-}" ]; then
    echo "$FNVM_NESTED_CACHE"
  elif mkdir -p /var/cache/fnvm/nested 2>/dev/null && [ -w /var/cache/fnvm/nested ]; then
    echo /var/cache/fnvm/nested
  else
    echo "${XDG_CACHE_HOME:-$HOME/.cache}/fnvm/nested"
  fi
}

# "<package> <version>" of the L1 kernel.
kernel_package() {
  local pkg="${FNVM_NESTED_KERNEL_PKG:-}" version
  if [ -z "$pkg" ]; then
    pkg="$(apt-cache depends linux-image-amd64 2>/dev/null |
      awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')"
    if [ -z "$pkg" ]; then
      apt-get update -qq >&2 || true
      pkg="$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')"
    fi
    [ -n "$pkg" ] || die "apt knows no linux-image-amd64; set FNVM_NESTED_KERNEL_PKG"
  fi
  version="$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | awk '/^Version:/ { print $2; exit }')"
  [ -n "$version" ] || die "apt knows no package $pkg"
  echo "$pkg $version"
}

# Builds (once) and prints the cache directory holding vmlinuz and initramfs.cpio.
prepare() {
  ensure_packages
  local root pkg version key dir
  root="$(cache_root)"
  read -r pkg version < <(kernel_package)
  key="$({
    echo "$pkg $version"
    dpkg-query -W -f='${Version}\n' busybox-static
    echo "${modules[*]}"
    cat "${BASH_SOURCE[0]}" "$init_script"
  } | sha256sum | cut -c1-16)"
  dir="$root/$key"
  if [ -f "$dir/initramfs.cpio" ]; then
    echo "$dir"
    return
  fi
  mkdir -p "$root"
  exec 9>"$root/.lock"
  flock 9
  if [ ! -f "$dir/initramfs.cpio" ]; then
    build "$root" "$dir" "$pkg" "$version"
  fi
  exec 9>&-
  echo "$dir"
}

build() {
  local root="$1" dir="$2" pkg="$3" version="$4" scratch
  log "preparing L1 ($pkg $version) in $dir"
  scratch="$(mktemp -d "$root/.build.XXXXXX")"
  # shellcheck disable=SC2064
  trap "rm -rf '$scratch'" EXIT
  (cd "$scratch" && apt-get download "$pkg=$version" >/dev/null 2>&1) ||
    (cd "$scratch" && apt-get download "$pkg=$version" >&2) || die "cannot download $pkg=$version"
  dpkg-deb -x "$scratch"/*.deb "$scratch/pkg"
  local release
  release="$(basename "$(ls -d "$scratch"/pkg/lib/modules/*/)")"
  local moddir="$scratch/pkg/lib/modules/$release"
  busybox depmod -b "$scratch/pkg" "$release"

  # The modules and their dependencies (modules.dep lists each module's full closure).
  local ir="$scratch/initramfs" m line paths=()
  mkdir -p "$ir/bin" "$ir/lib/modules/$release"
  for m in "${modules[@]}"; do
    line="$(grep -E "/${m//_/[-_]}\.ko(\.[a-z]+)?:" "$moddir/modules.dep")" ||
      die "module $m is not in $pkg"
    paths+=(${line/:/})
  done
  local p
  for p in $(printf '%s\n' "${paths[@]}" | sort -u); do
    mkdir -p "$ir/lib/modules/$release/$(dirname "$p")"
    cp "$moddir/$p" "$ir/lib/modules/$release/$p"
  done
  cp "$moddir/modules.order" "$moddir/modules.builtin" "$ir/lib/modules/$release/"
  busybox depmod -b "$ir" "$release"
  cp /bin/busybox "$ir/bin/busybox"
  install -m 0755 "$init_script" "$ir/init"
  (cd "$ir" && find . -print0 | sort -z | cpio --null -o -H newc --quiet) >"$scratch/initramfs.cpio"
  cp "$scratch/pkg/boot/vmlinuz-$release" "$scratch/vmlinuz"
  mkdir -p "$scratch/out"
  mv "$scratch/vmlinuz" "$scratch/initramfs.cpio" "$scratch/out/"
  rm -rf "$dir"
  mv "$scratch/out" "$dir"
  rm -rf "$scratch"
  trap - EXIT
  log "L1 ready: $(du -sh "$dir" | cut -f1) in $dir"
}

if [ "${1:-}" = --prepare ]; then
  prepare
  exit 0
fi

rw=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rw)
      [ $# -ge 2 ] || die "--rw needs a directory"
      [ -d "$2" ] || die "--rw $2: no such directory"
      d="$(cd "$2" && pwd -P)"
      [ "$d" != / ] || die "--rw /: the host root is shared read-only"
      case "$d" in *[[:space:]]*) die "--rw $d: paths with spaces are not supported" ;; esac
      rw+=("$d")
      shift 2
      ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see the usage at the top of $0)" ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || die "no command given (usage: scripts/nested.sh [--rw DIR]... [--] COMMAND [ARG]...)"

cache="$(prepare)"
run="$(mktemp -d /tmp/fnvm-nested.XXXXXX)"
qemu_pid=""
trap 'rm -rf "$run"' EXIT
trap 'stop_l1; wait; exit 143' TERM INT HUP

# The command runs on L1's last CPU only (FNVM_NESTED_PIN=0: on all of them). With KVM's vCPU
# threads free to move between L1's emulated CPUs, QEMU's emulated SVM now and then takes an
# interrupt at VMRUN with L2's GS loaded ("corrupted stack end detected inside scheduler",
# "Fatal exception in interrupt" in svm_vcpu_enter_exit) and L2 kernels triple-fault or hang in
# early boot. Measured with Linux guests booting back to back (linux_guest over and over): free,
# a hung guest and an L1 crash within 142 s (QEMU 10.0; 7.2 alike: 4 L1 crashes in one CI run);
# pinned, 60 of 60 boots clean and no crash in 480 s (and 50 of 50 console-heavy boots on 7.2).
# L1's other CPU still serves its kernel: 9p, interrupts, kernel threads.
cpus="${FNVM_NESTED_CPUS:-2}"
case "$cpus" in '' | *[!0-9]* | 0) die "FNVM_NESTED_CPUS=$cpus: not a positive number of CPUs" ;; esac
pin=""
if [ "${FNVM_NESTED_PIN:-1}" != 0 ] && [ "$cpus" -gt 1 ]; then pin=$((cpus - 1)); fi

# Two idle KVM VMs stay open in L1 while the command runs (FNVM_NESTED_HOLD=0: none), so the
# command's VMs never take KVM's VM counts to or from zero. At zero KVM switches SVM off on
# every CPU by IPI and flips static keys by live text patching; under emulation L1 hung whole
# there (one CPU in kvm_destroy_vm's on_each_cpu, the other stuck in a text-patching int3).
# See scripts/lib/kvm-hold.py.
hold=1
[ "${FNVM_NESTED_HOLD:-1}" != 0 ] || hold=""

# The command as a shell script: the environment, the directory, the argv.
{
  echo "# written by scripts/nested.sh"
  export -p | grep -v -E '^declare -x (OLDPWD|PWD|SHLVL|_)(=|$)' | sed 's/^declare -x /export /'
  printf 'cd %q || exit 125\n' "$PWD"
  [ -z "$hold" ] || printf '/usr/bin/python3 %q </dev/null &\n' "$here/lib/kvm-hold.py"
  printf 'exec'
  [ -z "$pin" ] || printf ' taskset -c %s' "$pin"
  printf ' %q' "$@"
  printf '\n'
} >"$run/command.sh"
: >"$run/mounts"
devices=()
i=0
for d in "${rw[@]}"; do
  echo "rw$i $d" >>"$run/mounts"
  devices+=(-virtfs "local,path=$d,mount_tag=rw$i,security_model=none,multidevs=remap")
  i=$((i + 1))
done

onlcr=0
[ -t 1 ] && onlcr=1
timeout_s="${FNVM_NESTED_TIMEOUT:-3600}"
hang_s="${FNVM_NESTED_HANG:-120}"
# Even pinned (see $pin above), emulated L1s crash or hang now and then; a run of many guests
# may meet that more than once. Each attempt resumes where the last stopped when the command
# allows it.
attempts="${FNVM_NESTED_ATTEMPTS:-4}"
# EPYC with SVM and nested paging, minus what TCG cannot emulate (QEMU warns about each), and
# minus XSAVE: QEMU 7.2's emulated SVM does not intercept XSETBV, so an L2 guest's XSETBV changes
# the emulated CPU's XCR0 behind L1's KVM, which then reports XSAVE sizes for another XCR0 and
# switches XCR0 wrongly around VMRUN. L2 kernels warned "XSAVE consistency problem", hung in FPU
# init or triple-faulted in early boot (about 1 boot in 10). Without XSAVE, L1's KVM offers none
# and L2 uses FXSAVE: 15 of 15 Linux boots clean where 3 of 5 had failed.
cpu="${FNVM_NESTED_CPU:-EPYC,+svm,+npt,-rdseed,-sha-ni,-fxsr-opt,-misalignsse,-3dnowprefetch,-osvw,-topoext,-nrip-save,-xsavec,-xsave}"

# Ends QEMU: TERM through timeout(1), KILL to both if they are still there 15 s later.
stop_l1() {
  [ -n "$qemu_pid" ] || return 0
  kill "$qemu_pid" 2>/dev/null || true
  local i
  for i in $(seq 15); do
    kill -0 "$qemu_pid" 2>/dev/null || return 0
    sleep 1
  done
  pkill -KILL -P "$qemu_pid" 2>/dev/null || true
  kill -KILL "$qemu_pid" 2>/dev/null || true
}

boot_l1() {
  rm -f "$run/status" "$run/init-error" "$run/console.log" "$run/heartbeat"
  local rc=0
  timeout -k 10 "$timeout_s" qemu-system-x86_64 \
    -accel "tcg,thread=${FNVM_NESTED_TCG_THREAD:-multi}" -cpu "$cpu" \
    -smp "$cpus" -m "${FNVM_NESTED_MEM:-8G}" \
    -nodefaults -no-user-config -display none -monitor none -no-reboot \
    -kernel "$cache/vmlinuz" -initrd "$cache/initramfs.cpio" \
    -append "console=ttyS0 panic=-1 oops=panic softlockup_panic=1 watchdog_thresh=60 mitigations=off fnvm_nested.run=$run fnvm_nested.onlcr=$onlcr" \
    -chardev "file,id=console,path=$run/console.log" -serial chardev:console \
    -chardev stdio,id=out -serial chardev:out \
    -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
    -virtfs "local,path=$run,mount_tag=run,security_model=none,multidevs=remap" \
    "${devices[@]}" </dev/null &
  # timeout(1) runs in a process group of its own: a signal to ours must reach QEMU through it.
  qemu_pid=$!
  # L1's init bumps $run/heartbeat every 5 s while the command runs; an L1 that hangs whole
  # (seen under emulation: both vCPUs spinning, no panic, no lockup report) stops it.
  local beat="" last_beat="" last_change=$SECONDS
  hung=0
  while kill -0 "$qemu_pid" 2>/dev/null; do
    sleep 2
    beat="$(cat "$run/heartbeat" 2>/dev/null || true)"
    if [ "$beat" != "$last_beat" ]; then
      last_beat="$beat"
      last_change=$SECONDS
    elif [ $((SECONDS - last_change)) -ge "$hang_s" ] && [ ! -f "$run/status" ]; then
      hung=1
      stop_l1
      break
    fi
  done
  wait "$qemu_pid" || rc=$?
  qemu_pid=""
  return "$rc"
}

console_tail() {
  log "L1 kernel console (last 80 lines of $run/console.log):"
  tail -n 80 "$run/console.log" 2>/dev/null | sed 's/^/  L1| /' >&2 || true
}

for attempt in $(seq "$attempts"); do
  started=$SECONDS
  qemu_rc=0
  boot_l1 || qemu_rc=$?
  if [ -f "$run/status" ]; then
    status="$(cat "$run/status")"
    log "L1 ran the command in $((SECONDS - started)) s (emulation); exit status $status"
    [ "$status" -eq 0 ] || console_tail
    exit "$status"
  fi
  if [ -f "$run/init-error" ]; then
    console_tail
    loud "L1 could not start: $(cat "$run/init-error")"
    exit 125
  fi
  console_tail
  if [ "$hung" -eq 1 ]; then
    loud "L1 HUNG: its heartbeat stopped for ${hang_s} s (FNVM_NESTED_HANG); QEMU killed" \
      "attempt $attempt of $attempts"
  elif [ "$qemu_rc" -eq 124 ]; then
    loud "L1 CRASHED: no exit status after ${timeout_s} s (FNVM_NESTED_TIMEOUT); QEMU killed" \
      "attempt $attempt of $attempts"
  else
    loud "L1 CRASHED: QEMU exited ($qemu_rc) without an exit status from the command" \
      "(a kernel panic or lockup of the emulated L1); attempt $attempt of $attempts"
  fi
done
loud "L1 crashed $attempts times: giving up"
exit 125
