//! The `testhost` role: PID 1 of the QEMU test host (`hearth testhost`).
//!
//! Mounts proc, sys, devtmpfs (keeping the initramfs's own /tmp and /run), /dev/shm, /dev/pts and cgroup2; loads the modules named in
//! `/testhost/spec.json` in order; brings up `lo`; runs the spec's argv with its env in its cwd, output
//! on the console; then prints exactly one line `HEARTH-TESTHOST-EXIT <code>` and powers off.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use serde::{Deserialize, Serialize};

use super::{InitError, Scratch, chain, halt, load_modules, mount_common, sys};
use crate::console;

/// Where the host side puts the spec inside the initramfs.
pub const SPEC_PATH: &str = "/testhost/spec.json";
/// The marker line's prefix.
pub const EXIT_MARKER: &str = "HEARTH-TESTHOST-EXIT";
/// The PATH the command starts with (the spec's env may replace it).
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin";

/// `/testhost/spec.json`: what to run inside the test host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "root")]
    pub cwd: PathBuf,
    /// Module files to load, in order (e.g. irqbypass, kvm, kvm-amd).
    #[serde(default)]
    pub modules: Vec<PathBuf>,
}

fn root() -> PathBuf {
    PathBuf::from("/")
}

impl Spec {
    /// Reads and checks a spec file.
    pub fn read(path: &Path) -> Result<Spec, InitError> {
        let text = std::fs::read_to_string(path).map_err(|source| InitError::SpecRead {
            path: path.to_path_buf(),
            source,
        })?;
        let spec: Spec = serde_json::from_str(&text).map_err(|source| InitError::SpecParse {
            path: path.to_path_buf(),
            source,
        })?;
        if spec.argv.is_empty() {
            return Err(InitError::EmptyArgv);
        }
        Ok(spec)
    }

    /// The command's full environment: defaults, then the spec's entries.
    pub fn environment(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        env.insert("PATH".to_owned(), DEFAULT_PATH.to_owned());
        env.insert("HOME".to_owned(), "/root".to_owned());
        env.insert("HEARTH_IN_TESTHOST".to_owned(), "1".to_owned());
        env.extend(self.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }

    /// The command, ready to spawn (output inherited: the console).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .env_clear()
            .envs(self.environment())
            .current_dir(&self.cwd)
            .stdin(Stdio::null());
        cmd
    }
}

/// The exit code reported for a wait status: the code, or 128 + the signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

/// Prints the marker line on the console and powers off.
fn finish(code: i32) -> ! {
    let mut out = std::io::stdout().lock();
    // Start on a fresh line even if the command's output did not end with one.
    let _ = write!(out, "\n{EXIT_MARKER} {code}\n");
    let _ = out.flush();
    drop(out);
    halt()
}

fn mount_testhost() -> Result<(), InitError> {
    mount_common(Scratch::Rootfs)?;
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    sys::mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        nosuid_nodev,
        Some("mode=1777"),
    )?;
    sys::mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0620,ptmxmode=0666"),
    )?;
    sys::mount(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nosuid_nodev | libc::MS_NOEXEC,
        None,
    )?;
    Ok(())
}

/// Runs the `testhost` role. Never returns.
pub fn run() -> ! {
    if let Err(e) = mount_testhost() {
        console!("{}", chain(&e));
        finish(127);
    }
    let spec = match Spec::read(Path::new(SPEC_PATH)) {
        Ok(s) => s,
        Err(e) => {
            console!("{}", chain(&e));
            finish(127);
        }
    };
    let t = sys::boottime_ms();
    if let Err(e) = load_modules(&spec.modules) {
        // Loud, not fatal: the command says what it misses (e.g. /dev/kvm).
        console!("ERROR loading modules: {}", chain(&e));
    } else if !spec.modules.is_empty() {
        console!(
            "loaded {} modules in {} ms",
            spec.modules.len(),
            sys::boottime_ms().saturating_sub(t)
        );
    }
    if let Err(e) = sys::loopback_up() {
        console!("ERROR: {}", chain(&e));
    }
    let child = match spec.command().spawn() {
        Ok(c) => c,
        Err(e) => {
            console!(
                "cannot start {:?} in {}: {e}",
                spec.argv[0],
                spec.cwd.display()
            );
            finish(127);
        }
    };
    console!(
        "running {:?} at {} ms (kernel uptime)",
        spec.argv,
        sys::boottime_ms()
    );
    let pid = child.id() as i32;
    // Reap every child (orphans included) until ours exits.
    let code = loop {
        match sys::wait_any() {
            Some((p, status)) if p == pid => break exit_code(ExitStatus::from_raw(status)),
            Some(_) => {}
            None => {
                console!("lost track of the command (no children left)");
                break 127;
            }
        }
    };
    finish(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_with_defaults_and_env_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spec.json");
        std::fs::write(
            &path,
            r#"{"argv": ["/bin/true", "x"], "env": {"HEARTH_CACHE_DIR": "/c", "PATH": "/p"}}"#,
        )
        .unwrap();
        let spec = Spec::read(&path).unwrap();
        assert_eq!(spec.cwd, PathBuf::from("/"));
        assert!(spec.modules.is_empty());
        let env = spec.environment();
        assert_eq!(env["PATH"], "/p");
        assert_eq!(env["HOME"], "/root");
        assert_eq!(env["HEARTH_IN_TESTHOST"], "1");
        assert_eq!(env["HEARTH_CACHE_DIR"], "/c");

        std::fs::write(&path, r#"{"argv": []}"#).unwrap();
        assert!(matches!(Spec::read(&path), Err(InitError::EmptyArgv)));
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(
            Spec::read(&path),
            Err(InitError::SpecParse { .. })
        ));
        assert!(matches!(
            Spec::read(&dir.path().join("none")),
            Err(InitError::SpecRead { .. })
        ));
    }

    #[test]
    fn the_command_runs_with_exactly_its_env() {
        let spec = Spec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo \"$HOME:$HEARTH_IN_TESTHOST:$X:$(pwd)\"; exit 3".into(),
            ],
            env: [("X".to_owned(), "y".to_owned())].into(),
            cwd: "/tmp".into(),
            modules: vec![],
        };
        let out = spec.command().output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "/root:1:y:/tmp\n");
        assert_eq!(exit_code(out.status), 3);
        let killed = Command::new("sh")
            .args(["-c", "kill -9 $$"])
            .status()
            .unwrap();
        assert_eq!(exit_code(killed), 137);
    }
}
