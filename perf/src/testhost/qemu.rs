//! Running QEMU for the test host: the command line, streaming the serial console line by line,
//! finding the exit marker, the timeout, and never leaving a QEMU process behind.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// The line the in-VM init prints when the command has ended: `HEARTH-TESTHOST-EXIT <code>`.
pub const EXIT_MARKER: &str = "HEARTH-TESTHOST-EXIT ";

/// The QEMU program.
pub const QEMU: &str = "qemu-system-x86_64";

/// An AMD CPU with SVM and nested paging, so that `kvm_amd` loads inside. The features TCG cannot
/// emulate are turned off by name, which is what TCG does anyway, without a warning for each.
const CPU: &str = "EPYC,+svm,+npt,-3dnowprefetch,-osvw,-topoext,-nrip-save,-xsavec";

/// How long QEMU may take to power off after the exit marker.
const POWER_OFF_GRACE: Duration = Duration::from_secs(30);

/// A console line longer than this is cut into pieces (a program printing without newlines).
const MAX_LINE: usize = 64 * 1024;

/// Console lines kept for an error message.
const TAIL_LINES: usize = 60;

/// Errors from running the test host's QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// `qemu-system-x86_64` is not installed.
    #[error(
        "{QEMU} is not on PATH: install the Debian package qemu-system-x86 (apt-get install qemu-system-x86)"
    )]
    Missing(#[source] io::Error),
    /// QEMU could not be started.
    #[error("cannot start {QEMU}")]
    Spawn(#[source] io::Error),
    /// Waiting for or killing QEMU failed.
    #[error("cannot wait for {QEMU}")]
    Wait(#[source] io::Error),
    /// QEMU ended before the init printed its exit marker.
    #[error(
        "the test host ended ({status}) without the `{EXIT_MARKER}<code>` line: the kernel or the init failed \
         (or the init does not know the testhost role). Last console lines:\n{console}{stderr}"
    )]
    NoMarker {
        status: ExitStatus,
        console: String,
        stderr: String,
    },
    /// The command did not end in time; QEMU was killed.
    #[error("the test host did not finish within {} s; QEMU was killed. Last console lines:\n{console}", .limit.as_secs())]
    Timeout { limit: Duration, console: String },
}

/// How to start QEMU.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// The bzImage.
    pub kernel: PathBuf,
    /// The initramfs (uncompressed newc cpio).
    pub initrd: PathBuf,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// The kernel command line.
    pub cmdline: String,
    /// Kill QEMU after this long.
    pub timeout: Option<Duration>,
    /// Show the kernel's boot messages too (they are held back until the init speaks otherwise).
    pub kernel_log: bool,
}

impl QemuConfig {
    /// QEMU's arguments.
    pub fn args(&self) -> Vec<String> {
        vec![
            "-machine".into(),
            "q35".into(),
            "-accel".into(),
            "tcg,thread=multi".into(),
            "-cpu".into(),
            CPU.into(),
            "-m".into(),
            self.memory_mib.to_string(),
            "-smp".into(),
            self.cpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-serial".into(),
            "stdio".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            self.kernel.display().to_string(),
            "-initrd".into(),
            self.initrd.display().to_string(),
            "-append".into(),
            self.cmdline.clone(),
        ]
    }
}

/// What a console line means to the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum ConsoleEvent<'a> {
    /// Show this line.
    Show(&'a [u8]),
    /// Kernel noise before the init spoke; kept for an error message.
    Hold,
    /// The exit marker, with what came before it on the line (output without a final newline).
    Exit { before: &'a [u8], code: i64 },
}

/// Sorts console lines: kernel messages before the init's first line are held back (unless asked
/// for), the exit marker ends the run.
#[derive(Debug)]
pub struct Console {
    kernel_log: bool,
    started: bool,
    tail: VecDeque<Vec<u8>>,
}

impl Console {
    /// A console that shows kernel boot messages when `kernel_log`.
    pub fn new(kernel_log: bool) -> Self {
        Self {
            kernel_log,
            started: false,
            tail: VecDeque::with_capacity(TAIL_LINES),
        }
    }

    /// Classifies one line (without its newline).
    pub fn feed<'a>(&mut self, line: &'a [u8]) -> ConsoleEvent<'a> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_vec());
        if let Some(at) = find(line, EXIT_MARKER.as_bytes()) {
            let rest = &line[at + EXIT_MARKER.len()..];
            if let Some(code) = std::str::from_utf8(rest)
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
            {
                return ConsoleEvent::Exit {
                    before: &line[..at],
                    code,
                };
            }
        }
        if !self.started
            && !self.kernel_log
            && (is_kernel_line(line) || line.contains(&0x1b) || line.is_empty())
        {
            return ConsoleEvent::Hold;
        }
        self.started = true;
        ConsoleEvent::Show(line)
    }

    /// The last lines seen, shown or held, for an error message.
    pub fn tail(&self) -> String {
        let mut out = String::new();
        if self.tail.is_empty() {
            out.push_str("  (nothing on the console yet)\n");
        }
        for line in &self.tail {
            out.push_str("  | ");
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out
    }
}

