//! Guest memory in a snapshot: written as a sparse file (pages that are all zero stay holes),
//! hashed page by page, and mapped back privately (copy-on-write) so every instance restored
//! from one snapshot shares the file's page cache and faults pages in only when touched.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::memory::GuestMemory;

pub const PAGE: usize = 4096;

/// Where a guest RAM region lives in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// The regions of `mem` laid out back to back in the memory file.
pub fn layout(mem: &GuestMemory) -> Vec<RegionLayout> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let l = RegionLayout {
                guest_addr: r.start_addr().0,
                len: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            l
        })
        .collect()
}

/// Hashes pages as the format defines: (global page index, bytes) of non-zero pages.
#[derive(Default)]
pub struct PageHasher(Sha256);

impl PageHasher {
    pub fn page(&mut self, index: u64, bytes: &[u8]) {
        self.0.update(index.to_le_bytes());
        self.0.update(bytes);
    }
    pub fn finish(self) -> String {
        hex::encode(self.0.finalize())
    }
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets aligned bytes.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Which pages of an anonymous mapping were ever touched (resident). Untouched anonymous pages
/// are zero, so they need not be read at all (reading them would fault in 128k zero pages for
/// 512 MiB). Returns None where residency says nothing about content (file-backed regions of a
/// restored VM, hosts with swap).
fn resident_pages(addr: *mut u8, len: usize, anonymous: bool) -> Option<Vec<u8>> {
    if !anonymous || host_has_swap() {
        return None;
    }
    let mut vec = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: addr/len describe a live mapping owned by guest memory; vec has one byte per page.
    let r = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    (r == 0).then_some(vec)
}

fn host_has_swap() -> bool {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("SwapTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .is_none_or(|kib| kib > 0)
}

/// Writes guest memory to `path` (created, sparse) and returns its size and content hash.
/// The vCPUs must be parked and no device may touch memory meanwhile.
///
/// First the runs of pages that hold data are found (untouched and zero pages stay holes),
/// then they are written while another thread hashes them: the VM stays paused for the longer
/// of the two, not their sum.
pub fn write(mem: &GuestMemory, path: &Path) -> io::Result<(u64, String)> {
    let file = File::options().write(true).create_new(true).open(path)?;
    let regions = layout(mem);
    let total: u64 = regions.iter().map(|r| r.len).sum();
    file.set_len(total)?;
    // (bytes, offset in the file), in file order.
    let mut runs: Vec<(&[u8], u64)> = Vec::new();
    for (region, l) in mem.iter().zip(&regions) {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| io::Error::other(e.to_string()))?;
        let len = region.len() as usize;
        let resident = resident_pages(host, len, region.file_offset().is_none());
        // SAFETY: the region is a live mapping of `len` bytes that outlives this call (`mem`
        // is borrowed); the VM is paused, so nothing writes it while these shared views exist.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        let mut run_start: Option<usize> = None;
        for (i, page) in bytes.chunks(PAGE).enumerate() {
            let touched = resident.as_ref().is_none_or(|v| v[i] & 1 != 0);
            if touched && !is_zero(page) {
                run_start.get_or_insert(i * PAGE);
            } else if let Some(s) = run_start.take() {
                runs.push((&bytes[s..i * PAGE], l.file_offset + s as u64));
            }
        }
        if let Some(s) = run_start {
            runs.push((&bytes[s..], l.file_offset + s as u64));
        }
    }
    let sum = std::thread::scope(|scope| {
        let hashing = scope.spawn(|| {
            let mut hasher = PageHasher::default();
            for (bytes, offset) in &runs {
                for (i, page) in bytes.chunks(PAGE).enumerate() {
                    hasher.page(offset / PAGE as u64 + i as u64, page);
                }
            }
            hasher.finish()
        });
        let written = runs
            .iter()
            .try_for_each(|(bytes, offset)| file.write_all_at(bytes, *offset));
        let sum = hashing
            .join()
            .map_err(|_| io::Error::other("the memory hashing thread panicked"));
        written.and(sum)
    })?;
    // No fsync: the header records this boot, and a load in another boot (after a crash)
    // re-checks the hash instead of trusting the file's stamp.
    Ok((total, sum))
}

/// Reads the whole memory file (skipping holes) and returns its content hash.
pub fn hash_file(path: &Path) -> io::Result<String> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let fd = file.as_raw_fd();
    let mut hasher = PageHasher::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on a file we own.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole remains
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        // Whole pages only (filesystem blocks are page-sized or smaller), each hashed once.
        let page = PAGE as u64;
        let start = (data as u64 & !(page - 1)).max(pos);
        let end = (hole.max(data) as u64)
            .div_ceil(page)
            .saturating_mul(page)
            .min(size);
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], at)?;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                if !is_zero(page) {
                    hasher.page(at / PAGE as u64 + i as u64, page);
                }
            }
            at += n as u64;
        }
        pos = end.max(pos + 1);
    }
    Ok(hasher.finish())
}

