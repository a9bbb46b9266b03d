//! Templates and pools of restored microVMs, end to end with real `hearth vmm` processes and the
//! real guest (through the QEMU test host where this machine has no hardware KVM): a template is
//! built, reused and rebuilt when an input changes; a claim returns a working VM (the echo
//! function runs in it); a drained pool makes claimants wait or fail with a clear error and
//! leaks no VMM process (a refill restores into the VMM spawned ahead for it), and a changed
//! initramfs retires its idle VMs for a new template; jailed pools (as `hearth serve` runs them)
//! build their templates in jails (the snapshot files belong to a jail uid) and restore every VM
//! in its jail, checked from `/proc` (its uid, namespaces, root, mounts, devices and cgroup), and
//! a pooled VM whose jailer was killed is replaced, never handed out, and leaves no process,
//! cgroup or jail folder. The memory of idle pooled VMs and the claim latency are printed.
//!
//! Needs the `hearth` binary (`cargo build --bins`), the static `hearth-init` and the cached guest
//! kernel (`hearth image`); missing any fails loudly.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use hearth_agent::pool::{
    IdleVm, PoolConfig, PoolError, PoolSet, PoolSize, PooledVm, Template, TemplateSpec, VmHome,
};
use hearth_agent::sandbox::microvm::{MicrovmConfig, MicrovmSandbox};
use hearth_agent::sandbox::{Environment, InvokeRequest};
use hearth_agent::testing::{self, process_runs, watchdog};
use hearth_vmm::kvm_test::{hearth_binary, in_kvm, in_kvm_with};

/// Generous: the nested guest runs under QEMU TCG.
const BOOT: Duration = Duration::from_secs(240);
const RESTORE: Duration = Duration::from_secs(120);
/// Long enough for every template build and restore a test asks for, and shorter than nextest's
/// limit for these tests (8 minutes), so that a pool that never fills fails in [`assert_filled`].
const FILL: Duration = Duration::from_secs(420);

/// Waits until every pool is full; fails within [`FILL`], with the pools' counters and why each
/// last failed, when one does not fill.
async fn assert_filled(pools: &PoolSet, what: &str) {
    assert!(
        pools.wait_full(FILL).await,
        "{what}: {:?}; last failures: {:?}",
        pools.stats(),
        pools.last_failures()
    );
}

fn kernel() -> PathBuf {
    match hearth_guest::image::KernelImage::locate() {
        Ok(k) => k.boot_image().to_path_buf(),
        Err(e) => panic!("the guest kernel is not in the cache ({e}); run `hearth image`"),
    }
}

fn init() -> PathBuf {
    hearth_guest::image::locate_init()
        .unwrap_or_else(|e| panic!("hearth-init is not built static ({e}); see guest/src/main.rs"))
}

/// The microVM initramfs, written to `path`.
fn write_initrd(path: &Path) {
    let k = hearth_guest::image::KernelImage::locate().expect("the guest kernel");
    let bytes = hearth_guest::image::guest_initramfs(&k, &init()).expect("the guest initramfs");
    std::fs::write(path, bytes).expect("write the initramfs");
}

fn pool_config(dir: &Path, initrd: PathBuf, sizes: &[(u32, usize)]) -> PoolConfig {
    let mut c = PoolConfig::new(hearth_binary(), kernel(), initrd, dir.to_path_buf());
    c.sizes = sizes
        .iter()
        .map(|&(mem_mib, target)| PoolSize { mem_mib, target })
        .collect();
    c.boot_timeout = BOOT;
    c.restore_timeout = RESTORE;
    c.check_interval = Duration::from_millis(200);
    c.retry_pause = Duration::from_millis(500);
    c
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// The `hearth vmm` processes and `hearth jail` jailers that are children of this process.
fn vmm_children() -> Vec<u32> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // "pid (comm) state ppid ...": the fields after the last ')'.
        let mut rest = stat.rsplit(')').next().unwrap_or("").split_whitespace();
        let state = rest.next().unwrap_or("");
        let ppid = rest.next().and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(me) || state == "Z" || state == "X" {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let mut args = cmdline.split(|&b| b == 0);
        let _binary = args.next();
        if matches!(args.next(), Some(b"vmm" | b"jail")) {
            found.push(pid);
        }
    }
    found.sort_unstable();
    found
}

