//! `hearth jail`: runs `hearth vmm ...` jailed. Run as root; the steps, in order:
//!
//! 1. check the id and each file given ([`super::paths`]), find the shared libraries `hearth`
//!    needs ([`super::libs`]), make `<jail_base>/<id>/root` (owned by
//!    the VM's uid/gid, so the VMM can make its sockets there) and the per-VM cgroup
//!    ([`super::cgroup`]);
//! 2. `unshare(CLONE_NEWPID)` and fork: the child is PID 1 of the new pid namespace, the jailer
//!    stays outside, forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to it, waits, removes the cgroup and
//!    the jail folder, and exits with the child's status (128 + N for signal N);
//! 3. the child joins the cgroup, enters new mount, network, IPC and UTS namespaces, builds the
//!    jail's file system (the files read-only, an `--output-dir` read-write at `/out`) and pivots
//!    into it ([`super::mounts`]), sets the rlimits, leaves open only fds 0-2 and the ones passed
//!    with `--keep-fd`, drops to the VM's uid/gid ([`super::limits`]) and execs `/hearth vmm ...`
//!    with an empty environment.
//!
//! The jailer must be single-threaded when it forks (it checks): `hearth jail` starts no threads.

use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nix::fcntl::{Flock, FlockArg};
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Uid};

use super::cgroup::{CgroupLimits, CgroupVersion, JailCgroup};
use super::libs;
use super::limits::{self, Rlimits};
use super::mounts;
use super::paths::{self, CheckedFile};

/// Where jails are made unless `--jail-base` says otherwise.
pub const DEFAULT_JAIL_BASE: &str = "/srv/hearth/jail";
/// The cgroup, under the jailer's own, that holds the per-VM cgroups.
pub const DEFAULT_CGROUP_PARENT: &str = "hearth-jail";
/// Where `--output-dir` appears in the jail.
pub const OUTPUT_INSIDE: &str = "/out";
/// Exit status of the jailed child when building the jail failed (its error is on stderr).
pub const JAIL_FAILED: i32 = 125;

/// Flags of `hearth jail`.
#[derive(Debug, Clone, clap::Args)]
pub struct JailArgs {
    /// The VM id: names the jail folder and the cgroup (ASCII letters, digits, '-'; up to 64).
    #[arg(long)]
    pub id: String,
    /// The folder holding the jails (`<jail_base>/<id>/root`).
    #[arg(long, default_value = DEFAULT_JAIL_BASE)]
    pub jail_base: PathBuf,
    /// The unprivileged uid the VMM runs as.
    #[arg(long)]
    pub uid: u32,
    /// The unprivileged gid the VMM runs as.
    #[arg(long)]
    pub gid: u32,
    /// The guest kernel: appears as `/kernel` in the jail.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// The initramfs: appears as `/initrd`.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// A snapshot's state file: appears as `/snapshot.state`.
    #[arg(long, requires = "snapshot_mem")]
    pub snapshot_state: Option<PathBuf>,
    /// A snapshot's memory file: appears as `/snapshot.mem`.
    #[arg(long, requires = "snapshot_state")]
    pub snapshot_mem: Option<PathBuf>,
    /// A folder the VMM writes into (a template's snapshot): appears as `/out`, read-write. It
    /// must be a real folder that already belongs to `--uid`.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// The `hearth` binary to run in the jail (as `/hearth`); default: this program.
    #[arg(long)]
    pub exec_file: Option<PathBuf>,
    /// Memory limit of the VM's cgroup, MiB (guest RAM plus the VMM's own).
    #[arg(long)]
    pub memory_limit_mib: u64,
    /// CPU time per period, microseconds (default: no limit).
    #[arg(long)]
    pub cpu_quota_us: Option<u64>,
    /// The CPU period, microseconds.
    #[arg(long, default_value_t = 100_000)]
    pub cpu_period_us: u64,
    /// The cgroup (relative to the jailer's own) under which the per-VM cgroup is made.
    #[arg(long, default_value = DEFAULT_CGROUP_PARENT)]
    pub cgroup_parent: String,
    /// The cgroup version (default: v2 where it has the memory and cpu controllers, else v1).
    #[arg(long, value_enum)]
    pub cgroup_version: Option<CgroupVersion>,
    /// RLIMIT_NOFILE: most open files.
    #[arg(long, default_value_t = 2048)]
    pub rlimit_nofile: u64,
    /// RLIMIT_FSIZE: largest file written, bytes (default: unlimited).
    #[arg(long)]
    pub rlimit_fsize: Option<u64>,
    /// A file descriptor to pass to the VMM (besides 0, 1, 2); repeatable.
    #[arg(long = "keep-fd")]
    pub keep_fds: Vec<RawFd>,
    /// `vmm` and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<OsString>,
}

