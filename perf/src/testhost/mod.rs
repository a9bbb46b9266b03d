//! `hearth testhost`: runs a command inside a QEMU TCG machine with an emulated AMD CPU that has
//! SVM and nested paging, where `kvm_amd` loads and gives a real (hardware-style) KVM. This is how
//! Hearth's microVM code runs on hosts whose `/dev/kvm` is PVM or missing.
//!
//! The host side (this module) packs an initramfs with the init (`hearth-init`, whose `testhost`
//! role does the in-VM part), the `hearth` binary, the kernel cache, every `--with` file and the
//! shared libraries they need, writes `/testhost/spec.json`, boots QEMU, streams the serial console
//! and returns the command's exit status from the init's `HEARTH-TESTHOST-EXIT <code>` line.

pub mod pack;
pub mod qemu;
pub mod spec;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hearth_guest::image::{
    self, GUEST_MODULES, ImageError, KernelImage, KernelRecord, modules::ModulesError,
};

use pack::{PackError, Packer, Strip};
use qemu::{QemuConfig, QemuError};
use spec::Spec;

/// Where the spec lies inside the test host.
pub const SPEC_PATH: &str = "/testhost/spec.json";

/// The modules the test host loads, with their dependencies, for a real KVM.
pub const TESTHOST_MODULES: [&str; 1] = ["kvm-amd"];

/// Virtual CPUs of the test host unless asked otherwise.
pub const DEFAULT_CPUS: u32 = 1;

/// `PATH` inside the test host, before the folders of `--with` programs.
pub const GUEST_PATH: &str = "/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin";

/// Folders the init mounts file systems on inside the test host, hiding what was packed there.
/// (`/tmp` and `/run` are the initramfs's own there, so packed files under them stay visible.)
pub const HIDDEN_INSIDE: [&str; 3] = ["/dev", "/proc", "/sys"];

/// Host environment variables passed through to the command.
pub const PASS_ENV: [&str; 3] = ["RUST_LOG", "HEARTH_LOG", "RUST_BACKTRACE"];

