//! A test function: what it does is chosen by the event's `op` field.
use lambda_runtime::{Diagnostic, Error, LambdaEvent, service_fn};
use serde_json::{Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// When this process started (ns since the epoch): tells one environment from another, where
/// the pid does not (the function is PID 1 of its own pid namespace).
static BOOT: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
static INVOKES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[derive(Debug)]
struct Handled(String);

impl From<Handled> for Diagnostic {
    fn from(e: Handled) -> Self {
        Diagnostic { error_type: "EchoError".into(), error_message: e.0 }
    }
}

async fn handle(event: LambdaEvent<Value>) -> Result<Value, Handled> {
    let (payload, ctx) = event.into_parts();
    let op = payload.get("op").and_then(Value::as_str).unwrap_or("echo").to_string();
    let num = |k: &str| payload.get(k).and_then(Value::as_u64).unwrap_or(0);
    let invokes = INVOKES.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    match op.as_str() {
        "error" => Err(Handled("handled failure".into())),
        "panic" => panic!("function panicked on purpose"),
        "exit" => std::process::exit(num("code") as i32),
        "sleep" => {
            tokio::time::sleep(Duration::from_millis(num("ms"))).await;
            Ok(json!({"slept": num("ms"), "request_id": ctx.request_id}))
        }
        "log" => {
            for i in 0..num("lines") {
                println!("stdout line {i}");
                eprintln!("stderr line {i}");
            }
            Ok(json!({"logged": num("lines")}))
        }
        "big" => Ok(Value::String("x".repeat(num("bytes") as usize))),
        "flood" => {
            for i in 0..num("lines") {
                println!("flood line {i} {}", "y".repeat(100));
            }
            Ok(json!({"flooded": num("lines")}))
        }
        "alloc" => {
            let mut v: Vec<u8> = Vec::new();
            for _ in 0..num("mb") {
                v.extend(std::iter::repeat_n(1u8, 1 << 20));
            }
            Ok(json!({"allocated_mb": v.len() >> 20}))
        }
        "probe" => Ok(probe()),
        "cpus" => Ok(json!({"cpus": status_line("Cpus_allowed_list:")})),
        "whoami" => Ok(json!({
            "boot": BOOT.get().map(|b| b.to_string()),
            "pid": std::process::id(),
            "invokes": invokes,
            "version": std::env::var("AWS_LAMBDA_FUNCTION_VERSION").ok(),
            "marker": std::env::var("ECHO_MARKER").ok(),
            "files": task_files(),
        })),
        "env" => {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
            let env: serde_json::Map<String, Value> =
                std::env::vars().map(|(k, v)| (k, Value::String(v))).collect();
            Ok(json!({
                "env": env,
                "deadline_ms": ctx.deadline,
                "now_ms": now,
                "request_id": ctx.request_id,
                "arn": ctx.invoked_function_arn,
                "uid": status_uid(),
                "cwd": std::env::current_dir().map(|p| p.display().to_string()).unwrap_or_default(),
            }))
        }
        _ => Ok(payload),
    }
}

/// What the sandbox lets the function do; each entry is "ok" or the errno name.
fn probe() -> Value {
    fn errno(rc: i64) -> String {
        if rc >= 0 { "ok".into() } else { std::io::Error::last_os_error().to_string() }
    }
    // SAFETY: plain system calls with no pointers, or valid NUL-terminated strings.
    let (kill_init, unshare, mount, uring, setuid) = unsafe {
        (
            errno(libc::kill(1, 0) as i64),
            errno(libc::unshare(libc::CLONE_NEWUSER) as i64),
            errno(libc::mount(c"none".as_ptr(), c"/tmp".as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null()) as i64),
            errno(libc::syscall(libc::SYS_io_uring_setup, 1, std::ptr::null_mut::<u8>())),
            errno(libc::setuid(0) as i64),
        )
    };
    let interfaces: Vec<String> = std::fs::read_to_string("/proc/net/dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|s| s.trim().to_string()))
        .collect();
    json!({
        "kill_init": kill_init,
        "unshare_user": unshare,
        "mount": mount,
        "io_uring": uring,
        "setuid_root": setuid,
        "write_task": std::fs::write("/var/task/x", b"x").map(|_| "ok".to_string()).unwrap_or_else(|e| e.to_string()),
        "write_tmp": std::fs::write("/tmp/x", b"x").map(|_| "ok".to_string()).unwrap_or_else(|e| e.to_string()),
        "read_init_environ": std::fs::read("/proc/1/environ").map(|_| "ok".to_string()).unwrap_or_else(|e| e.to_string()),
        "interfaces": interfaces,
        "hostname": std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim(),
        "pid": std::process::id(),
        "visible_pids": std::fs::read_dir("/proc").map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.chars().all(|c| c.is_ascii_digit())).collect::<Vec<_>>()).unwrap_or_default(),
    })
}

/// The names in the code folder, sorted.
fn task_files() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/var/task")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn status_uid() -> String {
    status_line("Uid:")
}

/// The line of /proc/self/status that starts with `key`, the key and blanks cut off.
fn status_line(key: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string())))
        .unwrap_or_default()
}

/// A single-threaded tokio runtime, as lean Rust functions use: the runtime's loop polls one
/// invoke at a time (or `AWS_LAMBDA_MAX_CONCURRENCY` of them as tasks), so worker threads would
/// only add cross-thread wake-ups to every invoke.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let _ = BOOT.set(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    println!("echo function init");
    if std::env::var("ECHO_FAIL_INIT").is_ok() {
        return Err("init failed on purpose".into());
    }
    lambda_runtime::run_concurrent(service_fn(handle)).await
}