/// Everything the child needs, checked.
struct Plan {
    root: PathBuf,
    files: Vec<CheckedFile>,
    output: Option<CheckedFile>,
    program: CheckedFile,
    libs: Vec<CheckedFile>,
    uid: Uid,
    gid: Gid,
    rlimits: Rlimits,
    keep_fds: Vec<RawFd>,
    hostname: String,
    argv: Vec<CString>,
}

/// Runs `hearth jail`; returns the jailed VMM's exit status.
pub fn run(args: JailArgs) -> anyhow::Result<u8> {
    if !nix::unistd::geteuid().is_root() {
        bail!("hearth jail must run as root");
    }
    if args.uid == 0 || args.gid == 0 {
        bail!("--uid and --gid must be unprivileged (not 0)");
    }
    if args.command.first().map(|c| c.as_bytes()) != Some(b"vmm") {
        bail!("the jail runs `hearth vmm`: give `-- vmm ARGS...`");
    }
    if args.memory_limit_mib == 0 || args.cpu_period_us == 0 {
        bail!("--memory-limit-mib and --cpu-period-us must be positive");
    }
    paths::check_id(&args.id)?;
    let mut files = Vec::new();
    let named = [
        ("kernel", "/kernel", &args.kernel),
        ("initrd", "/initrd", &args.initrd),
        ("snapshot state", "/snapshot.state", &args.snapshot_state),
        ("snapshot memory", "/snapshot.mem", &args.snapshot_mem),
    ];
    for (what, inside, path) in named {
        if let Some(path) = path {
            files.push(paths::check_file(what, Path::new(inside), path)?);
        }
    }
    let output = args
        .output_dir
        .as_deref()
        .map(|dir| {
            paths::check_output_folder("output folder", Path::new(OUTPUT_INSIDE), dir, args.uid)
        })
        .transpose()?;
    // A path, not `/proc/self/exe`: a magic link leads to this namespace's mount of the file,
    // which the jail's mount namespace cannot bind from.
    let exec_file = match &args.exec_file {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("cannot find this program's path")?,
    };
    let program = paths::check_program("the exec file", &exec_file, Path::new("/hearth"))?;
    let libs = libs::shared_objects(&exec_file)?;
    let argv = std::iter::once(OsString::from("hearth"))
        .chain(args.command.iter().cloned())
        .map(|a| CString::new(a.as_bytes().to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .context("an argument holds a NUL byte")?;

    let (jail_dir, lock) = make_jail_dir(&args.jail_base, &args.id, args.uid, args.gid)?;
    let result = jail(&args, &jail_dir, files, output, program, libs, argv);
    if let Err(e) = std::fs::remove_dir_all(&jail_dir) {
        tracing::warn!(dir = %jail_dir.display(), error = %e, "cannot remove the jail folder");
    }
    drop(lock);
    result
}

/// Makes `<base>/<id>/root` (or takes the one the agent prepared), owned by `uid:gid`, mode 0700,
/// and locks `<base>/<id>` (`flock`, held while this jailer lives): a second jailer for the same
/// id fails without touching the first one's jail.
fn make_jail_dir(
    base: &Path,
    id: &str,
    uid: u32,
    gid: u32,
) -> anyhow::Result<(PathBuf, Flock<std::fs::File>)> {
    if !base.is_absolute() {
        bail!("--jail-base {base:?} must be an absolute path");
    }
    std::fs::create_dir_all(base).with_context(|| format!("cannot create {base:?}"))?;
    paths::check_dir(base)?;
    let dir = base.join(id);
    let root = dir.join("root");
    for d in [&dir, &root] {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("cannot create {d:?}")),
        }
        paths::check_dir(d)?;
    }
    let dir_file = std::fs::File::open(&dir).with_context(|| format!("cannot open {dir:?}"))?;
    let lock = Flock::lock(dir_file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| anyhow::Error::new(e))
        .with_context(|| format!("the jail {dir:?} is in use by another jailer"))?;
    chown(&root, Some(uid), Some(gid)).with_context(|| format!("cannot chown {root:?}"))?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot chmod {root:?}"))?;
    Ok((dir, lock))
}

fn jail(
    args: &JailArgs,
    jail_dir: &Path,
    files: Vec<CheckedFile>,
    output: Option<CheckedFile>,
    program: CheckedFile,
    libs: Vec<CheckedFile>,
    argv: Vec<CString>,
) -> anyhow::Result<u8> {
    let threads = std::fs::read_dir("/proc/self/task")
        .context("cannot list this process's threads")?
        .count();
    if threads != 1 {
        bail!("the jailer must be single-threaded to fork safely, but it has {threads} threads");
    }
    let limits = CgroupLimits {
        memory_bytes: args.memory_limit_mib.saturating_mul(1024 * 1024),
        cpu_quota_us: args.cpu_quota_us,
        cpu_period_us: args.cpu_period_us,
    };
    let cgroup = JailCgroup::create(&args.cgroup_parent, &args.id, &limits, args.cgroup_version)?;
    let plan = Plan {
        root: jail_dir.join("root"),
        files,
        output,
        program,
        libs,
        uid: Uid::from_raw(args.uid),
        gid: Gid::from_raw(args.gid),
        rlimits: Rlimits {
            nofile: args.rlimit_nofile,
            fsize: args.rlimit_fsize,
        },
        keep_fds: args.keep_fds.clone(),
        hostname: args.id.clone(),
        argv,
    };
    let result = fork_and_wait(&plan, &cgroup);
    if let Err(e) = cgroup.remove() {
        tracing::warn!(error = %e, "cannot remove the VM's cgroup");
    }
    result
}

