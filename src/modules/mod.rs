//! Host modules scripts reach, built from `callforge.toml`: `kv`, `userspace`, `lookup`
//! (also `api.lookup`), `send` (also `api.send`), `originate`, the global `fetch`, and
//! ConnexCS's `cxRest`, `cxTemplate`, `cxPubSub`, `cxJob`, `cxLLM` and `cxOriginate`.
//!
//! Each is a `script::HostModule`; [`build`] checks the configuration and registers them.

pub mod api;
pub mod args;
pub mod fetch;
pub mod job;
pub mod kv;
pub mod llm;
pub mod lookup;
pub mod originate;
pub mod pubsub;
pub mod rest;
pub mod send;
pub mod smtp;
pub mod template;
pub mod userspace;
pub mod webhook;

use std::sync::Arc;

use crate::{
    config::Config,
    script::HostModules,
    store::{Kv, Outbox, OutboxConfig, PgStore, Records, RedisKv, SqliteKv, Store, StoreError},
};

/// A configuration problem found while building the modules: names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("[{key}]: {message}")]
    Config { key: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ModuleError {
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        ModuleError::Config {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The modules with the store and records they share.
pub struct Built {
    pub modules: HostModules,
    pub store: Store,
    /// Present when `[records] enabled` (the default).
    pub records: Option<Records>,
    /// The send channels; the SIP layer attaches `api.send.sip` here (`attach_sip`).
    pub send: Arc<send::SendService>,
    /// Filled in when SIP starts: `require('originate')` and `/v1/calls` use it.
    pub originator: originate::OriginatorSlot,
    /// The `cxJob` queue; `serve` starts its runner (`JobService::start`).
    pub jobs: Arc<job::JobService>,
}

/// This machine's name (a container's id under Docker), for the records' `node` column.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "callforge".into())
}

/// Build every module from `config`. `open_store_now` opens the database at once (for
/// `serve`, so a bad path is a startup error); otherwise it opens on first use.
pub fn build(config: &Config, open_store_now: bool) -> Result<Built, ModuleError> {
    let path = config.resolve(&config.store.path);
    let pg = match config.store.url.as_deref() {
        None | Some("") => None,
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => Some(
            PgStore::connect(url).map_err(|e| ModuleError::config("store", format!("url: {e}")))?,
        ),
        Some(_) => {
            return Err(ModuleError::config(
                "store",
                "url: expected a postgres:// URL (leave it out for the embedded SQLite file)",
            ))
        }
    };
    // With PostgreSQL the SQLite file holds only an embedded kv: open it when that is used.
    let store = if open_store_now && pg.is_none() {
        Store::open(&path, config.store.synchronous)?
    } else {
        Store::lazy(&path, config.store.synchronous)
    };
    let kv: Arc<dyn Kv> = match config.kv.backend.as_str() {
        "embedded" | "" => Arc::new(SqliteKv::new(store.clone())),
        url if url.starts_with("redis://") || url.starts_with("redis+unix://") => Arc::new(
            RedisKv::new(url).map_err(|e| ModuleError::config("kv", format!("backend: {e}")))?,
        ),
        other => {
            return Err(ModuleError::config(
                "kv",
                format!("backend = \"{other}\": expected \"embedded\" or a redis:// URL"),
            ))
        }
    };
    let userspace = match &pg {
        Some(pg) => crate::store::Userspace::postgres(store.clone(), pg.clone()),
        None => crate::store::Userspace::new(store.clone()),
    };
    let lookup = Arc::new(lookup::LookupService::new(config, userspace.clone())?);
    let templates = Arc::new(template::Templates::new(
        config.resolve(&config.templates.dir),
    ));
    let send = Arc::new(send::SendService::new(&config.send)?.with_templates(templates.clone()));
    let fetch = Arc::new(fetch::FetchService::new(&config.fetch)?);
    let redis_url = Some(config.kv.backend.as_str()).filter(|b| b.starts_with("redis"));
    let job_store = match redis_url {
        Some(url) => crate::store::jobs::JobStore::Redis(
            crate::store::redis_jobs::RedisJobs::new(url)
                .map_err(|e| ModuleError::config("kv", format!("backend: {e}")))?,
        ),
        None => {
            crate::store::jobs::JobStore::Embedded(crate::store::jobs::Jobs::new(store.clone()))
        }
    };
    let jobs = Arc::new(job::JobService::new(job_store, &config.jobs));

    let mut modules = HostModules::new();
    modules.register(&["kv", "cxKV"], Arc::new(kv::KvModule::new(kv)));
    modules.register(
        &["userspace", "cxUserspace"],
        Arc::new(userspace::UserspaceModule::new(userspace)),
    );
    modules.register(
        &["lookup"],
        Arc::new(lookup::LookupModule::new(lookup.clone())),
    );
    modules.register(
        &["send", "cxSend"],
        Arc::new(send::SendModule::new(send.clone())),
    );
    modules.register_global("api", Arc::new(api::ApiModule::new(lookup, send.clone())));
    let originator = originate::OriginatorSlot::default();
    modules.register(
        &["originate", "cxOriginate"],
        Arc::new(originate::OriginateModule::new(originator.clone())),
    );
    modules.register(
        &["cxRest", "rest"],
        Arc::new(rest::RestModule::new(Arc::new(rest::RestService::new(
            &config.rest,
            fetch.clone(),
        )?))),
    );
    modules.register(
        &["cxTemplate", "template"],
        Arc::new(template::TemplateModule::new(templates)),
    );
    modules.register(
        &["cxPubSub", "pubsub"],
        Arc::new(pubsub::PubSubModule::new(Arc::new(pubsub::PubSub::new(
            redis_url,
        )?))),
    );
    modules.register(
        &["cxJob", "job"],
        Arc::new(job::JobModule::new(jobs.clone())),
    );
    modules.register(
        &["cxLLM", "llm"],
        Arc::new(llm::LlmModule::new(Arc::new(llm::LlmService::new(
            &config.llm,
            fetch.clone(),
        )?))),
    );
    modules.register_global("fetch", Arc::new(fetch::FetchModule::new(fetch)));

    let records = if config.records.enabled {
        let jsonl = config.records.jsonl.as_ref().map(|p| config.resolve(p));
        match &pg {
            Some(pg) => {
                let outbox = Outbox::start(
                    pg.clone(),
                    OutboxConfig {
                        node: config.store.node.clone().unwrap_or_else(host_name),
                        memory_limit: config.store.queue_memory,
                        spool: config.resolve(&config.store.spool),
                        sync_spool: config.store.synchronous == crate::store::Synchronous::Full,
                    },
                )?;
                Some(Records::postgres(pg.clone(), outbox, jsonl)?)
            }
            None => Some(Records::new(store.clone(), jsonl)?),
        }
    } else {
        None
    };
    Ok(Built {
        modules,
        store,
        records,
        send,
        originator,
        jobs,
    })
}
