//! A reproducible writer (and a small reader) for the newc cpio format the kernel unpacks as its
//! initramfs.
//!
//! Reproducible means: the same entries give the same bytes, whatever order they were added in and
//! whatever the host files' owners and times are. Entries are sorted by path, every mtime is 0,
//! every uid and gid 0, inode numbers are assigned in order from 1, and a parent directory that was
//! not added explicitly is written with mode 0755.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// File type bits (the `S_IF*` constants of `stat(2)`).
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFMT: u32 = 0o170_000;

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

/// Errors from building or writing an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// A path that cannot go into the archive (empty, `..`, NUL, not UTF-8).
    #[error("invalid initramfs path {path:?}: {reason}")]
    InvalidPath { path: PathBuf, reason: &'static str },
    /// Two entries want the same path, or a file would need to be a directory.
    #[error("initramfs path {path:?} conflicts with an entry already added: {reason}")]
    Conflict { path: String, reason: &'static str },
    /// A host file could not be read when the archive was written.
    #[error("cannot read host file {path:?} for the initramfs")]
    ReadHost {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file or name is larger than the format's 32-bit size fields.
    #[error("initramfs entry {path:?} is too large for newc cpio ({len} bytes)")]
    TooLarge { path: String, len: u64 },
    /// Writing the archive failed.
    #[error("cannot write the initramfs")]
    Write(#[source] io::Error),
    /// `parse` found bytes that are not a well-formed newc archive.
    #[error("malformed cpio archive at offset {offset}: {reason}")]
    Malformed { offset: usize, reason: &'static str },
}

#[derive(Debug, Clone)]
enum Content {
    /// A directory added explicitly (`Some(mode)`) or implied by a child (`None`).
    Dir(Option<u32>),
    File {
        data: Data,
        mode: u32,
    },
    Symlink(String),
    CharDev {
        mode: u32,
        major: u32,
        minor: u32,
    },
}

#[derive(Debug, Clone)]
enum Data {
    Bytes(Vec<u8>),
    Host(PathBuf),
}

/// An initramfs being assembled. Paths are absolute or relative to the archive root; both name the
/// same entry (`/init` and `init` are one path).
#[derive(Debug, Clone, Default)]
pub struct Initramfs {
    entries: BTreeMap<String, Content>,
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory with permission bits `mode` (e.g. `0o755`). Adding a directory that was
    /// only implied so far sets its mode.
    pub fn add_dir(
        &mut self,
        path: impl AsRef<Path>,
        mode: u32,
    ) -> Result<&mut Self, InitramfsError> {
        let key = normalize(path.as_ref())?;
        self.imply_parents(&key)?;
        match self.entries.get(&key) {
            None | Some(Content::Dir(None)) => {
                self.entries.insert(key, Content::Dir(Some(mode & 0o7777)));
                Ok(self)
            }
            Some(Content::Dir(Some(_))) => Err(InitramfsError::Conflict {
                path: key,
                reason: "directory added twice",
            }),
            Some(_) => Err(InitramfsError::Conflict {
                path: key,
                reason: "not a directory",
            }),
        }
    }

    /// Adds a regular file with the given contents and permission bits.
    pub fn add_file(
        &mut self,
        path: impl AsRef<Path>,
        bytes: impl Into<Vec<u8>>,
        mode: u32,
    ) -> Result<&mut Self, InitramfsError> {
        let bytes = bytes.into();
        let key = normalize(path.as_ref())?;
        if bytes.len() as u64 > u64::from(u32::MAX) {
            return Err(InitramfsError::TooLarge {
                path: key,
                len: bytes.len() as u64,
            });
        }
        self.insert_leaf(
            key,
            Content::File {
                data: Data::Bytes(bytes),
                mode: mode & 0o7777,
            },
        )
    }

    /// Adds a regular file whose contents are read from `host_path` when the archive is written.
    pub fn add_file_from_host(
        &mut self,
        path: impl AsRef<Path>,
        host_path: impl AsRef<Path>,
        mode: u32,
    ) -> Result<&mut Self, InitramfsError> {
        let key = normalize(path.as_ref())?;
        let host = host_path.as_ref().to_path_buf();
        self.insert_leaf(
            key,
            Content::File {
                data: Data::Host(host),
                mode: mode & 0o7777,
            },
        )
    }

    /// Adds a symbolic link at `path` pointing to `target` (stored as given).
    pub fn add_symlink(
        &mut self,
        path: impl AsRef<Path>,
        target: impl AsRef<Path>,
    ) -> Result<&mut Self, InitramfsError> {
        let key = normalize(path.as_ref())?;
        let target = target.as_ref();
        let Some(target_str) = target
            .to_str()
            .filter(|t| !t.is_empty() && !t.contains('\0'))
        else {
            return Err(InitramfsError::InvalidPath {
                path: target.to_path_buf(),
                reason: "symlink target must be non-empty UTF-8 without NUL",
            });
        };
        self.insert_leaf(key, Content::Symlink(target_str.to_owned()))
    }

    /// Adds a character device node (e.g. `/dev/console`, 5:1).
    pub fn add_char_device(
        &mut self,
        path: impl AsRef<Path>,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self, InitramfsError> {
        let key = normalize(path.as_ref())?;
        self.insert_leaf(
            key,
            Content::CharDev {
                mode: mode & 0o7777,
                major,
                minor,
            },
        )
    }

    /// Whether an entry (explicit or implied) exists at `path`.
    pub fn contains(&self, path: impl AsRef<Path>) -> bool {
        normalize(path.as_ref()).is_ok_and(|k| self.entries.contains_key(&k))
    }

    /// Number of entries, implied directories included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the archive has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn insert_leaf(&mut self, key: String, content: Content) -> Result<&mut Self, InitramfsError> {
        self.imply_parents(&key)?;
        if self.entries.contains_key(&key) {
            return Err(InitramfsError::Conflict {
                path: key,
                reason: "path added twice",
            });
        }
        self.entries.insert(key, content);
        Ok(self)
    }

    fn imply_parents(&mut self, key: &str) -> Result<(), InitramfsError> {
        let mut end = 0;
        while let Some(pos) = key[end..].find('/') {
            let parent = &key[..end + pos];
            match self.entries.get(parent) {
                None => {
                    self.entries.insert(parent.to_owned(), Content::Dir(None));
                }
                Some(Content::Dir(_)) => {}
                Some(_) => {
                    return Err(InitramfsError::Conflict {
                        path: parent.to_owned(),
                        reason: "a parent is not a directory",
                    });
                }
            }
            end += pos + 1;
        }
        Ok(())
    }

    /// Writes the archive (entries sorted by path, then the trailer) to `out`.
    pub fn write_to(&self, out: &mut impl Write) -> Result<(), InitramfsError> {
        let mut out = CountingWriter {
            inner: out,
            written: 0,
        };
        for (ino, (path, content)) in (1u32..).zip(&self.entries) {
            let (mode, nlink, data, rdev) = match content {
                Content::Dir(mode) => (S_IFDIR | mode.unwrap_or(0o755), 2, Vec::new(), (0, 0)),
                Content::File {
                    data: Data::Bytes(b),
                    mode,
                } => (S_IFREG | mode, 1, b.clone(), (0, 0)),
                Content::File {
                    data: Data::Host(host),
                    mode,
                } => {
                    let bytes = std::fs::read(host).map_err(|source| InitramfsError::ReadHost {
                        path: host.clone(),
                        source,
                    })?;
                    (S_IFREG | mode, 1, bytes, (0, 0))
                }
                Content::Symlink(target) => {
                    (S_IFLNK | 0o777, 1, target.as_bytes().to_vec(), (0, 0))
                }
                Content::CharDev { mode, major, minor } => {
                    (S_IFCHR | mode, 1, Vec::new(), (*major, *minor))
                }
            };
            write_entry(&mut out, ino, mode, nlink, rdev, path, &data)?;
        }
        write_entry(&mut out, 0, 0, 1, (0, 0), TRAILER, &[])?;
        out.inner.flush().map_err(InitramfsError::Write)
    }

    /// The archive as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, InitramfsError> {
        let mut v = Vec::new();
        self.write_to(&mut v)?;
        Ok(v)
    }
}

struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    written: usize,
}

impl<W: Write> CountingWriter<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), InitramfsError> {
        self.inner.write_all(bytes).map_err(InitramfsError::Write)?;
        self.written += bytes.len();
        Ok(())
    }

    fn pad4(&mut self) -> Result<(), InitramfsError> {
        let pad = (4 - self.written % 4) % 4;
        self.put(&[0u8; 3][..pad])
    }
}