/// Errors from preparing or running the test host.
#[derive(Debug, thiserror::Error)]
pub enum TesthostError {
    /// The kernel cache has no kernel.
    #[error(
        "the test host needs the cached Debian kernel and its modules: run `hearth image` first"
    )]
    NoKernel(#[source] ImageError),
    /// The kernel record could not be read.
    #[error("cannot read the kernel record {path:?}; run `hearth image` again")]
    KernelRecord {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The modules for KVM or the guest are not in the cache.
    #[error(
        "the kernel modules the test host needs are not in the kernel cache; run `hearth image` again"
    )]
    Modules(#[source] ModulesError),
    /// No `hearth-init` to use as the test host's init.
    #[error("the test host needs hearth-init as its init")]
    NoInit(#[source] ImageError),
    /// No `hearth` binary to pack.
    #[error(
        "the `hearth` binary was not found (looked at {tried:?}); build it with `cargo build --bins`"
    )]
    NoHearth { tried: Vec<PathBuf> },
    /// A `--with` path does not exist.
    #[error("--with {0:?}: no such file or folder")]
    WithMissing(PathBuf),
    /// A bad option value.
    #[error("{0}")]
    Usage(String),
    /// Packing files failed.
    #[error(transparent)]
    Pack(#[from] PackError),
    /// Writing the initramfs or spec failed.
    #[error("cannot write the test host's initramfs to {path:?}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU failed, timed out or ended without the exit marker.
    #[error(transparent)]
    Qemu(#[from] QemuError),
}

/// `hearth testhost [--with PATH]... [--memory MIB] [--cpus N] [--timeout SECS] -- COMMAND [ARGS]...`
#[derive(Debug, Clone, clap::Args)]
pub struct TesthostArgs {
    /// A file or folder to pack at the same absolute path inside (repeatable). ELF files bring their
    /// shared libraries, scripts their interpreter.
    #[arg(long = "with", value_name = "PATH")]
    pub with: Vec<PathBuf>,
    /// Memory of the test host in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 3072)]
    pub memory: u32,
    /// Virtual CPUs of the test host. One by default: with two, QEMU's multi-threaded TCG has hung
    /// now and then while the nested guest boots (seen under load on a 2-core machine), and one is
    /// as fast for a single nested VM.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CPUS)]
    pub cpus: u32,
    /// Kill the test host after this many seconds (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 1800)]
    pub timeout: u64,
    /// An environment variable for the command (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Show the kernel's boot messages (normally held back, and shown only when the test host fails).
    #[arg(long)]
    pub kernel_log: bool,
    /// Pack binaries with their debug info (slower to boot, better backtraces).
    #[arg(long)]
    pub keep_debug: bool,
    /// Extra arguments for the test host kernel's command line.
    #[arg(long, value_name = "ARGS", default_value = "")]
    pub append: String,
    /// The command to run inside, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Everything a test host run needs: plain data, filled from [`TesthostArgs`] or by a caller.
#[derive(Debug, Clone)]
pub struct TesthostConfig {
    /// The command and its arguments.
    pub argv: Vec<String>,
    /// Extra files and folders to pack at their paths.
    pub with: Vec<PathBuf>,
    /// Extra environment for the command (after the passed-through and Hearth variables).
    pub env: Vec<(String, String)>,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Kill QEMU after this long.
    pub timeout: Option<Duration>,
    /// Show kernel boot messages.
    pub kernel_log: bool,
    /// Strip debug info from copies of large binaries.
    pub strip: bool,
    /// The `hearth` binary to pack; `None`: [`find_hearth`].
    pub hearth: Option<PathBuf>,
    /// The working folder inside; `None`: the current one.
    pub cwd: Option<PathBuf>,
    /// Extra kernel command-line arguments.
    pub append: String,
}

impl TesthostConfig {
    /// A config with the defaults of `hearth testhost` for `argv`.
    pub fn new(argv: Vec<String>) -> Self {
        Self {
            argv,
            with: Vec::new(),
            env: Vec::new(),
            memory_mib: 3072,
            cpus: DEFAULT_CPUS,
            timeout: Some(Duration::from_secs(1800)),
            kernel_log: false,
            strip: true,
            hearth: None,
            cwd: None,
            append: String::new(),
        }
    }

    /// The config for parsed command-line arguments; every bad value is reported at once.
    pub fn from_args(args: TesthostArgs) -> Result<Self, TesthostError> {
        let mut problems = Vec::new();
        if args.memory < 512 {
            problems.push(format!(
                "--memory {} is too small: the test host needs at least 512 MiB",
                args.memory
            ));
        }
        if !(1..=64).contains(&args.cpus) {
            problems.push(format!("--cpus {} must be between 1 and 64", args.cpus));
        }
        let mut env = Vec::new();
        for pair in &args.env {
            match pair.split_once('=') {
                Some((key, value)) if !key.is_empty() => {
                    env.push((key.to_owned(), value.to_owned()))
                }
                _ => problems.push(format!("--env {pair:?} is not KEY=VALUE")),
            }
        }
        if args.command.is_empty() || args.command[0].is_empty() {
            problems.push("no command given after `--`".to_owned());
        }
        if !problems.is_empty() {
            return Err(TesthostError::Usage(problems.join("; ")));
        }
        Ok(Self {
            argv: args.command,
            with: args.with,
            env,
            memory_mib: args.memory,
            cpus: args.cpus,
            timeout: (args.timeout > 0).then(|| Duration::from_secs(args.timeout)),
            kernel_log: args.kernel_log,
            strip: !args.keep_debug,
            hearth: None,
            cwd: None,
            append: args.append,
        })
    }
}

/// `hearth testhost`: runs the command in the test host, streams its output to stdout, and returns
/// its exit status.
pub fn run(args: TesthostArgs) -> anyhow::Result<u8> {
    let config = TesthostConfig::from_args(args)?;
    let stdout = std::io::stdout();
    let code = run_command(&config, &mut |line| {
        let mut lock = stdout.lock();
        let _ = lock.write_all(line);
        let _ = lock.write_all(b"\n");
        let _ = lock.flush();
    })?;
    Ok(code)
}

/// Runs `config.argv` in the test host, hands each console line worth showing to `sink` (without
/// its newline), and returns the command's exit status.
pub fn run_command(
    config: &TesthostConfig,
    sink: &mut dyn FnMut(&[u8]),
) -> Result<u8, TesthostError> {
    Ok(run_timed(config, sink)?.code)
}

/// How a test host run went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The command's exit status (1 when the init reported one out of range).
    pub code: u8,
    /// Bytes of file data in the initramfs.
    pub initramfs_bytes: u64,
    /// Collecting the files and writing the initramfs.
    pub pack: Duration,
    /// QEMU start to the first console line shown (the init's or the command's first words).
    pub first_line: Option<Duration>,
    /// QEMU start to the exit marker.
    pub to_exit: Duration,
    /// Start to QEMU's end.
    pub total: Duration,
}

/// Like [`run_command`], with timings.
pub fn run_timed(
    config: &TesthostConfig,
    sink: &mut dyn FnMut(&[u8]),
) -> Result<Outcome, TesthostError> {
    let started = Instant::now();
    let prepared = prepare(config)?;
    let initrd = tempfile::Builder::new()
        .prefix("hearth-testhost-")
        .suffix(".cpio")
        .tempfile()
        .map_err(|source| TesthostError::Write {
            path: std::env::temp_dir(),
            source,
        })?;
    {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, initrd.as_file());
        prepared.packer.write_to(&mut out)?;
        out.flush().map_err(|source| TesthostError::Write {
            path: initrd.path().to_path_buf(),
            source,
        })?;
    }
    let pack = started.elapsed();
    let initramfs_bytes = prepared.packer.bytes();
    drop(prepared.packer);
    tracing::info!(
        "testhost: initramfs of {} MiB packed in {} ms; booting QEMU",
        initramfs_bytes >> 20,
        pack.as_millis()
    );
    let qemu = QemuConfig {
        kernel: prepared.kernel,
        initrd: initrd.path().to_path_buf(),
        memory_mib: config.memory_mib,
        cpus: config.cpus,
        cmdline: kernel_cmdline(config.kernel_log, &config.append),
        timeout: config.timeout,
        kernel_log: config.kernel_log,
    };
    let booted = Instant::now();
    let mut first_line = None;
    let exited = qemu::run(&qemu, &mut |line| {
        first_line.get_or_insert_with(|| booted.elapsed());
        sink(line);
    })?;
    let (code, to_exit) = (exited.code, exited.marker_at);
    tracing::info!(
        "testhost: `{}` exited with {code} after {} ms",
        config.argv.join(" "),
        started.elapsed().as_millis()
    );
    let code = u8::try_from(code).unwrap_or_else(|_| {
        tracing::warn!("testhost: exit code {code} is out of range; reporting 1");
        1
    });
    Ok(Outcome {
        code,
        initramfs_bytes,
        pack,
        first_line,
        to_exit,
        total: started.elapsed(),
    })
}

