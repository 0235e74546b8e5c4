//! Address-range dispatch of guest port-I/O and MMIO accesses to device models.
//!
//! A bus is filled before the vCPUs start and is read-only afterwards, so vCPU threads share it
//! through an `Arc` without a lock; each device has its own mutex.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::BusDevice;

/// A device shared between the bus and whoever else drives it (the event loop, tests).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A device's bus range is empty or wraps around the end of the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
    /// A device's bus range overlaps another device's.
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other_base:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
}

struct Entry {
    len: u64,
    device: SharedDevice,
}

/// Non-overlapping address ranges, each mapped to one device.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|(b, e)| (*b, e.len)))
            .finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `base..base+len` to `device`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = match base.checked_add(len) {
            Some(end) if len > 0 => end,
            _ => return Err(BusError::BadRange { base, len }),
        };
        // The closest range starting below `end` is the only one that can overlap.
        if let Some((&other_base, other)) = self.ranges.range(..end).next_back() {
            if other_base + other.len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len: other.len,
                });
            }
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device and the offset inside it for an access of `size` bytes at `addr`; `None` when
    /// the access is not entirely inside one device's range.
    fn resolve(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let (&base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= entry.len).then_some((entry, offset))
    }

    /// Reads from the device at `addr`. Returns false (and fills `data` with `fill`) when no
    /// device covers the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8], fill: u8) -> bool {
        match self.resolve(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => {
                data.fill(fill);
                false
            }
        }
    }

    /// Writes to the device at `addr`. Returns false (the write is dropped) when no device
    /// covers the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device even if another thread panicked while holding it: device models keep their
/// state consistent per access, and a VMM that stops serving I/O would hang the guest.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records accesses and answers reads with the offset's low byte.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn bus_with(base: u64, len: u64) -> (Bus, Arc<Mutex<Recorder>>) {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(base, len, dev.clone()).unwrap();
        (bus, dev)
    }

    #[test]
    fn accesses_reach_the_device_with_relative_offsets() {
        let (bus, dev) = bus_with(0x1000, 0x10);
        let mut data = [0u8; 4];
        assert!(bus.read(0x1004, &mut data, 0xff));
        assert_eq!(data, [4; 4]);
        assert!(bus.write(0x100c, &[1, 2, 3, 4]));
        assert_eq!(dev.lock().unwrap().writes, vec![(0xc, vec![1, 2, 3, 4])]);
    }

    #[test]
    fn accesses_outside_or_straddling_the_range_are_unmapped() {
        let (bus, dev) = bus_with(0x1000, 0x10);
        let mut data = [0u8; 4];
        assert!(!bus.read(0xfff, &mut data, 0xff), "below the range");
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.read(0x1010, &mut data, 0), "just past the end");
        assert_eq!(data, [0; 4]);
        assert!(!bus.read(0x100e, &mut data, 0xff), "straddles the end");
        assert!(!bus.write(0x100d, &[0; 4]), "straddles the end");
        assert!(!bus.write(u64::MAX, &[0; 8]), "wraps around");
        assert!(dev.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let (mut bus, dev) = bus_with(0x1000, 0x10);
        let overlap = bus.insert(0x100f, 1, dev.clone()).unwrap_err();
        assert!(matches!(overlap, BusError::Overlap { .. }));
        assert!(bus.insert(0xff0, 0x11, dev.clone()).is_err());
        assert!(matches!(
            bus.insert(0x2000, 0, dev.clone()),
            Err(BusError::BadRange { .. })
        ));
        assert!(bus.insert(u64::MAX, 2, dev.clone()).is_err());
        // Adjacent ranges are fine.
        bus.insert(0x1010, 0x10, dev.clone()).unwrap();
        bus.insert(0xff0, 0x10, dev).unwrap();
    }
}
