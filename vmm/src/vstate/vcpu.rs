//! A vCPU thread: an explicit state machine (Paused, Running, Exiting) driven by typed commands
//! over a channel. A command is followed by a signal that makes a blocked `KVM_RUN` return at
//! once (the handler sets `immediate_exit` in this thread's `kvm_run`).

use super::vcpu_state::VcpuKvmState;
use crate::devices::bus::{Bus, BusAction};
use crate::filtered_thread::{FilteredThread, FilteredThreadError};
use crate::seccomp::ThreadKind;
use crate::{limited_debug, limited_warn};
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Instant;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

/// What a vCPU thread is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// Not running guest code; waits for a command.
    Paused,
    /// In the `KVM_RUN` loop.
    Running,
    /// Leaving: the thread ends.
    Exiting,
}

/// A command to a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Run (or resume) guest code.
    Run,
    /// Stop running guest code until the next `Run`.
    Pause,
    /// End the thread.
    Exit,
    /// Report the vCPU's KVM state ([`VcpuEvent::Saved`]); only while paused.
    Save,
}

/// Why the VM ends, as seen from a vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExitReason {
    /// The guest rebooted (i8042 reset, ACPI reset, triple fault).
    Reset,
    /// The guest powered off (ACPI S5 or a halt with nothing to wake it).
    PowerOff,
    /// The guest kernel crashed (KVM system event).
    Crash,
    /// KVM failed; the message says how.
    Error(String),
}

/// What a vCPU thread reports to the VMM.
#[derive(Debug)]
pub enum VcpuEvent {
    /// vCPU `id` entered a new state.
    State(u8, VcpuState),
    /// The guest asked for the VM to end (or it failed).
    VmExit(u8, VmExitReason),
    /// vCPU `id`'s saved state, or why it could not be saved.
    Saved(u8, Box<Result<VcpuKvmState, String>>),
}

/// Where vCPU threads report; `wake` is written after each event so an epoll loop notices.
#[derive(Clone)]
pub struct EventSink {
    tx: Sender<VcpuEvent>,
    wake: Arc<EventFd>,
}

impl EventSink {
    /// A sink and the receiving end.
    pub fn new(wake: Arc<EventFd>) -> (Self, Receiver<VcpuEvent>) {
        let (tx, rx) = channel();
        (EventSink { tx, wake }, rx)
    }

    fn send(&self, event: VcpuEvent) {
        // The VMM may already be gone while the process exits; nothing to tell then.
        let _ = self.tx.send(event);
        let _ = self.wake.write(1);
    }
}

