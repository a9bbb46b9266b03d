//! The pools: one per memory size, each holding restored, paused VMs of that size, refilled in the
//! background; a claim takes a VM from the pool of the smallest size that fits.
//!
//! Refilling is one task per [`PoolSet`]: it restores VMs for every pool below its target, at
//! most [`PoolConfig::max_restores_in_flight`] at a time (so restores do not starve invokes of
//! CPU), building a pool's template first when it has none. The place of a claimed VM is
//! refilled once the claim has activated it, not while: the claim is on an invoke's path. A VM whose restore failed is
//! dropped and the pool tries again after [`PoolConfig::retry_pause`]; a template that fails to
//! restore twice in a row is discarded and built again. Idle VMs whose process died are
//! removed by a sweep every [`PoolConfig::check_interval`], and a claim checks its VM again (alive,
//! paused, then resumed and refreshed): a VM that fails is dropped and replaced, never handed out.
//!
//! Every restore, and every [`PoolConfig::check_interval`], compares the digest of a pool's
//! template inputs (kernel, initramfs, command line, size, vCPUs, the `hearth` binary) with its
//! template's: when they differ, the idle VMs of the old template are retired and the template is
//! built anew, so no VM of stale inputs stays in a pool.
//!
//! Each pool keeps one VMM spawned ahead of its restore ([`AheadVm`], in its jail with the
//! template's files mounted): a refill sends it the `Restore` instead of spawning a process, then
//! spawns the next one ahead while it still holds its restore permit (so at the refill's pace).
//! One that died, or whose `Restore` was refused, is dropped, never used; one awaiting an older
//! template than the pool's is dropped when the template changes; shutdown kills it.
//!
//! The templates' folder is a tmpfs with huge pages ([`PoolConfig::template_tmpfs`]; mounted at
//! [`PoolSet::start`] unless it is one), where a template VM's RAM is its memory file.
//!
//! Shutting down ([`PoolSet::shutdown`], or dropping the set) stops the refill and kills every
//! idle VM and every VM still being restored; VMs already claimed belong to their claimant.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_vmm::MemoryUsage;
use tokio::sync::{Notify, Semaphore};

use super::template::{Template, TemplateSpec};
use super::vm::{Activated, AheadVm, PooledVm, PooledVmError, VmHome};

/// The memory sizes Lambda offers pools for by default, MiB.
pub const DEFAULT_SIZES: [u32; 6] = [128, 256, 512, 1024, 2048, 3008];

/// A claim could not be served, or the pools could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no pool has VMs of {asked} MiB or more (the largest is {largest} MiB)")]
    NoFittingSize { asked: u32, largest: u32 },
    #[error(
        "no {size} MiB VM became free within {waited:?} (the pool refills {in_flight} at a time){}",
        .last_failure.as_deref().map(|f| format!("; the last refill failed: {f}")).unwrap_or_default()
    )]
    Exhausted {
        size: u32,
        waited: Duration,
        in_flight: usize,
        last_failure: Option<String>,
    },
    #[error("the pools are shut down")]
    ShutDown,
    #[error("invalid pool configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    #[error("the pools need a tokio runtime to refill in")]
    NoRuntime(#[source] tokio::runtime::TryCurrentError),
}

/// A pool's size and how many idle VMs it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSize {
    /// Guest memory, MiB.
    pub mem_mib: u32,
    /// Idle VMs to keep ready.
    pub target: usize,
}

/// How the pools are made: plain data.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The `hearth` binary (run as `hearth vmm`).
    pub hearth_binary: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The guest initramfs (with `hearth-init`).
    pub initrd: PathBuf,
    /// Appended to the guest kernel command line of the templates (default `init_on_free=1`: the
    /// guest zeroes freed pages, so they stay holes in the memory file).
    pub cmdline_extra: String,
    /// vCPUs per VM.
    pub vcpus: u8,
    /// The pools, any order.
    pub sizes: Vec<PoolSize>,
    /// Where templates are kept.
    pub template_dir: PathBuf,
    /// Mount a tmpfs with huge pages on `template_dir` unless it is one already (needs root;
    /// where the mount fails the templates stay where they are, with a warning): template VMs
    /// there keep their guest RAM in their memory file, so a snapshot copies nothing (see
    /// [`super::template`]). On by default.
    pub template_tmpfs: bool,
    /// Where each pooled VM's folder (sockets, serial log) is made.
    pub vm_dir: PathBuf,
    /// The most restores (or template builds) at once, over all pools.
    pub max_restores_in_flight: usize,
    /// Longest wait for a template VM's `Ready`.
    pub boot_timeout: Duration,
    /// Longest wait from spawning a restored VM to its init's answer.
    pub restore_timeout: Duration,
    /// How often idle VMs are checked for a dead process.
    pub check_interval: Duration,
    /// Pause before a pool tries again after a failed restore.
    pub retry_pause: Duration,
    /// How the VMMs of the templates and of the restored VMs are jailed (`None`: plain children
    /// of the agent, with their folders in `vm_dir`, and templates booted in their build folder;
    /// see [`super::template`]).
    pub jail: Option<crate::jail::JailConfig>,
}

