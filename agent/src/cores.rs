//! Thread-per-core: the agent's invoke path runs on N worker threads ("cores"), each with its own
//! single-threaded tokio runtime (epoll), pinned to one of the CPUs the process may use.
//!
//! - Listeners: the Unix invoke-proxy socket has one listener (on core 0); each accepted
//!   connection is steered to the core that owns the function of its first invoke (core 0
//!   exchanges the `Hello`s and reads that invoke, then hands the socket itself over), so a
//!   client that keeps invoking one function over its connection pays no cross-core hand-over per
//!   invoke; the optional TCP listener is one `SO_REUSEPORT` socket per core, so the kernel
//!   spreads the connections.
//! - Sharding: each function (all its versions) belongs to one core ([`shard_of`]: FNV-1a of its
//!   ARN without a qualifier). That core owns the function's execution environments: every
//!   core has its own handler (its own `Environments`), so an invoke takes no lock shared between
//!   cores. An invoke read on another core is handed to its owner over the owner's command channel
//!   (tokio's unbounded mpsc, a lock-free list of blocks; `cargo bench -p hearth-agent --bench
//!   handover` compares it with a crossbeam queue) and its result comes back over a oneshot.
//! - Steering: a [`TcpService`] may be given a [`Steer`], which names the function of a new
//!   connection's first request from its first bytes (peeked, not read); the accepting core then
//!   hands the connection itself to that function's owner, so a client that keeps invoking one
//!   function over one connection (an SDK's keep-alive connection) never pays the two cross-core
//!   wake-ups of a hand-over per invoke.
//! - Shared between cores: the concurrency counters (atomics, [`crate::concurrency`], so the
//!   account-wide count stays exact) and the code cache (cold starts only).
//! - Shutdown ([`Cores::shutdown`]): every core stops accepting and reading invokes; the invokes
//!   in flight get up to the grace period; then every core drains its handler with what is left
//!   of it (ending its sandboxes), and its thread ends.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hearth_guest::runtime::quiet_unix::{QuietReadHalf, QuietUnixStream, QuietWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};

use crate::proxy::protocol::{InvokeRequest, InvokeResult, Outcome};
use crate::proxy::server::{self, BoxFuture, InFlight, InvokeHandler, ServerError};

thread_local! {
    /// On a core's thread: its index and its own handler, so a [`Dispatcher`] called there runs
    /// an invoke of a function this core owns in place instead of handing it to itself.
    static THIS_CORE: std::cell::RefCell<Option<(usize, Arc<dyn InvokeHandler>)>> =
        const { std::cell::RefCell::new(None) };
}

/// The handler of core `owner`, when the calling thread is that core.
fn on_core(owner: usize) -> Option<Arc<dyn InvokeHandler>> {
    THIS_CORE.with(|core| {
        core.borrow()
            .as_ref()
            .filter(|(index, _)| *index == owner)
            .map(|(_, handler)| handler.clone())
    })
}

/// How many cores, and whether they are pinned.
#[derive(Debug, Clone)]
pub struct CoresConfig {
    /// Worker threads; 0: one per CPU this process may use (its affinity mask).
    pub threads: usize,
    /// Pin each worker to one CPU of the affinity mask (round-robin when there are more workers).
    pub pin: bool,
}

impl Default for CoresConfig {
    fn default() -> Self {
        CoresConfig {
            threads: 0,
            pin: true,
        }
    }
}

/// Where the cores take connections.
#[derive(Debug, Clone, Default)]
pub struct Listeners {
    /// The invoke-proxy Unix socket.
    pub unix: Option<PathBuf>,
    /// A TCP address (port 0 picks one): one `SO_REUSEPORT` listener per core.
    pub tcp: Option<SocketAddr>,
}

/// Makes each core's own handler; called once per core, on that core's runtime.
pub type HandlerFactory = Arc<dyn Fn(usize) -> Arc<dyn InvokeHandler> + Send + Sync>;