fn idle_pids(pools: &PoolSet, mem_mib: u32) -> Vec<u32> {
    pools.idle_vms(mem_mib).iter().map(|vm| vm.pid).collect()
}

/// The field after `name:` in `/proc/<pid>/status`, split on whitespace.
fn status_field(pid: u32, name: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in the status of {pid}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The host folders of the cgroups of `pid` whose path ends with `id` (the per-VM ones).
fn jail_cgroups(pid: u32, id: &str) -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    // (v1 controllers, or none for v2; mount point)
    let mounts: Vec<(Vec<String>, PathBuf)> = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = PathBuf::from(left.split(' ').nth(4)?);
            let mut right = right.split(' ');
            match (right.next()?, right.nth(1)?) {
                ("cgroup2", _) => Some((Vec::new(), point)),
                ("cgroup", opts) => Some((opts.split(',').map(str::to_string).collect(), point)),
                _ => None,
            }
        })
        .collect();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut dirs = Vec::new();
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next(), parts.next(), parts.next());
        let (Some(ctrls), Some(path)) = (ctrls, path) else {
            continue;
        };
        if !path.ends_with(&format!("/{id}")) {
            continue;
        }
        let ctrls: Vec<&str> = ctrls.split(',').filter(|c| !c.is_empty()).collect();
        for (mount_ctrls, point) in &mounts {
            let same = if ctrls.is_empty() {
                mount_ctrls.is_empty()
            } else {
                ctrls.iter().all(|c| mount_ctrls.iter().any(|m| m == c))
            };
            let dir = point.join(path.trim_start_matches('/'));
            if same && dir.is_dir() && !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    dirs
}

/// Checks from `/proc` that an idle pooled VM runs jailed (as `tests/jail.rs` checks a booted
/// VMM): under a jail uid, PID 1 of its own pid namespace, in its own mount and network
/// namespaces, rooted in its jail with the template's snapshot files mounted, `/dev/kvm` (and
/// `/dev/userfaultfd` where the host has it), in a cgroup of its own. Returns its cgroups.
fn check_jailed(vm: &IdleVm, jail_base: &Path) -> Vec<PathBuf> {
    let pid = vm.pid;
    let jail = vm
        .jail
        .as_ref()
        .expect("a pooled VM of a jailed pool has a jail");
    assert!(jail.root.starts_with(jail_base), "{:?}", jail.root);
    assert_ne!(Some(pid), vm.jailer_pid, "the VMM is the jailer's child");
    for id in status_field(pid, "Uid")
        .iter()
        .chain(&status_field(pid, "Gid"))
    {
        let id: u32 = id.parse().expect("an id");
        assert!(
            id >= hearth_agent::jail::UID_BASE,
            "the pooled VMM {pid} runs as {id}, not a jail uid"
        );
    }
    assert_eq!(
        status_field(pid, "NSpid").last().map(String::as_str),
        Some("1")
    );
    let ns = |pid: &str, ns: &str| std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
    for kind in ["mnt", "pid", "net"] {
        assert_ne!(
            ns(&pid.to_string(), kind),
            ns("self", kind),
            "the pooled VMM shares our {kind} namespace"
        );
    }
    let root = std::fs::metadata(format!("/proc/{pid}/root")).expect("its root");
    let jail_root = std::fs::metadata(&jail.root).expect("the jail root");
    use std::os::unix::fs::MetadataExt;
    assert_eq!((root.dev(), root.ino()), (jail_root.dev(), jail_root.ino()));
    let mountinfo =
        std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("its mountinfo");
    let points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .collect();
    for p in ["/", "/snapshot.state", "/snapshot.mem", "/dev"] {
        assert!(
            points.contains(&p),
            "{p} is not mounted in the jail: {points:?}"
        );
    }
    let in_jail = |p: &str| PathBuf::from(format!("/proc/{pid}/root{p}"));
    assert!(in_jail("/dev/kvm").exists());
    let host_uffd = std::fs::metadata("/dev/userfaultfd")
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type()));
    assert_eq!(
        in_jail("/dev/userfaultfd").exists(),
        host_uffd,
        "/dev/userfaultfd in the jail as on the host"
    );
    // The snapshot files are read-only to the VMM and readable by its uid.
    let mem = std::fs::metadata(in_jail("/snapshot.mem")).expect("the memory file");
    // 0644 from the snapshot writer (`hearth_snapshot::FILE_MODE`), root's.
    assert_eq!((mem.uid(), mem.mode() & 0o777), (0, 0o644));
    let cgroups = jail_cgroups(pid, &jail.id);
    assert!(!cgroups.is_empty(), "no cgroup of its own for {pid}");
    cgroups
}

