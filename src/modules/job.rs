//! `require('cxJob')` (alias `job`): queue a script function to run later, with attempts.
//!
//! `await cxJob.add(script, 'fnName', data, {attempts, delay, backoff})` stores the job in the
//! embedded store and resolves with `{id, result, state()}`; `await job.result` waits for the
//! job's value (or rejects with a `JobError` after its last attempt). `cxJob.scriptForge(id,
//! data, opts)` queues the script's `main`. Inside the job, `cxJob.setProgress(p)` and
//! `cxJob.setData(d)` record JSON on it; `cxJob.get(id)` reads a job back.
//!
//! `serve` runs the queue ([`JobService::start`]); jobs wait in the store across restarts, and
//! an attempt cut short by a stop is made again. With `[kv] backend = "redis://..."` the
//! queue is in Redis and every engine on it runs its due jobs.

use std::{sync::Arc, time::Duration};

use serde_json::{json, Map, Value as Json};
use tokio::sync::{broadcast, Notify, Semaphore};

use super::args;
use crate::{
    config::JobsConfig,
    script::{
        library::valid_name, CompiledScript, Engine, HostCall, HostError, HostMethod, HostModule,
        HostObject, Invocation, Mode, ScriptLibrary,
    },
    store::{
        jobs::{Claimed, JobStore, NewJob},
        now_ms, StoreError,
    },
};

/// Most attempts a job may ask for.
pub const MAX_ATTEMPTS: u32 = 100;
/// Retries are never further apart than this.
const MAX_BACKOFF_MS: u64 = 3_600_000;

fn job_error(message: impl Into<String>) -> HostError {
    HostError::new("JobError", format!("cxJob: {}", message.into()))
}

fn store_error(e: StoreError) -> HostError {
    job_error(e.to_string())
}

/// The module's JS face. The job a run executes is found through the run's `ctx` (a job run's
/// second argument), which its own prelude also keeps under a symbol on `globalThis`.
const PRELUDE: &str = r#"(function (raw) {
  const current = () => globalThis[Symbol.for("callforge.cxJob.current")];
  const job = (id) => {
    let result = null;
    return {
      id: id,
      get result() { if (result === null) result = raw.result(id); return result; },
      state: () => raw.get(id),
    };
  };
  function add(script, fn, data, opts) {
    const env = (typeof process === "object" && process && process.env) || {};
    return raw.add(script === undefined ? null : script, fn === undefined ? null : fn,
      data === undefined ? null : data, opts === undefined ? null : opts,
      env.SCRIPTFORGE_NAME || null, env.SCRIPTFORGE_ID || null).then(job);
  }
  const inJob = (what) => {
    const j = current();
    if (!j) throw new TypeError("cxJob." + what + ": this run is not a job");
    return j;
  };
  return {
    add: add,
    scriptForge: (id, data, opts) => add(id, "main", data, opts),
    get: (id) => raw.get(id),
    setProgress: (progress) => inJob("setProgress").setProgress(progress === undefined ? null : progress),
    setData: (data) => inJob("setData").setData(data === undefined ? null : data),
  };
})"#;

/// The `ctx` of a job run: remembers itself for `cxJob.setProgress`/`setData`.
const CTX_PRELUDE: &str = r#"(function (raw) {
  Object.defineProperty(globalThis, Symbol.for("callforge.cxJob.current"), { value: raw });
  return raw;
})"#;

/// The queue: its store, its runner's wake-up, and who waits for results.
pub struct JobService {
    jobs: JobStore,
    config: JobsConfig,
    wake: Notify,
    finished: broadcast::Sender<i64>,
    ctx_prelude: Option<Arc<CompiledScript>>,
}

