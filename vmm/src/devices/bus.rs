//! Address-range buses (port IO and MMIO) that route a vCPU's exit to the device that owns the
//! address. Built once, then shared read-only by the vCPU threads.

use std::sync::{Arc, Mutex};

/// What a device access asks of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusAction {
    /// Nothing: keep running.
    None,
    /// The guest asked for a reset (reboot): the VM ends.
    Reset,
    /// The guest powered off: the VM ends.
    PowerOff,
}

/// A device on a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write.
    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction;
}

/// A device shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Building a bus failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Two ranges overlap.
    #[error("bus range {0:#x}+{1:#x} overlaps another device")]
    Overlap(u64, u64),
    /// A zero-length or wrapping range.
    #[error("bus range {0:#x}+{1:#x} is empty or wraps")]
    BadRange(u64, u64),
}

struct Entry {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// An address-range bus.
pub struct Bus {
    entries: Vec<Entry>,
    unmapped_read: u8,
}

impl Bus {
    /// An empty bus whose unmapped reads return `unmapped_read` in every byte.
    pub fn new(unmapped_read: u8) -> Self {
        Bus {
            entries: Vec::new(),
            unmapped_read,
        }
    }

    /// Adds `device` at `base..base+len`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange(base, len))?;
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap(base, len));
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let i = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(i.checked_sub(1)?)?;
        (addr - e.base < e.len).then(|| (e, addr - e.base))
    }

    /// Routes a read; returns false (and fills `data` with the unmapped value) if nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((e, offset)) => {
                let mut dev = e.device.lock().unwrap_or_else(|p| p.into_inner());
                dev.read(offset, data);
                true
            }
            None => {
                data.fill(self.unmapped_read);
                false
            }
        }
    }

    /// Routes a write; `None` if nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<BusAction> {
        let (e, offset) = self.find(addr)?;
        let mut dev = e.device.lock().unwrap_or_else(|p| p.into_inner());
        Some(dev.write(offset, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) -> BusAction {
            self.0 = data[0];
            BusAction::None
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlaps() {
        let mut bus = Bus::new(0xff);
        bus.insert(0x10, 8, Arc::new(Mutex::new(Echo(1)))).unwrap();
        bus.insert(0x20, 2, Arc::new(Mutex::new(Echo(5)))).unwrap();
        assert!(bus.insert(0x17, 2, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus.insert(0x30, 0, Arc::new(Mutex::new(Echo(0)))).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(!bus.read(0x18, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.read(0x21, &mut b));
        assert_eq!(b[0], 6);
        assert_eq!(bus.write(0x20, &[9]), Some(BusAction::None));
        assert_eq!(bus.write(0x0, &[9]), None);
    }
}
