//! The per-VM cgroup of a jailed VMM: `<own cgroup>/<parent>/<id>` with a memory limit and a CPU
//! quota, in cgroup v2 where a v2 hierarchy with the `memory` and `cpu` controllers is mounted,
//! else in the v1 `memory` and `cpu` hierarchies.
//!
//! The hierarchies are found in `/proc/self/mountinfo` (not assumed at `/sys/fs/cgroup`), and the
//! jailer's own place in them in `/proc/self/cgroup`. In v2 the controllers are enabled down the
//! path to the parent (`cgroup.subtree_control`); a cgroup that holds processes cannot delegate
//! them, so the parent must sit under a cgroup without processes, or under the root.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Which cgroup hierarchy to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CgroupVersion {
    /// Unified (v2).
    V2,
    /// The v1 `memory` and `cpu` controllers.
    V1,
}

/// The limits of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Memory limit, bytes (guest RAM plus the VMM's own).
    pub memory_bytes: u64,
    /// CPU time allowed per period, microseconds; `None`: no limit.
    pub cpu_quota_us: Option<u64>,
    /// The CPU period, microseconds.
    pub cpu_period_us: u64,
}

/// Cgroup errors.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither a v2 hierarchy with memory and cpu nor the v1 controllers are mounted.
    #[error(
        "no cgroup hierarchy with the memory and cpu controllers (v2) or v1 memory and cpu mounts"
    )]
    NoHierarchy,
    /// The cgroup version asked for is not mounted with the controllers.
    #[error("cgroup {0:?} with the memory and cpu controllers is not mounted here")]
    VersionMissing(CgroupVersion),
    /// The parent name is not a plain relative path.
    #[error("the cgroup parent {0:?} must be a relative path of plain names")]
    BadParent(String),
    /// The VM id cannot name a cgroup.
    #[error("the VM id {0:?} cannot name a cgroup")]
    BadId(String),
    /// A cgroup of that name exists and cannot be removed (it holds processes).
    #[error("the cgroup {0:?} exists and is in use")]
    InUse(PathBuf),
    /// A cgroup file operation failed.
    #[error("cannot {what} {path:?}")]
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

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    /// The cgroup path the mount shows at its mount point (its `root` field).
    root: String,
    /// Where it is mounted.
    point: PathBuf,
    /// v1: the controllers (super options); v2: empty.
    controllers: Vec<String>,
    v2: bool,
}

/// The cgroup mounts in `mountinfo` text.
fn mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let (fstype, _source, opts) = (right.next()?, right.next()?, right.next()?);
            let (root, point) = (left.get(3)?, left.get(4)?);
            let v2 = match fstype {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            Some(Mount {
                root: root.to_string(),
                point: PathBuf::from(point),
                controllers: opts.split(',').map(str::to_string).collect(),
                v2,
            })
        })
        .collect()
}

/// This process's cgroup path for a v1 controller, or for v2 when `controller` is `None`.
fn own_path(proc_cgroup: &str, controller: Option<&str>) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match controller {
            None => ctrls.is_empty(),
            Some(c) => ctrls.split(',').any(|x| x == c),
        };
        matches.then(|| path.to_string())
    })
}

/// The folder of cgroup `own` under `mount` (a mount may show only part of the hierarchy).
fn dir_of(mount: &Mount, own: &str) -> PathBuf {
    let rel = own.strip_prefix(mount.root.as_str()).unwrap_or(own);
    mount.point.join(rel.trim_start_matches('/'))
}

fn v2_has_controllers(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.controllers")).is_ok_and(|c| {
        let c: Vec<&str> = c.split_whitespace().collect();
        c.contains(&"memory") && c.contains(&"cpu")
    })
}

/// Where the hierarchy in use is mounted, and this process's cgroup folder(s) in it.
enum Located {
    V2 { point: PathBuf, base: PathBuf },
    V1 { memory: PathBuf, cpu: PathBuf },
}

/// The cgroup(s) of one jailed VM.
#[derive(Debug)]
pub struct JailCgroup {
    version: CgroupVersion,
    /// The v2 folder, or one folder per v1 controller (memory, cpu).
    dirs: Vec<PathBuf>,
}

impl JailCgroup {
    /// Creates `<own>/<parent>/<id>` with `limits`, in `version` or the best one mounted.
    pub fn create(
        parent: &str,
        id: &str,
        limits: &CgroupLimits,
        version: Option<CgroupVersion>,
    ) -> Result<Self, CgroupError> {
        match Self::locate(parent, version)? {
            Located::V2 { point, base } => Self::create_v2(&point, &base.join(parent), id, limits),
            Located::V1 { memory, cpu } => {
                Self::create_v1(&memory.join(parent), &cpu.join(parent), id, limits)
            }
        }
    }