/// Checks the templates under `root`, made by jailed VMMs: their snapshot files belong to root
/// (handed over by the agent) and are readable by all, their folders are root's alone again, the
/// templates' folder is a tmpfs, and no template VM's jail is left in
/// `jail_base`; each manifest names the jail uid its VMM ran under.
fn check_templates_made_jailed(root: &Path, jail_base: &Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let templates: Vec<PathBuf> = std::fs::read_dir(root)
        .expect("list the templates")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("template.json").is_file())
        .collect();
    assert_eq!(templates.len(), 2, "one template per pool: {templates:?}");
    // A tmpfs (the pools mount one there unless it is one already, as in the test host), so
    // each template VM's RAM file, on huge pages, was its memory file.
    let fs = nix::sys::statfs::statfs(root).expect("statfs the templates' folder");
    assert_eq!(
        fs.filesystem_type(),
        nix::sys::statfs::TMPFS_MAGIC,
        "the templates' folder {root:?} is no tmpfs"
    );
    for t in &templates {
        let folder = std::fs::metadata(t).expect("the template folder");
        assert_eq!(
            (folder.uid(), folder.permissions().mode() & 0o777),
            (0, 0o700),
            "{t:?} is root's alone"
        );
        for name in ["vm.state", "vm.mem"] {
            let meta = std::fs::metadata(t.join(name)).expect("a snapshot file");
            assert_eq!(meta.uid(), 0, "{name} of {t:?} is root's");
            assert_eq!(meta.permissions().mode() & 0o777, 0o644, "{name} readable");
        }
        let manifest = std::fs::read_to_string(t.join("template.json")).expect("the manifest");
        let manifest: serde_json::Value = serde_json::from_str(&manifest).expect("JSON");
        let uid = manifest["jail_uid"].as_u64().unwrap_or(0);
        assert!(
            uid >= u64::from(hearth_agent::jail::UID_BASE),
            "the template VM of {t:?} ran jailed: {manifest}"
        );
        eprintln!("template {t:?} made by a VMM jailed as uid {uid}");
    }
    let left: Vec<_> = std::fs::read_dir(jail_base)
        .expect("list the jails")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("hearth-template-"))
        .collect();
    assert!(left.is_empty(), "template VM jails left: {left:?}");
}

