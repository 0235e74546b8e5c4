#!/bin/busybox sh
# PID 1 of the nested level's L1 Linux (copied into its initramfs by scripts/nested.sh).
#
# Stage 1 (initramfs): load the modules, mount the host's root (9p, read-only) under a tmpfs
# overlay, fresh /proc /sys /dev /run in it (/tmp stays the host's, seen through the overlay: a
# checkout or work directory under /tmp must exist inside too), the read-write shares at their host paths, then
# switch_root into it — a real root, so pivot_root (the agent, the process sandbox) works there.
# Stage 2 (`stage2`, PID 1 in the new root): run the host-written command with its output on
# ttyS1, write its exit status into the run share, power off. Everything the host should know
# goes through the run share; the kernel log stays on ttyS0.
set -u

say() { echo "fnvm-nested init: $*" >/dev/ttyS0; }

# A failure of the level itself (not of the command): the host reports it without a retry.
init_error() {
  say "error: $*"
  [ -d /share ] && echo "$*" >/share/init-error
  sync
  poweroff -f
  sleep 1000000
}

param() { # the value of fnvm_nested.$1= on the kernel command line
  for word in $(cat /proc/cmdline); do
    case "$word" in "fnvm_nested.$1="*) echo "${word#*=}"; return ;; esac
  done
}

stage2() {
  run="$1"
  cd /
  if [ "$(param onlcr)" = 1 ]; then
    busybox stty -F /dev/ttyS1 raw -echo opost onlcr
  else
    busybox stty -F /dev/ttyS1 raw -echo
  fi
  # A heartbeat the host watches: an emulated L1 can hang whole (both vCPUs spinning, no
  # panic), and only the absence of this counter's progress tells the host so.
  (
    beat=0
    while :; do
      beat=$((beat + 1))
      echo "$beat" >"$run/heartbeat.tmp" && mv "$run/heartbeat.tmp" "$run/heartbeat"
      busybox sleep 5
    done
  ) </dev/null >/dev/null 2>&1 &
  # L1 has no NIC, but passt and pasta (functions' network egress) pick their outgoing
  # interface from the default route and refuse to start without one: a dummy uplink carries
  # it, as a host's NIC would (what is sent there goes nowhere).
  { /sbin/ip link add fnvm-uplink type dummy && /sbin/ip addr add 198.18.0.1/24 dev fnvm-uplink &&
    /sbin/ip link set fnvm-uplink up &&
    /sbin/ip route add default via 198.18.0.254 dev fnvm-uplink; } >/dev/ttyS0 2>&1 ||
    say "warning: no default route in L1 (VM and process sandbox egress will not start)"
  /bin/sh "$run/command.sh" </dev/null >/dev/ttyS1 2>&1
  status=$?
  echo "$status" >"$run/status.tmp" && mv "$run/status.tmp" "$run/status"
  sync
  busybox poweroff -f
  busybox sleep 1000000
}

if [ "${1:-}" = stage2 ]; then
  stage2 "$2"
fi

/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /share /lower /upper /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

run="$(param run)"
[ -n "$run" ] || init_error "no fnvm_nested.run= on the kernel command line"
modprobe -a virtio_pci 9pnet_virtio 9p overlay || init_error "cannot load the 9p/overlay modules"
opts=trans=virtio,version=9p2000.L,msize=524288
mount -t 9p -o "$opts" run /share || init_error "cannot mount the run share"
modprobe kvm_amd || init_error "cannot load kvm_amd (does the CPU model have +svm?)"
modprobe -a loop ext4 crc32c_generic || init_error "cannot load the loop and ext4 modules (the process sandbox's disks)"
modprobe -a nf_tables nft_fib_inet nft_reject_inet veth dummy tun ||
  init_error "cannot load the nftables and veth modules (egress rules, pasta, the egress tests' hosts)"
[ -c /dev/kvm ] || init_error "kvm_amd loaded but there is no /dev/kvm"

mount -t 9p -o "$opts,ro,cache=loose" hostroot /lower || init_error "cannot mount the host root"
mount -t tmpfs -o mode=0755 upper /upper || init_error "cannot mount the overlay's tmpfs"
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot ||
  init_error "cannot mount the overlay over the host root"

r=/newroot
mount -t proc proc $r/proc
mount -t sysfs sysfs $r/sys
mount -t cgroup2 cgroup2 $r/sys/fs/cgroup 2>/dev/null
mount -t devtmpfs devtmpfs $r/dev
mkdir -p $r/dev/pts $r/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $r/dev/pts
mount -t tmpfs tmpfs $r/dev/shm
mount -t tmpfs -o mode=0755 tmpfs "$r/run" || init_error "cannot mount a tmpfs on /run"

# Read-write shares, each at its host path: "<tag> <path>" lines.
while read -r tag path; do
  [ -n "$tag" ] || continue
  mkdir -p "$r$path" && mount -t 9p -o "$opts" "$tag" "$r$path" ||
    init_error "cannot mount the read-write share $path"
done </share/mounts
mkdir -p "$r$run"
mount --move /share "$r$run" || init_error "cannot move the run share to $run"

ifconfig lo 127.0.0.1 up
hostname fnvm-l1
echo "fnvm-nested init: /dev/kvm ready, running the command" >/dev/ttyS0
cp /init $r/run/fnvm-nested-init
exec switch_root $r /bin/busybox sh /run/fnvm-nested-init stage2 "$run"
