//! The wire protocol between the host and the init inside a sandbox.
//!
//! Transport: vsock in a microVM (the guest is CID 3 by default, the host CID 2), a Unix socket in a
//! container sandbox. Every message travels as a frame: a 4-byte little-endian length, then that many
//! bytes of postcard-encoded [`Message`]. Frames longer than [`MAX_FRAME`] are refused before
//! anything is allocated.
//!
//! Conversations:
//! - Ready: once its modules are loaded and `lo` is up, the init connects to host port
//!   [`READY_PORT`] and sends [`Message::Hello`] then [`Message::Ready`]; it keeps that connection open
//!   and sends nothing more on it.
//! - Control: the host connects to guest port [`CONTROL_PORT`] (any number of connections), sends
//!   `Hello`, gets `Hello` back (or `Error` for an unsupported version, then the connection closes),
//!   then sends requests, each answered by exactly one response, in order:
//!   `Ping` -> `Pong` (same bytes), `Status` -> `StatusReply`, `Reboot` -> `Rebooting` (then the VM
//!   reboots, which ends it), `Refresh` -> `Refreshed` (a clone restored from a snapshot gets its
//!   identity, entropy and the wall-clock time), `Random` -> `RandomBytes`, `Clock` ->
//!   `ClockReply`, `ShiftClock` -> `ClockReply`. A request the init does not know gets `Error`.
//!   The host need not wait for the init's `Hello` before its first requests (nor, through the
//!   VMM's Unix socket, for the `OK` of its `CONNECT` line): the init answers in order
//!   ([`client::ControlClient::open_uds`]). After a restore, the init answers on its control port
//!   before it reconnects its ready link: that answer, not the re-announced `Ready`, says the
//!   clone is up.
//!
//! Extending: new variants go at the END of [`Message`] (postcard encodes the variant index), and a
//! change to an existing variant's fields bumps [`PROTOCOL_VERSION`].

pub mod client;
pub mod function;

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The protocol version both sides put in their `Hello`. Peers must agree exactly.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest frame payload either side accepts (8 MiB).
pub const MAX_FRAME: usize = 8 << 20;
/// The host's vsock context id.
pub const HOST_CID: u32 = 2;
/// The guest's default vsock context id.
pub const DEFAULT_GUEST_CID: u32 = 3;
/// Host port the init connects to, to say it is ready.
pub const READY_PORT: u32 = 1024;
/// Guest port the init listens on for host requests.
pub const CONTROL_PORT: u32 = 1025;

/// Errors from framing, encoding or a conversation.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("I/O error on the host-guest link")]
    Io(#[source] io::Error),
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("the peer closed the connection in the middle of a frame")]
    Truncated,
    #[error("the peer closed the connection")]
    Closed,
    #[error("cannot decode a frame")]
    Decode(#[source] postcard::Error),
    #[error("cannot encode a frame")]
    Encode(#[source] postcard::Error),
    #[error("frame has {0} bytes after its message")]
    TrailingBytes(usize),
    #[error("peer speaks protocol version {peer}, we speak {ours}")]
    Version { peer: u32, ours: u32 },
    #[error("unexpected message: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("the guest answered with an error ({code:?}): {message}")]
    Remote { code: ErrorCode, message: String },
    #[error("vsock CONNECT to port {port} refused: {reply:?}")]
    ConnectRefused { port: u32, reply: String },
}

/// The first message on every connection, from each side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// Free-form software name and version, e.g. `hearth-init 0.1.0`.
    pub agent: String,
}

