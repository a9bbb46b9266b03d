//! `hearth image` from an empty cache: real apt-get, real dpkg-deb, Debian's mirrors.

use std::path::Path;
use std::time::Instant;

use hearth_guest::image::{GUEST_MODULES, KernelImage, KernelRecord, modules};

fn names(paths: &[std::path::PathBuf]) -> Vec<String> {
    paths
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn fetch_into_an_empty_cache_then_again() {
    let cache = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let kernel =
        KernelImage::fetch_into(cache.path()).expect("hearth image (apt-get download) failed");
    eprintln!(
        "fetched {} {} in {:?}",
        kernel.package,
        kernel.version,
        t.elapsed()
    );

    assert!(
        kernel.package.starts_with("linux-image-") && kernel.package.ends_with("-cloud-amd64"),
        "{kernel:?}"
    );
    assert!(kernel.vmlinuz.is_file(), "{kernel:?}");
    assert!(
        kernel
            .vmlinuz
            .starts_with(cache.path().join("kernel").join(&kernel.version))
    );
    assert_eq!(kernel.sha256.len(), 64);

    // The record matches apt's index.
    let show = std::process::Command::new("apt-cache")
        .args(["show", "--no-all-versions"])
        .arg(format!("{}={}", kernel.package, kernel.version))
        .output()
        .unwrap();
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.contains(&format!("SHA256: {}", kernel.sha256)),
        "{show}"
    );
    let record_path = cache
        .path()
        .join("kernel")
        .join(&kernel.version)
        .join("kernel.json");
    let record: KernelRecord =
        serde_json::from_str(&std::fs::read_to_string(&record_path).unwrap()).unwrap();
    assert_eq!(record.sha256, kernel.sha256);
    assert_eq!(Some(record.kernel_release.clone()), kernel.kernel_release);

    // Nothing else is left in the cache folder but the kernel and its pointer.
    let mut entries: Vec<String> = std::fs::read_dir(cache.path().join("kernel"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, [kernel.version.clone(), "current".to_owned()]);

    // Modules: the guest set in load order, and the test host's KVM modules.
    let modules_dir = kernel.modules_dir.clone().unwrap();
    let guest = modules::resolve(&modules_dir, &GUEST_MODULES).unwrap();
    assert_eq!(
        names(&guest),
        [
            "virtio_ring.ko",
            "virtio.ko",
            "virtio_mmio.ko",
            "vsock.ko",
            "vmw_vsock_virtio_transport_common.ko",
            "vmw_vsock_virtio_transport.ko"
        ]
    );
    let kvm = modules::resolve(&modules_dir, &["kvm-amd"]).unwrap();
    assert_eq!(names(&kvm), ["irqbypass.ko", "kvm.ko", "kvm-amd.ko"]);

    // Located as recorded (unless HEARTH_KERNEL overrides the vmlinuz).
    if std::env::var_os("HEARTH_KERNEL").is_none() {
        assert_eq!(KernelImage::locate_in(cache.path()).unwrap(), kernel);
    }

    // Idempotent: the second run only verifies.
    let t = Instant::now();
    let again = KernelImage::fetch_into(cache.path()).unwrap();
    assert_eq!(again, kernel);
    eprintln!("second fetch (verify only) took {:?}", t.elapsed());

    // A tampered kernel is fetched again.
    std::fs::write(&kernel.vmlinuz, b"tampered").unwrap();
    let repaired = KernelImage::fetch_into(cache.path()).unwrap();
    assert_eq!(repaired, kernel);
    assert_ne!(std::fs::read(&kernel.vmlinuz).unwrap(), b"tampered");
    assert_no_boot_changes(Path::new("/boot"));
}

fn assert_no_boot_changes(boot: &Path) {
    if let Ok(rd) = std::fs::read_dir(boot) {
        for e in rd {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.contains("cloud-amd64"), "/boot was touched: {name}");
        }
    }
}
