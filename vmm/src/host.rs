//! Can this host run a guest? /dev/kvm is enough for tiny guests, but a stock Linux guest
//! kernel needs hardware virtualization (VMX or SVM): under a software KVM such as KVM-PVM, or
//! nested virtualization without VMX/SVM exposed, Linux guests crawl and crash.

use std::path::Path;

use crate::arch::x86_64::boot::KernelFormat;

/// What the host offers for running micro-VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCapabilities {
    /// /dev/kvm exists.
    pub kvm: bool,
    /// /proc/cpuinfo lists `vmx` (Intel VT-x) or `svm` (AMD-V).
    pub hardware_virtualization: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostError {
    /// The host has no /dev/kvm, so it cannot run micro-VMs.
    #[error("/dev/kvm does not exist: this host cannot run micro-VMs (load the kvm module, or use the process sandbox)")]
    NoKvm,
    /// The host's KVM has no hardware virtualization, so stock Linux guest kernels cannot run.
    #[error(
        "this host's /dev/kvm has no hardware virtualization (no vmx/svm flag in /proc/cpuinfo; \
         e.g. KVM-PVM, or nested virtualization without VMX/SVM), so stock Linux guest kernels \
         cannot run here; use the process sandbox (--sandbox process) to run functions on this host"
    )]
    NoHardwareVirtualization,
}

/// Whether a /proc/cpuinfo text shows VMX or SVM on any CPU.
pub fn cpuinfo_has_hardware_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

impl HostCapabilities {
    /// Reads /dev/kvm and /proc/cpuinfo.
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self {
            kvm: Path::new("/dev/kvm").exists(),
            hardware_virtualization: cpuinfo_has_hardware_virtualization(&cpuinfo),
        }
    }

    /// Refuses at once what cannot work: no KVM at all, or a Linux kernel without VMX/SVM.
    /// Non-Linux (tiny) guests are allowed on any KVM.
    pub fn check_can_boot(&self, kernel: KernelFormat) -> Result<(), HostError> {
        if !self.kvm {
            return Err(HostError::NoKvm);
        }
        if kernel.is_linux() && !self.hardware_virtualization {
            return Err(HostError::NoHardwareVirtualization);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_flags_are_read() {
        assert!(cpuinfo_has_hardware_virtualization(
            "processor : 0\nflags\t\t: fpu vme vmx sse\n"
        ));
        assert!(cpuinfo_has_hardware_virtualization("flags : svm lm\n"));
        assert!(!cpuinfo_has_hardware_virtualization(
            "flags : fpu hypervisor lm\nvmx flags : ept\n"
        ));
    }

    #[test]
    fn linux_needs_vmx_or_svm_but_tiny_guests_do_not() {
        let pvm = HostCapabilities {
            kvm: true,
            hardware_virtualization: false,
        };
        let err = pvm.check_can_boot(KernelFormat::BzImage).unwrap_err();
        assert_eq!(err, HostError::NoHardwareVirtualization);
        assert!(err.to_string().contains("process sandbox"));
        let vmlinux = KernelFormat::Elf {
            linux: true,
            pvh_entry: None,
        };
        assert!(pvm.check_can_boot(vmlinux).is_err());
        let tiny = KernelFormat::Elf {
            linux: false,
            pvh_entry: Some(0x10_0000),
        };
        assert!(pvm.check_can_boot(tiny).is_ok());
        let no_kvm = HostCapabilities {
            kvm: false,
            hardware_virtualization: true,
        };
        assert_eq!(no_kvm.check_can_boot(tiny), Err(HostError::NoKvm));
    }
}
