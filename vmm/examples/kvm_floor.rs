//! `kvm_floor`: the least a VMM process can do before its guest's first instruction, as a floor
//! for the VMM's own share of a boot (`hearth-perf boot --floor PATH` times it).
//!
//! It opens `/dev/kvm`, creates a VM with one 128 MiB memory slot (fresh anonymous memory, as the
//! VMM maps it), one vCPU in real mode at 0x1000 with only CS and RIP set, and runs it: the guest's
//! first instruction is `hlt`, so the first exit is `KVM_EXIT_HLT`.
//!
//! Protocol on stdout (a pipe from the parent): one byte `e` as `main` starts (the exec is done),
//! then after the first exit one line `x MAIN OPEN VM MEM VCPU RUN\n`: `MAIN` is `CLOCK_MONOTONIC`
//! at `main` in nanoseconds (so that the parent can time the exec on its own clock without waiting
//! to be scheduled), then the microseconds from `main` at which each step ended (`/dev/kvm` open,
//! VM created, memory slot set, vCPU set up, first exit back). Build it static like `hearth-vmm`:
//! `RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" cargo build --release
//! -p hearth-vmm --example kvm_floor --target x86_64-unknown-linux-gnu`.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

/// Guest memory, as a booted Hearth VM of the benchmark has.
const MEM_BYTES: usize = 128 << 20;
/// Where the guest's code starts.
const CODE_ADDR: u64 = 0x1000;

/// `CLOCK_MONOTONIC` in nanoseconds.
fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

fn main() -> ExitCode {
    let main_ns = monotonic_ns();
    let started = Instant::now();
    let mut out = std::io::stdout().lock();
    if out.write_all(b"e").and_then(|()| out.flush()).is_err() {
        return ExitCode::from(2);
    }
    match run(started) {
        Ok(marks) => {
            let line = format!("x {main_ns} {}\n", marks.map(|m| m.to_string()).join(" "));
            if out
                .write_all(line.as_bytes())
                .and_then(|()| out.flush())
                .is_err()
            {
                return ExitCode::from(2);
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("kvm_floor: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Sets up and runs the guest to its first exit; returns the step marks in microseconds.
fn run(started: Instant) -> Result<[u128; 5], String> {
    let us = || started.elapsed().as_micros();
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let open = us();
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let created = us();
    // SAFETY: a new private anonymous mapping; no existing memory is affected.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if host == libc::MAP_FAILED {
        return Err(format!(
            "cannot map guest memory: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: CODE_ADDR is inside the MEM_BYTES-long writable mapping made above.
    unsafe { host.cast::<u8>().add(CODE_ADDR as usize).write(0xf4) }; // hlt
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_BYTES as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: the region is the mapping above, which lives (never unmapped) until the process
    // exits, so the guest never sees freed memory.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let mem = us();
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    regs.rip = CODE_ADDR;
    regs.rflags = 2;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    let vcpu_ready = us();
    match vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
        VcpuExit::Hlt => {}
        other => return Err(format!("the first exit was {other:?}, not HLT")),
    }
    Ok([open, created, mem, vcpu_ready, us()])
}
