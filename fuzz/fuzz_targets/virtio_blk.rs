//! virtio-blk request parsing, as a hostile guest reaches it: descriptor chains (header, data
//! and status descriptors, indirect tables) in guest memory made of the fuzz input, served by
//! the real `Block` device on the real MMIO transport.
//!
//! Input: 2 control bytes (bit 0: read-only disk; bits 1-2: extra notifications; the second
//! byte clears offered feature bits 24-31, e.g. INDIRECT_DESC), then the guest memory image
//! from address 0 (queue 0's descriptor table at 0x0, available ring at 0x100, used ring at
//! 0x200; see `fnvm_fuzz`).
#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use fnvm_fuzz::{split_control, Guest, QUEUE_SIZE};
use fnvm_vmm::devices::virtio::block::{Block, SECTOR_SIZE};
use libfuzzer_sys::fuzz_target;

/// A 64-sector disk image, made once per fuzzer process.
fn disk() -> &'static tempfile::NamedTempFile {
    static DISK: OnceLock<tempfile::NamedTempFile> = OnceLock::new();
    DISK.get_or_init(|| {
        let mut f = tempfile::NamedTempFile::new().expect("scratch disk image");
        f.write_all(&vec![0x5a; 64 * SECTOR_SIZE as usize])
            .expect("scratch disk image");
        f
    })
}

fuzz_target!(|data: &[u8]| {
    let ([flags, clear], image) = split_control::<2>(data);
    let Ok(block) = Block::new(disk().path(), flags & 1 != 0) else {
        return;
    };
    let Some(mut guest) = Guest::new(block, image, 1, !(u64::from(clear) << 24)) else {
        return;
    };
    // The used ring is guest memory too: what the input put there until the device writes it.
    let before = guest.used_idx(0);
    let notifications = 1 + u32::from(flags >> 1 & 3);
    for _ in 0..notifications {
        guest.notify(0);
    }
    // Each notification serves at most one queue's worth: a guest cannot pin the thread.
    let used = guest.used_idx(0);
    assert!(
        used == before || u32::from(used) <= notifications * QUEUE_SIZE,
        "used {used}"
    );
});
