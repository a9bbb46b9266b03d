//! Threads started ahead of their work, their seccomp filter already installed.
//!
//! Installing a filter costs the kernel a check and a compile of the program: in the test host
//! (nested SVM under QEMU TCG) some 5 ms a thread. The VMM starts its event-loop thread and its
//! vCPU threads this way before it builds or restores the VM, so a VMM started ahead pays for
//! them before its `Restore` command rather than between that command and the guest's first
//! instruction.

use crate::seccomp::{self, SeccompError, ThreadKind};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;

/// What a [`FilteredThread`] runs.
type Job<T> = Box<dyn FnOnce() -> T + Send>;

/// A thread could not be started.
#[derive(Debug, thiserror::Error)]
pub enum FilteredThreadError {
    /// The thread could not be spawned.
    #[error("cannot spawn the {0} thread")]
    Spawn(String, #[source] std::io::Error),
    /// The thread's seccomp filter could not be installed.
    #[error("the {0} thread's seccomp filter")]
    Filter(String, #[source] SeccompError),
    /// The thread ended before it said whether its filter was installed.
    #[error("the {0} thread ended while starting")]
    Ended(String),
}

/// A started thread, its filter installed, waiting for its job.
pub struct FilteredThread<T> {
    job: SyncSender<Job<T>>,
    handle: JoinHandle<Option<T>>,
}

impl<T: Send + 'static> FilteredThread<T> {
    /// Spawns the thread `name` with a stack of `stack_size` bytes and installs the filters of
    /// `filter` on it (none with `None`); returns once they are in place, or why they are not.
    pub fn spawn(
        name: &str,
        stack_size: usize,
        filter: Option<ThreadKind>,
    ) -> Result<Self, FilteredThreadError> {
        let (job, next) = sync_channel::<Job<T>>(1);
        let (installed, filtered) = sync_channel::<Result<(), SeccompError>>(1);
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .stack_size(stack_size)
            .spawn(move || {
                let result = filter.map_or(Ok(()), seccomp::install);
                let ok = result.is_ok();
                // The spawner waits for this; it cannot have gone.
                let _ = installed.send(result);
                if !ok {
                    return None;
                }
                // None: dropped unused (the VMM ended before it had a VM to run).
                next.recv().ok().map(|job| job())
            })
            .map_err(|e| FilteredThreadError::Spawn(name.to_string(), e))?;
        match filtered.recv() {
            Ok(Ok(())) => Ok(FilteredThread { job, handle }),
            Ok(Err(e)) => Err(FilteredThreadError::Filter(name.to_string(), e)),
            Err(_) => Err(FilteredThreadError::Ended(name.to_string())),
        }
    }

    /// Runs `job` on the thread; its handle gives the job's result when joined (`None` if the
    /// thread ended without running it, which a panic in it reports as an `Err` instead).
    pub fn start(self, job: impl FnOnce() -> T + Send + 'static) -> JoinHandle<Option<T>> {
        // Only a thread that already ended refuses the job; joining it tells.
        let _ = self.job.send(Box::new(job));
        self.handle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_runs_on_the_named_thread_and_its_result_comes_back() {
        let thread = FilteredThread::<String>::spawn("worker", 64 * 1024, None).unwrap();
        let handle = thread.start(|| std::thread::current().name().unwrap_or("").to_string());
        assert_eq!(handle.join().unwrap().as_deref(), Some("worker"));
    }

    #[test]
    fn a_thread_dropped_unused_ends_without_a_result() {
        let thread = FilteredThread::<u8>::spawn("unused", 64 * 1024, None).unwrap();
        let FilteredThread { job, handle } = thread;
        drop(job);
        assert_eq!(handle.join().unwrap(), None);
    }
}
