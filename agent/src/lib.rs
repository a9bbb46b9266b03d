//! `hearth-agent`: the host agent of a Hearth worker host.
//!
//! Owns: execution environments (sandboxes leased to functions, kept warm, drained and reaped),
//! the invoke-proxy socket, concurrency counting, the code cache, the jail for `hearth vmm`
//! processes, the durable async queue and the pollers.
//!
//! Relies on: `hearth-vmm` and `hearth-snapshot` for microVMs, `hearth-guest` for the protocol
//! spoken with the init inside each sandbox.
//!
//! Must not touch: the Lambda HTTP API and its metadata store (that is `api`), or guest memory.

pub mod sandbox;
