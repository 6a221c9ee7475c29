//! The call task: runs a class5 script against one call and carries out its ctx requests.

use std::{net::IpAddr, sync::Arc, time::Duration};

use futures::{stream::FuturesUnordered, StreamExt};
use serde_json::{json, Value as Json};
use tokio::sync::{mpsc, watch};

use super::{
    bridge::{Bridge, BridgeOpts},
    control::{CallControl, LegEvent, LiveCall},
    ctx::{hangup_error, CallCtx, CtxRequest, OutHeaders, Reply},
    data,
    media_bind::{self, MediaShared, MediaSlot},
    trunks::TrunkTable,
};
use crate::{
    config::CallsConfig,
    media::{PortAllocator, RtpSocket},
    routing::Route,
    script::{vars, Engine, HostError, Invocation, Mode, ScriptError, ScriptLibrary},
    sip::{
        sdp::{Codec, Direction},
        CallHandle, EndReason, InDialogKind, IncomingCall, MediaConfig, Negotiated, SipHandle,
        TransportError, UaError,
    },
    store::{Cdr, CdrError, Records},
};

/// What the SIP dispatcher tells a call task.
#[derive(Debug, Clone, PartialEq)]
pub enum CallEvent {
    /// Our 200 OK was acknowledged.
    Acked,
    /// A re-INVITE / UPDATE / INFO / OPTIONS was answered by the stack (media seam: hold).
    InDialog {
        kind: InDialogKind,
        request: Box<rsip::Request>,
        /// The new negotiation when the request carried an offer (re-INVITE, UPDATE).
        media: Option<Negotiated>,
    },
    /// The call is over; `remote` when the far end ended it (BYE, CANCEL, a failure status).
    Ended { remote: bool, reason: EndReason },
    /// An outbound leg's provisional response (with its early-media SDP, if any).
    Progress {
        code: u16,
        media: Option<Negotiated>,
    },
    /// An outbound leg was answered (and ACKed).
    Answered { media: Option<Negotiated> },
    /// The final response to a REFER this call sent.
    ReferResponse { code: u16 },
    /// A NOTIFY reporting the progress of that REFER (the sipfrag's status).
    TransferNotify { code: u16 },
    /// Hang the call up (the HTTP API, a limit); `cause` goes to the CDR.
    Kill { cause: String },
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
    /// Prompt and TTS caches and the recordings folder, shared by every call.
    pub media: MediaShared,
    /// Where each call's CDR is written when it ends; `None` when records are off.
    pub records: Option<Records>,
    /// Places outbound legs and lists live calls.
    pub control: CallControl,
    /// Swapped by a configuration reload.
    pub trunks: Arc<TrunkTable>,
    pub calls: CallsConfig,
}

impl VoiceServer {
    /// Spawns the call's task; feed it the call's events through the returned sender.
    pub fn start(
        &self,
        call: Box<IncomingCall>,
        route: Arc<Route>,
    ) -> mpsc::UnboundedSender<LegEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let in_flight = crate::lifecycle::InFlight::begin();
        let m = crate::metrics::metrics();
        m.calls_active.inc();
        let run = self.clone().run_call(call, route, tx.clone(), rx);
        tokio::spawn(async move {
            run.await;
            crate::metrics::metrics().calls_active.dec();
            drop(in_flight);
        });
        tx
    }

    async fn run_call(
        self,
        call: Box<IncomingCall>,
        route: Arc<Route>,
        events_tx: mpsc::UnboundedSender<LegEvent>,
        events: mpsc::UnboundedReceiver<LegEvent>,
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
        let out_headers = OutHeaders::default();
        let media = MediaSlot::default();
        let ctx = CallCtx::new(
            req_tx,
            hangup_rx,
            input["call_id"].as_str().unwrap_or_default().to_string(),
            data::builtin_vars(&input),
            data::invite_headers(&call),
            out_headers.clone(),
            media.clone(),
        );
        let cdr = Cdr {
            call_id: input["call_id"].as_str().unwrap_or_default().to_string(),
            from: input["from"].as_str().unwrap_or_default().to_string(),
            to: input["to"].as_str().unwrap_or_default().to_string(),
            script: Some(route.script.clone()),
            started_at: now_ms(),
            ..Cdr::default()
        };
        self.control.live.insert(LiveCall {
            id: handle.0,
            direction: "inbound",
            from: cdr.from.clone(),
            to: cdr.to.clone(),
            script: Some(route.script.clone()),
            state: "ringing",
            started_at_ms: cdr.started_at,
            answered_at_ms: None,
            bridged_to: None,
            duration_s: 0.0,
        });
        let caller_number = crate::sip::message::uri_user(&call.from.uri);
        let caller_name = call.from.display.clone();
        // The parsed INVITE is not needed past this point: do not keep it for the whole call.
        drop(call);
        let call_input = input.to_string().into_boxed_str();
        let mut inv = Invocation::new(script, Mode::Class5, input);
        let mut state = CallState::new(self, handle, hangup_tx, events_tx);
        inv.ctx = Some(Box::new(ctx.with_stop(state.stop.subscribe())));
        state.input = call_input;
        state.media = media;
        state.out_headers = out_headers;
        state.cdr = cdr;
        state.caller_number = caller_number;
        state.caller_name = caller_name;
        let outcome = state.drive(inv, req_rx, events).await;
        // Boxed, as are the handlers in `drive`: an async fn's state is as large as the
        // largest future it awaits, and a live call's task would otherwise carry the room for
        // a bridge or a CDR write all call long.
        Box::pin(state.finish(outcome)).await;
    }
}

