//! The state file: a fixed header, then the postcard-encoded state of the VM.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "HEARTHSN"
//!      8     4  format version, u32 LE (FORMAT_VERSION; not the release version)
//!     12     4  flags, u32 LE (0; anything else is refused)
//!     16     8  payload length, u64 LE (the rest of the file, exactly)
//!     24     8  CRC-64/XZ over bytes 0..24 and the payload, u64 LE
//!     32     -  payload: the state, postcard
//! ```
//!
//! A file is read through one descriptor, its size checked against [`MAX_STATE_FILE`] before
//! anything is allocated, then the header, the length and the checksum are checked before the
//! payload is decoded; the payload must decode with no bytes left over.

use crc::{CRC_64_XZ, Crc, Table};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The first 8 bytes of every state file.
pub const MAGIC: [u8; 8] = *b"HEARTHSN";
/// The version of the layout and of the encoded state. Bump it on any change to either.
pub const FORMAT_VERSION: u32 = 3;
/// The header's size.
pub const HEADER_LEN: usize = 32;
/// The largest state file accepted (the state of 8 vCPUs and the devices is well under 1 MiB).
pub const MAX_STATE_FILE: u64 = 16 << 20;

pub(crate) const CRC64: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_XZ);

/// A state file could not be written or is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The state could not be encoded.
    #[error("cannot encode the VM state")]
    Encode(#[source] postcard::Error),
    /// The file could not be created or written.
    #[error("cannot write the state file {0}")]
    Write(PathBuf, #[source] std::io::Error),
    /// The file could not be opened or read.
    #[error("cannot read the state file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The file is not a regular file.
    #[error("the state file {0} is not a regular file")]
    NotRegular(PathBuf),
    /// Another user than this one or root owns it, or others may write it.
    #[error("the state file {0} is not acceptable")]
    Permissions(PathBuf, #[source] crate::access::AccessError),
    /// The file is larger than [`MAX_STATE_FILE`].
    #[error("the state file is {0} bytes, more than the {MAX_STATE_FILE}-byte limit")]
    TooLarge(u64),
    /// The file is shorter than its header.
    #[error("the state file is truncated: {0} bytes, shorter than its {HEADER_LEN}-byte header")]
    Truncated(usize),
    /// The file does not start with [`MAGIC`].
    #[error("not a Hearth snapshot state file (bad magic number)")]
    BadMagic,
    /// The file was written in another format version.
    #[error(
        "snapshot format version {found} is not supported (this build reads version {FORMAT_VERSION})"
    )]
    Version {
        /// The version in the file.
        found: u32,
    },
    /// Flags this build does not know.
    #[error("the state file has unknown flags {0:#x}")]
    Flags(u32),
    /// The payload length in the header is not the rest of the file.
    #[error(
        "the state file is truncated or extended: the header says {declared} payload bytes, the file has {actual}"
    )]
    Length {
        /// Bytes the header declares.
        declared: u64,
        /// Bytes after the header.
        actual: u64,
    },
    /// The checksum does not match: the file is corrupted.
    #[error("the state file is corrupted: checksum {found:#018x}, expected {expected:#018x}")]
    Checksum {
        /// Computed over the file.
        found: u64,
        /// Stored in the header.
        expected: u64,
    },
    /// The payload does not decode as the state.
    #[error("the state file's payload does not decode")]
    Decode(#[source] postcard::Error),
    /// The payload decoded with bytes left over.
    #[error("the state file's payload has {0} bytes after the state")]
    TrailingBytes(usize),
}

