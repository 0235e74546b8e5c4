//! Guest physical memory.

/// Guest memory as every part of the VMM sees it: anonymous (or file-backed, for snapshot
/// restores) mmap regions without dirty-page tracking.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;
