//! fnvm's virtual machine monitor.
//!
//! One VMM process runs one micro-VM. The library holds everything the process needs (guest
//! memory, the x86-64 boot protocol, vCPUs, the device models and the event loop) so that device
//! models can be tested through guest memory without KVM, and tiny guests under KVM, from the
//! same code the `fnvm-vmm` binary runs.

pub mod arch;
pub mod devices;
pub mod event_loop;
pub mod exit;
pub mod host;
pub mod memory;
pub mod state;
pub mod terminal;
pub mod vcpu;
pub mod vm;
