//! Talking to a pooled VM's init from the host, blocking: the ready connection (host port
//! [`READY_PORT`]), the control port (a connection opened with its first request: [`open`],
//! [`ping`]), the guest console for error messages.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hearth_guest::protocol::client::{ControlClient, read_ready};
use hearth_guest::protocol::{Message, ProtocolError, READY_PORT, Ready};
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

/// How long [`ping`] keeps trying while the guest turns connections away.
pub const TURNED_AWAY_RETRY: Duration = Duration::from_secs(5);
/// The pause between two such tries.
const TURNED_AWAY_PAUSE: Duration = Duration::from_millis(20);

/// A control connection to the init (bounded by [`GUEST_REPLY_TIMEOUT`]) that answered a ping.
///
/// A restored guest can turn a host connection away right after its init said `Ready` (the
/// vsock device refuses the `CONNECT`, or accepts it and resets it before the `Hello`): such a
/// failure is retried every 20 ms for up to [`TURNED_AWAY_RETRY`]; any other failure, or the
/// last one after that, is returned.
pub fn ping(uds: &Path) -> Result<ControlClient<UnixStream>, ProtocolError> {
    let probe = b"hearth-pool".to_vec();
    let (client, answer) = open(
        uds,
        &Message::Ping {
            bytes: probe.clone(),
        },
        GUEST_REPLY_TIMEOUT,
    )?;
    match answer {
        Message::Pong { bytes } if bytes == probe => Ok(client),
        other => Err(ProtocolError::Unexpected {
            expected: "the ping's bytes back",
            got: other.kind().to_owned(),
        }),
    }
}

/// A control connection to the init (reads bounded by `timeout`), opened with `request`: the
/// `CONNECT` line, our `Hello` and `request` go out in one write
/// ([`ControlClient::open_uds`]); returns the connection and the init's answer. A guest that
/// turns the connection away is retried as [`ping`] says.
pub fn open(
    uds: &Path,
    request: &Message,
    timeout: Duration,
) -> Result<(ControlClient<UnixStream>, Message), ProtocolError> {
    let deadline = Instant::now() + TURNED_AWAY_RETRY;
    let mut tries = 1u32;
    let timeout = timeout.max(Duration::from_millis(1));
    loop {
        let opened = ControlClient::open_uds(uds, request, |s| {
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))
        });
        match opened {
            Err(e) if turned_away(&e) && Instant::now() < deadline => {
                tracing::debug!(tries, error = %e, "the guest turned the control connection away; retrying");
                std::thread::sleep(TURNED_AWAY_PAUSE);
                tries += 1;
            }
            Err(e) if tries > 1 => {
                tracing::warn!(tries, error = %e, "the guest's control port did not answer");
                return Err(e);
            }
            done => return done,
        }
    }
}

/// Whether `e` is the guest refusing or resetting a connection before it was set up (worth
/// another try), rather than a broken answer.
pub fn turned_away(e: &ProtocolError) -> bool {
    use std::io::ErrorKind;
    match e {
        ProtocolError::ConnectRefused { .. } | ProtocolError::Closed => true,
        ProtocolError::Io(io) => matches!(
            io.kind(),
            ErrorKind::ConnectionRefused
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
                | ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// The end of the guest console in `dir`, for error messages.
pub fn serial_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default();
    let start = text.len().saturating_sub(2000);
    text.get(start..).unwrap_or("").trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_guest::protocol::{CONTROL_PORT, Hello, expect_frame, write_frame};
    use std::io::{Read, Write};

    #[test]
    fn refusals_and_resets_are_retried_broken_answers_are_not() {
        let refused = ProtocolError::ConnectRefused {
            port: CONTROL_PORT,
            reply: String::new(),
        };
        assert!(turned_away(&refused));
        assert!(turned_away(&ProtocolError::Closed));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(turned_away(&ProtocolError::Io(reset)));
        let timeout = std::io::Error::from(std::io::ErrorKind::WouldBlock);
        assert!(!turned_away(&ProtocolError::Io(timeout)), "a silent guest");
        assert!(!turned_away(&ProtocolError::Truncated));
        assert!(!turned_away(&ProtocolError::Version { peer: 9, ours: 1 }));
    }

    /// A stand-in for the VMM's vsock socket: turns the first `refusals` connections away, then
    /// answers as the init does (`OK`, `Hello`, the ping echoed).
    fn backend(listener: UnixListener, refusals: usize) -> std::thread::JoinHandle<usize> {
        listener.set_nonblocking(false).unwrap();
        std::thread::spawn(move || {
            let mut seen = 0;
            for conn in listener.incoming() {
                let mut conn = conn.unwrap();
                seen += 1;
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while conn.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                assert_eq!(line, format!("CONNECT {CONTROL_PORT}").as_bytes());
                if seen <= refusals {
                    // The VMM's refusal: the connection closed without an `OK`.
                    continue;
                }
                conn.write_all(b"OK 1073741824\n").unwrap();
                let hello: Message = expect_frame(&mut conn).unwrap();
                assert!(matches!(hello, Message::Hello(_)));
                write_frame(&mut conn, &Message::Hello(Hello::ours("test-init"))).unwrap();
                let Message::Ping { bytes } = expect_frame(&mut conn).unwrap() else {
                    panic!("not a ping");
                };
                write_frame(&mut conn, &Message::Pong { bytes }).unwrap();
                return seen;
            }
            seen
        })
    }

    #[test]
    fn a_guest_that_turns_the_first_connections_away_is_pinged_again() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let server = backend(UnixListener::bind(&uds).unwrap(), 3);
        ping(&uds).expect("the fourth connection answers");
        assert_eq!(server.join().unwrap(), 4);
    }

    #[test]
    fn a_guest_that_keeps_turning_connections_away_fails_within_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let _server = backend(UnixListener::bind(&uds).unwrap(), usize::MAX);
        let t = Instant::now();
        let err = ping(&uds).map(drop).expect_err("never answers");
        // A refusal: no `OK`, or (the `Hello` and ping sent with the `CONNECT` line left unread)
        // a reset.
        assert!(turned_away(&err), "{err}");
        let took = t.elapsed();
        assert!(
            took >= TURNED_AWAY_RETRY && took < TURNED_AWAY_RETRY + Duration::from_secs(5),
            "{took:?}"
        );
    }
}
