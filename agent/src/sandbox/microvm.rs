//! The microVM sandbox: a `hearth vmm` child process ([`hearth_vmm::VmmProcess`]) booting the
//! Debian guest kernel with `hearth-init` as PID 1; the host link is vsock.
//!
//! Starting one: the agent listens where the guest's connection to host port
//! [`READY_PORT`] arrives (`<uds>_1024`), spawns the VMM with the function's memory size, waits for
//! the init's `Hello` + `Ready` there (that connection stays open for the VM's life), then connects
//! to the guest's [`CONTROL_PORT`] through the VMM's Unix socket (`CONNECT 1025`) and speaks the
//! function conversation ([`super::link::HostLink`], the same as the container sandbox's).
//!
//! A microVM takes one invoke at a time: the function's `max_concurrency` (Lambda's
//! `AWS_LAMBDA_MAX_CONCURRENCY`) is forced to 1 here ([`one_at_a_time`]); only containers, the
//! managed-instances mode, run several invokes at once in one environment.
//!
//! Destroying one kills the VMM process (SIGKILL) and reaps it: the guest and everything in it end
//! with it. A timed-out invoke marks the sandbox dead, so its environment destroys it.
//!
//! With a [`PoolSet`] in its configuration ([`MicrovmConfig::pool`]) a sandbox does not boot: it
//! claims a restored VM of the smallest pool size that fits the function's memory (resumed, its
//! init answering, refreshed with a fresh identity, entropy and clock) and goes on from the
//! control port as a booted one does. A function larger than the largest pool size boots.
//!
//! With a [`JailConfig`] ([`MicrovmConfig::jail`]) every VMM runs jailed, booted or restored into a
//! pool (the pools take the same configuration: [`MicrovmConfig::with_pools`]); the VM's folder is
//! then its jail root, and when the VM ends its jail is cleaned up after
//! ([`JailConfig::clean_up`]: what a killed jailer left).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_guest::protocol::{CONTROL_PORT, Message, READY_PORT, Ready, check_hello};
use hearth_guest::runtime::read_frame;
use hearth_vmm::{VmConfig, VmmProcess, VsockConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::link::{HostLink, lock};
use super::{FunctionSpec, InitReport, InvokeRequest, InvokeResponse, Sandbox, SandboxError};
use crate::jail::{JailConfig, VmJail};
use crate::pool::PoolSet;

/// Time allowed on top of the init timeout for the `Hello` exchange and the code transfer.
const LINK_SLACK: Duration = Duration::from_secs(60);

/// The guest's vsock context id (one VM per VMM process, so every VM may use the same).
pub const GUEST_CID: u64 = 3;

/// An initramfs file that is removed when the last configuration using it is dropped.
#[derive(Debug)]
struct InitrdFile(PathBuf);

impl Drop for InitrdFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// How microVM sandboxes are made.
#[derive(Debug, Clone)]
pub struct MicrovmConfig {
    /// The `hearth` binary (run as `hearth vmm`).
    pub hearth_binary: PathBuf,
    /// The guest kernel (bzImage).
    pub kernel: PathBuf,
    /// Where per-sandbox folders (sockets, serial log) are created.
    pub state_dir: PathBuf,
    /// vCPUs per VM.
    pub vcpus: u8,
    /// Longest wait from spawning the VMM to the guest's `Ready`.
    pub boot_timeout: Duration,
    /// Longest wait for the runtime's init.
    pub init_timeout: Duration,
    /// Pools of restored VMs to claim from instead of booting (their vCPUs apply then).
    pub pool: Option<Arc<PoolSet>>,
    /// Longest wait for a pooled VM.
    pub claim_timeout: Duration,
    /// Boot each VMM jailed (`hearth jail`: namespaces, `pivot_root`, cgroup, rlimits, its own
    /// uid/gid); `None` runs it as a plain child of the agent.
    pub jail: Option<crate::jail::JailConfig>,
    initrd: Arc<InitrdFile>,
}

fn setup(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Setup { what, source }
}

fn setup_other(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> SandboxError {
    SandboxError::Setup {
        what: format!("{what}: {e}"),
        source: std::io::Error::other(e),
    }
}

impl MicrovmConfig {
    /// Builds the microVM initramfs (`init` as `/init`, the guest modules) for the cached guest
    /// kernel into `state_dir`, with defaults for the rest: one vCPU, 60 s to boot, 10 s to init.
    pub fn new(
        hearth_binary: PathBuf,
        init: &Path,
        state_dir: PathBuf,
    ) -> Result<Self, SandboxError> {
        let kernel = hearth_guest::image::KernelImage::locate()
            .map_err(|e| setup_other("find the guest kernel (run `hearth image`)", e))?;
        let bytes = hearth_guest::image::guest_initramfs(&kernel, init)
            .map_err(|e| setup_other("build the guest initramfs", e))?;
        std::fs::create_dir_all(&state_dir).map_err(setup("create the state folder"))?;
        let path = state_dir.join(format!(
            "hearth-initrd-{}.cpio",
            &super::new_request_id()[..18]
        ));
        std::fs::write(&path, bytes).map_err(setup("write the guest initramfs"))?;
        Ok(MicrovmConfig {
            hearth_binary,
            kernel: kernel.boot_image().to_path_buf(),
            state_dir,
            vcpus: 1,
            boot_timeout: Duration::from_secs(60),
            init_timeout: Duration::from_secs(10),
            pool: None,
            claim_timeout: Duration::from_secs(10),
            jail: None,
            initrd: Arc::new(InitrdFile(path)),
        })
    }

    /// The initramfs the VMs boot.
    pub fn initrd(&self) -> &Path {
        &self.initrd.0
    }

    /// This configuration with pools: templates of this kernel and initramfs, VMs in
    /// `state_dir` (or jailed as [`MicrovmConfig::jail`] says: set it first), the pool sizes
    /// `sizes` (memory MiB, idle VMs to keep). Call inside a tokio runtime (the pools refill on
    /// it).
    pub fn with_pools(
        mut self,
        sizes: &[crate::pool::PoolSize],
        template_dir: PathBuf,
    ) -> Result<Self, crate::pool::PoolError> {
        let mut pools = crate::pool::PoolConfig::new(
            self.hearth_binary.clone(),
            self.kernel.clone(),
            self.initrd().to_path_buf(),
            self.state_dir.clone(),
        );
        pools.sizes = sizes.to_vec();
        pools.template_dir = template_dir;
        pools.vcpus = self.vcpus;
        pools.boot_timeout = self.boot_timeout;
        pools.jail = self.jail.clone();
        self.pool = Some(PoolSet::start(pools)?);
        Ok(self)
    }
}

/// A running microVM sandbox.
pub struct MicrovmSandbox {
    link: HostLink,
    vmm: Mutex<Option<VmmProcess>>,
    /// The init's ready link, kept for the VM's life.
    _ready: HeldReady,
    ready: Ready,
    dir: PathBuf,
    jail: Mutex<Option<Jailed>>,
    torn_down: AtomicBool,
}

/// The init's ready link as a sandbox holds it.
enum HeldReady {
    /// A booted VM's connection, read for its `Ready`.
    Booted { _conn: UnixStream },
    /// A pooled VM's (its connection or the listener it comes to).
    Pooled { _link: crate::pool::ReadyLink },
}

/// A VM's jail, to clean up after once its VMM has ended ([`JailConfig::clean_up`]: only what a
/// killed jailer left).
type Jailed = (JailConfig, VmJail);

/// Kills the VMM and removes the folder of a sandbox that did not finish starting.
struct Half {
    vmm: Option<VmmProcess>,
    dir: Option<PathBuf>,
    jail: Option<Jailed>,
}

impl Half {
    fn serial_tail(&self) -> String {
        let Some(dir) = &self.dir else {
            return String::new();
        };
        let text = std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default();
        let start = text.len().saturating_sub(2000);
        text.get(start..).unwrap_or("").trim().to_string()
    }

    /// A `Gone` error with what the VMM and the guest said.
    fn gone(&mut self, what: String) -> SandboxError {
        let stderr = match self.vmm.as_mut() {
            Some(v) => {
                let _ = v.kill();
                v.stderr_tail()
            }
            None => String::new(),
        };
        SandboxError::Gone(format!(
            "{what}; VMM stderr: {}; guest console: {}",
            stderr.trim(),
            self.serial_tail()
        ))
    }
}

impl Drop for Half {
    fn drop(&mut self) {
        if let Some(mut v) = self.vmm.take() {
            let _ = v.kill();
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        clean_up_jail(self.jail.take());
    }
}

/// Removes what a killed jailer left of `jail` (nothing, when the jailer cleaned up).
fn clean_up_jail(jail: Option<Jailed>) {
    if let Some((jails, jail)) = jail
        && let Err(e) = jails.clean_up(&jail)
    {
        tracing::warn!(id = %jail.id, error = %e, "cannot clean up a microVM's jail");
    }
}

impl Sandbox for MicrovmSandbox {
    type Config = MicrovmConfig;

    async fn start(
        config: &MicrovmConfig,
        function: &FunctionSpec,
    ) -> Result<(Self, InitReport), SandboxError> {
        let function = &*one_at_a_time(function);
        // Sizes beyond the largest pool (Lambda allows up to 10,240 MB) boot as without pools.
        let pool = config
            .pool
            .as_ref()
            .filter(|p| p.fitting_size(function.bundle.memory_mb).is_ok());
        let (mut half, uds, ready_conn, ready) = match pool {
            Some(pool) => claim(pool, config, function).await?,
            None => boot(config, function).await?,
        };
        let stream = match connect_vsock(&uds, CONTROL_PORT).await {
            Ok(s) => s,
            Err(e) => return Err(half.gone(format!("cannot reach the guest's control port: {e}"))),
        };
        let (reader, writer) = stream.into_split();
        // The init's own wait is bounded by `init_timeout`; this also bounds the `Hello` exchange
        // and the code transfer, so a guest that stops reading cannot hold the start forever.
        let limit = config.init_timeout + LINK_SLACK;
        let opened = tokio::time::timeout(
            limit,
            HostLink::open(function, config.init_timeout, reader, writer),
        )
        .await;
        let (link, report) = match opened {
            Ok(Ok(done)) => done,
            Ok(Err(SandboxError::Link(e))) => {
                return Err(half.gone(format!("the host link failed: {e}")));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(half.gone(format!(
                    "the guest did not take the function within {limit:?}"
                )));
            }
        };
        let vmm = half.vmm.take();
        let dir = half.dir.take().unwrap_or_default();
        let jail = half.jail.take();
        Ok((
            MicrovmSandbox {
                link,
                vmm: Mutex::new(vmm),
                _ready: ready_conn,
                ready,
                dir,
                jail: Mutex::new(jail),
                torn_down: AtomicBool::new(false),
            },
            report,
        ))
    }

    async fn invoke(&self, request: InvokeRequest) -> Result<InvokeResponse, SandboxError> {
        // The guest reports the function's peak memory itself.
        self.link.invoke(request, || None).await
    }

    fn is_alive(&self) -> bool {
        self.link.is_alive()
    }

    async fn destroy(self) {
        let vmm = lock(&self.vmm).take();
        if let Some(mut vmm) = vmm {
            self.link.close();
            let jail = lock(&self.jail).take();
            let _ = tokio::task::spawn_blocking(move || {
                let _ = vmm.kill();
                drop(vmm);
                clean_up_jail(jail);
            })
            .await;
        }
        self.teardown();
    }
}

/// A started VM and its folder ([`Half`] removes both on failure), the VMM's vsock socket, the
/// init's ready connection and what it announced.
type Started = (Half, PathBuf, HeldReady, Ready);

/// Boots a VM for `function` and waits for its init's `Ready`.
async fn boot(config: &MicrovmConfig, function: &FunctionSpec) -> Result<Started, SandboxError> {
    let name = format!("hearth-vm-{}", &super::new_request_id()[..18]);
    let mut vm = VmConfig::new(&config.kernel);
    vm.initrd = Some(config.initrd().to_path_buf());
    vm.mem_mib = function.bundle.memory_mb;
    vm.vcpus = config.vcpus;
    // The folder of the VM's sockets and serial log: its own under the state folder, or the jail
    // root, where the VMM sees it as `/`.
    let (dir, inside, jail) = match &config.jail {
        Some(jails) => {
            let jail = jails
                .jail_for(&name, &vm)
                .and_then(|jail| jails.prepare(&jail).map(|()| jail))
                .map_err(|e| setup_other("prepare the VMM's jail", e))?;
            (jail.root.clone(), PathBuf::from("/"), Some(jail))
        }
        None => {
            let dir = config.state_dir.join(&name);
            std::fs::create_dir_all(&dir).map_err(setup("create the sandbox folder"))?;
            (dir.clone(), dir, None)
        }
    };
    let mut half = Half {
        vmm: None,
        dir: Some(dir.clone()),
        jail: config.jail.clone().zip(jail.clone()),
    };
    let uds = dir.join("vsock.sock");
    let ready_path = PathBuf::from(format!("{}_{READY_PORT}", uds.display()));
    let ready_listener = UnixListener::bind(&ready_path).map_err(setup("bind the ready socket"))?;
    vm.vsock = Some(VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: inside.join("vsock.sock"),
    });
    vm.serial_log = Some(inside.join("serial.log"));
    vm.control_socket = Some(inside.join("control.sock"));
    let binary = config.hearth_binary.clone();
    let jails = config.jail.clone();
    let spawned = tokio::task::spawn_blocking(move || {
        let vmm = match (&jails, &jail) {
            (Some(jails), Some(jail)) => {
                // The VMM, under the jail's uid, connects to the agent's ready socket.
                jail.give(&ready_path)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                jails
                    .spawn(jail, &vm)
                    .map_err(|e| std::io::Error::other(e.to_string()))?
            }
            _ => crate::cores::unpinned(|| VmmProcess::spawn(&binary, &vm))
                .map_err(std::io::Error::other)?,
        };
        vmm.start().map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>(vmm)
    })
    .await
    .map_err(|e| setup_other("start the VMM", e))?;
    half.vmm = Some(spawned.map_err(setup("start the VMM"))?);
    let booted = Instant::now();

    // The init's Hello + Ready on the ready port, unless the VMM ends first.
    let mut ready_conn = loop {
        let waited = tokio::time::timeout(Duration::from_millis(50), ready_listener.accept());
        match waited.await {
            Ok(Ok((conn, _))) => {
                // Only our VMM (its vsock backend) may be the guest's ready connection.
                let peer = conn.peer_cred().ok().and_then(|c| c.pid());
                let vmm_pid = half.vmm.as_ref().map(|v| v.vmm_pid());
                if peer.is_some() && peer.map(|p| p as u32) == vmm_pid {
                    break conn;
                }
                tracing::warn!(
                    ?peer,
                    ?vmm_pid,
                    "ignored a ready connection from another process"
                );
            }
            Ok(Err(e)) => return Err(setup("accept the ready connection")(e)),
            Err(_) => {}
        }
        let exited = half
            .vmm
            .as_mut()
            .and_then(|v| v.wait(Duration::ZERO).ok().flatten());
        if let Some(status) = exited {
            return Err(half.gone(format!(
                "the VMM exited ({status}) before the guest was ready"
            )));
        }
        if booted.elapsed() >= config.boot_timeout {
            return Err(half.gone(format!(
                "the guest did not report ready within {:?}",
                config.boot_timeout
            )));
        }
    };
    let ready = tokio::time::timeout(Duration::from_secs(10), read_ready(&mut ready_conn)).await;
    let ready = match ready {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(half.gone(format!("bad Ready from the guest: {e}"))),
        Err(_) => return Err(half.gone("no Ready frame from the guest".into())),
    };
    tracing::debug!(
        boot = ?booted.elapsed(),
        kernel = %ready.kernel_release,
        ready_ms = ready.ready_ms,
        "microVM ready"
    );
    Ok((half, uds, HeldReady::Booted { _conn: ready_conn }, ready))
}

/// Claims a VM from `pool` for `function`'s memory size.
async fn claim(
    pool: &PoolSet,
    config: &MicrovmConfig,
    function: &FunctionSpec,
) -> Result<Started, SandboxError> {
    let claimed = pool
        .claim(function.bundle.memory_mb, config.claim_timeout)
        .await
        .map_err(|e| setup_other("claim a pooled microVM", e))?;
    tracing::debug!(
        memory_mb = function.bundle.memory_mb,
        vm_mib = claimed.mem_mib,
        latency = ?claimed.latency,
        "microVM claimed from its pool"
    );
    let Some(parts) = claimed.vm.into_parts() else {
        return Err(SandboxError::Gone("the claimed VM had no VMM".into()));
    };
    let half = Half {
        vmm: Some(parts.vmm),
        dir: Some(parts.dir),
        jail: parts.jail,
    };
    Ok((
        half,
        parts.uds,
        HeldReady::Pooled {
            _link: parts.ready_link,
        },
        parts.ready,
    ))
}

impl MicrovmSandbox {
    /// The VMM process's id, while it runs.
    pub fn vmm_pid(&self) -> Option<u32> {
        lock(&self.vmm).as_ref().map(VmmProcess::vmm_pid)
    }

    /// What the guest's init reported when it came up.
    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        self.link.close();
        if let Some(mut vmm) = lock(&self.vmm).take() {
            let _ = vmm.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        clean_up_jail(lock(&self.jail).take());
    }
}

impl Drop for MicrovmSandbox {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// `function` with `max_concurrency` 1, as a microVM runs it (borrowed when it already is).
pub fn one_at_a_time(function: &FunctionSpec) -> Cow<'_, FunctionSpec> {
    if function.bundle.max_concurrency <= 1 {
        return Cow::Borrowed(function);
    }
    tracing::info!(
        asked = function.bundle.max_concurrency,
        "a microVM takes one invoke at a time: AWS_LAMBDA_MAX_CONCURRENCY is 1 here"
    );
    let mut single = function.clone();
    single.bundle.max_concurrency = 1;
    Cow::Owned(single)
}

/// Reads the init's `Hello` and `Ready`.
async fn read_ready(conn: &mut UnixStream) -> Result<Ready, hearth_guest::protocol::ProtocolError> {
    use hearth_guest::protocol::ProtocolError;
    let unexpected = |expected: &'static str, got: Option<Message>| ProtocolError::Unexpected {
        expected,
        got: got
            .map(|m| m.kind().to_owned())
            .unwrap_or_else(|| "end of stream".into()),
    };
    match read_frame(conn).await? {
        Some(m @ Message::Hello(_)) => {
            check_hello(m)?;
        }
        other => return Err(unexpected("Hello", other)),
    }
    match read_frame(conn).await? {
        Some(Message::Ready(r)) => Ok(r),
        other => Err(unexpected("Ready", other)),
    }
}

/// Connects to guest vsock `port` through the VMM's Unix socket (`CONNECT <port>\n`, `OK <n>\n`).
async fn connect_vsock(uds: &Path, port: u32) -> Result<UnixStream, std::io::Error> {
    let mut stream = UnixStream::connect(uds).await?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    // A byte at a time, so nothing of the guest's stream is consumed.
    let mut line = Vec::new();
    let reply = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let b = stream.read_u8().await?;
            if b == b'\n' {
                return Ok::<_, std::io::Error>(());
            }
            if line.len() >= 64 {
                return Err(std::io::Error::other("the reply line is too long"));
            }
            line.push(b);
        }
    })
    .await;
    match reply {
        Ok(Ok(())) if line.starts_with(b"OK ") => Ok(stream),
        Ok(Ok(())) => Err(std::io::Error::other(format!(
            "CONNECT {port} refused: {}",
            String::from_utf8_lossy(&line)
        ))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::other(format!("no reply to CONNECT {port}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_guest::protocol::{Hello, encode_frame};

    /// A listener at `path` that reads one request line, answers `reply`, then sends `after`.
    async fn backend(path: &Path, reply: &'static [u8], after: &'static [u8]) -> String {
        let listener = UnixListener::bind(path).unwrap();
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut line = Vec::new();
        loop {
            let b = conn.read_u8().await.unwrap();
            if b == b'\n' {
                break;
            }
            line.push(b);
        }
        conn.write_all(reply).await.unwrap();
        conn.write_all(after).await.unwrap();
        String::from_utf8(line).unwrap()
    }

    #[tokio::test]
    async fn connect_reads_exactly_the_reply_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let server = tokio::spawn({
            let path = path.clone();
            async move { backend(&path, b"OK 1073741824\n", b"guest bytes").await }
        });
        let stream = loop {
            match connect_vsock(&path, 1025).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        assert_eq!(server.await.unwrap(), "CONNECT 1025");
        let mut rest = Vec::new();
        let mut stream = stream;
        stream.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"guest bytes");
    }

    #[tokio::test]
    async fn a_refused_connect_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let server = tokio::spawn({
            let path = path.clone();
            async move { backend(&path, b"FAILURE\n", b"").await }
        });
        let err = loop {
            match connect_vsock(&path, 9).await {
                Ok(_) => panic!("a refusal was taken for a connection"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err(e) => break e,
            }
        };
        server.await.unwrap();
        assert!(err.to_string().contains("CONNECT 9 refused"), "{err}");
    }

    fn spec(max_concurrency: u32) -> FunctionSpec {
        FunctionSpec {
            bundle: super::super::Bundle {
                function_name: "f".into(),
                function_version: "$LATEST".into(),
                function_arn: "arn:aws:lambda:us-east-1:000000000000:function:f".into(),
                runtime: "provided.al2023".into(),
                handler: "bootstrap".into(),
                memory_mb: 128,
                timeout_ms: 3000,
                region: "us-east-1".into(),
                log_group: "/aws/lambda/f".into(),
                log_stream: "s".into(),
                env: Vec::new(),
                credentials: None,
                max_concurrency,
                code_len: 0,
            },
            code: b"zip".to_vec(),
            cpu: None,
        }
    }

    #[test]
    fn a_microvm_takes_one_invoke_at_a_time() {
        for asked in [0, 1, 2, 64] {
            let function = spec(asked);
            let single = one_at_a_time(&function);
            assert!(single.bundle.max_concurrency <= 1, "asked {asked}");
            assert_eq!(single.code, function.code);
            assert_eq!(single.bundle.function_arn, function.bundle.function_arn);
        }
        // What the guest's init then gives the runtime: no AWS_LAMBDA_MAX_CONCURRENCY above 1.
        let paths = hearth_guest::runtime::env::Paths {
            task_root: "/var/task".into(),
            runtime_dir: "/var/runtime".into(),
            runtime_api: "127.0.0.1:9001".into(),
        };
        let env = hearth_guest::runtime::env::build(&one_at_a_time(&spec(8)).bundle, &paths)
            .expect("a valid bundle");
        assert!(!env.contains_key("AWS_LAMBDA_MAX_CONCURRENCY"), "{env:?}");
        assert!(matches!(one_at_a_time(&spec(1)), Cow::Borrowed(_)));
    }

    #[tokio::test]
    async fn ready_needs_hello_then_ready() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let ready = Ready {
            init_start_ms: 1,
            ready_ms: 2,
            kernel_release: "6.1.0-56-cloud-amd64".into(),
        };
        let mut bytes = encode_frame(&Message::Hello(Hello::ours("test"))).unwrap();
        bytes.extend(encode_frame(&Message::Ready(ready.clone())).unwrap());
        a.write_all(&bytes).await.unwrap();
        assert_eq!(read_ready(&mut b).await.unwrap(), ready);

        // Ready without Hello is refused.
        a.write_all(&encode_frame(&Message::Ready(ready)).unwrap())
            .await
            .unwrap();
        assert!(read_ready(&mut b).await.is_err());
        // So is an early end.
        drop(a);
        assert!(read_ready(&mut b).await.is_err());
    }
}
