//! `require('cxUserspace')` (alias `userspace`): `create/read/update/delete(area, key[, data])`,
//! `get(area[, key])`, `random(area)` and `list(area)` on userspace tables in the embedded
//! store.
//!
//! Reads answer *rows*, as ConnexCS's scripts use them: a row stored as an object is that
//! object; anything else (a number, a string, an array) comes back as `{key, value}`, so
//! `row.value` is what was stored.

use serde_json::{json, Value as Json};

use super::{args, kv::store_error};
use crate::{
    script::{HostCall, HostError, HostMethod, HostModule, HostObject},
    store::Userspace,
};

const METHODS: &[HostMethod] = &[
    HostMethod::asynchronous("create"),
    HostMethod::asynchronous("read"),
    HostMethod::asynchronous("update"),
    HostMethod::asynchronous("delete"),
    HostMethod::asynchronous("list"),
    HostMethod::asynchronous("get"),
    HostMethod::asynchronous("random"),
];

/// The row scripts see for `data` stored under `key` (see the module's doc).
fn row(key: String, data: Json) -> Json {
    match data {
        Json::Object(_) => data,
        other => json!({"key": key, "value": other}),
    }
}

pub struct UserspaceModule {
    userspace: Userspace,
}

impl UserspaceModule {
    pub fn new(userspace: Userspace) -> Self {
        UserspaceModule { userspace }
    }
}

impl HostModule for UserspaceModule {
    fn instantiate(&self) -> Box<dyn HostObject> {
        Box::new(UserspaceObject {
            userspace: self.userspace.clone(),
        })
    }
}

struct UserspaceObject {
    userspace: Userspace,
}

impl HostObject for UserspaceObject {
    fn methods(&self) -> &[HostMethod] {
        METHODS
    }

    fn call(&self, method: &str, args: Vec<Json>) -> HostCall {
        let name = format!("userspace.{method}");
        let u = self.userspace.clone();
        let area = match args::string(&name, &args, 0, "area") {
            Ok(a) => a,
            Err(e) => return HostCall::Ready(Err(e)),
        };
        let key = if matches!(method, "list" | "random") {
            String::new()
        } else if method == "get" {
            match args::opt_string(&name, &args, 1, "key") {
                Ok(k) => k.unwrap_or_default(),
                Err(e) => return HostCall::Ready(Err(e)),
            }
        } else {
            match args::string(&name, &args, 1, "key") {
                Ok(k) => k,
                Err(e) => return HostCall::Ready(Err(e)),
            }
        };
        let data = args.get(2).cloned().unwrap_or(Json::Null);
        let method = method.to_string();
        HostCall::Pending(Box::pin(async move {
            let answer = match method.as_str() {
                "create" => u.create(area, key, data).await.map(|()| json!(true)),
                "read" => u
                    .read(area, key.clone())
                    .await
                    .map(|d| d.map_or(Json::Null, |d| row(key, d))),
                // `get(area, key)` is `read`; `get(area)` answers every row of the area.
                "get" if !key.is_empty() => u
                    .read(area, key.clone())
                    .await
                    .map(|d| d.map_or(Json::Null, |d| row(key, d))),
                "get" => u
                    .rows(area)
                    .await
                    .map(|rows| Json::Array(rows.into_iter().map(|(k, d)| row(k, d)).collect())),
                "random" => u
                    .random(area)
                    .await
                    .map(|r| r.map_or(Json::Null, |(k, d)| row(k, d))),
                "update" => u.update(area, key, data).await.map(|()| json!(true)),
                "delete" => u.delete(area, key).await.map(Json::from),
                "list" => u.list(area).await.map(Json::from),
                other => {
                    return Err(HostError::type_error(format!(
                        "userspace has no method '{other}'"
                    )))
                }
            };
            answer.map_err(|e| match e {
                crate::store::StoreError::Conflict(m) => HostError::new("UserspaceError", m),
                other => store_error(other),
            })
        }))
    }
}
