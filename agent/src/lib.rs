//! `hearth-agent`: the host agent of a Hearth worker host.
//!
//! Owns: execution environments (sandboxes leased to functions, kept warm, drained and reaped:
//! [`environment`]), the invoke-proxy socket ([`proxy`]), concurrency counting
//! ([`concurrency`]), the code cache ([`code_cache`]), the agent assembled from them ([`host`]),
//! and the sandboxes themselves ([`sandbox`]). Next: the jail for `hearth vmm` processes, the
//! durable async queue and the pollers, thread-per-core executors and metrics.
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

pub mod code_cache;
pub mod concurrency;
pub mod environment;
pub mod host;
pub mod proxy;
pub mod sandbox;
/// Test support (feature `testing`): the echo test function shared by the tests and `hearth-perf`.
#[cfg(feature = "testing")]
pub mod testing;
