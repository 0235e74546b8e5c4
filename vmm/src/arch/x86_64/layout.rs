//! Fixed guest-physical addresses of the boot structures. Everything below 1 MiB except the
//! EBDA is ours to use before the guest takes over.

/// GDT and (empty) IDT used to enter 32- or 64-bit mode.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map and module list.
pub const PVH_INFO_START: u64 = 0x6000;
/// Linux `boot_params` (the "zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry (grows down from here).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, one PDPT, four page directories of 2 MiB pages (first 4 GiB).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const IDENTITY_MAPPED_GIB: u64 = 4;
/// Kernel command line (Linux's COMMAND_LINE_SIZE on x86 is 2048, including the NUL).
pub const CMDLINE_START: u64 = 0x2_0000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area: the MP table lives here; e820 RAM stops below it.
pub const EBDA_START: u64 = 0x9_fc00;
/// Where kernels are loaded and the second e820 RAM range starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// KVM's TSS (3 pages) and identity-map page (1 page) for real-mode emulation on VMX, just
/// below the 32-bit MMIO hole's top reserved area.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// IOAPIC and LAPIC MMIO bases (handled by KVM's in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// virtio-mmio device windows: 4 KiB each, from here up.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First legacy IRQ given to virtio-mmio devices (0-4 are taken by the PIT, i8042, COM ports).
pub const VIRTIO_IRQ_START: u32 = 5;
/// Last IRQ usable for devices through the PIC/IOAPIC pins we describe to the guest.
pub const VIRTIO_IRQ_END: u32 = 23;
