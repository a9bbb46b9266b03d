//! The configuration of one microVM: plain data, validated as a whole.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub use hearth_snapshot::backing::Punch;

/// Smallest guest memory, MiB.
pub const MIN_MEM_MIB: u32 = 128;
/// Largest guest memory, MiB (10 GiB).
pub const MAX_MEM_MIB: u32 = 10 * 1024;
/// Most vCPUs.
pub const MAX_VCPUS: u8 = 8;
/// Default cap on the serial log, bytes.
pub const DEFAULT_SERIAL_LOG_CAP: u64 = 1024 * 1024;

/// The virtio-vsock device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// The host Unix socket: host clients connect here; guest connections to port P arrive at
    /// `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// Guest RAM backed by a file instead of anonymous memory (a template VM): the file is created
/// at `path` (replacing any file there), mapped shared, and becomes the memory file of the VM's
/// snapshot without a copy (`hearth_snapshot::backing`). Meant for a tmpfs mounted with huge
/// pages (`huge=within_size` or `huge=always`): on a disk file system the guest's every write
/// would go to disk. Once snapshotted, such a VM never runs its guest again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RamFileConfig {
    /// The file; a snapshot whose memory file is on the same file system takes it by a rename.
    pub path: PathBuf,
    /// Which all-zero pages become holes at the snapshot (none by default).
    #[serde(default)]
    pub punch: Punch,
}

/// One microVM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The bzImage.
    pub kernel: PathBuf,
    /// The initramfs (newc cpio), placed at the top of low RAM.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Appended to the VMM's base kernel command line.
    #[serde(default)]
    pub cmdline_extra: String,
    /// Guest memory, MiB.
    #[serde(default = "default_mem")]
    pub mem_mib: u32,
    /// vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// The vsock device, if any.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Where the guest's serial console goes; discarded when absent.
    #[serde(default)]
    pub serial_log: Option<PathBuf>,
    /// The most bytes written to the serial log; later output is dropped.
    #[serde(default = "default_serial_cap")]
    pub serial_log_cap: u64,
    /// The control socket; absent means no control socket.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Back guest RAM with a file (a template VM); absent means anonymous memory.
    #[serde(default)]
    pub ram_file: Option<RamFileConfig>,
    /// Which huge pages back anonymous guest RAM (a booted VM's).
    #[serde(default, skip_serializing_if = "HugePages::is_transparent")]
    pub huge_pages: HugePages,
}

/// The huge pages behind a booted VM's anonymous guest RAM (Firecracker's `huge_pages`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HugePages {
    /// Transparent huge pages, advised: 2 MiB pages where the kernel has them free, 4 KiB pages
    /// otherwise. Each new 2 MiB page is zeroed when first touched (twice on hosts booted with
    /// `init_on_alloc=1`, Debian's default).
    #[default]
    Transparent,
    /// 2 MiB pages from the host's hugetlbfs pool (`vm.nr_hugepages`), reserved for the whole of
    /// guest RAM when it is mapped: a pool too small fails the start at once, never the running
    /// guest. Always 2 MiB pages in KVM's page tables, zeroed once. The pages are charged to the
    /// hugetlb cgroup controller, not to the memory limit.
    Hugetlb,
}

impl HugePages {
    fn is_transparent(&self) -> bool {
        *self == HugePages::Transparent
    }
}

fn default_mem() -> u32 {
    MIN_MEM_MIB
}
fn default_vcpus() -> u8 {
    1
}
fn default_serial_cap() -> u64 {
    DEFAULT_SERIAL_LOG_CAP
}

/// A configuration that cannot run; every bad field is listed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// One or more fields are invalid.
    #[error("invalid VM configuration: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// The JSON could not be parsed.
    #[error("cannot parse the VM configuration JSON")]
    Parse(#[source] serde_json::Error),
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline_extra: String::new(),
            mem_mib: default_mem(),
            vcpus: default_vcpus(),
            vsock: None,
            serial_log: None,
            serial_log_cap: default_serial_cap(),
            control_socket: None,
            ram_file: None,
            huge_pages: HugePages::Transparent,
        }
    }

    /// Parses and validates a JSON configuration.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let config: VmConfig = serde_json::from_str(text).map_err(ConfigError::Parse)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every field (not the files' contents), reporting all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut bad = Vec::new();
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            bad.push(format!(
                "mem_mib {} is outside {MIN_MEM_MIB}..={MAX_MEM_MIB}",
                self.mem_mib
            ));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            bad.push(format!("vcpus {} is outside 1..={MAX_VCPUS}", self.vcpus));
        }
        if self.huge_pages == HugePages::Hugetlb {
            if !self.mem_mib.is_multiple_of(2) {
                bad.push(format!(
                    "mem_mib {} is not a whole number of 2 MiB huge pages",
                    self.mem_mib
                ));
            }
            if self.ram_file.is_some() {
                bad.push("huge_pages hugetlb and ram_file exclude each other".to_string());
            }
        }
        if let Some(vsock) = &self.vsock {
            if vsock.guest_cid < 3 || vsock.guest_cid > u64::from(u32::MAX) {
                bad.push(format!(
                    "vsock guest_cid {} must be 3..=4294967295",
                    vsock.guest_cid
                ));
            }
            if vsock.uds_path.as_os_str().is_empty() {
                bad.push("vsock uds_path is empty".to_string());
            }
        }
        if self.cmdline_extra.len() > 2048 {
            bad.push("cmdline_extra is longer than 2048 bytes".to_string());
        }
        if self.cmdline_extra.bytes().any(|b| b == 0 || b == b'\n') {
            bad.push("cmdline_extra contains a NUL or newline".to_string());
        }
        if let Some(ram) = &self.ram_file
            && ram.path.file_name().is_none()
        {
            bad.push(format!("ram_file {} names no file", ram.path.display()));
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(bad))
        }
    }

    /// Guest memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        u64::from(self.mem_mib) << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugetlb_needs_whole_huge_pages_and_no_ram_file_and_is_not_written_when_unused() {
        let mut c = VmConfig::new("/k");
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("huge_pages"), "{json}");
        c.huge_pages = HugePages::Hugetlb;
        c.validate().unwrap();
        let back = VmConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back.huge_pages, HugePages::Hugetlb);
        c.mem_mib = 129;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("2 MiB"), "{err}");
        c.mem_mib = 128;
        c.ram_file = Some(RamFileConfig {
            path: "/t/ram".into(),
            punch: Default::default(),
        });
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("exclude"), "{err}");
    }

    #[test]
    fn defaults_fill_missing_fields() {
        let c = VmConfig::from_json(r#"{"kernel":"/k"}"#).unwrap();
        assert_eq!(c, VmConfig::new("/k"));
    }

    #[test]
    fn every_bad_field_is_reported() {
        let mut c = VmConfig::new("/k");
        c.mem_mib = 64;
        c.vcpus = 9;
        c.vsock = Some(VsockConfig {
            guest_cid: 2,
            uds_path: PathBuf::new(),
        });
        let err = c.validate().unwrap_err().to_string();
        for needle in ["mem_mib 64", "vcpus 9", "guest_cid 2", "uds_path is empty"] {
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(VmConfig::from_json(r#"{"kernel":"/k","memory":5}"#).is_err());
    }
}
