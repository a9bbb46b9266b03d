//! Running VM integration tests where hardware KVM is: directly on such a host, otherwise inside
//! the QEMU test host (`hearth testhost`), which re-runs the same test binary and test there.

use crate::kvm::{KvmKind, detect_kind};
use std::path::PathBuf;
use std::process::Command;

/// The `hearth` binary: `$HEARTH_BINARY` if set, else the one next to the running test's target
/// directory, else one on `PATH`.
pub fn hearth_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("HEARTH_BINARY") {
        return PathBuf::from(p);
    }
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => panic!("cannot find the running test binary: {e}"),
    };
    // <target>/<profile>/deps/<test>-<hash>  ->  <target>/<profile>/hearth
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join("hearth"))
        .collect();
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return found.clone();
    }
    if let Ok(p) = which_in_path("hearth") {
        return p;
    }
    panic!(
        "the `hearth` binary is not built (looked at {candidates:?}): run `cargo build --bins` first"
    );
}

fn which_in_path(name: &str) -> Result<PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

/// Runs `body` where hardware KVM is. With hardware `/dev/kvm`, runs it here. Inside the test host
/// without it, panics. Otherwise runs this very test (`test_name`, as libtest names it) inside
/// `hearth testhost` and asserts it passed there.
pub fn in_kvm(test_name: &str, body: impl FnOnce()) {
    in_kvm_with(test_name, &[], body)
}

/// [`in_kvm`], with `with` (absolute paths) also packed into the test host at the same paths.
pub fn in_kvm_with(test_name: &str, with: &[&std::path::Path], body: impl FnOnce()) {
    in_kvm_appending(test_name, with, "", body)
}

/// [`in_kvm_with`], the test host's kernel booted with `append` added to its command line (for
/// example `hugepages=N`); on hardware KVM `body` runs here as the host is.
pub fn in_kvm_appending(
    test_name: &str,
    with: &[&std::path::Path],
    append: &str,
    body: impl FnOnce(),
) {
    let kind = detect_kind();
    if let KvmKind::Hardware(_) = kind {
        body();
        return;
    }
    if std::env::var_os("HEARTH_IN_TESTHOST").is_some() {
        panic!("inside the test host, /dev/kvm must be hardware KVM, but it is {kind}");
    }
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => panic!("cannot find the running test binary: {e}"),
    };
    let hearth = hearth_binary();
    eprintln!("[in_kvm] /dev/kvm here is {kind}; running {test_name} inside `hearth testhost`");
    let mut command = Command::new(&hearth);
    command.arg("testhost").arg("--with").arg(&exe);
    // The VMM executable spawned VMMs run, packed at its path so that it is found there too.
    let vmm = crate::process::vmm_program(&hearth);
    if vmm != hearth {
        command.arg("--with").arg(&vmm);
        if std::env::var_os(crate::process::VMM_BINARY_ENV).is_some() {
            let mut env = std::ffi::OsString::from(format!("{}=", crate::process::VMM_BINARY_ENV));
            env.push(vmm.as_os_str());
            command.arg("--env").arg(env);
        }
    }
    if !append.is_empty() {
        command.arg("--append").arg(append);
    }
    let status = command
        .args(
            with.iter()
                .flat_map(|p| [std::ffi::OsStr::new("--with"), p.as_os_str()]),
        )
        .arg("--")
        .arg(&exe)
        .args(["--exact", test_name, "--nocapture", "--test-threads", "1"])
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{test_name} failed inside the test host ({s})"),
        Err(e) => panic!("cannot run {} testhost: {e}", hearth.display()),
    }
}
