//! `require('userspace')` (alias `cxUserspace`): `create/read/update/delete(area, key[, data])`
//! and `list(area)` on userspace tables in the embedded store.

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
];

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
        let key = if method == "list" {
            String::new()
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
                "read" => u.read(area, key).await.map(|d| d.unwrap_or(Json::Null)),
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
