//! `/testhost/spec.json`: what the init's `testhost` role runs, with what environment, where, and
//! which kernel modules it loads first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{PASS_ENV, TesthostConfig};

/// The spec the in-VM init reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// The command and its arguments.
    pub argv: Vec<String>,
    /// The command's environment (on top of the init's `PATH` and `HOME`).
    pub env: BTreeMap<String, String>,
    /// The working folder.
    pub cwd: PathBuf,
    /// Kernel modules to load, in order, before the command runs.
    pub modules: Vec<PathBuf>,
}

impl Spec {
    /// The spec for a run: the host's `RUST_LOG`, `HEARTH_LOG`, `RUST_BACKTRACE` (and
    /// `HEARTH_KERNEL`), `HEARTH_IN_TESTHOST=1`, the cache folder and init, `PATH`, then the
    /// caller's variables.
    pub fn new(
        config: &TesthostConfig,
        cwd: &Path,
        cache: &Path,
        init: &Path,
        path: &str,
        modules: Vec<PathBuf>,
    ) -> Self {
        let mut env = BTreeMap::new();
        for key in PASS_ENV.iter().chain(&["HEARTH_KERNEL"]) {
            if let Ok(value) = std::env::var(key) {
                env.insert((*key).to_owned(), value);
            }
        }
        env.insert("HEARTH_IN_TESTHOST".to_owned(), "1".to_owned());
        env.insert("HEARTH_CACHE_DIR".to_owned(), cache.display().to_string());
        env.insert("HEARTH_INIT".to_owned(), init.display().to_string());
        env.insert("PATH".to_owned(), path.to_owned());
        for (key, value) in &config.env {
            env.insert(key.clone(), value.clone());
        }
        Self {
            argv: config.argv.clone(),
            env,
            cwd: cwd.to_path_buf(),
            modules,
        }
    }

    /// The spec as pretty JSON.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing strings, paths from UTF-8 strings and maps of strings cannot fail; fall back
        // to compact output rather than panic if it ever did.
        serde_json::to_vec_pretty(self).unwrap_or_else(|_| b"{}".to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_carries_the_hearth_environment() {
        let mut config = TesthostConfig::new(vec!["sh".into(), "-c".into(), "exit 7".into()]);
        config.env.push(("EXTRA".into(), "1".into()));
        let spec = Spec::new(
            &config,
            Path::new("/work"),
            Path::new("/c"),
            Path::new("/t/hearth-init"),
            "/usr/bin",
            vec![
                "/m/irqbypass.ko".into(),
                "/m/kvm.ko".into(),
                "/m/kvm-amd.ko".into(),
            ],
        );
        assert_eq!(spec.env["HEARTH_IN_TESTHOST"], "1");
        assert_eq!(spec.env["HEARTH_CACHE_DIR"], "/c");
        assert_eq!(spec.env["HEARTH_INIT"], "/t/hearth-init");
        assert_eq!(spec.env["PATH"], "/usr/bin");
        assert_eq!(spec.env["EXTRA"], "1");
        let json: serde_json::Value = serde_json::from_slice(&spec.to_json()).expect("json");
        assert_eq!(json["argv"][2], "exit 7");
        assert_eq!(json["cwd"], "/work");
        assert_eq!(json["modules"][2], "/m/kvm-amd.ko");
    }
}
