use super::*;
use std::io::Write;
use zip::CompressionMethod;
use zip::write::{SimpleFileOptions, ZipWriter};

enum E<'a> {
    File(&'a str, &'a [u8], u32),
    Dir(&'a str),
    Link(&'a str, &'a str),
}

fn build(entries: &[E<'_>], method: CompressionMethod) -> Vec<u8> {
    let mut w = ZipWriter::new(Cursor::new(Vec::new()));
    for e in entries {
        let opts = SimpleFileOptions::default().compression_method(method);
        match e {
            E::File(name, data, mode) => {
                w.start_file(*name, opts.unix_permissions(*mode)).unwrap();
                w.write_all(data).unwrap();
            }
            E::Dir(name) => w.add_directory(*name, opts).unwrap(),
            E::Link(name, target) => w.add_symlink(*name, *target, opts).unwrap(),
        }
    }
    w.finish().unwrap().into_inner()
}

/// A scratch area: `outer/task` is the task folder; anything else appearing under `outer` is an
/// escape.
struct Scratch {
    _tmp: tempfile::TempDir,
    outer: std::path::PathBuf,
    task: std::path::PathBuf,
}

fn scratch() -> Scratch {
    let tmp = tempfile::tempdir().unwrap();
    let outer = tmp.path().join("outer");
    let task = outer.join("task");
    std::fs::create_dir_all(&task).unwrap();
    Scratch {
        _tmp: tmp,
        outer,
        task,
    }
}

impl Scratch {
    /// Everything under `outer` that is not under `task`.
    fn outside(&self) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.outer).unwrap() {
            let p = e.unwrap().path();
            if p != self.task {
                out.push(p);
            }
        }
        out
    }
}

