//! Execution records (one per routing/form/driver/app run) and call detail records (one per
//! class5 call), written to the embedded store before the run is acknowledged, listed by time
//! with cursor pagination, and optionally appended to a JSON-lines file.
//!
//! The voice layer writes a CDR when a call ends with [`Records::write_cdr`].

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use rusqlite::{params, Connection, Row};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{
    outbox::{Outbox, Outgoing},
    pg_records,
    postgres::PgStore,
    Store, StoreError,
};

/// Results larger than this (as JSON text) are recorded as `{"truncated": true, "bytes": N}`.
const MAX_RECORDED_RESULT: usize = 16 * 1024;
/// The most rows one page returns.
pub const MAX_PAGE: usize = 1000;

/// One script run outside a call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionRecord {
    /// Assigned by the store.
    #[serde(default)]
    pub id: i64,
    /// Unix milliseconds when the run was requested.
    pub started_at: i64,
    pub script: String,
    pub mode: String,
    /// The driver function or `fn` query parameter, when one was named.
    pub function: Option<String>,
    pub duration_us: u64,
    pub ok: bool,
    /// The script error's SIP-style code, when the run failed.
    pub code: Option<u16>,
    pub message: Option<String>,
    /// The run's result (truncated marker when large), when it succeeded.
    pub result: Option<Json>,
}

/// The error a call's script ended with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CdrError {
    pub code: u16,
    pub message: String,
}

/// A call detail record, written by the voice layer when a class5 call ends.
/// Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Cdr {
    /// Assigned by the store.
    #[serde(default)]
    pub id: i64,
    pub call_id: String,
    pub from: String,
    pub to: String,
    pub script: Option<String>,
    pub started_at: i64,
    pub answered_at: Option<i64>,
    pub ended_at: Option<i64>,
    /// e.g. `"normal_clearing"`, `"no_answer"`, a SIP code as text.
    pub hangup_cause: Option<String>,
    /// Who hung up: `"caller"`, `"callee"`, `"script"` or `"engine"`.
    pub hangup_side: Option<String>,
    /// Digit strings collected during the call, in order.
    #[serde(default)]
    pub digits: Vec<String>,
    /// Paths of recordings made during the call.
    #[serde(default)]
    pub recordings: Vec<String>,
    /// Bridged legs: free-form objects (`{to, started_at, answered_at, ended_at, cause}`).
    #[serde(default)]
    pub legs: Vec<Json>,
    /// What `main` returned, when it returned.
    pub result: Option<Json>,
    pub error: Option<CdrError>,
}

/// A time window and a page of it: rows with `started_at` in `[from, to)`, after the cursor.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RecordQuery {
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub limit: Option<usize>,
    /// The `next` cursor of the previous page.
    pub after: Option<i64>,
}

/// One page of records; `next` is the cursor for the following page, absent on the last.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<i64>,
}

/// Writes and reads records in the store.
///
/// Execution records go through one writer thread that commits whatever has queued up in one
/// transaction (group commit) and then acknowledges each record: every caller still waits
/// for its own commit, but a burst of runs costs one commit, not one each.
#[derive(Clone)]
pub struct Records {
    backend: Backend,
    export: Option<Export>,
}

/// Where records go: the embedded SQLite file, or the shared PostgreSQL database.
#[derive(Clone)]
enum Backend {
    Sqlite {
        store: Store,
        writer: std::sync::mpsc::Sender<PendingExecution>,
    },
    Postgres {
        pg: PgStore,
        outbox: Outbox,
    },
}

struct PendingExecution {
    record: ExecutionRecord,
    ack: tokio::sync::oneshot::Sender<Result<ExecutionRecord, StoreError>>,
}

/// The JSON-lines export file, shared by every clone.
type Export = Arc<Mutex<(PathBuf, File)>>;

/// The most records one group commit takes.
const MAX_BATCH: usize = 512;

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field(
                "backend",
                &match &self.backend {
                    Backend::Sqlite { store, .. } => format!("{store:?}"),
                    Backend::Postgres { pg, .. } => format!("{pg:?}"),
                },
            )
            .field("export", &self.export.as_ref().map(|_| "jsonl"))
            .finish()
    }
}

