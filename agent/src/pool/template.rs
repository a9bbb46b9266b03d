//! Templates: the snapshot every pooled VM of one shape is restored from.
//!
//! A template is made once per (guest kernel, initramfs, memory size, vCPUs): boot the VM, wait
//! until the init says `Ready` and answers a ping, let it settle, pause, snapshot. It lives in a
//! folder `<root>/<mem>mib-<vcpus>vcpu-<digest>` whose name carries a digest of every input (the
//! [`TemplateSpec::digest`]); `template.json` in it repeats the digest and is written last, so a
//! folder without it is an interrupted build and is never used. When an input changes the digest
//! changes: the template is built anew and the stale folders of the same shape are removed.
//!
//! A build happens in a hidden folder beside the others and is renamed into place whole.
//!
//! Access: the template folder is root's alone (0700); the snapshot writer creates the state and
//! memory files readable by all (`hearth_snapshot::access`) from the start, so that jailed VMMs,
//! each under a uid of its own, can restore from them once the jail has bind-mounted them
//! read-only into their roots, and so that no `chmod` afterwards moves the memory file's change
//! time (its recorded identity would no longer match, and every restore would read and digest the
//! whole file). A template holds a freshly booted guest with no function code and nothing
//! secret in it.
//!
//! Where the pools jail their VMs, the template VM runs jailed too
//! ([`JailConfig::spawn_writing_to`]): its own uid, namespaces, cgroup and limits, as any pooled
//! VM. The build folder is handed to its uid and mounted read-write in its jail at `/out`, the one
//! place outside its jail root where it can write. Its guest RAM is always a file there (on any
//! file system), which becomes the memory file. A restore accepts only files of its own uid or
//! root's (`hearth_snapshot::access`), so the agent hands the RAM file to root while the VM is
//! paused and before the snapshot records the file's identity (a `chown` afterwards would move
//! its change time, as a `chmod` would); the VMM goes on writing it through its descriptor. The
//! state file goes to root once written, and the folder once the VMM has ended (mode 0700).
//! Without a jail configuration (tests, a development host) the template VM is a plain child of
//! the agent. It runs the guest kernel and init only, never function code.
//!
//! Where the templates' folder is a tmpfs (the pools mount one, with huge pages, unless it is
//! one already: [`mount_tmpfs`]), the template VM's guest RAM is its memory file itself
//! (`VmConfig::ram_file`, mapped shared by the VMM): the snapshot digests it in place and
//! writes no copy, all-zero 2 MiB pages are punched out of it (`Punch::HugePages`), and clones
//! map its huge pages. The template VM is killed right after its snapshot (its VMM refuses to
//! resume it anyway). A tmpfs is emptied by a reboot: the manifest goes with the files, so the
//! next [`Template::ensure`] builds the template again. Elsewhere a jailed template VM's RAM is a
//! file too (all-zero 4 KiB pages punched, `Punch::Pages`), and an unjailed one boots in
//! anonymous memory and its snapshot writes the memory file.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hearth_vmm::config::{Punch, RamFileConfig};
use hearth_vmm::{SnapshotFiles, VmConfig, VmmProcess, VsockConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::guest::{bind_ready, ping, ready_socket, serial_tail, wait_ready};
use crate::jail::{JailConfig, LaunchError, VmJail, output_inside};
use crate::sandbox::microvm::GUEST_CID;

/// Bumped when the way a template is made changes (what the digest covers, the folder layout,
/// the files' modes: 2 has them readable by the jailed VMMs).
const TEMPLATE_LAYOUT: u32 = 2;
/// The manifest, written last.
const MANIFEST: &str = "template.json";

/// Making or finding a template failed.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot {what} {}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the template VM could not be run")]
    Vmm(#[source] hearth_vmm::ProcessError),
    #[error("the template VM could not be jailed")]
    Jail(#[source] LaunchError),
    #[error(
        "the template VM did not come up: {why}; VMM stderr: {stderr}; guest console: {serial}"
    )]
    Boot {
        why: String,
        stderr: String,
        serial: String,
    },
    #[error("the template VM's init did not answer")]
    Guest(#[source] hearth_guest::protocol::ProtocolError),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError {
    let path = path.to_path_buf();
    move |source| TemplateError::Io { what, path, source }
}

/// What a template is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSpec {
    /// The `hearth` binary (run as `hearth vmm`); its identity is part of the digest, since the
    /// snapshot format it writes is compiled into it.
    pub hearth_binary: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The initramfs (with `hearth-init` as `/init`).
    pub initrd: PathBuf,
    /// Appended to the kernel command line.
    pub cmdline_extra: String,
    /// Guest memory, MiB.
    pub mem_mib: u32,
    /// vCPUs.
    pub vcpus: u8,
}

