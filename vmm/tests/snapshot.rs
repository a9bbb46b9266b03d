//! Snapshot and restore of a booted guest (through the test host where this machine has no
//! hardware KVM): boot, wait for the init's Ready, pause, snapshot, kill; restore in a new
//! `hearth vmm` process, where the init re-announces Ready after the vsock transport reset and
//! answers a ping; then corrupted, truncated and mismatched snapshot files are refused with a clear
//! error before any guest runs.

mod common;

use common::*;
use hearth_guest::protocol::client::ControlClient;
use hearth_vmm::kvm_test::{hearth_binary, in_kvm};
use hearth_vmm::{RestoreMode, SnapshotFiles, VmConfig, VmState, VmmProcess};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// How many restores of the one snapshot the test times.
const RESTORES: usize = 3;
/// The guest kernel zeroes pages it frees (the unpacked initramfs image, boot-time buffers), so
/// they stay holes in the memory file instead of being written as stale data.
const TEMPLATE_CMDLINE: &str = "init_on_free=1";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Restoring `files` with `config` must fail before the guest runs, with `needle` in the error.
fn refused(config: &VmConfig, files: &SnapshotFiles, needle: &str) {
    match VmmProcess::spawn_restored(&hearth_binary(), config, files) {
        Ok(vmm) => {
            let status = vmm.status();
            panic!(
                "a bad snapshot ({needle}) was restored: {status:?}\n{}",
                vmm.stderr_tail()
            )
        }
        Err(e) => {
            let text = format!("{e}");
            assert!(text.contains(needle), "expected `{needle}` in: {text}");
            eprintln!("refused as expected: {}", text.lines().last().unwrap_or(""));
        }
    }
}

fn copy_files(from: &SnapshotFiles, dir: &VmDir, tag: &str) -> SnapshotFiles {
    let to = SnapshotFiles {
        state: dir.path(&format!("{tag}.state")),
        mem: dir.path(&format!("{tag}.mem")),
    };
    std::fs::copy(&from.state, &to.state).expect("copy the state file");
    std::fs::copy(&from.mem, &to.mem).expect("copy the memory file");
    to
}

fn flip_byte(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read");
    f.write_all_at(&[b[0] ^ 0x5a], at).expect("write");
}

/// The first offset of a non-zero byte in the memory file (a page the guest wrote).
fn first_data_offset(path: &Path) -> u64 {
    let bytes = std::fs::read(path).expect("read the memory file");
    bytes
        .iter()
        .position(|&b| b != 0)
        .expect("guest RAM has data") as u64
}

/// Boots the template guest of `config` and waits for its Ready: the VMM, the Ready connection
/// (kept open while the guest runs) and what the guest said.
fn boot_template(
    dir: &VmDir,
    config: &VmConfig,
    listener: &std::os::unix::net::UnixListener,
) -> (
    VmmProcess,
    std::os::unix::net::UnixStream,
    hearth_guest::protocol::Ready,
) {
    let mut vmm = VmmProcess::spawn(&hearth_binary(), config).expect("spawn hearth vmm");
    {
        let r = vmm.start();
        ok(&mut vmm, "start", r);
    }
    match wait_ready(listener, &mut vmm, READY_TIMEOUT) {
        Ok((conn, ready)) => (vmm, conn, ready),
        Err(e) => panic!(
            "{e}\nVMM stderr:\n{}\nserial:\n{}",
            vmm.stderr_tail(),
            serial_tail(dir)
        ),
    }
}

