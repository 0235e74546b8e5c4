//! The 16550 UART console at 0x3f8 (COM1, IRQ 4), on vm-superio's model.
//!
//! Output goes to a writer (the VMM's stdout, or a buffer in tests) and is watched for the Linux
//! panic banner, so a panicking guest ends the VMM with a status that names the panic instead of
//! looking like an ordinary reboot. Input is queued by the event loop (from stdin); when the
//! guest has drained the receive FIFO the device signals `input_ready` so the loop reads more.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::{BusDevice, InterruptTrigger};
use crate::devices::Persist;

/// COM1's I/O port base and size.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_PORT_LEN: u64 = 8;
/// COM1's legacy interrupt line.
pub const COM1_IRQ: u32 = 4;

/// What Linux prints first when it panics (`panic()` in kernel/panic.c).
pub const PANIC_MARKER: &str = "Kernel panic - not syncing";
/// What Linux prints (at emergency level, so even with `quiet`) once it has shut everything
/// down for a power-off or a halt (kernel/reboot.c). Without ACPI it then halts the CPU with
/// interrupts off forever, so the VMM must end the VM itself.
pub const HALT_MARKERS: [&str; 2] = ["reboot: Power down", "reboot: System halted"];
const MAX_LINE: usize = 512;

/// Watches console output line by line for the ends of a guest's life the CPU does not show:
/// a kernel panic ([`PANIC_MARKER`]; the line is kept and `panic_event` signalled) and a
/// power-off or halt ([`HALT_MARKERS`]; `halt_event` signalled). Matching whole lines of the
/// kernel's own console is robust as long as nothing else writes those exact texts to the
/// serial console (user programs' output goes over vsock, not the console).
pub struct ConsoleWatch {
    line: Mutex<Vec<u8>>,
    message: Mutex<Option<String>>,
    panic_event: EventFd,
    halt_event: EventFd,
}

impl ConsoleWatch {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            line: Mutex::new(Vec::new()),
            message: Mutex::new(None),
            panic_event: EventFd::new(libc::EFD_NONBLOCK)?,
            halt_event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Signalled once when a panic line has been seen.
    pub fn panic_event(&self) -> &EventFd {
        &self.panic_event
    }

    /// Signalled when the guest announced a power-off or halt.
    pub fn halt_event(&self) -> &EventFd {
        &self.halt_event
    }

    /// The panic line (from the marker on), if the guest panicked.
    pub fn message(&self) -> Option<String> {
        super::bus::lock(&self.message).clone()
    }

    fn observe(&self, bytes: &[u8]) {
        let mut line = super::bus::lock(&self.line);
        for &b in bytes {
            if b == b'\n' || line.len() >= MAX_LINE {
                self.check_line(&line);
                line.clear();
            }
            if b != b'\n' && b != b'\r' {
                line.push(b);
            }
        }
    }

    fn check_line(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        if let Some(pos) = text.find(PANIC_MARKER) {
            let mut message = super::bus::lock(&self.message);
            if message.is_none() {
                *message = Some(text[pos..].trim_end().to_string());
                let _ = self.panic_event.write(1);
            }
        } else if HALT_MARKERS.iter().any(|m| text.contains(m)) {
            let _ = self.halt_event.write(1);
        }
    }
}

/// The serial output sink: forwards every byte to the console writer at once (no buffering, so
/// the first guest byte reaches the host immediately) and lets the panic watch see it.
pub struct ConsoleWriter {
    out: Box<dyn Write + Send>,
    console_watch: Arc<ConsoleWatch>,
}

