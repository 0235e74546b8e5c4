//! `vmm_start`: how fast a VMM process gets a guest to its first I/O, and how much memory the VMM
//! itself costs — fnvm-vmm against QEMU's microvm machine, measured side by side in one run.
//!
//! The guest is a tiny PVH ELF made here: its 32-bit entry (the `XEN_ELFNOTE_PHYS32_ENTRY` note)
//! writes a marker line to the serial port at 0x3f8 and then ends the VM (an i8042 reset through
//! port 0x64; QEMU's microvm has no i8042, so next a write to its isa-debug-exit port 0xf4). Both
//! VMMs get 128 MiB and 1 vCPU.
//!
//! Per run: process start → first marker byte on the VMM's stdout, and → process exit. Then the
//! VMM's resident memory apart from guest RAM, with a guest variant that writes the marker and
//! spins: Rss of every mapping in /proc/PID/smaps except the guest RAM mapping.
//!
//! Usage: `cargo run --release -p fnvm-benches --bin vmm_start [-- --runs N]`
//! (builds `fnvm-vmm` in release mode first; needs /dev/kvm and qemu-system-x86_64).
//! `vmm_start --write-guests DIR` only writes the tiny guests (tiny-exit.elf, tiny-spin.elf).
//! On hosts with VMX/SVM it also times a Linux boot to the agent's first line (`fnvm vm boot`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const MEMORY_MIB: u64 = 128;
const DEFAULT_RUNS: usize = 30;
/// The line the tiny guest writes to its serial port.
const MARKER: &[u8] = b"tiny-guest\n";

