//! The shared PostgreSQL store (`[store] url = "postgres://..."`): its connection pool, its
//! schema migrations, and running queries on it from any thread.
//!
//! All PostgreSQL I/O runs on one dedicated thread with its own tokio runtime: connections
//! made by the pool are driven by tasks, and a connection spawned on a script worker's
//! runtime would stall whenever that worker is busy. Callers on any runtime await a
//! `JoinHandle`, which wakes across runtimes.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use super::StoreError;

/// How long one query (or one batch of records) may take before it counts as a failure.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a connection (made or taken from the pool).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections per engine: records take one, userspace reads and API pages the rest.
const POOL_SIZE: usize = 8;

/// Schema versions, applied in order at start; the applied count is kept in `callforge_schema`.
/// Append new versions, never edit an applied one.
const MIGRATIONS: &[&str] = &["
CREATE TABLE userspace (
    area TEXT NOT NULL,
    key TEXT NOT NULL,
    data TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (area, key)
);
CREATE TABLE executions (
    id BIGSERIAL PRIMARY KEY,
    uid TEXT NOT NULL UNIQUE,
    node TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    script TEXT NOT NULL,
    mode TEXT NOT NULL,
    function TEXT,
    duration_us BIGINT NOT NULL,
    ok BOOLEAN NOT NULL,
    code INTEGER,
    message TEXT,
    result TEXT
);
CREATE INDEX executions_started ON executions (started_at);
CREATE TABLE cdrs (
    id BIGSERIAL PRIMARY KEY,
    uid TEXT NOT NULL UNIQUE,
    node TEXT NOT NULL,
    call_id TEXT NOT NULL,
    from_uri TEXT NOT NULL,
    to_uri TEXT NOT NULL,
    script TEXT,
    started_at BIGINT NOT NULL,
    answered_at BIGINT,
    ended_at BIGINT,
    hangup_cause TEXT,
    hangup_side TEXT,
    digits TEXT NOT NULL,
    recordings TEXT NOT NULL,
    legs TEXT NOT NULL,
    result TEXT,
    error_code INTEGER,
    error_message TEXT
);
CREATE INDEX cdrs_started ON cdrs (started_at);
CREATE INDEX cdrs_call_id ON cdrs (call_id);
"];

/// Any number, as long as every engine uses the same one: serialises concurrent migrations.
const MIGRATION_LOCK: i64 = 0x6361_6c6c_666f_7267; // "callforg"

/// A pooled connection to the shared database.
pub type Client = deadpool_postgres::Object;

/// The PostgreSQL store; cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    rt: tokio::runtime::Handle,
    migrated: AtomicBool,
    /// Where to connect, without the password: for log lines.
    target: String,
    /// Dropping it stops the I/O thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.inner.target)
            .finish()
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The driver's Display hides the server's message ("db error"); the source has it.
        let detail = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .or_else(|| std::error::Error::source(&e).map(|s| s.to_string()));
        StoreError::Postgres(match detail {
            Some(d) => format!("{e}: {d}"),
            None => e.to_string(),
        })
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Postgres(format!("database unreachable: {e}"))
}

impl PgStore {
    /// A store for `url` (`postgres://user:pass@host:port/db`). Connects lazily: an
    /// unreachable database is not an error here; migrations are tried at once in the
    /// background and again before any query until they succeed.
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Postgres(format!("bad [store] url: {e}")))?;
        config.connect_timeout(CONNECT_TIMEOUT);
        if config.get_application_name().is_none() {
            config.application_name("callforge");
        }
        let target = format!(
            "{:?}/{}",
            config.get_hosts().first(),
            config.get_dbname().unwrap_or("")
        );
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Postgres(format!("cannot build the pool: {e}")))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("store-pg".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => {
                        let _ = handle_tx.send(Ok(rt.handle().clone()));
                        rt.block_on(async {
                            let _ = stopped.await;
                        });
                    }
                    Err(e) => {
                        let _ = handle_tx.send(Err(e.to_string()));
                    }
                }
            })
            .map_err(|e| StoreError::Postgres(format!("cannot start the I/O thread: {e}")))?;
        let rt = handle_rx
            .recv()
            .map_err(|e| StoreError::Postgres(e.to_string()))?
            .map_err(|e| StoreError::Postgres(format!("cannot start the I/O runtime: {e}")))?;
        let store = PgStore {
            inner: Arc::new(Inner {
                pool,
                rt,
                migrated: AtomicBool::new(false),
                target,
                _stop: stop,
            }),
        };
        let first = store.clone();
        store.inner.rt.spawn(async move {
            if let Err(e) = first.ensure_migrated().await {
                tracing::warn!(target = %first.inner.target, "database not ready yet, records queue until it is: {e}");
            }
        });
        Ok(store)
    }

    /// Spawn `fut` on the store's I/O thread.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.rt.spawn(fut)
    }

    /// Apply the migrations not yet applied (once per process, then a flag check).
    pub async fn ensure_migrated(&self) -> Result<(), StoreError> {
        if self.inner.migrated.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut client = self.inner.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await?;
        // Two engines starting together must not both create the tables.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS callforge_schema (version INTEGER NOT NULL)")
            .await?;
        let applied: i64 = tx
            .query_one("SELECT COUNT(*) FROM callforge_schema", &[])
            .await?
            .get(0);
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied.max(0) as usize) {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO callforge_schema (version) VALUES ($1)",
                &[&(i as i32 + 1)],
            )
            .await?;
        }
        tx.commit().await?;
        if !self.inner.migrated.swap(true, Ordering::AcqRel) {
            tracing::info!(target = %self.inner.target, "PostgreSQL store ready (schema version {})", MIGRATIONS.len());
        }
        Ok(())
    }

    /// A pooled connection, after the migrations. Call on the I/O thread (see [`Self::with`]).
    pub async fn client(&self) -> Result<Client, StoreError> {
        self.ensure_migrated().await?;
        self.inner.pool.get().await.map_err(pool_error)
    }

    /// Run `f` with a pooled connection on the store's I/O thread, within [`QUERY_TIMEOUT`].
    pub async fn with<R, F, Fut>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<R, StoreError>> + Send + 'static,
    {
        let store = self.clone();
        self.spawn(async move {
            tokio::time::timeout(QUERY_TIMEOUT, async move { f(store.client().await?).await })
                .await
                .map_err(|_| StoreError::Postgres("the database did not answer in time".into()))?
        })
        .await
        .map_err(|e| StoreError::Join(e.to_string()))?
    }
}