/// Creating a vCPU thread failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The thread could not be started (spawned, its seccomp filter installed).
    #[error("cannot start vCPU thread {0}")]
    Thread(u8, #[source] FilteredThreadError),
    /// The thread is gone.
    #[error("vCPU thread {0} is gone")]
    Gone(u8),
    /// The thread could not be signalled.
    #[error("cannot signal vCPU thread {0}")]
    Kick(u8, #[source] vmm_sys_util::errno::Error),
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN_PTR.with(|p| p.get());
    if !run.is_null() {
        // SAFETY: the pointer was set by this thread to its own `kvm_run` mapping, which lives as
        // long as the thread's VcpuFd (cleared before that is dropped); a byte store is
        // async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// The signal used to kick vCPUs out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler (once per process, before vCPU threads start).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal)
}

/// The VMM's handle on a vCPU thread.
pub struct VcpuHandle {
    id: u8,
    tx: Sender<VcpuCommand>,
    thread: Option<JoinHandle<Option<()>>>,
    /// Whether the thread is running the guest (in or about to enter `KVM_RUN`), so a command
    /// needs a kick; a paused thread waits on the channel and needs none.
    running: Arc<AtomicBool>,
}

impl VcpuHandle {
    /// Sends `cmd` and, if the thread is running the guest, kicks it out of `KVM_RUN`. (A kick
    /// that reached a paused thread would stay pending in `immediate_exit` and make the first
    /// `KVM_RUN` after the next start or resume return for nothing.)
    pub fn send(&self, cmd: VcpuCommand) -> Result<(), VcpuError> {
        self.tx.send(cmd).map_err(|_| VcpuError::Gone(self.id))?;
        // Pairs with the thread's fence: either it sees the command before its next KVM_RUN, or
        // this sees it running and kicks.
        fence(Ordering::SeqCst);
        if let Some(t) = &self.thread
            && self.running.load(Ordering::SeqCst)
        {
            t.kill(kick_signal())
                .map_err(|e| VcpuError::Kick(self.id, e))?;
        }
        Ok(())
    }

    /// The vCPU's index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Waits for the thread to end.
    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A vCPU thread's stack.
const VCPU_STACK: usize = 256 * 1024;

/// Everything a vCPU thread owns.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: EventSink,
    /// For the boot vCPU: when the process started, to log the time to the first `KVM_RUN`.
    started: Option<Instant>,
    /// The CPUID it was given and the MSRs to save: what a snapshot of it needs.
    cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    msr_indices: Arc<Vec<u32>>,
}

impl Vcpu {
    /// A vCPU ready to run on its thread ([`Vcpu::spawn_on`]).
    pub fn new(
        id: u8,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        events: EventSink,
        started: Option<Instant>,
    ) -> Self {
        Vcpu {
            id,
            fd,
            pio,
            mmio,
            events,
            started,
            cpuid: Vec::new(),
            msr_indices: Arc::new(Vec::new()),
        }
    }

    /// Records the CPUID the vCPU was given and the MSRs KVM lists, for [`VcpuCommand::Save`].
    pub fn with_persist(
        mut self,
        cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
        msr_indices: Arc<Vec<u32>>,
    ) -> Self {
        self.cpuid = cpuid;
        self.msr_indices = msr_indices;
        self
    }

    /// Runs the vCPU on `thread`, started ahead ([`Vcpu::thread_for`]), in the Paused state.
    pub fn spawn_on(self, thread: FilteredThread<()>) -> VcpuHandle {
        let id = self.id;
        let (tx, rx) = channel();
        let running = Arc::new(AtomicBool::new(false));
        let running_here = running.clone();
        let thread = thread.start(move || self.thread_main(rx, &running_here));
        VcpuHandle {
            id,
            tx,
            thread: Some(thread),
            running,
        }
    }

    /// A thread for vCPU `id`, started ahead of the vCPU, its seccomp filter installed unless
    /// `seccomp` is false.
    pub fn thread_for(id: u8, seccomp: bool) -> Result<FilteredThread<()>, VcpuError> {
        FilteredThread::spawn(
            &format!("vcpu{id}"),
            VCPU_STACK,
            seccomp.then_some(ThreadKind::Vcpu),
        )
        .map_err(|e| VcpuError::Thread(id, e))
    }

    fn thread_main(mut self, rx: Receiver<VcpuCommand>, running: &AtomicBool) {
        KVM_RUN_PTR.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        let mut state = VcpuState::Paused;
        self.events.send(VcpuEvent::State(self.id, state));
        while state != VcpuState::Exiting {
            state = match state {
                VcpuState::Paused => {
                    running.store(false, Ordering::SeqCst);
                    match rx.recv() {
                        Ok(cmd) => self.apply(state, cmd),
                        Err(_) => VcpuState::Exiting,
                    }
                }
                VcpuState::Running => {
                    // Set before the channel is read: a command sent after that read is kicked.
                    running.store(true, Ordering::SeqCst);
                    fence(Ordering::SeqCst);
                    let mut next = state;
                    while let Ok(cmd) = rx.try_recv() {
                        next = self.apply(next, cmd);
                    }
                    if next == VcpuState::Running {
                        self.run_once()
                    } else {
                        next
                    }
                }
                VcpuState::Exiting => VcpuState::Exiting,
            };
        }
        self.events
            .send(VcpuEvent::State(self.id, VcpuState::Exiting));
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    }

    fn apply(&mut self, from: VcpuState, cmd: VcpuCommand) -> VcpuState {
        let to = match cmd {
            VcpuCommand::Run => VcpuState::Running,
            VcpuCommand::Pause => VcpuState::Paused,
            VcpuCommand::Exit => VcpuState::Exiting,
            VcpuCommand::Save => {
                let saved = if from == VcpuState::Paused {
                    VcpuKvmState::save(self.id, &self.fd, &self.cpuid, &self.msr_indices).map_err(
                        |e| {
                            let mut msg = e.to_string();
                            let mut src = std::error::Error::source(&e);
                            while let Some(s) = src {
                                msg.push_str(&format!(": {s}"));
                                src = s.source();
                            }
                            msg
                        },
                    )
                } else {
                    Err(format!("vCPU {} is not paused", self.id))
                };
                self.events.send(VcpuEvent::Saved(self.id, Box::new(saved)));
                return from;
            }
        };
        if to != from && to != VcpuState::Exiting {
            self.events.send(VcpuEvent::State(self.id, to));
        }
        to
    }

    fn end(&self, reason: VmExitReason) -> VcpuState {
        self.events.send(VcpuEvent::VmExit(self.id, reason));
        VcpuState::Exiting
    }

    fn run_once(&mut self) -> VcpuState {
        if let Some(t) = self.started.take() {
            tracing::info!(
                vcpu = self.id,
                ms = t.elapsed().as_secs_f64() * 1000.0,
                "first KVM_RUN"
            );
        }
        let id = self.id;
        let action = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                tracing::trace!(vcpu = id, port, "exit: port read");
                if !self.pio.read(u64::from(port), data) {
                    limited_debug!(vcpu = id, port, "read from an unmapped port");
                }
                BusAction::None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                tracing::trace!(vcpu = id, port, "exit: port write");
                self.pio
                    .write(u64::from(port), data)
                    .unwrap_or(BusAction::None)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                tracing::trace!(vcpu = id, addr, "exit: MMIO read");
                if !self.mmio.read(addr, data) {
                    limited_debug!(vcpu = id, addr, "read from unmapped MMIO");
                }
                BusAction::None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                tracing::trace!(vcpu = id, addr, "exit: MMIO write");
                self.mmio.write(addr, data).unwrap_or(BusAction::None)
            }
            Ok(VcpuExit::Hlt) => BusAction::PowerOff,
            Ok(VcpuExit::Shutdown) => BusAction::Reset,
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => BusAction::PowerOff,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => BusAction::Reset,
                _ => return self.end(VmExitReason::Crash),
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return self.end(VmExitReason::Error(format!(
                    "vCPU {id}: KVM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                )));
            }
            Ok(VcpuExit::InternalError) => {
                return self.end(VmExitReason::Error(format!(
                    "vCPU {id}: KVM internal error"
                )));
            }
            Ok(other) => {
                let what = format!("{other:?}");
                limited_warn!(vcpu = id, exit = %what, "unexpected vCPU exit");
                return self.end(VmExitReason::Error(format!(
                    "vCPU {id}: unexpected exit {what}"
                )));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                BusAction::None
            }
            Err(e) => {
                return self.end(VmExitReason::Error(format!(
                    "vCPU {id}: KVM_RUN failed: {e}"
                )));
            }
        };
        match action {
            BusAction::None => VcpuState::Running,
            BusAction::Reset => self.end(VmExitReason::Reset),
            BusAction::PowerOff => self.end(VmExitReason::PowerOff),
        }
    }
}
