//! The VMM event loop: one thread that owns the vCPU handles and the VM's state machine
//! (Created, Running, Paused, Stopping), and polls the vCPU event eventfd, SIGTERM/SIGINT (a
//! signalfd), the control socket, the parent's pipe and the devices' fds.

use crate::control::server::ControlServer;
use crate::control::{Command, PROTOCOL_VERSION, Request, Response, VmState};
use crate::vstate::vcpu::{VcpuCommand, VcpuEvent, VcpuHandle, VcpuState, VmExitReason};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// How long vCPUs get to acknowledge a pause or resume.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long vCPUs get to save their state.
const SAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the VMM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest rebooted or powered off.
    Guest(VmExitReason),
    /// A Stop command.
    Requested,
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// The parent process is gone (its pipe closed).
    ParentGone,
    /// The event loop failed.
    Error(String),
}

impl StopReason {
    /// The process exit status for this reason: 0 for an orderly end.
    pub fn exit_status(&self) -> u8 {
        match self {
            StopReason::Guest(VmExitReason::Reset | VmExitReason::PowerOff)
            | StopReason::Requested
            | StopReason::Signal(_)
            | StopReason::ParentGone => 0,
            StopReason::Guest(VmExitReason::Crash) => 2,
            StopReason::Guest(VmExitReason::Error(_)) | StopReason::Error(_) => 1,
        }
    }
}

/// The event loop could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Signal set-up failed.
    #[error("cannot set up signal handling")]
    Signals(#[source] nix::Error),
    /// The event manager could not be created.
    #[error("cannot create the event loop")]
    EventManager(#[source] event_manager::Error),
    /// A vCPU could not be commanded.
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
}

/// Blocks SIGTERM and SIGINT in the calling thread (and threads it spawns later), so that only
/// the event loop's signalfd sees them. Call before spawning any thread.
pub fn block_termination_signals() -> Result<SigSet, RuntimeError> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().map_err(RuntimeError::Signals)?;
    Ok(set)
}

const TOKEN_WAKE: u32 = 0;
const TOKEN_SIGNAL: u32 = 1;
const TOKEN_PARENT: u32 = 2;
const TOKEN_LISTENER: u32 = 3;
const TOKEN_CONN: u32 = 4;

/// The VM state machine and its event sources.
pub struct Controller {
    vcpus: Vec<VcpuHandle>,
    events: Receiver<VcpuEvent>,
    wake: Arc<EventFd>,
    signals: SignalFd,
    parent: Option<RawFd>,
    control: Option<ControlServer>,
    state: VmState,
    stop: Option<StopReason>,
    snapshot: Option<crate::persist::SnapshotParts>,
    /// Guest RAM's file, for a template VM (its snapshot takes the file).
    ram_file: Option<crate::arch::memory::RamFile>,
}

