//! Host modules scripts reach, built from `callforge.toml`: `cxKV`, `cxUserspace`, `cxSend`,
//! `cxRest`, `cxTemplate`, `cxPubSub`, `cxJob`, `cxLLM`, `cxOriginate` (each also under
//! callforge's short name), `lookup` (also `api.lookup`), the npm package `rss-parser`, and the
//! globals `api` and `fetch`.
//!
//! Each is a `script::HostModule`, listed once in [`MODULES`] (or [`GLOBALS`]) with the names
//! scripts reach it by; [`build`] checks the configuration and registers them.

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
pub mod rss;
pub mod send;
pub mod smtp;
pub mod template;
pub mod userspace;
pub mod webhook;

use std::sync::Arc;

use crate::{
    config::Config,
    script::{HostModule, HostModules},
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

/// What module constructors may draw on: the configuration and the services modules share.
pub struct Shared<'a> {
    pub config: &'a Config,
    pub store: Store,
    pub kv: Arc<dyn Kv>,
    pub userspace: crate::store::Userspace,
    pub lookup: Arc<lookup::LookupService>,
    pub send: Arc<send::SendService>,
    pub fetch: Arc<fetch::FetchService>,
    pub templates: Arc<template::Templates>,
    pub jobs: Arc<job::JobService>,
    /// The Redis URL of `[kv] backend`, when it is one (cxPubSub shares it).
    pub redis_url: Option<&'a str>,
    pub originator: originate::OriginatorSlot,
}

/// One host module: the names scripts `require`/`import` it by (ConnexCS's name first,
/// callforge's short names after it) and how to build it.
pub struct Entry {
    pub names: &'static [&'static str],
    pub build: fn(&Shared<'_>) -> Result<Arc<dyn HostModule>, ModuleError>,
}

/// Every module `require(name)` and `import ... from 'name'` reach. A new module is one
/// entry here.
pub const MODULES: &[Entry] = &[
    Entry {
        names: &["cxKV", "kv"],
        build: |s| Ok(Arc::new(kv::KvModule::new(s.kv.clone()))),
    },
    Entry {
        names: &["cxUserspace", "userspace"],
        build: |s| {
            Ok(Arc::new(userspace::UserspaceModule::new(
                s.userspace.clone(),
            )))
        },
    },
    Entry {
        names: &["cxSend", "send"],
        build: |s| Ok(Arc::new(send::SendModule::new(s.send.clone()))),
    },
    Entry {
        names: &["lookup"],
        build: |s| Ok(Arc::new(lookup::LookupModule::new(s.lookup.clone()))),
    },
    Entry {
        names: &["cxOriginate", "originate"],
        build: |s| {
            Ok(Arc::new(originate::OriginateModule::new(
                s.originator.clone(),
            )))
        },
    },
    Entry {
        names: &["cxRest", "rest"],
        build: |s| {
            let service = rest::RestService::new(&s.config.rest, s.fetch.clone())?;
            Ok(Arc::new(rest::RestModule::new(Arc::new(service))))
        },
    },
    Entry {
        names: &["cxTemplate", "template"],
        build: |s| Ok(Arc::new(template::TemplateModule::new(s.templates.clone()))),
    },
    Entry {
        names: &["cxPubSub", "pubsub"],
        build: |s| {
            let pubsub = pubsub::PubSub::new(s.redis_url)?;
            Ok(Arc::new(pubsub::PubSubModule::new(Arc::new(pubsub))))
        },
    },
    Entry {
        names: &["cxJob", "job"],
        build: |s| Ok(Arc::new(job::JobModule::new(s.jobs.clone()))),
    },
    Entry {
        names: &["cxLLM", "llm"],
        build: |s| {
            let service = llm::LlmService::new(&s.config.llm, s.fetch.clone())?;
            Ok(Arc::new(llm::LlmModule::new(Arc::new(service))))
        },
    },
    Entry {
        names: &["rss-parser"],
        build: |s| {
            Ok(Arc::new(rss::RssModule::new(Arc::new(
                rss::RssService::new(s.fetch.clone()),
            ))))
        },
    },
];

/// Modules installed as globals (built on first access, in the modes they exist in).
pub const GLOBALS: &[Entry] = &[
    Entry {
        names: &["api"],
        build: |s| {
            Ok(Arc::new(api::ApiModule::new(
                s.lookup.clone(),
                s.send.clone(),
            )))
        },
    },
    Entry {
        names: &["fetch"],
        build: |s| Ok(Arc::new(fetch::FetchModule::new(s.fetch.clone()))),
    },
];

/// `[env]` as `process.env` text: numbers and booleans become their text; anything else is
/// a configuration error naming the key.
fn env_vars(config: &Config) -> Result<Vec<(String, String)>, ModuleError> {
    config
        .env
        .iter()
        .map(|(name, value)| {
            let text = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(ModuleError::config(
                        "env",
                        format!(
                            "{name}: expected text, a number or a boolean, not {}",
                            other.type_str()
                        ),
                    ))
                }
            };
            Ok((name.clone(), text))
        })
        .collect()
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
    let originator = originate::OriginatorSlot::default();
    let shared = Shared {
        config,
        store: store.clone(),
        kv,
        userspace,
        lookup,
        send: send.clone(),
        fetch,
        templates,
        jobs: jobs.clone(),
        redis_url,
        originator: originator.clone(),
    };

    let mut modules = HostModules::new();
    for entry in MODULES {
        modules.register(entry.names, (entry.build)(&shared)?);
    }
    for entry in GLOBALS {
        modules.register_global(entry.names[0], (entry.build)(&shared)?);
    }
    modules.set_env(env_vars(config)?);

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
