//! `require('cxKV')` (alias `kv`) over the configured backend (embedded or Redis), in
//! ConnexCS's shape: `kv` (values as text) and `ko` (values as objects), each with
//! `get/set(key, value, ttlSeconds)/del`, beside `incr(key, by, expireSeconds)`, `keys(prefix)`
//! and `usage()`. callforge's own `get/set/del` (any JSON value) stay at the top level.

use std::sync::Arc;

use serde_json::{json, Value as Json};

use super::args;
use crate::{
    script::{HostCall, HostError, HostMethod, HostModule, HostObject},
    store::{Kv, StoreError},
};

const METHODS: &[HostMethod] = &[
    HostMethod::asynchronous("get"),
    HostMethod::asynchronous("set"),
    HostMethod::asynchronous("incr"),
    HostMethod::asynchronous("del"),
    HostMethod::asynchronous("keys"),
];

/// What scripts see: the raw methods, plus the `kv`/`ko` maps and `usage()` built on them.
/// `kv.set` stores text (a non-string is stored as its JSON text, `String(v)` for numbers and
/// booleans) and `kv.get` answers text (a number `incr` made answers as its digits), as a
/// Redis-backed store would; `ko.get` parses stored JSON text back into an object.
const PRELUDE: &str = r#"(function (raw) {
    const text = function (v) {
        if (v === null || v === undefined) return null;
        if (typeof v === 'string') return v;
        if (typeof v === 'object') return JSON.stringify(v);
        return String(v);
    };
    const object = function (v) {
        if (typeof v !== 'string') return v;
        try { return JSON.parse(v); } catch (e) { return v; }
    };
    const kv = {
        get: function (key) { return raw.get(key).then(text); },
        set: function (key, value, ttlSeconds) { return raw.set(key, text(value), ttlSeconds); },
        del: function (key) { return raw.del(key); },
    };
    const ko = {
        get: function (key) { return raw.get(key).then(object); },
        set: function (key, value, ttlSeconds) { return raw.set(key, value, ttlSeconds); },
        del: function (key) { return raw.del(key); },
    };
    return {
        kv: kv,
        ko: ko,
        get: raw.get,
        set: raw.set,
        del: raw.del,
        incr: raw.incr,
        keys: raw.keys,
        usage: function () {
            return raw.keys('').then(function (keys) { return { keys: keys.length }; });
        },
    };
})"#;

/// The names `import { ... } from 'cxKV'` offers.
const EXPORTS: &[&str] = &["kv", "ko", "get", "set", "del", "incr", "keys", "usage"];

/// The `kv` module: one shared backend, a cheap handle per run.
pub struct KvModule {
    kv: Arc<dyn Kv>,
}

impl KvModule {
    pub fn new(kv: Arc<dyn Kv>) -> Self {
        KvModule { kv }
    }
}

impl HostModule for KvModule {
    fn instantiate(&self) -> Box<dyn HostObject> {
        Box::new(KvObject {
            kv: self.kv.clone(),
        })
    }

    fn prelude(&self) -> Option<&'static str> {
        Some(PRELUDE)
    }

    fn exports(&self) -> Option<&'static [&'static str]> {
        Some(EXPORTS)
    }
}

struct KvObject {
    kv: Arc<dyn Kv>,
}

pub(crate) fn store_error(e: StoreError) -> HostError {
    match e {
        StoreError::NotInteger(_) => HostError::type_error(e.to_string()),
        other => HostError::new("StoreError", other.to_string()),
    }
}

impl HostObject for KvObject {
    fn methods(&self) -> &[HostMethod] {
        METHODS
    }

    fn call(&self, method: &str, args: Vec<Json>) -> HostCall {
        let name = format!("kv.{method}");
        let started = (|| -> Result<_, HostError> {
            Ok(match method {
                "get" => {
                    let fut = self.kv.get(args::string(&name, &args, 0, "key")?);
                    Box::pin(async move { Ok(fut.await?.unwrap_or(Json::Null)) })
                        as futures::future::BoxFuture<'static, Result<Json, StoreError>>
                }
                "set" => {
                    let key = args::string(&name, &args, 0, "key")?;
                    let value = args.get(1).cloned().unwrap_or(Json::Null);
                    let ttl = args::opt_seconds(&name, &args, 2, "ttlSeconds")?;
                    let fut = self.kv.set(key, value, ttl);
                    Box::pin(async move { fut.await.map(|()| json!(true)) })
                }
                "incr" => {
                    let key = args::string(&name, &args, 0, "key")?;
                    let by = match args.get(1) {
                        None | Some(Json::Null) => 1,
                        Some(v) => v.as_i64().ok_or_else(|| {
                            HostError::type_error(format!(
                                "{name}: argument 2 (by) must be an integer"
                            ))
                        })?,
                    };
                    let expire = args::opt_seconds(&name, &args, 2, "expireSeconds")?;
                    let fut = self.kv.incr(key, by, expire);
                    Box::pin(async move { fut.await.map(Json::from) })
                }
                "del" => {
                    let fut = self.kv.del(args::string(&name, &args, 0, "key")?);
                    Box::pin(async move { fut.await.map(Json::from) })
                }
                "keys" => {
                    let prefix = args::opt_string(&name, &args, 0, "prefix")?.unwrap_or_default();
                    let fut = self.kv.keys(prefix);
                    Box::pin(async move { fut.await.map(Json::from) })
                }
                other => return Err(HostError::type_error(format!("kv has no method '{other}'"))),
            })
        })();
        match started {
            Err(e) => HostCall::Ready(Err(e)),
            Ok(fut) => HostCall::Pending(Box::pin(async move { fut.await.map_err(store_error) })),
        }
    }
}