impl Hello {
    /// A `Hello` for this build.
    pub fn ours(agent: &str) -> Self {
        Hello {
            version: PROTOCOL_VERSION,
            agent: format!("{agent} {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// The init's report that the guest is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// Milliseconds since the kernel started (CLOCK_BOOTTIME) when the init started.
    pub init_start_ms: u64,
    /// Milliseconds since the kernel started when the init sent this message.
    pub ready_ms: u64,
    /// `uname -r` inside the guest.
    pub kernel_release: String,
}

/// What the init reports about the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStatus {
    /// Milliseconds since the kernel started.
    pub uptime_ms: u64,
    pub kernel_release: String,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    pub cpus_online: u32,
    /// The init's role (`vm`, `testhost`, ...).
    pub role: String,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    UnsupportedVersion,
    UnknownRequest,
    BadRequest,
    Internal,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

/// Every message between host and init. Append new variants at the end only.
// Messages are short-lived values passed by move; boxing the larger ones would only add allocations.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Hello(Hello),
    Ready(Ready),
    Ping {
        bytes: Vec<u8>,
    },
    Pong {
        bytes: Vec<u8>,
    },
    Status,
    StatusReply(GuestStatus),
    Reboot,
    Rebooting,
    Error(ErrorReply),
    /// Function messages (RUNTIME helper): bundle, invoke, results, logs.
    Function(function::Message),
    /// Host to init, on a clone restored from a snapshot, before any function code runs in it: a
    /// fresh identity, entropy to reseed the kernel's random pool with, and the host's wall-clock
    /// time to set.
    Refresh(Refresh),
    /// The init applied a `Refresh`: the guest's wall-clock time (ns since the epoch) after it.
    Refreshed {
        realtime_ns: u64,
    },
    /// Ask for `len` (at most [`MAX_RANDOM`]) bytes from the guest kernel's random generator.
    Random {
        len: u32,
    },
    /// The random bytes.
    RandomBytes {
        bytes: Vec<u8>,
    },
    /// Ask for the guest's wall-clock time.
    Clock,
    /// The guest's CLOCK_REALTIME, ns since the epoch.
    ClockReply {
        realtime_ns: u64,
    },
    /// Move the guest's wall clock by `delta_ns` (the host's correction after measuring the
    /// offset over a round trip); answered with `ClockReply`.
    ShiftClock {
        delta_ns: i64,
    },
}

/// The most random bytes one `Random` asks for.
pub const MAX_RANDOM: u32 = 4096;
/// The entropy a `Refresh` carries: at least 32 bytes, at most 512.
pub const REFRESH_ENTROPY: std::ops::RangeInclusive<usize> = 32..=512;

/// What makes a restored clone unique and current.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refresh {
    /// The clone's identity (becomes the guest's host name): 1 to 64 of `[A-Za-z0-9-]`.
    pub identity: String,
    /// Random bytes from the host, credited to the guest kernel's pool before it reseeds.
    pub entropy: Vec<u8>,
    /// The host's CLOCK_REALTIME when it sent this, ns since the epoch.
    pub realtime_ns: u64,
}

impl Refresh {
    /// Checks the fields; the reason when they are not acceptable.
    pub fn check(&self) -> Result<(), String> {
        if self.identity.is_empty()
            || self.identity.len() > 64
            || !self
                .identity
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("the identity must be 1 to 64 of [A-Za-z0-9-]".into());
        }
        if !REFRESH_ENTROPY.contains(&self.entropy.len()) {
            return Err(format!(
                "the entropy must be {} to {} bytes, not {}",
                REFRESH_ENTROPY.start(),
                REFRESH_ENTROPY.end(),
                self.entropy.len()
            ));
        }
        Ok(())
    }
}

impl Message {
    /// The variant's name, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Ready(_) => "Ready",
            Message::Ping { .. } => "Ping",
            Message::Pong { .. } => "Pong",
            Message::Status => "Status",
            Message::StatusReply(_) => "StatusReply",
            Message::Reboot => "Reboot",
            Message::Rebooting => "Rebooting",
            Message::Error(_) => "Error",
            Message::Function(_) => "Function",
            Message::Refresh(_) => "Refresh",
            Message::Refreshed { .. } => "Refreshed",
            Message::Random { .. } => "Random",
            Message::RandomBytes { .. } => "RandomBytes",
            Message::Clock => "Clock",
            Message::ClockReply { .. } => "ClockReply",
            Message::ShiftClock { .. } => "ShiftClock",
        }
    }
}

/// Encodes `msg` as one frame (length prefix included).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let mut buf = postcard::to_extend(msg, vec![0u8; 4]).map_err(ProtocolError::Encode)?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    let prefix = u32::try_from(len)
        .map_err(|_| ProtocolError::TooLarge {
            len,
            max: MAX_FRAME,
        })?
        .to_le_bytes();
    buf[..4].copy_from_slice(&prefix);
    Ok(buf)
}

/// Writes `msg` as one frame and flushes.
pub fn write_frame<W: Write + ?Sized, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), ProtocolError> {
    let frame = encode_frame(msg)?;
    w.write_all(&frame).map_err(ProtocolError::Io)?;
    w.flush().map_err(ProtocolError::Io)
}

/// Decodes a frame payload (without its length prefix); the whole payload must be one message.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ProtocolError> {
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(ProtocolError::Decode)?;
    if !rest.is_empty() {
        return Err(ProtocolError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// Decodes the first frame in `buf`: `Ok(None)` when `buf` does not hold a whole frame yet, else
/// the message and how many bytes it used. The length is checked against [`MAX_FRAME`] first.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, ProtocolError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let len = frame_len(prefix)?;
    let Some(payload) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    Ok(Some((decode_payload(payload)?, 4 + len)))
}

fn frame_len(prefix: &[u8]) -> Result<usize, ProtocolError> {
    let mut b = [0u8; 4];
    b.copy_from_slice(prefix);
    let len = u32::from_le_bytes(b) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(len)
}

/// Reads one frame. `Ok(None)` when the peer closed the connection cleanly between frames.
pub fn read_frame<R: Read + ?Sized, T: DeserializeOwned>(
    r: &mut R,
) -> Result<Option<T>, ProtocolError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtocolError::Io(e)),
        }
    }
    let len = frame_len(&prefix)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => ProtocolError::Io(e),
    })?;
    decode_payload(&payload).map(Some)
}

