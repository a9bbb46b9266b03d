//! The uncompressed kernel (`vmlinux`, an ELF file) taken out of a bzImage.
//!
//! A bzImage carries the kernel compressed, with a small decompressor in front. Booting it makes
//! the guest decompress and relocate itself: in the QEMU test host that is seconds of guest time
//! and some 80 MiB of guest memory touched before the kernel prints its first line (measured:
//! ~21,000 nested page faults). Booting the ELF directly (as Firecracker does) skips all of that,
//! so `hearth image` extracts it once into the cache and the VMM loads it.
//!
//! Debian's cloud kernel compresses its payload with LZ4 in the "legacy" frame format that the
//! kernel's own `unlz4` reads: a magic number, then blocks (a little-endian `u32` compressed length
//! and the block, each inflating to at most 8 MiB), and at the very end the little-endian `u32`
//! size of the whole uncompressed payload. Everything here is checked: a bad header, a block that
//! runs past the end, a block that inflates wrong, a size that disagrees, or a result that is not
//! an ELF file is an error, never a panic.

/// The bzImage header's magic, `HdrS`, at offset 0x202.
const SETUP_MAGIC: u32 = 0x5372_6448;
/// The LZ4 legacy frame magic.
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// The most one legacy block inflates to.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// The largest kernel accepted (the uncompressed payload).
pub const MAX_VMLINUX: usize = 512 << 20;

/// A bzImage whose kernel could not be extracted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmlinuxError {
    /// The file is too short or lacks the `HdrS` setup header.
    #[error("not a bzImage: {0}")]
    NotBzImage(&'static str),
    /// The boot protocol predates the payload fields (2.08).
    #[error("the bzImage's boot protocol {0:#x} has no payload fields (2.08 or later needed)")]
    OldProtocol(u16),
    /// The payload lies outside the file.
    #[error("the payload ({offset} + {length} bytes) lies outside the {file} byte file")]
    PayloadOutside { offset: u64, length: u64, file: u64 },
    /// The payload is not LZ4 (legacy format); the magic found is given.
    #[error(
        "the payload is not LZ4-compressed (magic {0:02x?}); only LZ4 kernels can be extracted"
    )]
    NotLz4([u8; 4]),
    /// A block's length runs past the payload.
    #[error("LZ4 block at payload offset {offset} claims {length} bytes; only {left} remain")]
    BlockOutside {
        offset: usize,
        length: usize,
        left: usize,
    },
    /// A block does not inflate.
    #[error("LZ4 block at payload offset {offset} is corrupt: {reason}")]
    BadBlock { offset: usize, reason: String },
    /// The kernel is larger than [`MAX_VMLINUX`].
    #[error("the uncompressed kernel is larger than {MAX_VMLINUX} bytes")]
    TooLarge,
    /// The trailing size disagrees with what the blocks inflated to.
    #[error("the payload inflated to {actual} bytes but says {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    /// The result is not a 64-bit little-endian ELF file.
    #[error("the extracted kernel is not a 64-bit ELF file")]
    NotElf,
}

/// Extracts the ELF kernel from a bzImage's bytes.
pub fn extract(bzimage: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let payload = payload(bzimage)?;
    let vmlinux = unlz4_legacy(payload)?;
    if vmlinux.len() < 64 || &vmlinux[..4] != b"\x7fELF" || vmlinux[4] != 2 || vmlinux[5] != 1 {
        return Err(VmlinuxError::NotElf);
    }
    Ok(vmlinux)
}

/// Whether `head` starts like an ELF file.
pub fn is_elf(head: &[u8]) -> bool {
    head.starts_with(b"\x7fELF")
}