impl JobService {
    pub fn new(jobs: JobStore, config: &JobsConfig) -> Self {
        let (finished, _) = broadcast::channel(256);
        let ctx_prelude = match crate::script::compile("<cxJob ctx>", CTX_PRELUDE) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                tracing::error!("cxJob: the job ctx prelude does not compile: {e}");
                None
            }
        };
        JobService {
            jobs,
            config: config.clone(),
            wake: Notify::new(),
            finished,
            ctx_prelude,
        }
    }

    /// Run due jobs on `engine`, at most `[jobs] concurrency` at once, for as long as the
    /// process lives. Jobs interrupted by the last stop are made again first.
    pub fn start(self: &Arc<Self>, engine: Arc<Engine>, library: Arc<ScriptLibrary>) {
        let me = self.clone();
        tokio::spawn(async move {
            match me.jobs.recover().await {
                Ok(0) => {}
                Ok(n) => tracing::info!("cxJob: {n} job(s) interrupted by the last stop run again"),
                Err(e) => tracing::warn!("cxJob: cannot read the queue: {e}"),
            }
            let slots = Arc::new(Semaphore::new(me.config.concurrency.max(1)));
            let mut last_purge = 0;
            // While the queue cannot be read (Redis down), say so once, and when it is back.
            let mut unreadable = false;
            let mut report = |result: Result<(), StoreError>| match (result, unreadable) {
                (Err(e), false) => {
                    tracing::warn!("cxJob: cannot read the queue: {e}");
                    unreadable = true;
                }
                (Ok(()), true) => {
                    tracing::info!("cxJob: the queue can be read again");
                    unreadable = false;
                }
                _ => {}
            };
            loop {
                // Hourly, forget jobs finished longer ago than [jobs] keep_hours.
                if me.config.keep_hours > 0 && now_ms() - last_purge > 3_600_000 {
                    last_purge = now_ms();
                    let before =
                        last_purge - (me.config.keep_hours as i64).saturating_mul(3_600_000);
                    if let Err(e) = me.jobs.purge_finished(before).await {
                        tracing::warn!("cxJob: cannot purge finished jobs: {e}");
                    }
                }
                if me.jobs.shared() {
                    // Jobs of an engine that died go back to waiting when their lease ends.
                    report(me.jobs.recover().await.map(drop));
                }
                let free = slots.available_permits();
                if free > 0 {
                    let claimed = me.jobs.claim_due(free, me.lease_ms()).await;
                    match claimed {
                        Ok(claimed) => {
                            report(Ok(()));
                            for job in claimed {
                                let Ok(permit) = slots.clone().acquire_owned().await else {
                                    return;
                                };
                                let (me, engine, library) =
                                    (me.clone(), engine.clone(), library.clone());
                                tokio::spawn(async move {
                                    me.run_one(&engine, &library, job).await;
                                    drop(permit);
                                    me.wake.notify_one();
                                });
                            }
                        }
                        Err(e) => report(Err(e)),
                    }
                }
                let wait_ms = if slots.available_permits() == 0 {
                    1_000
                } else {
                    match me.jobs.next_due().await {
                        Ok(Some(at)) => (at - now_ms()).clamp(0, 1_000) as u64,
                        _ => 1_000,
                    }
                };
                if wait_ms > 0 {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
                        () = me.wake.notified() => {}
                    }
                }
            }
        });
    }

    fn lease_ms(&self) -> i64 {
        self.config.lease_ms.clamp(300, 86_400_000) as i64
    }

    async fn run_one(self: &Arc<Self>, engine: &Engine, library: &ScriptLibrary, job: Claimed) {
        // A shared queue's claim is a lease: renew it while the job runs.
        let renewing = self.jobs.shared().then(|| {
            let (jobs, id, lease) = (self.jobs.clone(), job.id, self.lease_ms());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(lease as u64 / 3)).await;
                    if let Err(e) = jobs.renew(id, lease).await {
                        tracing::warn!(job = id, "cxJob: cannot renew the job's lease: {e}");
                    }
                }
            })
        });
        // The script and its vars TOML, as an HTTP run of it would have them.
        let loaded = library
            .get(&job.script)
            .map_err(|e| e.to_string())
            .and_then(|script| match library.vars(&job.script) {
                Ok(Some(vars)) => Ok((script, crate::script::vars::merge(job.data.clone(), &vars))),
                Ok(None) => Ok((script, job.data.clone())),
                Err(e) => Err(e.to_string()),
            });
        let outcome = match loaded {
            Err(e) => Err(format!("script '{}': {e}", job.script)),
            Ok((script, data)) => {
                let mut inv = Invocation::new(script, Mode::App, data);
                inv.function = Some(job.function.clone());
                inv.ctx = Some(Box::new(JobCtx {
                    id: job.id,
                    service: self.clone(),
                }));
                match engine.run(inv).await {
                    Ok(out) => out.result.map_err(|e| format!("{}: {}", e.code, e.message)),
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        if let Some(task) = renewing {
            task.abort();
        }
        let saved = match outcome {
            Ok(value) => {
                tracing::info!(job = job.id, script = %job.script, function = %job.function, "cxJob: job completed");
                self.jobs.complete(job.id, value).await
            }
            Err(error) => {
                let retry_at = (job.attempts_made < job.attempts).then(|| {
                    let doublings = job.attempts_made.saturating_sub(1).min(30);
                    let delay = job
                        .backoff_ms
                        .saturating_mul(1 << doublings)
                        .min(MAX_BACKOFF_MS);
                    now_ms() + delay as i64
                });
                tracing::warn!(job = job.id, script = %job.script, function = %job.function,
                    attempt = job.attempts_made, of = job.attempts, retry = retry_at.is_some(),
                    "cxJob: job failed: {error}");
                self.jobs.fail(job.id, error, retry_at).await
            }
        };
        if let Err(e) = saved {
            tracing::warn!(job = job.id, "cxJob: cannot record the outcome: {e}");
        }
        let _ = self.finished.send(job.id);
    }

    fn add(self: &Arc<Self>, args: Vec<Json>) -> Result<HostCall, HostError> {
        let script = match args.first() {
            Some(Json::String(s)) => s.clone(),
            Some(Json::Number(n)) => n.to_string(),
            _ => {
                return Err(HostError::type_error(
                    "cxJob.add: argument 1 (script) must be a script name or process.env.SCRIPTFORGE_ID",
                ))
            }
        };
        let function = args::string("cxJob.add", &args, 1, "function name")?;
        let data = args.get(2).cloned().unwrap_or(Json::Null);
        let opts = args::object("cxJob.add", &args, 3, true)?;
        let current_name = args.get(4).and_then(Json::as_str);
        let current_id = args.get(5).and_then(Json::as_str);
        // The running script by its id or name; any other value names a script in the folder.
        let script = if Some(script.as_str()) == current_id || Some(script.as_str()) == current_name
        {
            current_name.unwrap_or(&script).to_string()
        } else {
            script
        };
        let script = script.strip_suffix(".js").unwrap_or(&script).to_string();
        if !valid_name(&script) {
            return Err(HostError::type_error(format!(
                "cxJob.add: '{script}' is not a script name"
            )));
        }
        let (attempts, backoff_ms, delay_ms) = self.options(&opts)?;
        let jobs = self.jobs.clone();
        let me = self.clone();
        let job = NewJob {
            script,
            function,
            data,
            attempts,
            backoff_ms,
            delay_ms,
        };
        Ok(HostCall::Pending(Box::pin(async move {
            let id = jobs.add(job).await.map_err(store_error)?;
            me.wake.notify_one();
            Ok(json!(id))
        })))
    }

    /// `{attempts, delay, backoff}`: backoff is milliseconds or `{delay}` (BullMQ's shape).
    fn options(&self, opts: &Map<String, Json>) -> Result<(u32, u64, u64), HostError> {
        let ms = |key: &str, v: Option<&Json>| -> Result<Option<u64>, HostError> {
            match v {
                None | Some(Json::Null) => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(n) if (0.0..=1e12).contains(&n) => Ok(Some(n as u64)),
                    _ => Err(HostError::type_error(format!(
                        "cxJob.add: opts.{key} must be a number of milliseconds"
                    ))),
                },
            }
        };
        let attempts = match opts.get("attempts") {
            None | Some(Json::Null) => 1,
            Some(v) => match v.as_u64() {
                Some(n @ 1..=100) => n as u32,
                _ => {
                    return Err(HostError::type_error(format!(
                        "cxJob.add: opts.attempts must be an integer from 1 to {MAX_ATTEMPTS}"
                    )))
                }
            },
        };
        let backoff = match opts.get("backoff") {
            Some(Json::Object(b)) => ms("backoff.delay", b.get("delay"))?,
            other => ms("backoff", other)?,
        }
        .unwrap_or(self.config.backoff_ms);
        let delay = ms("delay", opts.get("delay"))?.unwrap_or(0);
        Ok((attempts, backoff, delay))
    }

    fn job_id(method: &str, args: &[Json]) -> Result<i64, HostError> {
        args.first()
            .and_then(|v| {
                v.as_i64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            })
            .ok_or_else(|| {
                HostError::type_error(format!("cxJob.{method}: the job id must be a number"))
            })
    }

    /// Wait until job `id` is completed (its result) or failed for good (a `JobError`).
    fn result(self: &Arc<Self>, id: i64) -> HostCall {
        let me = self.clone();
        HostCall::Pending(Box::pin(async move {
            let mut finished = me.finished.subscribe();
            loop {
                let row = me
                    .jobs
                    .get(id)
                    .await
                    .map_err(store_error)?
                    .ok_or_else(|| job_error(format!("there is no job {id}")))?;
                match row["state"].as_str() {
                    Some("completed") => return Ok(row["result"].clone()),
                    Some("failed") => {
                        return Err(job_error(format!(
                            "job {id} failed after {} attempt(s): {}",
                            row["attemptsMade"],
                            row["error"].as_str().unwrap_or("")
                        )))
                    }
                    _ => {}
                }
                // A wake-up for any job, or a second's poll (another engine may run it).
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    loop {
                        match finished.recv().await {
                            Ok(done) if done == id => return,
                            Ok(_) => continue,
                            Err(broadcast::error::RecvError::Lagged(_)) => return,
                            Err(broadcast::error::RecvError::Closed) => {
                                std::future::pending::<()>().await
                            }
                        }
                    }
                })
                .await;
            }
        }))
    }
}

