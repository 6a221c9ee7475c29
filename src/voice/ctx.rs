//! The class5 `ctx` host object: signalling operations as requests to the call task.
//!
//! Sync: `get`, `set`, `header`, `log`. Async (promises): `answer`, `ring`, `earlyMedia`,
//! `hangup`, `reject`, `waitForHangup`, `bridge`, `transfer`. Once the caller has hung up,
//! every async operation except `hangup` and `waitForHangup` rejects with an error named
//! `Hangup`. A media operation before the call has media answers it first (as ConnexCS does);
//! the media operations themselves are in `media_bind`, the JS-only parts in `ctx_prelude.js`.

use std::{
    cell::RefCell,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, OnceLock,
    },
};

use futures::FutureExt;
use serde_json::{json, Map, Value as Json};
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    bridge::{parse_bridge_args, parse_transfer_args, BridgeOpts},
    media_bind::{self, MediaSlot},
};
use crate::script::{
    compile, host::HostResult, CompiledScript, HostCall, HostError, HostMethod, HostObject,
    JsMethods,
};

/// The reply channel of one awaited operation.
pub type Reply = oneshot::Sender<HostResult>;

/// What the script asks the call task to do.
#[derive(Debug)]
pub enum CtxRequest {
    /// 200 OK with SDP and the headers set by `ctx.header(name, value)`; the reply comes
    /// when the ACK arrives.
    Answer {
        headers: Vec<(String, String)>,
        reply: Reply,
    },
    /// 180, or 183 with SDP when `early`.
    Ring { early: bool, reply: Reply },
    /// BYE when answered; before that a final status (`cause` when it is 300–699, else 480).
    Hangup {
        cause: Option<u16>,
        headers: Vec<(String, String)>,
        reply: Reply,
    },
    /// A 300–699 final status, with the headers set by `ctx.header(name, value)`.
    Reject {
        code: u16,
        reason: Option<String>,
        headers: Vec<(String, String)>,
        reply: Reply,
    },
    /// Resolves when the call ends (either side).
    WaitForHangup(Reply),
    /// Place an outbound leg and bridge the caller to it; resolves when the bridge ends.
    Bridge {
        dest: String,
        opts: BridgeOpts,
        reply: Reply,
    },
    /// Blind transfer (302 before answer, REFER after, a bridge when REFER is refused).
    Transfer {
        dest: String,
        opts: BridgeOpts,
        reply: Reply,
    },
    /// Run the class5 script `app` on this call with `data` (and `ctx`, the caller's ctx's
    /// twin); the reply is what its `main` returns.
    Destination {
        app: String,
        data: Option<Json>,
        ctx: Box<CallCtx>,
        reply: Reply,
    },
}

pub fn hangup_error() -> HostError {
    HostError::new("Hangup", "the caller hung up")
}

/// Headers the script set with `ctx.header(name, value)`, shared with the call task so the
/// BYE callforge sends carries them even when the script ends without `hangup()`.
pub type OutHeaders = Arc<Mutex<Vec<(String, String)>>>;

/// The signalling methods; the media ones come from `media_bind::MEDIA_METHODS`.
const SIGNALLING: &[HostMethod] = &[
    HostMethod::asynchronous("answer"),
    HostMethod::asynchronous("ring"),
    HostMethod::asynchronous("earlyMedia"),
    HostMethod::asynchronous("hangup"),
    HostMethod::asynchronous("reject"),
    HostMethod::asynchronous("waitForHangup"),
    HostMethod::asynchronous("bridge"),
    HostMethod::asynchronous("transfer"),
    HostMethod::asynchronous("destination"),
    HostMethod::sync("get"),
    HostMethod::sync("set"),
    HostMethod::sync("header"),
    HostMethod::sync("log"),
];

/// Every method the ctx object has.
pub fn all_methods() -> &'static [HostMethod] {
    static ALL: OnceLock<Vec<HostMethod>> = OnceLock::new();
    ALL.get_or_init(|| [SIGNALLING, media_bind::MEDIA_METHODS].concat())
}

