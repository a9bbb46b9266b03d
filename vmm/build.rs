//! Compiles the seccomp allow-lists (`seccomp/filters.json`) to BPF at build time, one file per
//! thread kind in OUT_DIR, each instruction as 8 little-endian bytes (code u16, jt u8, jf u8, k u32);
//! and digests what the VMM is built from into `HEARTH_VMM_BUILD_ID` (`src/build_id.rs`).

use std::path::{Path, PathBuf};

/// What a VMM build is made of: this crate's sources and filters, the snapshot crate it links,
/// and the lock file (the dependencies' versions). Not the compiler flags: the static and the
/// dynamic build of the same sources are the same VMM.
const BUILD_INPUTS: &[&str] = &[
    "Cargo.toml",
    "build.rs",
    "src",
    "seccomp",
    "../snapshot/Cargo.toml",
    "../snapshot/src",
    "../Cargo.lock",
];

/// Appends every file under `path` (sorted), with its path, to `files`.
fn collect(path: &Path, files: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = match std::fs::read_dir(path) {
            Ok(dir) => dir.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(e) => panic!("cannot list {}: {e}", path.display()),
        };
        entries.sort();
        for entry in entries {
            collect(&entry, files);
        }
    } else if path.is_file() {
        files.push(path.to_path_buf());
    }
}

/// FNV-1a over `bytes`, from `hash`.
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// A digest of [`BUILD_INPUTS`]: two FNV-1a hashes with different starts (128 bits).
fn build_id() -> String {
    let mut files = Vec::new();
    for input in BUILD_INPUTS {
        println!("cargo:rerun-if-changed={input}");
        collect(Path::new(input), &mut files);
    }
    let (mut a, mut b) = (0xcbf2_9ce4_8422_2325_u64, 0x6c62_272e_07bb_0142_u64);
    for file in files {
        let bytes = match std::fs::read(&file) {
            Ok(bytes) => bytes,
            Err(e) => panic!("cannot read {}: {e}", file.display()),
        };
        let name = file.to_string_lossy();
        for part in [name.as_bytes(), &(bytes.len() as u64).to_le_bytes(), &bytes] {
            a = fnv1a(a, part);
            b = fnv1a(b, part);
        }
    }
    format!("{a:016x}{b:016x}")
}

fn main() {
    println!("cargo:rustc-env=HEARTH_VMM_BUILD_ID={}", build_id());
    let src = PathBuf::from("seccomp/filters.json");
    println!("cargo:rerun-if-changed={}", src.display());
    let text = match std::fs::read_to_string(&src) {
        Ok(t) => t,
        Err(e) => panic!("cannot read {}: {e}", src.display()),
    };
    // seccompiler accepts `comment` on rules only; the filters' own comments are dropped here.
    let mut json: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => panic!("{} is not JSON: {e}", src.display()),
    };
    if let Some(map) = json.as_object_mut() {
        for filter in map.values_mut() {
            if let Some(f) = filter.as_object_mut() {
                f.remove("comment");
            }
        }
    }
    let stripped = json.to_string();
    let filters = match seccompiler::compile_from_json(
        stripped.as_bytes(),
        seccompiler::TargetArch::x86_64,
    ) {
        Ok(f) => f,
        Err(e) => panic!("cannot compile {}: {e}", src.display()),
    };
    let out =
        PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| panic!("OUT_DIR is not set")));
    for name in ["vcpu", "vmm", "uffd", "clone3"] {
        let Some(prog) = filters.get(name) else {
            panic!("{} has no `{name}` filter", src.display())
        };
        let mut bytes = Vec::with_capacity(prog.len() * 8);
        for insn in prog {
            bytes.extend_from_slice(&insn.code.to_le_bytes());
            bytes.push(insn.jt);
            bytes.push(insn.jf);
            bytes.extend_from_slice(&insn.k.to_le_bytes());
        }
        if let Err(e) = std::fs::write(out.join(format!("seccomp_{name}.bpf")), bytes) {
            panic!("cannot write the {name} filter: {e}");
        }
    }
}