    /// The cgroup(s) `create` made for `id` that still exist (a jailer killed before it could
    /// remove them), as seen from this process, which must sit where the jailer started (its
    /// parent: the agent). `None` when there are none.
    pub fn leftover(
        parent: &str,
        id: &str,
        version: Option<CgroupVersion>,
    ) -> Result<Option<Self>, CgroupError> {
        if super::paths::check_id(id).is_err() {
            return Err(CgroupError::BadId(id.to_string()));
        }
        let (version, dirs) = match Self::locate(parent, version)? {
            Located::V2 { base, .. } => (CgroupVersion::V2, vec![base.join(parent).join(id)]),
            Located::V1 { memory, cpu } => (
                CgroupVersion::V1,
                vec![memory.join(parent).join(id), cpu.join(parent).join(id)],
            ),
        };
        let dirs: Vec<PathBuf> = dirs.into_iter().filter(|d| d.is_dir()).collect();
        Ok((!dirs.is_empty()).then_some(JailCgroup { version, dirs }))
    }

    /// Where the hierarchy to use is mounted and where this process sits in it.
    fn locate(parent: &str, version: Option<CgroupVersion>) -> Result<Located, CgroupError> {
        let parent_ok = !parent.is_empty()
            && Path::new(parent)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !parent_ok {
            return Err(CgroupError::BadParent(parent.to_string()));
        }
        let info = read("/proc/self/mountinfo")?;
        let own = read("/proc/self/cgroup")?;
        let all = mounts(&info);
        let v2 = all.iter().find_map(|m| {
            let base = dir_of(m, &own_path(&own, None)?);
            (m.v2 && v2_has_controllers(&m.point)).then(|| (m.point.clone(), base))
        });
        let v1 = |controller: &str| {
            all.iter().find_map(|m| {
                let has = !m.v2 && m.controllers.iter().any(|c| c == controller);
                has.then(|| Some(dir_of(m, &own_path(&own, Some(controller))?)))
                    .flatten()
            })
        };
        let chosen = match version {
            Some(v) => v,
            None if v2.is_some() => CgroupVersion::V2,
            None if v1("memory").is_some() && v1("cpu").is_some() => CgroupVersion::V1,
            None => return Err(CgroupError::NoHierarchy),
        };
        match chosen {
            CgroupVersion::V2 => {
                let (point, base) = v2.ok_or(CgroupError::VersionMissing(chosen))?;
                Ok(Located::V2 { point, base })
            }
            CgroupVersion::V1 => {
                let (Some(memory), Some(cpu)) = (v1("memory"), v1("cpu")) else {
                    return Err(CgroupError::VersionMissing(chosen));
                };
                Ok(Located::V1 { memory, cpu })
            }
        }
    }

    fn create_v2(
        point: &Path,
        parent: &Path,
        id: &str,
        limits: &CgroupLimits,
    ) -> Result<Self, CgroupError> {
        std::fs::create_dir_all(parent).map_err(io("create", parent))?;
        // Delegate memory and cpu down the path from the mount point to the parent.
        let rel = parent.strip_prefix(point).unwrap_or(Path::new(""));
        let mut dir = point.to_path_buf();
        for step in std::iter::once(None).chain(rel.components().map(Some)) {
            if let Some(c) = step {
                dir.push(c);
            }
            let control = dir.join("cgroup.subtree_control");
            let enabled = read(&control)?;
            let missing: Vec<&str> = ["memory", "cpu"]
                .into_iter()
                .filter(|c| !enabled.split_whitespace().any(|e| e == *c))
                .collect();
            if !missing.is_empty() {
                let line = missing.iter().map(|c| format!("+{c}")).collect::<Vec<_>>();
                write(&control, &line.join(" "))?;
            }
        }
        let leaf = fresh_dir(&parent.join(id))?;
        let cg = JailCgroup {
            version: CgroupVersion::V2,
            dirs: vec![leaf.clone()],
        };
        let apply = || -> Result<(), CgroupError> {
            write(&leaf.join("memory.max"), &limits.memory_bytes.to_string())?;
            // Absent without swap accounting; nothing to limit then.
            let _ = std::fs::write(leaf.join("memory.swap.max"), "0");
            let quota = limits
                .cpu_quota_us
                .map_or("max".to_string(), |q| q.to_string());
            write(
                &leaf.join("cpu.max"),
                &format!("{quota} {}", limits.cpu_period_us),
            )
        };
        match apply() {
            Ok(()) => Ok(cg),
            Err(e) => {
                let _ = cg.remove();
                Err(e)
            }
        }
    }