/// One call's `ctx`. `Send` so it can be handed to a script worker; used there only.
pub struct CallCtx {
    requests: mpsc::UnboundedSender<Box<CtxRequest>>,
    hangup: watch::Receiver<bool>,
    call_id: String,
    vars: RefCell<Map<String, Json>>,
    invite_headers: Vec<(String, String)>,
    out_headers: OutHeaders,
    media: MediaSlot,
    /// Raised by the call task when the run must end (the call is over, grace passed).
    stop: Option<watch::Receiver<bool>>,
    /// `sip_h_<Header>` variables written with `ctx.set` (not `skipWrite`): headers of the
    /// INVITEs `bridge` sends, as FreeSWITCH (under ConnexCS) does with them.
    leg_headers: RefCell<Vec<(String, String)>>,
    /// The implicit answer is logged once per call (shared with `destination()` twins).
    implicit_logged: Arc<AtomicBool>,
}

impl std::fmt::Debug for CallCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallCtx")
            .field("call_id", &self.call_id)
            .finish_non_exhaustive()
    }
}

impl CallCtx {
    /// The signal that ends the run once the call is over (see `[calls] after_hangup_s`).
    pub fn with_stop(mut self, stop: watch::Receiver<bool>) -> Self {
        self.stop = Some(stop);
        self
    }

    /// The same call's ctx for a script `destination()` hands the call to: same call task,
    /// headers and media; its own copy of the variables set so far.
    fn twin(&self) -> CallCtx {
        let twin = CallCtx::new(
            self.requests.clone(),
            self.hangup.clone(),
            self.call_id.clone(),
            self.vars.borrow().clone(),
            self.invite_headers.clone(),
            self.out_headers.clone(),
            self.media.clone(),
        );
        *twin.leg_headers.borrow_mut() = self.leg_headers.borrow().clone();
        CallCtx {
            implicit_logged: self.implicit_logged.clone(),
            stop: self.stop.clone(),
            ..twin
        }
    }

    pub fn new(
        requests: mpsc::UnboundedSender<Box<CtxRequest>>,
        hangup: watch::Receiver<bool>,
        call_id: String,
        vars: Map<String, Json>,
        invite_headers: Vec<(String, String)>,
        out_headers: OutHeaders,
        media: MediaSlot,
    ) -> Self {
        CallCtx {
            requests,
            hangup,
            call_id,
            vars: RefCell::new(vars),
            invite_headers,
            out_headers,
            media,
            stop: None,
            leg_headers: RefCell::default(),
            implicit_logged: Arc::default(),
        }
    }

    /// A media method before the call has media: answer it first, as ConnexCS does, then run
    /// the method. Logged once per call, so an operator sees which scripts rely on it.
    fn answer_then(&self, method: &'static str, args: Vec<Json>) -> HostCall {
        if !self.implicit_logged.swap(true, Ordering::Relaxed) {
            // `digitsAfter` is the primitive under the prelude's `waitFor`.
            let shown = if method == "digitsAfter" {
                "waitFor"
            } else {
                method
            };
            tracing::info!(call_id = %self.call_id, "ctx.{shown} before ctx.answer(): answering the call implicitly");
        }
        let HostCall::Pending(answered) = ({
            let headers = self.headers();
            self.request(true, |reply| CtxRequest::Answer { headers, reply })
        }) else {
            return HostCall::Ready(Err(hangup_error()));
        };
        let (slot, hangup) = (self.media.clone(), self.hangup.clone());
        HostCall::Pending(
            async move {
                answered.await?;
                match media_bind::call(&slot, &hangup, method, args) {
                    Ok(HostCall::Pending(op)) => op.await,
                    Ok(HostCall::Ready(r)) => r,
                    Err(_) => Err(HostError::error(format!(
                        "ctx.{method}: not a media method"
                    ))),
                }
            }
            .boxed_local(),
        )
    }

    /// `ctx.set(key, value, skipWrite)`. Every variable is kept for `get`; a written
    /// `sip_h_<Header>` also goes on the INVITEs of later bridges.
    fn set(&self, name: &str, value: Json, skip_write: bool) -> HostResult {
        if !skip_write {
            if let Some(header) = name
                .get(..6)
                .filter(|p| p.eq_ignore_ascii_case("sip_h_"))
                .map(|_| &name[6..])
            {
                if !is_token(header) {
                    return Err(HostError::type_error(format!(
                        "ctx.set: {header:?} is not a valid header name"
                    )));
                }
                let mut list = self.leg_headers.borrow_mut();
                list.retain(|(n, _)| !n.eq_ignore_ascii_case(header));
                if !value.is_null() {
                    let v: String = text(&value)
                        .chars()
                        .map(|c| if c.is_control() { ' ' } else { c })
                        .collect();
                    list.push((header.to_string(), v));
                }
            }
        }
        self.vars.borrow_mut().insert(name.to_string(), value);
        Ok(json!(true))
    }

