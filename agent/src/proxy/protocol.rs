//! The invoke-proxy wire protocol, version [`PROTOCOL_VERSION`].
//!
//! Transport: a Unix stream socket. Every message travels as a frame: a 4-byte little-endian
//! length, then that many bytes of one postcard-encoded [`Frame`]. A frame longer than
//! [`MAX_FRAME`] is refused before anything is allocated for it.
//!
//! Conversation: the client sends [`Frame::Hello`] first and the server answers with its own
//! `Hello` (or [`Frame::Refused`], then closes, when the versions differ). After that the client
//! sends any number of [`Frame::Invoke`] without waiting; the server answers each with exactly one
//! [`Frame::Result`] carrying the same `request_id`, in whatever order the invokes finish. Two
//! invokes in flight on one connection must not share a request id.
//!
//! Extending: postcard encodes a struct as its fields in order and an enum as its variant index,
//! so nothing here tolerates an added or reordered field. New [`Frame`] variants go at the end;
//! any change to an existing message bumps [`PROTOCOL_VERSION`], and peers must agree exactly.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The version both sides put in their `Hello`.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest frame either side accepts: a 6 MB payload, a 4 KB log tail and the rest, with room.
pub const MAX_FRAME: usize = 8 << 20;
/// Log bytes a result carries at most (Lambda's `LogType: Tail` is the last 4 KB).
pub const LOG_TAIL: usize = 4096;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("cannot decode a frame")]
    Decode(#[source] postcard::Error),
    #[error("cannot encode a frame")]
    Encode(#[source] postcard::Error),
    #[error("frame has {0} bytes after its message")]
    TrailingBytes(usize),
    #[error("I/O error on the invoke-proxy socket")]
    Io(#[source] std::io::Error),
    #[error("the peer closed the connection in the middle of a frame")]
    Truncated,
    #[error("peer speaks invoke-proxy protocol version {peer}, we speak {ours}")]
    Version { peer: u32, ours: u32 },
    #[error("unexpected frame: expected {expected}, got {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
}

/// One message on the socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// The first frame from each side.
    Hello(Hello),
    /// The server does not speak the client's version (then it closes the connection).
    Refused(String),
    /// Client to server: run one invoke.
    Invoke(Box<InvokeRequest>),
    /// Server to client: how one invoke went.
    Result(Box<InvokeResult>),
}

impl Frame {
    /// The variant's name, for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Refused(_) => "Refused",
            Frame::Invoke(_) => "Invoke",
            Frame::Result(_) => "Result",
        }
    }
}

/// The first frame from each side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// Free-form software name and version.
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

    /// Checks the peer's version against ours.
    pub fn check(&self) -> Result<(), ProtocolError> {
        if self.version == PROTOCOL_VERSION {
            Ok(())
        } else {
            Err(ProtocolError::Version {
                peer: self.version,
                ours: PROTOCOL_VERSION,
            })
        }
    }
}

/// What the agent needs to know about the function version that runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionSpec {
    /// The ARN the function sees as its invoked ARN.
    pub function_arn: String,
    pub function_name: String,
    /// `$LATEST` or a published version number.
    pub version: String,
    /// The code zip's hex sha256 (its name in the code store and the code cache).
    pub code_sha256_hex: String,
    pub runtime: String,
    pub handler: String,
    pub memory_mib: u32,
    pub timeout_s: u32,
    pub environment: Vec<(String, String)>,
    /// The function's reserved concurrency; `Some(0)` turns it off.
    pub reserved_concurrency: Option<u32>,
    /// Changes with every code or configuration update: environments of another revision are
    /// never reused.
    pub revision_id: String,
}

/// `X-Amz-Invocation-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InvocationType {
    RequestResponse,
    Event,
    DryRun,
}

/// One invoke.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvokeRequest {
    /// Unique among the invokes in flight on one connection.
    pub request_id: String,
    pub function: FunctionSpec,
    pub payload: Vec<u8>,
    pub invocation_type: InvocationType,
    /// `X-Amz-Client-Context` (base64 JSON), passed to the function as is.
    pub client_context: Option<String>,
    /// `X-Amzn-Trace-Id`.
    pub trace_id: Option<String>,
    /// Milliseconds since the Unix epoch after which the caller no longer waits (0: none).
    pub deadline_ms: u64,
    /// Whether the caller wants the log tail (`LogType: Tail`).
    pub log_tail: bool,
}

