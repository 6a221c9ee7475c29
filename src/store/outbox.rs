//! The records outbox of the PostgreSQL store: execution records and CDRs are written in
//! group commits, and survive the database being unreachable.
//!
//! While the database answers, each caller waits for the commit of the batch that carries
//! its record (as with SQLite). When a write fails, the batch and everything after it is
//! acknowledged as *queued*: up to `memory_limit` records wait in memory, the rest are
//! appended to JSON-lines files in the spool folder, and a retry every second writes them
//! (memory, then spool files oldest first) once the database is back. Each record carries a
//! unique id (`uid`), so a batch whose commit outcome was lost is replayed without duplicates.
//! Spool files left by an earlier run are replayed at start.

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{
    postgres::{PgStore, QUERY_TIMEOUT},
    records::{recorded_result, Cdr, ExecutionRecord},
    StoreError,
};

/// The most records one commit takes.
const MAX_BATCH: usize = 512;
/// How often a backlog is retried.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// A record on its way to the database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", content = "record", rename_all = "lowercase")]
pub enum Outgoing {
    Execution(ExecutionRecord),
    Cdr(Cdr),
}

/// PostgreSQL's text cannot hold NUL (a script's error message can): U+FFFD stands in.
fn scrub(s: &mut String) {
    if s.contains('\0') {
        *s = s.replace('\0', "\u{FFFD}");
    }
}

impl Outgoing {
    fn scrub(&mut self) {
        match self {
            Outgoing::Execution(r) => {
                for s in [&mut r.script, &mut r.mode] {
                    scrub(s);
                }
                for s in [r.function.as_mut(), r.message.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    scrub(s);
                }
            }
            Outgoing::Cdr(c) => {
                for s in [&mut c.call_id, &mut c.from, &mut c.to] {
                    scrub(s);
                }
                let error = c.error.as_mut().map(|e| &mut e.message);
                for s in [
                    c.script.as_mut(),
                    c.hangup_cause.as_mut(),
                    c.hangup_side.as_mut(),
                    error,
                ]
                .into_iter()
                .flatten()
                {
                    scrub(s);
                }
            }
        }
    }

    fn set_id(&mut self, id: i64) {
        match self {
            Outgoing::Execution(r) => r.id = id,
            Outgoing::Cdr(c) => c.id = id,
        }
    }
}

/// What goes to memory, the spool and the database: the record with its unique id.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Queued {
    uid: String,
    #[serde(flatten)]
    item: Outgoing,
}

/// Whether a record was committed or only queued, with the record (id set when committed).
#[derive(Debug)]
pub enum Written {
    Committed(Outgoing),
    Queued(Outgoing),
}

impl Written {
    pub fn into_inner(self) -> Outgoing {
        match self {
            Written::Committed(o) | Written::Queued(o) => o,
        }
    }
}

struct Pending {
    queued: Queued,
    ack: oneshot::Sender<Result<Written, StoreError>>,
}

/// The bounds of the outbox.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// This engine's name in the `node` column and in each record's uid.
    pub node: String,
    /// Records kept in memory while the database is unreachable; beyond, they go to disk.
    pub memory_limit: usize,
    /// The spool folder.
    pub spool: PathBuf,
    /// fsync each spool append (`[store] synchronous = "full"`).
    pub sync_spool: bool,
}

/// The sending side; cheap to clone. The writer task ends when the last clone is dropped.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Pending>,
    node: std::sync::Arc<str>,
    prefix: std::sync::Arc<str>,
    seq: std::sync::Arc<AtomicU64>,
}