const METHODS: &[HostMethod] = &[
    HostMethod::asynchronous("add"),
    HostMethod::asynchronous("result"),
    HostMethod::asynchronous("get"),
];

/// `require('cxJob')`.
pub struct JobModule {
    service: Arc<JobService>,
}

impl JobModule {
    pub fn new(service: Arc<JobService>) -> Self {
        JobModule { service }
    }
}

impl HostModule for JobModule {
    fn instantiate(&self) -> Box<dyn HostObject> {
        Box::new(JobObject {
            service: self.service.clone(),
        })
    }
    fn prelude(&self) -> Option<&'static str> {
        Some(PRELUDE)
    }
}

struct JobObject {
    service: Arc<JobService>,
}

impl HostObject for JobObject {
    fn methods(&self) -> &[HostMethod] {
        METHODS
    }
    fn call(&self, method: &str, args: Vec<Json>) -> HostCall {
        let answer = (|| match method {
            "add" => self.service.add(args),
            "result" => Ok(self.service.result(JobService::job_id("result", &args)?)),
            "get" => {
                let id = JobService::job_id("get", &args)?;
                let jobs = self.service.jobs.clone();
                Ok(HostCall::Pending(Box::pin(async move {
                    Ok(jobs
                        .get(id)
                        .await
                        .map_err(store_error)?
                        .unwrap_or(Json::Null))
                })))
            }
            other => Err(HostError::type_error(format!(
                "cxJob has no method '{other}'"
            ))),
        })();
        answer.unwrap_or_else(|e| HostCall::Ready(Err(e)))
    }
}

