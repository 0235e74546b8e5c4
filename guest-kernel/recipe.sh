# fnvm guest kernel: the build recipe. Sourced by build.sh, never run on its own.
#
# This file, the config fragment and the source package's version are the kernel's inputs: their
# sha256 is the cache key. Everything that decides what the kernel *is* lives here; where it is
# cached, locking and progress live in build.sh, so changing those never rebuilds a kernel.
#
# Expects: $src (an empty directory), $source_tar, $fragment, $build_log; log() and die().
# Leaves: $src/vmlinux and $src/.config. It runs as the condition of an `if` (errexit is off
# there), so every step says `|| return 1` itself.

kmake() {
  # Fixed build metadata so that the same inputs give the same kernel.
  make -C "$src" ARCH=x86_64 KBUILD_BUILD_USER=fnvm KBUILD_BUILD_HOST=fnvm \
    KBUILD_BUILD_TIMESTAMP="1970-01-01" KBUILD_BUILD_VERSION=1 "$@" >>"$build_log" 2>&1
}

recipe_build() {
  log "unpacking $source_tar"
  tar -xf "$source_tar" -C "$src" --strip-components=1 || return 1

  kmake tinyconfig || return 1
  # The fragment's lines replace the same symbols in the tiny config (merge_config.sh -m only
  # merges; olddefconfig then resolves dependencies).
  (cd "$src" && KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m .config "$fragment" >>"$build_log" 2>&1) || return 1
  kmake olddefconfig || return 1

  # Every option the fragment asks for must really be set (or unset) now.
  local dropped=() line
  while IFS= read -r line; do
    if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
      grep -qxF "$line" "$src/.config" || dropped+=("$line (got: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$src/.config" || echo 'absent'))")
    elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
      ! grep -qE "^${BASH_REMATCH[1]}=" "$src/.config" || dropped+=("$line (got: $(grep -E "^${BASH_REMATCH[1]}=" "$src/.config"))")
    fi
  done <"$fragment"
  if [ "${#dropped[@]}" -gt 0 ]; then
    log "error: olddefconfig did not keep these options of $fragment:"
    for line in "${dropped[@]}"; do log "  $line"; done
    return 1
  fi
  log "config verified: every option of $(basename "$fragment") is in effect"

  log "make -j$(nproc) vmlinux"
  kmake -j"$(nproc)" vmlinux
}
