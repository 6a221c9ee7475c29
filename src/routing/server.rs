//! The redirect server: one class4 INVITE end to end (data → script → 302 or final status).

use std::{collections::BTreeMap, sync::Arc};

use serde_json::Value as Json;

use super::{
    redirect::{decide, sanitize_reason, Decision},
    request, Route,
};
use crate::{
    script::{Engine, Invocation, Mode, ScriptError, ScriptLibrary},
    sip::{IncomingCall, SipHandle},
};

/// What every class4 INVITE needs; cheap to clone into a task.
#[derive(Clone)]
pub struct Class4Server {
    pub engine: Arc<Engine>,
    pub library: Arc<ScriptLibrary>,
    pub gateways: Arc<BTreeMap<String, String>>,
    pub sip: SipHandle,
}

impl Class4Server {
    /// The `data` a class4 run gets for this INVITE: the request's routing facts, then the
    /// script's `NAME.toml` vars (as over HTTP), then the route's own vars.
    pub fn data_for(&self, call: &IncomingCall, route: &Route) -> Result<Json, String> {
        let mut data = request::routing_data(call);
        match self.library.vars(&route.script) {
            Ok(Some(vars)) => data = request::apply_vars(data, &vars),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        if let Some(vars) = &route.vars {
            data = request::apply_vars(data, vars);
        }
        Ok(data)
    }

    /// Runs the route's script and answers; never fails (every problem becomes a status).
    pub async fn decide(&self, call: &IncomingCall, route: &Route) -> Decision {
        let failure = |message: String| Decision::Reject {
            code: route.timeout_action,
            reason: sanitize_reason(&message),
        };
        let script = match self.library.get(&route.script) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(script = %route.script, "class4 route script unusable: {e}");
                return failure(e.to_string());
            }
        };
        let data = match self.data_for(call, route) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(script = %route.script, "class4 vars unusable: {e}");
                return failure(e);
            }
        };
        let outcome: Result<Json, ScriptError> = match self
            .engine
            .run(Invocation::new(script, Mode::Class4, data))
            .await
        {
            Ok(out) => out.result,
            Err(e) => Err(ScriptError::internal(e.to_string())),
        };
        if let Err(e) = &outcome {
            tracing::debug!(script = %route.script, code = e.code, "class4 script error: {}", e.message);
        }
        decide(&outcome, &self.gateways, route.timeout_action)
    }

    /// Decides and sends the answer. A CANCEL that won the race makes the send fail; that
    /// is expected and only logged at debug level.
    pub async fn handle(self, call: Box<IncomingCall>, route: Arc<Route>) {
        let decision = self.decide(&call, &route).await;
        let sent = match decision {
            Decision::Redirect(contacts) => {
                let headers = contacts
                    .into_iter()
                    .map(|c| ("Contact".to_string(), c))
                    .collect();
                self.sip.reject(call.call, 302, None, headers).await
            }
            Decision::Reject { code, reason } => {
                self.sip
                    .reject(call.call, code, Some(reason), Vec::new())
                    .await
            }
        };
        if let Err(e) = sent {
            tracing::debug!(call = ?call.call, "class4 answer not sent: {e}");
        }
    }
}
