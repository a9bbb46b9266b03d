//! `hearth-agent`: the host agent of a Hearth worker host.
//!
//! Owns: execution environments (sandboxes leased to functions, kept warm, drained and reaped:
//! [`environment`]), the invoke-proxy socket ([`proxy`]), concurrency counting
//! ([`concurrency`]), the code cache ([`code_cache`]), the agent assembled from them ([`host`]),
//! the sandboxes themselves ([`sandbox`]), and the agent's Prometheus metrics and REPORT
//! records ([`metrics`]), pools of restored microVMs and their templates ([`pool`]).
//! The jail every `hearth vmm` can run in (`hearth jail`: namespaces, `pivot_root`, cgroup,
//! rlimits, an unprivileged uid/gid) and its launcher ([`jail`]). The invoke path runs
//! thread-per-core ([`cores`]): a pinned `current_thread` tokio runtime per CPU, functions sharded
//! across them, each core owning its functions' environments and placing their container
//! sandboxes on CPUs ([`placement`]). Next: the durable async queue and
//! the pollers.
//!
//! Relies on: `hearth-vmm` and `hearth-snapshot` for microVMs, `hearth-guest` for the protocol
//! spoken with the init inside each sandbox; the API's code folder (`<data-dir>/code`) as the
//! source of code zips.
//!
//! Must not touch: the Lambda HTTP API and its metadata store (that is `api`), or guest memory.
//!
//! Figures: taking and releasing a concurrency permit (the whole check of one invoke) costs a
//! median of 116 ns with a reservation and 154 ns without, single-threaded, 140 and 155 ns with two
//! threads contending (`cargo bench -p hearth-agent --bench concurrency`, this 2-core machine
//! shared with other builds, 2026-11-28).
//!
//! Figures that chose the runtimes (this 2-core machine, 2026-11-28/29, shared with other builds
//! and a QEMU test host: load average 3 to 5, so the tails are noisy):
//! - The invoke-proxy protocol served by an echo server without sandboxes over a Unix socket
//!   (`cargo bench -p hearth-agent --bench proxy_runtimes`; one invoke in flight per connection,
//!   client on its own thread), two runs: tokio `current_thread` (epoll), 1 connection: p50 28.0
//!   and 22.9 us, p99 63 and 62 us, 35,800 and 39,700 invokes/s; 16 connections: p50 207 and
//!   195 us, p99 946 and 325 us, 63,400 and 80,800/s. compio 0.19 (io_uring), 1 connection: p50
//!   32.6 and 24.3 us, p99 160 and 63 us, 15,800 and 37,200/s; 16 connections: p50 219 and 279
//!   us, p99 389 and 439 us, 71,700 and 60,200/s. io_uring won once on throughput at 16
//!   connections and lost the other three comparisons: the cores stay on tokio's epoll runtime,
//!   as the HTTP measurements in `../shared/dependencies.md` also found.
//! - Handing an invoke to the core that owns its function and the result back (`--bench
//!   handover`, two `current_thread` runtimes), two runs: tokio's unbounded mpsc, round trip p50
//!   7.7 and 8.8 us, p99 17 and 27 us, 503,000 and 534,000/s with 64 in flight; a crossbeam
//!   `SegQueue` with a `Notify`: p50 8.3 and 8.1 us, p99 29 and 19 us, 511,000 and 608,000/s.
//!   Within the noise of each other: the cores use tokio's mpsc (no extra crate). A hand-over
//!   costs about two cross-thread wake-ups, some 8 us here.
//! - The code cache's file IO (`--bench code_cache_io`, criterion, ext4): reading a 64 KiB entry
//!   14.3 and 14.6 us with std against 15.5 and 14.2 us with io_uring (two runs); 4 MiB 439 and
//!   395 us against 421 and 367 us; a whole verified cache hit of 64 KiB (blocking-pool hop,
//!   read, sha256) 114 and 114 us with std against 127 and 143 us with io_uring; a synced write of
//!   64 KiB 4.6 ms against 2.9 ms, of 4 MiB 22 ms against 26 ms (fsync-bound, noisy). No
//!   consistent win, and the hit path was slower: std stays the default, io_uring is
//!   `FileIo::Uring`.

pub mod code_cache;
pub mod concurrency;
pub mod cores;
pub mod environment;
pub mod host;
pub mod jail;
pub mod metrics;
pub mod placement;
pub mod pool;
pub mod proxy;
pub mod sandbox;
/// Test support (feature `testing`): the echo test function shared by the tests and `hearth-perf`.
#[cfg(feature = "testing")]
pub mod testing;