/// The test host kernel's command line, with `append` at the end.
///
/// Under TCG, `lpj=` skips the delay-loop calibration (about half a second for two CPUs),
/// `tsc=reliable` keeps the TSC as the clock source (the HPET is far slower to read), and
/// `mitigations=off` drops the speculation work-arounds an emulated CPU does not need.
pub fn kernel_cmdline(kernel_log: bool, append: &str) -> String {
    let mut cmdline = String::from(
        "console=ttyS0 panic=-1 hearth.role=testhost mitigations=off lpj=8000000 tsc=reliable no_timer_check",
    );
    if !kernel_log {
        cmdline.push_str(" quiet");
    }
    if !append.trim().is_empty() {
        cmdline.push(' ');
        cmdline.push_str(append.trim());
    }
    cmdline
}

/// An initramfs ready to write, and the kernel to boot it with.
struct Prepared {
    packer: Packer,
    kernel: PathBuf,
}

fn prepare(config: &TesthostConfig) -> Result<Prepared, TesthostError> {
    if pack::which(qemu::QEMU).is_none() {
        return Err(QemuError::Missing(std::io::ErrorKind::NotFound.into()).into());
    }
    let cwd = match &config.cwd {
        Some(cwd) => cwd.clone(),
        None => std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
    };
    let cache = absolute(&image::cache_dir(), &cwd);
    let kernel = TesthostKernel::locate(&cache)?;
    let init = absolute(&image::locate_init().map_err(TesthostError::NoInit)?, &cwd);
    let hearth = match &config.hearth {
        Some(path) => absolute(path, &cwd),
        None => find_hearth()?,
    };
    for path in &config.with {
        if !path.exists() {
            return Err(TesthostError::WithMissing(path.clone()));
        }
    }

    let mut packer = Packer::new(Strip::detect(config.strip))?;
    for dir in [
        "/dev",
        "/proc",
        "/sys",
        "/run",
        "/root",
        "/etc",
        "/testhost",
    ] {
        packer.add_dir(Path::new(dir), 0o755)?;
    }
    packer.add_dir(Path::new("/tmp"), 0o1777)?;
    packer.add_program(&init, &init)?;
    packer.add_symlink(Path::new("/init"), &init)?;
    packer.add_program(&hearth, &hearth)?;
    for (name, host) in [("hearth", &hearth), ("hearth-init", &init)] {
        let link = Path::new("/usr/local/bin").join(name);
        if link != *host {
            packer.add_symlink(&link, host)?;
        }
    }
    kernel.pack(&cache, &mut packer)?;
    if let Some(custom) = std::env::var_os("HEARTH_KERNEL").filter(|k| !k.is_empty()) {
        let custom = absolute(Path::new(&custom), &cwd);
        if custom.is_file() {
            packer.add_plain(&custom, &custom)?;
        }
    }

    warn_if_hidden("the kernel cache (HEARTH_CACHE_DIR)", &cache);
    warn_if_hidden("the working folder", &cwd);
    warn_if_hidden("hearth-init", &init);
    warn_if_hidden("the hearth binary", &hearth);
    let mut extra_path = Vec::new();
    for with in &config.with {
        let absolute = absolute(with, &cwd);
        warn_if_hidden("--with", &absolute);
        packer.add_program(&absolute, with)?;
        if let Some(dir) = absolute.parent().filter(|_| absolute.is_file()) {
            extra_path.push(dir.to_path_buf());
        }
    }
    match resolve_program(&config.argv[0], &cwd, &config.with) {
        Program::Host(program) => {
            packer.add_program(&program, &program)?;
            if let Some(dir) = program.parent() {
                extra_path.push(dir.to_path_buf());
            }
        }
        Program::Packed => {}
        Program::NotFound => {
            tracing::warn!(
                "testhost: `{}` is neither on this host's PATH nor a --with file",
                config.argv[0]
            );
        }
    }
    if !packer.contains(&cwd) {
        packer.add_dir(&cwd, 0o755)?;
    }

    let spec = Spec::new(
        config,
        &cwd,
        &cache,
        &init,
        &guest_path(&extra_path),
        kernel.module_paths.clone(),
    );
    packer.add_bytes(Path::new(SPEC_PATH), spec.to_json(), 0o644)?;
    Ok(Prepared {
        packer,
        kernel: kernel.vmlinuz,
    })
}

