//! The host side of the conversations: connecting through the VMM's Unix-socket vsock backend,
//! reading the init's `Ready`, and a request/response client for the control port.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::{
    CONTROL_PORT, GuestStatus, Hello, Message, ProtocolError, Ready, check_hello, encode_frame,
    expect_frame, write_frame,
};

/// Connects to guest vsock `port` through the VMM's Unix socket `uds` (Firecracker's convention:
/// write `CONNECT <port>\n`, read `OK <hostport>\n`). Returns the stream, positioned after the reply.
pub fn connect_vsock_uds(uds: &Path, port: u32) -> Result<UnixStream, ProtocolError> {
    connect_vsock_uds_with(uds, port, &[], |_| Ok(()))
}

/// [`connect_vsock_uds`], with `first` (the first bytes for the guest) written together with the
/// `CONNECT` line, before the reply: the VMM reads the line alone and forwards the rest once the
/// guest has accepted, so a conversation's first messages need no round trip of their own.
/// `setup` runs on the stream before anything is written (timeouts).
pub fn connect_vsock_uds_with(
    uds: &Path,
    port: u32,
    first: &[u8],
    setup: impl FnOnce(&UnixStream) -> std::io::Result<()>,
) -> Result<UnixStream, ProtocolError> {
    let mut stream = UnixStream::connect(uds).map_err(ProtocolError::Io)?;
    setup(&stream).map_err(ProtocolError::Io)?;
    let mut out = format!("CONNECT {port}\n").into_bytes();
    out.extend_from_slice(first);
    stream.write_all(&out).map_err(ProtocolError::Io)?;
    // Read the reply a byte at a time so nothing of the guest's stream is consumed.
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        match stream.read(&mut b) {
            Ok(0) => {
                return Err(ProtocolError::ConnectRefused {
                    port,
                    reply: String::from_utf8_lossy(&line).into_owned(),
                });
            }
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() < 64 => line.push(b[0]),
            Ok(_) => {
                return Err(ProtocolError::ConnectRefused {
                    port,
                    reply: "reply line too long".into(),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtocolError::Io(e)),
        }
    }
    let reply = String::from_utf8_lossy(&line).into_owned();
    if !reply.starts_with("OK ") {
        return Err(ProtocolError::ConnectRefused { port, reply });
    }
    Ok(stream)
}

/// Reads the init's `Hello` and `Ready` from an accepted ready connection (host port 1024).
pub fn read_ready<S: Read + ?Sized>(stream: &mut S) -> Result<(Hello, Ready), ProtocolError> {
    let hello = check_hello(expect_frame(stream)?)?;
    match expect_frame(stream)? {
        Message::Ready(r) => Ok((hello, r)),
        other => Err(ProtocolError::Unexpected {
            expected: "Ready",
            got: other.kind().to_owned(),
        }),
    }
}

/// Most corrections of a refreshed guest's clock.
pub const CLOCK_ROUNDS: usize = 3;
/// A refreshed guest's clock is left alone within this of the host's, ns.
pub const CLOCK_TOLERANCE_NS: u64 = 2_000_000;

/// The host's CLOCK_REALTIME, ns since the epoch (0 before 1970).
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() * 1_000_000_000 + u64::from(d.subsec_nanos()))
        .unwrap_or(0)
}

/// The guest's clock `guest` (ns) minus the host's at the middle of the round trip `t0`..`t1`.
pub fn offset_at(guest: u64, t0: u64, t1: u64) -> i64 {
    let mid = t0 / 2 + t1 / 2;
    guest as i64 - mid as i64
}

/// The clock offset a `Refreshed` answer (to a `Refresh` sent at `t0`, answered at `t1`) shows.
pub fn refreshed_offset(answer: &Message, t0: u64, t1: u64) -> Result<i64, ProtocolError> {
    match answer {
        Message::Refreshed { realtime_ns } => Ok(offset_at(*realtime_ns, t0, t1)),
        other => Err(ProtocolError::Unexpected {
            expected: "Refreshed",
            got: other.kind().to_owned(),
        }),
    }
}

/// A control connection to the init (after the `Hello` exchange).
#[derive(Debug)]
pub struct ControlClient<S> {
    stream: S,
    /// The init's `Hello`.
    pub peer: Hello,
}

impl ControlClient<UnixStream> {
    /// Connects to the init's control port through the VMM's vsock Unix socket and says hello.
    pub fn connect_uds(uds: &Path) -> Result<Self, ProtocolError> {
        Self::handshake(connect_vsock_uds(uds, CONTROL_PORT)?)
    }

