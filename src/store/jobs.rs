//! The `cxJob` queue in the embedded store: a job is a script function to call later with
//! JSON data, with attempts, progress, data and a result that survive a restart. [`JobStore`]
//! picks this table or the Redis queue (`redis_jobs`).

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde_json::{json, Value as Json};

use super::{now_ms, Store, StoreError};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    script TEXT NOT NULL,
    function TEXT NOT NULL,
    data TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    attempts_made INTEGER NOT NULL DEFAULT 0,
    backoff_ms INTEGER NOT NULL,
    state TEXT NOT NULL,
    run_at INTEGER NOT NULL,
    progress TEXT,
    job_data TEXT,
    result TEXT,
    error TEXT,
    created_at INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, run_at);
";

/// A job to add.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub script: String,
    pub function: String,
    pub data: Json,
    pub attempts: u32,
    pub backoff_ms: u64,
    pub delay_ms: u64,
}

/// A job the runner claimed.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub script: String,
    pub function: String,
    pub data: Json,
    pub attempts: u32,
    pub attempts_made: u32,
    pub backoff_ms: u64,
}

/// The jobs table.
#[derive(Debug, Clone)]
pub struct Jobs {
    store: Store,
    schema: Arc<AtomicBool>,
}

fn parse(text: Option<String>) -> Json {
    text.map(|t| serde_json::from_str(&t).unwrap_or(Json::String(t)))
        .unwrap_or(Json::Null)
}

fn public_row(r: &Row<'_>) -> rusqlite::Result<Json> {
    Ok(json!({
        "id": r.get::<_, i64>("id")?,
        "script": r.get::<_, String>("script")?,
        "function": r.get::<_, String>("function")?,
        "state": r.get::<_, String>("state")?,
        "attempts": r.get::<_, i64>("attempts")?,
        "attemptsMade": r.get::<_, i64>("attempts_made")?,
        "progress": parse(r.get("progress")?),
        "data": parse(r.get("job_data")?),
        "result": parse(r.get("result")?),
        "error": r.get::<_, Option<String>>("error")?,
        "createdAt": r.get::<_, i64>("created_at")?,
        "finishedAt": r.get::<_, Option<i64>>("finished_at")?,
    }))
}

