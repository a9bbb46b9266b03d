//! Seccomp filters for the sandbox, built with rust-vmm's `seccompiler`.
//!
//! Two profiles, stacked: the container's init gets [`Profile::Init`] (no kernel modules, kexec,
//! BPF, perf, keyrings, io_uring, clock changes, ptrace...); the function's processes add
//! [`Profile::Function`] on top (no mounts, no new namespaces, no `setns`), installed by the
//! `function-exec` helper just before it executes the runtime. `clone3` fails with ENOSYS (its
//! flags live in memory a filter cannot read), so libc falls back to `clone`, whose namespace flags
//! the function profile refuses.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Which filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// For the init of a container sandbox.
    Init,
    /// For a function's processes (added on top of `Init` in a container).
    Function,
}

/// A filter that could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter: {0}")]
    Build(String),
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
    #[error("cannot install the seccomp filter: {0}")]
    Install(String),
}

/// Reach the kernel's global or fragile parts; no function or init needs them.
const ALWAYS_DENIED: &[libc::c_long] = &[
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_reboot,
    libc::SYS_syslog,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    // io_uring operations would bypass per-call filtering.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

/// Also denied to the function: changing mounts and namespaces.
const FUNCTION_DENIED: &[libc::c_long] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_chroot,
];

const NAMESPACE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
];

fn build_err(e: impl std::fmt::Display) -> SeccompError {
    SeccompError::Build(e.to_string())
}

/// The two BPF programs of a profile: the EPERM list, and `clone3` -> ENOSYS.
pub fn programs(profile: Profile) -> Result<[BpfProgram; 2], SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALWAYS_DENIED.iter().map(|&nr| (nr, vec![])).collect();
    if profile == Profile::Function {
        rules.extend(FUNCTION_DENIED.iter().map(|&nr| (nr, vec![])));
        let mut clone_rules = Vec::new();
        for &flag in NAMESPACE_FLAGS {
            let flag = flag as u64;
            let cond = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .map_err(build_err)?;
            clone_rules.push(SeccompRule::new(vec![cond]).map_err(build_err)?);
        }
        rules.insert(libc::SYS_clone, clone_rules);
    }
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(build_err)?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(build_err)?;
    Ok([
        deny.try_into().map_err(build_err)?,
        clone3.try_into().map_err(build_err)?,
    ])
}

/// Sets no_new_privs and installs the profile on the calling thread (inherited by its children).
pub fn install(profile: Profile) -> Result<(), SeccompError> {
    let programs = programs(profile)?;
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SeccompError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    for program in &programs {
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_profiles_build() {
        let init = programs(Profile::Init).unwrap();
        let function = programs(Profile::Function).unwrap();
        assert!(function[0].len() > init[0].len());
    }
}
