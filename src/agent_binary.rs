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

/// The command that builds the agent where this module looks for it.
pub const BUILD_COMMAND: &str = "RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p fnvm-agent --target x86_64-unknown-linux-gnu";

/// Why a static binary for the sandboxes cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    /// The variable that names the binary names an unusable one.
    #[error("{env_var} does not name a usable {name}: {source}")]
    BadVariable {
        env_var: String,
        name: String,
        #[source]
        source: Box<BinaryError>,
    },
    /// The running fnvm's own path is unknown, so nothing beside it can be found.
    #[error("cannot find the running fnvm binary: {0}")]
    CurrentExe(#[source] std::io::Error),
    /// The binary was looked for everywhere and is nowhere.
    #[error(
        "{name} was not found (looked at ${env_var}, {looked}); build it with `{build_command}` \
         or set {env_var}"
    )]
    NotFound {
        name: String,
        env_var: String,
        looked: String,
        build_command: String,
    },
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not an x86-64 ELF executable.
    #[error("{path} is not an x86-64 ELF executable: {why}")]
    NotElf { path: PathBuf, why: ElfError },
    /// The file is dynamically linked: it would fail inside the guest.
    #[error(
        "{path} is dynamically linked (interpreter {interpreter}); the guest needs a static \
         agent: build it with `{BUILD_COMMAND}`"
    )]
    Dynamic { path: PathBuf, interpreter: String },
}

/// What is wrong with an ELF image's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    /// A header field lies beyond the end of the file.
    #[error("truncated")]
    Truncated,
    /// The file does not start with the ELF magic.
    #[error("no ELF magic")]
    NoMagic,
    /// The image is not little-endian ELF64.
    #[error("not a little-endian 64-bit ELF")]
    NotElf64,
    /// The image is for another machine.
    #[error("not built for x86-64")]
    NotX86_64,
    /// The program headers are not where or what they claim to be.
    #[error("bad program header table")]
    BadProgramHeaders,
    /// The PT_INTERP entry points outside the file.
    #[error("interpreter path out of bounds")]
    BadInterpreter,
}

/// The static agent binary to put into guests as /sbin/init.
pub fn agent_binary() -> Result<PathBuf, BinaryError> {
    static_binary("fnvm-agent", "FNVM_AGENT_BIN", BUILD_COMMAND)
}

