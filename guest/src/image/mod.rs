//! The guest image: where the cache folder is, the guest kernel (Debian's cloud kernel, fetched with
//! apt and unpacked into the cache), the init binary, and the microVM initramfs built from them.

pub mod cli;
pub mod initramfs;
mod kernel;
pub mod modules;
pub mod vmlinux;

use std::path::{Path, PathBuf};

pub use kernel::{KERNEL_META_PACKAGE, KernelImage, KernelRecord};

use initramfs::{Initramfs, InitramfsError};
use modules::ModulesError;

/// The guest modules the microVM init loads, in load order.
pub const GUEST_MODULES: [&str; 6] = [
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// Where the microVM init finds its modules inside the initramfs.
pub const INITRAMFS_MODULES_DIR: &str = "/lib/modules";
/// The file listing the initramfs modules' paths, one a line, in load order.
pub const MODULE_ORDER_FILE: &str = "/lib/modules/load-order";

/// Errors from locating, fetching or packing the guest image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "no guest kernel in the cache {cache:?}: run `hearth image` first (or set HEARTH_KERNEL)"
    )]
    NotFetched { cache: PathBuf },
    #[error("the kernel cache record {path:?} is unreadable or invalid; run `hearth image` again")]
    BadRecord {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the guest kernel {path:?} does not exist")]
    KernelMissing { path: PathBuf },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("cannot run `{command}` (is apt installed?)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "apt knows no candidate for {package:?}: run `apt-get update` (Debian 12 main/security sources needed)"
    )]
    NoCandidate { package: String },
    #[error("sha256 mismatch for {path:?}: expected {expected}, got {actual}")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("the unpacked kernel package in {dir:?} has no {what}")]
    BadPackage { dir: PathBuf, what: &'static str },
    #[error("I/O error on {path:?}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no static hearth-init found (tried {tried:?}); build it with `RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p hearth-guest --bin hearth-init --target x86_64-unknown-linux-gnu` or set HEARTH_INIT"
    )]
    InitNotFound { tried: Vec<PathBuf> },
    #[error(
        "{path:?} is not a static executable (it asks for a dynamic loader); the init must be built with +crt-static"
    )]
    InitNotStatic { path: PathBuf },
    #[error(
        "the guest kernel {kernel:?} comes without modules (HEARTH_KERNEL set without a fetched kernel?)"
    )]
    NoModules { kernel: PathBuf },
    #[error("cannot extract the ELF kernel from the bzImage {path:?}")]
    Vmlinux {
        path: PathBuf,
        #[source]
        source: vmlinux::VmlinuxError,
    },
    #[error(transparent)]
    Modules(#[from] ModulesError),
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A name suffix unique to this process and call (threads of one process may race in tests).
pub(crate) fn unique_suffix() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

/// The `target` folder that holds the running executable, if any (its first ancestor named
/// `target` or `target-*`).
fn target_dir_of_current_exe() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .find(|a| {
            a.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == "target" || n.starts_with("target-"))
        })
        .map(Path::to_path_buf)
}

/// The cache folder: `$HEARTH_CACHE_DIR`; else `<workspace>/.cache/hearth` when running from a
/// cargo `target` folder; else `/var/cache/hearth`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HEARTH_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(workspace) =
        target_dir_of_current_exe().and_then(|t| t.parent().map(Path::to_path_buf))
    {
        return workspace.join(".cache").join("hearth");
    }
    PathBuf::from("/var/cache/hearth")
}