    fn create_v1(
        mem_parent: &Path,
        cpu_parent: &Path,
        id: &str,
        limits: &CgroupLimits,
    ) -> Result<Self, CgroupError> {
        let mut cg = JailCgroup {
            version: CgroupVersion::V1,
            dirs: Vec::new(),
        };
        let mut apply = || -> Result<(), CgroupError> {
            std::fs::create_dir_all(mem_parent).map_err(io("create", mem_parent))?;
            let mem = fresh_dir(&mem_parent.join(id))?;
            cg.dirs.push(mem.clone());
            write(
                &mem.join("memory.limit_in_bytes"),
                &limits.memory_bytes.to_string(),
            )?;
            // Absent without swap accounting.
            let _ = std::fs::write(
                mem.join("memory.memsw.limit_in_bytes"),
                limits.memory_bytes.to_string(),
            );
            std::fs::create_dir_all(cpu_parent).map_err(io("create", cpu_parent))?;
            let cpu = fresh_dir(&cpu_parent.join(id))?;
            cg.dirs.push(cpu.clone());
            write(
                &cpu.join("cpu.cfs_period_us"),
                &limits.cpu_period_us.to_string(),
            )?;
            let quota = limits
                .cpu_quota_us
                .map_or("-1".to_string(), |q| q.to_string());
            write(&cpu.join("cpu.cfs_quota_us"), &quota)
        };
        match apply() {
            Ok(()) => Ok(cg),
            Err(e) => {
                let _ = cg.remove();
                Err(e)
            }
        }
    }

    /// The version in use.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// Its folders: the v2 one, or the v1 memory and cpu ones.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Moves the calling process into the cgroup(s).
    pub fn join_self(&self) -> Result<(), CgroupError> {
        for d in &self.dirs {
            // "0": the writing process, whatever its pid looks like in its pid namespace.
            write(&d.join("cgroup.procs"), "0")?;
        }
        Ok(())
    }

    /// Kills (SIGKILL) every process still in the cgroup(s): v2's `cgroup.kill` where the kernel
    /// has it, else each pid `cgroup.procs` lists.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        for d in &self.dirs {
            let kill = d.join("cgroup.kill");
            if self.version == CgroupVersion::V2 && kill.exists() {
                write(&kill, "1")?;
                continue;
            }
            let procs = d.join("cgroup.procs");
            for pid in read(&procs)?
                .lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        Ok(())
    }

    /// Removes the cgroup(s), waiting up to a second for exiting processes to leave.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut last = Ok(());
        for _ in 0..200 {
            last = Ok(());
            for d in &self.dirs {
                if let Err(e) = std::fs::remove_dir(d)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    last = Err(io("remove", d)(e));
                }
            }
            if last.is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        last
    }
}

/// Creates `dir`, first removing an unused leftover of that name.
fn fresh_dir(dir: &Path) -> Result<PathBuf, CgroupError> {
    if dir.exists() && std::fs::remove_dir(dir).is_err() {
        return Err(CgroupError::InUse(dir.to_path_buf()));
    }
    std::fs::create_dir(dir).map_err(io("create", dir))?;
    Ok(dir.to_path_buf())
}

fn read(path: impl AsRef<Path>) -> Result<String, CgroupError> {
    let path = path.as_ref();
    std::fs::read_to_string(path).map_err(io("read", path))
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io("write", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn mounts_and_own_paths_are_parsed() {
        let m = mounts(MOUNTINFO);
        assert_eq!(m.len(), 3);
        assert!(m[0].controllers.iter().any(|c| c == "cpu") && !m[0].v2);
        assert!(m[2].v2);
        let own = "4:memory:/docker/abc/x\n2:cpu,cpuacct:/a\n0::/u\n";
        assert_eq!(own_path(own, Some("cpu")).as_deref(), Some("/a"));
        assert_eq!(own_path(own, None).as_deref(), Some("/u"));
        assert_eq!(
            dir_of(&m[1], &own_path(own, Some("memory")).unwrap()),
            Path::new("/sys/fs/cgroup/memory/x")
        );
        assert_eq!(
            dir_of(&m[0], "/a"),
            Path::new("/sys/fs/cgroup/cpu,cpuacct/a")
        );
    }

    #[test]
    fn parents_must_be_plain_relative_paths() {
        let limits = CgroupLimits {
            memory_bytes: 1 << 30,
            cpu_quota_us: None,
            cpu_period_us: 100_000,
        };
        for bad in ["", "/abs", "../up", "a/../b"] {
            assert!(matches!(
                JailCgroup::create(bad, "vm", &limits, None),
                Err(CgroupError::BadParent(_))
            ));
        }
    }
}
