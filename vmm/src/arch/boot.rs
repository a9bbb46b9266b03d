//! Loading the kernel (an ELF vmlinux or a bzImage), the initramfs and the command line, and writing `boot_params` with its
//! e820 map (Linux x86 boot protocol, 64-bit entry).

use super::layout::*;
use super::memory::{GuestMemory, low_ram_end};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const PAGE_SIZE: u64 = 4096;
/// `boot_params.hdr.boot_flag`.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `boot_params.hdr.header`: "HdrS".
const SETUP_HEADER_MAGIC: u32 = 0x5372_6448;
/// The alignment an ELF kernel is linked for (CONFIG_PHYSICAL_ALIGN, 16 MiB on x86_64 distros).
const ELF_KERNEL_ALIGNMENT: u32 = 0x0100_0000;

/// Where the kernel went and how to enter it.
#[derive(Debug, Clone, Copy)]
pub struct KernelEntry {
    /// 64-bit entry point (a bzImage's load address + 0x200, or an ELF kernel's entry).
    pub entry: GuestAddress,
}

/// The guest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("cannot open the kernel {0}")]
    OpenKernel(PathBuf, #[source] std::io::Error),
    /// The kernel is not a loadable bzImage or ELF kernel (corrupt, truncated, or another format).
    #[error("{0} is not a loadable kernel (a bzImage or an ELF vmlinux)")]
    BadKernel(PathBuf, #[source] linux_loader::loader::Error),
    /// The file is shorter than its header says.
    #[error("{0} is truncated: {1} bytes, its header says {2}")]
    Truncated(PathBuf, u64, u64),
    /// The kernel's header declares no 64-bit entry or no relocatable image.
    #[error("{0}: the kernel's boot protocol {1:#x} is too old (2.12 or later needed)")]
    OldProtocol(PathBuf, u16),
    /// The initramfs could not be read.
    #[error("cannot read the initramfs {0}")]
    ReadInitrd(PathBuf, #[source] std::io::Error),
    /// The initramfs does not fit in guest memory next to the kernel.
    #[error("the initramfs ({0} bytes) does not fit in guest memory")]
    InitrdTooLarge(u64),
    /// The kernel needs more memory than the guest has.
    #[error("the kernel needs {0} bytes from its load address; the guest has too little memory")]
    KernelTooLarge(u64),
    /// The command line is too long or has a NUL.
    #[error("the kernel command line is invalid ({0} bytes; at most {CMDLINE_MAX} with the NUL)")]
    Cmdline(usize),
    /// Writing into guest memory failed.
    #[error("cannot write {0} into guest memory")]
    GuestWrite(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// Loads the kernel (an ELF `vmlinux` at its physical addresses, or a bzImage at 1 MiB), the
/// initramfs at the top of low RAM and the command line, and writes `boot_params`. `mem` must be
/// fresh guest memory (all zero): what is zero in the kernel is not written.
pub fn load_guest(
    mem: &GuestMemory,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<KernelEntry, BootError> {
    let mut file =
        File::open(kernel).map_err(|e| BootError::OpenKernel(kernel.to_path_buf(), e))?;
    let mut head = [0u8; 4];
    let is_elf = match file.read_exact(&mut head) {
        Ok(()) => head == *b"\x7fELF",
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
        Err(e) => return Err(BootError::OpenKernel(kernel.to_path_buf(), e)),
    };
    file.seek(SeekFrom::Start(0))
        .map_err(|e| BootError::OpenKernel(kernel.to_path_buf(), e))?;
    let mem_size: u64 = mem.iter().map(|r| r.len()).sum();
    let low_end = low_ram_end(mem_size);
    let loaded = if is_elf {
        load_elf(mem, kernel, &file, low_end)?
    } else {
        load_bzimage(mem, kernel, &mut file, low_end)?
    };
    let hdr = loaded.hdr;
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;

    // Command line.
    let bytes = cmdline.as_bytes();
    if bytes.len() + 1 > CMDLINE_MAX || bytes.contains(&0) {
        return Err(BootError::Cmdline(bytes.len()));
    }
    let mut with_nul = Vec::with_capacity(bytes.len() + 1);
    with_nul.extend_from_slice(bytes);
    with_nul.push(0);
    mem.write_slice(&with_nul, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| BootError::GuestWrite("the command line", e))?;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = bytes.len() as u32;

    // Initramfs at the top of low RAM, below what the kernel accepts, above the kernel.
    // It is read straight into guest memory: no buffer on the heap, no second copy.
    if let Some(path) = initrd {
        let read_err = |e| BootError::ReadInitrd(path.to_path_buf(), e);
        let mut file = File::open(path).map_err(read_err)?;
        let size = file.metadata().map_err(read_err)?.len();
        let max_end = low_end.min(u64::from(hdr.initrd_addr_max).saturating_add(1));
        let lowest = loaded.end;
        let addr = max_end.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
        let Some(addr) = addr.filter(|a| *a >= lowest) else {
            return Err(BootError::InitrdTooLarge(size));
        };
        let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge(size))?;
        mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
            .map_err(|e| BootError::GuestWrite("the initramfs", e))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    // e820.
    let mut entries = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, KERNEL_START - EBDA_START, E820_RESERVED),
        (KERNEL_START, low_end - KERNEL_START, E820_RAM),
    ];
    if mem_size > MMIO_GAP_START {
        entries.push((MMIO_GAP_END, mem_size - MMIO_GAP_START, E820_RAM));
    }
    for (i, (addr, size, kind)) in entries.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = entries.len() as u8;

    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(|e| BootError::GuestWrite("boot_params", e))?;
    Ok(KernelEntry {
        entry: loaded.entry,
    })
}

/// A kernel in guest memory: its setup header (read from a bzImage, made up for an ELF kernel),
/// its 64-bit entry point, and the first address it leaves free.
struct LoadedKernel {
    hdr: setup_header,
    entry: GuestAddress,
    end: u64,
}

/// A bzImage at 1 MiB; the guest decompresses and relocates it. Entry: load address + 0x200.
fn load_bzimage(
    mem: &GuestMemory,
    kernel: &Path,
    file: &mut File,
    low_end: u64,
) -> Result<LoadedKernel, BootError> {
    let loaded = BzImage::load(
        mem,
        Some(GuestAddress(KERNEL_START)),
        file,
        Some(GuestAddress(KERNEL_START)),
    )
    .map_err(|e| BootError::BadKernel(kernel.to_path_buf(), e))?;
    let Some(hdr) = loaded.setup_header else {
        return Err(BootError::OldProtocol(kernel.to_path_buf(), 0));
    };
    // The 64-bit entry (and xloadflags) exist from 2.12 on.
    if hdr.version < 0x020c || hdr.xloadflags & 1 == 0 {
        return Err(BootError::OldProtocol(kernel.to_path_buf(), hdr.version));
    }
    // The header says how long the image is: setup sectors plus `syssize` 16-byte paragraphs.
    let setup_sects = if hdr.setup_sects == 0 {
        4
    } else {
        u64::from(hdr.setup_sects)
    };
    let expected = (setup_sects + 1) * 512 + u64::from(hdr.syssize) * 16;
    let actual = file
        .metadata()
        .map_err(|e| BootError::OpenKernel(kernel.to_path_buf(), e))?
        .len();
    if actual < expected {
        return Err(BootError::Truncated(kernel.to_path_buf(), actual, expected));
    }
    let init_size = u64::from(hdr.init_size);
    if KERNEL_START + init_size > low_end {
        return Err(BootError::KernelTooLarge(init_size));
    }
    Ok(LoadedKernel {
        hdr,
        entry: GuestAddress(loaded.kernel_load.0 + 0x200),
        end: KERNEL_START + init_size,
    })
}

/// An ELF `vmlinux` (as `hearth image` extracts from the bzImage), each segment at its physical
/// address, entered at its entry point with the same 64-bit boot protocol: no decompression and
/// no relocation in the guest.
fn load_elf(
    mem: &GuestMemory,
    kernel: &Path,
    file: &File,
    low_end: u64,
) -> Result<LoadedKernel, BootError> {
    // Guest memory is fresh (zero): the file bytes under the kernel's NOBITS sections are not
    // copied into it (about 6 MB of the Debian cloud kernel's 45 MB).
    let skip = super::elf_reader::nobits_file_ranges(file);
    tracing::debug!(
        bytes = skip.iter().map(|(a, b)| b - a).sum::<u64>(),
        "kernel NOBITS bytes not copied"
    );
    let mut reader = super::elf_reader::SkippingReader::new(file, skip);
    let loaded = Elf::load(mem, None, &mut reader, Some(GuestAddress(KERNEL_START)))
        .map_err(|e| BootError::BadKernel(kernel.to_path_buf(), e))?;
    // The kernel's early page tables and brk live past `_end`, inside the last segment's memsz.
    if loaded.kernel_end > low_end {
        return Err(BootError::KernelTooLarge(loaded.kernel_end - KERNEL_START));
    }
    let hdr = setup_header {
        boot_flag: BOOT_FLAG_MAGIC,
        header: SETUP_HEADER_MAGIC,
        kernel_alignment: ELF_KERNEL_ALIGNMENT,
        // Below 4 GiB minus one, as a 2.03+ kernel accepts.
        initrd_addr_max: 0x7fff_ffff,
        ..Default::default()
    };
    Ok(LoadedKernel {
        hdr,
        entry: loaded.kernel_load,
        end: loaded.kernel_end.next_multiple_of(PAGE_SIZE),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_that_is_not_a_bzimage_is_rejected() {
        let mem = crate::arch::memory::create(128 << 20).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0x5a; 8192]).unwrap();
        let err = load_guest(&mem, f.path(), None, "console=ttyS0").unwrap_err();
        assert!(matches!(err, BootError::BadKernel(..)), "{err}");
    }

    #[test]
    fn a_missing_kernel_names_the_path() {
        let mem = crate::arch::memory::create(128 << 20).unwrap();
        let err = load_guest(&mem, Path::new("/nonexistent/vmlinuz"), None, "").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinuz"), "{err}");
    }
}
