//! The call task: runs a class5 script against one call and carries out its ctx requests.

use std::{net::IpAddr, sync::Arc};

use serde_json::{json, Value as Json};
use tokio::sync::{mpsc, watch};

use super::{
    ctx::{hangup_error, CallCtx, CtxRequest, Reply},
    data,
};
use crate::{
    media::{PortAllocator, RtpSocket},
    routing::Route,
    script::{vars, Engine, HostError, Invocation, Mode, ScriptError, ScriptLibrary},
    sip::{
        sdp::Codec, CallHandle, IncomingCall, MediaConfig, Negotiated, SipHandle, TransportError,
        UaError,
    },
};

/// What the SIP dispatcher tells a call task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallEvent {
    /// Our 200 OK was acknowledged.
    Acked,
    /// A re-INVITE / UPDATE / INFO / OPTIONS was answered by the stack (media seam: hold).
    InDialog(crate::sip::InDialogKind),
    /// The call is over; `remote` when the caller ended it (BYE, CANCEL).
    Ended { remote: bool },
}

/// What every class5 call needs; cheap to clone.
#[derive(Clone)]
pub struct VoiceServer {
    pub engine: Arc<Engine>,
    pub library: Arc<ScriptLibrary>,
    pub sip: SipHandle,
    pub rtp_ports: Arc<PortAllocator>,
    pub rtp_ip: IpAddr,
    pub codecs: Vec<Codec>,
}

impl VoiceServer {
    /// Spawns the call's task; feed it the call's events through the returned sender.
    pub fn start(
        &self,
        call: Box<IncomingCall>,
        route: Arc<Route>,
    ) -> mpsc::UnboundedSender<CallEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(self.clone().run_call(call, route, rx));
        tx
    }

    async fn run_call(
        self,
        call: Box<IncomingCall>,
        route: Arc<Route>,
        events: mpsc::UnboundedReceiver<CallEvent>,
    ) {
        let handle = call.call;
        let script = match self.library.get(&route.script) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(script = %route.script, "class5 route script unusable: {e}");
                let _ = self
                    .sip
                    .reject(handle, 500, Some("Script Unavailable".into()), Vec::new())
                    .await;
                return;
            }
        };
        let mut input = data::call_data(&call);
        match self.library.vars(&route.script) {
            Ok(Some(v)) => input = vars::merge(input, &v),
            Ok(None) => {}
            Err(e) => tracing::warn!(script = %route.script, "vars ignored: {e}"),
        }
        if let Some(v) = &route.vars {
            input = vars::merge(input, v);
        }
        let (req_tx, req_rx) = mpsc::unbounded_channel();
        let (hangup_tx, hangup_rx) = watch::channel(false);
        let ctx = CallCtx::new(
            req_tx,
            hangup_rx,
            input["call_id"].as_str().unwrap_or_default().to_string(),
            data::builtin_vars(&input),
            data::invite_headers(&call),
        );
        let mut inv = Invocation::new(script, Mode::Class5, input);
        inv.ctx = Some(Box::new(ctx));
        let mut state = CallState::new(self, handle, hangup_tx);
        let outcome = state.drive(inv, req_rx, events).await;
        state.finish(outcome).await;
    }
}

/// The call as the task sees it.
struct CallState {
    server: VoiceServer,
    call: CallHandle,
    answered: bool,
    acked: bool,
    /// A final response or BYE went out, or the stack reported the end.
    ended: bool,
    pending_answer: Option<Reply>,
    hangup_waiters: Vec<Reply>,
    hangup: watch::Sender<bool>,
    /// Bound at answer/early media; the media issue's session drives it.
    rtp: Option<RtpSocket>,
    negotiated: Option<Negotiated>,
}

fn sip_error(e: TransportError) -> HostError {
    match e {
        TransportError::Ua(UaError::UnknownCall) => hangup_error(),
        other => HostError::error(other.to_string()),
    }
}

impl CallState {
    fn new(server: VoiceServer, call: CallHandle, hangup: watch::Sender<bool>) -> Self {
        CallState {
            server,
            call,
            answered: false,
            acked: false,
            ended: false,
            pending_answer: None,
            hangup_waiters: Vec::new(),
            hangup,
            rtp: None,
            negotiated: None,
        }
    }

    /// Runs the script to its end while serving its requests and the call's events.
    async fn drive(
        &mut self,
        inv: Invocation,
        mut requests: mpsc::UnboundedReceiver<CtxRequest>,
        mut events: mpsc::UnboundedReceiver<CallEvent>,
    ) -> Result<Json, ScriptError> {
        let engine = self.server.engine.clone();
        let run = engine.run(inv);
        tokio::pin!(run);
        let mut events_open = true;
        loop {
            tokio::select! {
                out = &mut run => {
                    return match out {
                        Ok(o) => o.result,
                        Err(e) => Err(ScriptError::internal(e.to_string())),
                    };
                }
                Some(req) = requests.recv() => self.request(req).await,
                ev = events.recv(), if events_open => match ev {
                    Some(ev) => self.event(ev),
                    None => events_open = false,
                },
            }
        }
    }

