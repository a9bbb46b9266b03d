//! `hearth-vmm`: the VMM alone, as a small executable: exactly `hearth vmm` (the same flags, the
//! same `hearth_vmm::cli` entry), without the rest of Hearth linked in. Spawned VMMs run it where
//! it is built (see `hearth_vmm::process::vmm_program`); built static and non-PIE by the set-up
//! (`.ci/setup`), it maps less and dirties no relocations at start.
//!
//! `hearth-vmm [vmm] FLAGS`: a leading `vmm` is accepted, so the command lines of `hearth vmm` and
//! of the jail (which appends `vmm`) run unchanged.
#![forbid(unsafe_code)]

use clap::Parser;
use std::process::ExitCode;
use std::str::FromStr;

#[derive(Parser)]
#[command(
    name = "hearth-vmm",
    version,
    about = "Run one Hearth microVM in this process (`hearth vmm`)"
)]
struct Cli {
    #[command(flatten)]
    args: hearth_vmm::cli::VmmArgs,
}

fn main() -> ExitCode {
    // `HEARTH_LOG` as `hearth` reads it (a level, or `target=level` directives); a filter it
    // cannot parse falls back to `info`.
    let filter = std::env::var("HEARTH_LOG")
        .ok()
        .and_then(|s| tracing_subscriber::filter::Targets::from_str(&s).ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new()
                .with_default(tracing_subscriber::filter::LevelFilter::INFO)
        });
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "vmm") {
        argv.remove(1);
    }
    let cli = Cli::parse_from(argv);
    match hearth_vmm::cli::run(cli.args) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("hearth-vmm: error: {err:#}");
            ExitCode::from(1)
        }
    }
}