pub(crate) fn recorded_result(result: &Json) -> String {
    let text = result.to_string();
    if text.len() > MAX_RECORDED_RESULT {
        serde_json::json!({"truncated": true, "bytes": text.len()}).to_string()
    } else {
        text
    }
}

pub(crate) fn parse_json(text: Option<String>) -> Option<Json> {
    text.map(|t| serde_json::from_str(&t).unwrap_or(Json::String(t)))
}

impl Records {
    /// Records in `store`; with `jsonl`, every record is also appended to that file as a line.
    pub fn new(store: Store, jsonl: Option<PathBuf>) -> Result<Self, StoreError> {
        let export = open_export(jsonl)?;
        let (writer, queue) = std::sync::mpsc::channel::<PendingExecution>();
        // The thread holds no sender: it ends when the last `Records` is dropped.
        let (thread_store, thread_export) = (store.clone(), export.clone());
        std::thread::Builder::new()
            .name("records-writer".into())
            .spawn(move || write_executions(queue, thread_store, thread_export))
            .map_err(|e| StoreError::Write(format!("cannot start the records writer: {e}")))?;
        Ok(Records {
            backend: Backend::Sqlite { store, writer },
            export,
        })
    }

    /// Records in the shared PostgreSQL database, written through `outbox`.
    pub fn postgres(
        pg: PgStore,
        outbox: Outbox,
        jsonl: Option<PathBuf>,
    ) -> Result<Self, StoreError> {
        Ok(Records {
            backend: Backend::Postgres { pg, outbox },
            export: open_export(jsonl)?,
        })
    }

    fn export_line(&self, kind: &str, record: &impl Serialize) -> Result<(), StoreError> {
        export_line(self.export.as_ref(), kind, record)
    }

    /// Write an execution record; returns it with its id. Committed when this returns.
    pub async fn write_execution(
        &self,
        record: ExecutionRecord,
    ) -> Result<ExecutionRecord, StoreError> {
        let writer = match &self.backend {
            Backend::Sqlite { writer, .. } => writer,
            Backend::Postgres { outbox, .. } => {
                let written = outbox.write(Outgoing::Execution(record)).await?;
                let Outgoing::Execution(record) = written.into_inner() else {
                    return Err(StoreError::Write("the outbox answered another kind".into()));
                };
                self.export_line("execution", &record)?;
                return Ok(record);
            }
        };
        let (ack, done) = tokio::sync::oneshot::channel();
        writer
            .send(PendingExecution { record, ack })
            .map_err(|_| StoreError::Write("the records writer has stopped".into()))?;
        done.await
            .map_err(|_| StoreError::Write("the records writer has stopped".into()))?
    }

    /// Write a CDR; returns it with its id. Committed when this returns.
    pub async fn write_cdr(&self, cdr: Cdr) -> Result<Cdr, StoreError> {
        if let Backend::Postgres { outbox, .. } = &self.backend {
            let written = outbox.write(Outgoing::Cdr(cdr)).await?;
            let Outgoing::Cdr(cdr) = written.into_inner() else {
                return Err(StoreError::Write("the outbox answered another kind".into()));
            };
            self.export_line("cdr", &cdr)?;
            return Ok(cdr);
        }
        self.insert_cdr(cdr, true).await
    }

    /// Commit a call's CDR before its end goes on the wire, without exporting it: the final
    /// version follows through [`update_cdr`](Self::update_cdr). `None` on the Postgres
    /// backend, whose outbox has no update: there the CDR is written once, at the end.
    pub async fn write_cdr_ahead(&self, cdr: Cdr) -> Result<Option<Cdr>, StoreError> {
        match &self.backend {
            Backend::Sqlite { .. } => self.insert_cdr(cdr, false).await.map(Some),
            Backend::Postgres { .. } => Ok(None),
        }
    }

    fn sqlite(&self) -> Result<&Store, StoreError> {
        match &self.backend {
            Backend::Sqlite { store, .. } => Ok(store),
            Backend::Postgres { .. } => Err(StoreError::Write(
                "CDR updates need the embedded store".into(),
            )),
        }
    }