impl Jobs {
    pub fn new(store: Store) -> Self {
        Jobs {
            store,
            schema: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Run `f` with the table created (once per process).
    async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let schema = self.schema.clone();
        self.store
            .with(move |c| {
                if !schema.load(Ordering::Acquire) {
                    c.execute_batch(SCHEMA)?;
                    schema.store(true, Ordering::Release);
                }
                f(c)
            })
            .await
    }

    pub async fn add(&self, job: NewJob) -> Result<i64, StoreError> {
        self.with(move |c| {
            let now = now_ms();
            c.execute(
                "INSERT INTO jobs (script, function, data, attempts, backoff_ms, state, run_at, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'waiting', ?6, ?7)",
                params![
                    job.script,
                    job.function,
                    job.data.to_string(),
                    job.attempts,
                    job.backoff_ms as i64,
                    now + job.delay_ms as i64,
                    now
                ],
            )?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    /// Jobs cut short by a stop of the process wait again; that attempt does not count.
    pub async fn recover(&self) -> Result<usize, StoreError> {
        self.with(|c| {
            Ok(c.execute(
                "UPDATE jobs SET state = 'waiting', attempts_made = MAX(attempts_made - 1, 0)
                 WHERE state = 'active'",
                [],
            )?)
        })
        .await
    }

    /// Mark at most `limit` due jobs active (one more attempt made) and return them.
    pub async fn claim_due(&self, limit: usize) -> Result<Vec<Claimed>, StoreError> {
        self.with(move |c| {
            let tx = c.transaction()?;
            let claimed = {
                let mut select = tx.prepare(
                    "SELECT id, script, function, data, attempts, attempts_made, backoff_ms FROM jobs
                     WHERE state = 'waiting' AND run_at <= ?1 ORDER BY run_at, id LIMIT ?2",
                )?;
                let rows = select
                    .query_map(params![now_ms(), limit as i64], |r| {
                        Ok(Claimed {
                            id: r.get(0)?,
                            script: r.get(1)?,
                            function: r.get(2)?,
                            data: parse(r.get(3)?),
                            attempts: r.get(4)?,
                            attempts_made: r.get::<_, u32>(5)? + 1,
                            backoff_ms: r.get::<_, i64>(6)?.max(0) as u64,
                        })
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                for job in &rows {
                    tx.execute(
                        "UPDATE jobs SET state = 'active', attempts_made = ?2 WHERE id = ?1",
                        params![job.id, job.attempts_made],
                    )?;
                }
                rows
            };
            tx.commit()?;
            Ok(claimed)
        })
        .await
    }

    /// When the next waiting job is due (ms since the epoch), if any.
    pub async fn next_due(&self) -> Result<Option<i64>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT MIN(run_at) FROM jobs WHERE state = 'waiting'",
                [],
                |r| r.get(0),
            )?)
        })
        .await
    }

    pub async fn complete(&self, id: i64, result: Json) -> Result<(), StoreError> {
        self.with(move |c| {
            c.execute(
                "UPDATE jobs SET state = 'completed', result = ?2, error = NULL, finished_at = ?3
                 WHERE id = ?1",
                params![id, result.to_string(), now_ms()],
            )?;
            Ok(())
        })
        .await
    }

    /// An attempt failed: wait until `retry_at`, or fail for good when it is `None`.
    pub async fn fail(
        &self,
        id: i64,
        error: String,
        retry_at: Option<i64>,
    ) -> Result<(), StoreError> {
        self.with(move |c| {
            match retry_at {
                Some(at) => c.execute(
                    "UPDATE jobs SET state = 'waiting', run_at = ?3, error = ?2 WHERE id = ?1",
                    params![id, error, at],
                )?,
                None => c.execute(
                    "UPDATE jobs SET state = 'failed', error = ?2, finished_at = ?3 WHERE id = ?1",
                    params![id, error, now_ms()],
                )?,
            };
            Ok(())
        })
        .await
    }

    /// Set `progress` or `job_data` of a job.
    pub async fn set_field(&self, id: i64, data: bool, value: Json) -> Result<bool, StoreError> {
        self.with(move |c| {
            let sql = if data {
                "UPDATE jobs SET job_data = ?2 WHERE id = ?1"
            } else {
                "UPDATE jobs SET progress = ?2 WHERE id = ?1"
            };
            Ok(c.execute(sql, params![id, value.to_string()])? == 1)
        })
        .await
    }

    /// Forget completed and failed jobs that finished before `before` (ms since the epoch).
    pub async fn purge_finished(&self, before: i64) -> Result<usize, StoreError> {
        self.with(move |c| {
            Ok(c.execute(
                "DELETE FROM jobs WHERE state IN ('completed', 'failed') AND finished_at < ?1",
                params![before],
            )?)
        })
        .await
    }

    /// The job as scripts see it: `{id, state, attempts, attemptsMade, progress, data, result, error, ...}`.
    pub async fn get(&self, id: i64) -> Result<Option<Json>, StoreError> {
        self.with(move |c| {
            Ok(
                c.query_row("SELECT * FROM jobs WHERE id = ?1", params![id], public_row)
                    .optional()?,
            )
        })
        .await
    }
}

/// Where the queue lives: the embedded store (one engine), or Redis (shared by engines).
#[derive(Debug, Clone)]
pub enum JobStore {
    Embedded(Jobs),
    Redis(super::redis_jobs::RedisJobs),
}

impl JobStore {
    pub async fn add(&self, job: NewJob) -> Result<i64, StoreError> {
        match self {
            JobStore::Embedded(j) => j.add(job).await,
            JobStore::Redis(r) => r.add(job).await,
        }
    }

    /// At startup (and, for Redis, on every round: leases of dead engines run out).
    pub async fn recover(&self) -> Result<usize, StoreError> {
        match self {
            JobStore::Embedded(j) => j.recover().await,
            JobStore::Redis(r) => r.recover().await,
        }
    }

    pub fn shared(&self) -> bool {
        matches!(self, JobStore::Redis(_))
    }

