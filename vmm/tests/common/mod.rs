//! Shared helpers of the VM integration tests: build the guest initramfs, start a `hearth vmm`
//! process through the Rust API, wait for the init's Ready frame on the vsock backend.

#![allow(dead_code)]

use hearth_guest::image::{KernelImage, guest_initramfs, locate_init};
use hearth_guest::protocol::{READY_PORT, Ready, client::read_ready};
use hearth_vmm::{VmConfig, VmmProcess, VsockConfig};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a guest gets to report ready (the test host is QEMU TCG: slow).
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A temporary folder with everything one VM needs.
pub struct VmDir {
    pub dir: tempfile::TempDir,
}

impl VmDir {
    pub fn new() -> Self {
        VmDir {
            dir: tempfile::Builder::new()
                .prefix("hearth-vm-")
                .tempdir()
                .expect("temp dir"),
        }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn uds(&self) -> PathBuf {
        self.path("vsock.sock")
    }
}

/// The cached kernel (fails loudly with the command to fetch it).
pub fn kernel() -> KernelImage {
    match KernelImage::locate() {
        Ok(k) => k,
        Err(e) => panic!("the guest kernel is not in the cache ({e}); run `hearth image`"),
    }
}

/// The microVM initramfs with hearth-init, written into `dir`.
pub fn guest_initrd(dir: &VmDir) -> PathBuf {
    let init = match locate_init() {
        Ok(p) => p,
        Err(e) => panic!("hearth-init is not built ({e})"),
    };
    let bytes = match guest_initramfs(&kernel(), &init) {
        Ok(b) => b,
        Err(e) => panic!("cannot build the guest initramfs: {e}"),
    };
    let path = dir.path("initrd.cpio");
    std::fs::write(&path, bytes).expect("write initramfs");
    path
}

/// A configuration with vsock, a serial log and a control socket inside `dir`.
pub fn config(
    dir: &VmDir,
    initrd: &Path,
    mem_mib: u32,
    vcpus: u8,
    cmdline_extra: &str,
) -> VmConfig {
    let mut c = VmConfig::new(kernel().boot_image());
    c.initrd = Some(initrd.to_path_buf());
    c.mem_mib = mem_mib;
    c.vcpus = vcpus;
    c.cmdline_extra = cmdline_extra.to_string();
    c.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: dir.uds(),
    });
    c.serial_log = Some(dir.path("serial.log"));
    c.control_socket = Some(dir.path("control.sock"));
    c
}

/// The end of the serial log, for error messages.
pub fn serial_tail(dir: &VmDir) -> String {
    let text = std::fs::read_to_string(dir.path("serial.log")).unwrap_or_default();
    let start = text.len().saturating_sub(3000);
    text.get(start..).unwrap_or("").to_string()
}

/// Listens where the guest's connection to host port 1024 arrives.
pub fn ready_listener(dir: &VmDir) -> UnixListener {
    let path = PathBuf::from(format!("{}_{READY_PORT}", dir.uds().display()));
    let l = UnixListener::bind(&path).expect("bind the ready socket");
    l.set_nonblocking(true).expect("non-blocking");
    l
}

/// Waits for the init's Ready frame, or says clearly why it did not come.
pub fn wait_ready(
    listener: &UnixListener,
    vmm: &mut VmmProcess,
    timeout: Duration,
) -> Result<(UnixStream, Ready), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .map_err(|e| e.to_string())?;
                let (_, ready) = read_ready(&mut stream).map_err(|e| format!("bad Ready: {e}"))?;
                return Ok((stream, ready));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("accept failed: {e}")),
        }
        if let Some(status) = vmm.wait(Duration::ZERO).map_err(|e| e.to_string())? {
            return Err(format!(
                "the VM exited ({status}) before the guest reported ready"
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!("the guest did not report ready within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` still exists (a zombie counts as gone: it is not running).
pub fn process_exists(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Unwraps a control result, or fails with the VMM's exit status and stderr.
pub fn ok<T>(vmm: &mut VmmProcess, what: &str, r: Result<T, hearth_vmm::ProcessError>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => {
            let status = vmm.wait(Duration::from_secs(2));
            panic!(
                "{what}: {e} ({e:?}); VMM status {status:?}; stderr:\n{}",
                vmm.stderr_tail()
            )
        }
    }
}
