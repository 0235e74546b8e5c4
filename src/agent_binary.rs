//! Where `fnvm` finds the guest agent: a static x86-64 Linux binary that becomes PID 1 of every
//! guest (and of the process sandbox).
//!
//! The agent is built by the project's scripts (scripts/setup.sh) with
//! `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p fnvm-agent --target x86_64-unknown-linux-gnu`.
//! The explicit `--target` keeps crt-static away from build scripts and proc-macros, and puts the
//! binary in `target/x86_64-unknown-linux-gnu/<profile>/`. Lookup order:
//! 1. `$FNVM_AGENT_BIN` (an installed fnvm sets it, or ships the agent next to itself);
//! 2. `fnvm-agent` in the directory of the running `fnvm` binary;
//! 3. `target/x86_64-unknown-linux-gnu/<profile>/fnvm-agent` beside a `target/<profile>/fnvm`.
//!
//! Whatever is found must be a static ELF (no program interpreter): a dynamic one would fail
//! inside the guest with a confusing "No such file or directory" from the kernel.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The command that builds the agent where this module looks for it.
pub const BUILD_COMMAND: &str = "RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p fnvm-agent --target x86_64-unknown-linux-gnu";

/// The static agent binary to put into guests as /sbin/init.
pub fn agent_binary() -> Result<PathBuf> {
    static_binary("fnvm-agent", "FNVM_AGENT_BIN", BUILD_COMMAND)
}

/// A static x86-64 binary of this workspace that runs inside sandboxes (the agent, the example
/// function): `$env_var`, else `name` beside the running fnvm, else in the static build's
/// target directory. A plain `cargo build` leaves a dynamically linked `name` next to fnvm:
/// that one is skipped for the static build, and named only if nothing usable is found.
pub fn static_binary(name: &str, env_var: &str, build_command: &str) -> Result<PathBuf> {
    if let Some(explicit) = std::env::var_os(env_var) {
        let path = PathBuf::from(explicit);
        check_static(&path).with_context(|| format!("{env_var} does not name a usable {name}"))?;
        return Ok(path);
    }
    let exe = std::env::current_exe().context("cannot find the running fnvm binary")?;
    let candidates = candidates_beside(&exe, name);
    let mut unusable = Vec::new();
    for candidate in &candidates {
        if candidate.is_file() {
            match check_static(candidate) {
                Ok(()) => return Ok(candidate.clone()),
                Err(e) => unusable.push(format!("{e:#}")),
            }
        }
    }
    if let Some(first) = unusable.first() {
        bail!("{first}");
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "{name} was not found (looked at ${env_var}, {}); build it with `{build_command}` or set \
         {env_var}",
        looked.join(", ")
    )
}

/// Where `name` may sit relative to the `fnvm` binary `exe`.
fn candidates_beside(exe: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Some(dir) = exe.parent() else {
        return out;
    };
    out.push(dir.join(name));
    // target/<profile>/fnvm -> target/x86_64-unknown-linux-gnu/<profile>/<name>
    if let (Some(profile), Some(target)) = (dir.file_name(), dir.parent()) {
        out.push(
            target
                .join("x86_64-unknown-linux-gnu")
                .join(profile)
                .join(name),
        );
    }
    out
}

/// Fails unless `path` is a 64-bit x86-64 ELF executable without a program interpreter.
pub fn check_static(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    match elf_interpreter(&bytes) {
        Err(why) => bail!("{} is not an x86-64 ELF executable: {why}", path.display()),
        Ok(Some(interp)) => bail!(
            "{} is dynamically linked (interpreter {interp}); the guest needs a static agent: \
             build it with `{BUILD_COMMAND}`",
            path.display()
        ),
        Ok(None) => Ok(()),
    }
}

/// The PT_INTERP path of an x86-64 ELF64 image, or None for a static one. Bounds-checked: the
/// file is whatever happens to be at that path.
fn elf_interpreter(elf: &[u8]) -> Result<Option<String>, String> {
    const PT_INTERP: u32 = 3;
    const EM_X86_64: u16 = 62;
    let u16_at = |off: usize| -> Result<u16, String> {
        off.checked_add(2)
            .and_then(|end| elf.get(off..end))
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| "truncated".to_string())
    };
    let u32_at = |off: usize| -> Result<u32, String> {
        off.checked_add(4)
            .and_then(|end| elf.get(off..end))
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .ok_or_else(|| "truncated".to_string())
    };
    let u64_at = |off: usize| -> Result<u64, String> {
        off.checked_add(8)
            .and_then(|end| elf.get(off..end))
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| "truncated".to_string())
    };
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err("no ELF magic".into());
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not a little-endian 64-bit ELF".into());
    }
    if u16_at(18)? != EM_X86_64 {
        return Err("not built for x86-64".into());
    }
    let phoff = usize::try_from(u64_at(32)?).map_err(|_| "bad program header offset")?;
    let phentsize = usize::from(u16_at(54)?);
    let phnum = usize::from(u16_at(56)?);
    if phentsize < 56 {
        return Err("bad program header size".into());
    }
    for i in 0..phnum {
        let ph = phentsize
            .checked_mul(i)
            .and_then(|o| o.checked_add(phoff))
            .ok_or("bad program header offset")?;
        if u32_at(ph)? != PT_INTERP {
            continue;
        }
        let off =
            usize::try_from(u64_at(ph.saturating_add(8))?).map_err(|_| "bad interpreter offset")?;
        let len =
            usize::try_from(u64_at(ph.saturating_add(32))?).map_err(|_| "bad interpreter size")?;
        let raw = off
            .checked_add(len)
            .and_then(|end| elf.get(off..end))
            .ok_or("interpreter path out of bounds")?;
        let text = String::from_utf8_lossy(raw);
        return Ok(Some(text.trim_end_matches('\0').to_string()));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_binary_is_refused_with_the_build_command() {
        // The test binary itself is dynamically linked (no crt-static for host builds).
        let me = std::env::current_exe().unwrap();
        let err = format!("{:#}", check_static(&me).unwrap_err());
        assert!(err.contains("dynamically linked"), "{err}");
        assert!(err.contains(BUILD_COMMAND), "{err}");
    }

    #[test]
    fn a_static_binary_is_accepted() {
        // Debian's busybox-static (installed by scripts/setup.sh) is a static x86-64 ELF.
        check_static(Path::new("/bin/busybox")).unwrap();
    }

    #[test]
    fn a_non_elf_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fnvm-agent");
        std::fs::write(&path, b"#!/bin/sh\n").unwrap();
        let err = format!("{:#}", check_static(&path).unwrap_err());
        assert!(err.contains("no ELF magic"), "{err}");
    }

    #[test]
    fn truncated_and_hostile_headers_do_not_panic() {
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[18] = 62;
        elf[32..40].copy_from_slice(&u64::MAX.to_le_bytes()); // phoff far away
        elf[54] = 56;
        elf[56] = 1;
        assert!(elf_interpreter(&elf).is_err());
        for len in 0..elf.len() {
            let _ = elf_interpreter(&elf[..len]);
        }
    }

    #[test]
    fn the_agent_is_looked_for_beside_fnvm_and_in_the_cross_target_dir() {
        let found = candidates_beside(Path::new("/src/target/release/fnvm"), "fnvm-agent");
        assert_eq!(
            found,
            [
                PathBuf::from("/src/target/release/fnvm-agent"),
                PathBuf::from("/src/target/x86_64-unknown-linux-gnu/release/fnvm-agent"),
            ]
        );
    }
}
