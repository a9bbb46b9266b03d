//! Safe unpacking of a function's code zip into its task folder (`/var/task`).
//!
//! The zip comes from a user, so every byte of it is untrusted:
//! - Limits are checked from the central directory before anything is inflated (entry count, total
//!   declared size, per-entry compression ratio), and enforced again while inflating, because the
//!   sizes in the headers can lie.
//! - Entry names are checked component by component: no absolute path, no `..`, no NUL, no
//!   backslash, no empty name. Each file is created relative to an open directory handle, walking
//!   one component at a time with `O_NOFOLLOW`, so neither a symlink planted by an earlier entry nor
//!   one already in the folder can redirect a write. Files are created with `O_EXCL`: a duplicate
//!   entry is refused.
//! - Symlinks are kept only when their target is relative and stays inside the folder.
//! - Modes are normalised: `0o755` when any execute bit is set, else `0o644`; no setuid bits.
//!
//! The zip crate's `extract` is deliberately not used.

use std::io::{Cursor, Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use zip::ZipArchive;

/// Lambda's error type for a code zip it cannot unpack.
pub const INVALID_ZIP_ERROR_TYPE: &str = "InvalidZipFileException";

/// Limits applied to a code zip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most bytes all entries may unpack to (Lambda: 250 MB).
    pub max_unpacked_bytes: u64,
    /// The most entries the archive may hold.
    pub max_entries: usize,
    /// The highest uncompressed/compressed ratio one entry may have once it is larger than
    /// `ratio_floor_bytes`.
    pub max_ratio: u64,
    /// Entries at most this large are not ratio-checked (small files compress well legitimately).
    pub ratio_floor_bytes: u64,
    /// The longest symlink target accepted.
    pub max_symlink_target: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_unpacked_bytes: 250 * 1024 * 1024,
            max_entries: 65_536,
            max_ratio: 200,
            ratio_floor_bytes: 1024 * 1024,
            max_symlink_target: 4096,
        }
    }
}

