//! virtio-blk: a disk backed by a host file.
//!
//! Requests are served synchronously on the thread that processes the queue notification,
//! with positional I/O (pread/pwrite) straight between the file and guest memory: no bounce
//! buffer, no shared file offset. Every request is validated completely before any byte is
//! transferred, so a malformed request never half-happens.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::{read_config_bytes, ActivateError, VirtioDevice, FEATURE_VERSION_1};
use crate::devices::Persist;
use crate::memory::GuestMemory;

/// Sector size of the virtio-blk protocol (fixed by the spec, independent of the disk).
pub const SECTOR_SIZE: u64 = 512;
/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request we advertise (SEG_MAX) and accept: the queue minus header and
/// status descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data transfer of one request. Linux stays far below (1.25 MiB by default); the
/// bound keeps one request from monopolising the thread that serves it.
pub const MAX_REQUEST_BYTES: u64 = 64 << 20;
/// Length of the request header (type, reserved, sector).
const HEADER_LEN: u32 = 16;

/// Why a disk could not be opened or restored.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The disk image cannot be opened.
    #[error("cannot open disk image {path} ({mode}): {source}")]
    Open {
        path: PathBuf,
        mode: &'static str,
        source: io::Error,
    },
    /// The disk image's metadata cannot be read.
    #[error("cannot stat disk image {path}: {source}")]
    Metadata { path: PathBuf, source: io::Error },
    /// The disk image is neither a regular file nor a block device.
    #[error("disk image {path} is not a regular file or block device")]
    NotAFile { path: PathBuf },
    /// The disk image's size differs from the size the snapshot was made with.
    #[error("disk image {path} is {actual} sectors long, the snapshot expects {expected}")]
    CapacityChanged {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
}

/// Saved state of a [`Block`] device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub path: PathBuf,
    pub read_only: bool,
    pub capacity_sectors: u64,
    /// What GET_ID returns; kept so the guest sees the same disk after a restore.
    pub disk_id: Vec<u8>,
    pub acked_features: u64,
}

/// What restoring a [`Block`] needs: optionally a different path for the backing file (a
/// per-instance copy of the writable layer), else the saved one.
#[derive(Clone, Debug, Default)]
pub struct BlockRestoreArgs {
    pub path: Option<PathBuf>,
}

/// A virtio-blk device backed by a regular file (or host block device).
pub struct Block {
    file: File,
    path: PathBuf,
    read_only: bool,
    capacity_sectors: u64,
    disk_id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    acked_features: u64,
    config: [u8; 24],
}

/// The request types this device understands, after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestKind {
    In,
    Out,
    Flush,
    GetId,
}