/// The call as the task sees it.
pub(super) struct CallState {
    pub(super) server: VoiceServer,
    pub(super) call: CallHandle,
    pub(super) answered: bool,
    acked: bool,
    /// A final response or BYE went out, or the stack reported the end.
    pub(super) ended: bool,
    /// Answers waiting for the ACK (an explicit `answer()` and implicit ones may overlap).
    pending_answer: Vec<Reply>,
    hangup_waiters: Vec<Reply>,
    /// Who ended the call ("remote" or "local"), for `waitForHangup()` asked after the end.
    hung_up_by: Option<&'static str>,
    pub(super) hangup: watch::Sender<bool>,
    /// Bound at answer/early media; the media issue's session drives it.
    rtp: Option<RtpSocket>,
    pub(super) negotiated: Option<Negotiated>,
    /// The running media task, shared with the ctx.
    pub(super) media: MediaSlot,
    pub(super) out_headers: OutHeaders,
    /// Filled in as the call goes; written when it ends.
    pub(super) cdr: Cdr,
    /// This task's event queue, handed to the dispatcher for the legs it places.
    pub(super) events_tx: mpsc::UnboundedSender<LegEvent>,
    /// The bridge in progress, if any. Boxed, as is `transfer`: most calls never have one,
    /// and the task carries its state for the whole call.
    pub(super) bridge: Option<Box<Bridge>>,
    pub(super) bridge_attempts: u32,
    /// The caller's number and display name: the default caller ID of outbound legs.
    pub(super) caller_number: Option<String>,
    pub(super) caller_name: Option<String>,
    /// 180/183 already sent to the caller.
    pub(super) ringing_sent: bool,
    /// When the call is hung up whatever it is doing (`[calls] max_duration_s`).
    max_end: Option<tokio::time::Instant>,
    /// Raised to stop the script `[calls] after_hangup_s` after the call ended, at `stop_at`.
    pub(super) stop: watch::Sender<bool>,
    stop_at: Option<tokio::time::Instant>,
    /// The CDR's row once committed ahead of our BYE; the end of the script updates it.
    cdr_id: Option<i64>,
    /// A transfer waiting for its REFER's outcome.
    pub(super) transfer: Option<Box<PendingTransfer>>,
    /// The script's `data`, for the scripts `ctx.destination()` runs on this call: kept as
    /// JSON text, smaller than the parsed tree, and parsed only when a destination runs.
    pub(super) input: Box<str>,
}

/// A blind transfer in flight: the REFER went out, its NOTIFYs tell how it goes.
pub(super) struct PendingTransfer {
    pub(super) target: String,
    pub(super) opts: BridgeOpts,
    pub(super) reply: Reply,
    pub(super) accepted: bool,
    /// The Refer-To URI.
    pub(super) uri: String,
}

pub(super) use crate::store::now_ms;

fn sip_error(e: TransportError) -> HostError {
    match e {
        TransportError::Ua(UaError::UnknownCall) => hangup_error(),
        other => HostError::error(other.to_string()),
    }
}

