//! Talking to a pooled VM's init from the host, blocking: the ready connection (host port
//! [`READY_PORT`]), a ping on the control port, the guest console for error messages.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hearth_guest::protocol::client::{ControlClient, connect_vsock_uds, read_ready};
use hearth_guest::protocol::{CONTROL_PORT, ProtocolError, READY_PORT, Ready};
use hearth_vmm::VmmProcess;

/// How long the init gets to answer a ping or a refresh.
pub const GUEST_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Listens where the guest's connection to host port [`READY_PORT`] arrives.
pub fn bind_ready(uds: &Path) -> Result<UnixListener, std::io::Error> {
    let path = ready_socket(uds);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Where the guest's connections to host port [`READY_PORT`] arrive for the VMM socket `uds`.
pub fn ready_socket(uds: &Path) -> PathBuf {
    PathBuf::from(format!("{}_{READY_PORT}", uds.display()))
}

/// Waits for the init's `Hello` + `Ready` on `listener`, unless the VMM ends first or `timeout`
/// passes, or `cancel` is set; the reason as text otherwise.
pub fn wait_ready(
    listener: &UnixListener,
    vmm: &mut VmmProcess,
    timeout: Duration,
    cancel: &AtomicBool,
) -> Result<(UnixStream, Ready), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if cancel.load(Ordering::SeqCst) {
            return Err("cancelled (the pools are shutting down)".into());
        }
        match listener.accept() {
            Ok((mut stream, _)) => {
                let setup = stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.set_read_timeout(Some(GUEST_REPLY_TIMEOUT)));
                setup.map_err(|e| format!("configure the ready connection: {e}"))?;
                let (_, ready) = read_ready(&mut stream)
                    .map_err(|e| format!("bad Ready from the guest: {e}"))?;
                stream
                    .set_read_timeout(None)
                    .map_err(|e| format!("configure the ready connection: {e}"))?;
                return Ok((stream, ready));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("accept the ready connection: {e}")),
        }
        match vmm.wait(Duration::ZERO) {
            Ok(Some(status)) => {
                return Err(format!(
                    "the VMM exited ({status}) before the guest was ready"
                ));
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        if Instant::now() >= deadline {
            return Err(format!("the guest did not report ready within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A control connection to the init (bounded by [`GUEST_REPLY_TIMEOUT`]) that answered a ping.
pub fn ping(uds: &Path) -> Result<ControlClient<UnixStream>, ProtocolError> {
    let stream = connect_vsock_uds(uds, CONTROL_PORT)?;
    stream
        .set_read_timeout(Some(GUEST_REPLY_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(GUEST_REPLY_TIMEOUT)))
        .map_err(ProtocolError::Io)?;
    let mut client = ControlClient::handshake(stream)?;
    let probe = b"hearth-pool".to_vec();
    let echoed = client.ping(probe.clone())?;
    if echoed != probe {
        return Err(ProtocolError::Unexpected {
            expected: "the ping's bytes back",
            got: format!("{} other bytes", echoed.len()),
        });
    }
    Ok(client)
}

/// The end of the guest console in `dir`, for error messages.
pub fn serial_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default();
    let start = text.len().saturating_sub(2000);
    text.get(start..).unwrap_or("").trim().to_string()
}