impl Outbox {
    /// Start the writer on the store's I/O thread.
    pub fn start(pg: PgStore, config: OutboxConfig) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&config.spool).map_err(|e| {
            StoreError::Write(format!(
                "cannot create the spool folder {}: {e}",
                config.spool.display()
            ))
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        // Unique across restarts and engines: node, start time, a random part, a counter.
        let prefix = format!(
            "{}-{:x}-{:08x}",
            config.node,
            super::now_ms(),
            fastrand::u32(..)
        );
        let node: std::sync::Arc<str> = config.node.clone().into();
        let writer = Writer {
            pg: pg.clone(),
            node: node.clone(),
            memory: VecDeque::new(),
            spool: Spool::new(config.spool, config.sync_spool),
            memory_limit: config.memory_limit,
            down_since: None,
        };
        pg.spawn(writer.run(rx));
        Ok(Outbox {
            tx,
            node,
            prefix: prefix.into(),
            seq: Default::default(),
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Hand a record over; returns once it is committed, or queued when the database is down.
    pub async fn write(&self, mut item: Outgoing) -> Result<Written, StoreError> {
        item.scrub();
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let queued = Queued {
            uid: format!("{}-{n}", self.prefix),
            item,
        };
        let (ack, done) = oneshot::channel();
        let stopped = || StoreError::Write("the records writer has stopped".into());
        self.tx
            .send(Pending { queued, ack })
            .map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())?
    }
}

struct Writer {
    pg: PgStore,
    node: std::sync::Arc<str>,
    memory: VecDeque<Queued>,
    spool: Spool,
    memory_limit: usize,
    /// When the first write failed, while there is a backlog.
    down_since: Option<Instant>,
}

impl Writer {
    fn backlog(&self) -> bool {
        !self.memory.is_empty() || self.spool.pending
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Pending>) {
        self.spool.pending = self.spool.has_files();
        let mut next_retry = Instant::now();
        loop {
            let first = if self.backlog() {
                tokio::select! {
                    p = rx.recv() => p,
                    _ = tokio::time::sleep_until(next_retry.into()) => {
                        self.flush().await;
                        next_retry = Instant::now() + RETRY_EVERY;
                        continue;
                    }
                }
            } else {
                rx.recv().await
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            if self.backlog() {
                // Keep the order: new records go behind the backlog.
                self.enqueue(batch);
                if Instant::now() >= next_retry {
                    self.flush().await;
                    next_retry = Instant::now() + RETRY_EVERY;
                }
                continue;
            }
            let items: Vec<&Queued> = batch.iter().map(|p| &p.queued).collect();
            match insert(&self.pg, &self.node, &items).await {
                Ok(ids) => {
                    for (pending, id) in batch.into_iter().zip(ids) {
                        let mut item = pending.queued.item;
                        let answer = id.map(|id| {
                            item.set_id(id);
                            Written::Committed(item)
                        });
                        let _ = pending.ack.send(answer);
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        "cannot write records to PostgreSQL, queueing them until it answers: {e}"
                    );
                    self.down_since = Some(Instant::now());
                    self.enqueue(batch);
                    next_retry = Instant::now() + RETRY_EVERY;
                }
            }
        }
        // Every sender is gone (the process is ending): one last try, then the spool.
        if self.backlog() {
            self.flush().await;
            for q in std::mem::take(&mut self.memory) {
                if let Err(e) = self.spool.append(&q) {
                    tracing::error!(uid = %q.uid, "record lost: {e}");
                }
            }
        }
    }

    /// Queue `batch` (memory up to the limit, then spool) and acknowledge each as queued.
    fn enqueue(&mut self, batch: Vec<Pending>) {
        for pending in batch {
            let answer = if self.memory.len() < self.memory_limit {
                self.memory.push_back(pending.queued.clone());
                Ok(Written::Queued(pending.queued.item))
            } else {
                match self.spool.append(&pending.queued) {
                    Ok(()) => Ok(Written::Queued(pending.queued.item)),
                    // Neither the database nor the disk took it: the caller hears so.
                    Err(e) => Err(e),
                }
            };
            let _ = pending.ack.send(answer);
        }
    }

    /// Write the backlog: memory first, then spool files. Stops at the first failure.
    async fn flush(&mut self) {
        let mut written = 0usize;
        while !self.memory.is_empty() {
            let n = self.memory.len().min(MAX_BATCH);
            let items: Vec<&Queued> = self.memory.iter().take(n).collect();
            match insert(&self.pg, &self.node, &items).await {
                Ok(_) => {
                    self.memory.drain(..n);
                    written += n;
                }
                Err(e) => {
                    tracing::debug!("records backlog still waiting: {e}");
                    return;
                }
            }
        }
        if self.spool.pending {
            match self.replay_spool().await {
                Ok(n) => written += n,
                Err(e) => {
                    tracing::debug!("spooled records still waiting: {e}");
                    return;
                }
            }
        }
        if written > 0 || self.down_since.is_some() {
            let down = self
                .down_since
                .take()
                .map(|t| format!(" after {:.1} s", t.elapsed().as_secs_f64()))
                .unwrap_or_default();
            tracing::info!("PostgreSQL answers again{down}: wrote {written} queued records");
        }
    }

    /// Replay every spool file, oldest first, deleting each once committed.
    async fn replay_spool(&mut self) -> Result<usize, StoreError> {
        self.spool.close_current();
        let mut written = 0;
        for path in self.spool.files()? {
            let items = Spool::read(&path)?;
            for chunk in items.chunks(MAX_BATCH) {
                let refs: Vec<&Queued> = chunk.iter().collect();
                insert(&self.pg, &self.node, &refs).await?;
            }
            written += items.len();
            std::fs::remove_file(&path)
                .map_err(|e| StoreError::Write(format!("cannot remove {}: {e}", path.display())))?;
        }
        self.spool.pending = false;
        Ok(written)
    }
}

const EXECUTION_SQL: &str = "INSERT INTO executions
    (uid, node, started_at, script, mode, function, duration_us, ok, code, message, result)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
    ON CONFLICT (uid) DO NOTHING RETURNING id";
const CDR_SQL: &str = "INSERT INTO cdrs
    (uid, node, call_id, from_uri, to_uri, script, started_at, answered_at, ended_at, hangup_cause,
     hangup_side, digits, recordings, legs, result, error_code, error_message)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
    ON CONFLICT (uid) DO NOTHING RETURNING id";

/// Why a batch was not written.
enum InsertError {
    /// No connection, a cut one, a timeout: try again later.
    Unreachable(StoreError),
    /// The server answered with an error: some record in the batch is at fault.
    Refused(StoreError),
}

impl From<tokio_postgres::Error> for InsertError {
    fn from(e: tokio_postgres::Error) -> Self {
        // Class 08 (connection), 57P (shutdown) and 53 (resources) pass; others are the data's.
        let transient = e.as_db_error().is_none_or(|d| {
            let code = d.code().code();
            code.starts_with("08") || code.starts_with("57P") || code.starts_with("53")
        });
        if transient {
            InsertError::Unreachable(e.into())
        } else {
            InsertError::Refused(e.into())
        }
    }
}

impl From<StoreError> for InsertError {
    fn from(e: StoreError) -> Self {
        InsertError::Unreachable(e)
    }
}

/// Insert `items`: one transaction when the database takes them all; when it refuses the
/// batch, each record alone, so one bad record cannot hold the others back forever. The
/// result per record: its id (0 when it was already there, from an earlier replay), or why
/// the database refused it. `Err` when the database is unreachable.
async fn insert(
    pg: &PgStore,
    node: &str,
    items: &[&Queued],
) -> Result<Vec<Result<i64, StoreError>>, StoreError> {
    match insert_batch(pg, node, items).await {
        Ok(ids) => Ok(ids.into_iter().map(Ok).collect()),
        Err(InsertError::Unreachable(e)) => Err(e),
        Err(InsertError::Refused(e)) if items.len() == 1 => {
            tracing::error!(uid = %items[0].uid, "PostgreSQL refused a record, dropped: {e}");
            Ok(vec![Err(e)])
        }
        Err(InsertError::Refused(_)) => {
            let mut results = Vec::with_capacity(items.len());
            for item in items {
                match insert_batch(pg, node, &[*item]).await {
                    Ok(ids) => results.push(Ok(ids.first().copied().unwrap_or(0))),
                    Err(InsertError::Unreachable(e)) => return Err(e),
                    Err(InsertError::Refused(e)) => {
                        tracing::error!(uid = %item.uid, "PostgreSQL refused a record, dropped: {e}");
                        results.push(Err(e));
                    }
                }
            }
            Ok(results)
        }
    }
}

/// Insert `items` in one transaction, the statements pipelined; the ids in order (0 for a
/// record already there: a replay of a batch whose commit was in fact made).
async fn insert_batch(
    pg: &PgStore,
    node: &str,
    items: &[&Queued],
) -> Result<Vec<i64>, InsertError> {
    let work = async {
        let mut client = pg.client().await?;
        let tx = client.transaction().await?;
        let execution = tx.prepare_cached(EXECUTION_SQL).await?;
        let cdr = tx.prepare_cached(CDR_SQL).await?;
        let rows = futures::future::try_join_all(items.iter().map(|q| {
            let (tx, execution, cdr) = (&tx, &execution, &cdr);
            async move {
                match &q.item {
                    Outgoing::Execution(r) => {
                        let duration = r.duration_us.min(i64::MAX as u64) as i64;
                        let code = r.code.map(i32::from);
                        let result = r.result.as_ref().map(recorded_result);
                        tx.query_opt(
                            execution,
                            &[
                                &q.uid,
                                &node,
                                &r.started_at,
                                &r.script,
                                &r.mode,
                                &r.function,
                                &duration,
                                &r.ok,
                                &code,
                                &r.message,
                                &result,
                            ],
                        )
                        .await
                    }
                    Outgoing::Cdr(c) => {
                        let digits = serde_json::Value::from(c.digits.clone()).to_string();
                        let recordings = serde_json::Value::from(c.recordings.clone()).to_string();
                        let legs = serde_json::Value::from(c.legs.clone()).to_string();
                        let result = c.result.as_ref().map(recorded_result);
                        let code = c.error.as_ref().map(|e| i32::from(e.code));
                        let message = c.error.as_ref().map(|e| e.message.clone());
                        tx.query_opt(
                            cdr,
                            &[
                                &q.uid,
                                &node,
                                &c.call_id,
                                &c.from,
                                &c.to,
                                &c.script,
                                &c.started_at,
                                &c.answered_at,
                                &c.ended_at,
                                &c.hangup_cause,
                                &c.hangup_side,
                                &digits,
                                &recordings,
                                &legs,
                                &result,
                                &code,
                                &message,
                            ],
                        )
                        .await
                    }
                }
            }
        }))
        .await?;
        tx.commit().await?;
        Ok::<_, InsertError>(
            rows.into_iter()
                .map(|r| r.map(|r| r.get::<_, i64>(0)).unwrap_or(0))
                .collect(),
        )
    };
    tokio::time::timeout(QUERY_TIMEOUT, work)
        .await
        .map_err(|_| {
            InsertError::Unreachable(StoreError::Postgres(
                "the database did not answer in time".into(),
            ))
        })?
}

/// The spool folder: JSON-lines files of queued records, one file per spell of spilling.
struct Spool {
    dir: PathBuf,
    sync: bool,
    current: Option<File>,
    /// Whether some file may hold records not yet written.
    pending: bool,
}

static SPOOL_FILES: AtomicU64 = AtomicU64::new(0);

impl Spool {
    fn new(dir: PathBuf, sync: bool) -> Self {
        Spool {
            dir,
            sync,
            current: None,
            pending: false,
        }
    }

    fn append(&mut self, q: &Queued) -> Result<(), StoreError> {
        let err = |e: std::io::Error| {
            StoreError::Write(format!("cannot spool to {}: {e}", self.dir.display()))
        };
        if self.current.is_none() {
            // Names sort by creation: milliseconds, then a process-wide counter.
            let name = format!(
                "spool-{:016}-{:06}.jsonl",
                super::now_ms(),
                SPOOL_FILES.fetch_add(1, Ordering::Relaxed)
            );
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(name))
                .map_err(err)?;
            self.current = Some(file);
        }
        let mut line = serde_json::to_string(q)
            .map_err(|e| StoreError::Write(format!("cannot encode a record: {e}")))?;
        line.push('\n');
        if let Some(file) = self.current.as_mut() {
            // One write per line: a crash leaves at worst a torn last line, skipped on replay.
            file.write_all(line.as_bytes()).map_err(err)?;
            if self.sync {
                file.sync_data().map_err(err)?;
            }
        }
        self.pending = true;
        Ok(())
    }

    fn close_current(&mut self) {
        self.current = None;
    }

    fn files(&self) -> Result<Vec<PathBuf>, StoreError> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| StoreError::Write(format!("cannot read {}: {e}", self.dir.display())))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_spool_file(p))
            .collect();
        files.sort();
        Ok(files)
    }

    fn has_files(&self) -> bool {
        self.files().map(|f| !f.is_empty()).unwrap_or(false)
    }

    fn read(path: &Path) -> Result<Vec<Queued>, StoreError> {
        let file = File::open(path)
            .map_err(|e| StoreError::Write(format!("cannot read {}: {e}", path.display())))?;
        let mut items = Vec::new();
        for (n, line) in BufReader::new(file).lines().enumerate() {
            let line = line
                .map_err(|e| StoreError::Write(format!("cannot read {}: {e}", path.display())))?;
            match serde_json::from_str::<Queued>(&line) {
                Ok(q) => items.push(q),
                Err(e) => tracing::warn!(
                    "skipping line {} of {}: not a record ({e})",
                    n + 1,
                    path.display()
                ),
            }
        }
        Ok(items)
    }
}

fn is_spool_file(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("spool-") && n.ends_with(".jsonl"))
}
