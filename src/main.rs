//! `hearth`: the one Hearth binary. Each subcommand lives in the crate that owns it; this file only
//! parses the command line and dispatches.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "hearth",
    version,
    about = "Hearth: a serverless worker host (AWS Lambda's API on your own metal)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the AWS Lambda API (control plane and Invoke) on 127.0.0.1:9000.
    Serve(hearth_api::cli::ServeArgs),
    /// Run one function once, like `sam local invoke`: the response on stdout, logs and REPORT on stderr.
    Run(hearth_agent::sandbox::run::RunArgs),
    /// Download, verify and unpack the guest kernel (Debian's cloud kernel) into the cache.
    Image(hearth_guest::image::cli::ImageArgs),
    /// Run one microVM in this process (normally started by the agent, not by hand).
    Vmm(hearth_vmm::cli::VmmArgs),
    /// Run `hearth vmm` jailed (as root): namespaces, pivot_root, cgroup, rlimits, unprivileged ids.
    Jail(hearth_agent::jail::JailArgs),
    /// Run a command inside the QEMU test host, which gives machines without hardware KVM a real KVM.
    Testhost(hearth_perf::testhost::TesthostArgs),
    /// Tell what this host offers Hearth: the kind of /dev/kvm, the kernel cache, the tools.
    Doctor,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => hearth_api::cli::run(args),
        Command::Run(args) => hearth_agent::sandbox::run::run(args),
        Command::Image(args) => hearth_guest::image::cli::run(args),
        Command::Vmm(args) => hearth_vmm::cli::run(args),
        Command::Jail(args) => hearth_agent::jail::run(args),
        Command::Testhost(args) => hearth_perf::testhost::run(args),
        Command::Doctor => doctor(),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("hearth: error: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn doctor() -> anyhow::Result<u8> {
    let kind = hearth_vmm::kvm::detect_kind();
    println!("kvm: {kind}");
    let cache = hearth_guest::image::cache_dir();
    println!("cache: {}", cache.display());
    match hearth_guest::image::KernelImage::locate() {
        Ok(image) => println!(
            "kernel: {} ({}, sha256 {})",
            image.vmlinuz.display(),
            image.version,
            image.sha256
        ),
        Err(err) => println!("kernel: missing ({err}); run `hearth image`"),
    }
    Ok(0)
}
