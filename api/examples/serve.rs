//! Runs the Lambda API alone, as `hearth serve` will: for the Python suite and for trying the API
//! with the AWS CLI before the lead wires the subcommand.
//!
//! `cargo run -p hearth-api --example serve -- --listen 127.0.0.1:9000 --data-dir /tmp/h --credentials creds`

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "hearth-api-serve",
    about = "The Hearth Lambda API (no agent: invokes fail)"
)]
struct Cli {
    #[command(flatten)]
    serve: hearth_api::cli::ServeArgs,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match hearth_api::cli::run(Cli::parse().serve) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(err) => {
            eprintln!("hearth-api: error: {err:#}");
            std::process::ExitCode::from(1)
        }
    }
}