/// The static `hearth-init` binary: `$HEARTH_INIT`; else `hearth-init` next to the running
/// executable when static; else `<workspace>/target/x86_64-unknown-linux-gnu/{release,debug}/hearth-init`.
pub fn locate_init() -> Result<PathBuf, ImageError> {
    if let Some(p) = std::env::var_os("HEARTH_INIT").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(ImageError::InitNotFound { tried: vec![p] });
        }
        ensure_static(&p)?;
        return Ok(p);
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(dir.join("hearth-init"));
    }
    if let Some(target) = target_dir_of_current_exe() {
        for profile in ["release", "debug"] {
            candidates.push(
                target
                    .join("x86_64-unknown-linux-gnu")
                    .join(profile)
                    .join("hearth-init"),
            );
        }
    }
    for c in &candidates {
        if c.is_file() && ensure_static(c).is_ok() {
            return Ok(c.clone());
        }
    }
    Err(ImageError::InitNotFound { tried: candidates })
}

/// A copy of `init` without debug info (`objcopy --strip-debug`), cached in
/// `<cache>/init/<key>/hearth-init` where the key hashes the ELF build id and the size; `init`
/// itself when it has no debug info. The release init
/// carries line tables for backtraces (~17 MB); stripped it is ~2 MB, which the guest would otherwise
/// hold in RAM. Falls back to `init` itself, with a warning, when objcopy is unavailable.
pub fn stripped_init(init: &Path) -> Result<PathBuf, ImageError> {
    let bytes = std::fs::read(init).map_err(io_err(init))?;
    let Ok(sections) = modules::sections(&bytes) else {
        return Ok(init.to_path_buf());
    };
    // `.debug_gdb_scripts` is loaded and survives stripping: look at the real debug sections.
    if !sections.iter().any(|(name, _)| is_debug_section(name)) {
        return Ok(init.to_path_buf());
    }
    // The build id names the build; size (and, without a build id, the contents' hash) complete it.
    let key = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        match sections
            .iter()
            .find(|(name, _)| *name == b".note.gnu.build-id")
        {
            Some((_, note)) => h.update(note),
            None => h.update(&bytes),
        }
        h.update(bytes.len().to_le_bytes());
        hex::encode(&h.finalize()[..12])
    };
    drop(bytes);
    let dir = cache_dir().join("init").join(key);
    let out = dir.join("hearth-init");
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let tmp = dir.join(format!(".hearth-init-{}", unique_suffix()));
    let status = std::process::Command::new("objcopy")
        .arg("--strip-debug")
        .arg(init)
        .arg(&tmp)
        .status();
    match status {
        Ok(s) if s.success() => {
            std::fs::rename(&tmp, &out).map_err(io_err(&out))?;
            Ok(out)
        }
        other => {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(init = %init.display(), result = ?other, "objcopy --strip-debug failed; packing the init with its debug info");
            Ok(init.to_path_buf())
        }
    }
}

fn is_debug_section(name: &[u8]) -> bool {
    matches!(
        name,
        b".debug_info" | b".debug_line" | b".debug_str" | b".debug_abbrev"
    )
}

/// Fails unless `path` is an ELF executable without a `PT_INTERP` program header (a static binary).
pub fn ensure_static(path: &Path) -> Result<(), ImageError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    if has_interpreter(&bytes).unwrap_or(true) {
        return Err(ImageError::InitNotStatic {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Whether an ELF64 little-endian file has a `PT_INTERP` header; `None` when it is not such a file.
fn has_interpreter(elf: &[u8]) -> Option<bool> {
    if elf.get(..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
        return None;
    }
    let u64_at =
        |o: usize| -> Option<u64> { Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?)) };
    let u16_at =
        |o: usize| -> Option<u16> { Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?)) };
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let at = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let p_type = u32::from_le_bytes(elf.get(at..at.checked_add(4)?)?.try_into().ok()?);
        if p_type == 3 {
            return Some(true);
        }
    }
    Some(false)
}

