//! virtio-net, from both of its hostile sides: the guest's tx frames (virtio-net headers,
//! partial checksums to complete, TCP SYN/RST frames for the handshake table) in descriptor
//! chains in guest memory made of the fuzz input, and passt's length-prefixed frame stream
//! (into the guest's rx buffers, refused-connection RSTs mended by `handshake`), served by the
//! real `Net` device on the real MMIO transport.
//!
//! Input: 3 control bytes (bits 0-1 of the first: extra rounds; bit 2: no MRG_RXBUF; the
//! next two, little-endian: how many bytes of what follows passt sends), then the guest memory
//! image from address 0 (queues rx and tx at 0x0 and 0x400, each with its descriptor table,
//! available ring at +0x100 and used ring at +0x200).
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;

use fnvm_fuzz::{split_control, Guest};
use fnvm_vmm::devices::virtio::net::{Net, DEFAULT_MAC};
use libfuzzer_sys::fuzz_target;

/// VIRTIO_NET_F_MRG_RXBUF.
const MRG_RXBUF: u64 = 1 << 15;

fuzz_target!(|data: &[u8]| {
    let ([flags, len_lo, len_hi], rest) = split_control::<3>(data);
    let passt_len = usize::from(u16::from_le_bytes([len_lo, len_hi])).min(rest.len());
    let (passt_bytes, image) = rest.split_at(passt_len);
    let Ok((device_end, mut passt)) = UnixStream::pair() else {
        return;
    };
    let Ok(net) = Net::with_stream(device_end, "/fuzz/passt.sock".into(), DEFAULT_MAC) else {
        return;
    };
    let _ = passt.set_nonblocking(true);
    let _ = passt.write_all(passt_bytes);
    let mask = if flags & 4 != 0 { !MRG_RXBUF } else { u64::MAX };
    let Some(mut guest) = Guest::new(net, image, 2, mask) else {
        return;
    };
    for _ in 0..1 + (flags & 3) {
        guest.transport.process_host_events();
        guest.notify(1);
        guest.notify(0);
    }
    let counters = guest.transport.device().counters();
    let _ = counters;
});