/// The record in a template folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    digest: String,
    mem_mib: u32,
    vcpus: u8,
    kernel: PathBuf,
    initrd: PathBuf,
    /// The init's `Ready` when the template was taken.
    ready_ms: u64,
    kernel_release: String,
    /// Boot to `Ready`, and the snapshot itself, ms.
    boot_ms: u64,
    snapshot_ms: u64,
    /// The uid the template VM's VMM ran under in its jail (`None`: not jailed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jail_uid: Option<u32>,
}

/// A template on disk, ready to be restored from.
#[derive(Debug, Clone)]
pub struct Template {
    /// Its folder.
    pub dir: PathBuf,
    /// Its snapshot.
    pub files: SnapshotFiles,
    /// The digest of its inputs.
    pub digest: String,
    /// What it was made from.
    pub spec: TemplateSpec,
}

/// sha256 of a file's bytes, remembered per (device, inode, size, modification time) so a kernel
/// shared by many templates is read once.
fn file_sha256(path: &Path) -> Result<String, TemplateError> {
    type Key = (PathBuf, u64, u64, u64, i64, i64);
    static SEEN: OnceLock<Mutex<HashMap<Key, String>>> = OnceLock::new();
    let meta = std::fs::metadata(path).map_err(io("read", path))?;
    let key = (
        path.to_path_buf(),
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
    );
    let seen = SEEN.get_or_init(Default::default);
    if let Some(d) = seen.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(d.clone());
    }
    let mut file = std::fs::File::open(path).map_err(io("open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let digest = hex::encode(hasher.finalize());
    seen.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, digest.clone());
    Ok(digest)
}

impl TemplateSpec {
    /// The digest of every input: the kernel's and the initramfs's bytes, the command line, the
    /// memory size, the vCPUs, the `hearth` binary and the VMM executable spawned for it (size
    /// and modification time: they carry the snapshot format version) and this module's layout
    /// version.
    pub fn digest(&self) -> Result<String, TemplateError> {
        let binary =
            std::fs::metadata(&self.hearth_binary).map_err(io("read", &self.hearth_binary))?;
        let mut h = Sha256::new();
        let mut field = |name: &str, value: &[u8]| {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update((value.len() as u64).to_le_bytes());
            h.update(value);
        };
        field("layout", &TEMPLATE_LAYOUT.to_le_bytes());
        field("kernel", file_sha256(&self.kernel)?.as_bytes());
        field("initrd", file_sha256(&self.initrd)?.as_bytes());
        field("cmdline", self.cmdline_extra.as_bytes());
        field("mem_mib", &self.mem_mib.to_le_bytes());
        field("vcpus", &[self.vcpus]);
        field("vmm_size", &binary.size().to_le_bytes());
        field("vmm_mtime", &binary.mtime().to_le_bytes());
        field("vmm_mtime_ns", &binary.mtime_nsec().to_le_bytes());
        // The executable VMMs actually run (a small `hearth-vmm` where there is one): it writes
        // and reads the snapshot.
        let program = hearth_vmm::process::vmm_program(&self.hearth_binary);
        if program != self.hearth_binary {
            let meta = std::fs::metadata(&program).map_err(io("read", &program))?;
            field("vmm_program", program.as_os_str().as_encoded_bytes());
            field("vmm_program_size", &meta.size().to_le_bytes());
            field("vmm_program_mtime", &meta.mtime().to_le_bytes());
            field("vmm_program_mtime_ns", &meta.mtime_nsec().to_le_bytes());
        }
        Ok(hex::encode(h.finalize()))
    }

    /// The folder-name prefix of templates of this shape.
    fn shape(&self) -> String {
        format!("{}mib-{}vcpu-", self.mem_mib, self.vcpus)
    }

    /// The VM configuration of this shape with its host side (sockets, serial log) in `dir`.
    pub fn vm_config(&self, dir: &Path) -> VmConfig {
        let mut c = VmConfig::new(&self.kernel);
        c.initrd = Some(self.initrd.clone());
        c.cmdline_extra = self.cmdline_extra.clone();
        c.mem_mib = self.mem_mib;
        c.vcpus = self.vcpus;
        c.vsock = Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: dir.join("vsock.sock"),
        });
        c.serial_log = Some(dir.join("serial.log"));
        c.control_socket = Some(dir.join("control.sock"));
        c
    }
}

