//! The guest kernel: Debian's cloud kernel package, downloaded with `apt-get download`, checked
//! against apt's index, unpacked with `dpkg-deb -x` into `<cache>/kernel/<version>/`. Nothing is
//! installed and /boot is never touched.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ImageError, io_err, unique_suffix};

/// The Debian meta-package that names the current cloud kernel package.
pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";

const RECORD_FILE: &str = "kernel.json";
const CURRENT_FILE: &str = "current";

/// The record written to `<cache>/kernel/<version>/kernel.json`. Paths are relative to that folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelRecord {
    pub package: String,
    pub version: String,
    /// sha256 of the .deb, as apt's signed index gives it.
    pub sha256: String,
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
    pub kernel_release: String,
    /// sha256 of the unpacked vmlinuz, to check the cache without the .deb.
    pub vmlinuz_sha256: String,
}

/// A guest kernel ready to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelImage {
    /// Debian package name (e.g. `linux-image-6.1.0-56-cloud-amd64`), or `custom` for HEARTH_KERNEL.
    pub package: String,
    /// Debian package version (e.g. `6.1.192-2`), or `custom`.
    pub version: String,
    /// sha256 of the .deb (or of the HEARTH_KERNEL file when there is no fetched kernel).
    pub sha256: String,
    /// The bzImage, as the package ships it (what QEMU boots as the test host's kernel).
    pub vmlinuz: PathBuf,
    /// The ELF kernel extracted from it by `hearth image` (see [`super::vmlinux`]), when present:
    /// what microVMs boot, as it skips the guest's own decompression.
    pub vmlinux: Option<PathBuf>,
    /// `lib/modules/<release>` of the unpacked package; `None` for a HEARTH_KERNEL without a fetched one.
    pub modules_dir: Option<PathBuf>,
    /// `uname -r` of the kernel (e.g. `6.1.0-56-cloud-amd64`), when known.
    pub kernel_release: Option<String>,
}

impl KernelImage {
    /// The kernel recorded in [`super::cache_dir()`]; `HEARTH_KERNEL` replaces its vmlinuz.
    pub fn locate() -> Result<KernelImage, ImageError> {
        Self::locate_in(&super::cache_dir())
    }

    /// Like [`KernelImage::locate`], with an explicit cache folder.
    pub fn locate_in(cache: &Path) -> Result<KernelImage, ImageError> {
        let found = Self::locate_cached(cache);
        match std::env::var_os("HEARTH_KERNEL").filter(|k| !k.is_empty()) {
            Some(custom) => {
                let custom = PathBuf::from(custom);
                if !custom.is_file() {
                    return Err(ImageError::KernelMissing { path: custom });
                }
                match found {
                    Ok(k) => Ok(KernelImage {
                        vmlinuz: custom,
                        vmlinux: None,
                        ..k
                    }),
                    Err(_) => Ok(KernelImage {
                        package: "custom".into(),
                        version: "custom".into(),
                        sha256: sha256_file(&custom)?,
                        vmlinuz: custom,
                        vmlinux: None,
                        modules_dir: None,
                        kernel_release: None,
                    }),
                }
            }
            None => found,
        }
    }