/// The compressed payload of a bzImage (boot protocol 2.08+: `payload_offset` and
/// `payload_length`, counted from the end of the setup sectors).
fn payload(image: &[u8]) -> Result<&[u8], VmlinuxError> {
    let u16_at = |off: usize| -> Option<u16> {
        image
            .get(off..off + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |off: usize| -> Option<u32> {
        image
            .get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let magic = u32_at(0x202).ok_or(VmlinuxError::NotBzImage("shorter than its header"))?;
    if magic != SETUP_MAGIC {
        return Err(VmlinuxError::NotBzImage("no HdrS setup header"));
    }
    let version = u16_at(0x206).ok_or(VmlinuxError::NotBzImage("shorter than its header"))?;
    if version < 0x0208 {
        return Err(VmlinuxError::OldProtocol(version));
    }
    let setup_sects = match image.get(0x1f1) {
        Some(0) => 4,
        Some(n) => u64::from(*n),
        None => return Err(VmlinuxError::NotBzImage("shorter than its header")),
    };
    let offset = u32_at(0x248).ok_or(VmlinuxError::NotBzImage("shorter than its header"))?;
    let length = u32_at(0x24c).ok_or(VmlinuxError::NotBzImage("shorter than its header"))?;
    let start = (setup_sects + 1) * 512 + u64::from(offset);
    let end = start + u64::from(length);
    let file = image.len() as u64;
    if end > file {
        return Err(VmlinuxError::PayloadOutside {
            offset: start,
            length: u64::from(length),
            file,
        });
    }
    // Both bounds are within the slice, checked above.
    Ok(&image[start as usize..end as usize])
}

/// Inflates an LZ4 legacy stream as the kernel's `unlz4` does, with the trailing size check.
fn unlz4_legacy(data: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let word = |off: usize| -> Option<u32> {
        data.get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    match word(0) {
        Some(LZ4_LEGACY_MAGIC) => {}
        _ => {
            let mut found = [0u8; 4];
            let n = data.len().min(4);
            found[..n].copy_from_slice(&data[..n]);
            return Err(VmlinuxError::NotLz4(found));
        }
    }
    let mut out: Vec<u8> = Vec::new();
    let mut pos = 4;
    loop {
        let Some(length) = word(pos) else {
            return Err(VmlinuxError::BadBlock {
                offset: pos,
                reason: "the stream ends without its size".into(),
            });
        };
        let left = data.len() - pos - 4;
        if length == LZ4_LEGACY_MAGIC {
            // Concatenated streams: another magic starts a new one.
            pos += 4;
            continue;
        }
        let length = length as usize;
        if left == 0 {
            // The last word is the size of the whole uncompressed payload.
            let expected = u64::from(length as u32);
            if expected != out.len() as u64 {
                return Err(VmlinuxError::SizeMismatch {
                    expected,
                    actual: out.len() as u64,
                });
            }
            return Ok(out);
        }
        if length > left {
            return Err(VmlinuxError::BlockOutside {
                offset: pos,
                length,
                left,
            });
        }
        let block = &data[pos + 4..pos + 4 + length];
        let start = out.len();
        if start + LZ4_LEGACY_BLOCK > MAX_VMLINUX {
            return Err(VmlinuxError::TooLarge);
        }
        out.resize(start + LZ4_LEGACY_BLOCK, 0);
        let written = lz4_flex::block::decompress_into(block, &mut out[start..]).map_err(|e| {
            VmlinuxError::BadBlock {
                offset: pos,
                reason: e.to_string(),
            }
        })?;
        out.truncate(start + written);
        pos += 4 + length;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal bzImage around `payload`: one setup sector plus the boot sector, protocol 2.15.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; 1024];
        image[0x1f1] = 1;
        image[0x202..0x206].copy_from_slice(&SETUP_MAGIC.to_le_bytes());
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend_from_slice(&[0xcc; 16]);
        image.extend_from_slice(payload);
        image.extend_from_slice(&[0xdd; 32]);
        image
    }

    fn lz4_legacy(data: &[u8], block: usize) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(block) {
            let c = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(&c);
        }
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    fn fake_elf(len: usize) -> Vec<u8> {
        let mut elf = vec![0u8; len];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        for (i, b) in elf.iter_mut().enumerate().skip(64) {
            *b = (i % 251) as u8;
        }
        elf
    }

    #[test]
    fn extracts_a_multi_block_kernel() {
        let elf = fake_elf(3 * 4096 + 17);
        let image = bzimage(&lz4_legacy(&elf, 4096));
        assert_eq!(extract(&image).unwrap(), elf);
    }

    #[test]
    fn refuses_what_is_not_a_bzimage_or_not_lz4() {
        assert_eq!(
            extract(b"short"),
            Err(VmlinuxError::NotBzImage("shorter than its header"))
        );
        let mut image = bzimage(&lz4_legacy(&fake_elf(100), 4096));
        image[0x202] = b'X';
        assert!(matches!(extract(&image), Err(VmlinuxError::NotBzImage(_))));
        let gzip = bzimage(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
        assert!(matches!(extract(&gzip), Err(VmlinuxError::NotLz4(_))));
    }

    #[test]
    fn refuses_truncated_and_inconsistent_payloads() {
        let elf = fake_elf(10_000);
        let stream = lz4_legacy(&elf, 4096);
        // The header points past the end of the file.
        let mut image = bzimage(&stream);
        image.truncate(1024 + 16 + stream.len() / 2);
        assert!(matches!(
            extract(&image),
            Err(VmlinuxError::PayloadOutside { .. })
        ));
        // A wrong trailing size.
        let mut wrong = stream.clone();
        let n = wrong.len();
        wrong[n - 4..].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            extract(&bzimage(&wrong)),
            Err(VmlinuxError::SizeMismatch { .. })
        ));
        // Not an ELF file inside.
        let not_elf = bzimage(&lz4_legacy(&[7u8; 500], 4096));
        assert_eq!(extract(&not_elf), Err(VmlinuxError::NotElf));
    }

    proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = extract(&bzimage(&payload));
        }

        #[test]
        fn flipped_bytes_never_panic(flip in 0usize..2000, value in any::<u8>()) {
            let mut stream = lz4_legacy(&fake_elf(8000), 1024);
            let i = flip % stream.len();
            stream[i] = value;
            let _ = extract(&bzimage(&stream));
        }
    }
}
