//! The jail, checked from outside on a running jailed `hearth vmm` (through `/proc/<pid>`): its
//! descriptors, environment, namespaces, root and mounts, device nodes, cgroup and limits, rlimits
//! and ids; that it answers its control socket through the jail root; that it leaves nothing behind,
//! and what a killed jailer leaves is cleaned up (`JailConfig::clean_up`); and that a symlink or a
//! hard-linked kernel is refused.
//!
//! Needs root and `/dev/kvm`. The VMM only builds its VM and waits (it is never started), which a
//! PVM `/dev/kvm` allows, so the main test runs natively (cgroup v1 on these machines); the same
//! checks run again inside the QEMU test host (cgroup v2, an initramfs root).

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use hearth_agent::jail::{JailConfig, LaunchError};
use hearth_vmm::kvm_test::{hearth_binary, in_kvm};
use hearth_vmm::{ProcessError, VmConfig, VmState, VsockConfig};

fn require_root_and_kvm() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the jail tests need root (the jail mounts, mknods and changes ids)"
    );
    assert!(
        Path::new("/dev/kvm").exists(),
        "the jail tests need /dev/kvm (the jailed VMM builds a VM)"
    );
}

fn kernel() -> PathBuf {
    match hearth_guest::image::KernelImage::locate() {
        Ok(k) => k.boot_image().to_path_buf(),
        Err(e) => panic!("the guest kernel is not cached ({e}); run `hearth image`"),
    }
}

/// Runs `hearth jail --id ID` (uid/gid 4242, 256 MiB, `extra` flags) around an empty `vmm`, expects
/// it to refuse (exit 1) and returns its stderr.
fn refused_jailer(id: &str, base: &Path, extra: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(hearth_binary())
        .args(["jail", "--id", id, "--uid", "4242", "--gid", "4242"])
        .arg("--jail-base")
        .arg(base)
        .args(extra)
        .args([
            "--memory-limit-mib",
            "256",
            "--",
            "vmm",
            "--config-json",
            "{}",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path:?}: {e}"))
}

fn link(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_link(path)
        .unwrap_or_else(|e| panic!("cannot read the link {path:?}: {e}"))
        .to_string_lossy()
        .into_owned()
}

/// The field after `name:` in `/proc/<pid>/status`, split on whitespace.
fn status_field(status: &str, name: &str) -> Vec<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in the status"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Mount points of the cgroup hierarchies here: (v1 controllers or empty for v2, mount point).
fn cgroup_mounts() -> Vec<(Vec<String>, PathBuf)> {
    read("/proc/self/mountinfo")
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let opts = right.nth(1)?;
            match fstype {
                "cgroup2" => Some((Vec::new(), PathBuf::from(point))),
                "cgroup" => Some((
                    opts.split(',').map(str::to_string).collect(),
                    PathBuf::from(point),
                )),
                _ => None,
            }
        })
        .collect()
}

/// The host folders of the cgroups `pid` is in that carry the memory and cpu limits.
fn limit_cgroups(pid: u32) -> Vec<(String, PathBuf)> {
    let mounts = cgroup_mounts();
    let mut found = Vec::new();
    for line in read(format!("/proc/{pid}/cgroup")).lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let rel = path.trim_start_matches('/');
        if ctrls.is_empty() {
            if let Some((_, point)) = mounts
                .iter()
                .find(|(c, p)| c.is_empty() && p.join(rel).join("memory.max").exists())
            {
                found.push(("v2".to_string(), point.join(rel)));
            }
            continue;
        }
        for ctrl in ["memory", "cpu"] {
            if ctrls.split(',').any(|c| c == ctrl)
                && let Some((_, point)) = mounts.iter().find(|(c, _)| c.iter().any(|x| x == ctrl))
            {
                found.push((ctrl.to_string(), point.join(rel)));
            }
        }
    }
    found
}

/// Removes the test's cgroup parents (the jail removes only the per-VM cgroups), even on failure.
struct CgroupParents(Vec<PathBuf>);

