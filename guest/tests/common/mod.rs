//! Shared helpers for the tests that boot QEMU TCG (no KVM needed).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_guest::image::initramfs::Initramfs;
use hearth_guest::image::{KernelImage, locate_init};

pub const TIMEOUT: Duration = Duration::from_secs(240);

/// One QEMU at a time: TCG is CPU-bound and the machine is shared.
static QEMU_LOCK: Mutex<()> = Mutex::new(());

pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    QEMU_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn kernel() -> KernelImage {
    KernelImage::locate()
        .or_else(|_| KernelImage::fetch())
        .expect("fetching the guest kernel (hearth image) failed")
}

pub fn init() -> PathBuf {
    locate_init().unwrap_or_else(|e| panic!("{e}"))
}

/// A QEMU process that is killed when dropped.
pub struct Qemu {
    child: Child,
    output: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Qemu {
    pub fn start(kernel: &Path, initrd: &Path, append: &str, extra: &[&str]) -> Qemu {
        let mut child = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "q35,accel=tcg",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
            ])
            .args(["-serial", "stdio", "-no-reboot"])
            .args(extra)
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", append])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start qemu-system-x86_64 (install the Debian package qemu-system-x86)");
        let stdout = child.stdout.take().expect("piped stdout");
        let output = Arc::new(Mutex::new(String::new()));
        let sink = output.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("[guest] {line}");
                let mut out = sink.lock().unwrap();
                out.push_str(&line);
                out.push('\n');
            }
        });
        Qemu {
            child,
            output,
            reader: Some(reader),
        }
    }

    /// Waits for QEMU to exit by itself; returns its output. Panics (after killing it) on timeout.
    pub fn wait(mut self) -> String {
        let began = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if let Some(r) = self.reader.take() {
                    r.join().unwrap();
                }
                let out = self.output.lock().unwrap().clone();
                assert!(
                    status.success(),
                    "qemu exited with {status}; output:\n{out}"
                );
                eprintln!("qemu ran {:?}", began.elapsed());
                return out;
            }
            if began.elapsed() > TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "qemu did not exit within {TIMEOUT:?}; output:\n{}",
                    self.output.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shared libraries and loader `ldd` names for an ELF file.
pub fn ldd(path: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(path).output().expect("ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

pub fn add_with_libs(ir: &mut Initramfs, path: &Path) {
    ir.add_file_from_host(path, path, 0o755).unwrap();
    for lib in ldd(path) {
        if !ir.contains(&lib) {
            ir.add_file_from_host(&lib, &lib, 0o755).unwrap();
        }
    }
}