/// The signals the jailer forwards to the VMM, and SIGCHLD, which it waits for.
fn waited_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGCHLD,
    ] {
        set.add(s);
    }
    set
}

fn fork_and_wait(plan: &Plan, cgroup: &JailCgroup) -> anyhow::Result<u8> {
    // The child holds the read end; it sees the jailer gone when the write end closes.
    let (alive_r, alive_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("cannot make a pipe")?;
    nix::sched::unshare(CloneFlags::CLONE_NEWPID).context("cannot make a pid namespace")?;
    let signals = waited_signals();
    let mut old_mask = SigSet::empty();
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), Some(&mut old_mask))
        .context("cannot block signals")?;
    // SAFETY: this process is single-threaded (checked in `jail`), so the child starts with
    // consistent memory and locks; it only runs the jail steps and then execs or exits.
    let fork = unsafe { nix::unistd::fork() }.context("cannot fork")?;
    let child = match fork {
        ForkResult::Child => {
            drop(alive_w);
            let err = match child_main(plan, cgroup, &old_mask, alive_r) {
                Ok(never) => match never {},
                Err(e) => e,
            };
            eprintln!("hearth jail: {err:#}");
            std::process::exit(JAIL_FAILED);
        }
        ForkResult::Parent { child } => child,
    };
    drop(alive_r);
    tracing::debug!(pid = child.as_raw(), "jailed VMM started");
    let status = loop {
        let signal = signals.wait().context("cannot wait for signals")?;
        if signal != Signal::SIGCHLD {
            let _ = nix::sys::signal::kill(child, signal);
            continue;
        }
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => continue,
            Ok(WaitStatus::Exited(_, code)) => break code,
            Ok(WaitStatus::Signaled(_, sig, _)) => break 128 + sig as i32,
            Ok(_) => continue,
            Err(e) => return Err(e).context("cannot wait for the jailed VMM"),
        }
    };
    drop(alive_w);
    Ok(u8::try_from(status).unwrap_or(255))
}

/// The child: PID 1 of the new pid namespace. Returns only on failure.
fn child_main(
    plan: &Plan,
    cgroup: &JailCgroup,
    old_mask: &SigSet,
    alive: OwnedFd,
) -> anyhow::Result<std::convert::Infallible> {
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(old_mask), None)
        .context("cannot restore the signal mask")?;
    cgroup.join_self()?;
    nix::sched::unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS,
    )
    .context("cannot make the mount, network, IPC and UTS namespaces")?;
    nix::unistd::sethostname(&plan.hostname).context("cannot set the host name")?;
    mounts::make_private()?;
    mounts::bind_root(&plan.root)?;
    // Bind sources must be in this mount namespace: open each file again here.
    for file in &plan.files {
        let file = file.reopen()?;
        mounts::bind_file(&plan.root, &file, false)
            .with_context(|| format!("cannot place the {} {:?}", file.what, file.source))?;
    }
    if let Some(folder) = &plan.output {
        let folder = folder.reopen()?;
        mounts::bind_output_folder(&plan.root, &folder)
            .with_context(|| format!("cannot place the {} {:?}", folder.what, folder.source))?;
    }
    for file in std::iter::once(&plan.program).chain(&plan.libs) {
        let file = file.reopen()?;
        mounts::bind_file(&plan.root, &file, true)
            .with_context(|| format!("cannot place {:?}", file.source))?;
    }
    mounts::make_dev(&plan.root, &mounts::vmm_devices(), plan.uid, plan.gid)?;
    limits::close_on_exec_except(&plan.keep_fds)?;
    plan.rlimits.apply()?;
    mounts::enter_root(&plan.root)?;
    limits::drop_to(plan.uid, plan.gid, || parent_alive(&alive))?;
    let empty_env: [CString; 0] = [];
    let program = c"/hearth";
    let Err(err) = nix::unistd::execve(program, &plan.argv, &empty_env);
    Err(err).context("cannot exec /hearth in the jail")
}

/// Whether the jailer still holds the write end of the pipe.
fn parent_alive(alive: &OwnedFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(alive.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) => true,
        Ok(_) => !fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        Err(_) => false,
    }
}
