//! `hearth-init`: PID 1 inside a Hearth sandbox (see `hearth_guest::init`).
//!
//! Built static: `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p hearth-guest
//! --bin hearth-init --target x86_64-unknown-linux-gnu`.

fn main() {
    // The runtime's helper roles (`container-launch`, `container-init`, `function-exec`) first.
    if let Some(code) = hearth_guest::runtime::main_if_runtime_role() {
        std::process::exit(code);
    }
    hearth_guest::init::main()
}
