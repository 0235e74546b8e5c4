//! The legacy devices every fnvm VM has on the port-I/O bus: the COM1 console (its interrupt
//! pulsed from the vCPU thread that raises it), the i8042 (only its reset line matters), and
//! sinks for the ports Linux probes. Also the console input that feeds COM1 from a host fd.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::{io_err, new_eventfd, DeviceError, DeviceManager};
use crate::devices::bus::{lock, Bus, SharedDevice};
use crate::devices::i8042::{I8042State, LegacySink, I8042, I8042_PORT, I8042_PORT_LEN};
use crate::devices::serial::{
    ConsoleWriter, SerialArgs, SerialDevice, SerialDeviceState, COM1_IRQ, COM1_PORT, COM1_PORT_LEN,
};
use crate::devices::{InterruptTrigger, Persist};
use crate::event_loop::{EventLoop, Flow, Registry, Token};

/// Ports Linux probes, as `(base, len, fill)`: CMOS/RTC reads 0 (no update in progress), the
/// POST port, the other COM ports and PCI configuration read as absent.
const SINKS: [(u64, u64, u8); 6] = [
    (0x70, 2, 0x00),
    (0x80, 1, 0x00),
    (0x2e8, 8, 0xff),
    (0x2f8, 8, 0xff),
    (0x3e8, 8, 0xff),
    (0xcf8, 8, 0xff),
];

/// The serial port's interrupt line, pulsed with KVM_IRQ_LINE by the thread that raises it.
/// The port raises it while the vCPU's own exit is handled (a byte written, the transmitter
/// empty again), so the interrupt is pending in that vCPU's LAPIC before it re-enters: no hop
/// through KVM's irqfd worker thread and no IPI kicking the vCPU out of guest mode, for every
/// console line. (QEMU raises its serial interrupt from the vCPU thread the same way.)
struct PulsedLine {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl InterruptTrigger for PulsedLine {
    fn trigger(&self) -> io::Result<()> {
        // Edge-triggered IOAPIC pin: a rising edge, then low again (what an irqfd does).
        self.vm
            .set_irq_line(self.gsi, true)
            .and_then(|()| self.vm.set_irq_line(self.gsi, false))
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

/// The saved legacy devices a restored VM starts from.
pub struct LegacyState<'a> {
    pub serial: &'a SerialDeviceState,
    pub i8042: &'a I8042State,
}

/// What the legacy devices signal to the event loop.
pub struct LegacyEvents {
    /// The guest asked the i8042 for a reset.
    pub reset: Arc<EventFd>,
    /// The guest drained the serial receive FIFO: console input may flow again.
    pub serial_ready: Arc<EventFd>,
}

impl DeviceManager {
    /// The device manager with the legacy devices on the port-I/O bus (fresh, or from `saved`)
    /// and no virtio device yet. Without an irqchip the serial port has no line to raise
    /// (tiny guests poll).
    pub fn new(
        fd: &Arc<VmFd>,
        irqchip: bool,
        console: ConsoleWriter,
        saved: Option<LegacyState<'_>>,
    ) -> Result<(Self, LegacyEvents), DeviceError> {
        let serial_ready = Arc::new(new_eventfd("serial input eventfd")?);
        let reset = Arc::new(new_eventfd("reset eventfd")?);
        let serial_irq: Arc<dyn InterruptTrigger> = if irqchip {
            Arc::new(PulsedLine {
                vm: fd.clone(),
                gsi: COM1_IRQ,
            })
        } else {
            Arc::new(new_eventfd("serial irq eventfd")?)
        };
        let serial_args = SerialArgs {
            interrupt: serial_irq,
            input_ready: serial_ready.clone(),
            output: console,
        };
        let (serial, i8042) = match saved {
            None => (SerialDevice::new(serial_args), I8042::new(reset.clone())),
            Some(saved) => (
                SerialDevice::restore(serial_args, saved.serial)?,
                I8042::restore(reset.clone(), saved.i8042)?,
            ),
        };
        let serial = Arc::new(Mutex::new(serial));
        let i8042 = Arc::new(Mutex::new(i8042));

        let mut pio = Bus::new();
        pio.insert(COM1_PORT, COM1_PORT_LEN, serial.clone())?;
        pio.insert(I8042_PORT, I8042_PORT_LEN, i8042.clone())?;
        for (base, len, fill) in SINKS {
            let sink: SharedDevice = Arc::new(Mutex::new(LegacySink::new(fill)));
            pio.insert(base, len, sink)?;
        }
        let devices = Self {
            pio,
            mmio: Bus::new(),
            serial,
            i8042,
            virtio: Vec::new(),
            irq_lines: Vec::new(),
            sources: Vec::new(),
        };
        Ok((
            devices,
            LegacyEvents {
                reset,
                serial_ready,
            },
        ))
    }

    /// Feeds `input` to the serial console. Reads never take more than the receive FIFO has
    /// room for (only the guest drains it, so the room cannot shrink between the check and the
    /// queueing); with the FIFO full the fd is paused until the guest empties it (`ready`
    /// fires), so nothing spins and nothing is held back.
    pub fn add_console_input<C>(
        &mut self,
        event_loop: &mut EventLoop<C>,
        input: RawFd,
        ready: Arc<EventFd>,
    ) -> Result<(), DeviceError> {
        let serial = self.serial.clone();
        let handler = Box::new(move |_: &mut C, ctl: &mut Registry<'_, C>, token| {
            let room = lock(&serial).input_capacity();
            if room == 0 {
                let _ = ctl.pause(token);
                return Flow::Continue;
            }
            let mut buf = [0u8; 256];
            let want = room.min(buf.len());
            // SAFETY: the caller promised `input` stays open while the VM runs; ManuallyDrop
            // keeps this borrowed File from closing it.
            let mut file = std::mem::ManuallyDrop::new(unsafe {
                <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(input)
            });
            match file.read(&mut buf[..want]) {
                Ok(0) => {
                    let _ = ctl.remove(token);
                }
                Ok(n) => {
                    let taken = lock(&serial).queue_input(&buf[..n]);
                    if taken < n {
                        tracing::warn!("serial input: {} bytes dropped", n - taken);
                    }
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("console input closed: {e}");
                    let _ = ctl.remove(token);
                }
            }
            Flow::Continue
        });
        let token: Token = match event_loop.add(input, handler) {
            Ok(t) => t,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                tracing::debug!(
                    "console input is not pollable (regular file or /dev/null): ignored"
                );
                return Ok(());
            }
            Err(e) => {
                return Err(DeviceError::Io {
                    what: "epoll_ctl (console input)",
                    source: e,
                })
            }
        };
        let ready_fd = ready.as_raw_fd();
        let ready_token = event_loop
            .add(
                ready_fd,
                Box::new(move |_, ctl, _| {
                    let _ = ready.read();
                    let _ = ctl.resume(token);
                    Flow::Continue
                }),
            )
            .map_err(io_err("epoll_ctl"))?;
        self.sources.extend([token, ready_token]);
        Ok(())
    }
}
