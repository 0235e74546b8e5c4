//! The x86-64 boot protocol: guest-physical layout, kernel loading, boot_params / PVH start
//! info, and the vCPU state (registers, CPUID, MSRs, LAPIC) a guest expects at its entry point.

pub mod boot;
pub mod cpuid;
pub mod elf;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