impl PoolConfig {
    /// The default pools (every size of [`DEFAULT_SIZES`], one idle VM each), one restore at a
    /// time, one vCPU, templates in `<state_dir>/templates` and VMs in `state_dir`.
    pub fn new(
        hearth_binary: PathBuf,
        kernel: PathBuf,
        initrd: PathBuf,
        state_dir: PathBuf,
    ) -> Self {
        PoolConfig {
            hearth_binary,
            kernel,
            initrd,
            cmdline_extra: "init_on_free=1".into(),
            vcpus: 1,
            sizes: DEFAULT_SIZES
                .iter()
                .map(|&mem_mib| PoolSize { mem_mib, target: 1 })
                .collect(),
            template_dir: state_dir.join("templates"),
            template_tmpfs: true,
            vm_dir: state_dir,
            max_restores_in_flight: 1,
            boot_timeout: Duration::from_secs(60),
            restore_timeout: Duration::from_secs(30),
            check_interval: Duration::from_secs(1),
            retry_pause: Duration::from_secs(1),
            jail: None,
        }
    }

    /// Every problem with the configuration at once.
    pub fn validate(&self) -> Result<(), PoolError> {
        let mut bad = Vec::new();
        if self.sizes.is_empty() {
            bad.push("no pool sizes".to_string());
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.sizes {
            if !(hearth_vmm::config::MIN_MEM_MIB..=hearth_vmm::config::MAX_MEM_MIB)
                .contains(&s.mem_mib)
            {
                bad.push(format!(
                    "pool size {} MiB is outside {}..={} MiB",
                    s.mem_mib,
                    hearth_vmm::config::MIN_MEM_MIB,
                    hearth_vmm::config::MAX_MEM_MIB
                ));
            }
            if !seen.insert(s.mem_mib) {
                bad.push(format!("pool size {} MiB is listed twice", s.mem_mib));
            }
        }
        if !(1..=hearth_vmm::config::MAX_VCPUS).contains(&self.vcpus) {
            bad.push(format!(
                "vcpus {} is outside 1..={}",
                self.vcpus,
                hearth_vmm::config::MAX_VCPUS
            ));
        }
        if self.max_restores_in_flight == 0 {
            bad.push("max_restores_in_flight must be at least 1".to_string());
        }
        for (name, d) in [
            ("boot_timeout", self.boot_timeout),
            ("restore_timeout", self.restore_timeout),
            ("check_interval", self.check_interval),
        ] {
            if d.is_zero() {
                bad.push(format!("{name} must be more than zero"));
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(PoolError::Config(bad))
        }
    }

    fn template_spec(&self, mem_mib: u32) -> TemplateSpec {
        TemplateSpec {
            hearth_binary: self.hearth_binary.clone(),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline_extra: self.cmdline_extra.clone(),
            mem_mib,
            vcpus: self.vcpus,
        }
    }
}

/// Counters of one pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub mem_mib: u32,
    pub target: usize,
    /// Idle VMs now.
    pub idle: usize,
    /// Restores in flight now.
    pub restoring: usize,
    /// VMs restored since the start.
    pub restored: u64,
    /// VMs handed out.
    pub claimed: u64,
    /// Idle or claimed VMs found dead, failing their check or of a stale template, dropped and
    /// replaced.
    pub replaced: u64,
    /// Restores (or template builds) that failed.
    pub failures: u64,
    /// Templates built.
    pub templates_built: u64,
    /// VMMs spawned ahead of their restore, waiting (0 or 1).
    pub ahead: usize,
    /// Of the VMs restored, those restored into a VMM spawned ahead.
    pub restored_ahead: u64,
}

/// One memory size's pool.
struct SizePool {
    mem_mib: u32,
    target: usize,
    idle: Mutex<VecDeque<PooledVm>>,
    /// A VM was added.
    added: Notify,
    restoring: AtomicUsize,
    /// VMs taken by a claim and being activated: the refill of their place waits for them, so a
    /// restore does not compete with the claim for CPU.
    activating: AtomicUsize,
    template: tokio::sync::Mutex<Option<Template>>,
    /// The VMM spawned ahead for the next refill.
    ahead: Mutex<Option<AheadVm>>,
    /// Restores of the current template that failed in a row.
    failed_in_a_row: AtomicUsize,
    last_failure: Mutex<Option<String>>,
    retry_after: Mutex<Option<Instant>>,
    restored: AtomicU64,
    claimed: AtomicU64,
    replaced: AtomicU64,
    failures: AtomicU64,
    templates_built: AtomicU64,
    restored_ahead: AtomicU64,
}

impl SizePool {
    fn idle(&self) -> std::sync::MutexGuard<'_, VecDeque<PooledVm>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ahead(&self) -> std::sync::MutexGuard<'_, Option<AheadVm>> {
        self.ahead.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deficit(&self) -> usize {
        let have = self.idle().len()
            + self.restoring.load(Ordering::SeqCst)
            + self.activating.load(Ordering::SeqCst);
        self.target.saturating_sub(have)
    }

    fn stats(&self) -> PoolStats {
        PoolStats {
            mem_mib: self.mem_mib,
            target: self.target,
            idle: self.idle().len(),
            restoring: self.restoring.load(Ordering::SeqCst),
            restored: self.restored.load(Ordering::SeqCst),
            claimed: self.claimed.load(Ordering::SeqCst),
            replaced: self.replaced.load(Ordering::SeqCst),
            failures: self.failures.load(Ordering::SeqCst),
            templates_built: self.templates_built.load(Ordering::SeqCst),
            ahead: usize::from(self.ahead().is_some()),
            restored_ahead: self.restored_ahead.load(Ordering::SeqCst),
        }
    }

    fn record_failure(&self, what: String) {
        self.failures.fetch_add(1, Ordering::SeqCst);
        *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(what);
    }

    /// Why its last restore or template build failed (`None`: none failed).
    fn last_failure(&self) -> Option<String> {
        self.last_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

struct Inner {
    config: PoolConfig,
    /// Smallest size first.
    pools: Vec<SizePool>,
    permits: Arc<Semaphore>,
    /// Wakes the refiller (a claim took a VM, a restore ended, shutdown).
    wake: Notify,
    /// Set at shutdown; restores and template builds in flight stop at it.
    shut: Arc<AtomicBool>,
    /// Restores running (a blocking thread each), over all pools.
    in_flight: AtomicUsize,
    drained: Notify,
    next_id: AtomicU64,
}

impl Inner {
    fn kill_idle(&self) {
        for pool in &self.pools {
            let vms: Vec<PooledVm> = pool.idle().drain(..).collect();
            drop(vms);
            let ahead = pool.ahead().take();
            drop(ahead);
        }
    }
}

/// The pools of restored VMs, one per memory size. Cheap to share (`Arc<PoolSet>`).
pub struct PoolSet {
    inner: Arc<Inner>,
    refiller: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for PoolSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolSet")
            .field("sizes", &self.inner.config.sizes)
            .finish_non_exhaustive()
    }
}

/// An idle pooled VM, as [`PoolSet::idle_vms`] sees it.
#[derive(Debug, Clone)]
pub struct IdleVm {
    /// The VMM process (for a jailed VM, the jailer's child).
    pub pid: u32,
    /// The jailer, for a jailed VM.
    pub jailer_pid: Option<u32>,
    /// The jail, for a jailed VM.
    pub jail: Option<crate::jail::VmJail>,
    /// The VMM's memory, guest RAM set apart (`None` if `/proc` could not be read).
    pub memory: Option<MemoryUsage>,
}

/// A VM taken from a pool: resumed and refreshed, ready for a function.
pub struct ClaimedVm {
    /// The VM.
    pub vm: PooledVm,
    /// Its pool's size, MiB.
    pub mem_mib: u32,
    /// From the claim's start to the refreshed VM.
    pub latency: Duration,
    /// Whether it was waited for (the pool was empty).
    pub waited: bool,
    /// The steps of its activation.
    pub activated: Activated,
}

impl PoolSet {
    /// Starts the pools and their refill on the current tokio runtime. Templates are built by
    /// the refill as each pool first needs one.
    pub fn start(config: PoolConfig) -> Result<Arc<PoolSet>, PoolError> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(PoolError::NoRuntime)?;
        if config.template_tmpfs
            && let Err(e) = super::template::mount_tmpfs(&config.template_dir)
        {
            tracing::warn!(
                error = %error_chain(&e),
                "the templates stay off tmpfs: each template snapshot writes a copy of guest RAM"
            );
        }
        let mut sizes = config.sizes.clone();
        sizes.sort_by_key(|s| s.mem_mib);
        let pools = sizes
            .iter()
            .map(|s| SizePool {
                mem_mib: s.mem_mib,
                target: s.target,
                idle: Mutex::new(VecDeque::new()),
                added: Notify::new(),
                restoring: AtomicUsize::new(0),
                activating: AtomicUsize::new(0),
                template: tokio::sync::Mutex::new(None),
                ahead: Mutex::new(None),
                failed_in_a_row: AtomicUsize::new(0),
                last_failure: Mutex::new(None),
                retry_after: Mutex::new(None),
                restored: AtomicU64::new(0),
                claimed: AtomicU64::new(0),
                replaced: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                templates_built: AtomicU64::new(0),
                restored_ahead: AtomicU64::new(0),
            })
            .collect();
        let inner = Arc::new(Inner {
            permits: Arc::new(Semaphore::new(config.max_restores_in_flight)),
            config,
            pools,
            wake: Notify::new(),
            shut: Arc::new(AtomicBool::new(false)),
            in_flight: AtomicUsize::new(0),
            drained: Notify::new(),
            next_id: AtomicU64::new(0),
        });
        let refiller = runtime.spawn(refill(inner.clone()));
        let set = Arc::new(PoolSet { inner, refiller });
        let collector: std::sync::Weak<dyn crate::metrics::Collect> = Arc::downgrade(&set) as _;
        crate::metrics::Metrics::global().register(collector);
        Ok(set)
    }

    /// The configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// The size a claim for `memory_mib` is served from: the smallest that fits.
    pub fn fitting_size(&self, memory_mib: u32) -> Result<u32, PoolError> {
        self.pool_for(memory_mib).map(|p| p.mem_mib)
    }

    fn pool_for(&self, memory_mib: u32) -> Result<&SizePool, PoolError> {
        let pools = &self.inner.pools;
        pools
            .iter()
            .find(|p| p.mem_mib >= memory_mib)
            .ok_or(PoolError::NoFittingSize {
                asked: memory_mib,
                largest: pools.last().map(|p| p.mem_mib).unwrap_or(0),
            })
    }

    /// Takes a VM of the smallest size that fits `memory_mib`, resumed and refreshed (a fresh
    /// identity, entropy and the current clock). Waits at most `timeout` for one; a VM that is
    /// dead or fails its check on the way is dropped (and replaced by the refill).
    pub async fn claim(&self, memory_mib: u32, timeout: Duration) -> Result<ClaimedVm, PoolError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let pool = self.pool_for(memory_mib)?;
        let mut waited = false;
        loop {
            if self.inner.shut.load(Ordering::SeqCst) {
                return Err(PoolError::ShutDown);
            }
            let notified = pool.added.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let taken = {
                let mut idle = pool.idle();
                let vm = idle.pop_front();
                if vm.is_some() {
                    pool.activating.fetch_add(1, Ordering::SeqCst);
                }
                vm
            };
            if let Some(mut vm) = taken {
                // Also when this claim is dropped mid-way.
                let _activating = Activating {
                    pool,
                    inner: &self.inner,
                };
                let id = self.inner.next_id.fetch_add(1, Ordering::SeqCst);
                let identity = format!("hearth-{}-{id}", std::process::id());
                let checked = tokio::task::spawn_blocking(move || {
                    let r = vm.activate(&identity);
                    (vm, r)
                })
                .await;
                match checked {
                    Ok((vm, Ok(activated))) => {
                        pool.claimed.fetch_add(1, Ordering::SeqCst);
                        let latency = started.elapsed();
                        tracing::debug!(
                            mem_mib = pool.mem_mib,
                            ?latency,
                            ?activated,
                            pid = vm.pid(),
                            "claimed a pooled VM"
                        );
                        return Ok(ClaimedVm {
                            vm,
                            mem_mib: pool.mem_mib,
                            latency,
                            waited,
                            activated,
                        });
                    }
                    Ok((vm, Err(e))) => {
                        pool.replaced.fetch_add(1, Ordering::SeqCst);
                        tracing::warn!(
                            mem_mib = pool.mem_mib,
                            pid = vm.pid(),
                            error = %error_chain(&e),
                            "a pooled VM failed its check; replacing it"
                        );
                        drop_blocking(vm).await;
                    }
                    Err(e) => {
                        pool.replaced.fetch_add(1, Ordering::SeqCst);
                        tracing::warn!(error = %e, "the check of a pooled VM did not finish");
                    }
                }
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(PoolError::Exhausted {
                    size: pool.mem_mib,
                    waited: started.elapsed(),
                    in_flight: self.inner.config.max_restores_in_flight,
                    last_failure: pool.last_failure(),
                });
            }
            waited = true;
            self.inner.wake.notify_one();
            // Woken when a VM is added; the bound covers a wake-up taken by another claimant.
            let nap = (deadline - now).min(Duration::from_millis(100));
            let _ = tokio::time::timeout(nap, notified).await;
        }
    }