impl Drop for CgroupParents {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Runs a jailed VMM and checks every side of its jail; leaves nothing behind.
fn jailed_vmm_is_isolated() {
    require_root_and_kvm();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("jails");
    let initrd = tmp.path().join("initrd.cpio");
    std::fs::write(&initrd, vec![0u8; 4096]).unwrap();
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, b"not for the VMM").unwrap();

    let mut jc = JailConfig::new(hearth_binary());
    jc.jail_base = base.clone();
    jc.cgroup_parent = format!("hearth-jail-test-{}", std::process::id());
    jc.rlimit_nofile = 333;
    let mut config = VmConfig::new(kernel());
    config.initrd = Some(initrd.clone());
    config.control_socket = Some(PathBuf::from("/control.sock"));
    config.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: PathBuf::from("/v.sock"),
    });
    let id = format!("jail-test-{}", std::process::id());
    let mut jail = jc.jail_for(&id, &config).unwrap();
    jail.rlimit_fsize = Some(1 << 30);

    // A descriptor this process leaks (not close-on-exec) and one it passes on purpose.
    let leaked = std::fs::File::open(&secret).unwrap();
    nix::fcntl::fcntl(
        &leaked,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let (kept_r, _kept_w) = nix::unistd::pipe().unwrap();
    jail.keep_fds.push(kept_r.as_raw_fd());

    jc.prepare(&jail).unwrap();
    let mut parents = CgroupParents(Vec::new());
    let mut vmm = jc.spawn(&jail, &config).unwrap();
    let pid = vmm.vmm_pid();
    // `parents` was declared before `vmm`, so it is dropped after it: the VMM (and with it
    // its cgroup) ends first.
    let cgroups = limit_cgroups(pid);
    parents.0 = cgroups
        .iter()
        .filter_map(|(_, d)| d.parent().map(Path::to_path_buf))
        .collect();
    assert_ne!(
        pid,
        vmm.pid(),
        "the VMM is the jailer's child, not the jailer"
    );
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));

    // Answers its control socket, reached through the jail root.
    assert_eq!(vmm.status().unwrap(), VmState::Created);
    let control = jail.host_path(Path::new("/control.sock"));
    let meta = std::fs::symlink_metadata(&control).unwrap();
    assert!(
        meta.file_type().is_socket() && meta.uid() == jail.uid,
        "{control:?}"
    );

    // A second jailer for the same id is refused and leaves the running jail alone.
    let stderr = refused_jailer(&id, &base, &[]);
    assert!(stderr.contains("in use by another jailer"), "{stderr}");
    assert!(
        control.exists(),
        "the second jailer touched the first one's jail"
    );
    assert_eq!(vmm.status().unwrap(), VmState::Created);

    // Ids: the VM's uid and gid everywhere, no groups, no new privileges; PID 1 of its namespace.
    let status = read(proc_dir.join("status"));
    assert_eq!(status_field(&status, "Uid"), vec![jail.uid.to_string(); 4]);
    assert_eq!(status_field(&status, "Gid"), vec![jail.gid.to_string(); 4]);
    assert!(status_field(&status, "Groups").is_empty(), "{status}");
    assert_eq!(status_field(&status, "NoNewPrivs"), ["1"]);
    assert_eq!(
        status_field(&status, "NSpid").last().map(String::as_str),
        Some("1")
    );

    // An empty environment.
    assert_eq!(std::fs::read(proc_dir.join("environ")).unwrap(), b"");

    // Namespaces of its own.
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        let theirs = link(proc_dir.join("ns").join(ns));
        let ours = link(format!("/proc/self/ns/{ns}"));
        assert_ne!(theirs, ours, "the VMM shares our {ns} namespace");
    }

    // Its root is the jail folder, and it sees only the jail's mounts.
    let root = std::fs::metadata(proc_dir.join("root")).unwrap();
    let jail_root = std::fs::metadata(&jail.root).unwrap();
    assert_eq!((root.dev(), root.ino()), (jail_root.dev(), jail_root.ino()));
    let points: BTreeSet<String> = read(proc_dir.join("mountinfo"))
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect();
    let required = ["/", "/kernel", "/initrd", "/hearth", "/dev"];
    for r in required {
        assert!(
            points.contains(r),
            "{r} is not mounted in the jail: {points:?}"
        );
    }
    for p in &points {
        // Besides those, only the shared libraries of a dynamically linked `hearth`.
        let library = Path::new(p)
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains(".so"));
        assert!(
            required.contains(&p.as_str()) || library,
            "unexpected mount {p} in the jail: {points:?}"
        );
    }
    let entries: BTreeSet<String> = std::fs::read_dir(proc_dir.join("root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for name in ["kernel", "initrd", "hearth", "dev", "control.sock"] {
        assert!(
            entries.contains(name),
            "/{name} missing from the jail: {entries:?}"
        );
    }

    // /dev holds the KVM device, usable by the VM's uid, and the basic nodes only.
    let kvm = std::fs::symlink_metadata(proc_dir.join("root/dev/kvm")).unwrap();
    assert!(kvm.file_type().is_char_device());
    assert_eq!(kvm.rdev(), nix::sys::stat::makedev(10, 232));
    assert_eq!(
        (kvm.uid(), kvm.gid(), kvm.mode() & 0o777),
        (jail.uid, jail.gid, 0o660)
    );
    for e in std::fs::read_dir(proc_dir.join("root/dev")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            ["kvm", "null", "urandom", "userfaultfd"].contains(&name.as_str()),
            "unexpected /dev/{name}"
        );
    }

    // Only the descriptors it was handed, and its own.
    let kept_target = link(format!("/proc/self/fd/{}", kept_r.as_raw_fd()));
    let mut fds = Vec::new();
    for e in std::fs::read_dir(proc_dir.join("fd")).unwrap() {
        let e = e.unwrap();
        let n: i32 = e.file_name().to_string_lossy().parse().unwrap();
        fds.push((n, link(e.path())));
    }
    assert!(
        fds.iter()
            .any(|(n, t)| *n == kept_r.as_raw_fd() && *t == kept_target),
        "the passed pipe is not at fd {}: {fds:?}",
        kept_r.as_raw_fd()
    );
    let tmp_prefix = tmp.path().to_string_lossy().into_owned();
    for (n, target) in &fds {
        assert!(
            !target.starts_with(&tmp_prefix) && *target != secret.to_string_lossy(),
            "fd {n} reaches a host file: {target}"
        );
        let allowed = ["anon_inode:", "socket:", "pipe:", "/dev/"]
            .iter()
            .any(|p| target.starts_with(p));
        assert!(allowed, "unexpected fd {n} -> {target} (all: {fds:?})");
    }

    // Resource limits.
    let limits = read(proc_dir.join("limits"));
    let limit = |name: &str| -> Vec<String> {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..]
            .split_whitespace()
            .take(2)
            .map(str::to_string)
            .collect()
    };
    assert_eq!(limit("Max open files"), ["333", "333"]);
    assert_eq!(
        limit("Max file size"),
        [(1u64 << 30).to_string(), (1u64 << 30).to_string()]
    );

    // The per-VM cgroup with its limits.
    assert!(!cgroups.is_empty(), "no memory/cpu cgroup for the VMM");
    let suffix = Path::new(&jc.cgroup_parent).join(&id);
    let memory = (jail.memory_limit_mib << 20).to_string();
    let quota = jail.cpu_quota_us.unwrap().to_string();
    for (kind, dir) in &cgroups {
        assert!(
            dir.ends_with(&suffix),
            "{kind} cgroup {dir:?} is not the VM's"
        );
        match kind.as_str() {
            "memory" => assert_eq!(read(dir.join("memory.limit_in_bytes")).trim(), memory),
            "cpu" => assert_eq!(read(dir.join("cpu.cfs_quota_us")).trim(), quota),
            _ => {
                assert_eq!(read(dir.join("memory.max")).trim(), memory);
                assert_eq!(read(dir.join("cpu.max")).trim(), format!("{quota} 100000"));
            }
        }
    }
    if cgroups.iter().any(|(k, _)| k != "v2") {
        let kinds: BTreeSet<&str> = cgroups.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kinds, BTreeSet::from(["cpu", "memory"]));
    }

    eprintln!(
        "jailed VMM {pid} checked: cgroups {cgroups:?}, {} fds, {} mounts, root entered by {}",
        fds.len(),
        points.len(),
        if vmm.stderr_tail().contains("pivot_root refused") {
            "move and chroot"
        } else {
            "pivot_root"
        }
    );

    // Stop: the VMM, its jailer, cgroup, mounts and folder all go.
    let exit = vmm.stop().unwrap();
    assert!(exit.success(), "{exit:?}: {}", vmm.stderr_tail());
    drop(vmm);
    assert!(!proc_dir.exists(), "the VMM process {pid} is still there");
    for (_, dir) in &cgroups {
        assert!(!dir.exists(), "the cgroup {dir:?} was left behind");
    }
    drop(parents);
    assert!(!base.join(&id).exists(), "the jail folder was left behind");
    let base_s = base.to_string_lossy().into_owned();
    assert!(
        !read("/proc/self/mountinfo").contains(&base_s),
        "a jail mount leaked into the host"
    );
    drop(leaked);
}

