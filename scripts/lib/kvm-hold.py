#!/usr/bin/env python3
"""Holds two idle KVM VMs open inside the nested level's L1 while its command runs.

Under QEMU's emulated SVM, L1 sometimes hung whole while a test VM was destroyed: one CPU in
kvm_destroy_vm -> hardware_disable_all -> on_each_cpu (SVM switched off on every CPU when the
last VM goes), the other stuck in an int3 of kernel text patching (KVM flips static keys such as
apic_sw_disabled and kvm_has_noapic_vcpu when the first VM of a kind comes or the last goes).
With one VM that has an in-kernel LAPIC and one that has none held open for the whole run, the
tests' VMs never take those counts to or from zero: no SVM enable/disable IPIs and no text
patching per test VM. The VMs have no memory and their vCPUs never run.
"""

import fcntl
import os
import signal
import sys

KVM_CREATE_VM = 0xAE01
KVM_CREATE_VCPU = 0xAE41
KVM_CREATE_IRQCHIP = 0xAE60


def hold(kvm, irqchip):
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    if irqchip:
        fcntl.ioctl(vm, KVM_CREATE_IRQCHIP, 0)
    return vm, fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)


def main():
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        held = [hold(kvm, irqchip=True), hold(kvm, irqchip=False)]
    except OSError as e:
        print(f"nested: warning: cannot hold KVM VMs open ({e}); going on without", file=sys.stderr)
        return 0
    print(f"nested: holding {len(held)} idle KVM VMs open (pid {os.getpid()})", file=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
