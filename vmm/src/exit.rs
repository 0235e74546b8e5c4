//! How a VM ended, where the first ending is reported ([`ExitSlot`]), and the `fnvm-vmm`
//! process exit code for each ending.

use std::io;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::lock;

/// Process exit codes of `fnvm-vmm` (documented in its `--help`).
pub mod code {
    /// The guest shut down or rebooted itself (i8042 reset, ACPI/PSCI-style system event).
    pub const CLEAN: u8 = 0;
    /// The VMM failed at run time (I/O error, event loop failure).
    pub const VMM_ERROR: u8 = 1;
    /// Bad input: arguments, kernel, memory size, vCPU count, disk; nothing was run.
    pub const BAD_INPUT: u8 = 2;
    /// The guest kernel panicked.
    pub const GUEST_PANIC: u8 = 3;
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    pub const TRIPLE_FAULT: u8 = 4;
    /// KVM_EXIT_INTERNAL_ERROR (e.g. an instruction KVM could not emulate), an unhandled exit,
    /// or KVM_RUN itself failing.
    pub const INTERNAL_ERROR: u8 = 5;
    /// KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest.
    pub const FAIL_ENTRY: u8 = 6;
    /// A vCPU executed HLT with no in-kernel irqchip to wake it (KVM_EXIT_HLT).
    pub const HALTED: u8 = 7;
    /// The VMM was asked to stop (SIGTERM/SIGINT, or a stop request through the API).
    pub const STOPPED: u8 = 8;
    /// A VMM thread made a system call outside its seccomp allow-list
    /// ([`crate::confine`]): the VMM stopped at once.
    pub const SECCOMP_VIOLATION: u8 = 9;
}

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmExit {
    /// The guest asked for a reset (i8042 0xFE, or a KVM reset system event).
    GuestReset,
    /// The guest powered off (KVM shutdown system event).
    GuestShutdown,
    /// The guest kernel panicked; `message` is the panic line from the console.
    GuestPanic { message: String },
    /// A vCPU triple-faulted.
    TripleFault { vcpu: u8 },
    /// A vCPU halted and nothing can wake it (no in-kernel irqchip).
    Halted { vcpu: u8 },
    /// The CPU refused VM entry.
    FailEntry {
        vcpu: u8,
        reason: u64,
        host_cpu: u32,
    },
    /// KVM could not handle something the guest did.
    InternalError {
        vcpu: u8,
        suberror: u32,
        data: Vec<u64>,
    },
    /// KVM_RUN failed or returned an exit the VMM does not handle.
    VcpuError { vcpu: u8, error: String },
    /// Stopped from the host side.
    Stopped,
}

impl VmExit {
    /// The guest ended itself on purpose.
    pub fn is_clean(&self) -> bool {
        matches!(self, VmExit::GuestReset | VmExit::GuestShutdown)
    }

    /// The `fnvm-vmm` exit code for this ending.
    pub fn exit_code(&self) -> u8 {
        match self {
            VmExit::GuestReset | VmExit::GuestShutdown => code::CLEAN,
            VmExit::GuestPanic { .. } => code::GUEST_PANIC,
            VmExit::TripleFault { .. } => code::TRIPLE_FAULT,
            VmExit::Halted { .. } => code::HALTED,
            VmExit::FailEntry { .. } => code::FAIL_ENTRY,
            VmExit::InternalError { .. } | VmExit::VcpuError { .. } => code::INTERNAL_ERROR,
            VmExit::Stopped => code::STOPPED,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::GuestReset => write!(f, "guest reset (clean shutdown)"),
            VmExit::GuestShutdown => write!(f, "guest powered off (clean shutdown)"),
            VmExit::GuestPanic { message } => write!(f, "guest kernel panic: {message}"),
            VmExit::TripleFault { vcpu } => write!(f, "triple fault on vCPU {vcpu}"),
            VmExit::Halted { vcpu } => write!(f, "vCPU {vcpu} halted"),
            VmExit::FailEntry {
                vcpu,
                reason,
                host_cpu,
            } => write!(
                f,
                "VM entry failed on vCPU {vcpu} (hardware reason {reason:#x}, host CPU {host_cpu})"
            ),
            VmExit::InternalError {
                vcpu,
                suberror,
                data,
            } => write!(
                f,
                "KVM internal error on vCPU {vcpu} (suberror {suberror}, data {data:x?})"
            ),
            VmExit::VcpuError { vcpu, error } => write!(f, "vCPU {vcpu} error: {error}"),
            VmExit::Stopped => write!(f, "stopped by the host"),
        }
    }
}

/// Where a VM-ending exit is reported: the first report wins, later ones (other vCPUs being
/// stopped) are ignored, and the event loop is woken through `event`.
pub struct ExitSlot {
    status: Mutex<Option<VmExit>>,
    event: EventFd,
}

impl ExitSlot {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: Mutex::new(None),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn report(&self, exit: VmExit) {
        let mut status = lock(&self.status);
        if status.is_none() {
            tracing::debug!("VM exit reported: {exit}");
            *status = Some(exit);
            let _ = self.event.write(1);
        }
    }

    pub fn take(&self) -> Option<VmExit> {
        lock(&self.status).take()
    }

    pub fn peek(&self) -> Option<VmExit> {
        lock(&self.status).clone()
    }

    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

/// The message of a caught panic, for the exit status that reports it.
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ending_has_its_own_code() {
        let exits = [
            VmExit::GuestPanic {
                message: "x".into(),
            },
            VmExit::TripleFault { vcpu: 0 },
            VmExit::Halted { vcpu: 0 },
            VmExit::FailEntry {
                vcpu: 0,
                reason: 0,
                host_cpu: 0,
            },
            VmExit::InternalError {
                vcpu: 0,
                suberror: 1,
                data: vec![],
            },
            VmExit::Stopped,
        ];
        let mut codes: Vec<u8> = exits.iter().map(|e| e.exit_code()).collect();
        codes.push(VmExit::GuestReset.exit_code());
        codes.push(code::BAD_INPUT);
        codes.push(code::VMM_ERROR);
        let n = codes.len();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), n, "exit codes must be distinct");
        assert!(VmExit::GuestShutdown.is_clean());
        assert_eq!(VmExit::GuestShutdown.exit_code(), 0);
    }
}
