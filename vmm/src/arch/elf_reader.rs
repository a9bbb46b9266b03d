//! Reading an ELF kernel for linux-loader without copying what guest memory already holds: the
//! file bytes under the kernel's `SHT_NOBITS` sections (`.bss`, `.brk`, `.orc_lookup`: about 6 MB
//! of the Debian cloud kernel's 45 MB of loaded segments) are skipped, not read into guest memory.
//! Those sections are zero by definition and the guest memory of a booting VM is fresh anonymous
//! memory, zero until written, so the result is the same; only the copy (and the host faults it
//! takes) is saved. Anything the section headers do not describe clearly is simply read.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

/// `SHT_NOBITS`.
const SHT_NOBITS: u32 = 8;
/// `SHF_ALLOC`.
const SHF_ALLOC: u64 = 2;
/// `PT_LOAD`.
const PT_LOAD: u32 = 1;
/// Most program and section headers looked at (a kernel has a handful and a few dozen).
const MAX_HEADERS: usize = 4096;

/// The file ranges, sorted and disjoint, that a loader copying the `PT_LOAD` segments of the ELF
/// `file` would copy to where `SHT_NOBITS` sections lie. Empty when the headers cannot be read.
pub fn nobits_file_ranges(file: &File) -> Vec<(u64, u64)> {
    let mut ehdr = [0u8; 64];
    if file.read_exact_at(&mut ehdr, 0).is_err() || ehdr[..4] != *b"\x7fELF" || ehdr[4] != 2 {
        return Vec::new();
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let phoff = u64_at(&ehdr, 0x20);
    let shoff = u64_at(&ehdr, 0x28);
    let (phentsize, phnum) = (
        usize::from(u16_at(&ehdr, 0x36)),
        usize::from(u16_at(&ehdr, 0x38)),
    );
    let (shentsize, shnum) = (
        usize::from(u16_at(&ehdr, 0x3a)),
        usize::from(u16_at(&ehdr, 0x3c)),
    );
    if phentsize != 56 || shentsize != 64 || phnum > MAX_HEADERS || shnum > MAX_HEADERS {
        return Vec::new();
    }
    let (Some(phdrs), Some(shdrs)) = (
        read_table(file, phoff, phentsize * phnum),
        read_table(file, shoff, shentsize * shnum),
    ) else {
        return Vec::new();
    };
    // (file offset, virtual address, bytes copied) of each loaded segment.
    let segments: Vec<(u64, u64, u64)> = phdrs
        .chunks_exact(phentsize)
        .filter(|p| u32::from_le_bytes([p[0], p[1], p[2], p[3]]) == PT_LOAD)
        .map(|p| (u64_at(p, 8), u64_at(p, 16), u64_at(p, 32)))
        .collect();
    let mut ranges = Vec::new();
    for s in shdrs.chunks_exact(shentsize) {
        let kind = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
        if kind != SHT_NOBITS || u64_at(s, 8) & SHF_ALLOC == 0 {
            continue;
        }
        let (addr, size) = (u64_at(s, 16), u64_at(s, 32));
        let Some(end) = addr.checked_add(size) else {
            continue;
        };
        for &(offset, vaddr, filesz) in &segments {
            // The part of the section inside the segment's copied bytes, as file offsets.
            let Some(seg_end) = vaddr.checked_add(filesz) else {
                continue;
            };
            let (from, to) = (addr.max(vaddr), end.min(seg_end));
            if from < to
                && let (Some(a), Some(b)) = (
                    offset.checked_add(from - vaddr),
                    offset.checked_add(to - vaddr),
                )
            {
                ranges.push((a, b));
            }
        }
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(v)
}

fn read_table(file: &File, offset: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).ok()?;
    Some(buf)
}

/// A kernel file as linux-loader reads it, with `skip` (sorted, disjoint file ranges) left out of
/// every read into guest memory: those bytes of the destination are left as they are (zero).
pub struct SkippingReader<'a> {
    file: &'a File,
    pos: u64,
    skip: Vec<(u64, u64)>,
}

impl<'a> SkippingReader<'a> {
    /// Reads `file` from its start, leaving out `skip` in reads into guest memory.
    pub fn new(file: &'a File, skip: Vec<(u64, u64)>) -> Self {
        SkippingReader { file, pos: 0, skip }
    }

    /// Bytes from the position that are skipped (`true`) or read (`false`), at most `max`.
    fn next_run(&self, max: u64) -> (bool, u64) {
        let pos = self.pos;
        for &(a, b) in &self.skip {
            if pos < a {
                return (false, (a - pos).min(max));
            }
            if pos < b {
                return (true, (b - pos).min(max));
            }
        }
        (false, max)
    }
}

impl Read for SkippingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for SkippingReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let invalid = || std::io::Error::from(std::io::ErrorKind::InvalidInput);
        self.pos = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::Current(d) => self.pos.checked_add_signed(d).ok_or_else(invalid)?,
            SeekFrom::End(d) => self
                .file
                .metadata()?
                .len()
                .checked_add_signed(d)
                .ok_or_else(invalid)?,
        };
        Ok(self.pos)
    }
}

