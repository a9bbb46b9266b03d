//! `hearth-perf`: the load-generation and benchmark harness whose figures Hearth publishes, and the
//! test host (QEMU in TCG mode with an emulated AMD CPU with SVM) that gives machines without
//! hardware KVM a real KVM to run microVMs in.
//!
//! Owns: the `hearth-perf` scenarios and their JSON report format, and `hearth testhost`.
//!
//! Relies on: the other Hearth crates (`hearth-agent`'s sandboxes) and binaries;
//! `qemu-system-x86_64` for the test host.
//!
//! Must not touch: production code paths; it only drives them from outside.
//!
//! - [`testhost`]: `hearth testhost [--with PATH]... [--memory MIB] [--cpus N] [--timeout SECS] --
//!   COMMAND [ARGS]...` packs an initramfs (hearth-init as `/init`, the `hearth` binary, the kernel
//!   cache, the `--with` files, their shared libraries), boots it under QEMU TCG with SVM, runs the
//!   command there with a real KVM, streams its output and returns its exit status.
//! - [`scenario`]: `hearth-perf SCENARIO [--json FILE]`: `api` (the Lambda API frontend's own
//!   cost: invoke latency and throughput over HTTP next to the invoke-proxy socket), `boot` (microVM boot times and the VMM's
//!   memory; inside the test host where there is no hardware KVM), `sandbox-invoke` (the warm
//!   invoke round trip through a container or microVM sandbox), `run-cold` (the cold start of
//!   `hearth run`), `testhost` (the test host's own cost), and through the agent's invoke-proxy
//!   socket `warm-invoke` (latency and platform overhead at 1, 8, 64 callers), `throughput`
//!   (invokes/s at saturation, CPU per invoke) and `cold-start`. Each prints a table and writes a
//!   [`report::Report`]. The sandbox scenarios run the echo function of
//!   `hearth_agent::testing` (cargo feature `testing`), the same one the agent's tests run.

pub mod machine;
pub mod memory;
pub mod report;
pub mod scenario;
pub mod testhost;