impl CallState {
    pub(super) fn new(
        server: VoiceServer,
        call: CallHandle,
        hangup: watch::Sender<bool>,
        events_tx: mpsc::UnboundedSender<LegEvent>,
    ) -> Self {
        let max_end = (server.calls.max_duration_s > 0).then(|| {
            tokio::time::Instant::now() + Duration::from_secs(server.calls.max_duration_s)
        });
        CallState {
            events_tx,
            bridge: None,
            bridge_attempts: 0,
            caller_number: None,
            caller_name: None,
            ringing_sent: false,
            max_end,
            stop: watch::channel(false).0,
            stop_at: None,
            cdr_id: None,
            transfer: None,
            input: "null".into(),
            server,
            call,
            answered: false,
            acked: false,
            ended: false,
            pending_answer: Vec::new(),
            hangup_waiters: Vec::new(),
            hung_up_by: None,
            hangup,
            rtp: None,
            negotiated: None,
            media: MediaSlot::default(),
            out_headers: OutHeaders::default(),
            cdr: Cdr::default(),
        }
    }

    /// Runs the script to its end while serving its requests and the call's events.
    pub(super) async fn drive(
        &mut self,
        inv: Invocation,
        mut requests: mpsc::UnboundedReceiver<Box<CtxRequest>>,
        mut events: mpsc::UnboundedReceiver<LegEvent>,
    ) -> Result<Json, ScriptError> {
        let engine = self.server.engine.clone();
        let run = engine.run(inv);
        tokio::pin!(run);
        let mut events_open = true;
        // Scripts `ctx.destination()` runs on this call, each with its reply.
        let mut nested = FuturesUnordered::new();
        loop {
            if self.ended && self.stop_at.is_none() {
                // The call is over; a script awaiting plain timers would otherwise run on
                // (and hold its CDR) for ever. It is no longer a live call either.
                self.server.control.live.remove(self.call.0);
                self.stop_at = Some(
                    tokio::time::Instant::now()
                        + Duration::from_secs(self.server.calls.after_hangup_s),
                );
            }
            let ring_deadline = self.bridge.as_ref().and_then(|b| b.ring_deadline);
            let deadline = [ring_deadline, self.max_end, self.stop_at]
                .into_iter()
                .flatten()
                .min();
            let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
            tokio::select! {
                out = &mut run => {
                    return match out {
                        Ok(o) => o.result,
                        Err(e) => Err(ScriptError::internal(e.to_string())),
                    };
                }
                Some(req) = requests.recv() => match *req {
                    CtxRequest::Destination { app, data, ctx, reply } => {
                        match self.destination(&app, data, ctx, nested.len()) {
                            Ok(run) => nested.push(async move {
                                let _ = reply.send(run.await);
                            }),
                            Err(e) => {
                                let _ = reply.send(Err(e));
                            }
                        }
                    }
                    req => Box::pin(self.request(req)).await,
                },
                Some(()) = nested.next(), if !nested.is_empty() => {}
                ev = events.recv(), if events_open => match ev {
                    Some(boxed) => {
                        let (leg, ev) = *boxed;
                        Box::pin(self.leg_event(leg, ev)).await
                    }
                    None => events_open = false,
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                    Box::pin(self.deadline_passed()).await
                }
            }
        }
    }

    /// A ring timeout or the call's maximum duration.
    async fn deadline_passed(&mut self) {
        let now = tokio::time::Instant::now();
        if self.stop_at.is_some_and(|t| t <= now) {
            self.stop_at = Some(now + Duration::from_secs(86_400 * 365));
            tracing::info!(call = ?self.call, "the call ended and its script is still running: stopping it");
            self.stop.send_replace(true);
        }
        if self.max_end.is_some_and(|t| t <= now) {
            self.max_end = None;
            tracing::info!(call = ?self.call, "maximum call duration reached");
            self.kill("max_duration".into()).await;
            return;
        }
        if self
            .bridge
            .as_ref()
            .and_then(|b| b.ring_deadline)
            .is_some_and(|t| t <= now)
        {
            self.bridge_timed_out().await;
        }
    }