    /// The written `sip_h_` variables as headers of an outbound INVITE; headers named in the
    /// call itself take precedence.
    fn add_leg_headers(&self, opts: &mut BridgeOpts) {
        for (n, v) in self.leg_headers.borrow().iter() {
            if !opts.headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(n)) {
                opts.headers.push((n.clone(), v.clone()));
            }
        }
    }

    fn invite_header(&self, name: &str) -> Option<&str> {
        self.invite_headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Sends a request; the promise settles with the call task's reply (Hangup if it is gone).
    fn request(
        &self,
        refuse_after_hangup: bool,
        make: impl FnOnce(Reply) -> CtxRequest,
    ) -> HostCall {
        send_request(&self.requests, &self.hangup, refuse_after_hangup, make)
    }

    /// `ivr(..., {transfer_on_failure})`: a menu that ends in timeout or invalid bridges the
    /// caller to that destination, and the result carries the bridge's outcome as `transfer`.
    /// The destination and the leg headers are taken when `ivr` is called.
    fn ivr_then_transfer(&self, target: &Json, args: Vec<Json>) -> HostCall {
        let (dest, mut opts) = match parse_bridge_args(std::slice::from_ref(target)) {
            Ok(parsed) => parsed,
            Err(e) => return HostCall::Ready(Err(e)),
        };
        self.add_leg_headers(&mut opts);
        let menu = self.dispatch("ivr", args);
        let (requests, hangup, call_id) = (
            self.requests.clone(),
            self.hangup.clone(),
            self.call_id.clone(),
        );
        HostCall::Pending(
            async move {
                let mut result = menu.settle().await?;
                let status = result.get("status").and_then(Json::as_str).unwrap_or("");
                if status == "timeout" || status == "invalid" {
                    tracing::info!(%call_id, "ctx.ivr ended with {status}: transfer_on_failure to {dest}");
                    let bridge = send_request(&requests, &hangup, true, |reply| {
                        CtxRequest::Bridge { dest, opts, reply }
                    });
                    let transfer = bridge.settle().await?;
                    if let Json::Object(fields) = &mut result {
                        fields.insert("transfer".into(), transfer);
                    }
                }
                Ok(result)
            }
            .boxed_local(),
        )
    }

    fn headers(&self) -> Vec<(String, String)> {
        self.out_headers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn get(&self, name: &str) -> Json {
        if let Some(v) = self.vars.borrow().get(name) {
            return v.clone();
        }
        name.strip_prefix("sip_h_")
            .and_then(|h| self.invite_header(h))
            .map_or(Json::Null, |v| json!(v))
    }
}

/// Sends a request to the call task; the promise settles with its reply (Hangup if it is gone).
fn send_request(
    requests: &mpsc::UnboundedSender<Box<CtxRequest>>,
    hangup: &watch::Receiver<bool>,
    refuse_after_hangup: bool,
    make: impl FnOnce(Reply) -> CtxRequest,
) -> HostCall {
    if refuse_after_hangup && *hangup.borrow() {
        return HostCall::Ready(Err(hangup_error()));
    }
    let (tx, rx) = oneshot::channel();
    if requests.send(Box::new(make(tx))).is_err() {
        return HostCall::Ready(Err(hangup_error()));
    }
    HostCall::Pending(async move { rx.await.unwrap_or_else(|_| Err(hangup_error())) }.boxed_local())
}

/// `ivr`'s sixth argument's `transfer_on_failure`, when it names a destination.
fn transfer_target(args: &[Json]) -> Result<Option<&Json>, HostError> {
    match args.get(5).and_then(|opts| opts.get("transfer_on_failure")) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) if s.is_empty() => Ok(None),
        Some(t @ (Json::String(_) | Json::Number(_))) => Ok(Some(t)),
        Some(_) => Err(HostError::type_error(
            "ctx.ivr: transfer_on_failure must be a destination (string or number)",
        )),
    }
}

fn code_arg(v: Option<&Json>) -> Option<u16> {
    match v? {
        Json::Number(n) => n.as_u64().and_then(|c| u16::try_from(c).ok()),
        Json::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn text(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(super) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b))
}

