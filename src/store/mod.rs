//! Persistence: the embedded SQLite database (KV, userspace tables, execution records, CDRs),
//! and for engines that share state the Redis KV backend and the PostgreSQL store.
//!
//! SQLite runs in WAL mode behind one mutex-guarded connection; blocking work goes through
//! `spawn_blocking`, so a script worker thread never waits on the disk.

pub mod jobs;
pub mod kv;
pub mod outbox;
mod pg_records;
pub mod postgres;
pub mod records;
pub mod redis_jobs;
pub mod redis_kv;
pub mod sqlite;
pub mod userspace;

pub use kv::{Kv, SqliteKv};
pub use outbox::{Outbox, OutboxConfig};
pub use postgres::PgStore;
pub use records::{Cdr, CdrError, ExecutionRecord, Page, RecordQuery, Records};
pub use redis_kv::RedisKv;
pub use sqlite::{Store, Synchronous};
pub use userspace::Userspace;

/// What went wrong in a store operation; the message is what a script or API client sees.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot open the store at {path}: {message}")]
    Open { path: String, message: String },
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("redis error: {0}")]
    Redis(String),
    #[error("value of '{0}' is not an integer")]
    NotInteger(String),
    #[error("{0}")]
    Conflict(String),
    #[error("cannot write records: {0}")]
    Write(String),
    #[error("the store's worker thread failed: {0}")]
    Join(String),
    #[error("cannot write the JSON-lines export {path}: {source}")]
    Export {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
