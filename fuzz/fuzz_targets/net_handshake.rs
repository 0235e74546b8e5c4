//! The frame parsing of virtio-net's handshake table (`net::handshake`), directly: guest
//! frames noted as SYNs/RSTs/FINs and passt frames mended from a bare RST to RST+ACK. Both
//! are hostile (guest and passt). The device target reaches the same code, but only behind a
//! whole descriptor chain; this one spends every execution on the Ethernet/IP/TCP parsing.
//!
//! Input: a sequence of frames, each `[kind: u8][len: u8]` then `len` bytes; an even kind is
//! a guest frame, an odd one a passt frame.
#![no_main]

use fnvm_vmm::devices::virtio::net::handshake::{Handshakes, MAX_PENDING};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut table = Handshakes::default();
    let mut rest = data;
    while let [kind, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (frame, next) = tail.split_at(n);
        rest = next;
        if kind & 1 == 0 {
            table.on_guest_frame(frame);
        } else {
            let mut copy = frame.to_vec();
            let mended = table.on_passt_frame(&mut copy);
            // Only a mended frame changes, and only its TCP header.
            if !mended {
                assert_eq!(copy, frame);
            }
        }
        assert!(table.len() <= MAX_PENDING);
    }
});
