//! Control of a running VM: pause, resume, snapshot and restore metrics, served by the VMM's
//! event loop (so a request never races a device handler), from two front ends:
//! - [`VmController`], a library handle for other threads (tests, embedding programs);
//! - the API socket (`fnvm-vmm --api-sock PATH`): JSON lines over a Unix stream socket.
//!
//! ```text
//! → {"op":"pause"}                     ← {"ok":true}
//! → {"op":"snapshot","dir":"/x/snap"}  ← {"ok":true,"snapshot_ms":12.3}
//! → {"op":"resume"}                    ← {"ok":true}
//! → {"op":"metrics"}                   ← {"ok":true,"paused":false,"restore":{...}}
//! → {"op":"restore","dir":"/x/snap","disks":["/x/copy.img"],"vsock":"/x/v.sock"}
//!                                      ← {"ok":true,"restore_ms":0.4} (standby VMM only)
//! anything else                        ← {"ok":false,"error":"..."}
//! ```
//! `snapshot` on a running VM pauses it for the snapshot and resumes it afterwards.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::lock;
use crate::devices::i8042::I8042;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::VirtioDeviceState;
use crate::event_loop::{Control, EventLoop, Flow, Token};
use crate::memory::GuestMemory;
use crate::snapshot::{self, VirtioSlotState, VmState};
use crate::state::Persist;
use crate::vstate::vcpu::{FirstIo, FirstIoRecord, VcpuControl};
use crate::vmm::VirtioSlot;

/// A request to the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Pause,
    Resume,
    Snapshot {
        dir: PathBuf,
    },
    Metrics,
    /// Only for a standby VMM (`fnvm-vmm --standby`, see [`crate::standby`]): become the VM
    /// saved in `dir`, with `disks` as the backing files of its disks in slot order and
    /// `vsock` as its vsock device's new socket path.
    Restore {
        dir: PathBuf,
        #[serde(default)]
        disks: Vec<PathBuf>,
        #[serde(default)]
        vsock: Option<PathBuf>,
    },
}

/// How a restored VM came back: when it resumed and its first I/O (times since the VMM
/// process started).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreMetrics {
    pub resumed_us: u64,
    pub first_io: Option<FirstIoRecord>,
}

impl std::fmt::Display for RestoreMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |us: u64| us as f64 / 1000.0;
        write!(f, "restored, resumed at {:.2} ms", ms(self.resumed_us))?;
        match self.first_io {
            Some(io) => write!(
                f,
                "; first guest I/O at {:.2} ms after {} minor + {} major page faults",
                ms(io.at_us),
                io.minor_faults,
                io.major_faults
            ),
            None => write!(f, "; no guest I/O yet"),
        }
    }
}

/// The reply to a [`Request`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub paused: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub snapshot_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub restore: Option<RestoreMetrics>,
    /// A standby VMM's `restore`: request received → VM state restored, vCPUs about to run.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub restore_ms: Option<f64>,
}

impl Response {
    pub fn ok() -> Self {
        Response {
            ok: true,
            ..Default::default()
        }
    }
    pub fn err(e: impl std::fmt::Display) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            ..Default::default()
        }
    }
}

type Envelope = (Request, mpsc::Sender<Response>);

/// A handle to control a VM from another thread. Requests are served once [`crate::vmm::Vm::run`]
/// runs; each call waits for the reply.
#[derive(Clone)]
pub struct VmController {
    tx: mpsc::Sender<Envelope>,
    wake: Arc<EventFd>,
}

/// How long a library call waits for the event loop (a snapshot of a large VM takes a while).
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

impl VmController {
    pub fn request(&self, req: Request) -> Response {
        let (tx, rx) = mpsc::channel();
        if self.tx.send((req, tx)).is_err() || self.wake.write(1).is_err() {
            return Response::err("the VM is not running");
        }
        rx.recv_timeout(REPLY_TIMEOUT)
            .unwrap_or_else(|_| Response::err("the VM did not answer (not running?)"))
    }

    fn check(r: Response) -> Result<Response, String> {
        if r.ok {
            Ok(r)
        } else {
            Err(r.error.unwrap_or_default())
        }
    }

