//! The function messages between the host and the init: load a bundle, invoke, results, logs.
//!
//! They travel inside [`super::Message::Function`] on a control connection, after the `Hello`
//! exchange. One connection carries one sandbox's function conversation, multiplexed by request id
//! (several invokes may be in flight when `max_concurrency` > 1):
//!
//! 1. host -> init: [`Message::Load`], then [`Message::CodeChunk`] frames whose lengths add up to
//!    [`Bundle::code_len`] (a code zip may be larger than one frame).
//! 2. init -> host: [`Message::Loaded`] once the runtime has asked for its first invoke, or
//!    [`Message::InitFailed`] (a bad zip, no bootstrap, the runtime reported an init error or
//!    exited). Log lines ([`Message::Log`]) may come at any time.
//! 3. host -> init: [`Message::Invoke`]; init -> host: exactly one [`Message::Result`] per invoke,
//!    tagged with its request id.
//! 4. init -> host: [`Message::Exited`] when the runtime process ends, then a `Runtime.ExitError`
//!    result for each invoke in flight. The host replaces the environment.
//!
//! The host enforces timeouts itself (by destroying the sandbox); the init does not.

use serde::{Deserialize, Serialize};

/// The most code bytes one [`Message::CodeChunk`] carries.
pub const CODE_CHUNK: usize = 4 << 20;
/// The largest response or request payload (Lambda's 6 MB synchronous limit, as Lambda counts it).
pub const MAX_PAYLOAD: usize = 6 * 1024 * 1024 + 100;
/// The most bytes of one log line kept; the rest is cut.
pub const MAX_LOG_LINE: usize = 16 * 1024;
/// The most log bytes kept as the tail of one invoke (Lambda's `LogType=Tail` gives 4 KB).
pub const LOG_TAIL: usize = 4096;

/// AWS credentials given to the function as environment variables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

/// Everything the init needs to start a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    pub function_name: String,
    pub function_version: String,
    pub function_arn: String,
    /// `provided`, `provided.al2` or `provided.al2023`.
    pub runtime: String,
    pub handler: String,
    pub memory_mb: u32,
    pub timeout_ms: u64,
    pub region: String,
    pub log_group: String,
    pub log_stream: String,
    /// The function's own environment variables (reserved names are refused by the init).
    pub env: Vec<(String, String)>,
    pub credentials: Option<Credentials>,
    /// `AWS_LAMBDA_MAX_CONCURRENCY`: invokes the environment takes at once (1 in a microVM).
    pub max_concurrency: u32,
    /// Bytes of code zip that follow as [`Message::CodeChunk`] frames.
    pub code_len: u64,
}

/// One invoke.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoke {
    pub request_id: String,
    pub payload: Vec<u8>,
    /// Wall-clock deadline, milliseconds since the Unix epoch.
    pub deadline_ms: u64,
    /// The host's wall clock when it sent the invoke, milliseconds since the Unix epoch (0:
    /// unknown). A microVM's init sets the guest's clock from it when they disagree, so that
    /// the deadline (and anything the function signs with the time) agrees with the host.
    pub host_time_ms: u64,
    pub invoked_function_arn: String,
    pub trace_id: Option<String>,
    /// Base64 JSON, as the Invoke API's `X-Amz-Client-Context` gives it.
    pub client_context: Option<String>,
    /// JSON.
    pub cognito_identity: Option<String>,
}

/// An error as Lambda reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionError {
    /// e.g. `Runtime.ExitError`, `Function.ResponseSizeTooLarge`, or the function's own type.
    pub error_type: String,
    pub error_message: String,
    /// The error body as the runtime posted it (JSON), or one built from the two fields above.
    pub body: Vec<u8>,
}

impl FunctionError {
    /// An error whose body is `{"errorType":..,"errorMessage":..}`.
    pub fn new(error_type: impl Into<String>, error_message: impl Into<String>) -> Self {
        let error_type = error_type.into();
        let error_message = error_message.into();
        let body = serde_json::to_vec(&serde_json::json!({
            "errorType": error_type,
            "errorMessage": error_message,
        }))
        .unwrap_or_default();
        FunctionError {
            error_type,
            error_message,
            body,
        }
    }
}

/// How an invoke ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Response(Vec<u8>),
    Error(FunctionError),
}

/// The result of one invoke.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvokeResult {
    pub request_id: String,
    pub outcome: Outcome,
    /// The last [`LOG_TAIL`] bytes logged while this invoke ran.
    pub logs_tail: Vec<u8>,
    /// From handing the invoke to the runtime to its response, in microseconds.
    pub duration_us: u64,
    /// Peak memory of the function's processes so far, in MiB.
    pub max_memory_used_mb: u64,
}

/// Which stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One line the function printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// The invoke in flight when the line was printed (when exactly one was), else `None`.
    pub request_id: Option<String>,
    pub stream: Stream,
    /// The line without its newline, cut at [`MAX_LOG_LINE`] bytes.
    pub line: Vec<u8>,
    /// Lines dropped before this one because the host link was backed up.
    pub dropped_before: u64,
}

/// The runtime is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loaded {
    /// From receiving the bundle to the runtime's first `/next`, in microseconds.
    pub init_duration_us: u64,
}

/// The runtime could not start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitFailed {
    pub error: FunctionError,
    pub init_duration_us: u64,
    pub logs_tail: Vec<u8>,
}

/// The runtime process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exited {
    /// e.g. `exit status 3`, `signal: 9 (SIGKILL)`.
    pub status: String,
}

/// The function messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Load(Bundle),
    CodeChunk(Vec<u8>),
    Loaded(Loaded),
    InitFailed(InitFailed),
    Invoke(Invoke),
    Result(InvokeResult),
    Log(LogLine),
    Exited(Exited),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_a_frame() {
        let msg = super::super::Message::Function(Message::Invoke(Invoke {
            request_id: "r-1".into(),
            payload: b"{}".to_vec(),
            deadline_ms: 1,
            host_time_ms: 0,
            invoked_function_arn: "arn".into(),
            trace_id: None,
            client_context: Some("e30=".into()),
            cognito_identity: None,
        }));
        let frame = super::super::encode_frame(&msg).unwrap();
        let (back, used): (super::super::Message, usize) =
            super::super::decode_frame(&frame).unwrap().unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(back, msg);
    }

    #[test]
    fn a_full_payload_fits_in_a_frame() {
        let msg = super::super::Message::Function(Message::Result(InvokeResult {
            request_id: "0123456789abcdef0123456789abcdef0123".into(),
            outcome: Outcome::Response(vec![b'x'; MAX_PAYLOAD]),
            logs_tail: vec![b'l'; LOG_TAIL],
            duration_us: u64::MAX,
            max_memory_used_mb: u64::MAX,
        }));
        assert!(super::super::encode_frame(&msg).is_ok());
        let chunk = super::super::Message::Function(Message::CodeChunk(vec![0; CODE_CHUNK]));
        assert!(super::super::encode_frame(&chunk).is_ok());
    }
}