fn write_entry<W: Write>(
    out: &mut CountingWriter<'_, W>,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) -> Result<(), InitramfsError> {
    let too_large = |len: usize| InitramfsError::TooLarge {
        path: name.to_owned(),
        len: len as u64,
    };
    let namesize = u32::try_from(name.len() + 1).map_err(|_| too_large(name.len()))?;
    let filesize = u32::try_from(data.len()).map_err(|_| too_large(data.len()))?;
    // Fields: ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check.
    let fields = [
        ino, mode, 0, 0, nlink, 0, filesize, 0, 0, rdev.0, rdev.1, namesize, 0,
    ];
    let mut header = String::with_capacity(HEADER_LEN);
    header.push_str("070701");
    for f in fields {
        header.push_str(&format!("{f:08x}"));
    }
    out.put(header.as_bytes())?;
    out.put(name.as_bytes())?;
    out.put(&[0])?;
    out.pad4()?;
    out.put(data)?;
    out.pad4()
}

/// Normalizes an archive path: strips a leading `/` and `.` components, collapses repeated
/// slashes, and rejects empty paths, `..`, NUL bytes and non-UTF-8 names.
pub fn normalize(path: &Path) -> Result<String, InitramfsError> {
    let invalid = |reason| InitramfsError::InvalidPath {
        path: path.to_path_buf(),
        reason,
    };
    let s = path.to_str().ok_or_else(|| invalid("not UTF-8"))?;
    if s.contains('\0') {
        return Err(invalid("contains a NUL byte"));
    }
    let mut parts = Vec::new();
    for part in s.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(invalid("contains `..`")),
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(invalid("names the archive root"));
    }
    let joined = parts.join("/");
    if joined == TRAILER {
        return Err(invalid("is the cpio trailer name"));
    }
    Ok(joined)
}