    /// Hang up from outside the script (API, limits): like `ctx.hangup()`.
    async fn kill(&mut self, cause: String) {
        if self.ended {
            return;
        }
        self.abandon_bridge().await;
        self.ended = true;
        // The flag goes up before the media stops, so a prompt the stop ends reads as a
        // hang-up (see `media_ops::until_hangup`).
        let _ = self.hangup.send(true);
        self.stop_media();
        self.ended_by("engine", cause);
        let sent = if self.answered {
            self.commit_cdr_ahead().await;
            self.server.sip.hangup(self.call).await
        } else {
            self.server
                .sip
                .reject(self.call, 480, None, Vec::new())
                .await
        };
        if let Err(e) = sent {
            tracing::debug!(call = ?self.call, "hangup not sent: {e}");
        }
        for r in self.pending_answer.drain(..) {
            let _ = r.send(Err(hangup_error()));
        }
        self.release_hangup_waiters("local");
    }

    /// Answers every `waitForHangup()` with who ended the call (the first to do so).
    pub(super) fn release_hangup_waiters(&mut self, by: &'static str) {
        let by = *self.hung_up_by.get_or_insert(by);
        for w in self.hangup_waiters.drain(..) {
            let _ = w.send(Ok(json!({ "by": by })));
        }
    }

    /// An event of this call's own leg or of a leg it placed.
    async fn leg_event(&mut self, leg: CallHandle, ev: CallEvent) {
        if leg == self.call {
            let caller_gone = matches!(ev, CallEvent::Ended { .. });
            match ev {
                CallEvent::Kill { cause } => self.kill(cause).await,
                CallEvent::ReferResponse { code } => self.refer_response(code).await,
                CallEvent::TransferNotify { code } => self.transfer_notify(code).await,
                CallEvent::InDialog {
                    kind: InDialogKind::Refer,
                    request,
                    ..
                } => self.refer_from_caller(&request).await,
                CallEvent::InDialog {
                    kind: InDialogKind::ReInvite | InDialogKind::Update,
                    media: Some(neg),
                    ..
                } if self.relaying() => self.caller_reoffered(neg).await,
                ev => self.event(ev),
            }
            if caller_gone {
                self.bridge_caller_gone().await;
                self.transfer_caller_gone();
            }
        } else if self.bridge.as_ref().is_some_and(|b| b.leg == leg) {
            self.bridge_event(ev).await;
        } else if self
            .bridge
            .as_ref()
            .and_then(|b| b.refer.as_ref())
            .is_some_and(|r| r.handle == leg)
        {
            self.refer_leg_event(ev).await;
        }
    }

    fn event(&mut self, ev: CallEvent) {
        match ev {
            CallEvent::Acked => {
                self.acked = true;
                for r in self.pending_answer.drain(..) {
                    let _ = r.send(Ok(json!(true)));
                }
            }
            CallEvent::InDialog {
                kind,
                request,
                media,
            } => self.in_dialog(kind, &request, media),
            CallEvent::Progress { .. }
            | CallEvent::Answered { .. }
            | CallEvent::ReferResponse { .. }
            | CallEvent::TransferNotify { .. }
            | CallEvent::Kill { .. } => {}
            CallEvent::Ended { remote, .. } => {
                self.ended = true;
                if remote {
                    // Before the media stops: see `kill`.
                    let _ = self.hangup.send(true);
                }
                self.stop_media();
                let cause = if self.answered {
                    "normal_clearing"
                } else {
                    "cancelled"
                };
                if remote {
                    self.ended_by("caller", cause.to_string());
                } else {
                    self.ended_by("engine", "ended".to_string());
                }
                for r in self.pending_answer.drain(..) {
                    let _ = r.send(Err(hangup_error()));
                }
                self.release_hangup_waiters(if remote { "remote" } else { "local" });
            }
        }
    }