#[test]
fn snapshot_restore_and_bad_snapshot_files() {
    in_kvm("snapshot_restore_and_bad_snapshot_files", || {
        let dir = VmDir::new();
        let initrd = guest_initrd(&dir);
        let listener = ready_listener(&dir);
        let config = config(&dir, &initrd, 128, 1, TEMPLATE_CMDLINE);
        let (mut vmm, ready_conn, ready) = boot_template(&dir, &config, &listener);
        eprintln!("booted: ready at {} ms kernel time", ready.ready_ms);
        let mut client = ControlClient::connect_uds(&dir.uds()).expect("control port");
        assert_eq!(client.ping(b"before".to_vec()).expect("ping"), b"before");

        // Snapshot creation needs a paused VM.
        let files = SnapshotFiles {
            state: dir.path("vm.state"),
            mem: dir.path("vm.mem"),
        };
        match vmm.snapshot(&files) {
            Err(hearth_vmm::ProcessError::Refused(_, m)) => assert!(m.contains("paused"), "{m}"),
            other => panic!("a running VM was snapshotted: {other:?}"),
        }
        assert_eq!(
            {
                let r = vmm.pause();
                ok(&mut vmm, "pause", r)
            },
            VmState::Paused
        );
        let t = Instant::now();
        let r = vmm.snapshot(&files);
        let snapshot_ms = ms(t.elapsed());
        assert_eq!(ok(&mut vmm, "snapshot", r), VmState::Paused);
        let state_len = std::fs::metadata(&files.state).expect("state file").len();
        let mem_meta = std::fs::metadata(&files.mem).expect("memory file");
        eprintln!(
            "snapshot: {snapshot_ms:.1} ms; state file {state_len} bytes; memory file {} bytes, {} allocated",
            mem_meta.len(),
            mem_meta.blocks() * 512
        );
        assert_eq!(mem_meta.len(), 128 << 20);
        assert!(
            mem_meta.blocks() * 512 < mem_meta.len(),
            "the memory file is not sparse"
        );
        eprintln!("VMM log:\n{}", vmm.stderr_tail());
        drop(client);
        drop(ready_conn);
        drop(vmm);

        // Restore the one snapshot several times, each in a fresh process.
        for run in 0..RESTORES {
            let t = Instant::now();
            let mut restored = match VmmProcess::spawn_restored(&hearth_binary(), &config, &files) {
                Ok(v) => v,
                Err(e) => panic!("restore: {e}"),
            };
            let spawned = t.elapsed();
            {
                let r = restored.start();
                ok(&mut restored, "start the restored VM", r);
            }
            let (_ready_conn, again) = match wait_ready(&listener, &mut restored, READY_TIMEOUT) {
                Ok(r) => r,
                Err(e) => panic!(
                    "{e}\nVMM stderr:\n{}\nserial:\n{}",
                    restored.stderr_tail(),
                    serial_tail(&dir)
                ),
            };
            let to_ready = t.elapsed();
            let mut client =
                ControlClient::connect_uds(&dir.uds()).expect("control port after restore");
            let payload: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
            assert_eq!(client.ping(payload.clone()).expect("ping"), payload);
            let to_ping = t.elapsed();
            assert_eq!(again.init_start_ms, ready.init_start_ms, "the same init");
            let status = client.status().expect("status");
            assert_eq!(status.cpus_online, 1);
            eprintln!(
                "restore {run}: process ready {:.1} ms, guest Ready {:.1} ms, ping answered {:.1} ms",
                ms(spawned),
                ms(to_ready),
                ms(to_ping)
            );
            let mem = restored.memory_usage().expect("memory usage");
            eprintln!(
                "restore {run}: RSS {} KiB (guest RAM {} KiB, the VMM's own {} KiB), PSS {} KiB",
                mem.rss_kib,
                mem.guest_rss_kib,
                mem.own_rss_kib(),
                mem.pss_kib
            );
            assert!(mem.guest_rss_kib > 0, "{mem:?}");
            if run == 0 {
                eprintln!("restored VMM log:\n{}", restored.stderr_tail());
            }
            drop(client);
            let status = restored.stop().expect("stop");
            assert!(status.success(), "{status}: {}", restored.stderr_tail());
        }

        // Damaged and mismatched snapshots: a clear error, no guest.
        let t = copy_files(&files, &dir, "truncated");
        let len = std::fs::metadata(&t.state).expect("meta").len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&t.state)
            .expect("open")
            .set_len(len / 2)
            .expect("truncate");
        refused(&config, &t, "truncated");

        let c = copy_files(&files, &dir, "corrupted");
        flip_byte(&c.state, len - 10);
        refused(&config, &c, "corrupted");

        let v = copy_files(&files, &dir, "version");
        flip_byte(&v.state, 8);
        refused(&config, &v, "format version");

        let m = copy_files(&files, &dir, "memory");
        flip_byte(&m.mem, first_data_offset(&m.mem));
        refused(&config, &m, "does not match its snapshot");

        let s = copy_files(&files, &dir, "short");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&s.mem)
            .expect("open")
            .set_len((128 << 20) - 4096)
            .expect("truncate");
        refused(&config, &s, "the snapshot's guest RAM is");

        let mut bigger = config.clone();
        bigger.mem_mib = 256;
        refused(&bigger, &files, "does not match the VM configuration");
        let mut two = config.clone();
        two.vcpus = 2;
        refused(&two, &files, "vCPUs");

        // The good snapshot still restores after all that; a restored VM is snapshotted onto the
        // very files it was restored from (mapped while they are replaced), and that restores too.
        let mut second = VmmProcess::spawn_restored(&hearth_binary(), &config, &files)
            .expect("restore the good snapshot");
        {
            let r = second.start();
            ok(&mut second, "start", r);
        }
        let ready_conn = match wait_ready(&listener, &mut second, READY_TIMEOUT) {
            Ok((conn, _)) => conn,
            Err(e) => panic!("{e}\n{}", second.stderr_tail()),
        };
        // The first memory file, still mapped by the restored VM after it is replaced below.
        let first_mem = std::fs::File::open(&files.mem).expect("open the memory file");
        let first_allocated = || first_mem.metadata().expect("stat").blocks() * 512;
        {
            let r = second.pause();
            ok(&mut second, "pause the restored VM", r);
            // The writer must not fault in the pages the restored guest never touched: on tmpfs
            // each hole of the mapped file read through the mapping would be allocated.
            let source_before = first_allocated();
            let r = second.snapshot(&files);
            ok(
                &mut second,
                "snapshot the restored VM onto its own files",
                r,
            );
            let source_after = first_allocated();
            let meta = std::fs::metadata(&files.mem).expect("the second memory file");
            eprintln!(
                "snapshot of the restored VM: memory file {} bytes, {} allocated (the first: {} allocated before the snapshot, {} after)",
                meta.len(),
                meta.blocks() * 512,
                source_before,
                source_after
            );
            assert!(
                meta.blocks() * 512 < meta.len() / 2,
                "the second memory file is not sparse"
            );
            assert!(
                source_after <= source_before + (1 << 20),
                "writing the snapshot faulted in the mapped memory file's holes: {source_before} -> {source_after} bytes allocated"
            );
        }
        drop(ready_conn);
        let status = second.stop().expect("stop");
        assert!(status.success(), "{status}: {}", second.stderr_tail());
        let mut third = VmmProcess::spawn_restored(&hearth_binary(), &config, &files)
            .expect("restore the snapshot of a restored VM");
        {
            let r = third.start();
            ok(&mut third, "start", r);
        }
        let _ready_conn = match wait_ready(&listener, &mut third, READY_TIMEOUT) {
            Ok((conn, _)) => conn,
            Err(e) => panic!("{e}\n{}", third.stderr_tail()),
        };
        let mut client = ControlClient::connect_uds(&dir.uds()).expect("control port");
        assert_eq!(client.ping(b"third".to_vec()).expect("ping"), b"third");
    });
}