/// Encodes `state` as a whole state file.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, StateFileError> {
    let payload = postcard::to_allocvec(state).map_err(StateFileError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut digest = CRC64.digest();
    digest.update(&out);
    digest.update(&payload);
    out.extend_from_slice(&digest.finalize().to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Checks and decodes a whole state file.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StateFileError> {
    if bytes.len() as u64 > MAX_STATE_FILE {
        return Err(StateFileError::TooLarge(bytes.len() as u64));
    }
    if bytes.len() < HEADER_LEN {
        // A prefix of the magic is still "not ours" unless it matches.
        if !MAGIC.starts_with(&bytes[..bytes.len().min(MAGIC.len())]) {
            return Err(StateFileError::BadMagic);
        }
        return Err(StateFileError::Truncated(bytes.len()));
    }
    if bytes[..8] != MAGIC {
        return Err(StateFileError::BadMagic);
    }
    let version = u32_at(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(StateFileError::Version { found: version });
    }
    let flags = u32_at(bytes, 12);
    if flags != 0 {
        return Err(StateFileError::Flags(flags));
    }
    let declared = u64_at(bytes, 16);
    let payload = &bytes[HEADER_LEN..];
    if declared != payload.len() as u64 {
        return Err(StateFileError::Length {
            declared,
            actual: payload.len() as u64,
        });
    }
    let expected = u64_at(bytes, 24);
    let started = std::time::Instant::now();
    let mut digest = CRC64.digest();
    digest.update(&bytes[..24]);
    digest.update(payload);
    let found = digest.finalize();
    if found != expected {
        return Err(StateFileError::Checksum { found, expected });
    }
    let checked = started.elapsed();
    let (state, rest) = postcard::take_from_bytes(payload).map_err(StateFileError::Decode)?;
    tracing::debug!(
        bytes = bytes.len(),
        checksum_us = checked.as_micros() as u64,
        decode_us = (started.elapsed() - checked).as_micros() as u64,
        "state file decoded"
    );
    if !rest.is_empty() {
        return Err(StateFileError::TrailingBytes(rest.len()));
    }
    Ok(state)
}

/// Writes `state` to `path` (mode [`crate::access::FILE_MODE`], replaced whole: see
/// `replace_with`); returns the file's size.
pub fn write<T: Serialize>(path: &Path, state: &T) -> Result<u64, StateFileError> {
    let bytes = encode(state)?;
    replace_with(path, |file| file.write_all(&bytes))
        .map_err(|e| StateFileError::Write(path.to_path_buf(), e))?;
    Ok(bytes.len() as u64)
}

/// Writes a new file next to `path` with `fill`, then renames it onto `path`: a reader sees the
/// old file or the whole new one, and a file still mapped (a VM restored from it) is never
/// truncated under its mapping. Returns the new file, still open.
pub(crate) fn replace_with(
    path: &Path,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> std::io::Result<File> {
    let mut name = path
        .file_name()
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?
        .to_os_string();
    name.push(".partial");
    let partial = path.with_file_name(name);
    let result = crate::access::create(&partial).and_then(|mut file| {
        fill(&mut file)?;
        std::fs::rename(&partial, path)?;
        Ok(file)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Reads and checks the state file at `path` through one descriptor.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, StateFileError> {
    let io = |e| StateFileError::Read(path.to_path_buf(), e);
    let file = File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(StateFileError::NotRegular(path.to_path_buf()));
    }
    crate::access::check(&meta).map_err(|e| StateFileError::Permissions(path.to_path_buf(), e))?;
    if meta.len() > MAX_STATE_FILE {
        return Err(StateFileError::TooLarge(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // One byte more than the cap: a file that grows after the fstat is still caught.
    file.take(MAX_STATE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    decode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Sample {
        a: u64,
        b: Vec<u8>,
        c: Option<String>,
    }

    fn sample() -> Sample {
        Sample {
            a: 7,
            b: vec![1, 2, 3],
            c: Some("vcpu".into()),
        }
    }

    #[test]
    fn round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let n = write(&path, &sample()).unwrap();
        assert_eq!(n, std::fs::metadata(&path).unwrap().len());
        assert_eq!(read::<Sample>(&path).unwrap(), sample());
    }

    #[test]
    fn each_kind_of_damage_has_its_error() {
        let good = encode(&sample()).unwrap();
        let mut bad_magic = good.clone();
        bad_magic[0] ^= 1;
        assert!(matches!(
            decode::<Sample>(&bad_magic),
            Err(StateFileError::BadMagic)
        ));
        let mut version = good.clone();
        version[8..12].copy_from_slice(&9u32.to_le_bytes());
        let err = decode::<Sample>(&version).unwrap_err();
        assert!(matches!(err, StateFileError::Version { found: 9 }), "{err}");
        assert!(err.to_string().contains("version 9"));
        let mut flags = good.clone();
        flags[12] = 1;
        assert!(matches!(
            decode::<Sample>(&flags),
            Err(StateFileError::Flags(1))
        ));
        let truncated = &good[..good.len() - 1];
        assert!(matches!(
            decode::<Sample>(truncated),
            Err(StateFileError::Length { .. })
        ));
        assert!(matches!(
            decode::<Sample>(&good[..10]),
            Err(StateFileError::Truncated(10))
        ));
        let mut extended = good.clone();
        extended.push(0);
        assert!(matches!(
            decode::<Sample>(&extended),
            Err(StateFileError::Length { .. })
        ));
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert!(matches!(
            decode::<Sample>(&flipped),
            Err(StateFileError::Checksum { .. })
        ));
        // A payload of another type, with a valid checksum: it fails to decode, or leaves bytes.
        let other = encode(&(1u8, 2u8, 3u8, 4u8, 5u8, 6u8, 7u8, 8u8)).unwrap();
        assert!(decode::<Sample>(&other).is_err());
        let trailing = encode(&(7u64, 0u8, 0u8, 0u8)).unwrap();
        assert!(decode::<u64>(&trailing).is_err());
    }

    #[test]
    fn a_rewrite_replaces_the_file_and_leaves_nothing_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        write(&path, &sample()).unwrap();
        let before = std::fs::File::open(&path).unwrap();
        let mut other = sample();
        other.a = 9;
        write(&path, &other).unwrap();
        assert_eq!(read::<Sample>(&path).unwrap(), other);
        // The old file is untouched under an open descriptor.
        assert_eq!(
            before.metadata().unwrap().len(),
            encode(&sample()).unwrap().len() as u64
        );
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        assert!(write(&dir.path().join("missing/state"), &other).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn the_file_is_readable_by_all_and_only_root_or_this_users_is_read() {
        use crate::access::TestRead;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        write(&path, &sample()).unwrap();
        crate::access::check_owner_and_mode_rules(&path, |p| match read::<Sample>(p) {
            Ok(s) if s == sample() => TestRead::Read,
            Err(StateFileError::Permissions(..)) => TestRead::Refused,
            other => panic!("unexpected: {other:?}"),
        });
    }

    #[test]
    fn oversized_files_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let f = File::create(&path).unwrap();
        f.set_len(MAX_STATE_FILE + 1).unwrap();
        assert!(matches!(
            read::<Sample>(&path),
            Err(StateFileError::TooLarge(_))
        ));
        assert!(matches!(
            read::<Sample>(dir.path()),
            Err(StateFileError::NotRegular(_) | StateFileError::Read(..))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Sample>(&bytes);
        }

        #[test]
        fn any_single_byte_change_is_refused(at in 0usize..64, bit in 0u8..8) {
            let good = encode(&sample()).unwrap();
            let mut bad = good.clone();
            let at = at % bad.len();
            bad[at] ^= 1 << bit;
            prop_assert!(decode::<Sample>(&bad).is_err());
        }

        #[test]
        fn any_truncation_is_refused(len in 0usize..64) {
            let good = encode(&sample()).unwrap();
            let len = len % good.len();
            prop_assert!(decode::<Sample>(&good[..len]).is_err());
        }

        #[test]
        fn valid_header_with_random_payload_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            // Build a file whose header and checksum are right, so the decoder itself is tested.
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC);
            out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            let mut d = CRC64.digest();
            d.update(&out);
            d.update(&payload);
            out.extend_from_slice(&d.finalize().to_le_bytes());
            out.extend_from_slice(&payload);
            let _ = decode::<Sample>(&out);
        }
    }
}
