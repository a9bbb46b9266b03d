//! `hearth image`: fetch and verify the guest kernel; optionally write the microVM initramfs.

use std::path::PathBuf;

use anyhow::Context;

use super::{KernelImage, guest_initramfs, locate_init};

/// Arguments of `hearth image`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImageArgs {
    /// Cache folder (default: $HEARTH_CACHE_DIR, else `<workspace>/.cache/hearth`, else /var/cache/hearth).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Also write the microVM initramfs (init + guest modules) to this file.
    #[arg(long, value_name = "FILE")]
    pub initramfs: Option<PathBuf>,
    /// The static init to pack into --initramfs (default: found like `locate_init`).
    #[arg(long, value_name = "FILE", requires = "initramfs")]
    pub init: Option<PathBuf>,
    /// Print the kernel record as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `hearth image`; returns the process exit status.
pub fn run(args: ImageArgs) -> anyhow::Result<u8> {
    let cache = args.cache_dir.unwrap_or_else(super::cache_dir);
    let kernel = KernelImage::fetch_into(&cache)
        .with_context(|| format!("fetching the guest kernel into {}", cache.display()))?;
    // HEARTH_KERNEL still overrides what is booted.
    let kernel = KernelImage::locate_in(&cache).unwrap_or(kernel);
    if args.json {
        let value = serde_json::json!({
            "package": kernel.package,
            "version": kernel.version,
            "sha256": kernel.sha256,
            "vmlinuz": kernel.vmlinuz,
            "vmlinux": kernel.vmlinux,
            "modules_dir": kernel.modules_dir,
            "kernel_release": kernel.kernel_release,
        });
        println!("{value:#}");
    } else {
        println!(
            "kernel: {} {} (sha256 {})",
            kernel.package, kernel.version, kernel.sha256
        );
        println!("vmlinuz: {}", kernel.vmlinuz.display());
        if let Some(v) = &kernel.vmlinux {
            println!("vmlinux: {} (what microVMs boot)", v.display());
        }
        if let Some(m) = &kernel.modules_dir {
            println!("modules: {}", m.display());
        }
    }
    if let Some(out) = args.initramfs {
        let init = match args.init {
            Some(i) => i,
            None => locate_init()?,
        };
        let bytes = guest_initramfs(&kernel, &init)?;
        std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
        println!(
            "initramfs: {} ({} bytes, init {})",
            out.display(),
            bytes.len(),
            init.display()
        );
    }
    Ok(0)
}
