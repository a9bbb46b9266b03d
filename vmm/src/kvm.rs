//! What kind of `/dev/kvm` this host has: hardware KVM (Intel VMX, AMD SVM), PVM (`kvm_pvm`,
//! software nested virtualization that cannot boot an unpatched kernel), or none.

use std::fmt;
use std::path::Path;

/// The CPU vendor behind hardware KVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HardwareVendor {
    /// Intel VT-x (`kvm_intel`).
    IntelVmx,
    /// AMD-V (`kvm_amd`).
    AmdSvm,
    /// `/dev/kvm` works and no PVM module is loaded, but the vendor module was not recognised.
    Unknown,
}

/// The kind of KVM the host offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvmKind {
    /// Hardware virtualization: Hearth's microVMs run here.
    Hardware(HardwareVendor),
    /// `kvm_pvm`: runs only guest kernels patched for PVM.
    Pvm,
    /// No usable `/dev/kvm`; the string says why.
    Missing(String),
}

/// Errors about the host's KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The host cannot run a Hearth microVM.
    #[error("this host cannot run microVMs: /dev/kvm is {0}")]
    NotHardware(KvmKind),
}

impl KvmKind {
    /// Whether microVMs can run on this host.
    pub fn is_hardware(&self) -> bool {
        matches!(self, KvmKind::Hardware(_))
    }
}

impl fmt::Display for KvmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HINT: &str =
            "run microVM work inside `hearth testhost -- COMMAND`, which provides a hardware KVM";
        match self {
            KvmKind::Hardware(HardwareVendor::IntelVmx) => write!(f, "hardware (Intel VMX)"),
            KvmKind::Hardware(HardwareVendor::AmdSvm) => write!(f, "hardware (AMD SVM)"),
            KvmKind::Hardware(HardwareVendor::Unknown) => {
                write!(f, "hardware (vendor module not recognised)")
            }
            KvmKind::Pvm => write!(
                f,
                "PVM (kvm_pvm, software nested virtualization: it cannot boot the unmodified guest kernel); {HINT}"
            ),
            KvmKind::Missing(why) => write!(f, "missing or unusable ({why}); {HINT}"),
        }
    }
}

/// Detects the kind of `/dev/kvm` this host has.
pub fn detect_kind() -> KvmKind {
    detect_kind_at(Path::new("/dev/kvm"), Path::new("/sys/module"))
}

/// Fails with an error naming `hearth testhost` unless the host has hardware KVM.
pub fn require_hardware() -> Result<(), KvmError> {
    match detect_kind() {
        KvmKind::Hardware(_) => Ok(()),
        other => Err(KvmError::NotHardware(other)),
    }
}

fn detect_kind_at(dev: &Path, modules: &Path) -> KvmKind {
    if let Err(err) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        return KvmKind::Missing(format!("cannot open {}: {err}", dev.display()));
    }
    if modules.join("kvm_pvm").exists() {
        return KvmKind::Pvm;
    }
    if modules.join("kvm_amd").exists() {
        return KvmKind::Hardware(HardwareVendor::AmdSvm);
    }
    if modules.join("kvm_intel").exists() {
        return KvmKind::Hardware(HardwareVendor::IntelVmx);
    }
    KvmKind::Hardware(HardwareVendor::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_missing_and_names_testhost() {
        let dir = tempfile::tempdir().unwrap();
        let kind = detect_kind_at(&dir.path().join("kvm"), dir.path());
        assert!(matches!(kind, KvmKind::Missing(_)));
        assert!(kind.to_string().contains("hearth testhost"));
    }

    #[test]
    fn pvm_module_wins_over_hardware_modules() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        std::fs::write(&dev, b"").unwrap();
        std::fs::create_dir(dir.path().join("kvm_pvm")).unwrap();
        std::fs::create_dir(dir.path().join("kvm_amd")).unwrap();
        let kind = detect_kind_at(&dev, dir.path());
        assert_eq!(kind, KvmKind::Pvm);
        assert!(kind.to_string().contains("hearth testhost"));
        assert!(!kind.is_hardware());
    }

    #[test]
    fn amd_module_is_hardware() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        std::fs::write(&dev, b"").unwrap();
        std::fs::create_dir(dir.path().join("kvm_amd")).unwrap();
        assert_eq!(
            detect_kind_at(&dev, dir.path()),
            KvmKind::Hardware(HardwareVendor::AmdSvm)
        );
    }
}