    fn locate_cached(cache: &Path) -> Result<KernelImage, ImageError> {
        let kernels = cache.join("kernel");
        let current = kernels.join(CURRENT_FILE);
        let version = match std::fs::read_to_string(&current) {
            Ok(v) => v.trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::NotFetched {
                    cache: cache.to_path_buf(),
                });
            }
            Err(e) => return Err(io_err(&current)(e)),
        };
        if version.is_empty() || version.contains('/') || version.starts_with('.') {
            return Err(ImageError::BadRecord {
                path: current,
                source: "bad version in the `current` file".into(),
            });
        }
        let dir = kernels.join(&version);
        let record = read_record(&dir)?;
        let image = record.image(&dir);
        if !image.vmlinuz.is_file() {
            return Err(ImageError::KernelMissing {
                path: image.vmlinuz,
            });
        }
        Ok(image)
    }

    /// `hearth image`: resolves, downloads, verifies and unpacks the current cloud kernel into
    /// [`super::cache_dir()`]. Does nothing more than checking when it is already there.
    pub fn fetch() -> Result<KernelImage, ImageError> {
        Self::fetch_into(&super::cache_dir())
    }

    /// Like [`KernelImage::fetch`], with an explicit cache folder.
    pub fn fetch_into(cache: &Path) -> Result<KernelImage, ImageError> {
        let package = resolve_package(KERNEL_META_PACKAGE)?;
        let (version, expected_sha) = candidate(&package)?;
        let kernels = cache.join("kernel");
        let dir = kernels.join(&version);
        std::fs::create_dir_all(&kernels).map_err(io_err(&kernels))?;

        if let Ok(record) = read_record(&dir) {
            if record.package == package
                && record.sha256 == expected_sha
                && verify_unpacked(&dir, &record).is_ok()
            {
                tracing::info!(%package, %version, "guest kernel already in the cache and verified");
                write_current(&kernels, &version)?;
                return record.image(&dir).with_vmlinux();
            }
            tracing::warn!(dir = %dir.display(), "cached kernel does not verify; fetching again");
        }

        let work = kernels.join(format!(".fetch-{}", unique_suffix()));
        if work.exists() {
            std::fs::remove_dir_all(&work).map_err(io_err(&work))?;
        }
        let result = download_and_unpack(&work, &package, &version, &expected_sha);
        let unpacked = match result {
            Ok(unpacked) => unpacked,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&work);
                return Err(e);
            }
        };
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let renamed = std::fs::rename(&unpacked, &dir);
        let _ = std::fs::remove_dir_all(&work);
        if let Err(e) = renamed {
            // Another fetch may have finished first; accept its result when it verifies.
            let record = read_record(&dir).map_err(|_| io_err(&dir)(e))?;
            verify_unpacked(&dir, &record)?;
        }
        write_current(&kernels, &version)?;
        let record = read_record(&dir)?;
        tracing::info!(%package, %version, sha256 = %record.sha256, "guest kernel fetched");
        record.image(&dir).with_vmlinux()
    }

    /// The kernel a microVM boots: the extracted ELF when there is one, else the bzImage (or
    /// whatever `HEARTH_KERNEL` names; the VMM takes either format).
    pub fn boot_image(&self) -> &Path {
        self.vmlinux.as_deref().unwrap_or(&self.vmlinuz)
    }

    /// Extracts the ELF kernel next to the bzImage unless it is already there (written to a
    /// temporary name, then renamed, so a reader never sees half a file).
    fn with_vmlinux(mut self) -> Result<KernelImage, ImageError> {
        let target = vmlinux_path(&self.vmlinuz);
        if !target.is_file() {
            let image = std::fs::read(&self.vmlinuz).map_err(io_err(&self.vmlinuz))?;
            let elf = super::vmlinux::extract(&image).map_err(|source| ImageError::Vmlinux {
                path: self.vmlinuz.clone(),
                source,
            })?;
            let tmp = target.with_extension(format!("tmp-{}", unique_suffix()));
            std::fs::write(&tmp, &elf).map_err(io_err(&tmp))?;
            std::fs::rename(&tmp, &target).map_err(io_err(&target))?;
            tracing::info!(path = %target.display(), bytes = elf.len(), "extracted the ELF kernel");
        }
        self.vmlinux = Some(target);
        Ok(self)
    }
}

/// Where the ELF kernel extracted from `vmlinuz` lives: beside it, `vmlinuz` renamed `vmlinux`.
fn vmlinux_path(vmlinuz: &Path) -> PathBuf {
    let name = vmlinuz
        .file_name()
        .map(|n| n.to_string_lossy().replacen("vmlinuz", "vmlinux", 1))
        .unwrap_or_else(|| "vmlinux".into());
    let name = if vmlinuz
        .file_name()
        .is_some_and(|n| n.to_string_lossy() == name)
    {
        format!("{name}.elf")
    } else {
        name
    };
    vmlinuz.with_file_name(name)
}

impl KernelRecord {
    fn image(&self, dir: &Path) -> KernelImage {
        KernelImage {
            package: self.package.clone(),
            version: self.version.clone(),
            sha256: self.sha256.clone(),
            vmlinuz: dir.join(&self.vmlinuz),
            vmlinux: Some(vmlinux_path(&dir.join(&self.vmlinuz))).filter(|p| p.is_file()),
            modules_dir: Some(dir.join(&self.modules_dir)),
            kernel_release: Some(self.kernel_release.clone()),
        }
    }
}

fn read_record(dir: &Path) -> Result<KernelRecord, ImageError> {
    let path = dir.join(RECORD_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let record: KernelRecord = serde_json::from_str(&text).map_err(|e| ImageError::BadRecord {
        path: path.clone(),
        source: Box::new(e),
    })?;
    for p in [&record.vmlinuz, &record.modules_dir] {
        if p.is_absolute()
            || p.components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(ImageError::BadRecord {
                path,
                source: "paths in the record must stay inside its folder".into(),
            });
        }
    }
    Ok(record)
}