/// The ctx methods written in JS (`waitFor`, `on`, `off`), compiled once.
fn compiled_prelude() -> Option<Arc<CompiledScript>> {
    static PRELUDE: OnceLock<Option<Arc<CompiledScript>>> = OnceLock::new();
    PRELUDE
        .get_or_init(|| match compile("<ctx prelude>", media_bind::CTX_PRELUDE) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                tracing::error!("the ctx prelude does not compile: {e}");
                None
            }
        })
        .clone()
}

impl HostObject for CallCtx {
    fn methods(&self) -> &[HostMethod] {
        all_methods()
    }

    fn js_methods(&self) -> Option<JsMethods> {
        compiled_prelude().map(|source| JsMethods {
            names: media_bind::JS_METHODS,
            source,
        })
    }

    fn stopped(&self) -> Option<futures::future::LocalBoxFuture<'static, ()>> {
        let mut stop = self.stop.clone()?;
        Some(Box::pin(async move {
            // A closed channel means the call task is gone: stop as well.
            let _ = stop.wait_for(|s| *s).await;
        }))
    }

    fn call(&self, method: &str, args: Vec<Json>) -> HostCall {
        if method == "ivr" {
            match transfer_target(&args) {
                Ok(Some(target)) => {
                    let target = target.clone();
                    return self.ivr_then_transfer(&target, args);
                }
                Ok(None) => {}
                Err(e) => return HostCall::Ready(Err(e)),
            }
        }
        self.dispatch(method, args)
    }
}

