//! The redirect server: one class4 INVITE end to end (data → script → 302 or final status),
//! all of it on the script worker that runs the script.

use std::{sync::Arc, time::Duration};

use serde_json::Value as Json;

use super::{
    redirect::{decide, sanitize_reason, Decision},
    request, Route,
};
use crate::{
    script::{
        CompiledScript, Engine, Invocation, LocalRunner, LocalTask, Mode, RunRequest, ScriptError,
        ScriptLibrary,
    },
    sip::{CallHandle, IncomingCall, SipHandle},
};

/// How long a route's script and vars files are trusted after they were last looked at: at
/// 10,000 calls/s, two file-system checks per call were a measurable share of each call.
const RECHECK_FILES: Duration = Duration::from_secs(1);

/// What every class4 INVITE needs; cheap to clone into a task.
#[derive(Clone)]
pub struct Class4Server {
    pub engine: Arc<Engine>,
    pub library: Arc<ScriptLibrary>,
    pub gateways: super::Gateways,
    pub sip: SipHandle,
}

impl Class4Server {
    /// The `data` a class4 run gets for this INVITE: the request's routing facts, then the
    /// script's `NAME.toml` vars (as over HTTP), then the route's own vars.
    pub fn data_for(&self, call: &IncomingCall, route: &Route) -> Result<Json, String> {
        self.data_with(request::routing_data(call), route)
    }

    /// [`data_for`](Self::data_for) from `data.routing` already built.
    pub fn data_with(&self, mut data: Json, route: &Route) -> Result<Json, String> {
        match self.library.vars_recent(&route.script, RECHECK_FILES) {
            Ok(Some(vars)) => data = request::apply_vars(data, &vars),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        if let Some(vars) = &route.vars {
            data = request::apply_vars(data, vars);
        }
        Ok(data)
    }

    /// The compiled script and the `data` of this INVITE's run, or the answer when the route's
    /// script or vars are unusable.
    fn prepare(
        &self,
        call: &IncomingCall,
        route: &Route,
    ) -> Result<(Arc<CompiledScript>, Json), Decision> {
        self.prepare_with(request::routing_data(call), route)
    }

    /// [`prepare`](Self::prepare) from `data.routing` already built.
    pub fn prepare_with(
        &self,
        routing: Json,
        route: &Route,
    ) -> Result<(Arc<CompiledScript>, Json), Decision> {
        let failure = |message: String| Decision::Reject {
            code: route.timeout_action,
            reason: sanitize_reason(&message),
        };
        let script = self
            .library
            .get_recent(&route.script, RECHECK_FILES)
            .map_err(|e| {
                tracing::warn!(script = %route.script, "class4 route script unusable: {e}");
                failure(e.to_string())
            })?;
        let data = self.data_with(routing, route).map_err(|e| {
            tracing::warn!(script = %route.script, "class4 vars unusable: {e}");
            failure(e)
        })?;
        Ok((script, data))
    }

    /// The answer for a finished run (its result is already normalised).
    pub fn decision(&self, route: &Route, outcome: Result<Json, ScriptError>) -> Decision {
        if let Err(e) = &outcome {
            tracing::debug!(script = %route.script, code = e.code, "class4 script error: {}", e.message);
        }
        decide(&outcome, &self.gateways.current(), route.timeout_action)
    }

    /// Runs the route's script through the engine and decides; never fails (every problem
    /// becomes a status).
    pub async fn decide(&self, call: &IncomingCall, route: &Route) -> Decision {
        let (script, data) = match self.prepare(call, route) {
            Ok(ready) => ready,
            Err(decision) => return decision,
        };
        let outcome = match self
            .engine
            .run(Invocation::new(script, Mode::Class4, data))
            .await
        {
            Ok(out) => out.result,
            Err(e) => Err(ScriptError::internal(e.to_string())),
        };
        self.decision(route, outcome)
    }

    /// Sends the answer without waiting for the SIP driver. A CANCEL that won the race makes
    /// the user agent skip it; a stopped stack is only logged at debug level.
    fn send(&self, call: CallHandle, decision: Decision) {
        let code = match &decision {
            Decision::Redirect(_) => 302,
            Decision::Reject { code, .. } => *code,
        };
        crate::metrics::metrics().class4_decisions.inc(code);
        let sent = match decision {
            Decision::Redirect(contacts) => {
                let headers = contacts
                    .into_iter()
                    .map(|c| ("Contact".to_string(), c))
                    .collect();
                self.sip.reject_detached(call, 302, None, headers)
            }
            Decision::Reject { code, reason } => {
                self.sip
                    .reject_detached(call, code, Some(reason), Vec::new())
            }
        };
        if let Err(e) = sent {
            tracing::debug!(?call, "class4 answer not sent: {e}");
        }
    }

    /// Answers one class4 INVITE. The whole call is handed to a script worker thread: it builds
    /// `data`, runs the script in a fresh context, and sends the 302 or the final status from
    /// there, before it tears the context down. Nothing comes back to the caller's thread.
    pub fn submit(&self, call: Box<IncomingCall>, route: Arc<Route>) {
        let (handle, timeout_action) = (call.call, route.timeout_action);
        let server = self.clone();
        let in_flight = crate::lifecycle::InFlight::begin();
        let task: LocalTask = Box::new(move |runner| {
            Box::pin(async move {
                server.answer_on(&runner, call, &route).await;
                drop(in_flight);
            })
        });
        if let Err(e) = self.engine.spawn_local(task) {
            tracing::warn!(call = ?handle, "class4 INVITE not run: {e}");
            self.send(
                handle,
                Decision::Reject {
                    code: timeout_action,
                    reason: sanitize_reason(&e.to_string()),
                },
            );
        }
    }

    /// [`submit`](Self::submit)'s work, on the worker thread.
    async fn answer_on(&self, runner: &LocalRunner, call: Box<IncomingCall>, route: &Route) {
        let handle = call.call;
        let prepared = self.prepare(&call, route);
        drop(call);
        match prepared {
            Err(decision) => self.send(handle, decision),
            Ok((script, data)) => {
                let request = RunRequest {
                    script,
                    mode: Mode::Class4,
                    data,
                    function: None,
                    ctx: None,
                };
                runner
                    .run(request, |out| {
                        self.send(handle, self.decision(route, out.result));
                    })
                    .await
            }
        }
    }
}