fn verify_unpacked(dir: &Path, record: &KernelRecord) -> Result<(), ImageError> {
    let vmlinuz = dir.join(&record.vmlinuz);
    let actual = sha256_file(&vmlinuz)?;
    if actual != record.vmlinuz_sha256 {
        return Err(ImageError::Checksum {
            path: vmlinuz,
            expected: record.vmlinuz_sha256.clone(),
            actual,
        });
    }
    let modules = dir.join(&record.modules_dir);
    if !modules.is_dir() {
        return Err(ImageError::BadPackage {
            dir: dir.to_path_buf(),
            what: "modules folder",
        });
    }
    Ok(())
}

fn write_current(kernels: &Path, version: &str) -> Result<(), ImageError> {
    let tmp = kernels.join(format!(".current-{}", unique_suffix()));
    std::fs::write(&tmp, format!("{version}\n")).map_err(io_err(&tmp))?;
    let current = kernels.join(CURRENT_FILE);
    std::fs::rename(&tmp, &current).map_err(io_err(&current))
}

/// Downloads into `work/deb`, checks the sha256, unpacks into `work/tree` and writes the record
/// there. Returns `work/tree`.
fn download_and_unpack(
    work: &Path,
    package: &str,
    version: &str,
    expected_sha: &str,
) -> Result<PathBuf, ImageError> {
    let debs = work.join("deb");
    std::fs::create_dir_all(&debs).map_err(io_err(&debs))?;
    run(Command::new("apt-get")
        .args(["download", "-q"])
        .arg(format!("{package}={version}"))
        .current_dir(&debs))?;
    let deb = std::fs::read_dir(&debs)
        .map_err(io_err(&debs))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| ImageError::BadPackage {
            dir: debs.clone(),
            what: ".deb after apt-get download",
        })?;
    let actual = sha256_file(&deb)?;
    if actual != expected_sha {
        return Err(ImageError::Checksum {
            path: deb,
            expected: expected_sha.to_owned(),
            actual,
        });
    }
    let tree = work.join("tree");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    std::fs::remove_dir_all(&debs).map_err(io_err(&debs))?;

    let boot = tree.join("boot");
    let vmlinuz_name = std::fs::read_dir(&boot)
        .map_err(io_err(&boot))?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .find(|n| n.starts_with("vmlinuz-"))
        .ok_or_else(|| ImageError::BadPackage {
            dir: tree.clone(),
            what: "boot/vmlinuz-*",
        })?;
    let kernel_release = vmlinuz_name.trim_start_matches("vmlinuz-").to_owned();
    let vmlinuz = PathBuf::from("boot").join(&vmlinuz_name);
    let modules_dir = PathBuf::from("lib/modules").join(&kernel_release);
    if !tree.join(&modules_dir).is_dir() {
        return Err(ImageError::BadPackage {
            dir: tree.clone(),
            what: "lib/modules/<release>",
        });
    }
    let record = KernelRecord {
        package: package.to_owned(),
        version: version.to_owned(),
        sha256: actual,
        vmlinuz_sha256: sha256_file(&tree.join(&vmlinuz))?,
        vmlinuz,
        modules_dir,
        kernel_release,
    };
    let path = tree.join(RECORD_FILE);
    let json = serde_json::to_string_pretty(&record).map_err(|e| ImageError::BadRecord {
        path: path.clone(),
        source: Box::new(e),
    })?;
    std::fs::write(&path, json + "\n").map_err(io_err(&path))?;
    Ok(tree)
}

/// Hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io_err(path))?;
    Ok(hex::encode(hasher.finalize()))
}