    pub fn pause(&self) -> Result<(), String> {
        Self::check(self.request(Request::Pause)).map(drop)
    }
    pub fn resume(&self) -> Result<(), String> {
        Self::check(self.request(Request::Resume)).map(drop)
    }
    pub fn snapshot(&self, dir: impl Into<PathBuf>) -> Result<(), String> {
        Self::check(self.request(Request::Snapshot { dir: dir.into() })).map(drop)
    }
    pub fn metrics(&self) -> Result<Response, String> {
        Self::check(self.request(Request::Metrics))
    }
}

/// The receiving end, kept by the VM until it runs.
pub struct ControlChannel {
    rx: mpsc::Receiver<Envelope>,
    wake: Arc<EventFd>,
    controller: VmController,
}

impl ControlChannel {
    pub fn new() -> io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        Ok(Self {
            rx,
            controller: VmController {
                tx,
                wake: wake.clone(),
            },
            wake,
        })
    }

    pub fn controller(&self) -> VmController {
        self.controller.clone()
    }
}

/// What serving requests needs: the VM's parts, shared with the running VM.
pub struct ControlCore {
    pub vcpus: Arc<VcpuControl>,
    pub vcpu_count: usize,
    pub vm_fd: Arc<VmFd>,
    pub irqchip: bool,
    pub memory_mib: u64,
    pub mem: GuestMemory,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub virtio: Vec<VirtioSlot>,
    /// Event sources that move guest-visible state (queue notifications, host sockets,
    /// console input): silenced while paused.
    pub device_tokens: Vec<Token>,
    pub restore: Option<(u64, Arc<FirstIo>)>,
}

impl ControlCore {
    pub fn handle(&mut self, ctl: &mut Control<'_>, req: Request) -> Response {
        match req {
            Request::Pause => match self.pause(ctl) {
                Ok(()) => Response::ok(),
                Err(e) => Response::err(e),
            },
            Request::Resume => {
                self.resume(ctl);
                Response::ok()
            }
            Request::Snapshot { dir } => {
                let was_paused = self.vcpus.is_paused();
                if !was_paused {
                    if let Err(e) = self.pause(ctl) {
                        return Response::err(e);
                    }
                }
                let t = Instant::now();
                let result = self.snapshot(&dir);
                if !was_paused {
                    self.resume(ctl);
                }
                match result {
                    Ok(()) => Response {
                        snapshot_ms: Some(t.elapsed().as_secs_f64() * 1000.0),
                        ..Response::ok()
                    },
                    Err(e) => Response::err(e),
                }
            }
            Request::Restore { .. } => Response::err(
                "this VM is already running: only a standby fnvm-vmm (--standby) restores",
            ),
            Request::Metrics => Response {
                paused: Some(self.vcpus.is_paused()),
                restore: self.metrics(),
                ..Response::ok()
            },
        }
    }

    pub fn metrics(&self) -> Option<RestoreMetrics> {
        self.restore
            .as_ref()
            .map(|(resumed_us, first)| RestoreMetrics {
                resumed_us: *resumed_us,
                first_io: first.get(),
            })
    }

    fn pause(&mut self, ctl: &mut Control<'_>) -> Result<(), String> {
        if self.vcpus.is_paused() {
            return Ok(());
        }
        for t in &self.device_tokens {
            let _ = ctl.pause(*t);
        }
        let r = self.vcpus.pause(self.vcpu_count);
        if r.is_err() {
            self.resume(ctl);
        }
        r
    }

    fn resume(&mut self, ctl: &mut Control<'_>) {
        for t in &self.device_tokens {
            let _ = ctl.resume(*t);
        }
        self.vcpus.resume();
    }