impl Block {
    /// Opens `path` as a disk; `read_only` opens it O_RDONLY and advertises VIRTIO_BLK_F_RO.
    pub fn new(path: impl AsRef<Path>, read_only: bool) -> Result<Block, BlockError> {
        let path = path.as_ref().to_path_buf();
        let (file, mode) = if read_only {
            (File::open(&path), "read-only")
        } else {
            (
                OpenOptions::new().read(true).write(true).open(&path),
                "read-write",
            )
        };
        let file = file.map_err(|source| BlockError::Open {
            path: path.clone(),
            mode,
            source,
        })?;
        let meta = file.metadata().map_err(|source| BlockError::Metadata {
            path: path.clone(),
            source,
        })?;
        let size = if meta.file_type().is_file() {
            meta.len()
        } else if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
            block_device_size(&file).map_err(|source| BlockError::Metadata {
                path: path.clone(),
                source,
            })?
        } else {
            return Err(BlockError::NotAFile { path });
        };
        if size % SECTOR_SIZE != 0 {
            tracing::warn!(
                path = %path.display(),
                size,
                "disk image size is not a multiple of 512: the tail is not visible to the guest"
            );
        }
        let mut disk_id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        // Stable for the same file (device + inode), and it fits the 20 bytes GET_ID allows.
        let id = format!("fnvm{:x}-{:x}", meta.dev(), meta.ino());
        let n = id.len().min(disk_id.len());
        disk_id[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Block::from_parts(
            file,
            path,
            read_only,
            size / SECTOR_SIZE,
            disk_id,
        ))
    }

    fn from_parts(
        file: File,
        path: PathBuf,
        read_only: bool,
        capacity_sectors: u64,
        disk_id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    ) -> Block {
        // struct virtio_blk_config: capacity (le64) @0, size_max @8, seg_max @12, geometry
        // @16, blk_size @20. Only capacity and seg_max are meaningful here.
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        Block {
            file,
            path,
            read_only,
            capacity_sectors,
            disk_id,
            acked_features: 0,
            config,
        }
    }

    /// Disk size in 512-byte sectors, as the guest sees it.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// The 20-byte serial the guest reads with GET_ID (NUL-padded).
    pub fn disk_id(&self) -> &[u8] {
        &self.disk_id
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves one descriptor chain; returns the number of bytes written into guest buffers
    /// (the used length), 0 for a request dropped without a status byte.
    fn serve_chain(&mut self, mem: &GuestMemory, chain: impl Iterator<Item = Descriptor>) -> u32 {
        // Header + SEG_MAX data segments + status; one more tells us the chain is too long.
        let max = SEG_MAX as usize + 2;
        let descs: Vec<Descriptor> = chain.take(max + 1).collect();
        let Some(status_desc) = descs.last().copied() else {
            return 0;
        };
        // The status byte is the last byte of the last descriptor, which must be writable.
        let status_addr = match status_desc
            .addr()
            .checked_add(u64::from(status_desc.len()).saturating_sub(1))
        {
            Some(addr)
                if status_desc.is_write_only()
                    && status_desc.len() >= 1
                    && mem.check_range(addr, 1) =>
            {
                addr
            }
            _ => {
                tracing::warn!("virtio-blk request without a writable status byte dropped");
                return 0;
            }
        };
        let (status, written) = match self.validate_and_run(mem, &descs) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(status) => (status, 0),
        };
        if mem.write_obj(status as u8, status_addr).is_err() {
            return 0;
        }
        written.saturating_add(1)
    }

    /// Returns the bytes written to data buffers, or the error status to report.
    fn validate_and_run(&mut self, mem: &GuestMemory, descs: &[Descriptor]) -> Result<u32, u32> {
        if descs.len() > SEG_MAX as usize + 2 {
            tracing::warn!("virtio-blk request with more than SEG_MAX segments");
            return Err(VIRTIO_BLK_S_IOERR);
        }
        if descs.len() < 2 {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let status = descs[descs.len() - 1];
        if status.len() != 1 {
            tracing::warn!(
                len = status.len(),
                "virtio-blk status descriptor is not 1 byte"
            );
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let header = descs[0];
        if header.is_write_only() || header.len() != HEADER_LEN {
            tracing::warn!("virtio-blk header is not a 16-byte readable descriptor");
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let mut raw = [0u8; HEADER_LEN as usize];
        mem.read_slice(&mut raw, header.addr())
            .map_err(|_| VIRTIO_BLK_S_IOERR)?;
        let request_type = u32::from_le_bytes(raw[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(raw[8..16].try_into().unwrap_or_default());
        let data = &descs[1..descs.len() - 1];

        let kind = match request_type {
            VIRTIO_BLK_T_IN => RequestKind::In,
            VIRTIO_BLK_T_OUT => RequestKind::Out,
            VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
            other => {
                tracing::debug!(request_type = other, "unsupported virtio-blk request");
                return Err(VIRTIO_BLK_S_UNSUPP);
            }
        };
        let device_writes = matches!(kind, RequestKind::In | RequestKind::GetId);
        let mut total: u64 = 0;
        for d in data {
            if d.is_write_only() != device_writes {
                tracing::warn!(?kind, "virtio-blk data descriptor has the wrong direction");
                return Err(VIRTIO_BLK_S_IOERR);
            }
            if !mem.check_range(d.addr(), d.len() as usize) {
                tracing::warn!(
                    addr = d.addr().0,
                    len = d.len(),
                    "virtio-blk buffer outside guest memory"
                );
                return Err(VIRTIO_BLK_S_IOERR);
            }
            total += u64::from(d.len());
        }

        match kind {
            RequestKind::Flush => {
                if !data.is_empty() {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                self.file.sync_data().map_err(|e| {
                    tracing::error!(error = %e, path = %self.path.display(), "disk flush failed");
                    VIRTIO_BLK_S_IOERR
                })?;
                Ok(0)
            }
            RequestKind::GetId => {
                let mut id = &self.disk_id[..];
                let mut written = 0u32;
                for d in data {
                    let n = id.len().min(d.len() as usize);
                    mem.write_slice(&id[..n], d.addr())
                        .map_err(|_| VIRTIO_BLK_S_IOERR)?;
                    id = &id[n..];
                    written += n as u32;
                }
                Ok(written)
            }
            RequestKind::In | RequestKind::Out => {
                if kind == RequestKind::Out && self.read_only {
                    tracing::debug!("write to a read-only disk refused");
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                if total % SECTOR_SIZE != 0 || total > MAX_REQUEST_BYTES {
                    tracing::warn!(total, "virtio-blk transfer length invalid");
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let in_range = sector
                    .checked_mul(SECTOR_SIZE)
                    .and_then(|start| start.checked_add(total))
                    .is_some_and(|end| end <= self.capacity_sectors * SECTOR_SIZE);
                if !in_range {
                    tracing::warn!(sector, total, "virtio-blk request beyond the disk's end");
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let mut offset = sector * SECTOR_SIZE;
                for d in data {
                    let result = if kind == RequestKind::In {
                        read_file_into_guest(&self.file, mem, d.addr(), d.len() as usize, offset)
                    } else {
                        write_guest_to_file(&self.file, mem, d.addr(), d.len() as usize, offset)
                    };
                    result.map_err(|e| {
                        tracing::error!(error = %e, path = %self.path.display(), "disk I/O failed");
                        VIRTIO_BLK_S_IOERR
                    })?;
                    offset += u64::from(d.len());
                }
                Ok(if kind == RequestKind::In {
                    total as u32
                } else {
                    0
                })
            }
        }
    }
}

/// pread()s `len` bytes at `offset` of `file` straight into guest memory at `addr`.
fn read_file_into_guest(
    file: &File,
    mem: &GuestMemory,
    addr: GuestAddress,
    len: usize,
    mut offset: u64,
) -> io::Result<()> {
    for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
        let slice = slice.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let guard = slice.ptr_guard_mut();
        let mut done = 0usize;
        while done < slice.len() {
            let off = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: `guard` points at `slice.len()` bytes of mapped guest memory that stay
            // mapped while the guard lives; the kernel writes at most `slice.len() - done`
            // bytes from `done` on. The guest may touch the same bytes concurrently, which is
            // its own business: no Rust reference to that memory exists.
            let n = unsafe {
                libc::pread(
                    file.as_raw_fd(),
                    guard.as_ptr().add(done).cast(),
                    slice.len() - done,
                    off,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "disk image shrank under the VM",
                ));
            }
            done += n as usize;
            offset += n as u64;
        }
        slice.bitmap().mark_dirty(0, slice.len());
    }
    Ok(())
}

/// pwrite()s `len` bytes of guest memory at `addr` to `file` at `offset`.
fn write_guest_to_file(
    file: &File,
    mem: &GuestMemory,
    addr: GuestAddress,
    len: usize,
    mut offset: u64,
) -> io::Result<()> {
    for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
        let slice = slice.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let guard = slice.ptr_guard();
        let mut done = 0usize;
        while done < slice.len() {
            let off = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: `guard` points at `slice.len()` bytes of mapped guest memory that stay
            // mapped while the guard lives; the kernel only reads from it.
            let n = unsafe {
                libc::pwrite(
                    file.as_raw_fd(),
                    guard.as_ptr().add(done).cast(),
                    slice.len() - done,
                    off,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "disk write made no progress",
                ));
            }
            done += n as usize;
            offset += n as u64;
        }
    }
    Ok(())
}

/// Size in bytes of a host block device (BLKGETSIZE64).
fn block_device_size(file: &File) -> io::Result<u64> {
    // _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which points at a live local.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn disk_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn features(&self) -> u64 {
        let mut features = FEATURE_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX;
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        _mem: &GuestMemory,
        queues: &mut [Queue],
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                actual: queues.len(),
            });
        }
        self.acked_features = acked_features;
        Ok(())
    }

    fn process_queue(&mut self, mem: &GuestMemory, queues: &mut [Queue], index: u16) -> bool {
        let Some(queue) = queues.get_mut(usize::from(index)) else {
            return false;
        };
        let mut used_any = false;
        // Bounded: at most one queue's worth per notification, so a guest that keeps refilling
        // the ring cannot pin this thread; it notifies again for the rest.
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let used_len = self.serve_chain(mem, chain);
            if let Err(e) = queue.add_used(mem, head, used_len) {
                tracing::error!(error = %e, "virtio-blk: cannot write the used ring");
                break;
            }
            used_any = true;
        }
        used_any
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }

    fn device_state(&self) -> super::VirtioDeviceState {
        super::VirtioDeviceState::Block(self.save())
    }
}

impl Persist for Block {
    type State = BlockState;
    type ConstructorArgs = BlockRestoreArgs;
    type Error = BlockError;

    fn save(&self) -> BlockState {
        BlockState {
            path: self.path.clone(),
            read_only: self.read_only,
            capacity_sectors: self.capacity_sectors,
            disk_id: self.disk_id.to_vec(),
            acked_features: self.acked_features,
        }
    }

    fn restore(args: BlockRestoreArgs, state: &BlockState) -> Result<Block, BlockError> {
        let path = args.path.unwrap_or_else(|| state.path.clone());
        let opened = Block::new(&path, state.read_only)?;
        if opened.capacity_sectors != state.capacity_sectors {
            return Err(BlockError::CapacityChanged {
                path,
                expected: state.capacity_sectors,
                actual: opened.capacity_sectors,
            });
        }
        let mut disk_id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = state.disk_id.len().min(disk_id.len());
        disk_id[..n].copy_from_slice(&state.disk_id[..n]);
        let mut block = Block::from_parts(
            opened.file,
            path,
            state.read_only,
            state.capacity_sectors,
            disk_id,
        );
        block.acked_features = state.acked_features;
        Ok(block)
    }
}

#[cfg(test)]
mod tests;
