//! Packing host files into the test host's initramfs: each file at the same absolute path as on the
//! host, an ELF's shared libraries and dynamic loader beside it (found with `ldd`), a script's
//! interpreter, and debug information stripped from the copies of large binaries.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use hearth_guest::image::initramfs::{Initramfs, InitramfsError};

/// Binaries smaller than this are packed as they are: stripping them saves little.
const STRIP_MIN_BYTES: u64 = 512 * 1024;

/// Errors from collecting files for the test host.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// A host file or folder could not be read.
    #[error("cannot read {path:?} to pack it into the test host")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `ldd` could not be run.
    #[error(
        "cannot run `ldd {path}` to find the shared libraries to pack (is libc-bin installed?)"
    )]
    Ldd {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `ldd` says a library the binary needs is not on this host.
    #[error("{path:?} needs the shared library {library}, which `ldd` cannot find on this host")]
    MissingLibrary { path: PathBuf, library: String },
    /// A path that is not absolute was given where the archive needs one.
    #[error("test host paths must be absolute: {0:?}")]
    NotAbsolute(PathBuf),
    /// The initramfs writer refused an entry or could not write.
    #[error("cannot build the test host's initramfs")]
    Initramfs(#[source] InitramfsError),
    /// The folder for stripped copies could not be made or written.
    #[error("cannot write a stripped copy of {path:?}")]
    StripCopy {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl From<InitramfsError> for PackError {
    fn from(err: InitramfsError) -> Self {
        Self::Initramfs(err)
    }
}

/// How copies of binaries are made smaller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strip {
    /// `objcopy --strip-debug` with this program.
    Debug(PathBuf),
    /// No stripping, with the reason (said once in the log).
    Keep(&'static str),
}

impl Strip {
    /// `objcopy --strip-debug` when `objcopy` is on `PATH` and `wanted`; else keeping debug info.
    pub fn detect(wanted: bool) -> Self {
        if !wanted {
            return Self::Keep("debug info kept as asked (--keep-debug)");
        }
        match which("objcopy") {
            Some(path) => Self::Debug(path),
            None => Self::Keep(
                "objcopy (Debian package binutils) is missing: binaries are packed with their debug info",
            ),
        }
    }
}

/// An initramfs being filled with host files.
#[derive(Debug)]
pub struct Packer {
    archive: Initramfs,
    strip: Strip,
    /// Where stripped copies live until the archive is written.
    scratch: tempfile::TempDir,
    /// Host files whose libraries were already looked up.
    elves: BTreeSet<PathBuf>,
    /// Bytes of file data added (after stripping), for the log.
    bytes: u64,
}

impl Packer {
    /// An empty test host archive.
    pub fn new(strip: Strip) -> Result<Self, PackError> {
        if let Strip::Keep(reason) = &strip {
            tracing::warn!("testhost: {reason}");
        }
        let scratch = tempfile::Builder::new()
            .prefix("hearth-testhost-strip-")
            .tempdir()
            .map_err(|source| PackError::StripCopy {
                path: std::env::temp_dir(),
                source,
            })?;
        Ok(Self {
            archive: Initramfs::new(),
            strip,
            scratch,
            elves: BTreeSet::new(),
            bytes: 0,
        })
    }

    /// Total size of the file data added so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether something is already at `guest_path`.
    pub fn contains(&self, guest_path: &Path) -> bool {
        self.archive.contains(guest_path)
    }

    /// Adds an (empty) directory, unless one is there already.
    pub fn add_dir(&mut self, guest_path: &Path, mode: u32) -> Result<(), PackError> {
        if !self.archive.contains(guest_path) {
            self.archive.add_dir(guest_path, mode)?;
        }
        Ok(())
    }

    /// Adds a file with the given contents.
    pub fn add_bytes(
        &mut self,
        guest_path: &Path,
        bytes: Vec<u8>,
        mode: u32,
    ) -> Result<(), PackError> {
        self.bytes += bytes.len() as u64;
        self.archive.add_file(guest_path, bytes, mode)?;
        Ok(())
    }

    /// Adds a symbolic link, unless something is there already.
    pub fn add_symlink(&mut self, guest_path: &Path, target: &Path) -> Result<(), PackError> {
        if !self.archive.contains(guest_path) {
            self.archive.add_symlink(guest_path, target)?;
        }
        Ok(())
    }

    /// Adds the host file `host_path` (symlinks followed) at `guest_path` as it is: no stripping,
    /// no libraries. A path already packed is left alone.
    pub fn add_plain(&mut self, guest_path: &Path, host_path: &Path) -> Result<(), PackError> {
        if self.archive.contains(guest_path) {
            return Ok(());
        }
        let meta = fs::metadata(host_path).map_err(|source| PackError::Read {
            path: host_path.to_path_buf(),
            source,
        })?;
        self.bytes += meta.len();
        self.archive
            .add_file_from_host(guest_path, host_path, meta.permissions().mode())?;
        Ok(())
    }

    /// Adds a program or data file at `guest_path`, read from `host_path`: an ELF gets its debug
    /// info stripped (when large) and its shared libraries and loader packed at their host paths; a
    /// script gets its interpreter packed. A folder is packed with everything in it.
    pub fn add_program(&mut self, guest_path: &Path, host_path: &Path) -> Result<(), PackError> {
        if !guest_path.is_absolute() {
            return Err(PackError::NotAbsolute(guest_path.to_path_buf()));
        }
        let meta = fs::metadata(host_path).map_err(|source| PackError::Read {
            path: host_path.to_path_buf(),
            source,
        })?;
        if meta.is_dir() {
            return self.add_folder(guest_path, host_path);
        }
        if self.archive.contains(guest_path) {
            return Ok(());
        }
        let head = read_head(host_path)?;
        if head.starts_with(b"\x7fELF") {
            let source = self.stripped(host_path, meta.len())?;
            let len = fs::metadata(&source).map_or(meta.len(), |m| m.len());
            self.bytes += len;
            self.archive
                .add_file_from_host(guest_path, &source, meta.permissions().mode())?;
            self.add_libraries(host_path)?;
        } else {
            self.bytes += meta.len();
            self.archive
                .add_file_from_host(guest_path, host_path, meta.permissions().mode())?;
            if let Some(interpreter) = shebang_interpreter(&head) {
                if interpreter.is_file() {
                    self.add_program(&interpreter, &interpreter)?;
                } else {
                    tracing::warn!(
                        "testhost: {host_path:?} names the interpreter {interpreter:?}, which is not on this host"
                    );
                }
            }
        }
        Ok(())
    }

    /// Adds the folder `host_dir` and everything under it at `guest_dir`.
    fn add_folder(&mut self, guest_dir: &Path, host_dir: &Path) -> Result<(), PackError> {
        self.add_dir(guest_dir, 0o755)?;
        let mut entries: Vec<_> = fs::read_dir(host_dir)
            .and_then(|rd| rd.collect::<Result<Vec<_>, _>>())
            .map_err(|source| PackError::Read {
                path: host_dir.to_path_buf(),
                source,
            })?;
        entries.sort_by_key(fs::DirEntry::file_name);
        for entry in entries {
            let host = entry.path();
            let guest = guest_dir.join(entry.file_name());
            let file_type = entry.file_type().map_err(|source| PackError::Read {
                path: host.clone(),
                source,
            })?;
            if file_type.is_symlink() {
                let target = fs::read_link(&host).map_err(|source| PackError::Read {
                    path: host.clone(),
                    source,
                })?;
                self.add_symlink(&guest, &target)?;
            } else {
                self.add_program(&guest, &host)?;
            }
        }
        Ok(())
    }

    /// Packs the shared libraries and dynamic loader of the ELF `host_path`, each at the path
    /// `ldd` names.
    fn add_libraries(&mut self, host_path: &Path) -> Result<(), PackError> {
        if !self.elves.insert(host_path.to_path_buf()) {
            return Ok(());
        }
        let output = Command::new("ldd")
            .arg(host_path)
            .env("LC_ALL", "C")
            .output()
            .map_err(|source| PackError::Ldd {
                path: host_path.to_path_buf(),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            // Static binaries make `ldd` fail with "not a dynamic executable"; that is fine.
            tracing::debug!(
                "testhost: ldd {host_path:?}: {} {}",
                stdout.trim(),
                stderr.trim()
            );
            return Ok(());
        }
        for dep in parse_ldd(&stdout) {
            match dep {
                LddEntry::Found(lib) => self.add_plain(&lib, &lib)?,
                LddEntry::NotFound(library) => {
                    return Err(PackError::MissingLibrary {
                        path: host_path.to_path_buf(),
                        library,
                    });
                }
            }
        }
        Ok(())
    }

    /// The file to pack for the ELF `host_path`: a copy without debug info when that is worth it
    /// and possible, else the file itself.
    fn stripped(&mut self, host_path: &Path, len: u64) -> Result<PathBuf, PackError> {
        let Strip::Debug(objcopy) = &self.strip else {
            return Ok(host_path.to_path_buf());
        };
        if len < STRIP_MIN_BYTES {
            return Ok(host_path.to_path_buf());
        }
        let name = format!(
            "{}-{}",
            self.elves.len(),
            host_path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("elf")
        );
        let out = self.scratch.path().join(name);
        let status = Command::new(objcopy)
            .arg("--strip-debug")
            .arg(host_path)
            .arg(&out)
            .status()
            .map_err(|source| PackError::StripCopy {
                path: host_path.to_path_buf(),
                source,
            })?;
        if status.success() {
            Ok(out)
        } else {
            tracing::warn!(
                "testhost: objcopy --strip-debug {host_path:?} failed ({status}); packing it unstripped"
            );
            Ok(host_path.to_path_buf())
        }
    }

    /// Writes the archive.
    pub fn write_to(&self, out: &mut impl Write) -> Result<(), PackError> {
        self.archive.write_to(out)?;
        Ok(())
    }
}

/// The first bytes of a file: enough for the ELF magic and a `#!` line.
fn read_head(path: &Path) -> Result<Vec<u8>, PackError> {
    let file = fs::File::open(path).map_err(|source| PackError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut head = Vec::with_capacity(256);
    file.take(256)
        .read_to_end(&mut head)
        .map_err(|source| PackError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(head)
}

/// The interpreter named by a `#!` line, when it is an absolute path.
pub fn shebang_interpreter(head: &[u8]) -> Option<PathBuf> {
    let rest = head.strip_prefix(b"#!")?;
    let line = rest.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let interpreter = line.split_whitespace().next()?;
    interpreter
        .starts_with('/')
        .then(|| PathBuf::from(interpreter))
}

/// One line of `ldd` output that names a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LddEntry {
    /// A library or the dynamic loader, by the path the loader would use.
    Found(PathBuf),
    /// A needed library that is not on the host.
    NotFound(String),
}

/// Parses `ldd`'s output: `name => /path (0x...)`, `/lib64/ld-linux-x86-64.so.2 (0x...)`,
/// `name => not found`; the vDSO (no path) and "statically linked" give nothing.
pub fn parse_ldd(output: &str) -> Vec<LddEntry> {
    let mut entries = Vec::new();
    for line in output.lines() {
        let line = line.trim();
        let (name, target) = match line.split_once("=>") {
            Some((name, target)) => (name.trim(), target.trim()),
            None => ("", line),
        };
        if target.starts_with("not found") {
            entries.push(LddEntry::NotFound(name.to_owned()));
            continue;
        }
        // Drop the load address: the path ends before " (0x".
        let path = match target.rfind(" (0x") {
            Some(at) => target[..at].trim(),
            None => target,
        };
        if path.starts_with('/') {
            entries.push(LddEntry::Found(PathBuf::from(path)));
        }
    }
    entries
}

/// The first executable file named `program` in the directories of `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_of_a_dynamic_binary() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd5a1f2000)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0b1c5d0000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0b1c3ef000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f0b1c6a2000)\n";
        assert_eq!(
            parse_ldd(out),
            vec![
                LddEntry::Found("/lib/x86_64-linux-gnu/libgcc_s.so.1".into()),
                LddEntry::Found("/lib/x86_64-linux-gnu/libc.so.6".into()),
                LddEntry::Found("/lib64/ld-linux-x86-64.so.2".into()),
            ]
        );
    }

    #[test]
    fn ldd_output_with_a_missing_library_and_a_static_binary() {
        assert_eq!(
            parse_ldd("\tlibfoo.so.1 => not found\n"),
            vec![LddEntry::NotFound("libfoo.so.1".into())]
        );
        assert_eq!(parse_ldd("\tstatically linked\n"), vec![]);
        assert_eq!(parse_ldd("\tnot a dynamic executable\n"), vec![]);
        assert_eq!(parse_ldd(""), vec![]);
    }

    #[test]
    fn ldd_paths_with_spaces_keep_them() {
        assert_eq!(
            parse_ldd("\tlibx.so => /opt/my libs/libx.so (0x1000)\n"),
            vec![LddEntry::Found("/opt/my libs/libx.so".into())]
        );
    }

    #[test]
    fn shebang_lines() {
        assert_eq!(
            shebang_interpreter(b"#!/bin/sh\necho hi\n"),
            Some("/bin/sh".into())
        );
        assert_eq!(
            shebang_interpreter(b"#! /usr/bin/python3 -u\n"),
            Some("/usr/bin/python3".into())
        );
        assert_eq!(shebang_interpreter(b"#!env sh\n"), None);
        assert_eq!(shebang_interpreter(b"\x7fELF"), None);
        assert_eq!(shebang_interpreter(b"#!"), None);
    }

    #[test]
    fn packs_a_dynamic_binary_with_its_libraries() {
        let sh = which("sh").expect("sh on PATH");
        let mut packer = Packer::new(Strip::detect(true)).expect("packer");
        packer.add_program(&sh, &sh).expect("pack sh");
        assert!(packer.contains(&sh));
        let libs: Vec<_> = parse_ldd(&String::from_utf8_lossy(
            &Command::new("ldd").arg(&sh).output().expect("ldd").stdout,
        ))
        .into_iter()
        .filter_map(|e| match e {
            LddEntry::Found(p) => Some(p),
            LddEntry::NotFound(_) => None,
        })
        .collect();
        assert!(!libs.is_empty(), "sh should be dynamic on Debian");
        for lib in libs {
            assert!(packer.contains(&lib), "{lib:?} not packed");
        }
        let mut bytes = Vec::new();
        packer.write_to(&mut bytes).expect("write");
        assert!(bytes.len() as u64 >= packer.bytes());
    }

    #[test]
    fn packs_a_script_with_its_interpreter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("run.sh");
        fs::write(&script, "#!/bin/sh\nexit 3\n").expect("write script");
        let mut packer = Packer::new(Strip::Keep("test")).expect("packer");
        packer.add_program(&script, &script).expect("pack script");
        assert!(packer.contains(&script));
        assert!(packer.contains(Path::new("/bin/sh")));
    }

    #[test]
    fn relative_guest_paths_are_refused() {
        let mut packer = Packer::new(Strip::Keep("test")).expect("packer");
        assert!(matches!(
            packer.add_program(Path::new("bin/sh"), Path::new("/bin/sh")),
            Err(PackError::NotAbsolute(_))
        ));
    }
}