/// Maps the memory file privately: reads share the file's page cache with every other
/// instance, writes get private copies, nothing is read before the guest touches it.
pub fn map_private(path: &Path, regions: &[RegionLayout]) -> io::Result<GuestMemory> {
    let file = std::sync::Arc::new(File::open(path)?);
    let mut out = Vec::with_capacity(regions.len());
    for r in regions {
        let mapping = MmapRegionBuilder::new(r.len as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::from_arc(file.clone(), r.file_offset))
            .build()
            .map_err(|e| io::Error::other(format!("mmap of the memory file: {e}")))?;
        out.push(
            GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
                .ok_or_else(|| io::Error::other("memory region past the address space"))?,
        );
    }
    GuestMemory::from_regions(out).map_err(|e| io::Error::other(e.to_string()))
}

/// Maps the memory file privately over guest RAM that already exists and is registered with
/// KVM (a standby VM's anonymous regions): same addresses (MAP_FIXED), so KVM's memory slots
/// stay valid and its MMU notifier drops whatever it had mapped from the replaced pages. The
/// result is a non-owning view; `over` keeps owning (and finally unmapping) the addresses.
///
/// `regions` must describe exactly the regions of `over`, in order (checked).
///
/// # Safety
/// Nothing may hold references into `over`'s memory across this call (its contents are
/// replaced), and `over` must outlive every use of the returned memory.
pub unsafe fn map_private_over(
    path: &Path,
    regions: &[RegionLayout],
    over: &GuestMemory,
) -> io::Result<GuestMemory> {
    if layout_matches(regions, over).is_err() {
        return Err(io::Error::other(
            "the snapshot's memory regions differ from this VM's",
        ));
    }
    let file = std::sync::Arc::new(File::open(path)?);
    let mut out = Vec::with_capacity(regions.len());
    for r in regions {
        let host = over
            .get_host_address(GuestAddress(r.guest_addr))
            .map_err(|e| io::Error::other(e.to_string()))?;
        let offset = libc::off_t::try_from(r.file_offset)
            .map_err(|_| io::Error::other("memory file offset out of range"))?;
        // SAFETY: `host..host+len` is a mapping owned by `over` (checked above: same region
        // start and length); replacing it in place is what the caller allowed.
        let addr = unsafe {
            libc::mmap(
                host as *mut libc::c_void,
                r.len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `host` now starts a live mapping of `r.len` bytes that `over` keeps (and
        // unmaps) for as long as the caller keeps it.
        let builder = unsafe { MmapRegionBuilder::new(r.len as usize).with_raw_mmap_pointer(host) };
        let mapping = builder
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::from_arc(file.clone(), r.file_offset))
            .build()
            .map_err(|e| io::Error::other(format!("memory region view: {e}")))?;
        out.push(
            GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
                .ok_or_else(|| io::Error::other("memory region past the address space"))?,
        );
    }
    GuestMemory::from_regions(out).map_err(|e| io::Error::other(e.to_string()))
}

/// A snapshot's guest RAM layout that is not a VM's.
#[derive(Debug, thiserror::Error)]
#[error(
    "the snapshot's guest RAM is {} MiB in {} region(s), this VM's {} MiB in {}",
    .snapshot_bytes >> 20,
    .snapshot_regions,
    .vm_bytes >> 20,
    .vm_regions
)]
pub struct LayoutMismatch {
    pub snapshot_bytes: u64,
    pub snapshot_regions: usize,
    pub vm_bytes: u64,
    pub vm_regions: usize,
}

/// Ok if `regions` are exactly `mem`'s regions (start and length, in order).
pub fn layout_matches(regions: &[RegionLayout], mem: &GuestMemory) -> Result<(), LayoutMismatch> {
    let ours: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    let theirs: Vec<(u64, u64)> = regions.iter().map(|r| (r.guest_addr, r.len)).collect();
    if ours == theirs {
        Ok(())
    } else {
        Err(LayoutMismatch {
            snapshot_bytes: theirs.iter().map(|r| r.1).sum(),
            snapshot_regions: theirs.len(),
            vm_bytes: ours.iter().map(|r| r.1).sum(),
            vm_regions: ours.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_file_is_sparse_hashed_and_maps_back_privately() {
        let dir = tempfile::tempdir().unwrap();
        let mem = crate::memory::create_guest_memory(8).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
        mem.write_obj(0xabu8, GuestAddress(0x70_0fff)).unwrap();
        let path = dir.path().join("memory");
        let (size, sum) = write(&mem, &path).unwrap();
        assert_eq!(size, 8 << 20);
        assert_eq!(hash_file(&path).unwrap(), sum);
        // Sparse: only the two touched pages hold blocks.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 <= 64 * 1024);

        let back = map_private(&path, &layout(&mem)).unwrap();
        let mut buf = [0u8; 5];
        back.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
        assert_eq!(&buf, b"hello");
        // Writes stay private to the mapping.
        back.write_obj(0x55u8, GuestAddress(0x1000)).unwrap();
        assert_eq!(hash_file(&path).unwrap(), sum);

        let data = std::fs::read(&path).unwrap();
        let mut flipped = data.clone();
        flipped[0x70_0fff] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert_ne!(hash_file(&path).unwrap(), sum);
    }
}
