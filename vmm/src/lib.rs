//! fnvm's virtual machine monitor.
//!
//! One VMM process runs one micro-VM. The library holds everything the process needs (guest
//! memory, the x86-64 boot protocol, vCPUs, the device models and the event loop) so that device
//! models can be tested through guest memory without KVM, and tiny guests under KVM, from the
//! same code the `fnvm-vmm` binary runs.
//!
//! Where things are: [`vmm`] runs a VM (the [`machine::Machine`] it builds, the vCPU threads,
//! the event loop); [`persist`] captures and restores a whole VM; [`api`] is the JSON-lines
//! API (wire format, server, in-process handle) and [`standby`] a VMM waiting to restore;
//! [`vstate`] holds the KVM VM and vCPUs (run loop, kick, pause, state); [`device_manager`]
//! places and wires the [`devices`]; [`snapshot`] is the snapshot directory's file format;
//! [`arch`] the x86-64 boot protocol; [`error`] the errors that reach the caller; [`confine`]
//! what the VMM does to itself before the guest runs (capabilities, seccomp per thread).
//!
//! ```no_run
//! use fnvm_vmm::arch::x86_64::boot::KernelConfig;
//! use fnvm_vmm::vmm::{Vm, VmConfig, DEFAULT_CMDLINE};
//!
//! let mut vm = Vm::new(VmConfig::new(256, 2))?; // MiB, vCPUs; console on stdout
//! vm.add_disk("rootfs.img".as_ref(), true)?; // /dev/vda, read-only
//! vm.add_vsock(3, "/run/fnvm/vm1.sock".as_ref())?;
//! vm.load_kernel(&KernelConfig {
//!     kernel: "vmlinux".into(),
//!     initrd: None,
//!     cmdline: format!("{DEFAULT_CMDLINE} root=/dev/vda ro"),
//! })?;
//! let exit = vm.run()?; // blocks until the guest resets, panics, faults, or is stopped
//! std::process::exit(exit.exit_code() as i32);
//! # Ok::<(), fnvm_vmm::error::VmError>(())
//! ```

pub mod api;
pub mod arch;
pub mod confine;
pub mod device_manager;
pub mod devices;
pub mod ending;
pub mod error;
pub mod event_loop;
pub mod exit;
pub mod host;
pub mod machine;
pub mod memory;
pub mod persist;
pub mod snapshot;
pub mod sparse_copy;
pub mod standby;
pub mod terminal;
pub mod tiny_guest;
pub mod vmm;
pub mod vstate;
