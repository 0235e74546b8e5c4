//! The VM's initramfs: a cpio "newc" archive holding just the static agent as /init (plus the
//! /dev/console node the kernel opens for init's stdio). Built in-process and cached in the
//! home, keyed by the agent's hash, so a new agent build yields a new initramfs.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::home::Home;
use crate::sandbox::SandboxError;

/// Bumped when the archive's layout changes, so cached archives are rebuilt.
const LAYOUT_VERSION: u32 = 1;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// The cached initramfs for `agent`, built if missing.
pub fn cached(home: &Home, agent: &Path) -> Result<PathBuf, SandboxError> {
    let binary = std::fs::read(agent).map_err(|e| {
        SandboxError::setup(format!("cannot read the agent {}", agent.display()), e)
    })?;
    let mut key = Sha256::new();
    key.update(LAYOUT_VERSION.to_le_bytes());
    key.update(&binary);
    let dir = home
        .dir("initramfs")
        .map_err(|e| SandboxError::setup("cannot create the initramfs cache", e))?;
    let path = dir.join(format!("agent-{}.cpio", &hex::encode(key.finalize())[..16]));
    if path.is_file() {
        return Ok(path);
    }
    let tmp = dir.join(format!(".agent-{}.cpio.tmp", std::process::id()));
    let result = std::fs::File::create(&tmp)
        .and_then(|mut file| {
            write_initramfs(&mut file, &binary)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(SandboxError::setup(
            format!("cannot write the initramfs {}", path.display()),
            e,
        ));
    }
    Ok(path)
}

/// The archive: /dev, /dev/console (5:1), /init (the agent), /proc, /sys.
pub fn write_initramfs(out: &mut impl Write, agent: &[u8]) -> io::Result<()> {
    let mut cpio = CpioWriter::new(out);
    cpio.directory("dev", 0o755)?;
    cpio.char_device("dev/console", 0o600, 5, 1)?;
    cpio.file("init", 0o755, agent)?;
    cpio.directory("proc", 0o555)?;
    cpio.directory("sys", 0o555)?;
    cpio.finish()
}

/// Writes the "newc" (SVR4, no CRC) cpio format the kernel unpacks: per entry a 110-byte ASCII
/// header, the NUL-terminated name and the data, each padded to 4 bytes; "TRAILER!!!" last.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter { out, next_ino: 1 }
    }

    pub fn directory(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | perm, 2, (0, 0), &[])
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | perm, 1, (0, 0), data)
    }

    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | perm, 1, (major, minor), &[])
    }

    /// Writes the trailer and flushes.
    pub fn finish(mut self) -> io::Result<()> {
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        self.out.flush()
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is over 4 GiB"))
        })?;
        let name_size = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name too long"))?;
        let ino = self.next_ino;
        if ino != 0 {
            self.next_ino += 1;
        }
        // magic, ino, mode, uid, gid, nlink, mtime (0: reproducible), filesize, devmajor,
        // devminor, rdevmajor, rdevminor, namesize, check
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name_size, 0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(110 + name.len() + 1)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    fn pad(&mut self, len: usize) -> io::Result<()> {
        let zeros = [0u8; 3];
        self.out.write_all(&zeros[..(4 - len % 4) % 4])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn archive(agent: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_initramfs(&mut out, agent).unwrap();
        out
    }

    #[test]
    fn entries_are_aligned_and_the_trailer_is_last() {
        let data = archive(b"12345");
        assert_eq!(data.len() % 4, 0);
        assert_eq!(&data[..6], b"070701");
        let trailer = data.windows(10).position(|w| w == b"TRAILER!!!").unwrap();
        // Header (110) + "TRAILER!!!\0" (11) padded to 124.
        assert_eq!(data.len(), trailer + 11 + 3);
        // The agent's bytes follow the "init\0" name, 4-byte aligned.
        let init = data.windows(5).position(|w| w == b"init\0").unwrap();
        let body = (init + 5).div_ceil(4) * 4;
        assert_eq!(&data[body..body + 5], b"12345");
    }

    /// GNU cpio (Debian's `cpio`) reads the archive back: names, modes, the device node and the
    /// agent's bytes.
    #[test]
    fn gnu_cpio_reads_it_back() {
        let agent: Vec<u8> = (0..10_001u32).map(|i| (i * 7) as u8).collect();
        let data = archive(&agent);
        let list = run_cpio(&["-itv", "--quiet"], &data, None);
        let lines: Vec<&str> = list.lines().collect();
        assert_eq!(lines.len(), 5, "{list}");
        assert!(
            lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" dev"),
            "{list}"
        );
        assert!(
            lines[1].starts_with("crw-------")
                && lines[1].contains("5,")
                && lines[1].ends_with(" dev/console"),
            "{list}"
        );
        assert!(
            lines[2].starts_with("-rwxr-xr-x") && lines[2].ends_with(" init"),
            "{list}"
        );
        let dir = tempfile::tempdir().unwrap();
        run_cpio(
            &["-i", "--quiet", "--no-absolute-filenames", "init"],
            &data,
            Some(dir.path()),
        );
        assert_eq!(std::fs::read(dir.path().join("init")).unwrap(), agent);
    }

    fn run_cpio(args: &[&str], input: &[u8], cwd: Option<&Path>) -> String {
        let mut cmd = Command::new("cpio");
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd
            .spawn()
            .expect("cpio (Debian package cpio) is installed");
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn the_cache_is_keyed_by_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::resolve(Some(dir.path().join("home"))).unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"agent one").unwrap();
        let first = cached(&home, &a).unwrap();
        assert_eq!(cached(&home, &a).unwrap(), first);
        std::fs::write(&a, b"agent two").unwrap();
        let second = cached(&home, &a).unwrap();
        assert_ne!(second, first);
        let mut expected = Vec::new();
        write_initramfs(&mut expected, b"agent two").unwrap();
        assert_eq!(std::fs::read(&second).unwrap(), expected);
    }
}
