//! The control protocol of a `hearth vmm` process: typed, versioned requests and responses in
//! length-prefixed JSON frames over a Unix socket, and the server side that runs in the VMM's
//! event loop.

pub mod protocol;
pub mod server;

pub use protocol::{Command, PROTOCOL_VERSION, ProtocolError, Request, Response, VmState};
