//! What a report says about the machine it was measured on.

use serde::{Deserialize, Serialize};

/// The machine a report was measured on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// CPUs this process may use.
    pub cores: usize,
    /// `MemTotal` in MiB.
    pub memory_mib: u64,
    /// The running kernel's release.
    pub kernel: String,
    /// The kind of /dev/kvm (hardware, PVM, missing).
    pub kvm: String,
    /// Whether this runs inside Hearth's QEMU test host (TCG: figures are far slower than hardware).
    pub in_testhost: bool,
    /// The hearth-perf version.
    pub hearth_version: String,
}

impl Machine {
    /// Describes this machine; `kvm` is the caller's description of /dev/kvm.
    pub fn detect(kvm: String) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cpu_model: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".to_owned()),
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            memory_mib: mem_total_kib(&meminfo).unwrap_or(0) / 1024,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned()),
            kvm,
            in_testhost: std::env::var_os("HEARTH_IN_TESTHOST").is_some_and(|v| !v.is_empty()),
            hearth_version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    /// A fixed machine for unit tests of reports.
    #[cfg(test)]
    pub fn fake_for_tests() -> Self {
        Self {
            cpu_model: "Test CPU".into(),
            cores: 2,
            memory_mib: 2048,
            kernel: "6.1.0".into(),
            kvm: "hardware (AMD SVM)".into(),
            in_testhost: true,
            hearth_version: "0.1.0".into(),
        }
    }
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        l.strip_prefix("model name")
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
    })
}

fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        assert_eq!(
            cpu_model("processor\t: 0\nmodel name\t: AMD EPYC Processor\n").as_deref(),
            Some("AMD EPYC Processor")
        );
        assert_eq!(cpu_model("processor: 0\n"), None);
        assert_eq!(
            mem_total_kib("MemTotal:       24684364 kB\nMemFree: 1 kB\n"),
            Some(24_684_364)
        );
        assert_eq!(mem_total_kib("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn this_machine_is_described() {
        let m = Machine::detect("test".into());
        assert!(m.cores >= 1);
        assert!(m.memory_mib > 0);
        assert_ne!(m.kernel, "unknown");
    }
}