/// Warns when `path` lies where the init mounts a fresh file system inside, hiding what was packed.
fn warn_if_hidden(what: &str, path: &Path) {
    if let Some(dir) = HIDDEN_INSIDE.iter().find(|dir| path.starts_with(dir)) {
        tracing::warn!(
            "testhost: {what} {} is under {dir}, where the init mounts a fresh file system inside the test host: \
             it will not be there; use another folder (e.g. under the cargo target folder)",
            path.display()
        );
    }
}

/// `PATH` inside: [`GUEST_PATH`] and then the extra folders not in it yet.
fn guest_path(extra: &[PathBuf]) -> String {
    let mut path = GUEST_PATH.to_owned();
    for dir in extra {
        let dir = dir.display().to_string();
        if !path.split(':').any(|d| d == dir) {
            path.push(':');
            path.push_str(&dir);
        }
    }
    path
}

fn absolute(path: &Path, cwd: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        cwd.join(path)
    }
}

/// What the command's `argv[0]` is.
#[derive(Debug, PartialEq, Eq)]
enum Program {
    /// A host file to pack (and whose folder goes on `PATH` inside).
    Host(PathBuf),
    /// `hearth`, `hearth-init` or a `--with` file's name: packed already.
    Packed,
    /// Nothing on the host: the init will say so and exit 127.
    NotFound,
}

