//! The shared objects a dynamically linked `hearth` needs inside the jail: its ELF interpreter
//! (`PT_INTERP`, placed at exactly that path) and the libraries the jailer itself has mapped, each
//! at its real path, where the interpreter's default search finds it. The jailer is normally the
//! very binary it jails, so its mappings are that binary's libraries; a different, dynamically
//! linked exec file must need no others. A static binary needs none.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::paths::{self, CheckedFile, PathError};

/// `PT_INTERP`.
const PT_INTERP: u32 = 3;
/// The longest interpreter path read.
const MAX_INTERP: u64 = 4096;
/// The most program headers read.
const MAX_PHDRS: u16 = 256;

/// Errors finding the shared objects.
#[derive(Debug, thiserror::Error)]
pub enum LibsError {
    /// The exec file could not be read.
    #[error("cannot read {0:?}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The exec file is not a 64-bit little-endian ELF file.
    #[error("{0:?} is not a 64-bit little-endian ELF executable")]
    NotElf(PathBuf),
    /// A shared object failed its check.
    #[error(transparent)]
    Path(#[from] PathError),
}

/// The `PT_INTERP` path of the ELF file `program`; `None` for a static executable.
pub fn interpreter(program: &Path) -> Result<Option<PathBuf>, LibsError> {
    let err = |e| LibsError::Read(program.to_path_buf(), e);
    let mut f = std::fs::File::open(program).map_err(err)?;
    let mut header = [0u8; 64];
    f.read_exact(&mut header).map_err(err)?;
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Err(LibsError::NotElf(program.to_path_buf()));
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(v)
    };
    let (phoff, phentsize, phnum) = (
        u64_at(&header, 0x20),
        u16_at(&header, 0x36),
        u16_at(&header, 0x38),
    );
    if phentsize < 56 || phnum > MAX_PHDRS {
        return Err(LibsError::NotElf(program.to_path_buf()));
    }
    let mut phdr = vec![0u8; usize::from(phentsize)];
    for i in 0..u64::from(phnum) {
        f.seek(SeekFrom::Start(phoff + i * u64::from(phentsize)))
            .map_err(err)?;
        f.read_exact(&mut phdr).map_err(err)?;
        if u32::from_le_bytes([phdr[0], phdr[1], phdr[2], phdr[3]]) != PT_INTERP {
            continue;
        }
        let (offset, size) = (u64_at(&phdr, 8), u64_at(&phdr, 0x20));
        if size == 0 || size > MAX_INTERP {
            return Err(LibsError::NotElf(program.to_path_buf()));
        }
        let mut path = vec![0u8; size as usize];
        f.seek(SeekFrom::Start(offset)).map_err(err)?;
        f.read_exact(&mut path).map_err(err)?;
        let end = path.iter().position(|b| *b == 0).unwrap_or(path.len());
        path.truncate(end);
        return Ok(Some(PathBuf::from(std::ffi::OsString::from_vec(path))));
    }
    Ok(None)
}

/// The shared objects mapped in `maps` text (`/proc/self/maps`), but `skip` (the program
/// itself, by device and inode): absolute paths of files named `*.so` or `*.so.*`, once each.
pub fn mapped_objects(maps: &str, skip: Option<(u64, u64)>) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let mut fields = line.splitn(6, ' ');
        let (Some(_), Some(_), Some(_), Some(_), Some(inode), Some(path)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let path = path.trim_start();
        if !path.starts_with('/') || path.ends_with(" (deleted)") {
            continue;
        }
        let path = PathBuf::from(path);
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !(name.ends_with(".so") || name.contains(".so.")) {
            continue;
        }
        if let (Some((dev, ino)), Ok(meta)) = (skip, std::fs::metadata(&path))
            && meta.dev() == dev
            && meta.ino() == ino
            && inode.parse::<u64>().is_ok_and(|i| i == ino)
        {
            continue;
        }
        if !found.contains(&path) {
            found.push(path);
        }
    }
    found
}

/// The shared objects `program` needs in the jail, checked: its interpreter at its `PT_INTERP`
/// path and this process's mapped libraries at their own paths. Empty for a static program.
pub fn shared_objects(program: &Path) -> Result<Vec<CheckedFile>, LibsError> {
    let Some(interp) = interpreter(program)? else {
        return Ok(Vec::new());
    };
    let what = "a shared library";
    let mut files = vec![paths::check_program(what, &interp, &interp)?];
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| LibsError::Read(PathBuf::from("/proc/self/maps"), e))?;
    let me = std::fs::metadata(program).map(|m| (m.dev(), m.ino())).ok();
    for path in mapped_objects(&maps, me) {
        if path != interp {
            files.push(paths::check_program(what, &path, &path)?);
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_test_has_an_interpreter_and_libraries() {
        let exe = std::env::current_exe().unwrap();
        let interp = interpreter(&exe).unwrap().expect("a dynamic test binary");
        assert!(interp.is_absolute() && interp.to_string_lossy().contains("ld-"));
        let files = shared_objects(&exe).unwrap();
        assert_eq!(files[0].inside, interp);
        assert!(
            files
                .iter()
                .any(|f| f.inside.to_string_lossy().contains("libc.so")),
            "{files:?}"
        );
    }

    #[test]
    fn maps_lines_give_libraries_once() {
        let maps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234 /usr/bin/hearth
7f0000000000-7f0000100000 r--p 00000000 08:01 99   /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000100000-7f0000200000 r-xp 00100000 08:01 99   /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000300000-7f0000400000 r-xp 00000000 08:01 98   /usr/lib/x86_64-linux-gnu/libgcc_s.so.1
7f0000500000-7f0000600000 rw-p 00000000 00:00 0    [heap]
7f0000700000-7f0000800000 r-xp 00000000 08:01 97   /tmp/gone.so (deleted)
";
        assert_eq!(
            mapped_objects(maps, None),
            vec![
                PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/usr/lib/x86_64-linux-gnu/libgcc_s.so.1"),
            ]
        );
    }

    #[test]
    fn a_non_elf_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        std::fs::write(&f, vec![0u8; 128]).unwrap();
        assert!(matches!(interpreter(&f), Err(LibsError::NotElf(_))));
    }
}
