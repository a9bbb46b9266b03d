//! Per-thread seccomp filters, compiled from `seccomp/filters.json` at build time. Each thread
//! installs its own before it runs guest-influenced code; a syscall outside its list kills the
//! process (SIGSYS).

use seccompiler::{BpfProgram, sock_filter};

/// A kind of thread with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The VMM event-loop thread.
    Vmm,
    /// A vCPU thread.
    Vcpu,
}

/// A filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The embedded program is malformed (a build problem).
    #[error("the embedded {0} seccomp program is malformed")]
    Malformed(&'static str),
    /// The kernel refused the filter.
    #[error("cannot install the {0} seccomp filter")]
    Install(&'static str, #[source] seccompiler::Error),
}

const VCPU_BPF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_vcpu.bpf"));
const VMM_BPF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_vmm.bpf"));
const CLONE3_BPF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_clone3.bpf"));

fn decode(name: &'static str, bytes: &[u8]) -> Result<BpfProgram, SeccompError> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(8) {
        return Err(SeccompError::Malformed(name));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| sock_filter {
            code: u16::from_le_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

/// The program for `kind`.
pub fn program(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    match kind {
        ThreadKind::Vmm => decode("vmm", VMM_BPF),
        ThreadKind::Vcpu => decode("vcpu", VCPU_BPF),
    }
}

/// Installs the filters for `kind` on the calling thread (and threads it later spawns).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let name = match kind {
        ThreadKind::Vmm => "vmm",
        ThreadKind::Vcpu => "vcpu",
    };
    let clone3 = decode("clone3", CLONE3_BPF)?;
    let list = program(kind)?;
    seccompiler::apply_filter(&clone3).map_err(|e| SeccompError::Install("clone3", e))?;
    seccompiler::apply_filter(&list).map_err(|e| SeccompError::Install(name, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_programs_decode() {
        assert!(program(ThreadKind::Vmm).unwrap().len() > 10);
        assert!(program(ThreadKind::Vcpu).unwrap().len() > 10);
        assert!(decode("clone3", CLONE3_BPF).is_ok());
    }

    #[test]
    fn a_filtered_thread_keeps_its_allowed_syscalls_and_gets_enosys_for_clone3() {
        let t = std::thread::spawn(|| {
            install(ThreadKind::Vcpu).unwrap();
            // SAFETY: clone3 with a null argument only reports an error; the filter answers first.
            let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
            (r, std::io::Error::last_os_error().raw_os_error())
        });
        let (r, errno) = t.join().unwrap();
        assert_eq!((r, errno), (-1, Some(libc::ENOSYS)));
    }
}