impl ConsoleWriter {
    pub fn new(out: Box<dyn Write + Send>, console_watch: Arc<ConsoleWatch>) -> Self {
        Self { out, console_watch }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.console_watch.observe(buf);
        // A closed console must not stop the guest: output is best effort.
        if let Err(err) = self.out.write_all(buf).and_then(|_| self.out.flush()) {
            tracing::debug!("serial console output dropped: {err}");
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Adapts the VM's interrupt line to vm-superio's trigger trait.
pub struct IrqLine(pub Arc<dyn InterruptTrigger>);

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// Tells the event loop when the guest emptied the receive FIFO.
pub struct InputReady(pub Arc<EventFd>);

impl SerialEvents for InputReady {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

/// The COM1 device on the port-I/O bus.
pub struct SerialDevice {
    serial: Serial<IrqLine, InputReady, ConsoleWriter>,
}

/// What a serial device is built from, for [`SerialDevice::new`] and [`Persist::restore`].
pub struct SerialArgs {
    pub interrupt: Arc<dyn InterruptTrigger>,
    pub input_ready: Arc<EventFd>,
    pub output: ConsoleWriter,
}

impl SerialDevice {
    pub fn new(args: SerialArgs) -> Self {
        Self {
            serial: Serial::with_events(
                IrqLine(args.interrupt),
                InputReady(args.input_ready),
                args.output,
            ),
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Queues host input for the guest (as much as fits); returns how many bytes were taken.
    pub fn queue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.serial.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(err) => {
                tracing::warn!("serial input dropped: {err:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() == 1 && offset < COM1_PORT_LEN {
            data[0] = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < COM1_PORT_LEN {
            if let Err(err) = self.serial.write(offset as u8, data[0]) {
                tracing::debug!("serial write at offset {offset}: {err:?}");
            }
        }
    }
}

/// The UART's registers as plain data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid serial state: {0}")]
pub struct SerialRestoreError(String);

impl Persist for SerialDevice {
    type State = SerialDeviceState;
    type ConstructorArgs = SerialArgs;
    type Error = SerialRestoreError;

    fn save(&self) -> SerialDeviceState {
        let s = self.serial.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn restore(args: SerialArgs, state: &SerialDeviceState) -> Result<Self, SerialRestoreError> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let serial = Serial::from_state(
            &s,
            IrqLine(args.interrupt),
            InputReady(args.input_ready),
            args.output,
        )
        .map_err(|e| SerialRestoreError(format!("{e:?}")))?;
        Ok(Self { serial })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct CountingIrq(AtomicUsize);
    impl InterruptTrigger for CountingIrq {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Fixture {
        dev: SerialDevice,
        out: SharedBuf,
        irq: Arc<CountingIrq>,
        ready: Arc<EventFd>,
        watch: Arc<ConsoleWatch>,
    }

    fn fixture() -> Fixture {
        let out = SharedBuf::default();
        let irq = Arc::new(CountingIrq::default());
        let ready = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let watch = Arc::new(ConsoleWatch::new().unwrap());
        let dev = SerialDevice::new(SerialArgs {
            interrupt: irq.clone(),
            input_ready: ready.clone(),
            output: ConsoleWriter::new(Box::new(out.clone()), watch.clone()),
        });
        Fixture {
            dev,
            out,
            irq,
            ready,
            watch,
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_console() {
        let mut f = fixture();
        for b in b"hi\n" {
            f.dev.write(0, &[*b]);
        }
        assert_eq!(&*f.out.0.lock().unwrap(), b"hi\n");
        assert!(f.watch.message().is_none());
    }

    #[test]
    fn wrong_sizes_and_offsets_are_ignored() {
        let mut f = fixture();
        f.dev.write(0, b"ab");
        f.dev.write(8, b"c");
        f.dev.write(u64::MAX, b"d");
        let mut data = [0xaa; 2];
        f.dev.read(5, &mut data);
        assert_eq!(data, [0, 0]);
        let mut one = [0xaa];
        f.dev.read(9, &mut one);
        assert_eq!(one, [0]);
        assert!(f.out.0.lock().unwrap().is_empty());
    }

    #[test]
    fn input_is_readable_and_raises_the_interrupt_when_enabled() {
        let mut f = fixture();
        f.dev.write(1, &[0x01]); // IER: received data available
        assert_eq!(f.dev.queue_input(b"ok"), 2);
        assert!(f.irq.0.load(Ordering::SeqCst) >= 1);
        let mut lsr = [0];
        f.dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0];
        f.dev.read(0, &mut b);
        assert_eq!(b[0], b'o');
        f.dev.read(0, &mut b);
        assert_eq!(b[0], b'k');
        assert_eq!(
            f.ready.read().unwrap(),
            1,
            "drained FIFO signals input_ready"
        );
    }

    #[test]
    fn input_beyond_the_fifo_is_left_for_later() {
        let mut f = fixture();
        let cap = f.dev.input_capacity();
        let big = vec![b'x'; cap + 10];
        assert_eq!(f.dev.queue_input(&big), cap);
        assert_eq!(f.dev.queue_input(b"y"), 0);
    }

    #[test]
    fn panic_banner_is_detected_across_writes() {
        let mut f = fixture();
        for b in b"[ 1.0] Kernel pan"
            .iter()
            .chain(b"ic - not syncing: VFS: no root\r\n")
        {
            f.dev.write(0, &[*b]);
        }
        assert_eq!(
            f.watch.message().as_deref(),
            Some("Kernel panic - not syncing: VFS: no root")
        );
        assert_eq!(f.watch.panic_event().read().unwrap(), 1);
        assert!(f.watch.halt_event().read().is_err());
    }

    #[test]
    fn power_off_line_signals_halt() {
        let mut f = fixture();
        for b in b"[   2.1] reboot: Power down\r\n" {
            f.dev.write(0, &[*b]);
        }
        assert_eq!(f.watch.halt_event().read().unwrap(), 1);
        assert!(f.watch.message().is_none());
    }

    #[test]
    fn state_round_trips() {
        let mut f = fixture();
        f.dev.write(7, &[0x5a]); // scratch
        f.dev.write(3, &[0x03]); // LCR 8n1
        f.dev.queue_input(b"z");
        let state = f.dev.save();
        let json = serde_json::to_string(&state).unwrap();
        let back: SerialDeviceState = serde_json::from_str(&json).unwrap();
        let mut g = fixture();
        let mut restored = SerialDevice::restore(
            SerialArgs {
                interrupt: g.irq.clone(),
                input_ready: g.ready.clone(),
                output: ConsoleWriter::new(Box::new(g.out.clone()), g.watch.clone()),
            },
            &back,
        )
        .unwrap();
        let mut b = [0];
        restored.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        restored.read(0, &mut b);
        assert_eq!(b[0], b'z');
        assert_eq!(restored.save().line_control, 0x03);
        let _ = &mut g.dev;
    }
}