/// What an unpack produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnpackStats {
    /// Regular files written.
    pub files: u64,
    /// Directories created.
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Why a code zip was refused. Every variant maps to `InvalidZipFileException`.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("the file is not a readable zip archive")]
    NotAZip(#[source] zip::result::ZipError),
    #[error("the archive has {count} entries, more than the {max} allowed")]
    TooManyEntries { count: usize, max: usize },
    #[error("the archive unpacks to more than {max} bytes")]
    TooLarge { max: u64 },
    #[error("entry {name:?} has a compression ratio above {max}:1 (a zip bomb?)")]
    RatioTooHigh { name: String, max: u64 },
    #[error("entry {name:?} has an unsafe path: {why}")]
    UnsafePath { name: String, why: &'static str },
    #[error("entry {name:?} is a symlink whose target {target:?} leaves the task folder")]
    SymlinkEscape { name: String, target: String },
    #[error("entry {name:?} would be written through a symlink or over an existing file")]
    ThroughLink { name: String },
    #[error("entry {name:?} is encrypted")]
    Encrypted { name: String },
    #[error("entry {name:?} inflates to more bytes than its header declares")]
    SizeMismatch { name: String },
    #[error("entry {name:?} could not be read (truncated or corrupt data)")]
    Corrupt {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("entry {name:?} could not be written to the task folder")]
    Write {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the task folder {path} could not be opened")]
    Folder {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl BundleError {
    /// The Lambda error type for every bundle error.
    pub fn error_type(&self) -> &'static str {
        INVALID_ZIP_ERROR_TYPE
    }

    /// A Lambda-style message, with the cause chain.
    pub fn lambda_message(&self) -> String {
        let mut msg = format!("Could not unzip uploaded file: {self}");
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            msg.push_str(": ");
            msg.push_str(&cause.to_string());
            source = cause.source();
        }
        msg
    }
}

/// A checked entry: its normalised path components and kind.
#[derive(Debug)]
enum Kind {
    Dir,
    File { executable: bool },
    Symlink,
}

/// Unpacks `zip` into the existing folder `dest` with the given limits.
///
/// On error, what was already written stays inside `dest` (the caller discards the folder);
/// nothing is ever written outside it.
pub fn unpack(zip: &[u8], dest: &Path, limits: &Limits) -> Result<UnpackStats, BundleError> {
    let mut archive = ZipArchive::new(Cursor::new(zip)).map_err(BundleError::NotAZip)?;
    let count = archive.len();
    if count > limits.max_entries {
        return Err(BundleError::TooManyEntries {
            count,
            max: limits.max_entries,
        });
    }

    // First pass, central directory only: names, sizes, ratios.
    let mut plan = Vec::with_capacity(count);
    let mut declared: u64 = 0;
    for index in 0..count {
        let entry = archive.by_index_data(index).map_err(BundleError::NotAZip)?;
        let name = String::from_utf8_lossy(entry.name_raw()).into_owned();
        let parts = check_name(&name)?;
        if entry.encrypted() {
            return Err(BundleError::Encrypted { name });
        }
        let size = entry.size();
        declared = declared.saturating_add(size);
        if declared > limits.max_unpacked_bytes {
            return Err(BundleError::TooLarge {
                max: limits.max_unpacked_bytes,
            });
        }
        if size > limits.ratio_floor_bytes
            && size / entry.compressed_size().max(1) > limits.max_ratio
        {
            return Err(BundleError::RatioTooHigh {
                name,
                max: limits.max_ratio,
            });
        }
        let kind = if entry.is_symlink() {
            if size > limits.max_symlink_target {
                return Err(BundleError::UnsafePath {
                    name,
                    why: "symlink target too long",
                });
            }
            Kind::Symlink
        } else if entry.is_dir() {
            Kind::Dir
        } else {
            Kind::File {
                executable: entry.unix_mode().is_some_and(|m| m & 0o111 != 0),
            }
        };
        plan.push((index, name, parts, kind));
    }

    let root = rustix::fs::open(
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| BundleError::Folder {
        path: dest.display().to_string(),
        source: e.into(),
    })?;

    // Second pass: write, enforcing the limits on the bytes actually inflated.
    let mut stats = UnpackStats::default();
    let mut budget = limits.max_unpacked_bytes;
    for (index, name, parts, kind) in plan {
        let Some((leaf, dirs)) = parts.split_last() else {
            continue; // "./" and the like: nothing to create.
        };
        let parent = open_dirs(&root, dirs, &name, &mut stats)?;
        match kind {
            Kind::Dir => {
                let dir = mkdir_open(&parent, leaf, &name, &mut stats)?;
                drop(dir);
            }
            Kind::Symlink => {
                let mut file = archive.by_index(index).map_err(BundleError::NotAZip)?;
                let mut target = Vec::new();
                (&mut file)
                    .take(limits.max_symlink_target + 1)
                    .read_to_end(&mut target)
                    .map_err(|source| BundleError::Corrupt {
                        name: name.clone(),
                        source,
                    })?;
                let target = String::from_utf8(target).map_err(|_| BundleError::UnsafePath {
                    name: name.clone(),
                    why: "symlink target is not UTF-8",
                })?;
                check_symlink(&name, dirs.len(), &target)?;
                rustix::fs::symlinkat(target.as_str(), &parent, leaf.as_str())
                    .map_err(|e| write_err(&name, e))?;
                stats.symlinks += 1;
            }
            Kind::File { executable } => {
                let mut file = archive.by_index(index).map_err(BundleError::NotAZip)?;
                let declared = file.size();
                let mode = if executable { 0o755 } else { 0o644 };
                let fd = rustix::fs::openat(
                    &parent,
                    leaf.as_str(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(mode),
                )
                .map_err(|e| write_err(&name, e))?;
                let mut out = std::fs::File::from(fd);
                // Never inflate more than declared (+1 to detect a lie) nor more than the budget.
                let cap = declared.min(budget).saturating_add(1);
                let written = copy_limited(&mut file, &mut out, cap, &name)?;
                if written > declared {
                    return Err(BundleError::SizeMismatch { name });
                }
                if written > budget {
                    return Err(BundleError::TooLarge {
                        max: limits.max_unpacked_bytes,
                    });
                }
                budget -= written;
                stats.bytes += written;
                stats.files += 1;
            }
        }
    }
    Ok(stats)
}

fn copy_limited(
    src: &mut impl Read,
    dst: &mut std::fs::File,
    cap: u64,
    name: &str,
) -> Result<u64, BundleError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        let want = usize::try_from((cap - total).min(buf.len() as u64)).unwrap_or(buf.len());
        if want == 0 {
            return Ok(total);
        }
        let n = match src.read(&mut buf[..want]) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(BundleError::Corrupt {
                    name: name.to_string(),
                    source,
                });
            }
        };
        dst.write_all(&buf[..n])
            .map_err(|source| BundleError::Write {
                name: name.to_string(),
                source,
            })?;
        total += n as u64;
    }
}