/// Finds `argv[0]`: a path as given (relative to `cwd`), a name of a `--with` file, `hearth` or
/// `hearth-init`, else the first match on the host's `PATH`.
fn resolve_program(argv0: &str, cwd: &Path, with_files: &[PathBuf]) -> Program {
    if argv0.contains('/') {
        let path = absolute(Path::new(argv0), cwd);
        return if path.is_file() {
            Program::Host(path)
        } else {
            Program::NotFound
        };
    }
    if argv0 == "hearth" || argv0 == "hearth-init" {
        return Program::Packed;
    }
    if with_files
        .iter()
        .any(|file| file.file_name().is_some_and(|n| n == argv0) && file.is_file())
    {
        return Program::Packed;
    }
    pack::which(argv0).map_or(Program::NotFound, Program::Host)
}

/// The `hearth` binary: the running executable when it is `hearth`, else `hearth` next to it (or
/// next to its `deps` or `examples` folder, for test and example binaries).
pub fn find_hearth() -> Result<PathBuf, TesthostError> {
    let exe = std::env::current_exe().map_err(|_| TesthostError::NoHearth { tried: Vec::new() })?;
    if exe.file_name().is_some_and(|n| n == "hearth") {
        return Ok(exe);
    }
    let mut tried = Vec::new();
    let mut dir = exe.parent();
    while let Some(d) = dir {
        tried.push(d.join("hearth"));
        if d.file_name().is_none_or(|n| n != "deps" && n != "examples") {
            break;
        }
        dir = d.parent();
    }
    match tried.iter().find(|p| p.is_file()) {
        Some(found) => Ok(found.clone()),
        None => Err(TesthostError::NoHearth { tried }),
    }
}

/// The cached Debian kernel the test host boots, and the modules it packs.
struct TesthostKernel {
    /// `<cache>/kernel/<version>`.
    root: PathBuf,
    vmlinuz: PathBuf,
    /// The extracted ELF kernel, when `hearth image` made it.
    vmlinux: Option<PathBuf>,
    modules_dir: PathBuf,
    /// The modules the test host loads, in order (host paths, the same inside).
    module_paths: Vec<PathBuf>,
    /// The guest's modules, packed for the microVMs the command boots.
    guest_modules: Vec<PathBuf>,
}

impl TesthostKernel {
    /// The kernel recorded in the cache (never `HEARTH_KERNEL`: the test host needs the modules
    /// that match its kernel).
    fn locate(cache: &Path) -> Result<Self, TesthostError> {
        let image = KernelImage::locate_in(cache).map_err(TesthostError::NoKernel)?;
        let root = cache.join("kernel").join(&image.version);
        let record_path = root.join("kernel.json");
        let text = std::fs::read_to_string(&record_path).map_err(|source| {
            TesthostError::KernelRecord {
                path: record_path.clone(),
                source: Box::new(source),
            }
        })?;
        let record: KernelRecord =
            serde_json::from_str(&text).map_err(|source| TesthostError::KernelRecord {
                path: record_path.clone(),
                source: Box::new(source),
            })?;
        let vmlinuz = root.join(&record.vmlinuz);
        let modules_dir = root.join(&record.modules_dir);
        let index =
            image::modules::ModuleIndex::scan(&modules_dir).map_err(TesthostError::Modules)?;
        let module_paths = index
            .resolve(&TESTHOST_MODULES)
            .map_err(TesthostError::Modules)?;
        let guest_modules = index
            .resolve(&GUEST_MODULES)
            .map_err(TesthostError::Modules)?;
        Ok(Self {
            root,
            vmlinuz,
            vmlinux: image.vmlinux.clone(),
            modules_dir,
            module_paths,
            guest_modules,
        })
    }