    /// Claim due jobs; in Redis the claim is a lease of `lease_ms` (an embedded queue has
    /// one runner, which recovers its jobs when it starts).
    pub async fn claim_due(&self, limit: usize, lease_ms: i64) -> Result<Vec<Claimed>, StoreError> {
        match self {
            JobStore::Embedded(j) => j.claim_due(limit).await,
            JobStore::Redis(r) => r.claim_due(limit, lease_ms).await,
        }
    }

    /// Keep a running job claimed (Redis); a no-op for the embedded store.
    pub async fn renew(&self, id: i64, lease_ms: i64) -> Result<(), StoreError> {
        match self {
            JobStore::Embedded(_) => Ok(()),
            JobStore::Redis(r) => r.renew(id, lease_ms).await,
        }
    }

    pub async fn next_due(&self) -> Result<Option<i64>, StoreError> {
        match self {
            JobStore::Embedded(j) => j.next_due().await,
            JobStore::Redis(r) => r.next_due().await,
        }
    }

    pub async fn complete(&self, id: i64, result: Json) -> Result<(), StoreError> {
        match self {
            JobStore::Embedded(j) => j.complete(id, result).await,
            JobStore::Redis(r) => r.complete(id, result).await,
        }
    }

    pub async fn fail(
        &self,
        id: i64,
        error: String,
        retry_at: Option<i64>,
    ) -> Result<(), StoreError> {
        match self {
            JobStore::Embedded(j) => j.fail(id, error, retry_at).await,
            JobStore::Redis(r) => r.fail(id, error, retry_at).await,
        }
    }

    pub async fn set_field(&self, id: i64, data: bool, value: Json) -> Result<bool, StoreError> {
        match self {
            JobStore::Embedded(j) => j.set_field(id, data, value).await,
            JobStore::Redis(r) => r.set_field(id, data, value).await,
        }
    }

    pub async fn purge_finished(&self, before: i64) -> Result<usize, StoreError> {
        match self {
            JobStore::Embedded(j) => j.purge_finished(before).await,
            JobStore::Redis(r) => r.purge_finished(before).await,
        }
    }

    pub async fn get(&self, id: i64) -> Result<Option<Json>, StoreError> {
        match self {
            JobStore::Embedded(j) => j.get(id).await,
            JobStore::Redis(r) => r.get(id).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_are_claimed_once_retried_and_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), Default::default()).unwrap();
        let jobs = Jobs::new(store);
        let job = |delay_ms| NewJob {
            script: "s".into(),
            function: "f".into(),
            data: json!({"n": 1}),
            attempts: 2,
            backoff_ms: 10,
            delay_ms,
        };
        let a = jobs.add(job(0)).await.unwrap();
        let later = jobs.add(job(60_000)).await.unwrap();
        let claimed = jobs.claim_due(10).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!((claimed[0].id, claimed[0].attempts_made), (a, 1));
        assert_eq!(claimed[0].data, json!({"n": 1}));
        assert!(
            jobs.claim_due(10).await.unwrap().is_empty(),
            "claimed twice"
        );
        // A stop while it ran: it waits again and that attempt does not count.
        assert_eq!(jobs.recover().await.unwrap(), 1);
        let again = jobs.claim_due(10).await.unwrap();
        assert_eq!((again[0].id, again[0].attempts_made), (a, 1));
        jobs.fail(a, "boom".into(), None).await.unwrap();
        let row = jobs.get(a).await.unwrap().unwrap();
        assert_eq!(row["state"], "failed");
        assert_eq!(row["error"], "boom");
        assert!(jobs.set_field(later, false, json!(50)).await.unwrap());
        assert_eq!(jobs.get(later).await.unwrap().unwrap()["progress"], 50);
        assert!(jobs.next_due().await.unwrap().unwrap() > now_ms() + 50_000);
        // Finished jobs are purged once old enough; waiting ones never.
        assert_eq!(jobs.purge_finished(now_ms() - 60_000).await.unwrap(), 0);
        assert_eq!(jobs.purge_finished(now_ms() + 1).await.unwrap(), 1);
        assert!(jobs.get(a).await.unwrap().is_none());
        assert!(jobs.get(later).await.unwrap().is_some());
    }
}
