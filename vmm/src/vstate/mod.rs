//! The KVM side of a micro-VM: the VM itself and its vCPUs, as the host kernel holds them.

pub mod vcpu;
pub mod vm;