    async fn insert_cdr(&self, mut cdr: Cdr, export: bool) -> Result<Cdr, StoreError> {
        let store = self.sqlite()?;
        let records = self.clone();
        store
            .with(move |c| {
                c.execute(
                    "INSERT INTO cdrs (call_id, from_uri, to_uri, script, started_at, answered_at, ended_at,
                       hangup_cause, hangup_side, digits, recordings, legs, result, error_code, error_message)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                    rusqlite::params_from_iter(cdr_params(&cdr).iter().map(|b| b.as_ref())),
                )?;
                cdr.id = c.last_insert_rowid();
                if export {
                    records.export_line("cdr", &cdr)?;
                }
                Ok(cdr)
            })
            .await
    }

    /// Replace CDR `id` (written ahead) with its final version, and export that.
    pub async fn update_cdr(&self, id: i64, mut cdr: Cdr) -> Result<Cdr, StoreError> {
        let records = self.clone();
        self.sqlite()?
            .with(move |c| {
                let p = cdr_params(&cdr);
                c.execute(
                    "UPDATE cdrs SET call_id = ?1, from_uri = ?2, to_uri = ?3, script = ?4,
                       started_at = ?5, answered_at = ?6, ended_at = ?7, hangup_cause = ?8,
                       hangup_side = ?9, digits = ?10, recordings = ?11, legs = ?12, result = ?13,
                       error_code = ?14, error_message = ?15
                     WHERE id = ?16",
                    rusqlite::params_from_iter(
                        p.iter()
                            .map(|b| b.as_ref())
                            .chain(std::iter::once(&id as &dyn rusqlite::ToSql)),
                    ),
                )?;
                cdr.id = id;
                records.export_line("cdr", &cdr)?;
                Ok(cdr)
            })
            .await
    }

    pub async fn executions(&self, q: RecordQuery) -> Result<Page<ExecutionRecord>, StoreError> {
        let store = match &self.backend {
            Backend::Sqlite { store, .. } => store,
            Backend::Postgres { pg, .. } => return pg_records::executions(pg, q).await,
        };
        store
            .with(move |c| {
                page(c, "executions", &q, |r| {
                    Ok(ExecutionRecord {
                        id: r.get("id")?,
                        started_at: r.get("started_at")?,
                        script: r.get("script")?,
                        mode: r.get("mode")?,
                        function: r.get("function")?,
                        duration_us: r.get::<_, i64>("duration_us")?.max(0) as u64,
                        ok: r.get("ok")?,
                        code: r.get("code")?,
                        message: r.get("message")?,
                        result: parse_json(r.get("result")?),
                    })
                })
            })
            .await
    }

    pub async fn cdrs(&self, q: RecordQuery) -> Result<Page<Cdr>, StoreError> {
        let store = match &self.backend {
            Backend::Sqlite { store, .. } => store,
            Backend::Postgres { pg, .. } => return pg_records::cdrs(pg, q).await,
        };
        store
            .with(move |c| {
                page(c, "cdrs", &q, |r| {
                    let list = |col: &str| -> rusqlite::Result<Json> {
                        Ok(parse_json(r.get(col)?).unwrap_or(Json::Array(vec![])))
                    };
                    let strings =
                        |v: Json| -> Vec<String> { serde_json::from_value(v).unwrap_or_default() };
                    let code: Option<u16> = r.get("error_code")?;
                    let message: Option<String> = r.get("error_message")?;
                    Ok(Cdr {
                        id: r.get("id")?,
                        call_id: r.get("call_id")?,
                        from: r.get("from_uri")?,
                        to: r.get("to_uri")?,
                        script: r.get("script")?,
                        started_at: r.get("started_at")?,
                        answered_at: r.get("answered_at")?,
                        ended_at: r.get("ended_at")?,
                        hangup_cause: r.get("hangup_cause")?,
                        hangup_side: r.get("hangup_side")?,
                        digits: strings(list("digits")?),
                        recordings: strings(list("recordings")?),
                        legs: serde_json::from_value(list("legs")?).unwrap_or_default(),
                        result: parse_json(r.get("result")?),
                        error: code.map(|code| CdrError {
                            code,
                            message: message.unwrap_or_default(),
                        }),
                    })
                })
            })
            .await
    }
}