const CTX_METHODS: &[HostMethod] = &[
    HostMethod::sync("id"),
    HostMethod::asynchronous("setProgress"),
    HostMethod::asynchronous("setData"),
];

/// The `ctx` of a job run (its second argument): `id()`, `setProgress`, `setData`.
struct JobCtx {
    id: i64,
    service: Arc<JobService>,
}

impl HostObject for JobCtx {
    fn methods(&self) -> &[HostMethod] {
        CTX_METHODS
    }
    fn call(&self, method: &str, args: Vec<Json>) -> HostCall {
        let data = match method {
            "id" => return HostCall::Ready(Ok(json!(self.id))),
            "setProgress" => false,
            "setData" => true,
            other => {
                return HostCall::Ready(Err(HostError::type_error(format!(
                    "cxJob has no method '{other}'"
                ))))
            }
        };
        let value = args.into_iter().next().unwrap_or(Json::Null);
        let jobs = self.service.jobs.clone();
        let id = self.id;
        HostCall::Pending(Box::pin(async move {
            jobs.set_field(id, data, value)
                .await
                .map(Json::Bool)
                .map_err(store_error)
        }))
    }
    fn prelude(&self) -> Option<Arc<CompiledScript>> {
        self.service.ctx_prelude.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preludes_compile() {
        crate::script::compile("prelude", PRELUDE).unwrap();
        crate::script::compile("prelude", CTX_PRELUDE).unwrap();
    }
}