    /// Connects to the init's control port through `uds` and sends the `CONNECT` line, our
    /// `Hello` and `request` in one write, then reads the reply line, the init's `Hello` and its
    /// answer to `request` (an `Error` answer becomes [`ProtocolError::Remote`]). One exchange
    /// with the guest instead of three: this is how a host reaches a guest just restored, where
    /// each one costs a round of interrupts. `setup` runs on the stream first (timeouts).
    pub fn open_uds(
        uds: &Path,
        request: &Message,
        setup: impl FnOnce(&UnixStream) -> std::io::Result<()>,
    ) -> Result<(Self, Message), ProtocolError> {
        let mut first = encode_frame(&Message::Hello(Hello::ours("hearth-host")))?;
        first.extend(encode_frame(request)?);
        let mut stream = connect_vsock_uds_with(uds, CONTROL_PORT, &first, setup)?;
        let peer = check_hello(expect_frame(&mut stream)?)?;
        let mut client = ControlClient { stream, peer };
        let answer = client.answer()?;
        Ok((client, answer))
    }
}

impl<S: Read + Write> ControlClient<S> {
    /// Sends our `Hello` on `stream` and checks the init's.
    pub fn handshake(mut stream: S) -> Result<Self, ProtocolError> {
        write_frame(&mut stream, &Message::Hello(Hello::ours("hearth-host")))?;
        let peer = check_hello(expect_frame(&mut stream)?)?;
        Ok(ControlClient { stream, peer })
    }

    /// Sends one request and returns its response; an `Error` answer becomes [`ProtocolError::Remote`].
    pub fn request(&mut self, msg: &Message) -> Result<Message, ProtocolError> {
        write_frame(&mut self.stream, msg)?;
        self.answer()
    }

    /// Reads the answer to a request already sent.
    fn answer(&mut self) -> Result<Message, ProtocolError> {
        match expect_frame(&mut self.stream)? {
            Message::Error(e) => Err(ProtocolError::Remote {
                code: e.code,
                message: e.message,
            }),
            other => Ok(other),
        }
    }

    /// Sends `Ping{bytes}` and returns the bytes of the `Pong`.
    pub fn ping(&mut self, bytes: Vec<u8>) -> Result<Vec<u8>, ProtocolError> {
        match self.request(&Message::Ping { bytes })? {
            Message::Pong { bytes } => Ok(bytes),
            other => Err(ProtocolError::Unexpected {
                expected: "Pong",
                got: other.kind().to_owned(),
            }),
        }
    }

    /// Asks for the guest's status.
    pub fn status(&mut self) -> Result<GuestStatus, ProtocolError> {
        match self.request(&Message::Status)? {
            Message::StatusReply(s) => Ok(s),
            other => Err(ProtocolError::Unexpected {
                expected: "StatusReply",
                got: other.kind().to_owned(),
            }),
        }
    }

    /// Asks the guest to reboot (which ends the VM); returns once the init acknowledged, and closes
    /// the connection (the init waits for that close, up to a second, before it reboots).
    pub fn reboot(mut self) -> Result<(), ProtocolError> {
        match self.request(&Message::Reboot)? {
            Message::Rebooting => Ok(()),
            other => Err(ProtocolError::Unexpected {
                expected: "Rebooting",
                got: other.kind().to_owned(),
            }),
        }
    }

    /// Makes a restored clone unique and current (see [`super::Refresh`]), then corrects the
    /// guest's wall clock for the time the messages took: it measures the offset over a `Clock`
    /// round trip and shifts the clock by it, up to [`CLOCK_ROUNDS`] times, until it is within
    /// [`CLOCK_TOLERANCE_NS`]. Returns the offset left (guest minus host, ns).
    ///
    /// Each answer carries the guest's clock just after it acted, so each round trip is also a
    /// measurement: no `Clock` request of its own is needed.
    pub fn refresh(&mut self, refresh: super::Refresh) -> Result<i64, ProtocolError> {
        let t0 = realtime_ns();
        let answer = self.request(&Message::Refresh(refresh))?;
        let t1 = realtime_ns();
        let offset = refreshed_offset(&answer, t0, t1)?;
        self.correct_clock(offset)
    }

    /// Shifts the guest's wall clock by `-offset` (guest minus host, ns), measuring the offset
    /// again on each answer, up to [`CLOCK_ROUNDS`] times, until it is within
    /// [`CLOCK_TOLERANCE_NS`]. Returns the offset left.
    pub fn correct_clock(&mut self, offset: i64) -> Result<i64, ProtocolError> {
        let mut offset = offset;
        for _ in 0..CLOCK_ROUNDS {
            if offset.unsigned_abs() <= CLOCK_TOLERANCE_NS {
                break;
            }
            let t0 = realtime_ns();
            let answer = self.request(&Message::ShiftClock { delta_ns: -offset })?;
            let t1 = realtime_ns();
            offset = match answer {
                Message::ClockReply { realtime_ns } => offset_at(realtime_ns, t0, t1),
                other => {
                    return Err(ProtocolError::Unexpected {
                        expected: "ClockReply",
                        got: other.kind().to_owned(),
                    });
                }
            };
        }
        Ok(offset)
    }