/// Clones of one snapshot in the uniqueness test.
const CLONES: usize = 20;
/// The most a clone's wall clock may differ from the host's after its refresh.
const CLOCK_SKEW: Duration = Duration::from_millis(50);

fn realtime_ns() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970");
    d.as_secs() * 1_000_000_000 + u64::from(d.subsec_nanos())
}

fn host_entropy() -> Vec<u8> {
    use std::io::Read;
    let mut bytes = vec![0u8; 64];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    bytes
}

#[test]
fn clones_are_unique_and_current() {
    in_kvm("clones_are_unique_and_current", || {
        let dir = VmDir::new();
        let initrd = guest_initrd(&dir);
        let listener = ready_listener(&dir);
        let config = config(&dir, &initrd, 128, 1, TEMPLATE_CMDLINE);
        let (mut vmm, ready_conn, _) = boot_template(&dir, &config, &listener);
        {
            let r = vmm.pause();
            ok(&mut vmm, "pause", r);
        }
        let files = SnapshotFiles {
            state: dir.path("template.state"),
            mem: dir.path("template.mem"),
        };
        {
            let r = vmm.snapshot(&files);
            ok(&mut vmm, "snapshot", r);
        }
        drop(ready_conn);
        drop(vmm);

        let mut before = std::collections::HashSet::new();
        let mut after = std::collections::HashSet::new();
        let mut worst_skew = 0i64;
        for i in 0..CLONES {
            let t = Instant::now();
            let mut clone = VmmProcess::spawn_restored(&hearth_binary(), &config, &files)
                .unwrap_or_else(|e| panic!("restore clone {i}: {e}"));
            {
                let r = clone.start();
                ok(&mut clone, "start the clone", r);
            }
            // Held while the clone lives: the init announces itself again when it closes.
            let _ready_conn = match wait_ready(&listener, &mut clone, READY_TIMEOUT) {
                Ok((conn, _)) => conn,
                Err(e) => panic!("clone {i}: {e}\n{}", clone.stderr_tail()),
            };
            let mut client = ControlClient::connect_uds(&dir.uds()).expect("control port");
            // For the record: what the clone's generator gives before it is refreshed.
            before.insert(client.random(32).expect("random before the refresh"));
            let left = client
                .refresh(hearth_guest::protocol::Refresh {
                    identity: format!("clone-{i}"),
                    entropy: host_entropy(),
                    realtime_ns: realtime_ns(),
                })
                .expect("refresh");
            let bytes = client.random(32).expect("random");
            assert!(
                after.insert(bytes),
                "clone {i} returned random bytes another clone returned"
            );
            let t0 = realtime_ns();
            let guest = client.clock().expect("clock");
            let t1 = realtime_ns();
            let skew = guest as i64 - ((t0 / 2 + t1 / 2) as i64);
            worst_skew = worst_skew.max(skew.abs());
            assert!(
                skew.unsigned_abs() < CLOCK_SKEW.as_nanos() as u64,
                "clone {i}: the guest clock is {skew} ns off the host's (round trip {} ns)",
                t1 - t0
            );
            eprintln!(
                "clone {i}: ready and refreshed in {:.1} ms; clock offset after the refresh {:.3} ms, now {:.3} ms",
                ms(t.elapsed()),
                left as f64 / 1e6,
                skew as f64 / 1e6
            );
            drop(client);
            let status = clone.stop().expect("stop");
            assert!(status.success(), "{status}: {}", clone.stderr_tail());
        }
        eprintln!(
            "{CLONES} clones: {} distinct random values before the refresh, {} after; worst clock skew {:.3} ms",
            before.len(),
            after.len(),
            worst_skew as f64 / 1e6
        );
    });
}

