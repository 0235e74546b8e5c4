#!/usr/bin/env bash
# Everything fnvm needs on a fresh Debian/Ubuntu x86-64 machine, installed once and cached.
# Idempotent: a second run only checks. Usage: scripts/setup.sh [tests|demo|bench]...
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }

# Debian packages per purpose. The guest kernel's build tools are installed by
# guest-kernel/build.sh itself, only when a kernel is actually built. passt and nftables carry
# and police every function's network (egress is the default, the demo's function has it too);
# iperf3 and iproute2 are for its tests and bench, which also run dnsmasq and PostgreSQL as real
# servers in network namespaces (testkit's nethost/servers). containerd (with runc and
# containerd-shim-runc-v2) is for the containerd tests, which start containerd of their own
# (testkit's containerd fixture): see below for the system service the package comes with.
packages=(e2fsprogs erofs-utils busybox-static cpio passt nftables)
for purpose in "$@"; do
  case "$purpose" in
    tests) packages+=(docker-registry apache2-utils mmdebstrap jq
                      dnsmasq-base iperf3 postgresql iproute2 containerd) ;;
    demo) ;;
    bench) packages+=(docker-registry apache2-utils umoci mmdebstrap qemu-system-x86 wrk
                      libpcre2-8-0 libssl3 zlib1g libcrypt1
                      iperf3 iproute2 containerd) ;;
    *) log "unknown purpose '$purpose' (expected tests, demo or bench)"; exit 2 ;;
  esac
done

missing=()
for p in "${packages[@]}"; do
  if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  # containerd's package enables and starts containerd.service where systemd runs (its
  # postinst, through deb-systemd-invoke, which asks /usr/sbin/policy-rc.d first); it ships no
  # init script, so elsewhere nothing starts. The tests start containerd of their own and
  # nothing may be left running, so where no policy-rc.d exists one that refuses containerd
  # alone is in place for the install.
  policy=""
  if [[ " ${missing[*]} " == *" containerd "* ]] && [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    trap '$sudo rm -f "$policy"' EXIT
    printf '#!/bin/sh\ncase "$1" in containerd|containerd.service) exit 101 ;; esac\nexit 0\n' \
      | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  if [ -n "$policy" ]; then
    $sudo rm -f "$policy"
    trap - EXIT
  fi
  # The postinst enables the unit even where systemd does not run (then a later boot with
  # systemd would start it): disable it in any case, and stop it where systemd runs.
  if [[ " ${missing[*]} " == *" containerd "* ]] && command -v systemctl >/dev/null; then
    log "disabling the system containerd.service (the tests start containerd of their own)"
    now=""
    [ ! -d /run/systemd/system ] || now="--now"
    $sudo systemctl disable $now containerd.service >&2 || true
  fi
fi

# The bridge bench's peer proxy: Debian's nginx binary, extracted, never installed (the
# package would start a system nginx on port 80). Its libraries are the packages above.
if [[ " $* " == *" bench "* ]]; then
  cache="${FNVM_BENCH_CACHE:-/var/cache/fnvm/bench}"
  version="$(apt-cache policy nginx 2>/dev/null | awk '/Candidate:/ {print $2}')"
  if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    version="$(apt-cache policy nginx | awk '/Candidate:/ {print $2}')"
  fi
  dir="$cache/nginx-${version//:/_}"
  if [ ! -x "$dir/usr/sbin/nginx" ]; then
    log "extracting nginx $version into $dir (the bridge bench's peer proxy)"
    mkdir -p "$cache"
    tmp="$(mktemp -d "$cache/.nginx.XXXXXX")"
    if (cd "$tmp" && apt-get download -qq "nginx=$version" 2>/dev/null) \
      && dpkg-deb -x "$tmp"/nginx_*.deb "$tmp/root"; then
      rm -rf "$dir" && mv "$tmp/root" "$dir"
    else
      log "cannot download nginx $version: the bridge bench will run without its peer proxy"
    fi
    rm -rf "$tmp"
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  log "cargo is missing: install a Rust toolchain (rustup) first"
  exit 1
fi

# The guest agent and the demo's example function are static binaries (glibc with crt-static: no musl target is needed). Building it
# for an explicit --target keeps crt-static away from build scripts and proc-macros.
profile="${FNVM_PROFILE:-release}"
log "building the static guest agent and example function ($profile)"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --locked --profile "$profile" \
  -p fnvm-agent -p fnvm-hello --target x86_64-unknown-linux-gnu