/// A static x86-64 binary of this workspace that runs inside sandboxes (the agent, the example
/// function): `$env_var`, else `name` beside the running fnvm, else in the static build's
/// target directory. A plain `cargo build` leaves a dynamically linked `name` next to fnvm:
/// that one is skipped for the static build, and named only if nothing usable is found.
pub fn static_binary(
    name: &str,
    env_var: &str,
    build_command: &str,
) -> Result<PathBuf, BinaryError> {
    if let Some(explicit) = std::env::var_os(env_var) {
        let path = PathBuf::from(explicit);
        check_static(&path).map_err(|e| BinaryError::BadVariable {
            env_var: env_var.to_string(),
            name: name.to_string(),
            source: Box::new(e),
        })?;
        return Ok(path);
    }
    let exe = std::env::current_exe().map_err(BinaryError::CurrentExe)?;
    let candidates = candidates_beside(&exe, name);
    let mut first_unusable = None;
    for candidate in &candidates {
        if candidate.is_file() {
            match check_static(candidate) {
                Ok(()) => return Ok(candidate.clone()),
                Err(e) => {
                    first_unusable.get_or_insert(e);
                }
            }
        }
    }
    if let Some(first) = first_unusable {
        return Err(first);
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    Err(BinaryError::NotFound {
        name: name.to_string(),
        env_var: env_var.to_string(),
        looked: looked.join(", "),
        build_command: build_command.to_string(),
    })
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

/// How much of a binary [`check_static`] reads first: the ELF header, the program headers and
/// a PT_INTERP string sit in the first pages of any linker's output. Reading the whole agent
/// (8 MB) cost every `fnvm run` ~4.5 ms.
const ELF_PREFIX_BYTES: u64 = 64 * 1024;

/// Fails unless `path` is a 64-bit x86-64 ELF executable without a program interpreter.
pub fn check_static(path: &Path) -> Result<(), BinaryError> {
    use std::io::Read;
    let read = |limit: u64| -> Result<Vec<u8>, BinaryError> {
        let mut bytes = Vec::with_capacity(limit.min(ELF_PREFIX_BYTES) as usize);
        std::fs::File::open(path)
            .and_then(|f| f.take(limit).read_to_end(&mut bytes))
            .map_err(|source| BinaryError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(bytes)
    };
    let mut bytes = read(ELF_PREFIX_BYTES)?;
    // A header table past the prefix (unusual, but the file is whatever is at that path):
    // the whole file decides.
    if bytes.len() as u64 == ELF_PREFIX_BYTES
        && matches!(
            elf_interpreter(&bytes),
            Err(ElfError::Truncated | ElfError::BadInterpreter)
        )
    {
        bytes = read(u64::MAX)?;
    }
    match elf_interpreter(&bytes) {
        Err(why) => Err(BinaryError::NotElf {
            path: path.to_path_buf(),
            why,
        }),
        Ok(Some(interpreter)) => Err(BinaryError::Dynamic {
            path: path.to_path_buf(),
            interpreter,
        }),
        Ok(None) => Ok(()),
    }
}

/// The PT_INTERP path of an x86-64 ELF64 image, or None for a static one. Bounds-checked: the
/// file is whatever happens to be at that path.
fn elf_interpreter(elf: &[u8]) -> Result<Option<String>, ElfError> {
    const PT_INTERP: u32 = 3;
    const EM_X86_64: u16 = 62;
    fn field<const N: usize>(elf: &[u8], off: usize) -> Result<[u8; N], ElfError> {
        off.checked_add(N)
            .and_then(|end| elf.get(off..end))
            .and_then(|b| b.try_into().ok())
            .ok_or(ElfError::Truncated)
    }
    let u16_at = |off| field(elf, off).map(u16::from_le_bytes);
    let u32_at = |off| field(elf, off).map(u32::from_le_bytes);
    let usize_at = |off| {
        field(elf, off)
            .map(u64::from_le_bytes)
            .and_then(|v| usize::try_from(v).map_err(|_| ElfError::BadProgramHeaders))
    };
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(ElfError::NoMagic);
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(ElfError::NotElf64);
    }
    if u16_at(18)? != EM_X86_64 {
        return Err(ElfError::NotX86_64);
    }
    let phoff = usize_at(32)?;
    let phentsize = usize::from(u16_at(54)?);
    let phnum = usize::from(u16_at(56)?);
    if phentsize < 56 {
        return Err(ElfError::BadProgramHeaders);
    }
    for i in 0..phnum {
        let ph = phentsize
            .checked_mul(i)
            .and_then(|o| o.checked_add(phoff))
            .ok_or(ElfError::BadProgramHeaders)?;
        if u32_at(ph)? != PT_INTERP {
            continue;
        }
        let off = usize_at(ph.saturating_add(8)).map_err(|_| ElfError::BadInterpreter)?;
        let len = usize_at(ph.saturating_add(32)).map_err(|_| ElfError::BadInterpreter)?;
        let raw = off
            .checked_add(len)
            .and_then(|end| elf.get(off..end))
            .ok_or(ElfError::BadInterpreter)?;
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
    fn headers_past_the_first_read_are_still_judged() {
        // Program headers at 68 KiB, an interpreter string at 69 KiB: beyond the prefix read
        // first, so the whole file decides — a dynamic binary is never taken for a static one.
        let mut elf = vec![0u8; 70 * 1024];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[18] = 62;
        let phoff = 68 * 1024usize;
        elf[32..40].copy_from_slice(&(phoff as u64).to_le_bytes());
        elf[54] = 56;
        elf[56] = 1;
        let interp = b"/lib64/ld-linux-x86-64.so.2\0";
        let at = 69 * 1024usize;
        elf[phoff..phoff + 4].copy_from_slice(&3u32.to_le_bytes());
        elf[phoff + 8..phoff + 16].copy_from_slice(&(at as u64).to_le_bytes());
        elf[phoff + 32..phoff + 40].copy_from_slice(&(interp.len() as u64).to_le_bytes());
        elf[at..at + interp.len()].copy_from_slice(interp);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fnvm-agent");
        std::fs::write(&path, &elf).unwrap();
        let err = check_static(&path).unwrap_err().to_string();
        assert!(err.contains("/lib64/ld-linux-x86-64.so.2"), "{err}");
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