    /// Saves the paused VM into `dir`.
    fn snapshot(&self, dir: &std::path::Path) -> Result<(), String> {
        let vcpus = self.vcpus.save_all()?;
        let chip = |id: u32| -> Result<Option<kvm_irqchip>, String> {
            if !self.irqchip {
                return Ok(None);
            }
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.vm_fd
                .get_irqchip(&mut c)
                .map_err(|e| format!("KVM_GET_IRQCHIP({id}): {e}"))?;
            Ok(Some(c))
        };
        let mut virtio = Vec::new();
        let mut writable = Vec::new();
        for (i, slot) in self.virtio.iter().enumerate() {
            let t = lock(&slot.transport);
            let device = t.device().device_state();
            if let VirtioDeviceState::Block(b) = &device {
                if !b.read_only {
                    writable.push((i, b.path.clone()));
                }
            }
            virtio.push(VirtioSlotState {
                base: slot.base,
                irq: slot.irq,
                transport: t.save(),
                device,
                disk_copy: None,
            });
        }
        let state = VmState {
            memory_mib: self.memory_mib,
            regions: snapshot::memory::layout(&self.mem),
            irqchip: self.irqchip,
            vcpus,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: if self.irqchip {
                Some(
                    self.vm_fd
                        .get_pit2()
                        .map_err(|e| format!("KVM_GET_PIT2: {e}"))?,
                )
            } else {
                None
            },
            clock: self.vm_fd.get_clock().ok(),
            serial: lock(&self.serial).save(),
            i8042: lock(&self.i8042).save(),
            virtio,
        };
        let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
        let host = snapshot::host_identity(&kvm).map_err(|e| e.to_string())?;
        snapshot::write(dir, host, state, &self.mem, &writable).map_err(|e| e.to_string())
    }
}

/// Registers the library channel's handler.
pub fn serve_channel(
    event_loop: &mut EventLoop,
    channel: ControlChannel,
    core: Arc<Mutex<ControlCore>>,
) -> io::Result<()> {
    let ControlChannel { rx, wake, .. } = channel;
    let fd = wake.as_raw_fd();
    event_loop.add(
        fd,
        Box::new(move |ctl, _| {
            let _ = wake.read();
            while let Ok((req, reply)) = rx.try_recv() {
                let resp = lock(&core).handle(ctl, req);
                let _ = reply.send(resp);
            }
            Flow::Continue
        }),
    )?;
    Ok(())
}

/// Longest request line accepted on the API socket.
const MAX_LINE: usize = 64 * 1024;

/// Serves the API socket: accepts connections and answers one JSON line per request line.
pub fn serve_socket(
    event_loop: &mut EventLoop,
    listener: UnixListener,
    core: Arc<Mutex<ControlCore>>,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let fd = listener.as_raw_fd();
    event_loop.add(
        fd,
        Box::new(move |ctl, _| {
            while let Ok((stream, _)) = listener.accept() {
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                let raw: RawFd = stream.as_raw_fd();
                let handler = connection_handler(stream, core.clone());
                if let Err(e) = ctl.add(raw, handler) {
                    tracing::warn!("API connection dropped: {e}");
                }
            }
            Flow::Continue
        }),
    )?;
    Ok(())
}

fn connection_handler(
    mut stream: UnixStream,
    core: Arc<Mutex<ControlCore>>,
) -> crate::event_loop::Handler {
    let mut buf: Vec<u8> = Vec::new();
    let mut open = true;
    Box::new(move |ctl, token| {
        if !open {
            return Flow::Continue;
        }
        let mut chunk = [0u8; 4096];
        let mut closed = false;
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            let resp = match serde_json::from_str::<Request>(text) {
                Ok(req) => lock(&core).handle(ctl, req),
                Err(e) => Response::err(format!(
                    "bad request {text:?}: {e} (ops: pause, resume, snapshot {{dir}}, metrics, \
                     restore {{dir, disks, vsock}})"
                )),
            };
            let mut out = serde_json::to_vec(&resp).unwrap_or_default();
            out.push(b'\n');
            // Replies are small; a client that does not read them loses its connection.
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            if stream.write_all(&out).is_err() {
                closed = true;
                break;
            }
            let _ = stream.set_nonblocking(true);
        }
        if buf.len() > MAX_LINE {
            closed = true;
        }
        if closed {
            open = false;
            let _ = ctl.remove(token);
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        Flow::Continue
    })
}