fn main() -> Result<()> {
    let Some(runs) = parse_args()? else {
        return Ok(());
    };
    let workspace = workspace_root();
    let scratch = std::env::temp_dir().join(format!("fnvm-vmm-start-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    let result = run(&workspace, &scratch, runs);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// The number of runs, or None when the arguments asked for something else that is now done.
fn parse_args() -> Result<Option<usize>> {
    let mut args = std::env::args().skip(1);
    let mut runs = DEFAULT_RUNS;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => {
                let value = args.next().context("--runs needs a number")?;
                runs = value
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .with_context(|| format!("--runs: {value:?} is not a positive number"))?;
            }
            // For trying the guests by hand with any VMM.
            "--write-guests" => {
                let dir = PathBuf::from(args.next().context("--write-guests needs a directory")?);
                std::fs::write(
                    dir.join("tiny-exit.elf"),
                    tiny_guest::elf(tiny_guest::End::Reset),
                )?;
                std::fs::write(
                    dir.join("tiny-spin.elf"),
                    tiny_guest::elf(tiny_guest::End::Spin),
                )?;
                return Ok(None);
            }
            other => bail!(
                "unknown argument {other:?} (usage: vmm_start [--runs N] | --write-guests DIR)"
            ),
        }
    }
    Ok(Some(runs))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ sits inside the workspace")
        .to_path_buf()
}

fn run(workspace: &Path, scratch: &Path, runs: usize) -> Result<()> {
    let exiting = scratch.join("tiny-exit.elf");
    let spinning = scratch.join("tiny-spin.elf");
    std::fs::write(&exiting, tiny_guest::elf(tiny_guest::End::Reset))?;
    std::fs::write(&spinning, tiny_guest::elf(tiny_guest::End::Spin))?;

    let fnvm = Vmm::Fnvm(build_fnvm_vmm(workspace)?);
    // The peer is the yardstick, but a peer that cannot run here only costs its rows: the bench
    // says why and measures fnvm-vmm alone.
    let qemu = find_in_path("qemu-system-x86_64")
        .context("qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)")
        .map(Vmm::QemuMicrovm)
        .and_then(|q| {
            // Warm-up (page cache, KVM state), and the proof that it runs here.
            q.start_once(&exiting)
                .with_context(|| format!("{} cannot run the tiny guest", q.name()))?;
            Ok(q)
        });
    let (qemu, peer_missing) = match qemu {
        Ok(q) => (Some(q), None),
        Err(e) => (None, Some(e)),
    };
    let fnvm_failure = fnvm
        .start_once(&exiting)
        .with_context(|| format!("{} cannot run the tiny guest", fnvm.name()))
        .err();
    let fnvm_ok = fnvm_failure.is_none();
    let mut vmms: Vec<&Vmm> = Vec::new();
    if fnvm_ok {
        vmms.push(&fnvm);
    }
    vmms.extend(qemu.as_ref());

    // Interleaved runs, so that every VMM sees the same host load.
    let mut samples: Vec<Samples> = vmms.iter().map(|_| Samples::default()).collect();
    for _ in 0..runs {
        for (vmm, s) in vmms.iter().zip(samples.iter_mut()) {
            let t = vmm.start_once(&exiting)?;
            s.first_byte.push(t.first_byte);
            s.exit.push(t.exit);
        }
    }
    for (vmm, s) in vmms.iter().zip(samples.iter_mut()) {
        for _ in 0..5 {
            s.overhead_kib.push(vmm.rss_overhead_kib(&spinning)?);
        }
    }
    let mut samples = samples.into_iter();
    let f = if fnvm_ok { samples.next() } else { None };
    let q = samples.next();

    println!("vmm_start: tiny PVH guest, {MEMORY_MIB} MiB, 1 vCPU, {runs} runs each (interleaved)");
    println!(
        "{:<34} {:>11} {:>11} {:>11} {:>11}",
        "", "median", "p10", "p90", "fnvm/QEMU"
    );
    let metrics: [Metric; 3] = [
        ("start → first serial byte", "ms", |s| ms(&s.first_byte)),
        ("start → process exit", "ms", |s| ms(&s.exit)),
        ("VMM RSS beyond guest RAM", "MiB", |s| mib(&s.overhead_kib)),
    ];
    for (label, unit, values) in metrics {
        let qv = q.as_ref().map(values);
        match &f {
            Some(f) => {
                let fv = values(f);
                let ratio = qv
                    .as_ref()
                    .map(|qv| percentile(&fv, 50.0) / percentile(qv, 50.0));
                print_row(&format!("{label}, fnvm"), &fv, ratio, unit);
            }
            None => println!("{:<34} {:>11}", format!("{label}, fnvm"), "FAILED"),
        }
        match &qv {
            Some(qv) => print_row(&format!("{label}, QEMU"), qv, None, unit),
            None => println!("{:<34} {:>11}", format!("{label}, QEMU"), "not run"),
        }
    }
    if let Some(why) = &peer_missing {
        println!("QEMU (the peer) could not run on this host, so its rows are empty: {why:#}");
    }
    match (&f, fnvm_failure) {
        (Some(f), _) => println!(
            "targets: first byte ≤ 10 ms median and ≤ 0.25× QEMU; RSS overhead < 5 MiB — {}",
            verdict(
                &ms(&f.first_byte),
                q.as_ref().map(|q| ms(&q.first_byte)).as_deref(),
                &mib(&f.overhead_kib)
            )
        ),
        (None, Some(err)) => {
            println!("fnvm-vmm FAILED: {err:#}");
            return Err(err);
        }
        (None, None) => unreachable!("fnvm is either measured or failed"),
    }

    linux_boot(workspace)?;
    Ok(())
}

fn ms(durations: &[Duration]) -> Vec<f64> {
    durations.iter().map(|d| d.as_secs_f64() * 1e3).collect()
}

fn mib(kib: &[u64]) -> Vec<f64> {
    kib.iter().map(|k| *k as f64 / 1024.0).collect()
}

fn print_row(label: &str, values: &[f64], ratio: Option<f64>, unit: &str) {
    let cell = |p: f64| format!("{:.2} {unit}", percentile(values, p));
    let ratio = ratio.map(|r| format!("{r:.3}")).unwrap_or_default();
    println!(
        "{label:<34} {:>11} {:>11} {:>11} {ratio:>11}",
        cell(50.0),
        cell(10.0),
        cell(90.0)
    );
}

/// The targets' verdict; without the peer's figures its ratio is not judged (and says so).
fn verdict(f_first: &[f64], q_first: Option<&[f64]>, f_rss: &[f64]) -> String {
    let first = percentile(f_first, 50.0);
    let rss = percentile(f_rss, 50.0);
    let mut misses = Vec::new();
    if first > 10.0 {
        misses.push(format!("first byte {first:.2} ms > 10 ms"));
    }
    let ratio = q_first.map(|q| first / percentile(q, 50.0));
    if let Some(ratio) = ratio.filter(|r| *r > 0.25) {
        misses.push(format!("ratio {ratio:.3} > 0.25"));
    }
    if rss >= 5.0 {
        misses.push(format!("RSS overhead {rss:.2} MiB ≥ 5 MiB"));
    }
    let unjudged = if ratio.is_none() {
        " (the ratio to QEMU not judged: no peer)"
    } else {
        ""
    };
    if misses.is_empty() {
        format!("all met{unjudged}")
    } else {
        format!("MISSED: {}{unjudged}", misses.join("; "))
    }
}

/// A table row group: label, unit, and how to get its values from the samples.
type Metric = (&'static str, &'static str, fn(&Samples) -> Vec<f64>);

#[derive(Default)]
struct Samples {
    first_byte: Vec<Duration>,
    exit: Vec<Duration>,
    overhead_kib: Vec<u64>,
}

struct Timing {
    first_byte: Duration,
    exit: Duration,
}

enum Vmm {
    Fnvm(PathBuf),
    QemuMicrovm(PathBuf),
}

impl Vmm {
    fn name(&self) -> &'static str {
        match self {
            Vmm::Fnvm(_) => "fnvm-vmm",
            Vmm::QemuMicrovm(_) => "qemu-system-x86_64 -machine microvm",
        }
    }

    fn command(&self, kernel: &Path) -> Command {
        match self {
            Vmm::Fnvm(bin) => {
                let mut cmd = Command::new(bin);
                cmd.arg("--kernel")
                    .arg(kernel)
                    .args(["--memory", &MEMORY_MIB.to_string()]);
                cmd
            }
            Vmm::QemuMicrovm(bin) => {
                let mut cmd = Command::new(bin);
                // No PIT/PIC/RTC/option ROMs: the tiny guest uses none of them, and QEMU's
                // microvm is at its fastest this way (the configuration QEMU documents for it).
                cmd.args([
                    "-machine",
                    "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,isa-serial=on",
                    "-enable-kvm",
                    "-cpu",
                    "host",
                    "-m",
                    &MEMORY_MIB.to_string(),
                    "-smp",
                    "1",
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-serial",
                    "stdio",
                    "-no-reboot",
                    // The guest's way out: microvm has no i8042 to reset through.
                    "-device",
                    "isa-debug-exit,iobase=0xf4,iosize=4",
                    "-kernel",
                ])
                .arg(kernel);
                cmd
            }
        }
    }

    /// The exit code of a run of the exiting guest: fnvm-vmm reports the i8042 reset as a clean
    /// exit; QEMU's isa-debug-exit exits with (value << 1) | 1.
    fn expected_exit_code(&self) -> i32 {
        match self {
            Vmm::Fnvm(_) => 0,
            Vmm::QemuMicrovm(_) => 1,
        }
    }

    /// One run of the exiting guest: start → first marker byte, start → exit.
    fn start_once(&self, kernel: &Path) -> Result<Timing> {
        let mut cmd = self.command(kernel);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.name()))?;
        let mut stdout = child.stdout.take().context("no stdout pipe")?;
        let mut seen = Vec::new();
        let mut first_byte = None;
        let mut buf = [0u8; 4096];
        loop {
            let n = stdout
                .read(&mut buf)
                .context("cannot read the VMM's stdout")?;
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if first_byte.is_none() && contains(&seen, &MARKER[..1]) {
                first_byte = Some(start.elapsed());
            }
        }
        let status = child.wait()?;
        let exit = start.elapsed();
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        if !contains(&seen, MARKER) || status.code() != Some(self.expected_exit_code()) {
            bail!(
                "{} ended ({status}, expected exit code {}) with stdout {:?}, stderr {:?} \
                 (the guest writes {MARKER:?})",
                self.name(),
                self.expected_exit_code(),
                String::from_utf8_lossy(&seen),
                stderr.trim()
            );
        }
        Ok(Timing {
            first_byte: first_byte.expect("marker seen"),
            exit,
        })
    }

    /// Starts the spinning guest, waits for its marker, lets it settle, and returns the VMM's
    /// Rss outside the guest RAM mapping in KiB.
    fn rss_overhead_kib(&self, kernel: &Path) -> Result<u64> {
        let mut cmd = self.command(kernel);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.name()))?;
        let pid = child.id();
        let measured = (|| {
            let mut stdout = child.stdout.take().context("no stdout pipe")?;
            let mut seen = Vec::new();
            let mut buf = [0u8; 256];
            while !contains(&seen, MARKER) {
                let n = stdout.read(&mut buf)?;
                if n == 0 {
                    bail!(
                        "{} exited before the spinning guest wrote its marker",
                        self.name()
                    );
                }
                seen.extend_from_slice(&buf[..n]);
            }
            std::thread::sleep(Duration::from_millis(100));
            let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
                .with_context(|| format!("cannot read /proc/{pid}/smaps"))?;
            rss_outside_guest_ram(&smaps, MEMORY_MIB << 20)
        })();
        let _ = child.kill();
        let _ = child.wait();
        measured
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Sum of Rss over all mappings but guest RAM: the one mapping whose size is the guest memory
/// size (VMMs may round it up by a little for alignment or guard pages).
fn rss_outside_guest_ram(smaps: &str, guest_bytes: u64) -> Result<u64> {
    let mut total_kib = 0u64;
    let mut guest_kib = None;
    let mut current_size = 0u64;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(key), Some(value)) = (fields.next(), fields.next()) else {
            continue;
        };
        let kib = || value.parse::<u64>().ok();
        match key {
            "Size:" => current_size = kib().unwrap_or(0) * 1024,
            "Rss:" => {
                let rss = kib().unwrap_or(0);
                total_kib += rss;
                let is_guest_ram = current_size >= guest_bytes
                    && current_size <= guest_bytes + (8 << 20)
                    && guest_kib.is_none();
                if is_guest_ram {
                    guest_kib = Some(rss);
                }
            }
            _ => {}
        }
    }
    let guest = guest_kib.context("no guest RAM mapping found in smaps")?;
    Ok(total_kib - guest)
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

