//! Kernel module dependency resolution without `modules.dep`.
//!
//! Debian's kernel package ships no `modules.dep` (depmod runs at install time, and we never
//! install). Each `.ko` names its dependencies in the `depends=` field of its `.modinfo` ELF
//! section; this module reads that field and orders modules so each comes after what it needs.
//! It also cuts the signature `scripts/sign-file` appends to each module ([`without_signature`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Errors from indexing or resolving kernel modules.
#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("cannot read the modules folder {path:?}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read kernel module {path:?}")]
    ReadModule {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "kernel module {name:?} is not under {dir:?} (is it built into the kernel, or compressed?)"
    )]
    NotFound { name: String, dir: PathBuf },
    #[error(
        "kernel module {path:?} is not a little-endian ELF64 object with a .modinfo section: {reason}"
    )]
    BadElf { path: PathBuf, reason: &'static str },
    #[error("kernel module dependency cycle through {name:?}")]
    Cycle { name: String },
}

/// The marker `scripts/sign-file` writes after a module's appended signature.
const SIGNATURE_MAGIC: &[u8] = b"~Module signature appended~\n";
/// `struct module_signature` before the marker: algorithm, hash, id type, signer length, key id
/// length, 3 pad bytes, then the signature's length (big-endian u32).
const SIGNATURE_INFO_LEN: usize = 12;

/// `module` without its appended signature (PKCS#7 blob, `struct module_signature`, marker), or
/// all of it when it carries none or the trailer does not parse. Without a signature the kernel
/// skips verifying it (hashing the module and an RSA check) unless it enforces signatures
/// (`module.sig_enforce`, lockdown), and marks itself tainted (`E`) once.
pub fn without_signature(module: &[u8]) -> &[u8] {
    let Some(rest) = module.strip_suffix(SIGNATURE_MAGIC) else {
        return module;
    };
    let Some(info_at) = rest.len().checked_sub(SIGNATURE_INFO_LEN) else {
        return module;
    };
    let Some(len_bytes) = rest
        .get(info_at + 8..)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
    else {
        return module;
    };
    let Ok(sig_len) = usize::try_from(u32::from_be_bytes(len_bytes)) else {
        return module;
    };
    match info_at.checked_sub(sig_len) {
        Some(end) => &module[..end],
        None => module,
    }
}

/// Canonical module name: `kvm-amd`, `kvm_amd` and `kvm_amd.ko` are the same module.
pub fn canonical_name(name: &str) -> String {
    let base = name.strip_suffix(".ko").unwrap_or(name);
    base.replace('-', "_")
}

/// An index of the `.ko` files under a modules folder (e.g. `lib/modules/6.1.0-56-cloud-amd64`).
#[derive(Debug, Clone)]
pub struct ModuleIndex {
    dir: PathBuf,
    by_name: BTreeMap<String, PathBuf>,
}

impl ModuleIndex {
    /// Walks `modules_dir` recursively and indexes every uncompressed `.ko` by canonical name.
    pub fn scan(modules_dir: &Path) -> Result<Self, ModulesError> {
        let mut by_name = BTreeMap::new();
        let mut stack = vec![modules_dir.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let rd = std::fs::read_dir(&dir).map_err(|source| ModulesError::ReadDir {
                path: dir.clone(),
                source,
            })?;
            for entry in rd {
                let entry = entry.map_err(|source| ModulesError::ReadDir {
                    path: dir.clone(),
                    source,
                })?;
                let path = entry.path();
                let ft = entry.file_type().map_err(|source| ModulesError::ReadDir {
                    path: path.clone(),
                    source,
                })?;
                if ft.is_dir() {
                    stack.push(path);
                } else if let Some(name) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .filter(|n| n.ends_with(".ko"))
                {
                    by_name.insert(canonical_name(name), path);
                }
            }
        }
        Ok(Self {
            dir: modules_dir.to_path_buf(),
            by_name,
        })
    }

    /// The path of a module by (any spelling of) its name.
    pub fn path_of(&self, name: &str) -> Result<&Path, ModulesError> {
        let canon = canonical_name(name);
        self.by_name
            .get(&canon)
            .map(PathBuf::as_path)
            .ok_or_else(|| ModulesError::NotFound {
                name: canon,
                dir: self.dir.clone(),
            })
    }