/// Restores `files` with `mode`, starts it and waits for the init's Ready; returns the process,
/// the Ready connection (held while the VM lives) and the time to Ready and to a ping answered.
fn restore_and_ping(
    config: &VmConfig,
    files: &SnapshotFiles,
    mode: RestoreMode,
    listener: &std::os::unix::net::UnixListener,
    uds: &Path,
    what: &str,
) -> (
    VmmProcess,
    std::os::unix::net::UnixStream,
    Duration,
    Duration,
) {
    // A connection left queued by an earlier VM would pass for this one's Ready (the listener is
    // non-blocking).
    while listener.accept().is_ok() {}
    let t = Instant::now();
    let mut vmm = VmmProcess::spawn_restored_with(&hearth_binary(), config, files, mode)
        .unwrap_or_else(|e| panic!("{what}: restore: {e}"));
    {
        let r = vmm.start();
        ok(&mut vmm, what, r);
    }
    let (conn, _) = match wait_ready(listener, &mut vmm, READY_TIMEOUT) {
        Ok(r) => r,
        Err(e) => panic!("{what}: {e}\nVMM stderr:\n{}", vmm.stderr_tail()),
    };
    let to_ready = t.elapsed();
    // Right after its Ready the restored guest must take a host connection. (It used to refuse
    // one now and then: the guest still held, closed but not yet released, the socket of a
    // connection the snapshot's VMM had open, and the restored VMM gave its first connection
    // the same host port, which matched that dead socket; host ports now start at random.)
    let mut client = ControlClient::connect_uds(uds)
        .unwrap_or_else(|e| panic!("{what}: control port after restore: {e}"));
    let payload: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    assert_eq!(
        client.ping(payload.clone()).expect("ping"),
        payload,
        "{what}"
    );
    (vmm, conn, to_ready, t.elapsed())
}

