//! Frames: a 4-byte little-endian length, then that many bytes of JSON. Every message carries the
//! protocol version; a peer answers a version it does not speak with an error.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest frame accepted (checked before allocating).
pub const MAX_FRAME: usize = 64 * 1024;

/// What the client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Run the vCPUs for the first time.
    Start,
    /// Stop running guest code.
    Pause,
    /// Run again after a pause.
    Resume,
    /// End the VM; the process exits with status 0.
    Stop,
    /// Report the state.
    Status,
    /// Write a snapshot of the paused VM: the state file and the (sparse) memory file, both
    /// created or replaced, readable by the VMM's user only. The VM stays paused.
    Snapshot {
        /// Where the state file goes.
        state_path: std::path::PathBuf,
        /// Where the memory file goes.
        mem_path: std::path::PathBuf,
    },
    /// Restore a snapshot into a VMM started ahead (`--await-restore`), which must be
    /// [`VmState::AwaitingRestore`]; the files are read and checked as a restore at start-up
    /// reads them (a refused snapshot leaves the VMM awaiting). The VM is then `Created`: send
    /// `Start` to run it, unless `resume` asked for it to run at once.
    Restore {
        /// The snapshot's state file.
        state_path: std::path::PathBuf,
        /// The snapshot's memory file.
        mem_path: std::path::PathBuf,
        /// How guest RAM is restored.
        mode: crate::restore::RestoreMode,
        /// Run the VM as soon as it is restored, without a `Start` (as Firecracker's
        /// `LoadSnapshot` with `resume_vm`): the answer, sent once the VM is restored, is then
        /// `Running`, and its vCPUs start right after it. Absent means false.
        #[serde(default)]
        resume: bool,
    },
}

/// The VM's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Started ahead of a restore (`--await-restore`): KVM set up, no guest yet; waits for
    /// [`Command::Restore`].
    AwaitingRestore,
    /// Built, vCPUs not yet started.
    Created,
    /// Running guest code.
    Running,
    /// Paused by request.
    Paused,
    /// Ending; the process is about to exit.
    Stopping,
}

/// A request frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// The command.
    pub command: Command,
}

/// A response frame: the state after the command, or why it failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// The state after the command, or an error message.
    pub result: Result<VmState, String>,
}

impl Request {
    /// A request at this build's version.
    pub fn new(command: Command) -> Self {
        Request {
            version: PROTOCOL_VERSION,
            command,
        }
    }
}

/// A frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The socket failed.
    #[error("control socket I/O failed")]
    Io(#[from] io::Error),
    /// The frame is larger than [`MAX_FRAME`].
    #[error("control frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The frame is not a valid message.
    #[error("malformed control frame")]
    Decode(#[source] serde_json::Error),
    /// The message could not be encoded.
    #[error("cannot encode a control frame")]
    Encode(#[source] serde_json::Error),
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), ProtocolError> {
    let body = serde_json::to_vec(msg).map_err(ProtocolError::Encode)?;
    if body.len() > MAX_FRAME {
        return Err(ProtocolError::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    Ok(())
}

/// Reads one frame.
pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> Result<T, ProtocolError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    serde_json::from_slice(&body).map_err(ProtocolError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Request::new(Command::Pause)).unwrap();
        let back: Request = read_frame(&mut buf.as_slice()).unwrap();
        assert_eq!(back, Request::new(Command::Pause));
        let snap = Request::new(Command::Snapshot {
            state_path: "/s/state".into(),
            mem_path: "/s/mem".into(),
        });
        let mut buf = Vec::new();
        write_frame(&mut buf, &snap).unwrap();
        assert_eq!(read_frame::<Request>(&mut buf.as_slice()).unwrap(), snap);
        let restore = Request::new(Command::Restore {
            state_path: "/s/state".into(),
            mem_path: "/s/mem".into(),
            mode: crate::restore::RestoreMode::Uffd {
                prefetch_ws: Some("/s/mem.ws".into()),
                record_ws: false,
            },
            resume: true,
        });
        let mut buf = Vec::new();
        write_frame(&mut buf, &restore).unwrap();
        assert_eq!(read_frame::<Request>(&mut buf.as_slice()).unwrap(), restore);
        let mut buf = Vec::new();
        let resp = Response {
            version: 1,
            result: Err("no".into()),
        };
        write_frame(&mut buf, &resp).unwrap();
        assert_eq!(read_frame::<Response>(&mut buf.as_slice()).unwrap(), resp);
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let frame = u32::MAX.to_le_bytes();
        assert!(matches!(
            read_frame::<Request>(&mut frame.as_slice()),
            Err(ProtocolError::TooLarge(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = read_frame::<Request>(&mut bytes.as_slice());
        }
    }
}
