//! Test support (cargo feature `testing`), shared by the agent's integration tests and
//! `hearth-perf`: the echo function (a real Lambda function, the `lambda_runtime` crate, in
//! `agent/tests/functions/echo`, on a `current_thread` tokio runtime as lean Rust functions run)
//! built as a static `bootstrap` and zipped, its [`FunctionSpec`](crate::sandbox::FunctionSpec),
//! and helpers for tests that run inside the QEMU test host.
//!
//! Building needs `cargo` (`$CARGO`, else on `PATH`) and the `x86_64-unknown-linux-gnu` target.
//! Inside the test host (`HEARTH_IN_TESTHOST` set) there is no cargo: the zip must have been built
//! on the outer machine and packed at the same path (`hearth testhost --with`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::sandbox::{Bundle, FunctionSpec};

/// Why the echo function could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TestingError {
    #[error("cannot run cargo to build the echo function")]
    Cargo(#[source] std::io::Error),
    #[error("building the echo function failed ({0}); see cargo's output above")]
    Build(std::process::ExitStatus),
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot zip the echo function")]
    Zip(#[source] zip::result::ZipError),
    #[error("{0} is not here: inside the test host it must be built outside and packed (--with)")]
    NotPacked(PathBuf),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TestingError {
    let path = path.to_path_buf();
    move |source| TestingError::Io { what, path, source }
}

/// The echo function's cargo project.
pub fn echo_source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/functions/echo")
}

/// Where test functions are built and zipped: the workspace's `target/functions` (not
/// `$CARGO_TARGET_DIR`, which the test host does not pass in: the path must be the same inside).
pub fn functions_dir() -> PathBuf {
    let agent = Path::new(env!("CARGO_MANIFEST_DIR"));
    agent.parent().unwrap_or(agent).join("target/functions")
}

/// Where [`echo_zip`] writes the zip (the same absolute path inside the test host).
pub fn echo_zip_path() -> PathBuf {
    functions_dir().join("echo.zip")
}

/// Whether this process runs inside the QEMU test host.
pub fn in_testhost() -> bool {
    std::env::var_os("HEARTH_IN_TESTHOST").is_some()
}

/// Builds the echo function (release, `crt-static`) and writes its zip (`bootstrap`, mode 0755)
/// to [`echo_zip_path`]; returns that path. Inside the test host, only checks that the zip is
/// there. Several processes may call this at once: cargo serializes the build, and the zip is
/// written under a unique name and renamed into place.
pub fn echo_zip() -> Result<PathBuf, TestingError> {
    let path = echo_zip_path();
    if in_testhost() {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(TestingError::NotPacked(path))
        };
    }
    let target = functions_dir();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .current_dir(echo_source_dir())
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .map_err(TestingError::Cargo)?;
    if !status.success() {
        return Err(TestingError::Build(status));
    }
    let binary_path = target.join("x86_64-unknown-linux-gnu/release/bootstrap");
    let binary = std::fs::read(&binary_path).map_err(io("read", &binary_path))?;
    let zip = zip_bootstrap(&binary)?;
    let partial = target.join(format!(
        "echo.zip.{}-{}",
        std::process::id(),
        &crate::sandbox::new_request_id()[..8]
    ));
    std::fs::write(&partial, zip).map_err(io("write", &partial))?;
    std::fs::rename(&partial, &path).map_err(io("rename into place", &path))?;
    Ok(path)
}

/// A zip holding `binary` as an executable `bootstrap`.
pub fn zip_bootstrap(binary: &[u8]) -> Result<Vec<u8>, TestingError> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().unix_permissions(0o755);
    w.start_file("bootstrap", opts).map_err(TestingError::Zip)?;
    w.write_all(binary)
        .map_err(|e| TestingError::Zip(e.into()))?;
    Ok(w.finish().map_err(TestingError::Zip)?.into_inner())
}

/// A synchronous invoke, as the frontend sends it, of the echo function named `function`
/// (`$LATEST`, `provided.al2023`, 256 MB, 30 s, revision `rev-1`) whose code has the sha256
/// `code_hex`, with a JSON `payload` and a fresh request id.
pub fn echo_invoke(
    function: &str,
    code_hex: &str,
    payload: &serde_json::Value,
) -> crate::proxy::protocol::InvokeRequest {
    use crate::proxy::protocol::{FunctionSpec, InvocationType, InvokeRequest};
    InvokeRequest {
        request_id: crate::sandbox::new_request_id(),
        function: FunctionSpec {
            function_arn: format!("arn:aws:lambda:us-east-1:000000000000:function:{function}"),
            function_name: function.into(),
            version: "$LATEST".into(),
            code_sha256_hex: code_hex.into(),
            runtime: "provided.al2023".into(),
            handler: "bootstrap".into(),
            memory_mib: 256,
            timeout_s: 30,
            environment: vec![],
            reserved_concurrency: None,
            revision_id: "rev-1".into(),
        },
        payload: payload.to_string().into_bytes(),
        invocation_type: InvocationType::RequestResponse,
        client_context: None,
        trace_id: None,
        deadline_ms: 0,
        log_tail: false,
    }
}

/// The echo function with `code` (its zip): 256 MB, `provided.al2023`, the given timeout,
/// `AWS_LAMBDA_MAX_CONCURRENCY` and environment.
pub fn echo_function(
    code: Vec<u8>,
    timeout_ms: u64,
    max_concurrency: u32,
    env: &[(&str, &str)],
) -> FunctionSpec {
    FunctionSpec {
        bundle: Bundle {
            function_name: "echo".into(),
            function_version: "$LATEST".into(),
            function_arn: "arn:aws:lambda:us-east-1:000000000000:function:echo".into(),
            runtime: "provided.al2023".into(),
            handler: "bootstrap".into(),
            memory_mb: 256,
            timeout_ms,
            region: "us-east-1".into(),
            log_group: "/aws/lambda/echo".into(),
            log_stream: "2026/11/28/[$LATEST]test".into(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            credentials: None,
            max_concurrency,
            code_len: 0,
        },
        code,
        cpu: None,
    }
}

/// Whether process `pid` still runs (a zombie counts as gone).
pub fn process_runs(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with(['Z', 'X']),
        Err(_) => false,
    }
}

/// Ends the process loudly (exit status 101) if it still runs after `limit`, printing every
/// thread's state, kernel wait channel and system call first, so a hang inside the test host is a
/// diagnosable failure rather than a silent one.
pub fn watchdog(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("WATCHDOG: still running after {limit:?}; threads:");
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        for proc_dir in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let tasks = proc_dir.path().join("task");
            for task in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
                let t = task.path();
                let stat = read(t.join("stat"));
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                eprintln!(
                    "  {} {} state={} wchan={} syscall={}",
                    t.display(),
                    read(t.join("comm")).trim(),
                    state.chars().next().unwrap_or('?'),
                    read(t.join("wchan")).trim(),
                    read(t.join("syscall"))
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                );
            }
        }
        std::process::exit(101);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_zip_holds_an_executable_bootstrap() {
        let bytes = zip_bootstrap(b"#!/bin/sh\n").unwrap();
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        let entry = archive.by_name("bootstrap").unwrap();
        assert_eq!(entry.unix_mode().map(|m| m & 0o777), Some(0o755));
        assert_eq!(entry.size(), 10);
    }

    #[test]
    fn this_process_runs_and_a_reaped_child_does_not() {
        assert!(process_runs(std::process::id()));
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_runs(pid));
    }
}