    /// The guest's wall clock minus the host's at the middle of a `Clock` round trip, ns.
    pub fn clock_offset(&mut self) -> Result<i64, ProtocolError> {
        let t0 = realtime_ns();
        let guest = self.clock()?;
        let t1 = realtime_ns();
        Ok(offset_at(guest, t0, t1))
    }

    /// `len` random bytes from the guest kernel.
    pub fn random(&mut self, len: u32) -> Result<Vec<u8>, ProtocolError> {
        match self.request(&Message::Random { len })? {
            Message::RandomBytes { bytes } => Ok(bytes),
            other => Err(ProtocolError::Unexpected {
                expected: "RandomBytes",
                got: other.kind().to_owned(),
            }),
        }
    }

    /// The guest's wall-clock time, ns since the epoch.
    pub fn clock(&mut self) -> Result<u64, ProtocolError> {
        match self.request(&Message::Clock)? {
            Message::ClockReply { realtime_ns } => Ok(realtime_ns),
            other => Err(ProtocolError::Unexpected {
                expected: "ClockReply",
                got: other.kind().to_owned(),
            }),
        }
    }

    /// The underlying stream.
    pub fn into_inner(self) -> S {
        self.stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::read_frame;
    use std::os::unix::net::{UnixListener, UnixStream};

    /// The `CONNECT <port>` line a client sent first, without its newline.
    fn connect_line(s: &mut UnixStream) -> Vec<u8> {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        line
    }

    #[test]
    fn connect_vsock_uds_speaks_the_connect_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            assert_eq!(connect_line(&mut s), b"CONNECT 1025");
            // The reply and the first guest bytes arrive together.
            let mut out = b"OK 1073741824\n".to_vec();
            out.extend(
                crate::protocol::encode_frame(&Message::Hello(Hello::ours("hearth-init"))).unwrap(),
            );
            s.write_all(&out).unwrap();
            let hello: Message = read_frame(&mut s).unwrap().unwrap();
            assert!(matches!(hello, Message::Hello(_)));
            let ping: Message = read_frame(&mut s).unwrap().unwrap();
            let Message::Ping { bytes } = ping else {
                panic!("{ping:?}")
            };
            write_frame(&mut s, &Message::Pong { bytes }).unwrap();
        });
        let mut client = ControlClient::connect_uds(&uds).unwrap();
        assert!(client.peer.agent.starts_with("hearth-init"));
        assert_eq!(client.ping(b"abc".to_vec()).unwrap(), b"abc");
        server.join().unwrap();
    }

    #[test]
    fn open_uds_sends_hello_and_request_with_the_connect_line() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            assert_eq!(connect_line(&mut s), b"CONNECT 1025");
            // Both frames are there before the reply goes out.
            let hello: Message = read_frame(&mut s).unwrap().unwrap();
            assert!(matches!(hello, Message::Hello(_)));
            let refresh: Message = read_frame(&mut s).unwrap().unwrap();
            assert!(matches!(refresh, Message::Refresh(_)), "{refresh:?}");
            let mut out = b"OK 1073741824\n".to_vec();
            out.extend(encode_frame(&Message::Hello(Hello::ours("hearth-init"))).unwrap());
            out.extend(encode_frame(&Message::Refreshed { realtime_ns: 5 }).unwrap());
            s.write_all(&out).unwrap();
            let clock: Message = read_frame(&mut s).unwrap().unwrap();
            assert_eq!(clock, Message::Clock);
            write_frame(&mut s, &Message::ClockReply { realtime_ns: 7 }).unwrap();
        });
        let refresh = Message::Refresh(crate::protocol::Refresh {
            identity: "clone-1".into(),
            entropy: vec![1; 32],
            realtime_ns: 1,
        });
        let (mut client, answer) = ControlClient::open_uds(&uds, &refresh, |s| {
            s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        })
        .unwrap();
        assert_eq!(answer, Message::Refreshed { realtime_ns: 5 });
        assert_eq!(client.clock().unwrap(), 7, "the connection goes on");
        server.join().unwrap();
    }

    #[test]
    fn offsets_are_taken_at_the_middle_of_the_round_trip() {
        assert_eq!(offset_at(150, 100, 200), 0);
        assert_eq!(offset_at(100, 100, 200), -50);
        let refreshed = Message::Refreshed { realtime_ns: 1_000 };
        assert_eq!(refreshed_offset(&refreshed, 1_000, 1_100).unwrap(), -50);
        assert!(refreshed_offset(&Message::Status, 0, 1).is_err());
    }

    #[test]
    fn refused_connect_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).unwrap();
        });
        let err = connect_vsock_uds(&uds, 1025).unwrap_err();
        assert!(matches!(err, ProtocolError::ConnectRefused { .. }), "{err}");
        server.join().unwrap();
    }
}