/// Why the cores could not start.
#[derive(Debug, thiserror::Error)]
pub enum CoresError {
    #[error("cannot read the CPUs this process may use")]
    Affinity(#[source] std::io::Error),
    #[error("cannot start core {core}")]
    Thread {
        core: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("core {core} ended while starting")]
    Start { core: usize },
    #[error("cannot listen on {address}")]
    Tcp {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the invoke-proxy socket")]
    Unix(#[source] ServerError),
}

/// Serves one connection accepted by a [`TcpService`] listener, on the core that accepted it.
pub type ConnectionService =
    Arc<dyn Fn(tokio::net::TcpStream, SocketAddr) -> BoxFuture<'static, ()> + Send + Sync>;

/// Names the function (its ARN, a qualifier allowed) that a connection's first request invokes,
/// from the first bytes the client sent; `None` when they name none (the connection stays where
/// it was accepted).
pub type Steer = Arc<dyn Fn(&[u8]) -> Option<String> + Send + Sync>;

/// How many bytes of a new connection [`Steer`] sees: enough for a request line.
const STEER_PEEK: usize = 1024;

/// How long a new connection may take to send its first bytes before it is served unsteered.
const STEER_WAIT: Duration = Duration::from_secs(1);

/// A TCP service the cores serve beside the invoke-proxy protocol (`hearth serve`'s Lambda API):
/// one `SO_REUSEPORT` listener per core, each connection served on the core whose listener took
/// it, so an invoke of a function that core owns never leaves its thread. It stops accepting on
/// [`TcpService::stop`] or when dropped; connections already open are the service's to end.
pub struct TcpService {
    address: SocketAddr,
    stop: watch::Sender<bool>,
}

impl TcpService {
    /// The address the listeners share.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Stops accepting on every core.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for TcpService {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where a core's [`TcpService`] connections may be steered.
#[derive(Clone)]
struct Steering {
    steer: Steer,
    /// This core.
    index: usize,
    peers: Arc<[mpsc::UnboundedSender<Command>]>,
}

impl Steering {
    /// Serves `stream` on the core that owns the function its first request invokes (here when
    /// that is this core, or when the first bytes name none or are slow to come).
    async fn serve(
        self,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        service: ConnectionService,
    ) {
        let mut first = [0u8; STEER_PEEK];
        let owner = match tokio::time::timeout(STEER_WAIT, stream.peek(&mut first)).await {
            Ok(Ok(n)) if n > 0 => {
                (self.steer)(&first[..n]).map(|arn| shard_of(&arn, self.peers.len()))
            }
            _ => None,
        };
        let Some(owner) = owner.filter(|&owner| owner != self.index) else {
            return service(stream, peer).await;
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "cannot hand a connection over; it is closed");
                return;
            }
        };
        let command = Command::Steered {
            stream,
            peer,
            service: service.clone(),
        };
        if let Err(mpsc::error::SendError(command)) = self.peers[owner].send(command)
            && let Command::Steered { stream, .. } = command
        {
            // The owner has stopped: serve it here after all.
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => service(stream, peer).await,
                Err(e) => tracing::debug!(error = %e, "cannot take a connection back"),
            }
        }
    }
}

/// Serves a connection that another core steered here.
fn serve_steered(stream: std::net::TcpStream, peer: SocketAddr, service: &ConnectionService) {
    match tokio::net::TcpStream::from_std(stream) {
        Ok(stream) => {
            tokio::spawn(service(stream, peer));
        }
        Err(e) => tracing::warn!(error = %e, "cannot take over a steered connection"),
    }
}

/// A core's accept loop of a [`TcpService`].
async fn accept_service(
    listener: std::net::TcpListener,
    service: ConnectionService,
    steering: Option<Steering>,
    mut stop: watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve a TCP listener on this core");
            return;
        }
    };
    while !*stop.borrow_and_update() {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                    match &steering {
                        Some(steering) => {
                            tokio::spawn(steering.clone().serve(stream, peer, service.clone()));
                        }
                        None => {
                            tokio::spawn(service(stream, peer));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

/// What a core is told.
enum Command {
    /// Run an invoke of a function this core owns; send its result back.
    /// The instant is the invoke's arrival at the agent ([`crate::metrics::with_arrival`]).
    Invoke(
        Box<InvokeRequest>,
        std::time::Instant,
        oneshot::Sender<InvokeResult>,
    ),
    /// Serve a Unix connection whose `Hello`s are exchanged and whose first invoke (of a function
    /// this core owns) was read on another core.
    SteeredUnix(std::os::unix::net::UnixStream, Box<InvokeRequest>),
    /// Accept on this core's listener of a [`TcpService`] and serve its connections here (or
    /// steer them to their function's owner).
    ServeTcp {
        listener: std::net::TcpListener,
        service: ConnectionService,
        steer: Option<Steer>,
        stop: watch::Receiver<bool>,
    },
    /// Serve a [`TcpService`] connection that another core steered here.
    Steered {
        stream: std::net::TcpStream,
        peer: SocketAddr,
        service: ConnectionService,
    },
    /// Drain the handler within the grace, then end.
    Drain(Duration, oneshot::Sender<()>),
    /// End now (the cores were dropped without a shutdown).
    Exit,
}

struct Core {
    commands: mpsc::UnboundedSender<Command>,
    /// Invokes read on this core's connections and not yet answered.
    in_flight: Arc<InFlight>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The running cores.
pub struct Cores {
    cores: Vec<Core>,
    peers: Arc<[mpsc::UnboundedSender<Command>]>,
    stop: watch::Sender<bool>,
    tcp: Option<SocketAddr>,
    shut_down: bool,
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Result<Vec<usize>, CoresError> {
    let set = rustix::thread::sched_getaffinity(None)
        .map_err(|e| CoresError::Affinity(std::io::Error::from(e)))?;
    Ok(cpu_list(&set))
}

/// The CPUs in `set`, in ascending order.
fn cpu_list(set: &rustix::thread::CpuSet) -> Vec<usize> {
    (0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&cpu| set.is_set(cpu))
        .collect()
}

/// The core that owns invokes of the function `function_arn` (any version) among `cores`: FNV-1a
/// of the ARN without its qualifier, so every version, and every alias of it, lands on one core,
/// and a connection can be steered there from the function's name alone ([`Steer`]). Stable
/// across runs and builds.
pub fn shard_of(function_arn: &str, cores: usize) -> usize {
    if cores <= 1 {
        return 0;
    }
    // arn:aws:lambda:REGION:ACCOUNT:function:NAME[:QUALIFIER]
    let unqualified = match function_arn.match_indices(':').nth(6) {
        Some((at, _)) => &function_arn[..at],
        None => function_arn,
    };
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in unqualified.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % cores as u64) as usize
}

/// One `SO_REUSEPORT` TCP listener on `address` (non-blocking).
fn reuseport_listener(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The CPUs the first core thread could use before [`pin`] narrowed it to one.
static UNPINNED: std::sync::OnceLock<rustix::thread::CpuSet> = std::sync::OnceLock::new();

thread_local! {
    /// On a pinned core's thread: the CPU it is pinned to.
    static HOME_CPU: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Pins the calling thread to `cpu`, remembering what it could use before ([`unpinned`]).
fn pin(cpu: usize) -> std::io::Result<()> {
    let before = rustix::thread::sched_getaffinity(None).map_err(std::io::Error::from)?;
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).map_err(std::io::Error::from)?;
    let _ = UNPINNED.set(before);
    HOME_CPU.with(|home| home.set(Some(cpu)));
    Ok(())
}

/// On a pinned core's thread, the CPU it is pinned to; `None` elsewhere.
pub fn home_cpu() -> Option<usize> {
    HOME_CPU.with(std::cell::Cell::get)
}

/// The CPUs the cores could use before they pinned themselves, in ascending order; `None` where
/// no core was pinned.
pub fn shared_cpus() -> Option<Vec<usize>> {
    UNPINNED.get().map(cpu_list)
}

/// Runs `spawn`, which starts a child process, with the calling thread's CPU affinity widened
/// back to what the cores could use before they pinned themselves. A child inherits the affinity
/// of the thread that forks it (and a thread that of the thread that made it): started from a
/// pinned core or one of its blocking threads, every sandbox (its init, the function and their
/// threads) or VMM of that core's functions would share that one CPU, however many the host has.
/// Where no core was pinned, `spawn` just runs.
pub fn unpinned<T>(spawn: impl FnOnce() -> T) -> T {
    spawn_on(None, spawn)
}

/// Runs `spawn` (which starts a child process) with the calling thread's affinity set to `cpu`
/// alone, or, with `None` or a CPU the cores could not use, to every CPU they could
/// ([`unpinned`]); then pins the thread again. The child keeps that affinity, and so do its
/// children. Where no core was pinned, `spawn` just runs.
pub fn spawn_on<T>(cpu: Option<usize>, spawn: impl FnOnce() -> T) -> T {
    let Some(&wide) = UNPINNED.get() else {
        return spawn();
    };
    let target = match cpu.filter(|&c| c < rustix::thread::CpuSet::MAX_CPU && wide.is_set(c)) {
        Some(c) => {
            let mut one = rustix::thread::CpuSet::new();
            one.set(c);
            one
        }
        None => wide,
    };
    let narrow = rustix::thread::sched_getaffinity(None).ok();
    if let Err(e) = rustix::thread::sched_setaffinity(None, &target) {
        tracing::debug!(error = %e, "cannot set the core's affinity for a child");
    }
    let spawned = spawn();
    if let Some(narrow) = narrow
        && let Err(e) = rustix::thread::sched_setaffinity(None, &narrow)
    {
        tracing::warn!(error = %e, "cannot pin the core again after starting a child");
    }
    spawned
}

impl Cores {
    /// Starts the cores, each with the handler `factory` makes for it, serving `listeners`.
    /// Returns once every core serves.
    pub async fn start(
        config: &CoresConfig,
        listeners: Listeners,
        factory: HandlerFactory,
    ) -> Result<Cores, CoresError> {
        let cpus = allowed_cpus()?;
        let threads = match config.threads {
            0 => cpus.len().max(1),
            n => n,
        };
        let mut tcp_listeners = Vec::new();
        let mut tcp = None;
        if let Some(address) = listeners.tcp {
            let tcp_err = |source| CoresError::Tcp { address, source };
            // The first bind picks the port (when 0); the others join it.
            let first = reuseport_listener(address).map_err(tcp_err)?;
            let bound = first.local_addr().map_err(tcp_err)?;
            tcp_listeners.push(first);
            for _ in 1..threads {
                tcp_listeners.push(reuseport_listener(bound).map_err(tcp_err)?);
            }
            tcp = Some(bound);
        }
        let mut unix = match &listeners.unix {
            Some(path) => Some((
                server::bind_std(path).map_err(CoresError::Unix)?,
                path.clone(),
            )),
            None => None,
        };
        let mut tcp_listeners = tcp_listeners.into_iter();
        let (stop, stopped) = watch::channel(false);
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..threads).map(|_| mpsc::unbounded_channel()).unzip();
        let peers: Arc<[mpsc::UnboundedSender<Command>]> = senders.clone().into();
        let mut cores = Cores {
            cores: Vec::with_capacity(threads),
            peers: peers.clone(),
            stop,
            tcp,
            shut_down: false,
        };
        let mut ready = Vec::with_capacity(threads);
        for (index, commands) in receivers.into_iter().enumerate() {
            let in_flight = Arc::new(InFlight::default());
            let (ready_tx, ready_rx) = oneshot::channel();
            let setup = CoreSetup {
                index,
                cpu: config
                    .pin
                    .then(|| cpus.get(index % cpus.len().max(1)).copied())
                    .flatten(),
                commands,
                peers: peers.clone(),
                in_flight: in_flight.clone(),
                stop: stopped.clone(),
                factory: factory.clone(),
                unix: if index == 0 { unix.take() } else { None },
                tcp: tcp_listeners.next(),
                ready: ready_tx,
            };
            let thread = std::thread::Builder::new()
                .name(format!("hearth-core-{index}"))
                .spawn(move || setup.run())
                .map_err(|source| CoresError::Thread {
                    core: index,
                    source,
                })?;
            cores.cores.push(Core {
                commands: senders[index].clone(),
                in_flight,
                thread: Some(thread),
            });
            ready.push(ready_rx);
        }
        for (core, ready) in ready.into_iter().enumerate() {
            match ready.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(CoresError::Start { core }),
            }
        }
        tracing::info!(cores = threads, pinned = config.pin, tcp = ?cores.tcp, "agent cores serving");
        Ok(cores)
    }

    /// Serves `service` on `address` (port 0 picks one) from every core: one `SO_REUSEPORT`
    /// listener each (see [`TcpService`]).
    pub fn serve_tcp(
        &self,
        address: SocketAddr,
        service: ConnectionService,
        steer: Option<Steer>,
    ) -> Result<TcpService, CoresError> {
        let tcp_err = |source| CoresError::Tcp { address, source };
        // The first bind picks the port (when 0); the others join it.
        let first = reuseport_listener(address).map_err(tcp_err)?;
        let bound = first.local_addr().map_err(tcp_err)?;
        let mut listeners = vec![first];
        for _ in 1..self.cores.len() {
            listeners.push(reuseport_listener(bound).map_err(tcp_err)?);
        }
        let (stop, stopped) = watch::channel(false);
        for (core, listener) in self.cores.iter().zip(listeners) {
            let command = Command::ServeTcp {
                listener,
                service: service.clone(),
                steer: steer.clone(),
                stop: stopped.clone(),
            };
            if core.commands.send(command).is_err() {
                return Err(CoresError::Tcp {
                    address: bound,
                    source: std::io::Error::other("an agent core has stopped"),
                });
            }
        }
        Ok(TcpService {
            address: bound,
            stop,
        })
    }

    /// The in-process way in: invokes go straight to the owning core.
    pub fn dispatcher(&self) -> Dispatcher {
        Dispatcher {
            peers: self.peers.clone(),
        }
    }

    /// How many cores run.
    pub fn len(&self) -> usize {
        self.cores.len()
    }

    /// Whether no core runs (never, once started).
    pub fn is_empty(&self) -> bool {
        self.cores.is_empty()
    }

    /// The bound TCP address, when there is a TCP listener.
    pub fn tcp_address(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// Stops accepting and reading invokes, lets those in flight finish within `grace`, then
    /// drains every core's handler with the rest of it and ends the threads.
    pub async fn shutdown(mut self, grace: Duration) {
        self.shut_down = true;
        let deadline = tokio::time::Instant::now() + grace;
        let _ = self.stop.send(true);
        let in_flight: usize = self.cores.iter().map(|c| c.in_flight.count()).sum();
        tracing::info!(in_flight, "invoke proxy draining");
        for core in &self.cores {
            if tokio::time::timeout_at(deadline, core.in_flight.wait_idle())
                .await
                .is_err()
            {
                let left: usize = self.cores.iter().map(|c| c.in_flight.count()).sum();
                tracing::warn!(left, "invokes still in flight after the grace period");
                break;
            }
        }
        let mut drained = Vec::with_capacity(self.cores.len());
        for core in &self.cores {
            let (done, wait) = oneshot::channel();
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if core.commands.send(Command::Drain(left, done)).is_ok() {
                drained.push(wait);
            }
        }
        for wait in drained {
            let _ = wait.await;
        }
        let threads: Vec<_> = self
            .cores
            .iter_mut()
            .filter_map(|c| c.thread.take())
            .collect();
        let joined = tokio::task::spawn_blocking(move || {
            threads
                .into_iter()
                .map(|t| t.join())
                .filter(Result::is_err)
                .count()
        })
        .await;
        if !matches!(joined, Ok(0)) {
            tracing::error!("an agent core thread panicked");
        }
    }
}

impl Drop for Cores {
    fn drop(&mut self) {
        if !self.shut_down {
            let _ = self.stop.send(true);
            for core in &self.cores {
                let _ = core.commands.send(Command::Exit);
            }
        }
    }
}

/// Everything one core thread starts with.
struct CoreSetup {
    index: usize,
    cpu: Option<usize>,
    commands: mpsc::UnboundedReceiver<Command>,
    peers: Arc<[mpsc::UnboundedSender<Command>]>,
    in_flight: Arc<InFlight>,
    stop: watch::Receiver<bool>,
    factory: HandlerFactory,
    unix: Option<(std::os::unix::net::UnixListener, PathBuf)>,
    tcp: Option<std::net::TcpListener>,
    ready: oneshot::Sender<Result<(), CoresError>>,
}

impl CoreSetup {
    /// The core thread.
    fn run(self) {
        let index = self.index;
        if let Some(cpu) = self.cpu
            && let Err(e) = pin(cpu)
        {
            tracing::warn!(core = index, cpu, error = %e, "cannot pin the core; it runs unpinned");
        }
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(source) => {
                let _ = self.ready.send(Err(CoresError::Thread {
                    core: index,
                    source,
                }));
                return;
            }
        };
        runtime.block_on(self.serve());
    }

    async fn serve(self) {
        let CoreSetup {
            index,
            mut commands,
            peers,
            in_flight,
            stop,
            factory,
            unix,
            tcp,
            ready,
            ..
        } = self;
        let local = factory(index);
        THIS_CORE.with(|core| *core.borrow_mut() = Some((index, local.clone())));
        let router: Arc<dyn InvokeHandler> = Arc::new(Router {
            index,
            local: local.clone(),
            peers: peers.clone(),
        });
        let serving = Serving {
            router,
            in_flight,
            stop,
        };
        let mut listeners = tokio::task::JoinSet::new();
        if let Some((listener, path)) = unix {
            match tokio::net::UnixListener::from_std(listener) {
                Ok(listener) => {
                    listeners.spawn(serving.clone().accept_unix(
                        listener,
                        path,
                        index,
                        peers.clone(),
                    ));
                }
                Err(source) => {
                    let _ = ready.send(Err(CoresError::Unix(ServerError::Bind { path, source })));
                    return;
                }
            }
        }
        if let Some(listener) = tcp {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    listeners.spawn(serving.clone().accept_tcp(listener));
                }
                Err(source) => {
                    let address = SocketAddr::from(([0, 0, 0, 0], 0));
                    let _ = ready.send(Err(CoresError::Tcp { address, source }));
                    return;
                }
            }
        }
        let _ = ready.send(Ok(()));
        while let Some(command) = commands.recv().await {
            match command {
                Command::Invoke(request, arrived, reply) => {
                    let local = local.clone();
                    tokio::spawn(async move {
                        let result =
                            crate::metrics::with_arrival(arrived, local.invoke(*request)).await;
                        let _ = reply.send(result);
                    });
                }
                Command::SteeredUnix(stream, first) => serving.serve_steered_unix(stream, *first),
                Command::ServeTcp {
                    listener,
                    service,
                    steer,
                    stop,
                } => {
                    let steering = steer.map(|steer| Steering {
                        steer,
                        index,
                        peers: peers.clone(),
                    });
                    tokio::spawn(accept_service(listener, service, steering, stop));
                }
                Command::Steered {
                    stream,
                    peer,
                    service,
                } => serve_steered(stream, peer, &service),
                Command::Drain(grace, done) => {
                    let started = tokio::time::Instant::now();
                    while listeners.join_next().await.is_some() {}
                    local.drain(grace.saturating_sub(started.elapsed())).await;
                    let _ = done.send(());
                    break;
                }
                Command::Exit => break,
            }
        }
    }
}

/// What serving a connection on a core needs.
#[derive(Clone)]
struct Serving {
    router: Arc<dyn InvokeHandler>,
    in_flight: Arc<InFlight>,
    stop: watch::Receiver<bool>,
}

impl Serving {
    fn serve<R, W>(&self, reader: R, writer: W)
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
        W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        tokio::spawn(server::serve_connection(
            reader,
            writer,
            self.router.clone(),
            self.in_flight.clone(),
            self.stop.clone(),
        ));
    }

    /// Core 0: accepts on the Unix socket and steers each connection to the core that owns the
    /// function of its first invoke ([`Serving::steer_unix`]); removes the socket when it stops.
    async fn accept_unix(
        mut self,
        listener: tokio::net::UnixListener,
        path: PathBuf,
        index: usize,
        peers: Arc<[mpsc::UnboundedSender<Command>]>,
    ) {
        while !*self.stop.borrow_and_update() {
            tokio::select! {
                changed = self.stop.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        // Registered for read readiness only: see `QuietUnixStream`.
                        let stream = match QuietUnixStream::from_tokio(stream) {
                            Ok(stream) => stream,
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot serve an invoke-proxy connection");
                                continue;
                            }
                        };
                        if peers.len() > 1 {
                            tokio::spawn(self.clone().steer_unix(stream, index, peers.clone()));
                        } else {
                            let (reader, writer) = stream.into_split();
                            self.serve(reader, writer);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "invoke-proxy accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            }
        }
        drop(listener);
        let _ = std::fs::remove_file(&path);
    }

    /// Exchanges `Hello`s on a new Unix connection and reads its first invoke, then serves the
    /// connection on the core that owns that invoke's function: here, or handed to the owner
    /// (the socket itself, deregistered from this core's reactor), so a client that keeps invoking
    /// one function over its connection pays no cross-core hand-over per invoke. The reads here
    /// are exact (a frame at a time), so nothing read past the first invoke is left behind.
    async fn steer_unix(
        mut self,
        stream: QuietUnixStream,
        index: usize,
        peers: Arc<[mpsc::UnboundedSender<Command>]>,
    ) {
        if *self.stop.borrow_and_update() {
            return;
        }
        let (mut reader, mut writer) = stream.into_split();
        if !server::answer_hello(&mut reader, &mut writer).await {
            return;
        }
        let Some(request) = server::next_invoke(&mut reader, &mut self.stop).await else {
            return;
        };
        let owner = shard_of(&request.function.function_arn, peers.len());
        if owner != index {
            match reader.into_std(writer) {
                Ok(stream) => match peers[owner].send(Command::SteeredUnix(stream, request)) {
                    Ok(()) => return,
                    // The owner has stopped: serve it here after all.
                    Err(mpsc::error::SendError(command)) => {
                        if let Command::SteeredUnix(stream, request) = command {
                            self.serve_steered_unix(stream, *request);
                        }
                        return;
                    }
                },
                Err(e) => {
                    tracing::debug!(error = %e, "cannot hand a connection over; it is closed");
                    return;
                }
            }
        }
        self.serve_invokes(reader, writer, *request);
    }

    /// Serves a Unix connection steered here by another core, from its first invoke on.
    fn serve_steered_unix(&self, stream: std::os::unix::net::UnixStream, first: InvokeRequest) {
        match QuietUnixStream::new(stream) {
            Ok(stream) => {
                let (reader, writer) = stream.into_split();
                self.serve_invokes(reader, writer, first);
            }
            Err(e) => tracing::warn!(error = %e, "cannot take over an invoke-proxy connection"),
        }
    }

    /// Serves a Unix connection whose `Hello`s are exchanged, from its first invoke on.
    fn serve_invokes(&self, reader: QuietReadHalf, writer: QuietWriteHalf, first: InvokeRequest) {
        let reader = tokio::io::BufReader::with_capacity(16 * 1024, reader);
        tokio::spawn(server::serve_invokes(
            reader,
            writer,
            Some(first),
            self.router.clone(),
            self.in_flight.clone(),
            self.stop.clone(),
        ));
    }

    /// Every core: accepts on its own `SO_REUSEPORT` TCP listener.
    async fn accept_tcp(mut self, listener: tokio::net::TcpListener) {
        while !*self.stop.borrow_and_update() {
            tokio::select! {
                changed = self.stop.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        if let Err(e) = stream.set_nodelay(true) {
                            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                        }
                        let (reader, writer) = stream.into_split();
                        self.serve(reader, writer);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "invoke-proxy TCP accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            }
        }
    }
}

/// A core's handler as its connections see it: invokes of functions this core owns go to its own
/// handler; the others are handed to their owner.
struct Router {
    index: usize,
    local: Arc<dyn InvokeHandler>,
    peers: Arc<[mpsc::UnboundedSender<Command>]>,
}

/// Sends `request` to core `owner` and waits for its result.
async fn hand_over(
    peers: &[mpsc::UnboundedSender<Command>],
    owner: usize,
    request: InvokeRequest,
) -> InvokeResult {
    let request_id = request.request_id.clone();
    let (reply, result) = oneshot::channel();
    let Some(core) = peers.get(owner) else {
        return core_gone(request_id);
    };
    let arrived = crate::metrics::arrival().unwrap_or_else(std::time::Instant::now);
    if core
        .send(Command::Invoke(Box::new(request), arrived, reply))
        .is_err()
    {
        return core_gone(request_id);
    }
    result.await.unwrap_or_else(|_| core_gone(request_id))
}

/// Runs invokes on the cores from any thread of the same process, without a socket: each goes
/// straight to the core that owns its function ([`shard_of`]) as a `Command::Invoke`. This is
/// how `hearth serve`'s frontend reaches the agent it embeds; a frontend in another process uses
/// the invoke-proxy socket. Draining stays the cores' job ([`Cores::shutdown`]).
#[derive(Clone)]
pub struct Dispatcher {
    peers: Arc<[mpsc::UnboundedSender<Command>]>,
}

impl InvokeHandler for Dispatcher {
    fn invoke(&self, request: InvokeRequest) -> BoxFuture<'_, InvokeResult> {
        let f = &request.function;
        let owner = shard_of(&f.function_arn, self.peers.len());
        // Called on the owning core (the Lambda API's connections are served on the cores): run
        // it here, as that core's own connections do, without a hand-over to itself.
        if let Some(local) = on_core(owner) {
            let arrived = std::time::Instant::now();
            return Box::pin(async move {
                crate::metrics::with_arrival(arrived, local.invoke(request)).await
            });
        }
        Box::pin(hand_over(&self.peers, owner, request))
    }

    fn drain(&self, _grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

fn core_gone(request_id: String) -> InvokeResult {
    InvokeResult::bare(
        request_id,
        Outcome::Error {
            error_type: "ServiceException".into(),
            status: 500,
            message: "The Hearth agent core that runs this function has stopped.".into(),
        },
    )
}

impl InvokeHandler for Router {
    fn invoke(&self, request: InvokeRequest) -> BoxFuture<'_, InvokeResult> {
        let f = &request.function;
        let owner = shard_of(&f.function_arn, self.peers.len());
        if owner == self.index {
            return self.local.invoke(request);
        }
        Box::pin(hand_over(&self.peers, owner, request))
    }

    /// Draining is the cores' job ([`Cores::shutdown`]), not a connection's.
    fn drain(&self, _grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::client::{ClientError, ProxyClient};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers each invoke with the name of the thread that ran it, after sleeping the
    /// milliseconds the payload names; counts drains.
    struct Where {
        drained: Arc<AtomicUsize>,
    }

    impl InvokeHandler for Where {
        fn invoke(&self, request: InvokeRequest) -> BoxFuture<'_, InvokeResult> {
            Box::pin(async move {
                let ms: u64 = String::from_utf8_lossy(&request.payload)
                    .parse()
                    .unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let thread = std::thread::current().name().unwrap_or("").to_string();
                InvokeResult::bare(
                    request.request_id,
                    Outcome::Success {
                        payload: thread.into_bytes(),
                    },
                )
            })
        }

        fn drain(&self, _grace: Duration) -> BoxFuture<'_, ()> {
            self.drained.fetch_add(1, Ordering::SeqCst);
            Box::pin(async {})
        }
    }

    fn request(id: &str, function: &str, ms: u64) -> InvokeRequest {
        crate::proxy::protocol::test_request(id, function, ms.to_string().as_bytes())
    }

    fn ran_on(r: &InvokeResult) -> String {
        match &r.outcome {
            Outcome::Success { payload } => String::from_utf8_lossy(payload).into_owned(),
            other => panic!("{other:?}"),
        }
    }

    async fn start(
        threads: usize,
        tcp: bool,
    ) -> (tempfile::TempDir, PathBuf, Cores, Arc<AtomicUsize>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let drained = Arc::new(AtomicUsize::new(0));
        let made = Arc::new(Mutex::new(Vec::new()));
        let factory: HandlerFactory = {
            let drained = drained.clone();
            let made = made.clone();
            Arc::new(move |core| {
                made.lock().unwrap().push(core);
                Arc::new(Where {
                    drained: drained.clone(),
                }) as Arc<dyn InvokeHandler>
            })
        };
        let cores = Cores::start(
            &CoresConfig { threads, pin: true },
            Listeners {
                unix: Some(path.clone()),
                tcp: tcp.then(|| "127.0.0.1:0".parse().unwrap()),
            },
            factory,
        )
        .await
        .unwrap();
        let mut made = made.lock().unwrap().clone();
        made.sort();
        assert_eq!(made, (0..threads).collect::<Vec<_>>(), "a handler per core");
        (dir, path, cores, drained)
    }

    /// The CPUs a freshly started `grep` may use, as /proc says.
    fn child_cpus() -> String {
        let out = std::process::Command::new("grep")
            .args(["Cpus_allowed_list", "/proc/self/status"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn children_of_a_pinned_core_may_use_every_cpu() {
        let all = allowed_cpus().unwrap();
        let everywhere = child_cpus();
        let first = all[0];
        let last = *all.last().unwrap();
        let (pinned, widened, placed, after, home) = std::thread::spawn(move || {
            pin(first).unwrap();
            let pinned = child_cpus();
            let widened = unpinned(child_cpus);
            let placed = spawn_on(Some(last), child_cpus);
            (pinned, widened, placed, allowed_cpus().unwrap(), home_cpu())
        })
        .join()
        .unwrap();
        assert_eq!(widened, everywhere, "started unpinned");
        assert_eq!(pinned.trim_end(), format!("Cpus_allowed_list:\t{first}"));
        assert_eq!(placed.trim_end(), format!("Cpus_allowed_list:\t{last}"));
        assert_eq!(after, vec![first], "the core is pinned again");
        assert_eq!(home, Some(first));
        assert_eq!(
            home_cpu(),
            None,
            "a thread that never pinned has no home CPU"
        );
        assert_eq!(shared_cpus(), Some(all.clone()));
        if all.len() > 1 {
            assert_ne!(pinned, everywhere);
        }
    }

    #[test]
    fn shards_are_stable_spread_and_ignore_qualifiers() {
        let arn = "arn:aws:lambda:us-east-1:000000000000:function:f";
        assert_eq!(shard_of(arn, 1), 0);
        assert_eq!(shard_of(arn, 4), shard_of(&format!("{arn}:prod"), 4));
        assert_eq!(shard_of(arn, 4), shard_of(&format!("{arn}:7"), 4));
        assert_eq!(shard_of(arn, 4), shard_of(arn, 4));
        let mut seen = [0usize; 4];
        for i in 0..400 {
            seen[shard_of(&format!("{arn}{i}"), 4)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 60), "{seen:?}");
    }

    #[test]
    fn the_default_is_one_core_per_allowed_cpu() {
        let cpus = allowed_cpus().unwrap();
        assert!(!cpus.is_empty());
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let factory: HandlerFactory = Arc::new(|_| {
                Arc::new(Where {
                    drained: Arc::default(),
                }) as Arc<dyn InvokeHandler>
            });
            let cores = Cores::start(&CoresConfig::default(), Listeners::default(), factory)
                .await
                .unwrap();
            assert_eq!(cores.len(), cpus.len());
            cores.shutdown(Duration::from_secs(1)).await;
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invokes_run_on_the_core_that_owns_the_function_whatever_the_connection() {
        let threads = 3;
        let (_dir, path, cores, _) = start(threads, false).await;
        // Connections (steered by their first invoke), each sending invokes of functions of every
        // core.
        let clients: Vec<_> = (0..threads)
            .map(|_| ProxyClient::connect(&path).unwrap())
            .collect();
        for (c, client) in clients.iter().enumerate() {
            for f in 0..12 {
                let function = format!("f{f}");
                let arn = format!("arn:aws:lambda:us-east-1:000000000000:function:{function}");
                let owner = shard_of(&arn, threads);
                let r = client
                    .invoke(request(&format!("c{c}-{f}"), &function, 0))
                    .await
                    .unwrap();
                assert_eq!(ran_on(&r), format!("hearth-core-{owner}"));
            }
        }
        cores.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unix_connections_are_served_on_their_first_functions_core() {
        let threads = 3;
        let (_dir, path, cores, _) = start(threads, false).await;
        for f in 0..6 {
            let function = format!("f{f}");
            let arn = format!("arn:aws:lambda:us-east-1:000000000000:function:{function}");
            let owner = shard_of(&arn, threads);
            let client = ProxyClient::connect(&path).unwrap();
            let slow = {
                let client = client.clone();
                let function = function.clone();
                tokio::spawn(async move { client.invoke(request("slow", &function, 400)).await })
            };
            tokio::time::sleep(Duration::from_millis(150)).await;
            // The connection's invokes are counted where it is served: on the owner only.
            let counts: Vec<usize> = cores.cores.iter().map(|c| c.in_flight.count()).collect();
            let mut expected = vec![0; threads];
            expected[owner] = 1;
            assert_eq!(counts, expected, "{function} belongs to core {owner}");
            assert_eq!(
                ran_on(&slow.await.unwrap().unwrap()),
                format!("hearth-core-{owner}")
            );
            // Its later invokes of another core's function are still handed over.
            let other = format!("f{}", f + 1);
            let other_arn = format!("arn:aws:lambda:us-east-1:000000000000:function:{other}");
            let r = client.invoke(request("next", &other, 0)).await.unwrap();
            assert_eq!(
                ran_on(&r),
                format!("hearth-core-{}", shard_of(&other_arn, threads))
            );
        }
        cores.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_listeners_share_one_port_and_hand_over_too() {
        let (_dir, _path, cores, _) = start(2, true).await;
        let address = cores.tcp_address().unwrap();
        assert_ne!(address.port(), 0);
        let calls: Vec<_> = (0..8)
            .map(|i| {
                tokio::spawn(async move {
                    let client = ProxyClient::connect_tcp(address).await.unwrap();
                    let r = client
                        .invoke(request(&format!("t{i}"), &format!("f{i}"), 50))
                        .await
                        .unwrap();
                    let arn = format!("arn:aws:lambda:us-east-1:000000000000:function:f{i}");
                    assert_eq!(ran_on(&r), format!("hearth-core-{}", shard_of(&arn, 2)));
                })
            })
            .collect();
        for c in calls {
            c.await.unwrap();
        }
        cores.shutdown(Duration::from_secs(5)).await;
        assert!(ProxyClient::connect_tcp(address).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_services_steer_each_connection_to_its_first_functions_core() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (_dir, _path, cores, _) = start(2, false).await;
        // The service answers with the name of the core thread that serves the connection, and
        // a `Dispatcher` invoke's core, both after reading the line the client sent.
        let dispatcher = cores.dispatcher();
        let service: ConnectionService = Arc::new(move |mut stream, _peer| {
            let dispatcher = dispatcher.clone();
            Box::pin(async move {
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while stream.read(&mut byte).await.unwrap_or(0) == 1 && byte[0] != b'\n' {
                    line.push(byte[0]);
                }
                let served_on = std::thread::current().name().unwrap_or("").to_string();
                let function = String::from_utf8_lossy(&line).to_string();
                let r = dispatcher.invoke(request("d", &function, 0)).await;
                let answer = format!("{served_on} {}", ran_on(&r));
                let _ = stream.write_all(answer.as_bytes()).await;
            })
        });
        let steer: Steer = Arc::new(|first: &[u8]| {
            let line = first.split(|&b| b == b'\n').next()?;
            (line.len() < first.len()).then(|| {
                format!(
                    "arn:aws:lambda:us-east-1:000000000000:function:{}",
                    String::from_utf8_lossy(line)
                )
            })
        });
        let tcp = cores
            .serve_tcp("127.0.0.1:0".parse().unwrap(), service, Some(steer))
            .unwrap();
        for i in 0..16 {
            let function = format!("f{i}");
            let owner = format!(
                "hearth-core-{}",
                shard_of(
                    &format!("arn:aws:lambda:us-east-1:000000000000:function:{function}"),
                    2
                )
            );
            let mut stream = tokio::net::TcpStream::connect(tcp.address()).await.unwrap();
            stream
                .write_all(format!("{function}\n").as_bytes())
                .await
                .unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            assert_eq!(answer, format!("{owner} {owner}"), "{function}");
        }
        tcp.stop();
        cores.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_finishes_in_flight_invokes_on_every_core_then_drains_each() {
        let (_dir, path, cores, drained) = start(2, false).await;
        let client = ProxyClient::connect(&path).unwrap();
        let slow: Vec<_> = (0..6)
            .map(|i| {
                let c = client.clone();
                tokio::spawn(async move {
                    c.invoke(request(&format!("s{i}"), &format!("f{i}"), 400))
                        .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        cores.shutdown(Duration::from_secs(5)).await;
        for s in slow {
            assert!(s.await.unwrap().is_ok(), "an in-flight invoke finished");
        }
        assert_eq!(drained.load(Ordering::SeqCst), 2, "every core drained");
        assert!(!path.exists());
        assert!(matches!(
            client.invoke(request("late", "f0", 0)).await,
            Err(ClientError::Closed(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_grace_period_bounds_the_shutdown() {
        let (_dir, path, cores, drained) = start(2, false).await;
        let client = ProxyClient::connect(&path).unwrap();
        let stuck = {
            let c = client.clone();
            tokio::spawn(async move { c.invoke(request("stuck", "f0", 60_000)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        cores.shutdown(Duration::from_millis(300)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(drained.load(Ordering::SeqCst), 2);
        assert!(
            stuck.await.unwrap().is_err(),
            "the connection closed under it"
        );
    }
}