/// Restores `files` in `mode(None)` (which records a set of `kind`), pings it and stops it;
/// checks that the set names at least `min_pages`; then restores in `mode(Some(set))` (which
/// prefetches it) and pings that. Returns the set's path, the prefetched VM and its connection.
fn record_then_prefetch(
    config: &VmConfig,
    files: &SnapshotFiles,
    (listener, uds): (&std::os::unix::net::UnixListener, &Path),
    kind: hearth_snapshot::SetKind,
    min_pages: u64,
    mode: impl Fn(Option<std::path::PathBuf>) -> RestoreMode,
) -> (
    std::path::PathBuf,
    VmmProcess,
    std::os::unix::net::UnixStream,
) {
    let (mut vmm, conn, ready, ping) =
        restore_and_ping(config, files, mode(None), listener, uds, "recording");
    eprintln!(
        "{kind:?} recording restore: guest Ready {:.1} ms, ping answered {:.1} ms; {:?}",
        ms(ready),
        ms(ping),
        vmm.memory_usage()
    );
    // Stopped before its Ready connection closes: the init would announce itself again.
    let status = vmm.stop().expect("stop");
    assert!(status.success(), "{status}: {}", vmm.stderr_tail());
    drop(conn);
    eprintln!("recording VMM log:\n{}", vmm.stderr_tail());
    // Dropped before the next VMM binds the same control socket path, which the drop removes.
    drop(vmm);
    let set = kind.path_for(&files.mem);
    let len = std::fs::metadata(&set).expect("the recorded set").len();
    // A 40-byte header, 8 bytes a page and an 8-byte checksum.
    assert!(len >= 48 + 8 * min_pages, "{kind:?}: {len} bytes");
    let (vmm, conn, ready, ping) = restore_and_ping(
        config,
        files,
        mode(Some(set.clone())),
        listener,
        uds,
        "prefetched",
    );
    eprintln!(
        "{kind:?} prefetched restore: guest Ready {:.1} ms, ping answered {:.1} ms",
        ms(ready),
        ms(ping)
    );
    (set, vmm, conn)
}

#[test]
fn working_sets_are_recorded_prefetched_and_checked() {
    in_kvm("working_sets_are_recorded_prefetched_and_checked", || {
        let dir = VmDir::new();
        let initrd = guest_initrd(&dir);
        let listener = ready_listener(&dir);
        let config = config(&dir, &initrd, 128, 1, TEMPLATE_CMDLINE);
        let (mut vmm, ready_conn, _) = boot_template(&dir, &config, &listener);
        let files = SnapshotFiles {
            state: dir.path("vm.state"),
            mem: dir.path("vm.mem"),
        };
        {
            let r = vmm.pause();
            ok(&mut vmm, "pause", r);
            let r = vmm.snapshot(&files);
            ok(&mut vmm, "snapshot", r);
        }
        drop(ready_conn);
        drop(vmm);

        // Served on demand, recording the working set; then prefetched. Each fault brings in its
        // whole 2 MiB block: a few tens of faults, a few pages at least.
        let (ws, mut vmm, conn) = record_then_prefetch(
            &config,
            &files,
            (&listener, &dir.uds()),
            hearth_snapshot::SetKind::Served,
            3,
            |prefetch_ws| RestoreMode::Uffd {
                record_ws: prefetch_ws.is_none(),
                prefetch_ws,
            },
        );
        // Then a snapshot of this VM (guest RAM partly never served) restores in the file mode and
        // answers.
        let again = SnapshotFiles {
            state: dir.path("again.state"),
            mem: dir.path("again.mem"),
        };
        {
            let r = vmm.pause();
            ok(&mut vmm, "pause the uffd VM", r);
            let r = vmm.snapshot(&again);
            ok(&mut vmm, "snapshot the uffd VM", r);
        }
        drop(vmm);
        drop(conn);
        let meta = std::fs::metadata(&again.mem).expect("memory file");
        assert!(meta.blocks() * 512 < meta.len() / 2, "not sparse");
        let (vmm, conn, _, _) = restore_and_ping(
            &config,
            &again,
            RestoreMode::file(),
            &listener,
            &dir.uds(),
            "file restore of a uffd VM's snapshot",
        );
        drop(vmm);
        drop(conn);
        // The copy mode: the memory file's data read into huge-page memory before the vCPUs run.
        let (mut vmm, conn, ready, ping) = restore_and_ping(
            &config,
            &again,
            RestoreMode::Copy,
            &listener,
            &dir.uds(),
            "copy restore of a uffd VM's snapshot",
        );
        let mem = vmm.memory_usage().expect("memory usage");
        eprintln!(
            "copy restore: guest Ready {:.1} ms, ping answered {:.1} ms; {mem:?}",
            ms(ready),
            ms(ping)
        );
        let status = vmm.stop().expect("stop");
        assert!(status.success(), "{status}: {}", vmm.stderr_tail());
        drop(conn);

        // The file mode: the pages the guest wrote are recorded when the VM stops, and a later
        // restore copies them on write before its vCPUs run. Answering a ping after a restore
        // writes tens of pages (stacks, socket buffers, slabs).
        let (written, mut vmm, conn) = record_then_prefetch(
            &config,
            &files,
            (&listener, &dir.uds()),
            hearth_snapshot::SetKind::Written,
            16,
            |prefetch_ws| RestoreMode::File {
                record_ws: prefetch_ws.is_none(),
                prefetch_ws,
            },
        );
        let status = vmm.stop().expect("stop");
        assert!(status.success(), "{status}: {}", vmm.stderr_tail());
        drop(conn);
        // Each mode reads only its own kind of set.
        let crossed = [
            RestoreMode::File {
                prefetch_ws: Some(ws.clone()),
                record_ws: false,
            },
            RestoreMode::Uffd {
                prefetch_ws: Some(written.clone()),
                record_ws: false,
            },
        ];
        for mode in crossed {
            match VmmProcess::spawn_restored_with(&hearth_binary(), &config, &files, mode) {
                Ok(vmm) => panic!("a set of the other kind was used\n{}", vmm.stderr_tail()),
                Err(e) => {
                    let text = e.to_string();
                    assert!(text.contains("were asked for"), "{text}");
                }
            }
        }

        // A corrupted working set is refused before any guest runs.
        flip_byte(&ws, 50);
        let bad = RestoreMode::Uffd {
            prefetch_ws: Some(ws.clone()),
            record_ws: false,
        };
        match VmmProcess::spawn_restored_with(&hearth_binary(), &config, &files, bad) {
            Ok(vmm) => panic!("a corrupted working set was used\n{}", vmm.stderr_tail()),
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains("corrupted"), "{text}");
                eprintln!("refused as expected: {}", text.lines().last().unwrap_or(""));
            }
        }
    });
}