/// How a function error is reported (`X-Amz-Function-Error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FunctionErrorKind {
    Unhandled,
}

impl FunctionErrorKind {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            FunctionErrorKind::Unhandled => "Unhandled",
        }
    }
}

/// Lambda's `Reason` of a 429 `TooManyRequestsException`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ThrottleReason {
    /// The account's unreserved pool is in use.
    ConcurrentInvocationLimitExceeded,
    /// The function's reserved concurrency is in use (or is 0).
    ReservedFunctionConcurrentInvocationLimitExceeded,
    /// The function started environments faster than its scaling rate allows.
    FunctionInvocationRateLimitExceeded,
    /// As above, for a function with reserved concurrency.
    ReservedFunctionInvocationRateLimitExceeded,
}

impl ThrottleReason {
    /// The name Lambda gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConcurrentInvocationLimitExceeded => "ConcurrentInvocationLimitExceeded",
            Self::ReservedFunctionConcurrentInvocationLimitExceeded => {
                "ReservedFunctionConcurrentInvocationLimitExceeded"
            }
            Self::FunctionInvocationRateLimitExceeded => "FunctionInvocationRateLimitExceeded",
            Self::ReservedFunctionInvocationRateLimitExceeded => {
                "ReservedFunctionInvocationRateLimitExceeded"
            }
        }
    }
}

/// How an invoke ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The function's response.
    Success { payload: Vec<u8> },
    /// The function (or its init, or its timeout) failed: `payload` is the error JSON.
    FunctionError {
        kind: FunctionErrorKind,
        payload: Vec<u8>,
    },
    /// No environment could be had within the limits.
    Throttled {
        reason: ThrottleReason,
        message: String,
    },
    /// The platform failed: `error_type` and `status` are the Lambda error to answer with.
    Error {
        error_type: String,
        status: u16,
        message: String,
    },
}

/// Where an invoke's time went, in microseconds (0 for a stage it did not pass through).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// Counting and finding or claiming an environment.
    pub claim_us: u64,
    /// Reading the code from the cache (cold starts only).
    pub code_us: u64,
    /// Starting the sandbox and the runtime's init (cold starts only).
    pub init_us: u64,
    /// The invoke in the sandbox.
    pub invoke_us: u64,
    /// Everything in the agent, from the request frame to the result frame.
    pub total_us: u64,
}

/// How one invoke went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvokeResult {
    pub request_id: String,
    pub outcome: Outcome,
    /// The last [`LOG_TAIL`] bytes of the invoke's logs, with the `REPORT` line (empty unless
    /// asked for).
    pub log_tail: Vec<u8>,
    /// The version that ran.
    pub executed_version: String,
    pub timings: Timings,
}

impl InvokeResult {
    /// A result with nothing but an outcome.
    pub fn bare(request_id: String, outcome: Outcome) -> Self {
        InvokeResult {
            request_id,
            outcome,
            log_tail: Vec::new(),
            executed_version: String::new(),
            timings: Timings::default(),
        }
    }
}

/// `Duration` to whole microseconds, saturating.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Encodes `frame` with its length prefix.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, ProtocolError> {
    let mut out = postcard::to_extend(frame, vec![0u8; 4]).map_err(ProtocolError::Encode)?;
    let len = out.len() - 4;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// The length a frame's 4-byte prefix announces, checked against [`MAX_FRAME`].
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        Err(ProtocolError::TooLarge {
            len,
            max: MAX_FRAME,
        })
    } else {
        Ok(len)
    }
}

/// Decodes one frame's payload (the bytes after the prefix); all of it must be one [`Frame`].
pub fn decode_payload(payload: &[u8]) -> Result<Frame, ProtocolError> {
    let (frame, rest) =
        postcard::take_from_bytes::<Frame>(payload).map_err(ProtocolError::Decode)?;
    if rest.is_empty() {
        Ok(frame)
    } else {
        Err(ProtocolError::TrailingBytes(rest.len()))
    }
}

/// Decodes the first frame in `buf`: `Ok(None)` when `buf` does not hold a whole frame yet,
/// else the frame and the bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtocolError> {
    let Some(prefix) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = frame_len(*prefix)?;
    let Some(payload) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    decode_payload(payload).map(|f| Some((f, 4 + len)))
}