/// The 15 columns of a CDR row, in `insert_cdr`'s order.
fn cdr_params(cdr: &Cdr) -> [Box<dyn rusqlite::ToSql>; 15] {
    [
        Box::new(cdr.call_id.clone()),
        Box::new(cdr.from.clone()),
        Box::new(cdr.to.clone()),
        Box::new(cdr.script.clone()),
        Box::new(cdr.started_at),
        Box::new(cdr.answered_at),
        Box::new(cdr.ended_at),
        Box::new(cdr.hangup_cause.clone()),
        Box::new(cdr.hangup_side.clone()),
        Box::new(Json::from(cdr.digits.clone()).to_string()),
        Box::new(Json::from(cdr.recordings.clone()).to_string()),
        Box::new(Json::from(cdr.legs.clone()).to_string()),
        Box::new(cdr.result.as_ref().map(recorded_result)),
        Box::new(cdr.error.as_ref().map(|e| e.code)),
        Box::new(cdr.error.as_ref().map(|e| e.message.clone())),
    ]
}

fn open_export(jsonl: Option<PathBuf>) -> Result<Option<Export>, StoreError> {
    let Some(path) = jsonl else {
        return Ok(None);
    };
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|source| StoreError::Export {
            path: path.display().to_string(),
            source,
        })?;
    Ok(Some(Arc::new(Mutex::new((path, file)))))
}

fn export_line(
    export: Option<&Arc<Mutex<(PathBuf, File)>>>,
    kind: &str,
    record: &impl Serialize,
) -> Result<(), StoreError> {
    let Some(export) = export else {
        return Ok(());
    };
    let mut line = serde_json::json!({ "kind": kind, "record": record }).to_string();
    line.push('\n');
    let mut guard = export.lock().unwrap_or_else(|p| p.into_inner());
    let (path, file) = &mut *guard;
    file.write_all(line.as_bytes())
        .map_err(|source| StoreError::Export {
            path: path.display().to_string(),
            source,
        })
}

/// The writer thread: take what is queued, commit it in one transaction, acknowledge each.
fn write_executions(
    queue: std::sync::mpsc::Receiver<PendingExecution>,
    store: Store,
    export: Option<Export>,
) {
    while let Ok(first) = queue.recv() {
        // Records and their acknowledgements apart: the records are moved, not copied, and go
        // back to the callers, whose threads allocated them and free them.
        let (mut records, mut acks) = (Vec::new(), Vec::new());
        let mut next = Some(first);
        while let Some(PendingExecution { record, ack }) = next.take() {
            records.push(record);
            acks.push(ack);
            if records.len() < MAX_BATCH {
                next = queue.try_recv().ok();
            }
        }
        let written = store.with_blocking(|c| {
            let tx = c.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO executions (started_at, script, mode, function, duration_us, ok, code, message, result)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?;
                for record in records.iter_mut() {
                    insert.execute(params![
                        record.started_at,
                        record.script,
                        record.mode,
                        record.function,
                        record.duration_us as i64,
                        record.ok,
                        record.code,
                        record.message,
                        record.result.as_ref().map(recorded_result),
                    ])?;
                    record.id = tx.last_insert_rowid();
                }
            }
            tx.commit()?;
            Ok(())
        });
        match written {
            Ok(()) => {
                for (ack, record) in acks.into_iter().zip(records) {
                    let answer =
                        export_line(export.as_ref(), "execution", &record).map(|()| record);
                    let _ = ack.send(answer);
                }
            }
            Err(e) => {
                let message = e.to_string();
                for ack in acks {
                    let _ = ack.send(Err(StoreError::Write(message.clone())));
                }
            }
        }
    }
}