/// A tmpfs mounted with huge pages (`huge=within_size`) on `dir`, detached on drop.
struct HugeTmpfs(std::path::PathBuf);

impl HugeTmpfs {
    fn mount(dir: std::path::PathBuf) -> Self {
        use std::os::unix::ffi::OsStrExt;
        std::fs::create_dir_all(&dir).expect("create the tmpfs mount point");
        let target = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("a path");
        // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                c"huge=within_size,mode=0700".as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "cannot mount a tmpfs on {} (this test needs root): {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
        HugeTmpfs(dir)
    }
}

impl Drop for HugeTmpfs {
    fn drop(&mut self) {
        use std::os::unix::ffi::OsStrExt;
        if let Ok(target) = std::ffi::CString::new(self.0.as_os_str().as_bytes()) {
            // SAFETY: umount2(2) with a NUL-terminated path that outlives the call.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Boots a template whose guest RAM is the file `ram_path` (zero pages punched when it becomes a
/// memory file), checks that it answers a ping and pauses it; returns it, its `Ready` connection,
/// a control client connected to it and its configuration.
fn boot_file_backed_template(
    dir: &VmDir,
    initrd: &Path,
    listener: &std::os::unix::net::UnixListener,
    ram_path: &Path,
) -> (
    VmmProcess,
    std::os::unix::net::UnixStream,
    ControlClient<std::os::unix::net::UnixStream>,
    VmConfig,
) {
    let mut config = config(dir, initrd, 128, 1, TEMPLATE_CMDLINE);
    config.ram_file = Some(hearth_vmm::config::RamFileConfig {
        path: ram_path.to_path_buf(),
        punch: hearth_snapshot::backing::Punch::Pages,
    });
    let (mut vmm, ready_conn, _) = boot_template(dir, &config, listener);
    let mut client = ControlClient::connect_uds(&dir.uds()).expect("control port");
    assert_eq!(
        client.ping(b"template".to_vec()).expect("ping"),
        b"template"
    );
    let r = vmm.pause();
    ok(&mut vmm, "pause", r);
    (vmm, ready_conn, client, config)
}

/// Restores the snapshot `files` of a file-backed template (`config`, without its RAM file) in file
/// mode, then a copy of them (checked through its digest, read back in full, as a file whose
/// change time moved is); each must answer a ping, and is stopped.
fn restore_it_and_a_copy(
    config: &VmConfig,
    files: &SnapshotFiles,
    dir: &VmDir,
    listener: &std::os::unix::net::UnixListener,
    what: &str,
) {
    let restored_config = {
        let mut c = config.clone();
        c.ram_file = None;
        c
    };
    let (mut restored, _conn, to_ready, to_ping) = restore_and_ping(
        &restored_config,
        files,
        RestoreMode::file(),
        listener,
        &dir.uds(),
        &format!("restore of {what}"),
    );
    eprintln!(
        "restore of {what}: guest Ready {:.1} ms, ping answered {:.1} ms",
        ms(to_ready),
        ms(to_ping)
    );
    let r = restored.stop();
    ok(&mut restored, "stop", r);
    let copy = copy_files(files, dir, "copy");
    let (mut again, _conn, _, _) = restore_and_ping(
        &restored_config,
        &copy,
        RestoreMode::file(),
        listener,
        &dir.uds(),
        &format!("restore of a copy of {what}"),
    );
    let r = again.stop();
    ok(&mut again, "stop", r);
}

/// A template whose guest RAM is a file on a huge-page tmpfs: its snapshot takes that file as the
/// memory file (the same inode, renamed; zero pages punched), the template may not resume after
/// it, later device activity does not change the file, and a restore of it answers.
#[test]
fn a_file_backed_template_snapshot_restores_and_never_resumes() {
    in_kvm(
        "a_file_backed_template_snapshot_restores_and_never_resumes",
        || {
            let dir = VmDir::new();
            let initrd = guest_initrd(&dir);
            let listener = ready_listener(&dir);
            let tmpfs = HugeTmpfs::mount(dir.path("ram"));
            let ram_path = tmpfs.0.join("guest.ram");
            let (mut vmm, ready_conn, client, config) =
                boot_file_backed_template(&dir, &initrd, &listener, &ram_path);
            let ram_ino = std::fs::metadata(&ram_path).expect("the RAM file").ino();
            let files = SnapshotFiles {
                state: tmpfs.0.join("vm.state"),
                mem: tmpfs.0.join("vm.mem"),
            };
            let t = Instant::now();
            let r = vmm.snapshot(&files);
            let snapshot_ms = ms(t.elapsed());
            assert_eq!(ok(&mut vmm, "snapshot", r), VmState::Paused);
            let mem_meta = std::fs::metadata(&files.mem).expect("the memory file");
            eprintln!(
                "snapshot in place: {snapshot_ms:.1} ms; memory file {} bytes, {} allocated",
                mem_meta.len(),
                mem_meta.blocks() * 512
            );
            assert_eq!(mem_meta.ino(), ram_ino, "the RAM file itself, not a copy");
            assert!(!ram_path.exists(), "the RAM file moved to the memory file");
            assert_eq!(mem_meta.mode() & 0o7777, 0o644);
            assert!(
                mem_meta.blocks() * 512 < mem_meta.len(),
                "the memory file is not sparse"
            );
            // Never again: resuming would change the memory of every clone.
            match vmm.resume() {
                Err(hearth_vmm::ProcessError::Refused(_, m)) => {
                    assert!(m.contains("cannot run again"), "{m}")
                }
                other => panic!("a template whose RAM became its snapshot resumed: {other:?}"),
            }
            // Closing the template's connections makes its vsock device write the guest's
            // queues: those writes must stay private to the (dead) template.
            drop(client);
            drop(ready_conn);
            std::thread::sleep(Duration::from_millis(200));
            eprintln!("VMM log:\n{}", vmm.stderr_tail());
            drop(vmm);

            // The copy's digest, read back in full, shows that the digest taken in place is the
            // file's and that nothing wrote the file after the snapshot.
            restore_it_and_a_copy(&config, &files, &dir, &listener, "the file-backed template");
        },
    );
}

/// Whether the files at `a` and `b` hold the same bytes (read in 1 MiB pieces).
fn same_contents(a: &Path, b: &Path) -> bool {
    let (fa, fb) = (
        std::fs::File::open(a).expect("open"),
        std::fs::File::open(b).expect("open"),
    );
    let len = fa.metadata().expect("metadata").len();
    if fb.metadata().expect("metadata").len() != len {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(ba.len() as u64) as usize;
        fa.read_exact_at(&mut ba[..n], at).expect("read");
        fb.read_exact_at(&mut bb[..n], at).expect("read");
        if ba[..n] != bb[..n] {
            return false;
        }
        at += n as u64;
    }
    true
}

/// A template whose guest RAM is a file on a huge-page tmpfs, snapshotted into a folder on another
/// file system: the RAM file cannot be renamed there, so the snapshot writes a sparse copy of guest
/// RAM as a new memory file, the RAM file stays the template's (which may run again, and does,
/// without changing the snapshot), and a restore of the copy answers.
#[test]
fn a_file_backed_template_snapshot_on_another_file_system_writes_a_copy() {
    in_kvm(
        "a_file_backed_template_snapshot_on_another_file_system_writes_a_copy",
        || {
            let dir = VmDir::new();
            let initrd = guest_initrd(&dir);
            let listener = ready_listener(&dir);
            let tmpfs = HugeTmpfs::mount(dir.path("ram"));
            let ram_path = tmpfs.0.join("guest.ram");
            // Else the test would take the in-place path it does not mean to test.
            let dev = |p: &Path| std::fs::metadata(p).expect("metadata").dev();
            assert_ne!(
                dev(&tmpfs.0),
                dev(dir.dir.path()),
                "the RAM file's and the snapshot's folders are on one file system"
            );
            let (mut vmm, ready_conn, mut client, config) =
                boot_file_backed_template(&dir, &initrd, &listener, &ram_path);
            let ram_meta = std::fs::metadata(&ram_path).expect("the RAM file");
            let files = SnapshotFiles {
                state: dir.path("vm.state"),
                mem: dir.path("vm.mem"),
            };
            let t = Instant::now();
            let r = vmm.snapshot(&files);
            let snapshot_ms = ms(t.elapsed());
            assert_eq!(ok(&mut vmm, "snapshot", r), VmState::Paused);
            let mem_meta = std::fs::metadata(&files.mem).expect("the memory file");
            eprintln!(
                "snapshot written as a copy: {snapshot_ms:.1} ms; memory file {} bytes, {} allocated",
                mem_meta.len(),
                mem_meta.blocks() * 512
            );
            let log = vmm.stderr_tail();
            for line in log.lines().filter(|l| l.contains("snapshot written")) {
                eprintln!("VMM: {line}");
            }
            assert!(
                log.contains("on another file system than the RAM file: writing a copy"),
                "no warning of the copy in the VMM log:\n{log}"
            );
            assert_ne!(
                (mem_meta.dev(), mem_meta.ino()),
                (ram_meta.dev(), ram_meta.ino()),
                "a new file, not the RAM file"
            );
            let ram_now = std::fs::metadata(&ram_path).expect("the RAM file stays at its path");
            assert_eq!(ram_now.ino(), ram_meta.ino(), "the same RAM file");
            assert_eq!(ram_now.len(), mem_meta.len(), "guest RAM's size");
            assert_eq!(mem_meta.mode() & 0o7777, hearth_snapshot::FILE_MODE);
            assert!(
                mem_meta.blocks() * 512 < mem_meta.len(),
                "the memory file is not sparse"
            );
            // Paused, with no host traffic: guest RAM is what the snapshot saw.
            assert!(
                same_contents(&files.mem, &ram_path),
                "the memory file is not a copy of guest RAM"
            );
            // The RAM file was not given to the snapshot: the template may run again, and what
            // it writes goes to its RAM file, not to the memory file.
            {
                let r = vmm.resume();
                assert_eq!(ok(&mut vmm, "resume after the copy", r), VmState::Running);
            }
            assert_eq!(
                client.ping(b"again".to_vec()).expect("ping after resume"),
                b"again"
            );
            drop(client);
            drop(ready_conn);
            {
                let r = vmm.stop();
                ok(&mut vmm, "stop the template", r);
            }
            match vmm.wait(Duration::from_secs(30)) {
                Ok(Some(status)) => assert!(status.success(), "{status}: {}", vmm.stderr_tail()),
                other => panic!(
                    "the template did not exit: {other:?}\n{}",
                    vmm.stderr_tail()
                ),
            }
            drop(vmm);
            assert!(ram_path.exists(), "the RAM file stays where it was");
            let after = std::fs::metadata(&files.mem).expect("the memory file");
            assert_eq!(
                (after.ino(), after.len(), after.mtime(), after.mtime_nsec()),
                (
                    mem_meta.ino(),
                    mem_meta.len(),
                    mem_meta.mtime(),
                    mem_meta.mtime_nsec()
                ),
                "the template's run changed the memory file"
            );

            // The copy's digest, read back in full, shows that the digest the fallback wrote is its
            // memory file's.
            restore_it_and_a_copy(&config, &files, &dir, &listener, "the fallback's copy");
        },
    );
}
