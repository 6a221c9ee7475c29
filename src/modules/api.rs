//! The global `api`: `api.lookup.*` and `api.send.*` as one host object with nested names.

use std::sync::Arc;

use serde_json::Value as Json;

use super::{lookup::LookupService, send::SendService};
use crate::script::{HostCall, HostError, HostMethod, HostModule, HostObject};

const METHODS: &[HostMethod] = &[
    HostMethod::asynchronous("lookup.tps"),
    HostMethod::asynchronous("lookup.lrn"),
    HostMethod::asynchronous("lookup.hlr"),
    HostMethod::asynchronous("lookup.nnpc"),
    HostMethod::asynchronous("lookup.asrplus"),
    HostMethod::asynchronous("lookup.ping"),
    HostMethod::asynchronous("lookup.userspaceLookup"),
    HostMethod::asynchronous("send.email"),
    HostMethod::asynchronous("send.sms"),
    HostMethod::asynchronous("send.notify"),
    HostMethod::asynchronous("send.sip"),
];

pub struct ApiModule {
    lookup: Arc<LookupService>,
    send: Arc<SendService>,
}

impl ApiModule {
    pub fn new(lookup: Arc<LookupService>, send: Arc<SendService>) -> Self {
        ApiModule { lookup, send }
    }
}

impl HostModule for ApiModule {
    fn instantiate(&self) -> Box<dyn HostObject> {
        Box::new(ApiObject {
            lookup: self.lookup.clone(),
            send: self.send.clone(),
        })
    }
}

struct ApiObject {
    lookup: Arc<LookupService>,
    send: Arc<SendService>,
}

impl HostObject for ApiObject {
    fn methods(&self) -> &[HostMethod] {
        METHODS
    }
    fn call(&self, method: &str, args: Vec<Json>) -> HostCall {
        match method.split_once('.') {
            Some(("lookup", name)) => self.lookup.call(name, args),
            Some(("send", channel)) => self.send.call(channel, args),
            _ => HostCall::Ready(Err(HostError::type_error(format!(
                "api.{method} does not exist"
            )))),
        }
    }
}
