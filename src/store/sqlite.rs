//! The embedded SQLite database: opening it in WAL mode, its schema, and running work on it.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
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
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Open (creating when missing) the database at `path`, in WAL mode, with the schema.
    pub fn open(path: &Path, synchronous: Synchronous) -> Result<Self, StoreError> {
        let fail = |message: String| StoreError::Open {
            path: path.display().to_string(),
            message,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| fail(e.to_string()))?;
        }
        let conn = Connection::open(path).map_err(|e| fail(e.to_string()))?;
        let sync = match synchronous {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA busy_timeout = 5000;"
        ))
        .map_err(|e| fail(e.to_string()))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(|e| fail(e.to_string()))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(fail(format!("WAL mode refused (journal_mode is {mode})")));
        }
        conn.execute_batch(SCHEMA)
            .map_err(|e| fail(e.to_string()))?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `f` on the connection, on the calling thread.
    pub fn with_blocking<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        // A panic while holding the lock leaves the connection usable: SQLite rolls back
        // an unfinished transaction when it is dropped.
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
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
