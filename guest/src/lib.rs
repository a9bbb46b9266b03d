//! `hearth-guest`: the init that runs as PID 1 inside a Hearth sandbox (a microVM or a container),
//! the protocol it speaks with the host, and the guest image (kernel and initramfs) it ships in.
//!
//! Owns: the init (`hearth-init`, a static binary), the host-init wire protocol, the initramfs
//! writer, and fetching and caching the guest kernel.
//!
//! Relies on: Linux system calls inside the guest; on the host, `apt-get` and `dpkg-deb` for the
//! kernel package.
//!
//! Must not touch: anything on the host beyond its cache folder; inside the guest, the function's
//! code runs with less privilege than the init and never reaches it.
//!
//! Modules:
//! - [`image`]: the cache folder, the Debian cloud kernel (`hearth image`), module dependency order
//!   from `.modinfo`, the reproducible newc initramfs writer, the microVM initramfs.
//! - [`protocol`]: length-prefixed postcard frames between host and init, the messages, and the
//!   host-side client (vsock through the VMM's Unix socket).
//! - [`init`]: `hearth-init` as PID 1: the `vm` role (modules, `lo`, vsock ready + control port) and
//!   the `testhost` role (run one command in the QEMU test host).
//! - [`runtime`], [`bundle`]: the function side (Lambda Runtime API, code unpacking).
//! - [`prebuffered`]: a stream with bytes already read put back in front, for handing a
//!   connection served by hand to hyper (here and in the frontend's Invoke path).

pub mod bundle;
pub mod image;
pub mod init;
pub mod prebuffered;
pub mod protocol;
pub mod runtime;
