//! Per-thread seccomp filters, compiled from `seccomp/filters.json` at build time. Each thread
//! installs its own before it runs guest-influenced code; a syscall outside its list kills the
//! process with SIGSYS (the filters trap, and [`install_reporter`] prints the call's number
//! first).

use seccompiler::{BpfProgram, sock_filter};

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` on x86_64 (after signo, errno, code, padding
/// and the 8-byte `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn report_forbidden_syscall(
    _: libc::c_int,
    info: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    // SAFETY: the kernel hands a valid SIGSYS siginfo; the field read lies inside it.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    const PREFIX: &[u8] = b"hearth vmm: seccomp: forbidden system call ";
    let mut msg = [0u8; 64];
    msg[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 10];
    let (mut n, mut count) = (nr.unsigned_abs(), 0);
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 || count == digits.len() {
            break;
        }
    }
    let mut len = PREFIX.len();
    for d in digits[..count].iter().rev() {
        msg[len] = *d;
        len += 1;
    }
    msg[len] = b'\n';
    len += 1;
    // SAFETY: write(2) of a local buffer to stderr; async-signal-safe and on every allow-list.
    unsafe { libc::write(2, msg.as_ptr().cast(), len) };
    // Any further forbidden call while SIGSYS is blocked (it is, inside this handler) makes the
    // kernel kill the process with SIGSYS: getppid is on no list.
    // SAFETY: a system call without arguments.
    unsafe { libc::syscall(libc::SYS_getppid) };
    // Not reached under a filter; without one, end the process the same way.
    // SAFETY: resetting SIGSYS and re-raising it ends the process as the filter would have.
    unsafe {
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::raise(libc::SIGSYS);
    }
}

/// Makes a forbidden system call print its number on stderr before the process dies of SIGSYS
/// (the filters trap rather than kill outright so that the death can be explained).
pub fn install_reporter() -> Result<(), SeccompError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, report_forbidden_syscall)
        .map_err(|e| SeccompError::Reporter(std::io::Error::from_raw_os_error(e.errno())))
}

/// A kind of thread with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The VMM event-loop thread.
    Vmm,
    /// A vCPU thread.
    Vcpu,
    /// The userfaultfd handler thread of a `--restore-mode uffd` VM.
    Uffd,
}

/// A filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The embedded program is malformed (a build problem).
    #[error("the embedded {0} seccomp program is malformed")]
    Malformed(&'static str),
    /// The SIGSYS reporter could not be installed.
    #[error("cannot install the SIGSYS reporter")]
    Reporter(#[source] std::io::Error),
    /// The kernel refused the filter.
    #[error("cannot install the {0} seccomp filter")]
    Install(&'static str, #[source] seccompiler::Error),
}

const VCPU_BPF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_vcpu.bpf"));
const VMM_BPF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_vmm.bpf"));
const UFFD_BPF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_uffd.bpf"));
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
        ThreadKind::Uffd => decode("uffd", UFFD_BPF),
    }
}

/// Installs the filters for `kind` on the calling thread (and threads it later spawns).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let name = match kind {
        ThreadKind::Vmm => "vmm",
        ThreadKind::Vcpu => "vcpu",
        ThreadKind::Uffd => "uffd",
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
    fn snapshot_ioctl_numbers_match_the_kvm_structs() {
        use kvm_bindings::*;
        use std::mem::size_of;
        let ioc =
            |dir: u64, nr: u64, size: usize| (dir << 30) | ((size as u64) << 16) | (0xae << 8) | nr;
        let (r, rw) = (2, 3);
        let json = include_str!("../seccomp/filters.json");
        for (name, value) in [
            ("KVM_GET_REGS", ioc(r, 0x81, size_of::<kvm_regs>())),
            ("KVM_GET_SREGS", ioc(r, 0x83, size_of::<kvm_sregs>())),
            ("KVM_GET_MSRS", ioc(rw, 0x88, size_of::<kvm_msrs>())),
            ("KVM_GET_LAPIC", ioc(r, 0x8e, size_of::<kvm_lapic_state>())),
            ("KVM_GET_MP_STATE", ioc(r, 0x98, size_of::<kvm_mp_state>())),
            (
                "KVM_GET_VCPU_EVENTS",
                ioc(r, 0x9f, size_of::<kvm_vcpu_events>()),
            ),
            (
                "KVM_GET_DEBUGREGS",
                ioc(r, 0xa1, size_of::<kvm_debugregs>()),
            ),
            ("KVM_GET_XSAVE", ioc(r, 0xa4, size_of::<kvm_xsave>())),
            ("KVM_GET_XCRS", ioc(r, 0xa6, size_of::<kvm_xcrs>())),
            ("KVM_GET_TSC_KHZ", ioc(0, 0xa3, 0)),
            (
                "KVM_GET_DEVICE_ATTR",
                ioc(1, 0xe2, size_of::<kvm_device_attr>()),
            ),
            ("KVM_GET_IRQCHIP", ioc(rw, 0x62, size_of::<kvm_irqchip>())),
            ("KVM_GET_PIT2", ioc(r, 0x9f, size_of::<kvm_pit_state2>())),
            ("KVM_GET_CLOCK", ioc(r, 0x7c, size_of::<kvm_clock_data>())),
        ] {
            let rule = format!("\"val\": {value}, \"comment\": \"{name} = {value:#x}\"");
            assert!(json.contains(&rule), "filters.json lacks {rule}");
        }
    }

    #[test]
    fn embedded_programs_decode() {
        assert!(program(ThreadKind::Vmm).unwrap().len() > 10);
        assert!(program(ThreadKind::Vcpu).unwrap().len() > 10);
        assert!(program(ThreadKind::Uffd).unwrap().len() > 10);
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