/// The microVM initramfs: `/init` = the init binary, the guest modules under `/lib/modules/`
/// (their appended signatures cut: `finit_module` skips verifying them, see
/// [`modules::without_signature`]) with their load order in `/lib/modules/load-order`, mount
/// points and `/dev/console`.
pub fn guest_initramfs(kernel: &KernelImage, init: &Path) -> Result<Vec<u8>, ImageError> {
    ensure_static(init)?;
    let modules_dir = kernel
        .modules_dir
        .as_ref()
        .ok_or_else(|| ImageError::NoModules {
            kernel: kernel.vmlinuz.clone(),
        })?;
    let order = modules::resolve(modules_dir, &GUEST_MODULES)?;
    let mut ir = base_initramfs(init)?;
    let mut order_file = String::new();
    for path in &order {
        let name =
            path.file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| ImageError::BadPackage {
                    dir: modules_dir.clone(),
                    what: "module with a UTF-8 file name",
                })?;
        let inside = format!("{INITRAMFS_MODULES_DIR}/{name}");
        let module = std::fs::read(path).map_err(io_err(path))?;
        ir.add_file(&inside, modules::without_signature(&module), 0o644)?;
        order_file.push_str(&inside);
        order_file.push('\n');
    }
    ir.add_file(MODULE_ORDER_FILE, order_file, 0o644)?;
    Ok(ir.to_bytes()?)
}

/// The part every Hearth initramfs shares: `/init` (debug info stripped, see [`stripped_init`]),
/// the mount points and `/dev/console`.
pub fn base_initramfs(init: &Path) -> Result<Initramfs, ImageError> {
    let mut ir = Initramfs::new();
    ir.add_file_from_host("/init", stripped_init(init)?, 0o755)?;
    for dir in ["/dev", "/proc", "/sys", "/tmp", "/run", "/root", "/etc"] {
        ir.add_dir(dir, if dir == "/tmp" { 0o1777 } else { 0o755 })?;
    }
    ir.add_char_device("/dev/console", 0o600, 5, 1)?;
    Ok(ir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_binary_is_not_static_and_garbage_is_rejected() {
        let exe = std::env::current_exe().unwrap();
        assert!(matches!(
            ensure_static(&exe),
            Err(ImageError::InitNotStatic { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"\x7fELF junk").unwrap();
        assert!(ensure_static(&junk).is_err());
    }

    #[test]
    fn stripped_init_drops_debug_info_and_keeps_plain_files() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"not an ELF").unwrap();
        assert_eq!(stripped_init(&plain).unwrap(), plain);
        // The test binary carries line tables (profile.dev debug = "line-tables-only").
        let exe = std::env::current_exe().unwrap();
        let stripped = stripped_init(&exe).unwrap();
        assert_ne!(stripped, exe);
        let bytes = std::fs::read(&stripped).unwrap();
        let sections = modules::sections(&bytes).unwrap();
        assert!(!sections.iter().any(|(n, _)| is_debug_section(n)));
        assert!(bytes.len() < std::fs::metadata(&exe).unwrap().len() as usize);
        assert_eq!(stripped_init(&exe).unwrap(), stripped, "cached");
    }

    #[test]
    fn cache_dir_is_under_the_workspace_when_run_from_target() {
        // The test binary runs from <workspace>/target/debug/deps.
        if std::env::var_os("HEARTH_CACHE_DIR").is_none() {
            let dir = cache_dir();
            assert!(dir.ends_with(".cache/hearth"), "{dir:?}");
            assert!(
                dir.parent()
                    .unwrap()
                    .parent()
                    .unwrap()
                    .join("Cargo.toml")
                    .is_file(),
                "{dir:?}"
            );
        }
    }

    #[test]
    fn guest_initramfs_needs_modules() {
        let k = KernelImage {
            package: "custom".into(),
            version: "custom".into(),
            sha256: String::new(),
            vmlinuz: "/nonexistent".into(),
            vmlinux: None,
            modules_dir: None,
            kernel_release: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let fake_static = dir.path().join("init");
        // A minimal ELF64 header with no program headers counts as static.
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        std::fs::write(&fake_static, &elf).unwrap();
        assert!(matches!(
            guest_initramfs(&k, &fake_static),
            Err(ImageError::NoModules { .. })
        ));
    }
}