impl CallCtx {
    /// A ctx method, once `ivr`'s transfer is taken care of.
    fn dispatch(&self, method: &str, args: Vec<Json>) -> HostCall {
        if let Some(m) = media_bind::ANSWERING_METHODS
            .iter()
            .copied()
            .find(|m| *m == method)
            .filter(|_| self.media.get().is_none() && !*self.hangup.borrow())
        {
            return self.answer_then(m, args);
        }
        let args = match media_bind::call(&self.media, &self.hangup, method, args) {
            Ok(answered) => return answered,
            Err(args) => args,
        };
        match method {
            "answer" => {
                let headers = self.headers();
                self.request(true, |reply| CtxRequest::Answer { headers, reply })
            }
            "ring" => {
                let early = match args.first() {
                    Some(Json::Bool(b)) => *b,
                    Some(Json::Object(o)) => {
                        o.get("early").and_then(Json::as_bool).unwrap_or(false)
                    }
                    _ => false,
                };
                self.request(true, |reply| CtxRequest::Ring { early, reply })
            }
            "earlyMedia" => self.request(true, |reply| CtxRequest::Ring { early: true, reply }),
            "hangup" => {
                let cause = code_arg(args.first());
                let headers = self.headers();
                self.request(false, |reply| CtxRequest::Hangup {
                    cause,
                    headers,
                    reply,
                })
            }
            "reject" => {
                let Some(code) = code_arg(args.first()).filter(|c| (300..=699).contains(c)) else {
                    return HostCall::Ready(Err(HostError::type_error(
                        "ctx.reject: code must be a SIP status from 300 to 699",
                    )));
                };
                let reason = args.get(1).filter(|v| !v.is_null()).map(text);
                let headers = self.headers();
                self.request(true, |reply| CtxRequest::Reject {
                    code,
                    reason,
                    headers,
                    reply,
                })
            }
            "waitForHangup" => self.request(false, CtxRequest::WaitForHangup),
            "bridge" => match parse_bridge_args(&args) {
                Ok((dest, mut opts)) => {
                    self.add_leg_headers(&mut opts);
                    self.request(true, |reply| CtxRequest::Bridge { dest, opts, reply })
                }
                Err(e) => HostCall::Ready(Err(e)),
            },
            "transfer" => match parse_transfer_args(&args) {
                Ok((dest, mut opts)) => {
                    // For the bridge a refused REFER falls back to.
                    self.add_leg_headers(&mut opts);
                    self.request(true, |reply| CtxRequest::Transfer { dest, opts, reply })
                }
                Err(e) => HostCall::Ready(Err(e)),
            },
            "destination" => {
                let app = match args.first() {
                    Some(Json::String(a)) if !a.trim().is_empty() => a.trim().to_string(),
                    _ => {
                        return HostCall::Ready(Err(HostError::type_error(
                            "ctx.destination: app must be the name of a class5 script",
                        )))
                    }
                };
                let data = match args.get(1) {
                    None | Some(Json::Null) => None,
                    Some(d @ Json::Object(_)) => Some(d.clone()),
                    Some(_) => {
                        return HostCall::Ready(Err(HostError::type_error(
                            "ctx.destination: data must be an object",
                        )))
                    }
                };
                let ctx = Box::new(self.twin());
                self.request(true, |reply| CtxRequest::Destination {
                    app,
                    data,
                    ctx,
                    reply,
                })
            }
            "get" => match args.first().and_then(Json::as_str) {
                Some(name) => HostCall::Ready(Ok(self.get(name))),
                None => {
                    HostCall::Ready(Err(HostError::type_error("ctx.get: name must be a string")))
                }
            },
            "set" => match args.first().and_then(Json::as_str) {
                Some(name) => {
                    let value = args.get(1).cloned().unwrap_or(Json::Null);
                    let skip_write = args.get(2).is_some_and(|v| match v {
                        Json::Bool(b) => *b,
                        Json::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
                        Json::String(s) => !s.is_empty(),
                        _ => false,
                    });
                    HostCall::Ready(self.set(name, value, skip_write))
                }
                None => {
                    HostCall::Ready(Err(HostError::type_error("ctx.set: name must be a string")))
                }
            },
            "header" => {
                let Some(name) = args.first().and_then(Json::as_str) else {
                    return HostCall::Ready(Err(HostError::type_error(
                        "ctx.header: name must be a string",
                    )));
                };
                match args.get(1) {
                    None | Some(Json::Null) => {
                        let set = self
                            .headers()
                            .iter()
                            .rev()
                            .find(|(n, _)| n.eq_ignore_ascii_case(name))
                            .map(|(_, v)| v.clone());
                        let v = set.or_else(|| self.invite_header(name).map(str::to_string));
                        HostCall::Ready(Ok(v.map_or(Json::Null, Json::String)))
                    }
                    Some(value) => {
                        if !is_token(name) {
                            return HostCall::Ready(Err(HostError::type_error(format!(
                                "ctx.header: {name:?} is not a valid header name"
                            ))));
                        }
                        let value: String = text(value)
                            .chars()
                            .map(|c| if c.is_control() { ' ' } else { c })
                            .collect();
                        let mut out = self.out_headers.lock().unwrap_or_else(|p| p.into_inner());
                        out.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
                        out.push((name.to_string(), value));
                        HostCall::Ready(Ok(json!(true)))
                    }
                }
            }
            "log" => {
                let line = args.iter().map(text).collect::<Vec<_>>().join(" ");
                tracing::info!(call_id = %self.call_id, "ctx.log: {line}");
                HostCall::Ready(Ok(Json::Null))
            }
            other => HostCall::Ready(Err(HostError::type_error(format!(
                "ctx.{other} is not implemented"
            )))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> (
        CallCtx,
        mpsc::UnboundedReceiver<Box<CtxRequest>>,
        watch::Sender<bool>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (htx, hrx) = watch::channel(false);
        let mut vars = Map::new();
        vars.insert("sip_from_user".into(), json!("1001"));
        let headers = vec![("X-Tenant".to_string(), "acme".to_string())];
        (
            CallCtx::new(
                tx,
                hrx,
                "c1".into(),
                vars,
                headers,
                OutHeaders::default(),
                MediaSlot::default(),
            ),
            rx,
            htx,
        )
    }

    fn ready(c: HostCall) -> HostResult {
        match c {
            HostCall::Ready(r) => r,
            HostCall::Pending(_) => panic!("expected a ready answer"),
        }
    }

    #[test]
    fn vars_and_headers() {
        let (c, _rx, _h) = ctx();
        assert_eq!(
            ready(c.call("get", vec![json!("sip_from_user")])),
            Ok(json!("1001"))
        );
        assert_eq!(
            ready(c.call("get", vec![json!("sip_h_x-tenant")])),
            Ok(json!("acme"))
        );
        assert_eq!(ready(c.call("get", vec![json!("nope")])), Ok(Json::Null));
        ready(c.call("set", vec![json!("lang"), json!("fr")])).unwrap();
        assert_eq!(ready(c.call("get", vec![json!("lang")])), Ok(json!("fr")));
        assert_eq!(
            ready(c.call("header", vec![json!("x-tenant")])),
            Ok(json!("acme"))
        );
        ready(c.call("header", vec![json!("X-Out"), json!("1\r\nEvil: y")])).unwrap();
        assert_eq!(
            ready(c.call("header", vec![json!("X-Out")])),
            Ok(json!("1  Evil: y"))
        );
        assert!(ready(c.call("header", vec![json!("Bad Name"), json!("v")])).is_err());
        assert!(ready(c.call("get", vec![])).is_err());
    }

    #[tokio::test]
    async fn media_before_answer_answers_first_then_runs_the_operation() {
        let (c, mut rx, _h) = ctx();
        let HostCall::Pending(fut) = c.call("play", vec![json!("ivr/menu.wav")]) else {
            panic!("play before answer should wait for the implicit answer")
        };
        let call_task = async {
            match *rx.recv().await.unwrap() {
                CtxRequest::Answer { reply, .. } => reply.send(Ok(json!(true))).unwrap(),
                other => panic!("expected the implicit answer, got {other:?}"),
            }
        };
        let (played, ()) = tokio::join!(fut, call_task);
        // The answer came back without starting media (no call task here): play then says so.
        let e = played.unwrap_err();
        assert_eq!(e.name, "TypeError");
        assert!(e.message.contains("ctx.play"), "{e}");
        // blockDtmf, sleep and dtmfCount never answer.
        assert!(matches!(
            c.call("blockDtmf", vec![]),
            HostCall::Ready(Ok(_))
        ));
        assert!(matches!(c.call("dtmfCount", vec![]), HostCall::Ready(Ok(v)) if v == json!(0)));
        assert!(rx.try_recv().is_err(), "no second answer request");
    }

    #[tokio::test]
    async fn written_sip_h_variables_go_on_bridge_invites_and_skip_write_keeps_them_local() {
        let (c, mut rx, _h) = ctx();
        ready(c.call("set", vec![json!("sip_h_X-Account"), json!(42)])).unwrap();
        ready(c.call(
            "set",
            vec![json!("sip_h_X-Local"), json!("no"), json!(true)],
        ))
        .unwrap();
        ready(c.call("set", vec![json!("sip_h_X-Named"), json!("var")])).unwrap();
        assert_eq!(
            ready(c.call("get", vec![json!("sip_h_X-Local")])),
            Ok(json!("no")),
            "skipWrite still keeps the variable for get"
        );
        assert!(ready(c.call("set", vec![json!("sip_h_Bad Name"), json!("v")])).is_err());
        let HostCall::Pending(_fut) = c.call(
            "bridge",
            vec![json!("1002"), json!({"headers": {"x-named": "call"}})],
        ) else {
            panic!("bridge is pending")
        };
        match *rx.recv().await.unwrap() {
            CtxRequest::Bridge { dest, opts, .. } => {
                assert_eq!(dest, "1002");
                assert_eq!(
                    opts.headers,
                    vec![
                        ("x-named".to_string(), "call".to_string()),
                        ("X-Account".to_string(), "42".to_string()),
                    ]
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn requests_reach_the_call_task_and_hangup_refuses_later_ones() {
        let (c, mut rx, h) = ctx();
        ready(c.call("header", vec![json!("X-Why"), json!("dnc")])).unwrap();
        let HostCall::Pending(fut) = c.call("reject", vec![json!(604), json!("DNC")]) else {
            panic!("reject should be pending")
        };
        match *rx.recv().await.unwrap() {
            CtxRequest::Reject {
                code,
                reason,
                headers,
                reply,
            } => {
                assert_eq!((code, reason.as_deref()), (604, Some("DNC")));
                assert_eq!(headers, vec![("X-Why".to_string(), "dnc".to_string())]);
                reply.send(Ok(json!(true))).unwrap();
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(fut.await, Ok(json!(true)));
        assert!(
            matches!(c.call("reject", vec![json!(200)]), HostCall::Ready(Err(e)) if e.name == "TypeError")
        );
        // A dropped reply is a hang-up.
        let HostCall::Pending(fut) = c.call("answer", vec![]) else {
            panic!()
        };
        drop(rx.recv().await.unwrap());
        assert_eq!(fut.await.unwrap_err().name, "Hangup");
        h.send(true).unwrap();
        assert!(matches!(c.call("answer", vec![]), HostCall::Ready(Err(e)) if e.name == "Hangup"));
        assert!(matches!(
            c.call("waitForHangup", vec![]),
            HostCall::Pending(_)
        ));
    }
}
