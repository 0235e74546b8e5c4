//! A minimal i8042 keyboard controller at ports 0x60/0x64: enough for Linux to probe it, and
//! the CPU-reset command (0xFE to port 0x64, Linux's `reboot=k`) that the guest uses to end
//! the VM. The reset is signalled on an eventfd that the event loop turns into a clean
//! guest-initiated shutdown.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use crate::devices::Persist;

/// The controller's port base (data port) and span up to the command/status port 0x64.
pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;

const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;

const CMD_READ_COMMAND_BYTE: u8 = 0x20;
const CMD_WRITE_COMMAND_BYTE: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KEYBOARD: u8 = 0xab;
const CMD_DISABLE_KEYBOARD: u8 = 0xad;
const CMD_ENABLE_KEYBOARD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

/// Keyboard enabled, system flag, translation: what a PC's controller reports after POST.
const DEFAULT_COMMAND_BYTE: u8 = 0x45;
const OUTPUT_PORT_RESET_LINE: u8 = 0x01;
const MAX_OUTPUT: usize = 16;

/// The controller's registers as plain data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    pub status: u8,
    pub command_byte: u8,
    /// The command waiting for its data byte (0x60 or 0xd1), if any.
    pub pending_command: Option<u8>,
    pub output: VecDeque<u8>,
}

impl Default for I8042State {
    fn default() -> Self {
        Self {
            status: STATUS_SYSTEM_FLAG,
            command_byte: DEFAULT_COMMAND_BYTE,
            pending_command: None,
            output: VecDeque::new(),
        }
    }
}

pub struct I8042 {
    state: I8042State,
    reset: Arc<EventFd>,
}

impl I8042 {
    /// `reset` is signalled when the guest asks for a CPU reset.
    pub fn new(reset: Arc<EventFd>) -> Self {
        Self {
            state: I8042State::default(),
            reset,
        }
    }

    fn push_output(&mut self, byte: u8) {
        if self.state.output.len() < MAX_OUTPUT {
            self.state.output.push_back(byte);
        }
    }

    fn request_reset(&self) {
        if let Err(err) = self.reset.write(1) {
            tracing::error!("cannot signal the guest's reset request: {err}");
        }
    }

    fn command(&mut self, cmd: u8) {
        self.state.status |= STATUS_LAST_WAS_COMMAND;
        match cmd {
            CMD_READ_COMMAND_BYTE => self.push_output(self.state.command_byte),
            CMD_WRITE_COMMAND_BYTE | CMD_WRITE_OUTPUT_PORT => {
                self.state.pending_command = Some(cmd)
            }
            CMD_SELF_TEST => self.push_output(0x55),
            CMD_TEST_KEYBOARD | CMD_TEST_AUX => self.push_output(0x00),
            CMD_READ_OUTPUT_PORT => self.push_output(OUTPUT_PORT_RESET_LINE),
            CMD_DISABLE_KEYBOARD => self.state.command_byte |= 0x10,
            CMD_ENABLE_KEYBOARD => self.state.command_byte &= !0x10,
            CMD_DISABLE_AUX => self.state.command_byte |= 0x20,
            CMD_ENABLE_AUX => self.state.command_byte &= !0x20,
            CMD_RESET_CPU => self.request_reset(),
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        self.state.status &= !STATUS_LAST_WAS_COMMAND;
        match self.state.pending_command.take() {
            Some(CMD_WRITE_COMMAND_BYTE) => self.state.command_byte = value,
            // Pulling the output port's reset line low resets the CPU.
            Some(CMD_WRITE_OUTPUT_PORT) if value & OUTPUT_PORT_RESET_LINE == 0 => {
                self.request_reset()
            }
            Some(_) => {}
            // A byte for the keyboard itself: acknowledge it as a keyboard would.
            None => self.push_output(0xfa),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 1 {
            return;
        }
        data[0] = match offset {
            DATA_OFFSET => self.state.output.pop_front().unwrap_or(0),
            COMMAND_OFFSET => {
                let full = if self.state.output.is_empty() {
                    0
                } else {
                    STATUS_OUTPUT_FULL
                };
                self.state.status | full
            }
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            DATA_OFFSET => self.data(data[0]),
            COMMAND_OFFSET => self.command(data[0]),
            _ => {}
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid i8042 state")]
pub struct I8042RestoreError;

impl Persist for I8042 {
    type State = I8042State;
    type ConstructorArgs = Arc<EventFd>;
    type Error = I8042RestoreError;

    fn save(&self) -> I8042State {
        self.state.clone()
    }

    fn restore(reset: Arc<EventFd>, state: &I8042State) -> Result<Self, I8042RestoreError> {
        if state.output.len() > MAX_OUTPUT {
            return Err(I8042RestoreError);
        }
        Ok(Self {
            state: state.clone(),
            reset,
        })
    }
}

/// A port range nobody emulates but Linux probes (POST code port, CMOS, PCI config, the other
/// COM ports): writes vanish, reads return `fill` (0xff reads as "no device here").
pub struct LegacySink {
    fill: u8,
}

impl LegacySink {
    pub fn new(fill: u8) -> Self {
        Self { fill }
    }
}

impl BusDevice for LegacySink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(self.fill);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (I8042, Arc<EventFd>) {
        let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        (I8042::new(evt.clone()), evt)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0xaa];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_the_reset_event() {
        let (mut dev, evt) = device();
        assert!(evt.read().is_err(), "nothing signalled yet");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn reset_through_the_output_port_signals_too() {
        let (mut dev, evt) = device();
        dev.write(4, &[0xd1]);
        dev.write(0, &[0xfe]); // bit 0 low: reset line asserted
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn self_test_and_command_byte_answer_like_a_pc() {
        let (mut dev, evt) = device();
        assert_eq!(read(&mut dev, 4) & STATUS_OUTPUT_FULL, 0);
        dev.write(4, &[0xaa]);
        assert_eq!(read(&mut dev, 4) & STATUS_OUTPUT_FULL, 1);
        assert_eq!(read(&mut dev, 0), 0x55);
        dev.write(4, &[0x60]);
        dev.write(0, &[0x47]);
        dev.write(4, &[0x20]);
        assert_eq!(read(&mut dev, 0), 0x47);
        assert!(evt.read().is_err(), "no reset from ordinary commands");
    }

    #[test]
    fn odd_sizes_and_offsets_are_harmless() {
        let (mut dev, evt) = device();
        dev.write(4, &[0xfe, 0xfe]);
        dev.write(2, &[0xfe]);
        dev.write(99, &[0xfe]);
        let mut two = [0xaa; 2];
        dev.read(4, &mut two);
        assert_eq!(two, [0, 0]);
        assert_eq!(read(&mut dev, 3), 0);
        assert!(evt.read().is_err());
        // The output queue is bounded whatever the guest sends.
        for _ in 0..100 {
            dev.write(0, &[0xff]);
        }
        assert_eq!(dev.save().output.len(), MAX_OUTPUT);
    }

    #[test]
    fn state_round_trips() {
        let (mut dev, evt) = device();
        dev.write(4, &[0xaa]);
        let json = serde_json::to_string(&dev.save()).unwrap();
        let state: I8042State = serde_json::from_str(&json).unwrap();
        let mut back = I8042::restore(evt, &state).unwrap();
        assert_eq!(read(&mut back, 0), 0x55);
    }

    #[test]
    fn sink_reads_fill_and_drops_writes() {
        let mut sink = LegacySink::new(0xff);
        sink.write(0, &[1, 2]);
        let mut d = [0u8; 4];
        sink.read(3, &mut d);
        assert_eq!(d, [0xff; 4]);
    }
}