/// Builds fnvm-vmm in release mode (a no-op when it is up to date) and returns its path.
fn build_fnvm_vmm(workspace: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--release", "-p", "fnvm-vmm"])
        .current_dir(workspace)
        .status()
        .context("cannot run cargo to build fnvm-vmm")?;
    if !status.success() {
        bail!("cargo build --release -p fnvm-vmm failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    Ok(target.join("release").join("fnvm-vmm"))
}

/// Hardware virtualization: what a stock Linux guest needs to boot in reasonable time.
fn host_has_vmx_or_svm() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|info| {
            info.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

/// Times `fnvm vm boot` of the real guest kernel up to the agent's first line.
fn linux_boot(workspace: &Path) -> Result<()> {
    if !host_has_vmx_or_svm() {
        eprintln!(
            "SKIPPED (no VMX/SVM on this host: /dev/kvm is not hardware KVM): Linux boot to the agent line"
        );
        return Ok(());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--quiet", "--release", "-p", "fnvm"])
        .current_dir(workspace)
        .status()?;
    if !status.success() {
        bail!("cargo build --release -p fnvm failed ({status})");
    }
    let fnvm = workspace.join("target/release/fnvm");
    let agent = linux_guest::static_agent(workspace, &cargo)?;
    let kernel = linux_guest::kernel(workspace)?;
    let scratch = tempdir_in_target(workspace)?;
    let rootfs = linux_guest::rootfs_image(&scratch, &agent)?;
    let home = scratch.join("home");
    let mut boots = Vec::new();
    for _ in 0..10 {
        let start = Instant::now();
        let out = Command::new(&fnvm)
            .arg("--home")
            .arg(&home)
            .args(["vm", "boot", "--memory", "256", "--kernel"])
            .arg(&kernel)
            .args(["--cmdline", "rootfstype=ext4", "--rootfs"])
            .arg(&rootfs)
            .stdin(Stdio::null())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !text.contains("fnvm-agent: up after") {
            bail!(
                "fnvm vm boot did not reach the agent ({}): {}{}",
                out.status,
                text,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        boots.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    println!(
        "Linux boot to agent + exit, fnvm vm boot: median {:.1} ms (p10 {:.1}, p90 {:.1}), 10 runs",
        percentile(&boots, 50.0),
        percentile(&boots, 10.0),
        percentile(&boots, 90.0)
    );
    Ok(())
}

fn tempdir_in_target(workspace: &Path) -> Result<PathBuf> {
    let dir = workspace
        .join("target")
        .join(format!("vmm-start-linux-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

mod linux_guest;
mod tiny_guest;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tiny_guest_has_a_pvh_note_pointing_at_its_code() {
        for end in [tiny_guest::End::Reset, tiny_guest::End::Spin] {
            let elf = tiny_guest::elf(end);
            let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
            // The note is the last 20 bytes before the 16-byte aligned code.
            let note_at = 64 + 2 * 56;
            assert_eq!(&elf[note_at + 12..note_at + 16], b"Xen\0");
            let note_type = u32::from_le_bytes(elf[note_at + 8..note_at + 12].try_into().unwrap());
            assert_eq!(note_type, 18);
            let pvh = u32::from_le_bytes(elf[note_at + 16..note_at + 20].try_into().unwrap());
            assert_eq!(u64::from(pvh), entry);
            let code = &elf[(entry - 0x10_0000) as usize..];
            assert_eq!(
                &code[..4],
                &[0x66, 0xba, 0xf8, 0x03],
                "starts with mov dx, 0x3f8"
            );
        }
    }

    #[test]
    fn guest_ram_is_left_out_of_the_rss() {
        let smaps = "\
00400000-00500000 r-xp 00000000 08:01 1 /usr/bin/vmm
Size:               1024 kB
Rss:                 800 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:                4000 kB
7f1000000000-7f1000100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                 200 kB
";
        assert_eq!(rss_outside_guest_ram(smaps, 128 << 20).unwrap(), 1000);
        assert!(rss_outside_guest_ram(smaps, 512 << 20).is_err());
    }

    #[test]
    fn percentiles_pick_ranks() {
        let v: Vec<f64> = (1..=11).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 6.0);
        assert_eq!(percentile(&v, 10.0), 2.0);
        assert_eq!(percentile(&v, 90.0), 10.0);
    }
}
