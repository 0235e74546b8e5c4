//! Device models and the contracts they share with the VM.
//!
//! Devices never see KVM: they are driven through [`BusDevice`] accesses (from vCPU exits, or
//! from a test) and raise interrupts through an [`InterruptTrigger`] (an irqfd in a VM, a
//! counter in a test). That keeps every device testable through guest memory alone. Every
//! stateful device keeps its state as a plain serde struct and implements [`Persist`], so a
//! snapshot ([`crate::persist`]) is the serialisation of those structs plus guest memory.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;

use std::io;

use serde::{de::DeserializeOwned, Serialize};

/// A device mapped on the MMIO or port-I/O bus.
///
/// `offset` is relative to the device's base address. `data.len()` is the access size the
/// guest used (1, 2, 4 or 8); a device must tolerate any size and offset, ignoring writes and
/// returning zeroes for reads it does not support, never panicking.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Raises one interrupt line towards the guest.
pub trait InterruptTrigger: Send + Sync {
    fn trigger(&self) -> io::Result<()>;
}

/// An interrupt line backed by an eventfd registered as a KVM irqfd.
impl InterruptTrigger for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) -> io::Result<()> {
        self.write(1)
    }
}

/// A component whose state can be saved and later rebuilt in a fresh VMM process.
pub trait Persist: Sized {
    /// Plain data: no file descriptors, no pointers, no host addresses.
    type State: Serialize + DeserializeOwned;
    /// What the restore needs besides the state (guest memory, interrupt lines, backing files).
    type ConstructorArgs;
    /// Why a restore was refused.
    type Error: std::error::Error;

    /// Captures the current state. The VM is paused while this runs.
    fn save(&self) -> Self::State;

    /// Rebuilds the component from a saved state.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
