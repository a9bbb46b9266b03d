//! The small legacy port devices the kernel touches: the i8042 (only enough for `reboot=k`), the
//! CMOS (answers 0: 0xff costs seconds of probing), and the HW-reduced ACPI sleep/reset register.

use super::bus::{BusAction, BusDevice};
use crate::arch::layout::ACPI_RESET_VALUE;

/// i8042 data port.
pub const I8042_DATA: u64 = 0x60;
/// i8042 status/command port.
pub const I8042_CMD: u64 = 0x64;
/// CMOS index/data ports.
pub const CMOS_PORT: u64 = 0x70;

const I8042_RESET_CMD: u8 = 0xfe;
/// Status: output buffer full, input buffer empty (fast for both the boot probe and the reset).
const I8042_STATUS: u8 = 0x01;
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_S5: u8 = 5;

/// The i8042 controller, one port (0x60 or 0x64) at a time.
#[derive(Debug, Default)]
pub struct I8042 {
    command_port: bool,
}

impl I8042 {
    /// The data port (0x60).
    pub fn data() -> Self {
        I8042 {
            command_port: false,
        }
    }
    /// The status/command port (0x64).
    pub fn command() -> Self {
        I8042 { command_port: true }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(if self.command_port { I8042_STATUS } else { 0 });
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> BusAction {
        if self.command_port && data.first() == Some(&I8042_RESET_CMD) {
            BusAction::Reset
        } else {
            BusAction::None
        }
    }
}

/// CMOS/RTC: every register reads 0.
#[derive(Debug, Default)]
pub struct Cmos;

impl BusDevice for Cmos {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) -> BusAction {
        BusAction::None
    }
}

/// The FADT's sleep control and reset register (one byte port).
#[derive(Debug, Default)]
pub struct AcpiSleep;

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) -> BusAction {
        match data.first() {
            Some(&v) if v == ACPI_RESET_VALUE => BusAction::Reset,
            Some(&v) if v & SLP_EN != 0 && (v >> 2) & 0x7 == SLP_TYP_S5 => BusAction::PowerOff,
            _ => BusAction::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i8042_resets_on_0xfe_only_on_the_command_port() {
        assert_eq!(I8042::command().write(0, &[0xfe]), BusAction::Reset);
        assert_eq!(I8042::data().write(0, &[0xfe]), BusAction::None);
        let mut b = [0u8];
        I8042::command().read(0, &mut b);
        assert_eq!(b[0], 0x01);
    }

    #[test]
    fn acpi_sleep_register_decodes_s5_and_reset() {
        assert_eq!(
            AcpiSleep.write(0, &[SLP_EN | (5 << 2)]),
            BusAction::PowerOff
        );
        assert_eq!(AcpiSleep.write(0, &[ACPI_RESET_VALUE]), BusAction::Reset);
        assert_eq!(AcpiSleep.write(0, &[SLP_EN | (3 << 2)]), BusAction::None);
    }
}
