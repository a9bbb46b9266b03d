//! A process's memory as Linux accounts it: RSS and PSS from `/proc/PID/smaps_rollup`, and the
//! part of them that is guest RAM, from the `/proc/PID/smaps` entries of the guest memory mappings.
//!
//! Linux leaves hugetlbfs pages out of `Rss` and `Pss` (they are `Private_Hugetlb` and
//! `Shared_Hugetlb`); guest RAM on them (`hearth vmm --hugetlb`) would read as zero. Here they are
//! counted in: RSS adds both, PSS adds the private ones (this process's alone) and the shared ones
//! whole, an upper bound.

use std::path::PathBuf;

/// Errors from reading a process's memory figures.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The proc file could not be read (the process ended?).
    #[error("cannot read {path:?}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The proc file lacks a field.
    #[error("{path:?} has no {field} line")]
    Missing { path: PathBuf, field: &'static str },
}

/// One mapping of `/proc/PID/smaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// Start address.
    pub start: u64,
    /// Length in KiB (`Size:`).
    pub size_kib: u64,
    /// Resident KiB.
    pub rss_kib: u64,
    /// Proportional KiB.
    pub pss_kib: u64,
    /// No file behind it (anonymous memory, heap, stack, ...).
    pub anonymous: bool,
}

/// A process's memory, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessMemory {
    /// Resident set size of the whole process.
    pub rss_kib: u64,
    /// Proportional set size of the whole process.
    pub pss_kib: u64,
    /// RSS of the mappings recognized as guest RAM.
    pub guest_rss_kib: u64,
    /// PSS of the mappings recognized as guest RAM.
    pub guest_pss_kib: u64,
    /// How many guest RAM mappings were recognized.
    pub guest_mappings: usize,
}

impl ProcessMemory {
    /// RSS without guest RAM: the VMM's own memory.
    pub fn own_rss_kib(&self) -> u64 {
        self.rss_kib.saturating_sub(self.guest_rss_kib)
    }

    /// PSS without guest RAM.
    pub fn own_pss_kib(&self) -> u64 {
        self.pss_kib.saturating_sub(self.guest_pss_kib)
    }
}

/// Reads process `pid`'s memory; guest RAM is the anonymous mappings whose sizes are exactly
/// `guest_ranges_kib` (each guest RAM range is one mapping of its own).
pub fn read(pid: u32, guest_ranges_kib: &[u64]) -> Result<ProcessMemory, MemoryError> {
    let rollup_path = PathBuf::from(format!("/proc/{pid}/smaps_rollup"));
    let rollup = std::fs::read_to_string(&rollup_path).map_err(|source| MemoryError::Read {
        path: rollup_path.clone(),
        source,
    })?;
    let hugetlb_kib = field_kib(&rollup, "Private_Hugetlb").unwrap_or(0)
        + field_kib(&rollup, "Shared_Hugetlb").unwrap_or(0);
    let rss_kib = field_kib(&rollup, "Rss").ok_or(MemoryError::Missing {
        path: rollup_path.clone(),
        field: "Rss",
    })? + hugetlb_kib;
    let pss_kib = field_kib(&rollup, "Pss").ok_or(MemoryError::Missing {
        path: rollup_path,
        field: "Pss",
    })? + hugetlb_kib;
    let smaps_path = PathBuf::from(format!("/proc/{pid}/smaps"));
    let smaps = std::fs::read_to_string(&smaps_path).map_err(|source| MemoryError::Read {
        path: smaps_path,
        source,
    })?;
    let guest = guest_mappings(&parse_smaps(&smaps), guest_ranges_kib);
    Ok(ProcessMemory {
        rss_kib,
        pss_kib,
        guest_rss_kib: guest.iter().map(|m| m.rss_kib).sum(),
        guest_pss_kib: guest.iter().map(|m| m.pss_kib).sum(),
        guest_mappings: guest.len(),
    })
}

/// The mappings that are guest RAM: for each range size, the first anonymous mapping of exactly
/// that size not taken yet.
pub fn guest_mappings(mappings: &[Mapping], ranges_kib: &[u64]) -> Vec<Mapping> {
    let mut taken = vec![false; mappings.len()];
    let mut found = Vec::new();
    for &size in ranges_kib {
        if let Some(i) = (0..mappings.len())
            .find(|&i| !taken[i] && mappings[i].anonymous && mappings[i].size_kib == size)
        {
            taken[i] = true;
            found.push(mappings[i].clone());
        }
    }
    found
}