/// Reads one frame; a clean close is [`ProtocolError::Closed`].
pub fn expect_frame<R: Read + ?Sized, T: DeserializeOwned>(r: &mut R) -> Result<T, ProtocolError> {
    read_frame(r)?.ok_or(ProtocolError::Closed)
}

/// Checks a peer's `Hello`.
pub fn check_hello(msg: Message) -> Result<Hello, ProtocolError> {
    match msg {
        Message::Hello(h) if h.version == PROTOCOL_VERSION => Ok(h),
        Message::Hello(h) => Err(ProtocolError::Version {
            peer: h.version,
            ours: PROTOCOL_VERSION,
        }),
        Message::Error(e) => Err(ProtocolError::Remote {
            code: e.code,
            message: e.message,
        }),
        other => Err(ProtocolError::Unexpected {
            expected: "Hello",
            got: other.kind().to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello::ours("test")),
            Message::Ready(Ready {
                init_start_ms: 1200,
                ready_ms: 1300,
                kernel_release: "6.1.0".into(),
            }),
            Message::Ping {
                bytes: vec![1, 2, 3],
            },
            Message::Pong { bytes: Vec::new() },
            Message::Status,
            Message::StatusReply(GuestStatus {
                uptime_ms: 5,
                kernel_release: "r".into(),
                mem_total_kib: 1,
                mem_available_kib: 2,
                cpus_online: 2,
                role: "vm".into(),
            }),
            Message::Reboot,
            Message::Rebooting,
            Message::Error(ErrorReply {
                code: ErrorCode::UnknownRequest,
                message: "x".into(),
            }),
        ]
    }

    #[test]
    fn frames_round_trip_through_a_stream() {
        let mut wire = Vec::new();
        for m in samples() {
            write_frame(&mut wire, &m).unwrap();
        }
        let mut r = wire.as_slice();
        for m in samples() {
            assert_eq!(read_frame::<_, Message>(&mut r).unwrap(), Some(m));
        }
        assert!(read_frame::<_, Message>(&mut r).unwrap().is_none());
    }

    #[test]
    fn decode_frame_waits_for_whole_frames() {
        let frame = encode_frame(&Message::Ping {
            bytes: vec![9; 100],
        })
        .unwrap();
        for cut in 0..frame.len() {
            assert!(decode_frame::<Message>(&frame[..cut]).unwrap().is_none());
        }
        let (m, used) = decode_frame::<Message>(&frame).unwrap().unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(
            m,
            Message::Ping {
                bytes: vec![9; 100]
            }
        );
    }

    #[test]
    fn oversized_frames_are_refused_before_allocating() {
        let mut huge = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 16]);
        assert!(matches!(
            read_frame::<_, Message>(&mut huge.as_slice()),
            Err(ProtocolError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_frame::<Message>(&huge),
            Err(ProtocolError::TooLarge { .. })
        ));
        let big = Message::Ping {
            bytes: vec![0; MAX_FRAME],
        };
        assert!(matches!(
            encode_frame(&big),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[test]
    fn truncation_and_trailing_bytes_are_errors() {
        let frame = encode_frame(&Message::Status).unwrap();
        assert!(matches!(
            read_frame::<_, Message>(&mut &frame[..2]),
            Err(ProtocolError::Truncated)
        ));
        let mut f = encode_frame(&Message::Ping { bytes: vec![1] }).unwrap();
        f.push(0);
        f[0] += 1;
        assert!(matches!(
            read_frame::<_, Message>(&mut f.as_slice()),
            Err(ProtocolError::TrailingBytes(1))
        ));
    }

    #[test]
    fn hello_versions_are_checked() {
        assert!(check_hello(Message::Hello(Hello::ours("x"))).is_ok());
        let old = Message::Hello(Hello {
            version: PROTOCOL_VERSION + 1,
            agent: "future".into(),
        });
        assert!(matches!(
            check_hello(old),
            Err(ProtocolError::Version { .. })
        ));
        assert!(matches!(
            check_hello(Message::Status),
            Err(ProtocolError::Unexpected { .. })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame::<Message>(&bytes);
            let _ = read_frame::<_, Message>(&mut bytes.as_slice());
            let _ = decode_payload::<Message>(&bytes);
        }

        #[test]
        fn framed_arbitrary_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(&payload);
            let _ = read_frame::<_, Message>(&mut frame.as_slice());
        }

        #[test]
        fn pings_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let m = Message::Ping { bytes };
            let f = encode_frame(&m).unwrap();
            prop_assert_eq!(decode_frame::<Message>(&f).unwrap().unwrap(), (m, f.len()));
        }
    }
}