fn write_err(name: &str, e: Errno) -> BundleError {
    match e {
        Errno::LOOP | Errno::EXIST | Errno::NOTDIR => BundleError::ThroughLink {
            name: name.to_string(),
        },
        other => BundleError::Write {
            name: name.to_string(),
            source: other.into(),
        },
    }
}

/// Opens (creating as needed) each directory of `dirs` under `root`, never following a symlink.
fn open_dirs(
    root: &OwnedFd,
    dirs: &[String],
    name: &str,
    stats: &mut UnpackStats,
) -> Result<OwnedFd, BundleError> {
    let mut current = rustix::io::dup(root).map_err(|e| write_err(name, e))?;
    for dir in dirs {
        current = mkdir_open(&current, dir, name, stats)?;
    }
    Ok(current)
}

fn mkdir_open(
    parent: &OwnedFd,
    dir: &str,
    name: &str,
    stats: &mut UnpackStats,
) -> Result<OwnedFd, BundleError> {
    match rustix::fs::mkdirat(parent, dir, Mode::from_raw_mode(0o755)) {
        Ok(()) => stats.dirs += 1,
        Err(Errno::EXIST) => {}
        Err(e) => return Err(write_err(name, e)),
    }
    rustix::fs::openat(
        parent,
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| write_err(name, e))
}

/// Splits an entry name into safe components, or says why it is unsafe.
fn check_name(name: &str) -> Result<Vec<String>, BundleError> {
    let bad = |why| {
        Err(BundleError::UnsafePath {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty name");
    }
    if name.contains('\0') {
        return bad("NUL byte in name");
    }
    if name.contains('\\') {
        return bad("backslash in name");
    }
    if name.starts_with('/') {
        return bad("absolute path");
    }
    if name.len() >= 2 && name.as_bytes()[1] == b':' {
        return bad("drive-letter path");
    }
    let mut parts = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return bad("'..' component"),
            p if p.len() > 255 => return bad("component longer than 255 bytes"),
            p => parts.push(p.to_string()),
        }
    }
    if parts.len() > 64 {
        return bad("more than 64 levels deep");
    }
    Ok(parts)
}

/// A symlink at depth `depth` (number of parent directories inside the task folder) may point
/// only to a relative target made of leading `..` components (at most `depth` of them) followed by
/// plain names. A `..` after a name is refused: the name could be a symlink itself, and then the
/// lexical view would not match what the kernel resolves. With this shape, by induction over the
/// links already in the folder, every link resolves inside the folder.
fn check_symlink(name: &str, depth: usize, target: &str) -> Result<(), BundleError> {
    let escape = || BundleError::SymlinkEscape {
        name: name.to_string(),
        target: target.to_string(),
    };
    if target.is_empty()
        || target.starts_with('/')
        || target.contains('\0')
        || target.contains('\\')
    {
        return Err(escape());
    }
    let mut ups = 0usize;
    let mut seen_name = false;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." if seen_name => return Err(escape()),
            ".." => ups += 1,
            _ => seen_name = true,
        }
    }
    if ups > depth {
        return Err(escape());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
