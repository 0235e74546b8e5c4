#!/usr/bin/env bash
# Builds fnvm's guest kernel (an uncompressed `vmlinux` with a PVH entry note) from Debian's
# linux-source-6.1 and caches it.
#
# Usage: guest-kernel/build.sh [CACHE_DIR]
#   CACHE_DIR defaults to $FNVM_KERNEL_CACHE, else ${XDG_CACHE_HOME:-$HOME/.cache}/fnvm/kernel.
#   The result is CACHE_DIR/<key>/vmlinux, where <key> is the sha256 of the config fragment, this
#   script and the source package's version: a second run with the same inputs is instant.
#   The vmlinux path is the last line on stdout; everything else goes to stderr.
#
# The config is `make tinyconfig`, then the fragment fnvm.config (next to this script, or
# $FNVM_KERNEL_CONFIG), then `make olddefconfig`; every line of the fragment must survive.
# Nothing half-built ever appears in the cache: the build happens in a scratch directory inside
# CACHE_DIR and its result is renamed into place; a lock serializes concurrent builds.
set -euo pipefail

log() { printf 'guest-kernel: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
script="$here/$(basename "${BASH_SOURCE[0]}")"
fragment="${FNVM_KERNEL_CONFIG:-$here/fnvm.config}"
source_pkg=linux-source-6.1
source_tar=/usr/src/linux-source-6.1.tar.xz

if [ -n "${1:-}" ]; then
  cache_root="$1"
elif [ -n "${FNVM_KERNEL_CACHE:-}" ]; then
  cache_root="$FNVM_KERNEL_CACHE"
else
  [ -n "${XDG_CACHE_HOME:-}" ] || [ -n "${HOME:-}" ] || die "neither XDG_CACHE_HOME nor HOME is set; pass CACHE_DIR"
  cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/fnvm/kernel"
fi
[ -f "$fragment" ] || die "config fragment $fragment does not exist"

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

# Install the build's Debian packages, only those missing (a second run installs nothing).
need=()
for p in "$source_pkg" flex bison bc libelf-dev libssl-dev make gcc xz-utils; do
  installed "$p" || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing Debian packages ${need[*]} and no apt-get to install them"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing Debian packages: ${need[*]}"
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
[ -f "$source_tar" ] || die "$source_tar is missing although $source_pkg is installed"

version="$(dpkg-query -W -f='${Version}' "$source_pkg")"
key="$( { cat "$fragment"; printf '\0'; cat "$script"; printf '\0%s\n' "$source_pkg=$version"; } \
  | sha256sum | cut -d' ' -f1)"
result="$cache_root/$key/vmlinux"

if [ -f "$result" ]; then
  printf '%s\n' "$result"
  exit 0
fi

mkdir -p "$cache_root"
exec 9>"$cache_root/.build.lock"
if ! flock -n 9; then
  log "another build holds $cache_root/.build.lock; waiting for it"
  flock 9
fi
# The build we waited for may have produced exactly this kernel.
if [ -f "$result" ]; then
  printf '%s\n' "$result"
  exit 0
fi

scratch="$(mktemp -d "$cache_root/.build-$key.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
src="$scratch/src"
mkdir -p "$src"

log "building the guest kernel $key ($source_pkg $version) in $scratch"
log "unpacking $source_tar"
tar -xf "$source_tar" -C "$src" --strip-components=1

kmake() {
  # Fixed build metadata so that the same inputs give the same kernel.
  make -C "$src" ARCH=x86_64 KBUILD_BUILD_USER=fnvm KBUILD_BUILD_HOST=fnvm \
    KBUILD_BUILD_TIMESTAMP="1970-01-01" KBUILD_BUILD_VERSION=1 "$@" >&2
}

kmake tinyconfig
# The fragment's lines replace the same symbols in the tiny config (merge_config.sh -m only
# merges; olddefconfig then resolves dependencies).
(cd "$src" && KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m .config "$fragment" >&2)
kmake olddefconfig

# Every option the fragment asks for must really be set (or unset) now.
dropped=()
while IFS= read -r line; do
  if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
    grep -qxF "$line" "$src/.config" || dropped+=("$line (got: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$src/.config" || echo 'absent'))")
  elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
    ! grep -qE "^${BASH_REMATCH[1]}=" "$src/.config" || dropped+=("$line (got: $(grep -E "^${BASH_REMATCH[1]}=" "$src/.config"))")
  fi
done <"$fragment"
if [ "${#dropped[@]}" -gt 0 ]; then
  log "error: olddefconfig did not keep these options of $fragment:"
  for d in "${dropped[@]}"; do log "  $d"; done
  exit 1
fi
log "config verified: every option of $(basename "$fragment") is in effect"

log "make -j$(nproc) vmlinux"
kmake -j"$(nproc)" vmlinux

out="$scratch/out"
mkdir -p "$out"
cp "$src/vmlinux" "$out/vmlinux.tmp"
mv "$out/vmlinux.tmp" "$out/vmlinux"
cp "$src/.config" "$out/config"
printf '%s\n' "$source_pkg=$version" >"$out/source-version"
# One rename publishes the whole directory: readers see all of it or nothing. A directory
# without vmlinux cannot come from this script; clear whatever is there (we hold the lock).
rm -rf "${cache_root:?}/$key"
mv -T "$out" "$cache_root/$key"
log "built $result"
printf '%s\n' "$result"