fn page<T>(
    c: &mut Connection,
    table: &str,
    q: &RecordQuery,
    row: impl Fn(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Page<T>, StoreError> {
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let sql = format!(
        "SELECT * FROM {table} WHERE started_at >= ?1 AND started_at < ?2 AND id > ?3 ORDER BY id LIMIT ?4"
    );
    let mut stmt = c.prepare(&sql)?;
    let mut items = stmt
        .query_map(
            params![
                q.from.unwrap_or(i64::MIN),
                q.to.unwrap_or(i64::MAX),
                q.after.unwrap_or(0),
                (limit + 1) as i64
            ],
            |r| Ok((r.get::<_, i64>("id")?, row(r)?)),
        )?
        .collect::<Result<Vec<_>, _>>()?;
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|(id, _)| *id)
    } else {
        None
    };
    Ok(Page {
        items: items.into_iter().map(|(_, t)| t).collect(),
        next,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Synchronous;

    fn exec(i: i64) -> ExecutionRecord {
        ExecutionRecord {
            id: 0,
            started_at: 1_000 + i,
            script: format!("s{i}"),
            mode: "class4".into(),
            function: None,
            duration_us: 12,
            ok: i % 2 == 0,
            code: (i % 2 == 1).then_some(604),
            message: (i % 2 == 1).then(|| "Number on DNC List".to_string()),
            result: (i % 2 == 0).then(|| serde_json::json!({"i": i})),
        }
    }

    #[tokio::test]
    async fn executions_page_by_time_and_cursor_and_export_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("r.db"), Synchronous::Normal).unwrap();
        let jsonl = dir.path().join("records.jsonl");
        let records = Records::new(store, Some(jsonl.clone())).unwrap();
        for i in 0..5 {
            records.write_execution(exec(i)).await.unwrap();
        }
        let q = RecordQuery {
            from: Some(1_001),
            to: Some(1_004),
            limit: Some(2),
            after: None,
        };
        let first = records.executions(q.clone()).await.unwrap();
        assert_eq!(
            first.items.iter().map(|r| r.started_at).collect::<Vec<_>>(),
            vec![1_001, 1_002]
        );
        assert_eq!(first.items[0].code, Some(604));
        assert_eq!(first.items[1].result, Some(serde_json::json!({"i": 2})));
        let second = records
            .executions(RecordQuery {
                after: first.next,
                ..q
            })
            .await
            .unwrap();
        assert_eq!(second.items.len(), 1);
        assert_eq!(second.next, None);
        let lines = std::fs::read_to_string(&jsonl).unwrap();
        assert_eq!(lines.lines().count(), 5);
        assert!(lines
            .lines()
            .all(|l| serde_json::from_str::<Json>(l).is_ok()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_group_committed_each_with_its_own_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("r.db"), Synchronous::Normal).unwrap();
        let records = Records::new(store, None).unwrap();
        let tasks: Vec<_> = (0..300)
            .map(|i| {
                let records = records.clone();
                tokio::spawn(async move { records.write_execution(exec(i)).await.unwrap() })
            })
            .collect();
        let mut ids = Vec::new();
        for t in tasks {
            let written = t.await.unwrap();
            assert_eq!(written.script, format!("s{}", written.started_at - 1_000));
            ids.push(written.id);
        }
        ids.sort();
        assert_eq!(ids, (1..=300).collect::<Vec<_>>());
        let page = records
            .executions(RecordQuery {
                limit: Some(1000),
                ..RecordQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(page.items.len(), 300);
    }

    #[tokio::test]
    async fn cdrs_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("r.db"), Synchronous::Full).unwrap();
        let records = Records::new(store, None).unwrap();
        let cdr = Cdr {
            call_id: "abc@host".into(),
            from: "sip:alice@a".into(),
            to: "sip:bob@b".into(),
            script: Some("ivr".into()),
            started_at: 5,
            answered_at: Some(6),
            ended_at: Some(9),
            hangup_cause: Some("normal_clearing".into()),
            hangup_side: Some("caller".into()),
            digits: vec!["12#".into()],
            recordings: vec!["recordings/abc.wav".into()],
            legs: vec![serde_json::json!({"to": "sip:carrier", "cause": "200"})],
            result: Some(serde_json::json!("done")),
            error: Some(CdrError {
                code: 480,
                message: "closed".into(),
            }),
            ..Cdr::default()
        };
        let written = records.write_cdr(cdr.clone()).await.unwrap();
        let page = records.cdrs(RecordQuery::default()).await.unwrap();
        assert_eq!(page.items, vec![written.clone()]);
        assert_eq!(Cdr { id: 0, ..written }, cdr);
    }
}
