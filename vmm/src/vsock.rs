//! Creating the virtio-vsock device with its Unix-socket backend for the builder: the same object
//! is the virtio device (behind the MMIO transport) and the event-loop subscriber.

use crate::arch::memory::GuestMemory;
use crate::config::VsockConfig;
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::vsock::{Vsock, VsockUnixBackend};
use event_manager::MutEventSubscriber;
use std::sync::{Arc, Mutex};

/// The device as the transport sees it, and as the event loop sees it.
pub type VsockParts = (
    Arc<Mutex<dyn VirtioDevice>>,
    Arc<Mutex<dyn MutEventSubscriber + Send>>,
);

/// Binds the Unix-socket backend for `config` (replacing a stale socket file).
pub fn bind_backend(config: &VsockConfig) -> Result<VsockUnixBackend, String> {
    // A socket file left by an earlier VM on this path would make the bind fail.
    if std::fs::symlink_metadata(&config.uds_path)
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
    {
        let _ = std::fs::remove_file(&config.uds_path);
    }
    VsockUnixBackend::new(config.guest_cid, &config.uds_path)
        .map_err(|e| format!("{}: {e}", config.uds_path.display()))
}

/// Creates the vsock device for `config` (binds the host Unix socket).
pub fn create(config: &VsockConfig, mem: &GuestMemory) -> Result<VsockParts, String> {
    let device = create_device(config, mem)?;
    Ok((device.clone(), device))
}

/// Creates the vsock device for `config`, as its concrete type (for snapshots).
pub fn create_device(
    config: &VsockConfig,
    _mem: &GuestMemory,
) -> Result<Arc<Mutex<Vsock<VsockUnixBackend>>>, String> {
    let backend = bind_backend(config)?;
    Ok(Arc::new(Mutex::new(
        Vsock::new(backend).map_err(|e| e.to_string())?,
    )))
}
