//! The metadata store: functions, versions, aliases, concurrency and event invoke configs in redb
//! (one ACID transaction per API call), and code zips on disk, content-addressed by sha256.
//!
//! Every table maps a string key to a JSON document. Keys of per-function tables start with
//! `<function name>/`, so a function's rows are one range (names never contain `/`).

use std::io::Write;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

type Tbl = TableDefinition<'static, &'static str, &'static [u8]>;

/// The tables of the store.
#[derive(Clone, Copy, Debug)]
pub enum Table {
    /// name -> `FunctionRecord` (the `$LATEST` configuration and per-function data).
    Functions,
    /// `name/0000000001` -> published `FunctionConfiguration`.
    Versions,
    /// `name/alias` -> `AliasConfiguration`.
    Aliases,
    /// name -> reserved concurrency.
    Concurrency,
    /// `name/qualifier` -> event invoke config.
    EventInvokeConfigs,
}

impl Table {
    const ALL: [Table; 5] = [
        Table::Functions,
        Table::Versions,
        Table::Aliases,
        Table::Concurrency,
        Table::EventInvokeConfigs,
    ];

    fn def(self) -> Tbl {
        match self {
            Table::Functions => TableDefinition::new("functions"),
            Table::Versions => TableDefinition::new("versions"),
            Table::Aliases => TableDefinition::new("aliases"),
            Table::Concurrency => TableDefinition::new("concurrency"),
            Table::EventInvokeConfigs => TableDefinition::new("event_invoke_configs"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the data directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the metadata database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("metadata transaction failed")]
    Transaction(#[source] redb::TransactionError),
    #[error("metadata table failed")]
    Table(#[source] redb::TableError),
    #[error("metadata storage failed")]
    Storage(#[source] redb::StorageError),
    #[error("metadata commit failed")]
    Commit(#[source] redb::CommitError),
    #[error("metadata row {key} is not valid")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode metadata row {key}")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("code object {path}")]
    Code {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<redb::TransactionError> for StoreError {
    fn from(e: redb::TransactionError) -> Self {
        Self::Transaction(e)
    }
}
impl From<redb::TableError> for StoreError {
    fn from(e: redb::TableError) -> Self {
        Self::Table(e)
    }
}
impl From<redb::StorageError> for StoreError {
    fn from(e: redb::StorageError) -> Self {
        Self::Storage(e)
    }
}
impl From<redb::CommitError> for StoreError {
    fn from(e: redb::CommitError) -> Self {
        Self::Commit(e)
    }
}

/// The upper bound of the key range of a prefix ending in `/`: `/` + 1 is `0`.
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.trim_end_matches('/').to_string();
    end.push('0');
    end
}

/// The metadata database and the code directory under one data directory.
pub struct Store {
    db: Database,
    code_dir: PathBuf,
    /// Counts committed writes; caches tag what they read with it.
    generation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("code_dir", &self.code_dir)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) `<dir>/metadata.redb` and `<dir>/code/`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let code_dir = dir.join("code");
        std::fs::create_dir_all(&code_dir).map_err(|source| StoreError::CreateDir {
            path: code_dir.clone(),
            source,
        })?;
        let path = dir.join("metadata.redb");
        let db = Database::create(&path).map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        let tx = db.begin_write()?;
        for table in Table::ALL {
            tx.open_table(table.def())?;
        }
        tx.commit()?;
        Ok(Self {
            db,
            code_dir,
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Runs `f` in a read transaction (a consistent snapshot).
    pub fn read<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&ReadView) -> Result<T, E>,
    ) -> Result<T, E> {
        let tx = self.db.begin_read().map_err(StoreError::from)?;
        f(&ReadView { tx })
    }

    /// Runs `f` in a write transaction, committed (durably) only when `f` returns `Ok`.
    pub fn write<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&WriteView) -> Result<T, E>,
    ) -> Result<T, E> {
        let tx = self.db.begin_write().map_err(StoreError::from)?;
        let view = WriteView { tx };
        let value = f(&view)?;
        view.tx.commit().map_err(StoreError::from)?;
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(value)
    }

    /// The number of writes committed so far. Read it before reading the store: data read after
    /// it is at least that fresh, so a cache entry tagged with it is stale once it changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The path of a code object by its hex sha256.
    pub fn code_path(&self, sha256_hex: &str) -> PathBuf {
        self.code_dir.join(format!("{sha256_hex}.zip"))
    }

    /// Stores a code zip under its hex sha256 (written to a temporary file, synced, renamed).
    pub fn put_code(&self, sha256_hex: &str, bytes: &[u8]) -> Result<PathBuf, StoreError> {
        let path = self.code_path(sha256_hex);
        if path.exists() {
            return Ok(path);
        }
        let io = |source| StoreError::Code {
            path: path.clone(),
            source,
        };
        let mut tmp = tempfile_in(&self.code_dir).map_err(io)?;
        tmp.1.write_all(bytes).map_err(io)?;
        tmp.1.sync_all().map_err(io)?;
        std::fs::rename(&tmp.0, &path).map_err(io)?;
        Ok(path)
    }

    /// Removes code objects no row references, and temporary files a crash left behind.
    /// Run it only while nothing writes (at start-up). Returns how many files went.
    pub fn remove_unreferenced_code(
        &self,
        referenced: &std::collections::HashSet<String>,
    ) -> Result<usize, StoreError> {
        let io = |source| StoreError::Code {
            path: self.code_dir.clone(),
            source,
        };
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.code_dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let keep = name
                .strip_suffix(".zip")
                .is_some_and(|hex| referenced.contains(hex));
            if !keep {
                std::fs::remove_file(&path).map_err(|source| StoreError::Code {
                    path: path.clone(),
                    source,
                })?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Reads a code zip back.
    pub fn get_code(&self, sha256_hex: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.code_path(sha256_hex);
        std::fs::read(&path).map_err(|source| StoreError::Code { path, source })
    }
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let name = format!(".tmp-{}", crate::util::random_hex(16));
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    Ok((path, file))
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        key: key.to_string(),
        source,
    })
}

/// Reads inside a read transaction.
pub struct ReadView {
    tx: redb::ReadTransaction,
}

/// Reads and writes inside a write transaction.
pub struct WriteView {
    tx: redb::WriteTransaction,
}

/// Reading, for both views.
pub trait Reader {
    /// One row, decoded.
    fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<T>, StoreError>;
    /// Every row whose key starts with `prefix` (which must end in `/`), in key order; `None`
    /// lists the whole table.
    fn list<T: DeserializeOwned>(
        &self,
        table: Table,
        prefix: Option<&str>,
    ) -> Result<Vec<(String, T)>, StoreError>;
}

fn collect<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    prefix: Option<&str>,
) -> Result<Vec<(String, T)>, StoreError> {
    let mut out = Vec::new();
    let range = match prefix {
        Some(p) => {
            let end = prefix_end(p);
            table.range::<&str>(p..end.as_str())?
        }
        None => table.range::<&str>(..)?,
    };
    for row in range {
        let (k, v) = row?;
        let key = k.value().to_string();
        let value = decode(&key, v.value())?;
        out.push((key, value));
    }
    Ok(out)
}

impl Reader for ReadView {
    fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<T>, StoreError> {
        let t = self.tx.open_table(table.def())?;
        let row = t.get(key)?;
        row.map(|v| decode(key, v.value())).transpose()
    }

    fn list<T: DeserializeOwned>(
        &self,
        table: Table,
        prefix: Option<&str>,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let t = self.tx.open_table(table.def())?;
        collect(&t, prefix)
    }
}

impl Reader for WriteView {
    fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<T>, StoreError> {
        let t = self.tx.open_table(table.def())?;
        let row = t.get(key)?;
        row.map(|v| decode(key, v.value())).transpose()
    }

    fn list<T: DeserializeOwned>(
        &self,
        table: Table,
        prefix: Option<&str>,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let t = self.tx.open_table(table.def())?;
        collect(&t, prefix)
    }
}

impl WriteView {
    /// Inserts or replaces one row.
    pub fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Encode {
            key: key.to_string(),
            source,
        })?;
        let mut t = self.tx.open_table(table.def())?;
        t.insert(key, bytes.as_slice())?;
        Ok(())
    }

    /// Removes one row; true if it was there.
    pub fn delete(&self, table: Table, key: &str) -> Result<bool, StoreError> {
        let mut t = self.tx.open_table(table.def())?;
        let old = t.remove(key)?;
        Ok(old.is_some())
    }

    /// Removes every row whose key starts with `prefix` (ending in `/`).
    pub fn delete_prefix(&self, table: Table, prefix: &str) -> Result<(), StoreError> {
        let mut t = self.tx.open_table(table.def())?;
        let end = prefix_end(prefix);
        t.retain_in::<&str, _>(prefix..end.as_str(), |_, _| false)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_survive_reopen_and_prefixes_are_exact() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .write(|w| {
                    w.put(Table::Aliases, "f/a", &1u32)?;
                    w.put(Table::Aliases, "f/b", &2u32)?;
                    w.put(Table::Aliases, "f-2/a", &3u32)?;
                    w.put(Table::Aliases, "g/a", &4u32)?;
                    Ok::<_, StoreError>(())
                })
                .unwrap();
            store
                .write(|w| w.delete_prefix(Table::Aliases, "g/"))
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let rows: Vec<(String, u32)> = store.read(|r| r.list(Table::Aliases, Some("f/"))).unwrap();
        assert_eq!(rows, vec![("f/a".to_string(), 1), ("f/b".to_string(), 2)]);
        let all: Vec<(String, u32)> = store.read(|r| r.list(Table::Aliases, None)).unwrap();
        assert_eq!(all.len(), 3);
        let sha = "ab".repeat(32);
        store.put_code(&sha, b"zip").unwrap();
        assert_eq!(store.get_code(&sha).unwrap(), b"zip");
    }

    #[test]
    fn failed_write_is_not_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let result: Result<(), crate::error::ApiError> = store.write(|w| {
            w.put(Table::Functions, "f", &1u32)?;
            Err(crate::error::ApiError::Service("no".into()))
        });
        assert!(result.is_err());
        let row: Option<u32> = store.read(|r| r.get(Table::Functions, "f")).unwrap();
        assert_eq!(row, None);
    }
}