#[test]
fn a_jailed_vmm_sees_only_its_jail() {
    jailed_vmm_is_isolated();
}

#[test]
fn a_jailed_vmm_sees_only_its_jail_in_the_test_host() {
    // cgroup v2 and an initramfs root (no pivot_root: the move-and-chroot path).
    in_kvm(
        "a_jailed_vmm_sees_only_its_jail_in_the_test_host",
        jailed_vmm_is_isolated,
    );
}

#[test]
fn a_symlinked_or_hard_linked_kernel_is_refused() {
    require_root_and_kvm();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("jails");
    let real = tmp.path().join("vmlinux");
    std::fs::write(&real, b"not a kernel").unwrap();
    let symlink = tmp.path().join("vmlinux-link");
    std::os::unix::fs::symlink(&real, &symlink).unwrap();

    // Through the launcher: the VMM never starts, and the error says why.
    let mut jc = JailConfig::new(hearth_binary());
    jc.jail_base = base.clone();
    let mut config = VmConfig::new(&symlink);
    config.control_socket = Some(PathBuf::from("/control.sock"));
    let jail = jc.jail_for("refused-symlink", &config).unwrap();
    match jc.spawn(&jail, &config) {
        Err(LaunchError::Process(ProcessError::ExitedEarly { status, stderr })) => {
            assert!(!status.success());
            assert!(stderr.contains("is a symlink"), "{stderr}");
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("a symlinked kernel was accepted"),
    }

    // Through `hearth jail` itself: a kernel with a second name.
    std::fs::hard_link(&real, tmp.path().join("vmlinux-second-name")).unwrap();
    let stderr = refused_jailer(
        "refused-hard-link",
        &base,
        &["--kernel".as_ref(), real.as_os_str()],
    );
    assert!(stderr.contains("has 2 hard links"), "{stderr}");

    // Nothing was made for either.
    for id in ["refused-symlink", "refused-hard-link"] {
        assert!(!base.join(id).exists(), "a jail folder was made for {id}");
    }
}

/// A jail launcher under `tmp` with a cgroup parent of its own (`hearth-jail-NAME-test-PID`), and
/// a VM configuration whose VMM waits for its start on `/control.sock`.
fn kill_test_jail(tmp: &tempfile::TempDir, name: &str) -> (JailConfig, VmConfig) {
    let mut jc = JailConfig::new(hearth_binary());
    jc.jail_base = tmp.path().join("jails");
    jc.cgroup_parent = format!("hearth-jail-{name}-test-{}", std::process::id());
    let mut config = VmConfig::new(kernel());
    config.control_socket = Some(PathBuf::from("/control.sock"));
    (jc, config)
}

/// Spawns a jailed VMM as `id`: its jail, the process, its limit cgroups (non-empty) and their
/// parents (removed when dropped).
fn spawn_jailed(
    jc: &JailConfig,
    config: &VmConfig,
    id: &str,
) -> (
    hearth_agent::jail::VmJail,
    hearth_vmm::VmmProcess,
    Vec<(String, PathBuf)>,
    CgroupParents,
) {
    let jail = jc.jail_for(id, config).unwrap();
    let vmm = jc.spawn(&jail, config).unwrap();
    let cgroups = limit_cgroups(vmm.vmm_pid());
    let parents = CgroupParents(
        cgroups
            .iter()
            .filter_map(|(_, d)| d.parent().map(Path::to_path_buf))
            .collect(),
    );
    assert!(!cgroups.is_empty());
    (jail, vmm, cgroups, parents)
}

#[test]
fn a_terminated_or_killed_jailed_vmm_leaves_nothing_behind() {
    require_root_and_kvm();
    let tmp = tempfile::tempdir().unwrap();
    let (jc, config) = kill_test_jail(&tmp, "kill");
    for terminate in [true, false] {
        let id = format!("jail-kill-{}-{terminate}", std::process::id());
        let (_jail, mut vmm, cgroups, parents) = spawn_jailed(&jc, &config, &id);
        let pid = vmm.vmm_pid();

        let status = if terminate {
            // SIGTERM to the jailer: forwarded to the VMM, which stops cleanly (status 0).
            let jailer = nix::unistd::Pid::from_raw(vmm.pid() as i32);
            nix::sys::signal::kill(jailer, nix::sys::signal::Signal::SIGTERM).unwrap();
            let status = vmm.wait(std::time::Duration::from_secs(10)).unwrap();
            status.expect("the jailer did not exit after SIGTERM")
        } else {
            // SIGKILL: the VMM dies, its jailer reports it (128 + 9) and cleans up.
            vmm.kill().unwrap()
        };
        let expected = if terminate { 0 } else { 137 };
        assert_eq!(status.code(), Some(expected), "{}", vmm.stderr_tail());
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the VMM {pid} is still there"
        );
        for (_, dir) in &cgroups {
            assert!(!dir.exists(), "the cgroup {dir:?} was left behind");
        }
        assert!(
            !jc.jail_base.join(&id).exists(),
            "the jail folder was left behind"
        );
        drop(vmm);
        drop(parents);
    }
}