    /// The requested modules and everything they depend on, each after its dependencies.
    pub fn resolve(&self, names: &[&str]) -> Result<Vec<PathBuf>, ModulesError> {
        // Post-order depth-first walk; `state` is false while a module is on the stack.
        let mut state: HashMap<String, bool> = HashMap::new();
        let mut order = Vec::new();
        for name in names {
            self.visit(&canonical_name(name), &mut state, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        state: &mut HashMap<String, bool>,
        order: &mut Vec<PathBuf>,
    ) -> Result<(), ModulesError> {
        match state.get(name) {
            Some(true) => return Ok(()),
            Some(false) => {
                return Err(ModulesError::Cycle {
                    name: name.to_owned(),
                });
            }
            None => {}
        }
        state.insert(name.to_owned(), false);
        let path = self.path_of(name)?.to_path_buf();
        for dep in module_depends(&path)? {
            self.visit(&dep, state, order)?;
        }
        state.insert(name.to_owned(), true);
        order.push(path);
        Ok(())
    }
}

/// The requested modules under `modules_dir` and their dependencies, in load order.
///
/// `resolve(dir, &["kvm-amd"])` gives `[irqbypass.ko, kvm.ko, kvm-amd.ko]` for the Debian kernel.
pub fn resolve(modules_dir: &Path, names: &[&str]) -> Result<Vec<PathBuf>, ModulesError> {
    ModuleIndex::scan(modules_dir)?.resolve(names)
}

/// The canonical names in the `depends=` field of a module file's `.modinfo` section.
pub fn module_depends(path: &Path) -> Result<Vec<String>, ModulesError> {
    let bytes = std::fs::read(path).map_err(|source| ModulesError::ReadModule {
        path: path.to_path_buf(),
        source,
    })?;
    let info = modinfo(&bytes).map_err(|reason| ModulesError::BadElf {
        path: path.to_path_buf(),
        reason,
    })?;
    Ok(depends_from_modinfo(info))
}

/// The `depends=` names in a `.modinfo` section's bytes (NUL-separated `key=value` strings).
pub fn depends_from_modinfo(info: &[u8]) -> Vec<String> {
    info.split(|b| *b == 0)
        .filter_map(|field| field.strip_prefix(b"depends="))
        .flat_map(|deps| deps.split(|b| *b == b','))
        .filter(|d| !d.is_empty())
        .map(|d| canonical_name(&String::from_utf8_lossy(d)))
        .collect()
}

fn read_u16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn read_u32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn read_u64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn slice(b: &[u8], off: u64, len: u64) -> Option<&[u8]> {
    let off = usize::try_from(off).ok()?;
    let len = usize::try_from(len).ok()?;
    b.get(off..off.checked_add(len)?)
}

/// The contents of the `.modinfo` section of an ELF64 little-endian relocatable object.
/// Every offset is bounds-checked: malformed input gives an error, never a panic.
pub fn modinfo(elf: &[u8]) -> Result<&[u8], &'static str> {
    sections(elf)?
        .into_iter()
        .find(|(name, _)| *name == b".modinfo")
        .map(|(_, data)| data)
        .ok_or("no .modinfo section")
}

/// A section's name and contents.
pub type Section<'a> = (&'a [u8], &'a [u8]);

/// Every section of an ELF64 little-endian file as (name, contents); `SHT_NOBITS` sections have no
/// contents. Every offset is bounds-checked: malformed input gives an error, never a panic.
pub fn sections(elf: &[u8]) -> Result<Vec<Section<'_>>, &'static str> {
    const SHT_NOBITS: u32 = 8;
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err("no ELF magic");
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not ELF64 little-endian");
    }
    let shoff = read_u64(elf, 0x28).ok_or("truncated header")?;
    let shentsize = u64::from(read_u16(elf, 0x3a).ok_or("truncated header")?);
    let shnum = u64::from(read_u16(elf, 0x3c).ok_or("truncated header")?);
    let shstrndx = u64::from(read_u16(elf, 0x3e).ok_or("truncated header")?);
    if shentsize < 64 {
        return Err("section header entries too small");
    }
    let section = |i: u64| -> Option<(u32, u32, u64, u64)> {
        let at = usize::try_from(shoff.checked_add(i.checked_mul(shentsize)?)?).ok()?;
        Some((
            read_u32(elf, at)?,
            read_u32(elf, at.checked_add(4)?)?,
            read_u64(elf, at.checked_add(24)?)?,
            read_u64(elf, at.checked_add(32)?)?,
        ))
    };
    let (_, _, str_off, str_size) = section(shstrndx).ok_or("section name table out of bounds")?;
    let names = slice(elf, str_off, str_size).ok_or("section name table out of bounds")?;
    let mut out = Vec::new();
    for i in 0..shnum {
        let (name_off, kind, off, size) = section(i).ok_or("section header out of bounds")?;
        let name = usize::try_from(name_off)
            .ok()
            .and_then(|n| names.get(n..))
            .ok_or("section name out of bounds")?;
        let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
        let data = if kind == SHT_NOBITS {
            &[][..]
        } else {
            slice(elf, off, size).ok_or("a section is out of bounds")?
        };
        out.push((&name[..end], data));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal ELF64 object with a `.shstrtab` and a `.modinfo` section.
    fn fake_module(info: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        let info_off = elf.len();
        elf.extend_from_slice(info);
        let str_off = elf.len();
        elf.extend_from_slice(shstrtab);
        while !elf.len().is_multiple_of(8) {
            elf.push(0);
        }
        let shoff = elf.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut h = [0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, str_off, shstrtab.len());
        sh(11, info_off, info.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf
    }

    #[test]
    fn appended_signatures_are_cut_and_other_files_kept() {
        let body = b"\x7fELF module body".to_vec();
        let mut signed = body.clone();
        signed.extend_from_slice(&[0xaa; 5]); // the PKCS#7 blob
        signed.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 5]);
        signed.extend_from_slice(SIGNATURE_MAGIC);
        assert_eq!(without_signature(&signed), &body[..]);
        assert_eq!(without_signature(&body), &body[..]);
        // A length past the start: kept whole for the kernel to judge.
        let mut bad = vec![0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        bad.extend_from_slice(SIGNATURE_MAGIC);
        assert_eq!(without_signature(&bad), &bad[..]);
        assert_eq!(without_signature(SIGNATURE_MAGIC), SIGNATURE_MAGIC);
    }

    #[test]
    fn reads_depends_from_modinfo() {
        let elf = fake_module(b"license=GPL\0depends=kvm,irq-bypass\0name=kvm_amd\0");
        assert_eq!(
            depends_from_modinfo(modinfo(&elf).unwrap()),
            ["kvm", "irq_bypass"]
        );
        let none = fake_module(b"depends=\0name=irqbypass\0");
        assert!(depends_from_modinfo(modinfo(&none).unwrap()).is_empty());
    }

    #[test]
    fn resolves_in_dependency_order_from_a_tree() {
        let dir = tempfile::tempdir().unwrap();
        let write = |rel: &str, info: &[u8]| {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, fake_module(info)).unwrap();
        };
        write("kernel/virt/lib/irqbypass.ko", b"depends=\0");
        write("kernel/arch/x86/kvm/kvm.ko", b"depends=irqbypass\0");
        write("kernel/arch/x86/kvm/kvm-amd.ko", b"depends=kvm\0");
        let order = resolve(dir.path(), &["kvm-amd", "kvm"]).unwrap();
        let names: Vec<_> = order
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["irqbypass.ko", "kvm.ko", "kvm-amd.ko"]);

        assert!(matches!(
            resolve(dir.path(), &["nope"]),
            Err(ModulesError::NotFound { .. })
        ));
        write("kernel/a.ko", b"depends=b\0");
        write("kernel/b.ko", b"depends=a\0");
        assert!(matches!(
            resolve(dir.path(), &["a"]),
            Err(ModulesError::Cycle { .. })
        ));
        std::fs::write(dir.path().join("kernel/bad.ko"), b"not elf").unwrap();
        assert!(matches!(
            resolve(dir.path(), &["bad"]),
            Err(ModulesError::BadElf { .. })
        ));
    }

    proptest! {
        #[test]
        fn modinfo_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = modinfo(&bytes);
        }

        #[test]
        fn modinfo_never_panics_on_mutated_objects(idx in 0usize..400, byte in any::<u8>()) {
            let mut elf = fake_module(b"depends=kvm\0");
            let i = idx % elf.len();
            elf[i] = byte;
            let _ = modinfo(&elf);
        }
    }
}