/// Reads one frame; `Ok(None)` when the peer closed the connection between frames.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<Frame>, ProtocolError> {
    use tokio::io::AsyncReadExt as _;
    let mut prefix = [0u8; 4];
    match reader.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(ProtocolError::Io(e)),
    }
    let len = frame_len(prefix)?;
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ProtocolError::Truncated
        } else {
            ProtocolError::Io(e)
        }
    })?;
    decode_payload(&payload).map(Some)
}

/// A plain synchronous invoke of `function`'s `$LATEST` for unit tests: 128 MB, 3 s, no code.
#[cfg(test)]
pub(crate) fn test_request(id: &str, function: &str, payload: &[u8]) -> InvokeRequest {
    InvokeRequest {
        request_id: id.into(),
        function: FunctionSpec {
            function_arn: format!("arn:aws:lambda:us-east-1:000000000000:function:{function}"),
            function_name: function.into(),
            version: "$LATEST".into(),
            code_sha256_hex: String::new(),
            runtime: String::new(),
            handler: String::new(),
            memory_mib: 128,
            timeout_s: 3,
            environment: vec![],
            reserved_concurrency: None,
            revision_id: String::new(),
        },
        payload: payload.to_vec(),
        invocation_type: InvocationType::RequestResponse,
        client_context: None,
        trace_id: None,
        deadline_ms: 0,
        log_tail: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn request(id: &str) -> InvokeRequest {
        InvokeRequest {
            request_id: id.into(),
            function: FunctionSpec {
                function_arn: "arn:aws:lambda:us-east-1:000000000000:function:echo".into(),
                function_name: "echo".into(),
                version: "$LATEST".into(),
                code_sha256_hex: "ab".repeat(32),
                runtime: "provided.al2023".into(),
                handler: "bootstrap".into(),
                memory_mib: 128,
                timeout_s: 3,
                environment: vec![("K".into(), "V".into())],
                reserved_concurrency: Some(5),
                revision_id: "r1".into(),
            },
            payload: b"{\"a\":1}".to_vec(),
            invocation_type: InvocationType::RequestResponse,
            client_context: None,
            trace_id: Some("Root=1-abc".into()),
            deadline_ms: 123,
            log_tail: true,
        }
    }

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::Hello(Hello::ours("test")),
            Frame::Refused("no".into()),
            Frame::Invoke(Box::new(request("r"))),
            Frame::Result(Box::new(InvokeResult {
                request_id: "r".into(),
                outcome: Outcome::Throttled {
                    reason: ThrottleReason::ConcurrentInvocationLimitExceeded,
                    message: "Rate Exceeded.".into(),
                },
                log_tail: b"REPORT".to_vec(),
                executed_version: "$LATEST".into(),
                timings: Timings {
                    invoke_us: 7,
                    ..Default::default()
                },
            })),
        ];
        let mut stream = Vec::new();
        for f in &frames {
            stream.extend(encode(f).unwrap());
        }
        let mut at = 0;
        for want in &frames {
            let (got, used) = decode(&stream[at..]).unwrap().unwrap();
            assert_eq!(&got, want);
            at += used;
        }
        assert_eq!(at, stream.len());
        assert!(decode(&stream[..3]).unwrap().is_none());
        assert!(decode(&stream[..6]).unwrap().is_none());
    }

    #[test]
    fn oversized_frames_are_refused_before_reading_them() {
        let prefix = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(
            decode(&prefix),
            Err(ProtocolError::TooLarge { .. })
        ));
        let mut big = request("r");
        big.payload = vec![0; MAX_FRAME];
        assert!(matches!(
            encode(&Frame::Invoke(Box::new(big))),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[test]
    fn trailing_bytes_and_other_versions_are_errors() {
        let mut f = encode(&Frame::Refused("x".into())).unwrap();
        f.push(0);
        let len = (f.len() - 4) as u32;
        f[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(decode(&f), Err(ProtocolError::TrailingBytes(1))));
        let hello = Hello {
            version: PROTOCOL_VERSION + 1,
            agent: "future".into(),
        };
        assert!(matches!(hello.check(), Err(ProtocolError::Version { .. })));
        Hello::ours("now").check().unwrap();
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
            let _ = decode_payload(&bytes);
        }

        #[test]
        fn arbitrary_payloads_behind_a_valid_prefix_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut f = (bytes.len() as u32).to_le_bytes().to_vec();
            f.extend(&bytes);
            let _ = decode(&f);
        }
    }
}
