//! Compiles the seccomp allow-lists (`seccomp/filters.json`) to BPF at build time, one file per
//! thread kind in OUT_DIR, each instruction as 8 little-endian bytes (code u16, jt u8, jf u8, k u32).

use std::path::PathBuf;

fn main() {
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
