//! The embedded SQLite database: opening it in WAL mode, its schema, and running work on it.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
};

use rusqlite::Connection;
use serde::Deserialize;

use super::StoreError;

/// How hard SQLite syncs each commit. `Normal` (the default) survives a crash or kill of the
/// process; `Full` also survives a power loss, at the cost of an fsync per commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    #[default]
    Normal,
    Full,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires_at INTEGER
);
CREATE TABLE IF NOT EXISTS userspace (
    area TEXT NOT NULL,
    key TEXT NOT NULL,
    data TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (area, key)
);
CREATE TABLE IF NOT EXISTS executions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at INTEGER NOT NULL,
    script TEXT NOT NULL,
    mode TEXT NOT NULL,
    function TEXT,
    duration_us INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    code INTEGER,
    message TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS executions_started ON executions (started_at);
CREATE TABLE IF NOT EXISTS cdrs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    call_id TEXT NOT NULL,
    from_uri TEXT NOT NULL,
    to_uri TEXT NOT NULL,
    script TEXT,
    started_at INTEGER NOT NULL,
    answered_at INTEGER,
    ended_at INTEGER,
    hangup_cause TEXT,
    hangup_side TEXT,
    digits TEXT NOT NULL,
    recordings TEXT NOT NULL,
    legs TEXT NOT NULL,
    result TEXT,
    error_code INTEGER,
    error_message TEXT
);
CREATE INDEX IF NOT EXISTS cdrs_started ON cdrs (started_at);
";

/// The embedded database, shared by the KV store, userspace tables and records.
///
/// It opens on first use ([`Store::lazy`]) or at once ([`Store::open`]): `callforge run` of
/// a script that never touches the store creates no file.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    synchronous: Synchronous,
    conn: OnceLock<Result<Mutex<Connection>, String>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn open_connection(path: &Path, synchronous: Synchronous) -> Result<Connection, String> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    }
    let conn = Connection::open(path).map_err(|e| e.to_string())?;
    let sync = match synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA busy_timeout = 5000;"
    ))
    .map_err(|e| e.to_string())?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("WAL mode refused (journal_mode is {mode})"));
    }
    conn.execute_batch(SCHEMA).map_err(|e| e.to_string())?;
    Ok(conn)
}

impl Store {
    /// A store that opens (creating when missing) the database at `path` on first use.
    pub fn lazy(path: &Path, synchronous: Synchronous) -> Self {
        Store {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                synchronous,
                conn: OnceLock::new(),
            }),
        }
    }

    /// Open (creating when missing) the database at `path` now, in WAL mode, with the schema.
    pub fn open(path: &Path, synchronous: Synchronous) -> Result<Self, StoreError> {
        let store = Self::lazy(path, synchronous);
        store.with_blocking(|_| Ok(()))?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Run `f` on the connection, on the calling thread.
    pub fn with_blocking<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let inner = &self.inner;
        let conn = inner
            .conn
            .get_or_init(|| open_connection(&inner.path, inner.synchronous).map(Mutex::new))
            .as_ref()
            .map_err(|message| StoreError::Open {
                path: inner.path.display().to_string(),
                message: message.clone(),
            })?;
        // A panic while holding the lock leaves the connection usable: SQLite rolls back
        // an unfinished transaction when it is dropped.
        let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
    }

    /// Run `f` on the connection on tokio's blocking pool.
    pub async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.with_blocking(f))
            .await
            .map_err(|e| StoreError::Join(e.to_string()))?
    }
}