    /// Packs the kernel tree at its path: the record, the kernel, the modules' index files and the
    /// modules the test host and the guest load; not the other modules, docs or `System.map`.
    fn pack(&self, cache: &Path, packer: &mut Packer) -> Result<(), TesthostError> {
        let current = cache.join("kernel").join("current");
        if current.is_file() {
            packer.add_plain(&current, &current)?;
        }
        for entry in [self.root.join("kernel.json"), self.vmlinuz.clone()] {
            packer.add_plain(&entry, &entry)?;
        }
        // The ELF kernel the microVMs inside boot (extracted by `hearth image`).
        if let Some(vmlinux) = &self.vmlinux {
            packer.add_plain(vmlinux, vmlinux)?;
        }
        for module in self.module_paths.iter().chain(&self.guest_modules) {
            packer.add_plain(module, module)?;
        }
        for name in [
            "modules.builtin",
            "modules.builtin.modinfo",
            "modules.order",
        ] {
            let file = self.modules_dir.join(name);
            if file.is_file() {
                packer.add_plain(&file, &file)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TesthostArgs,
    }

    #[test]
    fn arguments_parse_with_defaults() {
        let cli = Cli::try_parse_from([
            "t", "--with", "/a", "--with", "b", "--", "sh", "-c", "exit 7",
        ])
        .expect("parse");
        let config = TesthostConfig::from_args(cli.args).expect("config");
        assert_eq!(config.argv, ["sh", "-c", "exit 7"]);
        assert_eq!(config.with, [PathBuf::from("/a"), PathBuf::from("b")]);
        assert_eq!(config.memory_mib, 3072);
        assert_eq!(config.cpus, DEFAULT_CPUS);
        assert_eq!(config.timeout, Some(Duration::from_secs(1800)));
        assert!(config.strip);
    }

    #[test]
    fn a_command_is_required() {
        assert!(Cli::try_parse_from(["t", "--with", "/a"]).is_err());
    }

    #[test]
    fn bad_values_are_all_reported() {
        let cli = Cli::try_parse_from([
            "t", "--memory", "64", "--cpus", "0", "--env", "NOPE", "--", "true",
        ])
        .expect("parse");
        let err = TesthostConfig::from_args(cli.args)
            .expect_err("bad values")
            .to_string();
        assert!(
            err.contains("--memory 64") && err.contains("--cpus 0") && err.contains("NOPE"),
            "{err}"
        );
    }

    #[test]
    fn timeout_zero_means_none() {
        let cli = Cli::try_parse_from(["t", "--timeout", "0", "--env", "A=b=c", "--", "true"])
            .expect("parse");
        let config = TesthostConfig::from_args(cli.args).expect("config");
        assert_eq!(config.timeout, None);
        assert_eq!(config.env, [("A".to_owned(), "b=c".to_owned())]);
    }

    #[test]
    fn guest_path_adds_folders_once() {
        let path = guest_path(&[
            "/usr/bin".into(),
            "/work/target/debug".into(),
            "/work/target/debug".into(),
        ]);
        assert_eq!(path, format!("{GUEST_PATH}:/work/target/debug"));
    }

    #[test]
    fn programs_resolve_on_path_or_as_given() {
        let cwd = Path::new("/");
        assert_eq!(
            resolve_program("sh", cwd, &[]),
            Program::Host(pack::which("sh").expect("sh on PATH"))
        );
        assert_eq!(
            resolve_program("/bin/sh", cwd, &[]),
            Program::Host("/bin/sh".into())
        );
        assert_eq!(
            resolve_program("bin/sh", cwd, &[]),
            Program::Host("/bin/sh".into())
        );
        assert_eq!(
            resolve_program("sh", cwd, &["/bin/sh".into()]),
            Program::Packed
        );
        assert_eq!(resolve_program("hearth", cwd, &[]), Program::Packed);
        assert_eq!(
            resolve_program("no-such-program-here", cwd, &[]),
            Program::NotFound
        );
        assert_eq!(
            resolve_program("./no-such-program-here", cwd, &[]),
            Program::NotFound
        );
    }

    #[test]
    fn the_kernel_command_line_names_the_role() {
        assert!(kernel_cmdline(false, "").contains("hearth.role=testhost"));
        assert!(kernel_cmdline(false, "").contains("console=ttyS0"));
        assert!(kernel_cmdline(false, "").contains("quiet"));
        assert!(!kernel_cmdline(true, "").contains("quiet"));
        assert!(kernel_cmdline(false, " lpj=1 ").ends_with(" quiet lpj=1"));
    }
}
