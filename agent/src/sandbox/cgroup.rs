//! A cgroup per sandbox, limiting memory, CPU and process count: v2 when its memory controller is
//! available, else the v1 controllers (`memory`, `cpu`, `pids`), each under the agent's own cgroup.
//!
//! Plain files under `/sys/fs/cgroup`: the kernel interface is a handful of writes, so no library.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Lambda gives one vCPU at 1769 MB; CPU is proportional to memory.
const MB_PER_VCPU: u64 = 1769;
const PERIOD_US: u64 = 100_000;
const MAX_PIDS: u32 = 1024;

/// Cgroup errors.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy with a memory controller")]
    NoMemoryController,
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { what, path, source }
}

/// The cgroup(s) of one sandbox.
#[derive(Debug)]
pub struct SandboxCgroup {
    /// One folder per v1 controller, or the one v2 folder.
    dirs: Vec<PathBuf>,
    /// Where peak memory is read.
    peak: PathBuf,
    /// `peak`, opened on first use and read again from offset 0 after: the invoke path reads it
    /// once per invoke, and an open per read cost a path walk each time.
    peak_file: std::sync::OnceLock<Option<std::fs::File>>,
}

/// The agent's own cgroup path for a v1 controller (or v2 when `controller` is empty).
fn own_path(controller: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = if controller.is_empty() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        matches.then(|| path.trim_start_matches('/').to_string())
    })
}

impl SandboxCgroup {
    /// Creates `hearth/<name>` under the agent's cgroup with the limits for `memory_mb`.
    pub fn create(name: &str, memory_mb: u32) -> Result<Self, CgroupError> {
        let bytes = u64::from(memory_mb) * 1024 * 1024;
        let quota = (PERIOD_US * u64::from(memory_mb) / MB_PER_VCPU).max(PERIOD_US / 10);
        let v2_root = Path::new("/sys/fs/cgroup");
        let v2_has_memory = std::fs::read_to_string(v2_root.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        if v2_has_memory {
            let parent = v2_root
                .join(own_path("").unwrap_or_default())
                .join("hearth");
            std::fs::create_dir_all(&parent).map_err(io("create", &parent))?;
            let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory +cpu +pids");
            let dir = parent.join(name);
            std::fs::create_dir(&dir).map_err(io("create", &dir))?;
            let cg = SandboxCgroup {
                dirs: vec![dir.clone()],
                peak: dir.join("memory.peak"),
                peak_file: std::sync::OnceLock::new(),
            };
            write(&dir.join("memory.max"), &bytes.to_string())?;
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
            write(&dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
            write(&dir.join("pids.max"), &MAX_PIDS.to_string())?;
            return Ok(cg);
        }
        let mem_mount = v2_root.join("memory");
        if !mem_mount.join("memory.limit_in_bytes").exists() {
            return Err(CgroupError::NoMemoryController);
        }
        let mut cg = SandboxCgroup {
            dirs: Vec::new(),
            peak: PathBuf::new(),
            peak_file: std::sync::OnceLock::new(),
        };
        for controller in ["memory", "cpu", "pids"] {
            let mount = v2_root.join(controller);
            if !mount.is_dir() {
                continue;
            }
            let dir = mount
                .join(own_path(controller).unwrap_or_default())
                .join("hearth")
                .join(name);
            std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
            cg.dirs.push(dir.clone());
            match controller {
                "memory" => {
                    write(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                    let _ =
                        std::fs::write(dir.join("memory.memsw.limit_in_bytes"), bytes.to_string());
                    cg.peak = dir.join("memory.max_usage_in_bytes");
                }
                "cpu" => {
                    write(&dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                    write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
                _ => write(&dir.join("pids.max"), &MAX_PIDS.to_string())?,
            }
        }
        Ok(cg)
    }

    /// The `cgroup.procs` files a process writes its pid to, to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Peak memory use so far, in MiB (rounded up).
    pub fn peak_memory_mb(&self) -> Option<u64> {
        use std::os::unix::fs::FileExt as _;
        let file = self
            .peak_file
            .get_or_init(|| std::fs::File::open(&self.peak).ok())
            .as_ref()?;
        let mut buf = [0u8; 32];
        let n = file.read_at(&mut buf, 0).ok()?;
        let bytes: u64 = std::str::from_utf8(buf.get(..n)?)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(bytes.div_ceil(1024 * 1024))
    }

    /// Pids in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        self.dirs
            .first()
            .and_then(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Kills every process in the cgroup and removes it (retrying while processes exit).
    pub fn kill_and_remove(&self) {
        for _ in 0..200 {
            let pids = self.pids();
            for pid in &pids {
                if let Some(pid) = rustix::process::Pid::from_raw(*pid) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
            if pids.is_empty()
                && self
                    .dirs
                    .iter()
                    .all(|d| std::fs::remove_dir(d).is_ok() || !d.exists())
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        tracing::warn!(dirs = ?self.dirs, "sandbox cgroup could not be removed");
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io("write", path))
}