#[test]
fn what_a_killed_jailer_leaves_is_cleaned_up() {
    require_root_and_kvm();
    let tmp = tempfile::tempdir().unwrap();
    let (jc, config) = kill_test_jail(&tmp, "orphan");
    let id = format!("jail-orphan-{}", std::process::id());
    let (jail, mut vmm, cgroups, parents) = spawn_jailed(&jc, &config, &id);
    let pid = vmm.vmm_pid();
    // The jailer itself dies: nobody removes the cgroup or the folder, and the VMM, PID 1 of its
    // namespace, lives on (reparented).
    let jailer = nix::unistd::Pid::from_raw(vmm.pid() as i32);
    nix::sys::signal::kill(jailer, nix::sys::signal::Signal::SIGKILL).unwrap();
    let status = vmm.wait(std::time::Duration::from_secs(10)).unwrap();
    assert_eq!(status.and_then(|s| s.code()), None, "killed by a signal");
    assert!(jc.jail_base.join(&id).exists(), "the jail folder stays");
    assert!(cgroups.iter().all(|(_, d)| d.exists()), "the cgroup stays");
    jc.clean_up(&jail).unwrap();
    for (_, dir) in &cgroups {
        assert!(!dir.exists(), "the cgroup {dir:?} was left behind");
    }
    assert!(!jc.jail_base.join(&id).exists(), "the jail folder was left");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while hearth_agent::testing::process_runs(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the orphaned VMM {pid} still runs"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A second clean-up finds nothing to do.
    jc.clean_up(&jail).unwrap();
    drop(vmm);
    drop(parents);
}