/// The value in KiB of a `Name:   123 kB` line.
pub fn field_kib(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Parses `/proc/PID/smaps`: a header line per mapping (`start-end perms offset dev inode [path]`)
/// followed by `Field: value kB` lines.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(_end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            // perms, offset, dev, inode, then the optional path.
            let inode = words.nth(3);
            let path: Vec<&str> = words.collect();
            // A private hugetlbfs mapping shows as the deleted file `/anon_hugepage`.
            let anonymous = (inode == Some("0")
                && (path.is_empty() || path[0].starts_with("[anon") || path[0] == "[heap]"))
                || path.first() == Some(&"/anon_hugepage");
            mappings.push(Mapping {
                start,
                size_kib: 0,
                rss_kib: 0,
                pss_kib: 0,
                anonymous,
            });
            continue;
        }
        let Some(current) = mappings.last_mut() else {
            continue;
        };
        let value = || {
            words
                .clone()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match first {
            "Size:" => current.size_kib = value(),
            "Rss:" => current.rss_kib += value(),
            "Pss:" => current.pss_kib += value(),
            "Private_Hugetlb:" | "Shared_Hugetlb:" => {
                current.rss_kib += value();
                current.pss_kib += value();
            }
            _ => {}
        }
    }
    mappings
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0a00000-55d0c0a80000 r--p 00000000 08:01 1234 /usr/local/bin/hearth
Size:                512 kB
Rss:                 400 kB
Pss:                 200 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Size:             131072 kB
KernelPageSize:        4 kB
Rss:               20480 kB
Pss:               20480 kB
7f0010000000-7f0014000000 rw-p 00000000 00:00 0
Size:              65536 kB
Rss:                 132 kB
Pss:                 132 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  16 kB
Pss:                  16 kB
";

    #[test]
    fn smaps_parse() {
        let maps = parse_smaps(SMAPS);
        assert_eq!(maps.len(), 4);
        assert_eq!(
            maps[0],
            Mapping {
                start: 0x55d0_c0a0_0000,
                size_kib: 512,
                rss_kib: 400,
                pss_kib: 200,
                anonymous: false
            }
        );
        assert!(maps[1].anonymous && maps[2].anonymous);
        assert!(!maps[3].anonymous, "the stack is not guest RAM");
        assert_eq!(maps[1].size_kib, 131_072);
        assert_eq!(maps[1].rss_kib, 20480);
    }

    #[test]
    fn guest_ram_is_matched_by_size() {
        let maps = parse_smaps(SMAPS);
        let guest = guest_mappings(&maps, &[128 * 1024]);
        assert_eq!(guest.len(), 1);
        assert_eq!(guest[0].start, 0x7f00_0000_0000);
        assert!(guest_mappings(&maps, &[256 * 1024]).is_empty());
        // A malloc arena of 64 MiB is not mistaken for a second 128 MiB range.
        assert_eq!(guest_mappings(&maps, &[128 * 1024, 128 * 1024]).len(), 1);
    }

    #[test]
    fn hugetlb_guest_ram_is_counted_as_guest_ram() {
        let smaps = "7f0000000000-7f0008000000 rw-p 00000000 00:10 12345 /anon_hugepage (deleted)\nSize:             131072 kB\nRss:                   0 kB\nPss:                   0 kB\nShared_Hugetlb:        0 kB\nPrivate_Hugetlb:   81920 kB\n";
        let maps = parse_smaps(smaps);
        let guest = guest_mappings(&maps, &[131072]);
        assert_eq!(guest.len(), 1);
        assert_eq!((guest[0].rss_kib, guest[0].pss_kib), (81920, 81920));
    }

    #[test]
    fn rollup_fields() {
        let rollup = "00400000-7ffc00021000 ---p 00000000 00:00 0 [rollup]\nRss:    3000 kB\nPss:    2500 kB\nPss_Anon: 1 kB\n";
        assert_eq!(field_kib(rollup, "Rss"), Some(3000));
        assert_eq!(field_kib(rollup, "Pss"), Some(2500));
        assert_eq!(field_kib(rollup, "Swap"), None);
    }

    #[test]
    fn own_memory_excludes_guest_ram() {
        let m = ProcessMemory {
            rss_kib: 25000,
            pss_kib: 24000,
            guest_rss_kib: 20480,
            guest_pss_kib: 20480,
            guest_mappings: 1,
        };
        assert_eq!(m.own_rss_kib(), 4520);
        assert_eq!(m.own_pss_kib(), 3520);
    }

    #[test]
    fn this_process_can_be_read() {
        let m = read(std::process::id(), &[]).expect("own smaps");
        assert!(m.rss_kib > 0 && m.pss_kib > 0);
        assert_eq!(m.guest_mappings, 0);
    }

    proptest::proptest! {
        #[test]
        fn smaps_parser_never_panics(text in "\\PC{0,400}") {
            let _ = parse_smaps(&text);
            let _ = field_kib(&text, "Rss");
        }
    }
}