impl Template {
    /// The template for `spec` under `root`: the one there when its digest matches, else a new
    /// one (booted, snapshotted, renamed into place; stale templates of the same shape removed).
    /// Blocking: a build boots a VM (jailed by `jails` where given); setting `cancel` ends it
    /// early. Returns whether it was built.
    pub fn ensure(
        root: &Path,
        spec: &TemplateSpec,
        boot_timeout: Duration,
        cancel: &AtomicBool,
        jails: Option<&JailConfig>,
    ) -> Result<(Template, bool), TemplateError> {
        let digest = spec.digest()?;
        let dir = root.join(format!("{}{}", spec.shape(), &digest[..24]));
        if let Some(t) = Self::open(&dir, spec, &digest) {
            return Ok((t, false));
        }
        std::fs::create_dir_all(root).map_err(io("create", root))?;
        let build = root.join(format!(
            ".build-{}{}",
            spec.shape(),
            &crate::sandbox::new_request_id()[..13]
        ));
        let built = build_in(&build, spec, &digest, boot_timeout, cancel, jails);
        if let Err(e) = built {
            let _ = std::fs::remove_dir_all(&build);
            return Err(e);
        }
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::rename(&build, &dir) {
            let _ = std::fs::remove_dir_all(&build);
            // Another builder may have put the same template in place meanwhile.
            return match Self::open(&dir, spec, &digest) {
                Some(t) => Ok((t, false)),
                None => Err(io("rename the template into place at", &dir)(e)),
            };
        }
        remove_stale(root, spec, &dir);
        let t = Self::open(&dir, spec, &digest).ok_or_else(|| TemplateError::Io {
            what: "find the template just built in",
            path: dir.clone(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        Ok((t, true))
    }

    /// The template in `dir` if it is complete and its manifest names `digest`.
    fn open(dir: &Path, spec: &TemplateSpec, digest: &str) -> Option<Template> {
        let text = std::fs::read_to_string(dir.join(MANIFEST)).ok()?;
        let manifest: Manifest = serde_json::from_str(&text).ok()?;
        let files = snapshot_files(dir);
        let complete = manifest.digest == digest
            && manifest.mem_mib == spec.mem_mib
            && manifest.vcpus == spec.vcpus
            && files.state.is_file()
            && files.mem.is_file();
        complete.then(|| Template {
            dir: dir.to_path_buf(),
            files,
            digest: digest.to_string(),
            spec: spec.clone(),
        })
    }

    /// Removes the template (after its snapshot failed to restore), so the next
    /// [`Template::ensure`] builds it again. VMs restored from it keep running.
    pub fn discard(&self) {
        let _ = std::fs::remove_file(self.dir.join(MANIFEST));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn snapshot_files(dir: &Path) -> SnapshotFiles {
    SnapshotFiles {
        state: dir.join("vm.state"),
        mem: dir.join("vm.mem"),
    }
}

/// Whether `path` is on a tmpfs.
pub fn on_tmpfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Mounts a tmpfs with huge pages (`huge=within_size`, root's alone) on `root` (made if missing)
/// unless it is a tmpfs already, so that templates there keep their guest RAM in their memory
/// file. Needs root (`CAP_SYS_ADMIN`). Templates already under `root` are hidden by the mount and
/// built again there. The mount outlives the agent; a reboot empties it.
pub fn mount_tmpfs(root: &Path) -> Result<(), TemplateError> {
    std::fs::create_dir_all(root).map_err(io("create", root))?;
    if on_tmpfs(root) {
        return Ok(());
    }
    nix::mount::mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some("huge=within_size,mode=0700"),
    )
    .map_err(|e| io("mount a tmpfs for the templates on", root)(e.into()))
}

/// Removes the other templates of `spec`'s shape under `root` (their inputs changed) and
/// interrupted builds of it.
fn remove_stale(root: &Path, spec: &TemplateSpec, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let shape = spec.shape();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path != keep && name.starts_with(&shape) {
            tracing::info!(stale = %path.display(), "removing a template whose inputs changed");
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// How long the template VM runs after its init's `Ready` and a ping before it is paused and
/// snapshotted. Work the guest kernel defers right after boot (deferrable timers wait for the
/// next wake-up of an idle CPU, and the init no longer wakes it) would otherwise be caught pending
/// in the snapshot and done again by every clone. Measured with `hearth-perf restore --settle-ms`
/// (test host, load about 5, event-driven reaper), the first restore's KVM counters without
/// settling and after 1000 ms: 4 KiB pages mapped 886-1037 and 665-672, exits 1733-2162 and
/// 1136-1233, halts 0 and 3; restore to echo p50 908-1504 ms and 596-751 ms.
const TEMPLATE_SETTLE: Duration = Duration::from_millis(1000);

/// Lets the template run for [`TEMPLATE_SETTLE`]; the reason as text if `cancel` is set meanwhile.
fn settle(cancel: &AtomicBool) -> Result<(), String> {
    const STEP: Duration = Duration::from_millis(50);
    let until = Instant::now() + TEMPLATE_SETTLE;
    loop {
        if cancel.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("cancelled (the pools are shutting down)".into());
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(STEP));
    }
}

/// Where the template VM runs while it is built.
struct TemplateHome {
    /// Its sockets and serial log, on this host: the build folder, or its jail root.
    host_dir: PathBuf,
    /// The same folder as its VMM sees it.
    inside_dir: PathBuf,
    /// The build folder as its VMM sees it: where it writes the snapshot.
    out_inside: PathBuf,
    /// Its jail, where it has one.
    jail: Option<(JailConfig, VmJail)>,
}

/// Distinguishes the jails of template VMs built by one agent.
static NEXT_TEMPLATE_VM: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Boots the template VM for `dir` (jailed by `jails` where given), waits for its init, lets it
/// settle ([`TEMPLATE_SETTLE`]), pauses it and snapshots it into `dir`.
fn build_in(
    dir: &Path,
    spec: &TemplateSpec,
    digest: &str,
    boot_timeout: Duration,
    cancel: &AtomicBool,
    jails: Option<&JailConfig>,
) -> Result<(), TemplateError> {
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io("restrict", dir))?;
    let Some(jails) = jails else {
        let home = TemplateHome {
            host_dir: dir.to_path_buf(),
            inside_dir: dir.to_path_buf(),
            out_inside: dir.to_path_buf(),
            jail: None,
        };
        let snapshot = boot_and_snapshot(dir, &home, spec, boot_timeout, cancel)?;
        for name in ["vsock.sock", "control.sock"] {
            let _ = std::fs::remove_file(dir.join(name));
        }
        let _ = std::fs::remove_file(ready_socket(&dir.join("vsock.sock")));
        return write_manifest(dir, spec, digest, snapshot);
    };
    let id = format!(
        "hearth-template-{}-{}-{}",
        spec.mem_mib,
        std::process::id(),
        NEXT_TEMPLATE_VM.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let jail = jails
        .jail_for(&id, &spec.vm_config(Path::new("/")))
        .map_err(TemplateError::Jail)?;
    let home = TemplateHome {
        host_dir: jail.root.clone(),
        inside_dir: PathBuf::from("/"),
        out_inside: output_inside(),
        jail: Some((jails.clone(), jail.clone())),
    };
    let snapshot = jails
        .prepare(&jail)
        .and_then(|()| jail.give(dir))
        .map_err(TemplateError::Jail)
        .and_then(|()| boot_and_snapshot(dir, &home, spec, boot_timeout, cancel));
    // The VMM has ended (killed, and its jailer waited for): remove what a jailer that did not
    // clean up left, and take the folder back (its files are root's already).
    if let Err(e) = jails.clean_up(&jail) {
        tracing::warn!(id = %jail.id, error = %e, "cannot clean up the template VM's jail");
    }
    // A failed build's own error first: it says more than a failed take-back would.
    let taken_back = give_to_agent(dir);
    let snapshot = snapshot?;
    taken_back.map_err(io("take back", dir))?;
    write_manifest(dir, spec, digest, snapshot)
}

/// Gives `path` to the agent's own user and group (root, where it jails).
fn give_to_agent(path: &Path) -> std::io::Result<()> {
    let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
    std::os::unix::fs::chown(path, Some(uid.as_raw()), Some(gid.as_raw()))
}

/// What a template build measured.
struct Snapshotted {
    ready: hearth_guest::protocol::Ready,
    boot_ms: u64,
    snapshot_ms: u64,
    ram_file: bool,
    jail_uid: Option<u32>,
}

/// Boots the template VM at `home`, waits for its init, lets it settle, pauses it and writes its
/// snapshot into the build folder (`dir` on this host, `home.out_inside` to the VMM). The VMM has
/// ended when this returns.
fn boot_and_snapshot(
    dir: &Path,
    home: &TemplateHome,
    spec: &TemplateSpec,
    boot_timeout: Duration,
    cancel: &AtomicBool,
) -> Result<Snapshotted, TemplateError> {
    let mut config = spec.vm_config(&home.inside_dir);
    let files = snapshot_files(&home.out_inside);
    let tmpfs = on_tmpfs(dir);
    if tmpfs || home.jail.is_some() {
        // The RAM file is the memory file: the snapshot takes it where it is. A jailed VMM always
        // has one, so that the file can be handed to root before its identity is recorded.
        config.ram_file = Some(RamFileConfig {
            path: files.mem.clone(),
            punch: if tmpfs {
                Punch::HugePages
            } else {
                Punch::Pages
            },
        });
    }
    let uds = home.host_dir.join("vsock.sock");
    let listener = bind_ready(&uds).map_err(io("listen for the init beside", &uds))?;
    let started = Instant::now();
    tracing::info!(
        mem_mib = spec.mem_mib,
        vcpus = spec.vcpus,
        jailed = home.jail.is_some(),
        "building a VM template"
    );
    let mut vmm = match &home.jail {
        Some((jails, jail)) => {
            // The VMM, under the jail's uid, connects to the agent's ready socket.
            jail.give(&ready_socket(&uds))
                .and_then(|()| jails.spawn_writing_to(jail, &config, dir))
                .map_err(TemplateError::Jail)?
        }
        None => crate::cores::unpinned(|| VmmProcess::spawn(&spec.hearth_binary, &config))
            .map_err(TemplateError::Vmm)?,
    };
    let boot_failed = |vmm: &mut VmmProcess, why: String| {
        // Read first: a jailer removes the jail root, with the console log, when its VMM ends.
        let serial = serial_tail(&home.host_dir);
        let _ = vmm.kill();
        TemplateError::Boot {
            why,
            stderr: vmm.stderr_tail().trim().to_string(),
            serial,
        }
    };
    if let Err(e) = vmm.start() {
        return Err(boot_failed(&mut vmm, format!("start: {e}")));
    }
    let (ready_conn, ready) = match wait_ready(&listener, &mut vmm, boot_timeout, cancel) {
        Ok(r) => r,
        Err(why) => return Err(boot_failed(&mut vmm, why)),
    };
    let boot_ms = started.elapsed().as_millis() as u64;
    let client = match ping(&uds) {
        Ok(c) => c,
        Err(e) => return Err(boot_failed(&mut vmm, format!("ping: {e}"))),
    };
    if let Err(why) = settle(cancel) {
        return Err(boot_failed(&mut vmm, why));
    }
    if let Err(e) = vmm.pause() {
        return Err(boot_failed(&mut vmm, format!("pause: {e}")));
    }
    // A restore accepts only files of its own uid or root's: the RAM file, made by the jailed
    // VMM under its uid, goes to root now, before the snapshot records its identity (which a
    // `chown` afterwards would move); the VMM keeps writing it through its descriptor.
    let here = snapshot_files(dir);
    let to_agent = |path: &Path| match home.jail {
        Some(_) => give_to_agent(path).map_err(|e| format!("hand {} to root: {e}", path.display())),
        None => Ok(()),
    };
    if let Err(why) = to_agent(&here.mem) {
        return Err(boot_failed(&mut vmm, why));
    }
    let t = Instant::now();
    if let Err(e) = vmm.snapshot(&files) {
        return Err(boot_failed(&mut vmm, format!("snapshot: {e}")));
    }
    let snapshot_ms = t.elapsed().as_millis() as u64;
    if let Err(why) = to_agent(&here.state) {
        return Err(boot_failed(&mut vmm, why));
    }
    // Killed before its connections close (their resets would be written into guest memory;
    // after a snapshot that took its RAM file those writes are private to it, never the file's).
    let _ = vmm.kill();
    drop(client);
    drop(ready_conn);
    drop(vmm);
    Ok(Snapshotted {
        ready,
        boot_ms,
        snapshot_ms,
        ram_file: config.ram_file.is_some(),
        jail_uid: home.jail.as_ref().map(|(_, jail)| jail.uid),
    })
}

/// Writes the manifest into the built template folder `dir` (last: it makes the template usable).
fn write_manifest(
    dir: &Path,
    spec: &TemplateSpec,
    digest: &str,
    built: Snapshotted,
) -> Result<(), TemplateError> {
    let manifest = Manifest {
        digest: digest.to_string(),
        mem_mib: spec.mem_mib,
        vcpus: spec.vcpus,
        kernel: spec.kernel.clone(),
        initrd: spec.initrd.clone(),
        ready_ms: built.ready.ready_ms,
        kernel_release: built.ready.kernel_release,
        boot_ms: built.boot_ms,
        snapshot_ms: built.snapshot_ms,
        jail_uid: built.jail_uid,
    };
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| TemplateError::Io {
        what: "encode the manifest for",
        path: dir.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    let path = dir.join(MANIFEST);
    std::fs::write(&path, text).map_err(io("write", &path))?;
    tracing::info!(
        mem_mib = spec.mem_mib,
        boot_ms = built.boot_ms,
        snapshot_ms = built.snapshot_ms,
        ram_file = built.ram_file,
        jail_uid = built.jail_uid,
        "VM template built"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> TemplateSpec {
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        TemplateSpec {
            hearth_binary: write("hearth", b"binary"),
            kernel: write("kernel", b"kernel bytes"),
            initrd: write("initrd", b"initrd bytes"),
            cmdline_extra: "init_on_free=1".into(),
            mem_mib: 128,
            vcpus: 1,
        }
    }

    #[test]
    fn the_digest_covers_every_input() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        let base = s.digest().unwrap();
        assert_eq!(base, s.digest().unwrap(), "the digest is stable");
        let mut seen = std::collections::HashSet::from([base.clone()]);
        let mut changed = |t: TemplateSpec, what: &str| {
            let d = t.digest().unwrap();
            assert!(seen.insert(d), "{what} did not change the digest");
        };
        changed(
            TemplateSpec {
                mem_mib: 256,
                ..s.clone()
            },
            "memory",
        );
        changed(
            TemplateSpec {
                vcpus: 2,
                ..s.clone()
            },
            "vCPUs",
        );
        changed(
            TemplateSpec {
                cmdline_extra: String::new(),
                ..s.clone()
            },
            "the command line",
        );
        // Contents, not names: new bytes in the same files.
        std::fs::write(&s.initrd, b"initrd bytes, changed").unwrap();
        changed(s.clone(), "the initramfs");
        std::fs::write(&s.kernel, b"another kernel").unwrap();
        changed(s.clone(), "the kernel");
        std::fs::write(&s.hearth_binary, b"a rebuilt binary").unwrap();
        changed(s.clone(), "the hearth binary");
    }

    #[test]
    fn only_a_complete_template_with_the_same_digest_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        let digest = s.digest().unwrap();
        let t = dir.path().join("t");
        std::fs::create_dir_all(&t).unwrap();
        assert!(Template::open(&t, &s, &digest).is_none(), "no manifest");
        let manifest = Manifest {
            digest: digest.clone(),
            mem_mib: 128,
            vcpus: 1,
            kernel: s.kernel.clone(),
            initrd: s.initrd.clone(),
            ready_ms: 1,
            kernel_release: "k".into(),
            boot_ms: 1,
            snapshot_ms: 1,
            jail_uid: None,
        };
        std::fs::write(t.join(MANIFEST), serde_json::to_string(&manifest).unwrap()).unwrap();
        assert!(
            Template::open(&t, &s, &digest).is_none(),
            "no snapshot files"
        );
        std::fs::write(t.join("vm.state"), b"s").unwrap();
        std::fs::write(t.join("vm.mem"), b"m").unwrap();
        assert!(Template::open(&t, &s, &digest).is_some());
        assert!(Template::open(&t, &s, "other").is_none(), "another digest");
        std::fs::write(t.join(MANIFEST), b"{not json").unwrap();
        assert!(
            Template::open(&t, &s, &digest).is_none(),
            "a damaged manifest"
        );
    }

    #[test]
    fn stale_templates_of_the_same_shape_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        let root = dir.path().join("templates");
        for name in [
            "128mib-1vcpu-aaaa",
            "128mib-1vcpu-bbbb",
            "256mib-1vcpu-aaaa",
        ] {
            std::fs::create_dir_all(root.join(name)).unwrap();
        }
        remove_stale(&root, &s, &root.join("128mib-1vcpu-bbbb"));
        assert!(!root.join("128mib-1vcpu-aaaa").exists());
        assert!(root.join("128mib-1vcpu-bbbb").exists());
        assert!(
            root.join("256mib-1vcpu-aaaa").exists(),
            "another shape stays"
        );
    }
}