    fn event(&mut self, ev: CallEvent) {
        match ev {
            CallEvent::Acked => {
                self.acked = true;
                if let Some(r) = self.pending_answer.take() {
                    let _ = r.send(Ok(json!(true)));
                }
            }
            CallEvent::InDialog(kind) => {
                tracing::debug!(call = ?self.call, ?kind, "in-dialog request")
            }
            CallEvent::Ended { remote } => {
                self.ended = true;
                if remote {
                    let _ = self.hangup.send(true);
                }
                if let Some(r) = self.pending_answer.take() {
                    let _ = r.send(Err(hangup_error()));
                }
                for w in self.hangup_waiters.drain(..) {
                    let _ = w.send(Ok(json!({"by": if remote { "remote" } else { "local" }})));
                }
            }
        }
    }

    async fn media_config(&mut self) -> Result<MediaConfig, HostError> {
        if self.rtp.is_none() {
            let sock = RtpSocket::bind(&self.server.rtp_ports, self.server.rtp_ip)
                .await
                .map_err(|e| HostError::error(format!("no RTP port: {e}")))?;
            self.rtp = Some(sock);
        }
        let port = self
            .rtp
            .as_ref()
            .and_then(|s| s.local_addr().ok())
            .map(|a| a.port())
            .ok_or_else(|| HostError::error("RTP socket has no address"))?;
        let mut cfg = MediaConfig::new(self.server.rtp_ip, port);
        cfg.codecs = self.server.codecs.clone();
        Ok(cfg)
    }

    async fn request(&mut self, req: CtxRequest) {
        match req {
            CtxRequest::Answer { headers, reply } => {
                if self.ended {
                    let _ = reply.send(Err(hangup_error()));
                } else if self.acked {
                    let _ = reply.send(Ok(json!(true)));
                } else if self.answered {
                    self.pending_answer = Some(reply);
                } else {
                    match self.answer(headers).await {
                        Ok(()) => self.pending_answer = Some(reply),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
            }
            CtxRequest::Ring { early, reply } => {
                let r = if self.ended {
                    Err(hangup_error())
                } else if self.answered {
                    Ok(json!(false))
                } else {
                    self.ring(early).await
                };
                let _ = reply.send(r);
            }
            CtxRequest::Hangup { cause, reply } => {
                if !self.ended {
                    self.ended = true;
                    let sent = if self.answered {
                        self.server.sip.hangup(self.call).await
                    } else {
                        let code = cause.filter(|c| (300..=699).contains(c)).unwrap_or(480);
                        self.server
                            .sip
                            .reject(self.call, code, None, Vec::new())
                            .await
                    };
                    if let Err(e) = sent {
                        tracing::debug!(call = ?self.call, "hangup not sent: {e}");
                    }
                    if let Some(r) = self.pending_answer.take() {
                        let _ = r.send(Err(HostError::new("Hangup", "the script hung up")));
                    }
                }
                let _ = reply.send(Ok(Json::Null));
            }
            CtxRequest::Reject {
                code,
                reason,
                headers,
                reply,
            } => {
                let r = if self.ended {
                    Err(hangup_error())
                } else if self.answered {
                    Err(HostError::error(
                        "ctx.reject: the call is already answered; use ctx.hangup()",
                    ))
                } else {
                    self.ended = true;
                    self.server
                        .sip
                        .reject(self.call, code, reason, headers)
                        .await
                        .map(|()| json!(true))
                        .map_err(sip_error)
                };
                let _ = reply.send(r);
            }
            CtxRequest::WaitForHangup(reply) => {
                if self.ended {
                    let _ = reply.send(Ok(json!({"by": "ended"})));
                } else {
                    self.hangup_waiters.push(reply);
                }
            }
        }
    }

    async fn answer(&mut self, headers: Vec<(String, String)>) -> Result<(), HostError> {
        let media = self.media_config().await?;
        match self
            .server
            .sip
            .answer_with_headers(self.call, media, headers)
            .await
        {
            Ok(neg) => {
                self.answered = true;
                self.negotiated = neg;
                Ok(())
            }
            Err(TransportError::Ua(UaError::Sdp(e))) => {
                self.ended = true;
                let _ = self
                    .server
                    .sip
                    .reject(self.call, 488, None, Vec::new())
                    .await;
                Err(HostError::error(format!("488 Not Acceptable Here: {e}")))
            }
            Err(e) => Err(sip_error(e)),
        }
    }

    async fn ring(&mut self, early: bool) -> Result<Json, HostError> {
        let media = if early {
            Some(self.media_config().await?)
        } else {
            None
        };
        let neg = self
            .server
            .sip
            .ring(self.call, media)
            .await
            .map_err(sip_error)?;
        if neg.is_some() {
            self.negotiated = neg;
        }
        Ok(json!(true))
    }

    /// The script is over: reject with its error before answer, else make sure the call ends.
    async fn finish(&mut self, outcome: Result<Json, ScriptError>) {
        if let Err(e) = &outcome {
            tracing::info!(call = ?self.call, code = e.code, "class5 script ended with an error: {}", e.message);
        }
        if self.ended {
            return;
        }
        self.ended = true;
        let sent = match (&outcome, self.answered) {
            (Err(e), false) => {
                let code = if (300..=699).contains(&e.code) {
                    e.code
                } else {
                    500
                };
                let reason = crate::routing::redirect::sanitize_reason(&e.message);
                self.server
                    .sip
                    .reject(self.call, code, Some(reason), Vec::new())
                    .await
            }
            _ => self.server.sip.hangup(self.call).await,
        };
        if let Err(e) = sent {
            tracing::debug!(call = ?self.call, "final hangup not sent: {e}");
        }
    }
}