fn run(cmd: &mut Command) -> Result<String, ImageError> {
    let command = format!("{cmd:?}").replace('"', "");
    tracing::debug!(%command, "running");
    let out = cmd.output().map_err(|source| ImageError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(ImageError::Command {
            command,
            detail: format!("{}: {}", out.status, stderr.trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The real package a meta-package depends on (`apt-cache depends`).
fn resolve_package(meta: &str) -> Result<String, ImageError> {
    let no_candidate = || ImageError::NoCandidate {
        package: meta.to_owned(),
    };
    // apt-cache fails when its lists lack the package: say how to fix that.
    let out = match run(Command::new("apt-cache").args(["depends", meta])) {
        Err(ImageError::Command { .. }) => return Err(no_candidate()),
        other => other?,
    };
    parse_depends(&out).ok_or_else(no_candidate)
}

/// The first `Depends: linux-image-*` line of `apt-cache depends` output.
pub(crate) fn parse_depends(out: &str) -> Option<String> {
    out.lines()
        .map(str::trim)
        .filter_map(|l| l.trim_start_matches('|').strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.starts_with('<'))
        .map(str::to_owned)
}

/// The candidate version apt would download and its SHA256 in apt's (signed) package index, from
/// one `apt-cache show --no-all-versions` (which prints only the candidate's record).
fn candidate(package: &str) -> Result<(String, String), ImageError> {
    let out = run(Command::new("apt-cache").args(["show", "--no-all-versions", package]))?;
    let version = parse_version(&out).ok_or_else(|| ImageError::NoCandidate {
        package: package.to_owned(),
    })?;
    let sha = parse_sha256(&out).ok_or_else(|| ImageError::Command {
        command: format!("apt-cache show --no-all-versions {package}"),
        detail: "no SHA256 field".into(),
    })?;
    Ok((version, sha))
}

pub(crate) fn parse_version(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("Version:"))
        .map(str::trim)
        .find(|v| !v.is_empty() && !v.contains('/') && !v.starts_with('.'))
        .map(str::to_owned)
}

pub(crate) fn parse_sha256(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("SHA256:"))
        .map(str::trim)
        .find(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_ascii_lowercase)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_output() {
        let depends = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_depends(depends).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(parse_depends("x\n  Recommends: foo\n"), None);
        assert_eq!(
            parse_version("Package: p\nVersion: 6.1.192-2\n").as_deref(),
            Some("6.1.192-2")
        );
        assert_eq!(parse_version("Package: p\nVersion: ../x\n"), None);
        assert_eq!(parse_version("N: Unable to locate package p\n"), None);
        let show = "Package: x\nVersion: 1\nSHA256: E7D02B943971EDCB8790E256C02CFAB3BCA6C3D37C1BF25392A57C71300615EE\n";
        assert_eq!(
            parse_sha256(show).as_deref(),
            Some("e7d02b943971edcb8790e256c02cfab3bca6c3d37c1bf25392a57c71300615ee")
        );
        assert_eq!(parse_sha256("SHA256: short\n"), None);
    }

    #[test]
    fn locate_in_an_empty_cache_says_to_fetch() {
        let dir = tempfile::tempdir().unwrap();
        if std::env::var_os("HEARTH_KERNEL").is_none() {
            let err = KernelImage::locate_in(dir.path()).unwrap_err();
            assert!(matches!(err, ImageError::NotFetched { .. }), "{err}");
            assert!(err.to_string().contains("hearth image"));
        }
    }

    #[test]
    fn locate_reads_a_record_and_rejects_escaping_paths() {
        let cache = tempfile::tempdir().unwrap();
        let dir = cache.path().join("kernel/1.0");
        std::fs::create_dir_all(dir.join("boot")).unwrap();
        std::fs::create_dir_all(dir.join("lib/modules/r1")).unwrap();
        std::fs::write(dir.join("boot/vmlinuz-r1"), b"kernel").unwrap();
        let mut record = KernelRecord {
            package: "p".into(),
            version: "1.0".into(),
            sha256: "00".into(),
            vmlinuz: "boot/vmlinuz-r1".into(),
            modules_dir: "lib/modules/r1".into(),
            kernel_release: "r1".into(),
            vmlinuz_sha256: sha256_file(&dir.join("boot/vmlinuz-r1")).unwrap(),
        };
        std::fs::write(
            dir.join(RECORD_FILE),
            serde_json::to_string(&record).unwrap(),
        )
        .unwrap();
        write_current(&cache.path().join("kernel"), "1.0").unwrap();
        if std::env::var_os("HEARTH_KERNEL").is_none() {
            let k = KernelImage::locate_in(cache.path()).unwrap();
            assert_eq!(k.vmlinuz, dir.join("boot/vmlinuz-r1"));
            assert_eq!(
                k.modules_dir.as_deref(),
                Some(dir.join("lib/modules/r1").as_path())
            );
            assert_eq!(k.version, "1.0");
        }
        assert!(verify_unpacked(&dir, &record).is_ok());
        std::fs::write(dir.join("boot/vmlinuz-r1"), b"tampered").unwrap();
        assert!(matches!(
            verify_unpacked(&dir, &record),
            Err(ImageError::Checksum { .. })
        ));
        record.vmlinuz = "../../etc/passwd".into();
        std::fs::write(
            dir.join(RECORD_FILE),
            serde_json::to_string(&record).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            read_record(&dir),
            Err(ImageError::BadRecord { .. })
        ));
    }
}
