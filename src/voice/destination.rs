//! `ctx.destination(app, data)`: hands the call to another class5 script of the scripts
//! folder. That script's `main(data, ctx)` runs on the same call (same call task, media and
//! headers) while the first one awaits; the promise resolves with what it returns.
//!
//! `data` is the call's own `data` with the given object's fields laid over it, so the
//! second script still finds `from`, `to` and the headers; the script's `.toml` vars apply
//! last, as they do on a route.

use futures::{future::BoxFuture, FutureExt};
use serde_json::Value as Json;

use super::{call::CallState, ctx::CallCtx};
use crate::script::{host::HostResult, vars, HostError, Invocation, Mode};

/// How many `destination()` runs one call may have at once (each may call another).
pub(super) const MAX_NESTED: usize = 4;

impl CallState {
    /// The run of `app` on this call, or why it cannot start.
    pub(super) fn destination(
        &self,
        app: &str,
        data: Option<Json>,
        ctx: Box<CallCtx>,
        running: usize,
    ) -> Result<BoxFuture<'static, HostResult>, HostError> {
        if self.ended {
            return Err(super::ctx::hangup_error());
        }
        if running >= MAX_NESTED {
            return Err(HostError::error(format!(
                "ctx.destination: at most {MAX_NESTED} destinations may run at once on a call"
            )));
        }
        let library = &self.server.library;
        let script = library
            .get(app)
            .map_err(|e| HostError::error(format!("ctx.destination: {app:?}: {e}")))?;
        let mut input = serde_json::from_str(&self.input).unwrap_or(Json::Null);
        if let Some(d) = data {
            input = vars::merge(input, &d);
        }
        // The operator's vars win over what a script passes, as they do over request data.
        match library.vars(app) {
            Ok(Some(v)) => input = vars::merge(input, &v),
            Ok(None) => {}
            Err(e) => tracing::warn!(script = %app, "vars ignored: {e}"),
        }
        tracing::info!(call = ?self.call, app, "ctx.destination: running another script on the call");
        let mut inv = Invocation::new(script, Mode::Class5, input);
        inv.ctx = Some(ctx);
        let engine = self.server.engine.clone();
        let app = app.to_string();
        Ok(async move {
            match engine.run(inv).await {
                Ok(out) => out.result.map_err(|e| {
                    HostError::error(format!("ctx.destination: {app:?} failed: {}", e.message))
                }),
                Err(e) => Err(HostError::error(format!(
                    "ctx.destination: {app:?} did not run: {e}"
                ))),
            }
        }
        .boxed())
    }
}