impl ReadVolatile for SkippingReader<'_> {
    /// Fills `buf` as far as the file goes: skipped ranges by moving on, the rest by reading.
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let total = buf.len();
        let mut done = 0;
        while done < total {
            let (skipped, len) = self.next_run((total - done) as u64);
            let len = len as usize;
            if skipped {
                self.pos += len as u64;
                done += len;
                continue;
            }
            let mut part = buf.subslice(done, len)?;
            let mut file = self.file;
            file.seek(SeekFrom::Start(self.pos))
                .map_err(VolatileMemoryError::IOError)?;
            let n = file.read_volatile(&mut part)?;
            if n == 0 {
                break;
            }
            self.pos += n as u64;
            done += n;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    #[test]
    fn skipped_ranges_are_left_as_they_are_and_the_rest_is_read() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[0xaa; 100]).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4096)]).unwrap();
        let mut r = SkippingReader::new(&f, vec![(10, 20), (30, 35)]);
        r.seek(SeekFrom::Start(5)).unwrap();
        mem.read_exact_volatile_from(GuestAddress(0), &mut r, 40)
            .unwrap();
        let mut got = [0u8; 41];
        mem.read_slice(&mut got, GuestAddress(0)).unwrap();
        let want: Vec<u8> = (5..45)
            .map(|off| {
                if (10..20).contains(&off) || (30..35).contains(&off) {
                    0
                } else {
                    0xaa
                }
            })
            .chain([0])
            .collect();
        assert_eq!(got.to_vec(), want);
        // Past the end of the file: a short read, which the loader reports.
        r.seek(SeekFrom::Start(90)).unwrap();
        assert!(
            mem.read_exact_volatile_from(GuestAddress(0), &mut r, 20)
                .is_err()
        );
    }

    /// The cached guest kernel (`hearth image`) loads into fresh memory byte for byte as a full
    /// copy of its segments does, with megabytes skipped.
    #[test]
    fn the_guest_kernel_loads_the_same_with_its_nobits_bytes_skipped() {
        use linux_loader::loader::{Elf, KernelLoader};
        let image = hearth_guest::image::KernelImage::locate()
            .expect("the guest kernel is not in the cache: run `hearth image`");
        let path = image.boot_image();
        let file = File::open(path).unwrap();
        let skip = nobits_file_ranges(&file);
        let skipped: u64 = skip.iter().map(|(a, b)| b - a).sum();
        assert!(skipped > 1 << 20, "{path:?}: only {skipped} bytes skipped");
        let load = |reader: &mut dyn FnMut(&GuestMemoryMmap<()>)| {
            let mem = crate::arch::memory::create(128 << 20).unwrap();
            reader(&mem);
            mem
        };
        let full = load(&mut |mem| {
            let mut f = File::open(path).unwrap();
            Elf::load(mem, None, &mut f, None).unwrap();
        });
        let sparse = load(&mut |mem| {
            Elf::load(
                mem,
                None,
                &mut SkippingReader::new(&file, skip.clone()),
                None,
            )
            .unwrap();
        });
        let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        for mib in 0..128u64 {
            full.read_slice(&mut a, GuestAddress(mib << 20)).unwrap();
            sparse.read_slice(&mut b, GuestAddress(mib << 20)).unwrap();
            assert!(a == b, "guest memory differs in MiB {mib}");
        }
    }

    #[test]
    fn a_file_that_is_not_elf_has_nothing_to_skip() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[0x5a; 8192]).unwrap();
        assert!(nobits_file_ranges(&f).is_empty());
    }

    /// A minimal ELF: one PT_LOAD of 0x3000 bytes at file offset 0x1000, vaddr 0x10000, and a
    /// NOBITS section at 0x11800 of 0x1000 bytes (inside it) and one outside any segment.
    #[test]
    fn nobits_sections_map_to_the_file_bytes_a_loader_would_copy() {
        let mut elf = vec![0u8; 0x4000];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        let put64 = |b: &mut [u8], o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_le_bytes());
        let put16 = |b: &mut [u8], o: usize, v: u16| b[o..o + 2].copy_from_slice(&v.to_le_bytes());
        put64(&mut elf, 0x20, 0x40); // phoff
        put64(&mut elf, 0x28, 0x100); // shoff
        put16(&mut elf, 0x36, 56);
        put16(&mut elf, 0x38, 1);
        put16(&mut elf, 0x3a, 64);
        put16(&mut elf, 0x3c, 2);
        let ph = 0x40;
        elf[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        put64(&mut elf, ph + 8, 0x1000);
        put64(&mut elf, ph + 16, 0x10000);
        put64(&mut elf, ph + 32, 0x3000);
        for (i, addr) in [0x11800u64, 0x90000].into_iter().enumerate() {
            let sh = 0x100 + 64 * i;
            elf[sh + 4..sh + 8].copy_from_slice(&SHT_NOBITS.to_le_bytes());
            put64(&mut elf, sh + 8, SHF_ALLOC);
            put64(&mut elf, sh + 16, addr);
            put64(&mut elf, sh + 32, 0x1000);
        }
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&elf).unwrap();
        assert_eq!(nobits_file_ranges(&f), vec![(0x2800, 0x3800)]);
    }
}
