//! The control socket's server side: a listener and its connections, each request answered in
//! turn. Runs inside the VMM event loop; a connection that sends garbage or stalls is dropped.

use super::protocol::{self, PROTOCOL_VERSION, Request, Response};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a client may take to send the rest of a frame.
const FRAME_TIMEOUT: Duration = Duration::from_secs(2);

/// The control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding failed.
    #[error("cannot bind the control socket {0}")]
    Bind(PathBuf, #[source] io::Error),
}

/// The listener and its open connections.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    conns: HashMap<RawFd, UnixStream>,
}

impl ControlServer {
    /// Binds `path` (replacing a stale socket file), non-blocking.
    pub fn bind(path: &Path) -> Result<Self, ServerError> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).map_err(|e| ServerError::Bind(path.to_path_buf(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ServerError::Bind(path.to_path_buf(), e))?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            conns: HashMap::new(),
        })
    }

    /// The listening socket's fd.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts every pending connection; returns their fds to watch.
    pub fn accept(&mut self) -> Vec<RawFd> {
        let mut fds = Vec::new();
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(false).is_ok()
                && stream.set_read_timeout(Some(FRAME_TIMEOUT)).is_ok()
            {
                let fd = stream.as_raw_fd();
                self.conns.insert(fd, stream);
                fds.push(fd);
            }
        }
        fds
    }

    /// Reads one request from connection `fd`, answers it with `handle`; returns false when the
    /// connection is done (closed, timed out, malformed): the caller stops watching it, then
    /// calls [`ControlServer::close`] (in that order, so the fd number is not reused while watched).
    pub fn serve(&mut self, fd: RawFd, handle: impl FnOnce(Request) -> Response) -> bool {
        let Some(stream) = self.conns.get_mut(&fd) else {
            return false;
        };
        match protocol::read_frame::<Request>(stream) {
            Ok(req) if req.version != PROTOCOL_VERSION => {
                let resp = Response {
                    version: PROTOCOL_VERSION,
                    result: Err(format!(
                        "protocol version {} is not supported (this VMM speaks {PROTOCOL_VERSION})",
                        req.version
                    )),
                };
                protocol::write_frame(stream, &resp).is_ok()
            }
            Ok(req) => protocol::write_frame(stream, &handle(req)).is_ok(),
            Err(_) => false,
        }
    }

    /// Drops connection `fd`.
    pub fn close(&mut self, fd: RawFd) {
        self.conns.remove(&fd);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
