//! Guest physical memory.
//!
//! RAM is laid out the way x86-64 firmware would: from 0 up to the 32-bit MMIO hole
//! ([`MMIO_HOLE_START`]..4 GiB, where virtio-mmio windows, the IOAPIC and the LAPIC live), and
//! whatever does not fit below the hole continues at 4 GiB.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Guest memory as every part of the VMM sees it: anonymous (or file-backed, for snapshot
/// restores) mmap regions without dirty-page tracking.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// Start of the 32-bit MMIO hole: RAM never occupies `MMIO_HOLE_START..FIRST_ADDR_PAST_32BITS`.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First address above the 32-bit space, where RAM that did not fit below the hole resumes.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
const MIB: u64 = 1 << 20;

/// Why guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The guest memory size is zero.
    #[error("guest memory size must be at least 1 MiB, got 0")]
    Zero,
    /// The guest memory asked for is more than the host's total memory.
    #[error(
        "guest memory of {requested_mib} MiB is more than this host's total memory \
         ({host_mib} MiB)"
    )]
    MoreThanHost { requested_mib: u64, host_mib: u64 },
    /// The host's total memory cannot be read (sysinfo).
    #[error("cannot read the host's total memory (sysinfo): {0}")]
    HostMemInfo(String),
    /// The guest memory cannot be mapped.
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Mmap {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The guest-physical RAM ranges for `size_mib` MiB, skipping the 32-bit MMIO hole.
pub fn ram_ranges(size_mib: u64) -> Vec<(GuestAddress, usize)> {
    let size = size_mib.saturating_mul(MIB);
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (
                GuestAddress(FIRST_ADDR_PAST_32BITS),
                (size - MMIO_HOLE_START) as usize,
            ),
        ]
    }
}

/// The host's MemTotal in MiB, from sysinfo(2): the same figure as /proc/meminfo's MemTotal
/// (`totalram`), without formatting and parsing every line of /proc/meminfo, which every
/// standby VMM's start paid (~0.1 ms of CPU on the 2-core bench host).
pub fn host_memory_mib() -> Result<u64, MemoryError> {
    // SAFETY: an all-zero sysinfo is a valid value for sysinfo(2) to overwrite.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: sysinfo writes into the struct we own.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return Err(MemoryError::HostMemInfo(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    Ok((info.totalram as u64).saturating_mul(u64::from(info.mem_unit.max(1))) / MIB)
}

/// Checks `size_mib` against the rules (not 0, not more than the host has).
pub fn validate_size(size_mib: u64) -> Result<(), MemoryError> {
    if size_mib == 0 {
        return Err(MemoryError::Zero);
    }
    let host_mib = host_memory_mib()?;
    if size_mib > host_mib {
        return Err(MemoryError::MoreThanHost {
            requested_mib: size_mib,
            host_mib,
        });
    }
    Ok(())
}

/// Validates `size_mib` and maps that much anonymous guest RAM (lazily backed by the host).
pub fn create_guest_memory(size_mib: u64) -> Result<GuestMemory, MemoryError> {
    validate_size(size_mib)?;
    GuestMemory::from_ranges(&ram_ranges(size_mib)).map_err(|source| MemoryError::Mmap {
        mib: size_mib,
        source,
    })
}

/// The end (exclusive) of RAM below the MMIO hole.
pub fn low_ram_end(mem: &GuestMemory) -> u64 {
    mem.iter()
        .filter(|r| r.start_addr().0 < MMIO_HOLE_START)
        .map(|r| r.start_addr().0 + r.len())
        .max()
        .unwrap_or(0)
}

/// RAM above 4 GiB as `(start, len)`, if the guest has any.
pub fn high_ram(mem: &GuestMemory) -> Option<(u64, u64)> {
    mem.iter()
        .find(|r| r.start_addr().0 >= FIRST_ADDR_PAST_32BITS)
        .map(|r| (r.start_addr().0, r.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range_from_zero() {
        assert_eq!(ram_ranges(128), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let r = ram_ranges(4096);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(
            r[1],
            (
                GuestAddress(1 << 32),
                ((4096u64 << 20) - MMIO_HOLE_START) as usize
            )
        );
    }

    #[test]
    fn zero_and_too_much_memory_are_refused() {
        assert!(matches!(validate_size(0), Err(MemoryError::Zero)));
        let err = validate_size(u64::MAX / MIB).unwrap_err();
        assert!(matches!(err, MemoryError::MoreThanHost { .. }), "{err}");
        assert!(err.to_string().contains("more than this host"));
    }

    #[test]
    fn host_memory_is_meminfos_mem_total() {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let kib: u64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap();
        assert_eq!(host_memory_mib().unwrap(), kib / 1024);
    }

    #[test]
    fn guest_memory_reports_low_and_high_ram() {
        let mem = create_guest_memory(16).unwrap();
        assert_eq!(low_ram_end(&mem), 16 << 20);
        assert_eq!(high_ram(&mem), None);
    }
}