    /// Counters of each pool, smallest first.
    pub fn stats(&self) -> Vec<PoolStats> {
        self.inner.pools.iter().map(SizePool::stats).collect()
    }

    /// Why the last restore (or template build) of each pool failed, smallest first (`None`:
    /// none failed).
    pub fn last_failures(&self) -> Vec<(u32, Option<String>)> {
        self.inner
            .pools
            .iter()
            .map(|p| (p.mem_mib, p.last_failure()))
            .collect()
    }

    /// The idle VMs of the `mem_mib` pool: their processes and memory, in one walk.
    pub fn idle_vms(&self, mem_mib: u32) -> Vec<IdleVm> {
        let Some(pool) = self.inner.pools.iter().find(|p| p.mem_mib == mem_mib) else {
            return Vec::new();
        };
        let idle = pool.idle();
        idle.iter()
            .filter_map(|vm| {
                Some(IdleVm {
                    pid: vm.pid()?,
                    jailer_pid: vm.jailer_pid(),
                    jail: vm.jail().cloned(),
                    memory: vm.memory_usage(),
                })
            })
            .collect()
    }

    /// Waits until every pool holds its target of idle VMs, or `timeout` passes; whether they do.
    pub async fn wait_full(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let full = self.inner.pools.iter().all(|p| p.idle().len() >= p.target);
            if full {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the refill, waits for the restores in flight to end (their VMs are killed) and kills
    /// every idle VM and every VMM spawned ahead. Claims fail with [`PoolError::ShutDown`] from
    /// now on.
    pub async fn shutdown(&self) {
        self.inner.shut.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
        self.refiller.abort();
        loop {
            let drained = self.inner.drained.notified();
            if self.inner.in_flight.load(Ordering::SeqCst) == 0 {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), drained).await;
        }
        let inner = self.inner.clone();
        let _ = tokio::task::spawn_blocking(move || inner.kill_idle()).await;
    }
}

impl Drop for PoolSet {
    fn drop(&mut self) {
        self.inner.shut.store(true, Ordering::SeqCst);
        self.refiller.abort();
        // Restores still running kill their VM when they end (they see `shut`).
        self.inner.kill_idle();
    }
}

/// Counts a VM as being activated by a claim until dropped; then wakes the refill.
struct Activating<'a> {
    pool: &'a SizePool,
    inner: &'a Inner,
}

impl Drop for Activating<'_> {
    fn drop(&mut self) {
        self.pool.activating.fetch_sub(1, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }
}

/// Drops a VM (a kill and a wait) on a blocking thread.
async fn drop_blocking(vm: PooledVm) {
    let _ = tokio::task::spawn_blocking(move || drop(vm)).await;
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The refill loop: starts restores for pools below target while permits last, and sweeps dead
/// idle VMs.
async fn refill(inner: Arc<Inner>) {
    let mut last_sweep = Instant::now();
    loop {
        if inner.shut.load(Ordering::SeqCst) {
            return;
        }
        if last_sweep.elapsed() >= inner.config.check_interval {
            sweep(&inner);
            check_inputs(&inner).await;
            last_sweep = Instant::now();
        }
        for index in 0..inner.pools.len() {
            let pool = &inner.pools[index];
            let waiting = pool
                .retry_after
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| Instant::now() < t);
            if waiting {
                continue;
            }
            while pool.deficit() > 0 {
                let Ok(permit) = inner.permits.clone().try_acquire_owned() else {
                    break;
                };
                pool.restoring.fetch_add(1, Ordering::SeqCst);
                inner.in_flight.fetch_add(1, Ordering::SeqCst);
                let inner = inner.clone();
                tokio::spawn(async move {
                    let restored_from = restore_one(&inner, index).await;
                    inner.pools[index].restoring.fetch_sub(1, Ordering::SeqCst);
                    // The next VMM ahead, under the same permit: at the refill's pace.
                    if let Some(template) = restored_from {
                        spawn_ahead(&inner, index, &template).await;
                    }
                    drop(permit);
                    inner.in_flight.fetch_sub(1, Ordering::SeqCst);
                    inner.drained.notify_waiters();
                    inner.wake.notify_one();
                });
            }
        }
        let _ = tokio::time::timeout(
            inner.config.check_interval.min(inner.config.retry_pause),
            inner.wake.notified(),
        )
        .await;
    }
}

/// Removes idle VMs whose process has exited.
fn sweep(inner: &Inner) {
    for pool in &inner.pools {
        let dead: Vec<PooledVm> = {
            let mut idle = pool.idle();
            let mut dead = Vec::new();
            let mut i = 0;
            while i < idle.len() {
                if idle[i].has_exited() {
                    if let Some(vm) = idle.remove(i) {
                        dead.push(vm);
                    }
                } else {
                    i += 1;
                }
            }
            dead
        };
        for vm in dead {
            pool.replaced.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(
                mem_mib = pool.mem_mib,
                pid = vm.pid(),
                "a pooled VM died; replacing it"
            );
            drop(vm);
        }
        let dead_ahead = {
            let mut ahead = pool.ahead();
            match ahead.as_mut().map(AheadVm::has_exited) {
                Some(true) => ahead.take(),
                _ => None,
            }
        };
        if let Some(vm) = dead_ahead {
            tracing::warn!(
                mem_mib = pool.mem_mib,
                pid = vm.pid(),
                "a VMM spawned ahead died; replacing it"
            );
            drop(vm);
        }
    }
}

/// Retires the idle VMs of every pool whose template's inputs have changed (their places are then
/// refilled from a template built anew). Unchanged inputs cost a `stat` each.
async fn check_inputs(inner: &Arc<Inner>) {
    for pool in &inner.pools {
        // A pool whose template is being built or used for a restore is checked next time.
        let current = match pool.template.try_lock() {
            Ok(slot) => slot.as_ref().map(|t| t.digest.clone()),
            Err(_) => None,
        };
        let Some(current) = current else { continue };
        let spec = inner.config.template_spec(pool.mem_mib);
        let digest = tokio::task::spawn_blocking(move || spec.digest()).await;
        match digest {
            Ok(Ok(d)) if d != current => retire_stale(pool, &d).await,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(
                mem_mib = pool.mem_mib,
                error = %error_chain(&e),
                "cannot check the template's inputs"
            ),
            Err(e) => tracing::warn!(error = %e, "the template input check did not finish"),
        }
    }
}

/// Where a VM of pool `mem_mib` lives: a jail or a folder, named `hearth-pool-<size>-<pid>-<n>`.
fn vm_home(inner: &Inner, mem_mib: u32) -> VmHome {
    let id = inner.next_id.fetch_add(1, Ordering::SeqCst);
    let name = format!("hearth-pool-{mem_mib}-{}-{id}", std::process::id());
    match &inner.config.jail {
        Some(jails) => VmHome::Jail {
            jails: jails.clone(),
            id: name,
        },
        None => VmHome::Folder(inner.config.vm_dir.join(name)),
    }
}

/// Spawns a VMM ahead of the next restore of pool `index` from `template`, unless the pool holds
/// one or the pools are shutting down. A spawn that fails is logged: the next refill spawns its
/// VMM itself.
async fn spawn_ahead(inner: &Arc<Inner>, index: usize, template: &Template) {
    let pool = &inner.pools[index];
    if inner.shut.load(Ordering::SeqCst) || pool.ahead().is_some() {
        return;
    }
    let home = vm_home(inner, pool.mem_mib);
    let binary = inner.config.hearth_binary.clone();
    let for_spawn = template.clone();
    let t = Instant::now();
    let spawned =
        tokio::task::spawn_blocking(move || AheadVm::spawn(&binary, &for_spawn, home)).await;
    match spawned {
        Ok(Ok(vm)) => {
            tracing::debug!(
                mem_mib = pool.mem_mib,
                took = ?t.elapsed(),
                pid = vm.pid(),
                "a VMM spawned ahead awaits its restore"
            );
            let unwanted = {
                let mut ahead = pool.ahead();
                if inner.shut.load(Ordering::SeqCst) || ahead.is_some() {
                    Some(vm)
                } else {
                    *ahead = Some(vm);
                    None
                }
            };
            if let Some(vm) = unwanted {
                let _ = tokio::task::spawn_blocking(move || drop(vm)).await;
            }
        }
        Ok(Err(e)) => tracing::warn!(
            mem_mib = pool.mem_mib,
            error = %error_chain(&e),
            "cannot spawn a VMM ahead of its restore"
        ),
        Err(e) => tracing::warn!(error = %e, "the spawn of a VMM ahead did not finish"),
    }
}

/// Restores one VM for pool `index` (building its template first when needed), into the VMM
/// spawned ahead when the pool holds one for this template, and adds it. Returns the template
/// when it restored a VM.
async fn restore_one(inner: &Arc<Inner>, index: usize) -> Option<Template> {
    let pool = &inner.pools[index];
    let template = {
        // Every restore checks the inputs again (file digests are remembered per inode, size and
        // modification time, so an unchanged input costs a `stat`): a changed kernel or
        // initramfs gets a new template, and the idle VMs of the old one are retired.
        let mut slot = pool.template.lock().await;
        let spec = inner.config.template_spec(pool.mem_mib);
        let root = inner.config.template_dir.clone();
        let timeout = inner.config.boot_timeout;
        let cancel = inner.shut.clone();
        let jails = inner.config.jail.clone();
        let built = tokio::task::spawn_blocking(move || {
            Template::ensure(&root, &spec, timeout, &cancel, jails.as_ref())
        })
        .await;
        match built {
            Ok(Ok((t, fresh))) => {
                if fresh {
                    pool.templates_built.fetch_add(1, Ordering::SeqCst);
                }
                let changed = slot.as_ref().is_some_and(|old| old.digest != t.digest);
                if changed {
                    retire_stale(pool, &t.digest).await;
                }
                *slot = Some(t);
            }
            Ok(Err(e)) => {
                failed(inner, pool, format!("template: {}", error_chain(&e)));
                return None;
            }
            Err(e) => {
                failed(inner, pool, format!("template build task: {e}"));
                return None;
            }
        }
        slot.as_ref()?.clone()
    };
    // The VMM spawned ahead, if it awaits this template (one of an older template is dropped).
    let taken = pool.ahead().take();
    let ahead = match taken {
        Some(a) if a.template_digest() == template.digest => Some(a),
        Some(stale) => {
            tracing::debug!(
                mem_mib = pool.mem_mib,
                "dropping a VMM spawned ahead for an older template"
            );
            let _ = tokio::task::spawn_blocking(move || drop(stale)).await;
            None
        }
        None => None,
    };
    let home = vm_home(inner, pool.mem_mib);
    let binary = inner.config.hearth_binary.clone();
    let timeout = inner.config.restore_timeout;
    let for_restore = template.clone();
    let cancel = inner.shut.clone();
    let mem_mib = pool.mem_mib;
    let restored = tokio::task::spawn_blocking(move || {
        let mut ahead = ahead;
        if let Some(a) = ahead.as_mut()
            && a.has_exited()
        {
            tracing::warn!(mem_mib, pid = a.pid(), "a VMM spawned ahead died; not used");
            ahead = None;
        }
        match ahead {
            Some(a) => (a.restore(timeout, &cancel), true),
            None => (
                PooledVm::restore(&binary, &for_restore, home, timeout, &cancel),
                false,
            ),
        }
    })
    .await;
    match restored {
        Ok((Ok(vm), was_ahead)) => {
            pool.failed_in_a_row.store(0, Ordering::SeqCst);
            pool.restored.fetch_add(1, Ordering::SeqCst);
            if was_ahead {
                pool.restored_ahead.fetch_add(1, Ordering::SeqCst);
            }
            tracing::debug!(
                mem_mib = pool.mem_mib,
                took = ?vm.restored_in(),
                spawned_ahead = was_ahead,
                pid = vm.pid(),
                "pooled VM ready"
            );
            let mut idle = pool.idle();
            if inner.shut.load(Ordering::SeqCst) {
                drop(idle);
                drop_blocking(vm).await;
                return None;
            }
            idle.push_back(vm);
            drop(idle);
            pool.added.notify_one();
            Some(template)
        }
        Ok((Err(e), _)) => {
            let text = error_chain(&e);
            let in_a_row = pool.failed_in_a_row.fetch_add(1, Ordering::SeqCst) + 1;
            if inner.shut.load(Ordering::SeqCst) {
                return None;
            }
            // The VMM itself failed (not the jail around it): the template may be bad.
            let vmm_failed = matches!(
                e,
                PooledVmError::Restore(_)
                    | PooledVmError::Jail(crate::jail::LaunchError::Process(_))
            );
            if in_a_row >= 2 && vmm_failed {
                tracing::warn!(template = %template.dir.display(), "the template does not restore; building it again");
                let mut slot = pool.template.lock().await;
                if slot.as_ref().is_some_and(|t| t.dir == template.dir) {
                    template.discard();
                    *slot = None;
                }
                pool.failed_in_a_row.store(0, Ordering::SeqCst);
            }
            failed(inner, pool, text);
            None
        }
        Err(e) => {
            failed(inner, pool, format!("restore task: {e}"));
            None
        }
    }
}

/// Drops the idle VMs of `pool` restored from another template than `digest`, and its VMM
/// spawned ahead for another template.
async fn retire_stale(pool: &SizePool, digest: &str) {
    let stale_ahead = {
        let mut ahead = pool.ahead();
        match ahead.as_ref().map(|a| a.template_digest() != digest) {
            Some(true) => ahead.take(),
            _ => None,
        }
    };
    if let Some(vm) = stale_ahead {
        tracing::info!(
            mem_mib = pool.mem_mib,
            "the template's inputs changed; dropping the VMM spawned ahead for the old one"
        );
        let _ = tokio::task::spawn_blocking(move || drop(vm)).await;
    }
    let stale = {
        let mut idle = pool.idle();
        let (keep, stale): (VecDeque<PooledVm>, VecDeque<PooledVm>) = idle
            .drain(..)
            .partition(|vm| vm.template_digest() == digest);
        *idle = keep;
        stale
    };
    if !stale.is_empty() {
        pool.replaced
            .fetch_add(stale.len() as u64, Ordering::SeqCst);
        tracing::info!(
            mem_mib = pool.mem_mib,
            retired = stale.len(),
            "the template's inputs changed; retiring the idle VMs restored from the old one"
        );
        let _ = tokio::task::spawn_blocking(move || drop(stale)).await;
    }
}

fn failed(inner: &Inner, pool: &SizePool, what: String) {
    tracing::warn!(mem_mib = pool.mem_mib, error = %what, "refilling a pool failed");
    pool.record_failure(what);
    *pool.retry_after.lock().unwrap_or_else(|p| p.into_inner()) =
        Some(Instant::now() + inner.config.retry_pause);
}

/// The pools at scrape time: idle VMs and restores in flight per size, and their counts.
impl crate::metrics::Collect for PoolSet {
    fn collect(&self, gauges: &mut crate::metrics::GaugeSet) {
        for stats in self.stats() {
            let size = stats.mem_mib.to_string();
            let labels = [("memory_mib", size.as_str())];
            gauges.add(
                "hearth_pool_idle_vms",
                "Restored, paused microVMs ready to be claimed, per pool.",
                &labels,
                stats.idle as f64,
            );
            gauges.add(
                "hearth_pool_target_vms",
                "Idle microVMs each pool keeps ready.",
                &labels,
                stats.target as f64,
            );
            gauges.add(
                "hearth_pool_ahead_vmms",
                "VMMs spawned ahead of their restore, per pool.",
                &labels,
                stats.ahead as f64,
            );
            gauges.add(
                "hearth_pool_restoring_vms",
                "Restores in flight, per pool.",
                &labels,
                stats.restoring as f64,
            );
            for (event, n) in [
                ("restored", stats.restored),
                ("claimed", stats.claimed),
                ("replaced", stats.replaced),
                ("failed", stats.failures),
            ] {
                gauges.add_counter(
                    "hearth_pool_vms_total",
                    "Pool microVMs by what happened to them.",
                    &[("memory_mib", size.as_str()), ("event", event)],
                    n as f64,
                );
            }
        }
    }
}
