//! `require('originate')`: place an outbound call from an app script. The module itself is
//! a function — `await originate({to, from, trunk, script, data, timeout})` resolves with
//! `{id}` once the INVITE is out — with `.list()` (live calls) and `.hangup(id)` beside it.
//!
//! The voice layer attaches the [`Originator`] when SIP starts; before that (or with SIP off)
//! the calls reject with a clear error.
//!
//! Also `require('cxOriginate')`, with ConnexCS's positional signature (see [`PRELUDE`]).

use std::sync::{Arc, OnceLock};

use futures::{future::BoxFuture, FutureExt};
use serde_json::Value as Json;

use crate::script::{HostCall, HostError, HostMethod, HostModule, HostObject};

/// What the voice layer offers scripts and the HTTP API.
pub trait Originator: Send + Sync {
    /// Place a call from a request object; `Err((http_status, message))` when refused.
    fn originate(&self, request: Json) -> BoxFuture<'static, Result<u64, (u16, String)>>;
    /// The live calls, as the API lists them.
    fn list(&self) -> Json;
    /// One live call.
    fn get(&self, id: u64) -> Option<Json>;
    /// Hang a live call up; false when there is no such call.
    fn hang_up(&self, id: u64) -> bool;
}

/// Where the originator is attached once SIP runs; shared by the module and the HTTP API.
#[derive(Default, Clone)]
pub struct OriginatorSlot(Arc<OnceLock<Arc<dyn Originator>>>);

impl OriginatorSlot {
    pub fn attach(&self, o: Arc<dyn Originator>) -> bool {
        self.0.set(o).is_ok()
    }

    pub fn get(&self) -> Option<Arc<dyn Originator>> {
        self.0.get().cloned()
    }
}

const METHODS: &[HostMethod] = &[
    HostMethod::asynchronous("call"),
    HostMethod::sync("list"),
    HostMethod::sync("hangup"),
];

/// Two signatures: callforge's `originate({to, script, ...})`, and ConnexCS's positional
/// `originate(companyId, serverAlias, destination, cli, extension)` (module `cxOriginate`),
/// where the server alias names the trunk and the extension names the class5 script that
/// runs once the callee answers.
const PRELUDE: &str = "(function (raw) {
    const originate = function originate(request, alias, destination, cli, extension) {
        if (request !== null && typeof request === 'object') return raw.call(request);
        const positional = { to: destination, script: extension };
        if (alias !== undefined && alias !== null && alias !== '') positional.trunk = String(alias);
        if (cli !== undefined && cli !== null && cli !== '') positional.from = String(cli);
        for (const k of ['to', 'script']) {
            if (typeof positional[k] === 'number') positional[k] = String(positional[k]);
            if (typeof positional[k] !== 'string' || positional[k] === '') {
                return Promise.reject(new TypeError('originate(companyId, serverAlias, destination, cli, extension): destination and extension are required'));
            }
        }
        positional.data = { companyId: request === undefined ? null : request, extension: positional.script };
        return raw.call(positional);
    };
    originate.originate = originate;
    originate.list = function () { return raw.list(); };
    originate.hangup = function (id) { return raw.hangup(id); };
    return originate;
})";

pub struct OriginateModule {
    slot: OriginatorSlot,
}

impl OriginateModule {
    pub fn new(slot: OriginatorSlot) -> Self {
        OriginateModule { slot }
    }
}

impl HostModule for OriginateModule {
    fn instantiate(&self) -> Box<dyn HostObject> {
        Box::new(OriginateObject {
            slot: self.slot.clone(),
        })
    }

    fn prelude(&self) -> Option<&'static str> {
        Some(PRELUDE)
    }
}

struct OriginateObject {
    slot: OriginatorSlot,
}

fn not_running() -> HostError {
    HostError::error(
        "originate: SIP is not running here (configure a [[route]] and [[trunk]] and keep [sip] enabled)",
    )
}

impl HostObject for OriginateObject {
    fn methods(&self) -> &[HostMethod] {
        METHODS
    }

    fn call(&self, method: &str, args: Vec<Json>) -> HostCall {
        let Some(o) = self.slot.get() else {
            return HostCall::Ready(Err(not_running()));
        };
        match method {
            "call" => {
                let request = args.into_iter().next().unwrap_or(Json::Null);
                if !request.is_object() {
                    return HostCall::Ready(Err(HostError::type_error(
                        "originate: the argument must be {to, script, from?, trunk?, data?, timeout?}",
                    )));
                }
                let fut = o.originate(request);
                HostCall::Pending(
                    async move {
                        fut.await
                            .map(|id| serde_json::json!({"id": id}))
                            .map_err(|(_, m)| HostError::error(format!("originate: {m}")))
                    }
                    .boxed_local(),
                )
            }
            "list" => HostCall::Ready(Ok(o.list())),
            "hangup" => match args.first().and_then(|v| {
                v.as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            }) {
                Some(id) => HostCall::Ready(Ok(Json::Bool(o.hang_up(id)))),
                None => HostCall::Ready(Err(HostError::type_error(
                    "originate.hangup: id must be a call id",
                ))),
            },
            other => HostCall::Ready(Err(HostError::type_error(format!(
                "originate.{other} is not a function"
            )))),
        }
    }
}