    async fn media_config(&mut self) -> Result<MediaConfig, HostError> {
        // Early media already runs on a socket (or a bridge relays it): answer with that one.
        if let (None, Some(running)) = (&self.rtp, self.media.get()) {
            let mut cfg = MediaConfig::new(self.server.rtp_ip, running.media.local_addr.port());
            cfg.codecs = self.server.codecs.clone();
            return Ok(cfg);
        }
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
                    self.pending_answer.push(reply);
                } else {
                    match self.answer(headers).await {
                        Ok(()) => self.pending_answer.push(reply),
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
            CtxRequest::Hangup {
                cause,
                headers,
                reply,
            } => {
                if !self.ended {
                    self.ended = true;
                    self.stop_media();
                    let why =
                        cause.map_or_else(|| "normal_clearing".to_string(), |c| c.to_string());
                    self.ended_by("script", why);
                    let sent = if self.answered {
                        self.commit_cdr_ahead().await;
                        self.server
                            .sip
                            .hangup_with_headers(self.call, headers)
                            .await
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
                    for r in self.pending_answer.drain(..) {
                        let _ = r.send(Err(HostError::new("Hangup", "the script hung up")));
                    }
                    self.release_hangup_waiters("local");
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
                    self.ended_by("script", code.to_string());
                    self.server
                        .sip
                        .reject(self.call, code, reason, headers)
                        .await
                        .map(|()| json!(true))
                        .map_err(sip_error)
                };
                let _ = reply.send(r);
            }
            CtxRequest::Bridge { dest, opts, reply } => {
                self.start_bridge(dest, opts, reply, false).await
            }
            CtxRequest::Transfer { dest, opts, reply } => {
                self.start_transfer(dest, opts, reply).await
            }
            CtxRequest::Destination { reply, .. } => {
                // Served by `drive`, which runs the second script beside the first.
                let _ = reply.send(Err(HostError::error("ctx.destination: not available here")));
            }
            CtxRequest::WaitForHangup(reply) => {
                if self.ended {
                    let by = self.hung_up_by.unwrap_or("local");
                    let _ = reply.send(Ok(json!({ "by": by })));
                } else {
                    self.hangup_waiters.push(reply);
                }
            }
        }
    }

    pub(super) async fn answer(&mut self, headers: Vec<(String, String)>) -> Result<(), HostError> {
        let media = self.media_config().await?;
        match self
            .server
            .sip
            .answer_with_headers(self.call, media, headers)
            .await
        {
            Ok(neg) => {
                self.answered = true;
                self.cdr.answered_at = Some(now_ms());
                let at = self.cdr.answered_at;
                self.server.control.live.update(self.call.0, |c| {
                    c.answered_at_ms = at;
                    if c.state == "ringing" || c.state == "calling" {
                        c.state = "answered";
                    }
                });
                self.negotiated = neg;
                self.start_media();
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

    pub(super) async fn ring(&mut self, early: bool) -> Result<Json, HostError> {
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
            self.start_media();
        }
        Ok(json!(true))
    }

    /// Stop the media task, keeping the digits and recordings it saw for the CDR.
    pub(super) fn stop_media(&mut self) {
        if let Some(media) = self.media.shutdown() {
            let digits = media.media.digits.history();
            if !digits.is_empty() {
                self.cdr.digits.push(digits);
            }
            let recorded = media
                .recorded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            self.cdr.recordings.extend(recorded);
        }
    }

    /// Who ended the call and why, the first time it is known.
    pub(super) fn ended_by(&mut self, side: &str, cause: String) {
        if self.cdr.hangup_side.is_none() {
            self.cdr.hangup_side = Some(side.to_string());
            self.cdr.hangup_cause = Some(cause);
        }
    }

    /// An originated call the callee answered: the ctx starts with media running.
    pub(super) fn set_answered_outbound(&mut self, rtp: RtpSocket, neg: Negotiated) {
        self.answered = true;
        self.acked = true;
        self.rtp = Some(rtp);
        self.negotiated = Some(neg);
        self.start_media();
    }

    /// The SDP is agreed: hand the bound RTP socket to a media task the ctx can use.
    fn start_media(&mut self) {
        if self.media.get().is_some() {
            return;
        }
        let (Some(socket), Some(neg)) = (self.rtp.take(), self.negotiated.as_ref()) else {
            return;
        };
        match media_bind::start(socket, neg, &self.server.media, self.hangup.subscribe()) {
            Ok(media) => self.media.set(media),
            Err(e) => tracing::warn!(call = ?self.call, "cannot start the call's media: {e}"),
        }
    }

    /// INFO may carry a digit; a re-INVITE or UPDATE may move or hold the media.
    fn in_dialog(
        &mut self,
        kind: InDialogKind,
        request: &rsip::Request,
        media: Option<Negotiated>,
    ) {
        let Some(ctx) = self.media.get() else { return };
        match kind {
            InDialogKind::Info => {
                let content_type = crate::sip::message::header(&request.headers, "Content-Type")
                    .unwrap_or_default();
                let body = String::from_utf8_lossy(&request.body);
                ctx.media.info(&content_type, &body);
            }
            InDialogKind::ReInvite | InDialogKind::Update => {
                let Some(neg) = media else { return };
                let sending = matches!(
                    neg.local_direction,
                    Direction::SendRecv | Direction::SendOnly
                ) && neg.remote_rtp.is_some();
                if let Some(remote) = neg.remote_rtp {
                    ctx.media.update_remote(remote);
                }
                ctx.media.set_sending(sending);
                self.negotiated = Some(neg);
            }
            InDialogKind::Options => {}
            InDialogKind::Refer => {}
        }
    }

    /// The script is over: reject with its error before answer, else make sure the call ends.
    pub(super) async fn finish(&mut self, outcome: Result<Json, ScriptError>) {
        if let Err(e) = &outcome {
            tracing::info!(call = ?self.call, code = e.code, "class5 script ended with an error: {}", e.message);
        }
        self.abandon_bridge().await;
        self.transfer_caller_gone();
        self.stop_media();
        self.end_call(&outcome).await;
        self.server.control.live.remove(self.call.0);
        let label = match (self.answered, outcome.is_ok()) {
            (true, true) => "completed",
            (true, false) => "script_error",
            (false, true) => "not_answered",
            (false, false) => "rejected",
        };
        crate::metrics::Metrics::inc(&crate::metrics::metrics().calls_ended, "outcome", label);
        self.write_cdr(outcome).await;
    }

    /// Write the call's CDR before the task ends (a crash after this loses nothing).
    async fn write_cdr(&mut self, outcome: Result<Json, ScriptError>) {
        let Some(records) = self.server.records.clone() else {
            return;
        };
        let mut cdr = std::mem::take(&mut self.cdr);
        cdr.ended_at = Some(now_ms());
        match outcome {
            Ok(result) => cdr.result = Some(result),
            Err(e) => {
                cdr.error = Some(CdrError {
                    code: e.code,
                    message: e.message,
                })
            }
        }
        let written = match self.cdr_id {
            Some(id) => records.update_cdr(id, cdr).await,
            None => records.write_cdr(cdr).await,
        };
        if let Err(e) = written {
            tracing::error!(call = ?self.call, "CDR not written: {e}");
        }
    }

    /// Commits the CDR as it stands before our BYE goes out (the script's result is added
    /// when it ends): a crash after the caller saw the call end must not lose its record.
    /// Every BYE we send on the caller leg (script, limits, API, bridge, transfer, REFER)
    /// goes through here first.
    pub(super) async fn commit_cdr_ahead(&mut self) {
        let Some(records) = self.server.records.clone() else {
            return;
        };
        if self.cdr_id.is_some() {
            return;
        }
        let mut cdr = self.cdr.clone();
        cdr.ended_at = Some(now_ms());
        match records.write_cdr_ahead(cdr).await {
            Ok(written) => self.cdr_id = written.map(|c| c.id),
            Err(e) => tracing::error!(call = ?self.call, "CDR not written ahead of BYE: {e}"),
        }
    }

    /// The script is over: reject with its error before answer, else make sure the call ends.
    async fn end_call(&mut self, outcome: &Result<Json, ScriptError>) {
        if self.ended {
            return;
        }
        self.ended = true;
        let sent = match (outcome, self.answered) {
            (Err(e), false) => {
                let code = if (300..=699).contains(&e.code) {
                    e.code
                } else {
                    500
                };
                self.ended_by("engine", code.to_string());
                let reason = crate::routing::redirect::sanitize_reason(&e.message);
                self.server
                    .sip
                    .reject(self.call, code, Some(reason), Vec::new())
                    .await
            }
            _ => {
                self.ended_by("engine", "script_ended".to_string());
                self.commit_cdr_ahead().await;
                let headers = self
                    .out_headers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                self.server
                    .sip
                    .hangup_with_headers(self.call, headers)
                    .await
            }
        };
        if let Err(e) = sent {
            tracing::debug!(call = ?self.call, "final hangup not sent: {e}");
        }
    }
}