#[test]
fn unpacks_files_dirs_modes_and_inner_symlinks() {
    let s = scratch();
    let zip = build(
        &[
            E::File("bootstrap", b"#!/bin/sh\n", 0o755),
            E::Dir("lib/"),
            E::File("lib/data.txt", b"hello", 0o4644),
            E::Link("lib/alias", "data.txt"),
            E::Link("top", "lib/data.txt"),
            E::Link("lib/up", "../bootstrap"),
        ],
        CompressionMethod::Deflated,
    );
    let stats = unpack(&zip, &s.task, &Limits::default()).unwrap();
    assert_eq!(stats.files, 2);
    assert_eq!(stats.symlinks, 3);
    assert_eq!(std::fs::read(s.task.join("lib/alias")).unwrap(), b"hello");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| {
        std::fs::metadata(s.task.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("bootstrap"), 0o755);
    assert_eq!(mode("lib/data.txt"), 0o644, "setuid bits are dropped");
    assert!(s.outside().is_empty());
}

fn refused(zip: &[u8]) -> (BundleError, Scratch) {
    let s = scratch();
    let err = unpack(zip, &s.task, &Limits::default()).expect_err("must be refused");
    assert_eq!(err.error_type(), "InvalidZipFileException");
    assert!(
        s.outside().is_empty(),
        "wrote outside the task folder: {:?}",
        s.outside()
    );
    (err, s)
}

#[test]
fn refuses_path_traversal() {
    let zip = build(
        &[E::File("a/../../evil", b"x", 0o644)],
        CompressionMethod::Stored,
    );
    let (err, _) = refused(&zip);
    assert!(
        err.lambda_message().contains("'..'"),
        "{}",
        err.lambda_message()
    );
}

#[test]
fn refuses_absolute_paths() {
    let s = scratch();
    let target = s.outer.join("abs");
    let zip = build(
        &[E::File(target.to_str().unwrap(), b"x", 0o644)],
        CompressionMethod::Stored,
    );
    let (err, _) = refused(&zip);
    assert!(err.to_string().contains("absolute path"), "{err}");
    assert!(!target.exists());
}

#[test]
fn refuses_symlinks_pointing_out() {
    for target in [
        "../..",
        "/etc/passwd",
        "a/../../x",
        "../task/../../x",
        "a/../b",
    ] {
        let zip = build(&[E::Link("sub/link", target)], CompressionMethod::Stored);
        let (err, _) = refused(&zip);
        assert!(
            matches!(err, BundleError::SymlinkEscape { .. }),
            "{target}: {err}"
        );
    }
}

#[test]
fn refuses_writes_through_an_earlier_symlink() {
    // The link itself stays inside, but a later entry must not be written through it.
    let zip = build(
        &[E::Link("dir", "."), E::File("dir/file", b"x", 0o644)],
        CompressionMethod::Stored,
    );
    let (err, s) = refused(&zip);
    assert!(matches!(err, BundleError::ThroughLink { .. }), "{err}");
    assert!(!s.task.join("file").exists());
}

#[test]
fn refuses_writes_through_a_preexisting_symlink_to_outside() {
    let s = scratch();
    std::os::unix::fs::symlink(&s.outer, s.task.join("up")).unwrap();
    let zip = build(
        &[E::File("up/owned", b"x", 0o644)],
        CompressionMethod::Stored,
    );
    let err = unpack(&zip, &s.task, &Limits::default()).unwrap_err();
    assert!(matches!(err, BundleError::ThroughLink { .. }), "{err}");
    assert!(!s.outer.join("owned").exists());
}

#[test]
fn refuses_an_entry_through_an_earlier_file() {
    let zip = build(
        &[E::File("f", b"x", 0o644), E::File("f/g", b"y", 0o644)],
        CompressionMethod::Stored,
    );
    let (err, _) = refused(&zip);
    assert!(matches!(err, BundleError::ThroughLink { .. }), "{err}");
}

#[test]
fn refuses_a_zip_bomb_before_inflating() {
    let zeros = vec![0u8; 8 * 1024 * 1024];
    let zip = build(
        &[E::File("bomb", &zeros, 0o644)],
        CompressionMethod::Deflated,
    );
    assert!(zip.len() < 100 * 1024);
    let (err, s) = refused(&zip);
    assert!(matches!(err, BundleError::RatioTooHigh { .. }), "{err}");
    assert!(!s.task.join("bomb").exists(), "nothing inflated");
}

#[test]
fn refuses_too_much_in_total() {
    let s = scratch();
    let data = vec![7u8; 600];
    let zip = build(
        &[E::File("a", &data, 0o644), E::File("b", &data, 0o644)],
        CompressionMethod::Stored,
    );
    let limits = Limits {
        max_unpacked_bytes: 1000,
        ..Limits::default()
    };
    let err = unpack(&zip, &s.task, &limits).unwrap_err();
    assert!(matches!(err, BundleError::TooLarge { max: 1000 }), "{err}");
    assert!(!s.task.join("a").exists(), "refused before inflating");
}

#[test]
fn refuses_too_many_entries() {
    let s = scratch();
    let zip = build(
        &[
            E::File("a", b"", 0o644),
            E::File("b", b"", 0o644),
            E::File("c", b"", 0o644),
        ],
        CompressionMethod::Stored,
    );
    let limits = Limits {
        max_entries: 2,
        ..Limits::default()
    };
    let err = unpack(&zip, &s.task, &limits).unwrap_err();
    assert!(
        matches!(err, BundleError::TooManyEntries { count: 3, max: 2 }),
        "{err}"
    );
}

/// Patches every uncompressed-size field (local header at +22, central header at +24) to `size`.
fn lie_about_size(zip: &mut [u8], size: u32) {
    let mut i = 0;
    while i + 30 <= zip.len() {
        let sig = &zip[i..i + 4];
        if sig == [0x50, 0x4b, 0x03, 0x04] {
            zip[i + 22..i + 26].copy_from_slice(&size.to_le_bytes());
        } else if sig == [0x50, 0x4b, 0x01, 0x02] {
            zip[i + 24..i + 28].copy_from_slice(&size.to_le_bytes());
        }
        i += 1;
    }
}

#[test]
fn refuses_an_entry_whose_header_lies_about_its_size() {
    let data = vec![1u8; 4 * 1024 * 1024];
    let mut zip = build(
        &[E::File("liar", &data, 0o644)],
        CompressionMethod::Deflated,
    );
    lie_about_size(&mut zip, 1000);
    let (err, s) = refused(&zip);
    assert!(
        matches!(
            err,
            BundleError::SizeMismatch { .. } | BundleError::Corrupt { .. }
        ),
        "{err}"
    );
    let written = std::fs::metadata(s.task.join("liar"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(
        written <= 1001,
        "inflated {written} bytes past a 1000-byte header"
    );
}

#[test]
fn refuses_a_truncated_file() {
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let zip = build(&[E::File("f", &data, 0o644)], CompressionMethod::Deflated);
    // Cut out the middle of the data but keep the central directory.
    let mut cut = zip[..200].to_vec();
    cut.extend_from_slice(&zip[zip.len() - 200..]);
    refused(&cut);
    // Cut off the end: no central directory.
    let (err, _) = refused(&zip[..zip.len() / 2]);
    assert!(matches!(err, BundleError::NotAZip(_)), "{err}");
}

#[test]
fn refuses_garbage() {
    let (err, _) = refused(b"definitely not a zip");
    assert!(
        err.lambda_message()
            .starts_with("Could not unzip uploaded file")
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_escape(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096)) {
        let s = scratch();
        let _ = unpack(&bytes, &s.task, &Limits::default());
        proptest::prop_assert!(s.outside().is_empty());
    }

    #[test]
    fn mutated_zips_never_escape(flips in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 1..16)) {
        let mut zip = build(
            &[E::Dir("d/"), E::File("d/f", b"hello hello hello", 0o755), E::Link("l", "d/f")],
            CompressionMethod::Deflated,
        );
        let len = zip.len();
        for (at, byte) in flips {
            zip[at % len] = byte;
        }
        let s = scratch();
        let _ = unpack(&zip, &s.task, &Limits::default());
        proptest::prop_assert!(s.outside().is_empty());
    }
}