/// Whether `line` is a kernel message as printed with timestamps: `[    1.234567] ...`.
pub fn is_kernel_line(line: &[u8]) -> bool {
    let Some(rest) = line.strip_prefix(b"[") else {
        return false;
    };
    let Some(end) = rest.iter().position(|&b| b == b']') else {
        return false;
    };
    let stamp = rest[..end].trim_ascii_start();
    let mut parts = stamp.splitn(2, |&b| b == b'.');
    let (Some(secs), Some(frac)) = (parts.next(), parts.next()) else {
        return false;
    };
    !secs.is_empty() && !frac.is_empty() && secs.iter().chain(frac).all(u8::is_ascii_digit)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A QEMU child process that is killed and reaped whatever way this code leaves.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

enum Event {
    Line(Vec<u8>),
    Eof,
}

/// How the test host ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exited {
    /// The code in the exit marker.
    pub code: i64,
    /// QEMU start to the exit marker.
    pub marker_at: Duration,
}

/// Boots QEMU, hands each console line worth showing to `sink` (without its newline), and returns
/// the exit code from the marker once QEMU has ended.
pub fn run(config: &QemuConfig, sink: &mut dyn FnMut(&[u8])) -> Result<Exited, QemuError> {
    let mut command = Command::new(QEMU);
    command
        .args(config.args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut command);
    tracing::debug!("testhost: {QEMU} {}", config.args().join(" "));
    let mut child = command.spawn().map_err(|err| {
        if err.kind() == io::ErrorKind::NotFound {
            QemuError::Missing(err)
        } else {
            QemuError::Spawn(err)
        }
    })?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut guard = Guard(child);

    let (tx, rx) = mpsc::channel();
    if let Some(stdout) = stdout {
        thread::spawn(move || read_lines(stdout, &tx));
    }
    let stderr_reader = stderr.map(|stderr| thread::spawn(move || forward_stderr(stderr)));

    let started = Instant::now();
    let deadline = config.timeout.map(|t| started + t);
    let mut console = Console::new(config.kernel_log);
    let mut held_empty = false;
    let exited = loop {
        let event = match deadline {
            Some(deadline) => {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(event) => event,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        drop(guard);
                        return Err(QemuError::Timeout {
                            limit: config.timeout.unwrap_or_default(),
                            console: console.tail(),
                        });
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => Event::Eof,
                }
            }
            None => rx.recv().unwrap_or(Event::Eof),
        };
        match event {
            Event::Line(line) => match console.feed(&line) {
                // An empty line waits: the init starts its marker on a fresh line, and that empty
                // line is not the command's.
                ConsoleEvent::Show([]) => {
                    if std::mem::replace(&mut held_empty, true) {
                        sink(b"");
                    }
                }
                ConsoleEvent::Show(shown) => {
                    if std::mem::take(&mut held_empty) {
                        sink(b"");
                    }
                    sink(shown);
                }
                ConsoleEvent::Hold => {}
                ConsoleEvent::Exit { before, code } => {
                    if !before.is_empty() {
                        if std::mem::take(&mut held_empty) {
                            sink(b"");
                        }
                        sink(before);
                    }
                    break Exited {
                        code,
                        marker_at: started.elapsed(),
                    };
                }
            },
            Event::Eof => {
                let status = guard.0.wait().map_err(QemuError::Wait)?;
                let stderr = stderr_reader
                    .and_then(|h| h.join().ok())
                    .unwrap_or_default();
                let stderr = if stderr.is_empty() {
                    String::new()
                } else {
                    format!("QEMU said:\n{stderr}")
                };
                return Err(QemuError::NoMarker {
                    status,
                    console: console.tail(),
                    stderr,
                });
            }
        }
    };
    // The init powers the machine off after the marker; give it a moment, then make sure.
    let off_deadline = Instant::now() + POWER_OFF_GRACE;
    loop {
        match guard.0.try_wait().map_err(QemuError::Wait)? {
            Some(_) => break,
            None if Instant::now() >= off_deadline => {
                tracing::warn!(
                    "testhost: QEMU did not power off {} s after the exit marker; killing it",
                    POWER_OFF_GRACE.as_secs()
                );
                break;
            }
            None => thread::sleep(Duration::from_millis(20)),
        }
    }
    drop(guard);
    Ok(exited)
}