/// One entry read back from a newc archive by [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioEntry {
    pub name: String,
    pub ino: u32,
    /// Full mode, type bits included.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    pub data: Vec<u8>,
}

impl CpioEntry {
    /// Whether the entry is a directory.
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }

    /// Whether the entry is a regular file.
    pub fn is_file(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }

    /// Whether the entry is a symbolic link (its data is the target).
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
}

/// Reads a newc archive up to its trailer. For tests and inspection; bounded by the input, never
/// panics on malformed bytes.
pub fn parse(bytes: &[u8]) -> Result<Vec<CpioEntry>, InitramfsError> {
    let mut entries = Vec::new();
    let mut off = 0usize;
    let malformed = |offset, reason| InitramfsError::Malformed { offset, reason };
    loop {
        let header = bytes
            .get(off..off + HEADER_LEN)
            .ok_or(malformed(off, "truncated header"))?;
        if &header[..6] != MAGIC {
            return Err(malformed(off, "bad magic"));
        }
        let mut fields = [0u32; 13];
        for (i, f) in fields.iter_mut().enumerate() {
            let hex = &header[6 + i * 8..14 + i * 8];
            let s =
                std::str::from_utf8(hex).map_err(|_| malformed(off, "non-ASCII header field"))?;
            *f = u32::from_str_radix(s, 16).map_err(|_| malformed(off, "non-hex header field"))?;
        }
        let [
            ino,
            mode,
            uid,
            gid,
            nlink,
            mtime,
            filesize,
            _,
            _,
            rdev_major,
            rdev_minor,
            namesize,
            _,
        ] = fields;
        let name_start = off + HEADER_LEN;
        let namesize = namesize as usize;
        if namesize == 0 {
            return Err(malformed(off, "empty name"));
        }
        let name_bytes = bytes
            .get(name_start..name_start + namesize)
            .ok_or(malformed(off, "truncated name"))?;
        if name_bytes[namesize - 1] != 0 {
            return Err(malformed(off, "name not NUL-terminated"));
        }
        let name = std::str::from_utf8(&name_bytes[..namesize - 1])
            .map_err(|_| malformed(off, "name not UTF-8"))?
            .to_owned();
        let data_start = align4(name_start + namesize);
        let data_end = data_start
            .checked_add(filesize as usize)
            .ok_or(malformed(off, "size overflow"))?;
        let data = bytes
            .get(data_start..data_end)
            .ok_or(malformed(off, "truncated data"))?
            .to_vec();
        off = align4(data_end);
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(CpioEntry {
            name,
            ino,
            mode,
            uid,
            gid,
            nlink,
            mtime,
            rdev_major,
            rdev_minor,
            data,
        });
    }
}

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(order_reversed: bool) -> Vec<u8> {
        let mut ir = Initramfs::new();
        type Op = Box<dyn Fn(&mut Initramfs)>;
        let mut ops: Vec<Op> = vec![
            Box::new(|ir| {
                ir.add_file("/init", b"#!init".to_vec(), 0o755).unwrap();
            }),
            Box::new(|ir| {
                ir.add_file("lib/modules/virtio.ko", vec![1u8; 5], 0o644)
                    .unwrap();
            }),
            Box::new(|ir| {
                ir.add_dir("/etc", 0o700).unwrap();
            }),
            Box::new(|ir| {
                ir.add_symlink("/bin/sh", "/init").unwrap();
            }),
        ];
        if order_reversed {
            ops.reverse();
        }
        for op in ops {
            op(&mut ir);
        }
        ir.to_bytes().unwrap()
    }

    #[test]
    fn same_inputs_same_bytes_in_any_order() {
        assert_eq!(sample(false), sample(true));
    }

    #[test]
    fn round_trip_with_implied_parents() {
        let entries = parse(&sample(false)).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "etc",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/virtio.ko"
            ]
        );
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.ino as usize, i + 1);
            assert_eq!((e.uid, e.gid, e.mtime), (0, 0, 0));
        }
        let init = &entries[3];
        assert!(init.is_file());
        assert_eq!(init.mode & 0o7777, 0o755);
        assert_eq!(init.data, b"#!init");
        assert!(entries[0].is_dir());
        assert_eq!(entries[0].mode & 0o7777, 0o755);
        assert_eq!(entries[2].mode & 0o7777, 0o700);
        assert!(entries[1].is_symlink());
        assert_eq!(entries[1].data, b"/init");
        assert_eq!(entries[6].data, vec![1u8; 5]);
    }

    #[test]
    fn archive_is_aligned_and_ends_with_trailer() {
        let bytes = sample(false);
        assert_eq!(bytes.len() % 4, 0);
        let tail = String::from_utf8_lossy(&bytes[bytes.len() - 16..]).into_owned();
        assert!(tail.contains("TRAILER!!!"), "{tail:?}");
    }

    #[test]
    fn paths_are_normalized() {
        assert_eq!(normalize(Path::new("/a//b/./c")).unwrap(), "a/b/c");
        assert_eq!(normalize(Path::new("a/b/")).unwrap(), "a/b");
        let mut ir = Initramfs::new();
        ir.add_file("/x/y", b"1".to_vec(), 0o644).unwrap();
        assert!(matches!(
            ir.add_file("x//y", b"2".to_vec(), 0o644),
            Err(InitramfsError::Conflict { .. })
        ));
        assert!(ir.contains("/x"));
    }

    #[test]
    fn bad_paths_are_rejected() {
        let mut ir = Initramfs::new();
        for bad in ["", "/", ".", "/a/../b", "..", "a/\0b", "TRAILER!!!"] {
            assert!(
                matches!(
                    ir.add_file(bad, Vec::new(), 0o644),
                    Err(InitramfsError::InvalidPath { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(ir.is_empty());
    }

    #[test]
    fn conflicts_are_rejected() {
        let mut ir = Initramfs::new();
        ir.add_file("/a", b"x".to_vec(), 0o644).unwrap();
        assert!(matches!(
            ir.add_file("/a/b", Vec::new(), 0o644),
            Err(InitramfsError::Conflict { .. })
        ));
        assert!(matches!(
            ir.add_dir("/a", 0o755),
            Err(InitramfsError::Conflict { .. })
        ));
        ir.add_file("/d/f", Vec::new(), 0o644).unwrap();
        ir.add_dir("/d", 0o711).unwrap();
        assert!(matches!(
            ir.add_dir("/d", 0o711),
            Err(InitramfsError::Conflict { .. })
        ));
        let entries = parse(&ir.to_bytes().unwrap()).unwrap();
        assert_eq!(
            entries.iter().find(|e| e.name == "d").unwrap().mode,
            S_IFDIR | 0o711
        );
    }

    #[test]
    fn host_files_and_devices() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("f");
        std::fs::write(&host, b"hello host").unwrap();
        let mut ir = Initramfs::new();
        ir.add_file_from_host("/usr/bin/f", &host, 0o755).unwrap();
        ir.add_char_device("/dev/console", 0o600, 5, 1).unwrap();
        let entries = parse(&ir.to_bytes().unwrap()).unwrap();
        let f = entries.iter().find(|e| e.name == "usr/bin/f").unwrap();
        assert_eq!(f.data, b"hello host");
        let c = entries.iter().find(|e| e.name == "dev/console").unwrap();
        assert_eq!(
            (c.mode, c.rdev_major, c.rdev_minor),
            (S_IFCHR | 0o600, 5, 1)
        );

        let mut missing = Initramfs::new();
        missing
            .add_file_from_host("/x", dir.path().join("nope"), 0o644)
            .unwrap();
        assert!(matches!(
            missing.to_bytes(),
            Err(InitramfsError::ReadHost { .. })
        ));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn parse_never_panics_on_mutated_archives(idx in 0usize..400, byte in any::<u8>()) {
            let mut bytes = sample(false);
            let i = idx % bytes.len();
            bytes[i] = byte;
            let _ = parse(&bytes);
        }

        #[test]
        fn arbitrary_files_round_trip(files in proptest::collection::btree_map("[a-z]{1,6}(/[a-z]{1,6}){0,2}", proptest::collection::vec(any::<u8>(), 0..40), 1..8)) {
            let mut ir = Initramfs::new();
            let mut expected = Vec::new();
            for (path, data) in &files {
                if ir.add_file(path, data.clone(), 0o644).is_ok() {
                    expected.push((path.clone(), data.clone()));
                }
            }
            let entries = parse(&ir.to_bytes().unwrap()).unwrap();
            for (path, data) in expected {
                let e = entries.iter().find(|e| e.name == path).unwrap();
                prop_assert_eq!(&e.data, &data);
            }
        }
    }
}
