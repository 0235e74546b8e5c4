//! virtio-vsock, from both of its hostile sides: the guest's packets (headers, REQUEST,
//! RW, credit and SHUTDOWN ops in descriptor chains in guest memory made of the fuzz input)
//! and a host program's `CONNECT <port>\n` handshake on the device's Unix listener, served by
//! the real `Vsock` device on the real MMIO transport.
//!
//! Input: 2 control bytes (bit 0 of the first: a host program connects; bits 1-2: extra
//! rounds; the second byte: how many bytes of what follows that program writes, its CONNECT
//! line and early payload), then the guest memory image from address 0 (queues rx, tx, event
//! at 0x0, 0x400, 0x800, each with its descriptor table, available ring at +0x100 and used
//! ring at +0x200). A guest REQUEST to host port 1234 finds a listener at `<uds>_1234`.
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;

use fnvm_fuzz::{split_control, Guest};
use fnvm_vmm::devices::virtio::vsock::Vsock;
use libfuzzer_sys::fuzz_target;

/// The fuzzer process's scratch directory for the sockets (removed at exit by nobody: it is
/// a per-process tempdir under $TMPDIR, emptied after every run).
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("fnvm-fuzz-vsock")
            .tempdir()
            .expect("scratch directory")
            .keep()
    })
}

fuzz_target!(|data: &[u8]| {
    let ([flags, host_len], rest) = split_control::<2>(data);
    let host_len = usize::from(host_len).min(rest.len());
    let (host_bytes, image) = rest.split_at(host_len);
    let uds = scratch().join("v.sock");
    let port_path = scratch().join("v.sock_1234");
    let _ = std::fs::remove_file(&uds);
    let _ = std::fs::remove_file(&port_path);
    let Ok(vsock) = Vsock::new(3, &uds) else {
        return;
    };
    let listener = UnixListener::bind(&port_path).ok();
    let Some(mut guest) = Guest::new(vsock, image, 3, u64::MAX) else {
        return;
    };
    let mut host = None;
    if flags & 1 != 0 {
        if let Ok(mut s) = UnixStream::connect(&uds) {
            let _ = s.set_nonblocking(true);
            let _ = s.write_all(host_bytes);
            host = Some(s);
        }
    }
    for _ in 0..1 + (flags >> 1 & 3) {
        guest.transport.process_host_events();
        guest.notify(1);
        guest.notify(0);
        guest.notify(2);
    }
    assert!(guest.transport.device().connection_count() <= 1024);
    drop(host);
    drop(guest);
    drop(listener);
    let _ = std::fs::remove_file(&port_path);
});
