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

pub mod bundle;
pub mod image;
pub mod init;
pub mod protocol;
pub mod runtime;
