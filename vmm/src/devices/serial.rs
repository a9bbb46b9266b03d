//! The 8250 serial console (COM1 at 0x3f8, GSI 4): vm-superio's UART, its interrupt through an
//! eventfd registered as an irqfd, its output to a log file bounded in size.

use super::bus::{BusAction, BusDevice};
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1's port.
pub const COM1_PORT: u64 = 0x3f8;
/// Ports the UART decodes.
pub const COM1_LEN: u64 = 8;

/// Setting up the serial console failed.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The log file could not be created.
    #[error("cannot create the serial log {0}")]
    CreateLog(std::path::PathBuf, #[source] io::Error),
    /// The interrupt eventfd could not be created.
    #[error("cannot create the serial interrupt eventfd")]
    EventFd(#[source] io::Error),
    /// The saved state is not one a UART can be in.
    #[error("the snapshot's serial state is invalid: {0}")]
    State(String),
}

/// The saved state of the UART (its registers and receive FIFO).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialPersist {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// An eventfd as the UART's interrupt line.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A writer that keeps at most `cap` bytes and drops the rest.
pub struct BoundedLog {
    file: Option<File>,
    written: u64,
    cap: u64,
}

impl BoundedLog {
    /// A log to `path` (truncated), or a sink when `path` is `None`.
    pub fn create(path: Option<&Path>, cap: u64) -> Result<Self, SerialError> {
        let file = match path {
            Some(p) => {
                Some(File::create(p).map_err(|e| SerialError::CreateLog(p.to_path_buf(), e))?)
            }
            None => None,
        };
        Ok(BoundedLog {
            file,
            written: 0,
            cap,
        })
    }

    /// Bytes kept so far.
    pub fn written(&self) -> u64 {
        self.written
    }
}

impl Write for BoundedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.cap.saturating_sub(self.written);
        let keep = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if keep > 0 {
            if let Some(f) = self.file.as_mut() {
                // A failing log must not stop the guest: the bytes are dropped.
                if f.write_all(&buf[..keep]).is_err() {
                    self.file = None;
                }
            }
            self.written += keep as u64;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The COM1 device on the port-IO bus.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, BoundedLog>,
}

impl SerialDevice {
    /// A UART writing to `log`; returns it and a clone of its interrupt eventfd (for the irqfd).
    pub fn new(log: BoundedLog) -> Result<(Self, EventFd), SerialError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let irq = evt.try_clone().map_err(SerialError::EventFd)?;
        Ok((
            SerialDevice {
                uart: Serial::new(IrqTrigger(evt), log),
            },
            irq,
        ))
    }
}

impl SerialDevice {
    /// The UART's state.
    pub fn save(&self) -> SerialPersist {
        let s = self.uart.state();
        SerialPersist {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in `state`, writing to `log`; returns it and its interrupt eventfd.
    pub fn restore(log: BoundedLog, state: &SerialPersist) -> Result<(Self, EventFd), SerialError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let irq = evt.try_clone().map_err(SerialError::EventFd)?;
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&s, IrqTrigger(evt), vm_superio::serial::NoEvents, log)
            .map_err(|e| SerialError::State(format!("{e:?}")))?;
        Ok((SerialDevice { uart }, irq))
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        if data.len() == 1
            && let Err(e) = self.uart.write(offset as u8, data[0])
        {
            crate::limited_warn!(error = ?e, "serial write failed");
        }
        BusAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_stops_at_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let log = BoundedLog::create(Some(&path), 10).unwrap();
        let (mut dev, irq) = SerialDevice::new(log).unwrap();
        for b in b"hello, world, this is long" {
            dev.write(0, &[*b]);
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"hello, wor");
        // THR empty interrupt is off by default, so no interrupt yet; enabling it raises one.
        dev.write(1, &[0x02]);
        assert_eq!(irq.read().unwrap(), 1);
    }

    #[test]
    fn state_round_trips_and_a_bad_fifo_is_refused() {
        let (mut dev, _irq) = SerialDevice::new(BoundedLog::create(None, 0).unwrap()).unwrap();
        dev.write(3, &[0x03]); // line control: 8 bits
        dev.write(7, &[0x5a]); // scratch
        let state = dev.save();
        let (back, _irq) =
            SerialDevice::restore(BoundedLog::create(None, 0).unwrap(), &state).unwrap();
        assert_eq!(back.save(), state);
        let mut bad = state;
        bad.in_buffer = vec![0; 1000];
        assert!(matches!(
            SerialDevice::restore(BoundedLog::create(None, 0).unwrap(), &bad),
            Err(SerialError::State(_))
        ));
    }
}