/// Sends QEMU's console output as lines (cut at `MAX_LINE`), then `Eof`.
fn read_lines(stdout: ChildStdout, tx: &mpsc::Sender<Event>) {
    let mut reader = BufReader::with_capacity(64 * 1024, stdout);
    let mut line = Vec::new();
    loop {
        let buf = match reader.fill_buf() {
            Ok([]) | Err(_) => break,
            Ok(buf) => buf,
        };
        let (used, complete) = match buf.iter().position(|&b| b == b'\n') {
            Some(at) => {
                line.extend_from_slice(&buf[..at]);
                (at + 1, true)
            }
            None => {
                line.extend_from_slice(buf);
                (buf.len(), line.len() >= MAX_LINE)
            }
        };
        reader.consume(used);
        if complete && tx.send(Event::Line(std::mem::take(&mut line))).is_err() {
            return;
        }
    }
    if !line.is_empty() {
        let _ = tx.send(Event::Line(line));
    }
    let _ = tx.send(Event::Eof);
}

/// Copies QEMU's own messages to stderr, except the notes about CPU features TCG lacks; returns
/// them for an error message.
fn forward_stderr(stderr: ChildStderr) -> String {
    const KEEP: usize = 64 * 1024;
    let mut kept = String::new();
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    // Read to the end, whatever QEMU writes, so it never blocks on a full pipe.
    while matches!(reader.by_ref().take(MAX_LINE as u64).read_until(b'\n', &mut line), Ok(n) if n > 0)
    {
        let text = String::from_utf8_lossy(&line);
        if !text.contains("TCG doesn't support requested feature") {
            let _ = io::stderr().write_all(format!("qemu: {text}").as_bytes());
            if kept.len() + text.len() <= KEEP {
                kept.push_str(&text);
            }
        }
        line.clear();
    }
    kept
}

/// Asks the kernel to kill QEMU if this process dies, so a killed test leaves no QEMU behind.
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) == -1
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_lines_are_recognized() {
        assert!(is_kernel_line(b"[    0.000000] Linux version 6.1.0"));
        assert!(is_kernel_line(b"[12345.678901] x"));
        assert!(!is_kernel_line(b"[info] hello"));
        assert!(!is_kernel_line(b"[1.] x"));
        assert!(!is_kernel_line(b"hello"));
        assert!(!is_kernel_line(b"["));
    }

    #[test]
    fn kernel_noise_is_held_until_the_init_speaks() {
        let mut console = Console::new(false);
        assert_eq!(
            console.feed(b"[    1.000000] Unstable clock detected\r"),
            ConsoleEvent::Hold
        );
        assert_eq!(console.feed(b"\x1bc\x1b[?7l"), ConsoleEvent::Hold);
        assert_eq!(
            console.feed(b"hearth-init: testhost\r"),
            ConsoleEvent::Show(b"hearth-init: testhost")
        );
        assert_eq!(
            console.feed(b"[    5.000000] kvm: oops"),
            ConsoleEvent::Show(b"[    5.000000] kvm: oops")
        );
        assert!(console.tail().contains("Unstable clock"));
    }

    #[test]
    fn kernel_log_shows_everything() {
        let mut console = Console::new(true);
        assert_eq!(
            console.feed(b"[    1.000000] x"),
            ConsoleEvent::Show(b"[    1.000000] x")
        );
    }

    #[test]
    fn the_exit_marker_is_found_even_after_output_without_newline() {
        let mut console = Console::new(false);
        assert_eq!(
            console.feed(b"HEARTH-TESTHOST-EXIT 0\r"),
            ConsoleEvent::Exit {
                before: b"",
                code: 0
            }
        );
        assert_eq!(
            console.feed(b"partialHEARTH-TESTHOST-EXIT 127"),
            ConsoleEvent::Exit {
                before: b"partial",
                code: 127
            }
        );
        assert_eq!(
            console.feed(b"HEARTH-TESTHOST-EXIT -1"),
            ConsoleEvent::Exit {
                before: b"",
                code: -1
            }
        );
        assert_eq!(
            console.feed(b"HEARTH-TESTHOST-EXIT soon"),
            ConsoleEvent::Show(b"HEARTH-TESTHOST-EXIT soon")
        );
    }

    #[test]
    fn qemu_arguments_name_the_machine() {
        let config = QemuConfig {
            kernel: "/k".into(),
            initrd: "/i".into(),
            memory_mib: 2048,
            cpus: 2,
            cmdline: "console=ttyS0".into(),
            timeout: None,
            kernel_log: false,
        };
        let args = config.args().join(" ");
        assert!(
            args.contains("-machine q35 -accel tcg,thread=multi -cpu EPYC,+svm,+npt"),
            "{args}"
        );
        assert!(args.contains("-m 2048 -smp 2"), "{args}");
        assert!(
            args.ends_with("-kernel /k -initrd /i -append console=ttyS0"),
            "{args}"
        );
    }
}
