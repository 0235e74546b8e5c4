#!/usr/bin/env bash
# Builds fnvm's guest kernel (an uncompressed `vmlinux` with a PVH entry note) from Debian's
# linux-source-6.1 and caches it, once per machine.
#
# Usage: guest-kernel/build.sh [--cached] [CACHE_DIR]
#   CACHE_DIR defaults to $FNVM_KERNEL_CACHE, else /var/cache/fnvm/kernel for root, else
#   ${XDG_CACHE_HOME:-$HOME/.cache}/fnvm/kernel: one cache per machine that fnvm (every home),
#   the tests and the benches share. The result is CACHE_DIR/<key>/vmlinux, where <key> is the
#   sha256 of the kernel's inputs: the config fragment, recipe.sh and the source package's
#   version. A second run with the same inputs is instant.
#   --cached: only look; print the path and exit 0 if the kernel is cached, else exit 3.
#   The vmlinux path is the last line on stdout; everything else goes to stderr.
#
# The recipe (recipe.sh): `make tinyconfig`, then the fragment fnvm.config (next to this script,
# or $FNVM_KERNEL_CONFIG), then `make olddefconfig`; every line of the fragment must survive.
# Nothing half-built ever appears in the cache: the build happens in a scratch directory inside
# CACHE_DIR and its result is renamed into place; a lock serializes concurrent builds.
set -euo pipefail

log() { printf 'guest-kernel: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
recipe="$here/recipe.sh"
fragment="${FNVM_KERNEL_CONFIG:-$here/fnvm.config}"
source_pkg=linux-source-6.1
source_tar=/usr/src/linux-source-6.1.tar.xz

only_look=false
if [ "${1:-}" = "--cached" ]; then
  only_look=true
  shift
fi
if [ -n "${1:-}" ]; then
  cache_root="$1"
elif [ -n "${FNVM_KERNEL_CACHE:-}" ]; then
  cache_root="$FNVM_KERNEL_CACHE"
elif [ "$(id -u)" -eq 0 ]; then
  cache_root=/var/cache/fnvm/kernel
else
  [ -n "${XDG_CACHE_HOME:-}" ] || [ -n "${HOME:-}" ] || die "neither XDG_CACHE_HOME nor HOME is set; pass CACHE_DIR"
  cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/fnvm/kernel"
fi
[ -f "$fragment" ] || die "config fragment $fragment does not exist"
[ -f "$recipe" ] || die "build recipe $recipe does not exist"

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

# The source package's version is one of the inputs; without the package there is no cached
# kernel to find either (a different version would be a different key).
if $only_look && ! installed "$source_pkg"; then
  exit 3
fi

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
key="$( { cat "$fragment"; printf '\0'; cat "$recipe"; printf '\0%s\n' "$source_pkg=$version"; } \
  | sha256sum | cut -d' ' -f1)"
result="$cache_root/$key/vmlinux"

if [ -f "$result" ]; then
  printf '%s\n' "$result"
  exit 0
fi
$only_look && exit 3

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
ticker=""
trap '[ -z "$ticker" ] || kill "$ticker" 2>/dev/null; rm -rf "$scratch"' EXIT
src="$scratch/src"
build_log="$scratch/build.log"
mkdir -p "$src"

log "building the guest kernel $key ($source_pkg $version), once per machine and kernel config:"
log "  several minutes on 2 cores; the result is cached in $cache_root"
# Progress: one line every 20 s with the objects compiled so far (make's own output goes to the
# build log, shown only if the build fails).
started=$SECONDS
(
  while sleep 20; do
    log "  ... $(find "$src" -name '*.o' 2>/dev/null | wc -l) objects compiled, $((SECONDS - started)) s"
  done
) &
ticker=$!

# shellcheck source=recipe.sh
. "$recipe"
if ! recipe_build; then
  log "the build failed; the last lines of its log:"
  tail -n 40 "$build_log" >&2 || true
  exit 1
fi
kill "$ticker" 2>/dev/null || true
ticker=""

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
log "built $result in $((SECONDS - started)) s"
printf '%s\n' "$result"