impl Controller {
    /// A controller over spawned (paused) vCPU threads.
    pub fn new(
        vcpus: Vec<VcpuHandle>,
        events: Receiver<VcpuEvent>,
        wake: Arc<EventFd>,
        signals: &SigSet,
        parent: Option<RawFd>,
        control: Option<ControlServer>,
    ) -> Result<Self, RuntimeError> {
        let signals = SignalFd::with_flags(signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(RuntimeError::Signals)?;
        Ok(Controller {
            vcpus,
            events,
            wake,
            signals,
            parent,
            control,
            state: VmState::Created,
            stop: None,
            snapshot: None,
            ram_file: None,
        })
    }

    /// Lets the controller take snapshots of the VM made of `parts`.
    pub fn with_snapshot(mut self, parts: crate::persist::SnapshotParts) -> Self {
        self.snapshot = Some(parts);
        self
    }

    /// Guest RAM is `ram`'s file: a snapshot takes that file as its memory file, and the guest
    /// may not run after it.
    pub fn with_ram_file(mut self, ram: Option<crate::arch::memory::RamFile>) -> Self {
        self.ram_file = ram;
        self
    }

    /// Asks every (paused) vCPU for its state and waits for all of them.
    fn save_vcpus(&mut self) -> Result<Vec<crate::vstate::vcpu_state::VcpuKvmState>, String> {
        self.broadcast(VcpuCommand::Save)?;
        let mut saved: Vec<Option<_>> = (0..self.vcpus.len()).map(|_| None).collect();
        let deadline = Instant::now() + SAVE_TIMEOUT;
        while saved.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(VcpuEvent::Saved(id, result)) => {
                    let state = (*result).map_err(|e| format!("vCPU {id}: {e}"))?;
                    if let Some(slot) = saved.get_mut(usize::from(id)) {
                        *slot = Some(state);
                    }
                }
                Ok(VcpuEvent::State(..)) => {}
                Ok(VcpuEvent::VmExit(_, reason)) => {
                    self.request_stop(StopReason::Guest(reason));
                    return Err("the guest ended while saving its vCPUs".into());
                }
                Err(_) => {
                    return Err(format!(
                        "vCPUs did not save their state within {SAVE_TIMEOUT:?}"
                    ));
                }
            }
        }
        Ok(saved.into_iter().flatten().collect())
    }

    /// Writes a snapshot of the paused VM.
    fn take_snapshot(
        &mut self,
        state_path: &std::path::Path,
        mem_path: &std::path::Path,
    ) -> Result<(), String> {
        if self.snapshot.is_none() {
            return Err("this VM cannot be snapshotted".into());
        }
        let t = Instant::now();
        let vcpus = self.save_vcpus()?;
        let vcpu_ms = t.elapsed().as_secs_f64() * 1000.0;
        let Some(parts) = self.snapshot.as_ref() else {
            return Err("this VM cannot be snapshotted".into());
        };
        let written = match self.ram_file.as_mut() {
            Some(ram) => parts.write_taking_ram_file(vcpus, state_path, mem_path, ram),
            None => parts.write(vcpus, state_path, mem_path),
        };
        let stats = written.map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            msg
        })?;
        tracing::info!(
            ms = t.elapsed().as_secs_f64() * 1000.0,
            vcpu_ms,
            memory_ms = stats.memory_ms,
            state_bytes = stats.state_bytes,
            memory_written = stats.memory_written,
            memory_size = stats.memory_size,
            memory_in_place = stats.memory_in_place,
            memory_punched = stats.memory_punched,
            "snapshot written"
        );
        Ok(())
    }

    /// The state.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// Why the loop should stop, once it should.
    pub fn stop_reason(&self) -> Option<&StopReason> {
        self.stop.as_ref()
    }

    fn request_stop(&mut self, reason: StopReason) {
        if self.stop.is_none() {
            tracing::info!(?reason, "VM stopping");
            self.stop = Some(reason);
            self.state = VmState::Stopping;
        }
    }

    /// Sends `cmd` to every vCPU (even when one of them is gone); reports the first failure.
    fn broadcast(&mut self, cmd: VcpuCommand) -> Result<(), String> {
        let mut first_error = None;
        for v in &self.vcpus {
            if let Err(e) = v.send(cmd) {
                first_error.get_or_insert(e.to_string());
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Sends `cmd` and waits until every vCPU reports `want`.
    fn transition(&mut self, cmd: VcpuCommand, want: VcpuState) -> Result<(), String> {
        self.broadcast(cmd)?;
        let mut acked = vec![false; self.vcpus.len()];
        let deadline = Instant::now() + ACK_TIMEOUT;
        while acked.iter().any(|a| !a) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(VcpuEvent::State(id, s)) if s == want => {
                    if let Some(a) = acked.get_mut(usize::from(id)) {
                        *a = true;
                    }
                }
                Ok(VcpuEvent::State(..) | VcpuEvent::Saved(..)) => {}
                Ok(VcpuEvent::VmExit(_, reason)) => {
                    self.request_stop(StopReason::Guest(reason));
                    return Err("the guest ended while changing state".into());
                }
                Err(_) => {
                    return Err(format!(
                        "vCPUs did not acknowledge {cmd:?} within {ACK_TIMEOUT:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Applies a control command.
    pub fn command(&mut self, cmd: Command) -> Result<VmState, String> {
        match (cmd, self.state) {
            (Command::Status, s) => Ok(s),
            (_, VmState::Stopping) => Err("the VM is stopping".into()),
            (Command::Stop, _) => {
                self.request_stop(StopReason::Requested);
                Ok(self.state)
            }
            (Command::Resume, VmState::Paused)
                if self.ram_file.as_ref().is_some_and(|r| r.given()) =>
            {
                Err("this VM's RAM became the memory file of its snapshot: its guest cannot run again (clones restored from it would change)".into())
            }
            (Command::Start, VmState::Created) | (Command::Resume, VmState::Paused) => {
                self.transition(VcpuCommand::Run, VcpuState::Running)?;
                self.state = VmState::Running;
                Ok(self.state)
            }
            (Command::Pause, VmState::Running) => {
                self.transition(VcpuCommand::Pause, VcpuState::Paused)?;
                self.state = VmState::Paused;
                Ok(self.state)
            }
            (Command::Pause, VmState::Paused)
            | (Command::Resume | Command::Start, VmState::Running) => Ok(self.state),
            (
                Command::Snapshot {
                    state_path,
                    mem_path,
                },
                VmState::Paused,
            ) => {
                self.take_snapshot(&state_path, &mem_path)?;
                Ok(self.state)
            }
            (Command::Snapshot { .. }, s) => {
                Err(format!("a snapshot needs the VM paused; it is {s:?}"))
            }
            (c, s) => Err(format!("{c:?} is not valid while the VM is {s:?}")),
        }
    }

    fn drain_vcpu_events(&mut self) {
        let _ = self.wake.read();
        while let Ok(ev) = self.events.try_recv() {
            match ev {
                VcpuEvent::VmExit(id, reason) => {
                    tracing::info!(vcpu = id, ?reason, "guest asked the VM to end");
                    self.request_stop(StopReason::Guest(reason));
                }
                VcpuEvent::State(..) | VcpuEvent::Saved(..) => {}
            }
        }
    }

    /// Tells every vCPU thread to exit and joins them.
    pub fn shut_down_vcpus(&mut self) {
        let _ = self.broadcast(VcpuCommand::Exit);
        for v in &mut self.vcpus {
            v.join();
        }
    }
}

impl MutEventSubscriber for Controller {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_WAKE => self.drain_vcpu_events(),
            TOKEN_SIGNAL => {
                if let Ok(Some(info)) = self.signals.read_signal() {
                    self.request_stop(StopReason::Signal(info.ssi_signo as i32));
                }
            }
            TOKEN_PARENT => {
                let mut buf = [0u8; 64];
                // SAFETY: reading into a local buffer from fd 0, which this process owns.
                let n = unsafe { libc::read(events.fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 || events.event_set().contains(EventSet::HANG_UP) {
                    let _ = ops.remove(events);
                    self.request_stop(StopReason::ParentGone);
                }
            }
            TOKEN_LISTENER => {
                if let Some(server) = self.control.as_mut() {
                    for fd in server.accept() {
                        if ops
                            .add(Events::with_data_raw(fd, TOKEN_CONN, EventSet::IN))
                            .is_err()
                        {
                            server.close(fd);
                        }
                    }
                }
            }
            TOKEN_CONN => {
                let fd = events.fd();
                if events
                    .event_set()
                    .intersects(EventSet::HANG_UP | EventSet::ERROR)
                    && !events.event_set().contains(EventSet::IN)
                {
                    let _ = ops.remove(events);
                    if let Some(s) = self.control.as_mut() {
                        s.close(fd);
                    }
                    return;
                }
                let Some(mut server) = self.control.take() else {
                    return;
                };
                let alive = server.serve(fd, |req: Request| Response {
                    version: PROTOCOL_VERSION,
                    result: self.command(req.command),
                });
                if !alive {
                    let _ = ops.remove(events);
                    server.close(fd);
                }
                self.control = Some(server);
            }
            _ => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut regs = vec![
            Events::with_data(self.wake.as_ref(), TOKEN_WAKE, EventSet::IN),
            Events::with_data_raw(self.signals.as_raw_fd(), TOKEN_SIGNAL, EventSet::IN),
        ];
        if let Some(fd) = self.parent {
            regs.push(Events::with_data_raw(
                fd,
                TOKEN_PARENT,
                EventSet::IN | EventSet::HANG_UP,
            ));
        }
        if let Some(s) = &self.control {
            regs.push(Events::with_data_raw(
                s.listener_fd(),
                TOKEN_LISTENER,
                EventSet::IN,
            ));
        }
        for ev in regs {
            if let Err(e) = ops.add(ev) {
                self.request_stop(StopReason::Error(format!(
                    "cannot watch an event source: {e:?}"
                )));
            }
        }
    }
}

/// The event loop: the controller plus any device subscribers.
pub struct EventLoop {
    manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    controller: Arc<Mutex<Controller>>,
}

impl EventLoop {
    /// A loop around `controller`.
    pub fn new(controller: Controller) -> Result<Self, RuntimeError> {
        let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(RuntimeError::EventManager)?;
        let controller = Arc::new(Mutex::new(controller));
        manager.add_subscriber(controller.clone());
        Ok(EventLoop {
            manager,
            controller,
        })
    }

    /// Adds a device's event subscriber.
    pub fn add_subscriber(&mut self, subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>>) {
        self.manager.add_subscriber(subscriber);
    }

    /// Runs a control command directly (for `--start`).
    pub fn command(&mut self, cmd: Command) -> Result<VmState, String> {
        self.controller
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .command(cmd)
    }

    /// Runs until the VM should stop; stops the vCPUs and returns why.
    pub fn run(mut self) -> StopReason {
        let reason = loop {
            if let Some(r) = self
                .controller
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .stop_reason()
            {
                break r.clone();
            }
            if let Err(e) = self.manager.run() {
                break StopReason::Error(format!("event loop failed: {e:?}"));
            }
        };
        self.controller
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shut_down_vcpus();
        reason
    }
}
