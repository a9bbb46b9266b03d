//! Fuzz the snapshot state-file parser with the VMM's real state type: any input gives a decoded
//! state or an error, never a panic or an unbounded allocation. Inputs with a valid header and
//! checksum around the fuzzer's bytes reach the postcard decoder itself.
#![no_main]

use hearth_snapshot::state_file::{FORMAT_VERSION, MAGIC, decode};
use hearth_vmm::persist::VmmState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let _ = decode::<VmmState>(input);
    // The same bytes as a payload behind a valid header.
    let mut file = Vec::with_capacity(32 + input.len());
    file.extend_from_slice(&MAGIC);
    file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&0u32.to_le_bytes());
    file.extend_from_slice(&(input.len() as u64).to_le_bytes());
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
    let mut d = crc.digest();
    d.update(&file);
    d.update(input);
    file.extend_from_slice(&d.finalize().to_le_bytes());
    file.extend_from_slice(input);
    let _ = decode::<VmmState>(&file);
});