/// Page faults and CPU time of process `pid` so far, from `/proc/<pid>/stat`.
fn vmm_counters(pid: u32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After "pid (comm)": state is field 3; minflt 10, majflt 12, utime 14, stime 15.
    let rest: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let field = |n: usize| {
        rest.get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // /proc counts CPU time in USER_HZ ticks, 100 a second on x86_64.
    let ticks = 100;
    format!(
        "{} minor and {} major page faults, {} ms user and {} ms system CPU",
        field(10),
        field(12),
        field(14) * 1000 / ticks,
        field(15) * 1000 / ticks
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print_idle_memory(pools: &PoolSet, mem_mib: u32) {
    for m in pools
        .idle_vms(mem_mib)
        .into_iter()
        .filter_map(|vm| vm.memory)
    {
        eprintln!(
            "idle pooled VM, {mem_mib} MiB: RSS {} KiB (guest RAM {} KiB, the VMM's own {} KiB), \
             PSS {} KiB (guest RAM {} KiB, the VMM's own {} KiB)",
            m.rss_kib,
            m.guest_rss_kib,
            m.own_rss_kib(),
            m.pss_kib,
            m.guest_pss_kib,
            m.own_pss_kib()
        );
    }
}

#[test]
fn a_template_is_built_reused_and_rebuilt_when_an_input_changes() {
    in_kvm(
        "a_template_is_built_reused_and_rebuilt_when_an_input_changes",
        || {
            watchdog(Duration::from_secs(900));
            let dir = tempfile::tempdir().expect("temp dir");
            let initrd = dir.path().join("initrd.cpio");
            write_initrd(&initrd);
            let root = dir.path().join("templates");
            let spec = TemplateSpec {
                hearth_binary: hearth_binary(),
                kernel: kernel(),
                initrd: initrd.clone(),
                cmdline_extra: "init_on_free=1".into(),
                mem_mib: 128,
                vcpus: 1,
            };
            let cancel = AtomicBool::new(false);

            let t = Instant::now();
            let (first, built) = Template::ensure(&root, &spec, BOOT, &cancel, None)
                .unwrap_or_else(|e| panic!("build the template: {e:?}"));
            assert!(built, "the first ensure builds the template");
            let mem = std::fs::metadata(&first.files.mem).expect("the memory file");
            eprintln!(
                "template built in {:.0} ms: {} ({} bytes of memory file, {} allocated)",
                ms(t.elapsed()),
                first.dir.display(),
                std::os::unix::fs::MetadataExt::size(&mem),
                std::os::unix::fs::MetadataExt::blocks(&mem) * 512
            );
            assert!(first.dir.starts_with(&root));
            assert!(
                first.dir.to_string_lossy().contains(&first.digest[..24]),
                "the folder is keyed by the digest"
            );

            let t = Instant::now();
            let (again, built) =
                Template::ensure(&root, &spec, BOOT, &cancel, None).expect("find the template");
            assert!(!built, "an unchanged template is reused");
            assert_eq!(again.dir, first.dir);
            eprintln!("template reused in {:.1} ms", ms(t.elapsed()));

            // Changed initramfs bytes (zero padding after the archive: the kernel skips it).
            let mut bytes = std::fs::read(&initrd).expect("read the initramfs");
            bytes.extend_from_slice(&[0u8; 4096]);
            std::fs::write(&initrd, bytes).expect("rewrite the initramfs");
            let (rebuilt, built) = Template::ensure(&root, &spec, BOOT, &cancel, None)
                .unwrap_or_else(|e| panic!("rebuild the template: {e:?}"));
            assert!(built, "a changed initramfs rebuilds the template");
            assert_ne!(rebuilt.digest, first.digest);
            assert_ne!(rebuilt.dir, first.dir);
            assert!(!first.dir.exists(), "the stale template folder was removed");
            let left: Vec<_> = std::fs::read_dir(&root)
                .expect("list templates")
                .flatten()
                .map(|e| e.file_name())
                .collect();
            assert_eq!(left.len(), 1, "one template of this shape: {left:?}");

            // The rebuilt template restores into a VM whose init answers and takes a refresh.
            let t = Instant::now();
            let mut vm = PooledVm::restore(
                &hearth_binary(),
                &rebuilt,
                VmHome::Folder(dir.path().join("vm")),
                RESTORE,
                &cancel,
            )
            .unwrap_or_else(|e| panic!("restore the template: {e:?}"));
            let restored = t.elapsed();
            let pid = vm.pid().expect("a VMM");
            let t = Instant::now();
            let activated = vm
                .activate("template-test")
                .unwrap_or_else(|e| panic!("activate: {e:?}"));
            eprintln!("activation: {activated:?}");
            let offset = activated.clock_offset_ns;
            eprintln!(
                "restored and paused in {:.0} ms; resumed and refreshed in {:.1} ms (clock offset \
                 {:.3} ms)",
                ms(restored),
                ms(t.elapsed()),
                offset as f64 / 1e6
            );
            drop(vm);
            assert!(!process_runs(pid), "a dropped pooled VM leaves no VMM");
            assert!(!dir.path().join("vm").exists(), "its folder is removed");

            // The same template restored jailed, as `hearth serve`'s pools do: the VMM, under a
            // uid of its own, reads the template's files through the jail's read-only mounts.
            let jail_base = dir.path().join("jails");
            let mut jails = hearth_agent::jail::JailConfig::new(hearth_binary());
            jails.jail_base = jail_base.clone();
            jails.cgroup_parent = format!("hearth-template-test-{}", std::process::id());
            let home = VmHome::Jail {
                jails,
                id: "template-test-jailed".into(),
            };
            let t = Instant::now();
            let mut vm = PooledVm::restore(&hearth_binary(), &rebuilt, home, RESTORE, &cancel)
                .unwrap_or_else(|e| panic!("restore the template jailed: {e:?}"));
            let restored = t.elapsed();
            let pid = vm.pid().expect("a VMM");
            assert_ne!(vm.jailer_pid(), Some(pid));
            let uid: u32 = status_field(pid, "Uid")[0].parse().expect("a uid");
            assert!(uid >= hearth_agent::jail::UID_BASE, "the VMM runs as {uid}");
            let activated = vm
                .activate("template-test-jailed")
                .unwrap_or_else(|e| panic!("activate the jailed VM: {e:?}"));
            eprintln!(
                "jailed: restored and paused in {:.0} ms; activation {activated:?}",
                ms(restored)
            );
            let cgroups = jail_cgroups(pid, "template-test-jailed");
            assert!(
                !cgroups.is_empty(),
                "the jailed VMM has no cgroup of its own"
            );
            drop(vm);
            assert!(!process_runs(pid), "a dropped jailed VM leaves no VMM");
            assert!(
                !jail_base.join("template-test-jailed").exists(),
                "its jail is removed"
            );
            for c in &cgroups {
                assert!(!c.exists(), "its cgroup {c:?} is left");
                let _ = c.parent().map(std::fs::remove_dir);
            }
        },
    );
}

#[test]
fn a_drained_pool_makes_claimants_wait_or_fail_and_leaks_nothing() {
    in_kvm(
        "a_drained_pool_makes_claimants_wait_or_fail_and_leaks_nothing",
        || {
            watchdog(Duration::from_secs(900));
            block_on(async {
                let dir = tempfile::tempdir().expect("temp dir");
                let initrd = dir.path().join("initrd.cpio");
                write_initrd(&initrd);
                let pools = PoolSet::start(pool_config(dir.path(), initrd.clone(), &[(128, 1)]))
                    .expect("pools");
                assert_filled(&pools, "the pool filled").await;
                print_idle_memory(&pools, 128);

                // Claims for more than the largest size fail at once.
                match pools.claim(4096, Duration::from_secs(1)).await {
                    Err(PoolError::NoFittingSize {
                        asked: 4096,
                        largest: 128,
                    }) => {}
                    Err(e) => panic!("expected NoFittingSize, got {e}"),
                    Ok(_) => panic!("a 4096 MiB claim was served from 128 MiB VMs"),
                }

                // Drained faster than it refills: three claims at once on a pool of one idle VM.
                // The first takes it at once (when first polled); the pool then refills one at a
                // time, so a claimant that waits only 1 ms gets a clear error and a patient one
                // waits for the refill. (Claims one after the other would race the refill: a
                // restore into the VMM spawned ahead can finish while the first claim activates.)
                let first = pools.claim(100, Duration::from_secs(30));
                let impatient = pools.claim(128, Duration::from_millis(1));
                let patient = pools.claim(128, FILL);
                let (a, c, b) = tokio::join!(first, impatient, patient);
                let a = a.unwrap_or_else(|e| panic!("the first claim: {e}"));
                assert_eq!(a.mem_mib, 128, "the smallest size that fits");
                assert!(!a.waited, "a full pool serves at once");
                eprintln!(
                    "claim from a full pool: {:.1} ms ({:?})",
                    ms(a.latency),
                    a.activated
                );
                let b = b.unwrap_or_else(|e| panic!("the patient claim: {e}"));
                assert!(b.waited, "the patient claim waited for the refill");
                eprintln!("claim that waited for the refill: {:.0} ms", ms(b.latency));
                match c {
                    Err(e @ PoolError::Exhausted { size: 128, .. }) => {
                        let text = e.to_string();
                        assert!(text.contains("128 MiB"), "{text}");
                        eprintln!("the impatient claim: {text}");
                    }
                    Err(e) => panic!("expected Exhausted, got {e}"),
                    Ok(_) => panic!("a claim was served from an empty pool"),
                }

                // Every VMM process is accounted for: the two claimed, plus what the pool holds
                // once refilled (its idle VM and the VMM spawned ahead for the next refill).
                let (pa, pb) = (a.vm.pid().expect("pid"), b.vm.pid().expect("pid"));
                assert_filled(&pools, "refilled").await;
                let t = Instant::now();
                loop {
                    let stats = pools.stats()[0];
                    if stats.restoring == 0 && stats.ahead == 1 {
                        break;
                    }
                    assert!(t.elapsed() < FILL, "no VMM spawned ahead: {stats:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let children = vmm_children();
                let stats = pools.stats()[0];
                eprintln!("VMM children {children:?}; pool {stats:?}");
                assert!(
                    children.contains(&pa) && children.contains(&pb),
                    "{children:?}"
                );
                assert_eq!(
                    children.len(),
                    2 + stats.idle + stats.restoring + stats.ahead,
                    "stray VMMs: {children:?} with {stats:?}"
                );
                assert_eq!(stats.claimed, 2);
                // The refills after the first fill restored into a VMM spawned ahead.
                assert!(
                    stats.restored_ahead >= 1,
                    "no refill used a VMM spawned ahead: {stats:?}"
                );
                assert_eq!(
                    stats.restored,
                    stats.claimed + stats.idle as u64 + stats.replaced,
                    "every restored VM is claimed, idle or replaced: {stats:?}"
                );

                // An input changed at run time: the idle VM of the old template is retired and
                // its place refilled from a template built anew.
                let old = idle_pids(&pools, 128);
                let mut bytes = std::fs::read(&initrd).expect("read the initramfs");
                bytes.extend_from_slice(&[0u8; 4096]);
                std::fs::write(&initrd, bytes).expect("rewrite the initramfs");
                let t = Instant::now();
                loop {
                    let stats = pools.stats()[0];
                    let now = idle_pids(&pools, 128);
                    if stats.templates_built == 2 && !now.is_empty() && now != old {
                        break;
                    }
                    assert!(t.elapsed() < FILL, "no new template: {stats:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                assert!(
                    old.iter().all(|&p| !process_runs(p)),
                    "the old template's idle VM was retired"
                );
                eprintln!(
                    "an initramfs change: new template and a VM from it in {:.0} ms",
                    ms(t.elapsed())
                );
                let c = pools
                    .claim(128, FILL)
                    .await
                    .unwrap_or_else(|e| panic!("claim from the new template: {e}"));
                let pc = c.vm.pid().expect("pid");
                drop(c);

                drop(a);
                drop(b);
                pools.shutdown().await;
                assert!(!process_runs(pc));
                assert!(!process_runs(pa) && !process_runs(pb));
                let left = vmm_children();
                assert!(
                    left.is_empty(),
                    "VMM processes left after shutdown: {left:?}"
                );
                match pools.claim(128, Duration::from_millis(10)).await {
                    Err(PoolError::ShutDown) => {}
                    Err(e) => panic!("expected ShutDown, got {e}"),
                    Ok(_) => panic!("a shut-down pool served a claim"),
                }
            });
        },
    );
}

/// The echo function's zip, built here and packed into the test host at the same path.
fn echo_zip() -> PathBuf {
    testing::echo_zip().unwrap_or_else(|e| panic!("the echo function: {e}"))
}

#[test]
fn a_jailed_pool_runs_the_echo_function_and_replaces_a_vm_whose_jailer_was_killed() {
    let zip = echo_zip();
    in_kvm_with(
        "a_jailed_pool_runs_the_echo_function_and_replaces_a_vm_whose_jailer_was_killed",
        &[&zip],
        || {
            watchdog(Duration::from_secs(1200));
            block_on(async {
                let dir = tempfile::tempdir().expect("temp dir");
                let mut config = MicrovmConfig::new(hearth_binary(), &init(), dir.path().into())
                    .expect("microVM configuration");
                config.boot_timeout = BOOT;
                config.init_timeout = Duration::from_secs(120);
                config.claim_timeout = FILL;
                // Jailed, as `hearth serve` runs them (booted and pooled VMs alike).
                let jail_base = dir.path().join("jails");
                let mut jails = hearth_agent::jail::JailConfig::new(hearth_binary());
                jails.jail_base = jail_base.clone();
                jails.cgroup_parent = format!("hearth-pool-test-{}", std::process::id());
                config.jail = Some(jails);
                let config = config
                    .with_pools(
                        &[
                            PoolSize {
                                mem_mib: 128,
                                target: 1,
                            },
                            PoolSize {
                                mem_mib: 256,
                                target: 1,
                            },
                        ],
                        dir.path().join("templates"),
                    )
                    .expect("pools");
                let pools: Arc<PoolSet> = config.pool.clone().expect("the pools");
                assert_filled(&pools, "the pools filled").await;
                print_idle_memory(&pools, 128);
                print_idle_memory(&pools, 256);
                check_templates_made_jailed(&dir.path().join("templates"), &jail_base);
                // The per-VM cgroups sit under this parent; it must hold none once all is over.
                let mut cgroup_parents = Vec::new();
                for size in [128, 256] {
                    for vm in pools.idle_vms(size) {
                        let cgroups = check_jailed(&vm, &jail_base);
                        eprintln!(
                            "pooled {size} MiB VM {} jailed; cgroups {cgroups:?}",
                            vm.pid
                        );
                        cgroup_parents.extend(
                            cgroups
                                .iter()
                                .filter_map(|c| c.parent())
                                .map(Path::to_path_buf),
                        );
                    }
                }

                // A pooled VM whose jailer was killed (so nothing of the jail cleaned up after
                // it) is never handed out: the claim gets its replacement, and the dead VM's
                // process, cgroup and jail folder are gone.
                let idle = pools.idle_vms(128);
                assert_eq!(idle.len(), 1, "{idle:?}");
                let victim = &idle[0];
                let victim_jail = victim.jail.clone().expect("a jail");
                let victim_cgroups = jail_cgroups(victim.pid, &victim_jail.id);
                let jailer = victim.jailer_pid.expect("a jailer");
                let pid = rustix::process::Pid::from_raw(jailer as i32).expect("a pid");
                rustix::process::kill_process(pid, rustix::process::Signal::KILL)
                    .expect("kill the pooled VM's jailer");
                let claimed = pools
                    .claim(128, FILL)
                    .await
                    .unwrap_or_else(|e| panic!("claim after the kill: {e}"));
                let pid = claimed.vm.pid().expect("a VMM");
                assert_ne!(
                    pid, victim.pid,
                    "the VM of the killed jailer was handed out"
                );
                assert!(process_runs(pid));
                let stats = pools.stats()[0];
                assert!(
                    stats.replaced >= 1,
                    "the dead VM was counted as replaced: {stats:?}"
                );
                eprintln!(
                    "claim after a kill (waited for the replacement): {:.0} ms",
                    ms(claimed.latency)
                );
                let t = Instant::now();
                loop {
                    let left_cgroups: Vec<_> =
                        victim_cgroups.iter().filter(|d| d.exists()).collect();
                    let left_folder = jail_base.join(&victim_jail.id).exists();
                    let runs = process_runs(victim.pid);
                    if left_cgroups.is_empty() && !left_folder && !runs {
                        break;
                    }
                    assert!(
                        t.elapsed() < Duration::from_secs(30),
                        "the VM of the killed jailer left: process running {runs}, cgroups \
                         {left_cgroups:?}, jail folder {left_folder}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                drop(claimed);

                // Claim latency from a full pool, a few times.
                for round in 0..3 {
                    assert_filled(&pools, "refilled").await;
                    let c = pools.claim(128, FILL).await.expect("claim");
                    assert!(!c.waited);
                    eprintln!(
                        "claim {round} from a full pool: {:.1} ms ({:?})",
                        ms(c.latency),
                        c.activated
                    );
                }

                // The echo function runs in a claimed 256 MiB VM (its memory size), not a booted one.
                assert_filled(&pools, "refilled").await;
                let pooled = idle_pids(&pools, 256);
                let zip_bytes = std::fs::read(&zip).expect("read the zip");
                let function = testing::echo_function(zip_bytes, 60_000, 1, &[("GREETING", "hi")]);
                let mut booting = config.clone();
                booting.pool = None;
                let mut envt: Environment<MicrovmSandbox> =
                    Environment::new(config, function.clone());
                let t = Instant::now();
                let r = envt
                    .invoke(InvokeRequest {
                        payload: br#"{"op":"echo","pooled":true}"#.to_vec(),
                        ..Default::default()
                    })
                    .await
                    .expect("the echo invoke");
                let body = r.result.expect("the echo succeeds");
                let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
                assert_eq!(v["pooled"], true);
                assert!(r.init_duration.is_some(), "a cold start through the pool");
                let vmm = envt.sandbox().and_then(|s| s.vmm_pid()).expect("a VMM");
                assert!(
                    pooled.contains(&vmm),
                    "the VM {vmm} came from the pool {pooled:?}"
                );
                eprintln!(
                    "cold invoke through the pool: {:.0} ms (init {:?}); VMM {}",
                    ms(t.elapsed()),
                    r.init_duration,
                    vmm_counters(vmm)
                );
                // What the claimed guest's kernel said after its restore (clock, watchdogs): its
                // console log is in its jail root.
                for entry in std::fs::read_dir(&jail_base).expect("list").flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with("hearth-pool-256-") {
                        let log = std::fs::read_to_string(entry.path().join("root/serial.log"))
                            .unwrap_or_default();
                        eprintln!("console of {name} since its restore:\n{log}");
                    }
                }
                let r = envt
                    .invoke(InvokeRequest {
                        payload: br#"{"op":"env"}"#.to_vec(),
                        ..Default::default()
                    })
                    .await
                    .expect("a warm invoke");
                let v: serde_json::Value =
                    serde_json::from_slice(&r.result.expect("env")).expect("JSON");
                assert_eq!(v["env"]["GREETING"], "hi");
                envt.destroy().await;
                assert!(!process_runs(vmm), "destroy left the VMM running");

                pools.shutdown().await;
                drop(pools);
                let left = vmm_children();
                assert!(left.is_empty(), "VMM processes left: {left:?}");
                // No jail folder and no per-VM cgroup is left: the pools' nor the claimed VM's.
                let folders: Vec<_> = std::fs::read_dir(&jail_base)
                    .map(|d| d.flatten().map(|e| e.path()).collect())
                    .unwrap_or_default();
                assert!(folders.is_empty(), "jail folders left: {folders:?}");
                for parent in &cgroup_parents {
                    let children: Vec<_> = std::fs::read_dir(parent)
                        .map(|d| {
                            d.flatten()
                                .filter(|e| e.path().is_dir())
                                .map(|e| e.path())
                                .collect()
                        })
                        .unwrap_or_default();
                    assert!(children.is_empty(), "cgroups left: {children:?}");
                }

                // For comparison, in the same test host: the same cold start in a booted VM.
                let mut envt: Environment<MicrovmSandbox> = Environment::new(booting, function);
                let t = Instant::now();
                let r = envt
                    .invoke(InvokeRequest {
                        payload: br#"{"op":"echo"}"#.to_vec(),
                        ..Default::default()
                    })
                    .await
                    .expect("the echo invoke in a booted VM");
                assert!(r.result.is_ok(), "{:?}", r.result);
                let vmm = envt.sandbox().and_then(|s| s.vmm_pid()).expect("a VMM");
                eprintln!(
                    "cold invoke in a booted VM: {:.0} ms (init {:?}); VMM {}",
                    ms(t.elapsed()),
                    r.init_duration,
                    vmm_counters(vmm)
                );
                envt.destroy().await;
                for parent in &cgroup_parents {
                    let _ = std::fs::remove_dir(parent);
                }
            });
        },
    );
}
