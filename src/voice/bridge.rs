//! `ctx.bridge` and `ctx.transfer`: callforge as a B2BUA. The call task places the second
//! leg, gives the caller ringback or the callee's early media, relays RTP between the legs
//! once the callee's SDP is known, and ends both legs when either hangs up.
//!
//! Arguments (all forms are accepted):
//! - `bridge(destination)`
//! - `bridge(destination, {timeout, callerId, headers, continueOnFail, hangupAfterBridge, trunk})`
//! - `bridge(destination, continue_on)` — ConnexCS's `continue_on`: `false` (the default: the
//!   call ends with the bridge), `true` (the script goes on whatever happened), `'fail'` (it
//!   goes on after a failed attempt), `'completed'` (it goes on after an answered bridge)
//! - `bridge(destination, continue_on, hangupAfterBridge)` — e.g. `bridge(n, false, true)`
//!
//! The promise resolves when the bridge ends with `{status, sipCode, duration}`; `status` is
//! `completed`, `busy`, `no-answer`, `failed` or `cancelled`.

use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};
use tokio::sync::{oneshot, watch};

use super::{
    call::{now_ms, CallEvent, CallState},
    ctx::{hangup_error, Reply},
    media_task,
    trunks::{TrunkError, TrunkSlot},
};
use crate::{
    media::{
        g711::G711,
        relay::{BlockedKeys, LegMedia, OutStream},
        relay_driver::{relay, BridgeLeg, RelayGates, RelayStats},
        rtp::StreamPosition,
        MediaSession, ParkedRtpSocket, RelayThreads, RtpSocket,
    },
    script::HostError,
    sip::{sdp::Codec, CallHandle, EndReason, InDialogKind, Negotiated},
};

/// US ringback (440+480 Hz, 2 s on, 4 s off), played to an answered caller while the callee
/// rings without early media.
const RINGBACK: &str = "tone:440+480,2000;0,4000;440+480,2000;0,4000;440+480,2000;0,4000;440+480,2000;0,4000;440+480,2000;0,4000;440+480,2000;0,4000;440+480,2000;0,4000;440+480,2000;0,4000;440+480,2000;0,4000;440+480,2000;0,4000";

/// What the script asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct BridgeOpts {
    pub timeout: Option<Duration>,
    pub caller_id: Option<String>,
    pub headers: Vec<(String, String)>,
    pub continue_on_fail: bool,
    /// When the callee hangs up first, hang up the caller too (the default).
    pub hangup_after: bool,
    pub trunk: Option<String>,
}

impl Default for BridgeOpts {
    fn default() -> Self {
        BridgeOpts {
            timeout: None,
            caller_id: None,
            headers: Vec::new(),
            continue_on_fail: false,
            hangup_after: true,
            trunk: None,
        }
    }
}

fn destination_text(v: Option<&Json>, method: &str) -> Result<String, HostError> {
    match v {
        Some(Json::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Some(Json::Number(n)) => Ok(n.to_string()),
        _ => Err(HostError::type_error(format!(
            "ctx.{method}: destination must be a number, extension or sip: URI"
        ))),
    }
}

/// Read `bridge(...)`'s arguments (see the module doc).
pub fn parse_bridge_args(args: &[Json]) -> Result<(String, BridgeOpts), HostError> {
    let dest = destination_text(args.first(), "bridge")?;
    let mut opts = BridgeOpts::default();
    match args.get(1) {
        None | Some(Json::Null) => {}
        Some(Json::Bool(b)) => {
            opts.continue_on_fail = *b;
            opts.hangup_after = !*b;
            if let Some(Json::Bool(h)) = args.get(2) {
                opts.hangup_after = *h;
            }
        }
        Some(Json::String(s)) => {
            match s.trim().to_ascii_lowercase().as_str() {
                "fail" | "failed" => opts.continue_on_fail = true,
                "completed" | "complete" => opts.hangup_after = false,
                other => {
                    return Err(HostError::type_error(format!(
                        "ctx.bridge: continue_on {other:?} is not one of true, false, 'fail', 'completed'"
                    )))
                }
            }
            if let Some(Json::Bool(h)) = args.get(2) {
                opts.hangup_after = *h;
            }
        }
        Some(Json::Object(o)) => {
            if let Some(t) = o.get("timeout").filter(|t| !t.is_null()) {
                let secs = t
                    .as_f64()
                    .filter(|s| *s > 0.0 && *s <= 3600.0)
                    .ok_or_else(|| {
                        HostError::type_error("ctx.bridge: timeout must be seconds, 0 < t <= 3600")
                    })?;
                opts.timeout = Some(Duration::from_secs_f64(secs));
            }
            opts.caller_id =
                o.get("callerId")
                    .or_else(|| o.get("caller_id"))
                    .and_then(|v| match v {
                        Json::String(s) => Some(s.clone()),
                        Json::Number(n) => Some(n.to_string()),
                        _ => None,
                    });
            if let Some(h) = o.get("headers") {
                opts.headers = headers_arg(h)?;
            }
            opts.continue_on_fail = o
                .get("continueOnFail")
                .or_else(|| o.get("continue_on_fail"))
                .and_then(Json::as_bool)
                .unwrap_or(false);
            opts.hangup_after = o
                .get("hangupAfterBridge")
                .and_then(Json::as_bool)
                .unwrap_or(true);
            opts.trunk = o.get("trunk").and_then(Json::as_str).map(str::to_string);
        }
        Some(_) => {
            return Err(HostError::type_error(
                "ctx.bridge: the second argument is an options object or continue_on (true, false, 'fail', 'completed')",
            ))
        }
    }
    Ok((dest, opts))
}

/// `{name: value}` or `[{key, value}]` (the routing object's shape) → header pairs.
fn headers_arg(v: &Json) -> Result<Vec<(String, String)>, HostError> {
    let text = |v: &Json| match v {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    };
    let pairs: Vec<(String, String)> = match v {
        Json::Object(o) => o.iter().map(|(k, v)| (k.clone(), text(v))).collect(),
        Json::Array(a) => a
            .iter()
            .filter_map(|h| Some((h.get("key")?.as_str()?.to_string(), text(h.get("value")?))))
            .collect(),
        Json::Null => Vec::new(),
        _ => {
            return Err(HostError::type_error(
                "ctx.bridge: headers must be {name: value} or [{key, value}]",
            ))
        }
    };
    for (n, _) in &pairs {
        if !super::ctx::is_token(n) {
            return Err(HostError::type_error(format!(
                "ctx.bridge: {n:?} is not a valid header name"
            )));
        }
    }
    Ok(pairs)
}

/// Read `transfer(target[, {timeout}])`.
pub fn parse_transfer_args(args: &[Json]) -> Result<(String, BridgeOpts), HostError> {
    let dest = destination_text(args.first(), "transfer")?;
    let (_, mut opts) = parse_bridge_args(&[
        json!(dest.clone()),
        args.get(1).cloned().unwrap_or(Json::Null),
    ])?;
    // A blind transfer hands the caller over: nothing for the script to continue with.
    opts.hangup_after = true;
    Ok((dest, opts))
}

/// How a bridge attempt ended, as the script sees it.
fn status_of(reason: &EndReason, timed_out: bool, caller_gone: bool) -> (&'static str, u16) {
    match reason {
        EndReason::Failed(c @ (486 | 600)) => ("busy", *c),
        EndReason::Failed(c @ (408 | 480)) => ("no-answer", *c),
        EndReason::Failed(487) | EndReason::Cancelled if caller_gone => ("cancelled", 487),
        EndReason::Failed(487) | EndReason::Cancelled if timed_out => ("no-answer", 408),
        EndReason::Cancelled => ("cancelled", 487),
        EndReason::Timeout => ("no-answer", 408),
        EndReason::Failed(c) => ("failed", *c),
        _ => ("failed", 500),
    }
}

/// The relay task and how to stop it.
pub(super) struct RelayRun {
    stop: oneshot::Sender<()>,
    /// Opens and closes each direction as the legs hold and resume.
    pub(super) gates: watch::Sender<RelayGates>,
    done: tokio::task::JoinHandle<std::io::Result<RelayOut>>,
}

/// What a relay thread gives back: the sockets, off its reactor.
struct RelayOut {
    a: ParkedRtpSocket,
    session: Option<MediaSession>,
    b: ParkedRtpSocket,
    stats: RelayStats,
}

/// A stopped relay: the first leg's socket (and the caller's media session when the first
/// leg is the caller), the second leg's socket, and the counters, on the call's runtime.
pub(super) struct RelayEnded {
    pub(super) a: RtpSocket,
    pub(super) session: Option<MediaSession>,
    pub(super) b: RtpSocket,
    pub(super) stats: RelayStats,
}

/// Why a relay could not be started or its sockets not taken back.
#[derive(Debug, thiserror::Error)]
pub(super) enum RelayError {
    #[error("moving the RTP sockets between runtimes failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the relay task ended abnormally: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// One side of a relay, owned: the relay task borrows it and hands the socket back.
pub(super) struct RelaySide {
    pub(super) socket: RtpSocket,
    pub(super) media: LegMedia,
    pub(super) remote: std::net::SocketAddr,
    /// The stream sent toward this side.
    pub(super) out: OutStream,
    /// Keys whose events from this side are not relayed (`ctx.blockDtmf` on the caller).
    pub(super) blocked: BlockedKeys,
}

impl RelayRun {
    /// Relay `a` ↔ `b` on a relay thread (see [`RelayThreads`]) until stopped. The sockets
    /// leave this runtime's reactor for the relay thread's and come back in [`Self::finish`].
    /// `session` (the caller's media session when `a` is the caller) comes back with them,
    /// to resume its media.
    pub(super) fn spawn(
        relays: &RelayThreads,
        a: RelaySide,
        b: RelaySide,
        session: Option<MediaSession>,
    ) -> Result<Self, RelayError> {
        let (stop, stopped) = oneshot::channel::<()>();
        let (gates, gates_rx) = watch::channel(RelayGates::default());
        let (a_parked, b_parked) = (a.socket.park()?, b.socket.park()?);
        let done = relays.spawn(async move {
            let (mut a_sock, mut b_sock) = (a_parked.attach()?, b_parked.attach()?);
            let stats = relay(
                BridgeLeg {
                    socket: &mut a_sock,
                    media: a.media,
                    remote: a.remote,
                    out: a.out,
                    blocked: a.blocked,
                },
                BridgeLeg {
                    socket: &mut b_sock,
                    media: b.media,
                    remote: b.remote,
                    out: b.out,
                    blocked: b.blocked,
                },
                gates_rx,
                async {
                    let _ = stopped.await;
                },
            )
            .await;
            Ok(RelayOut {
                a: a_sock.park()?,
                session,
                b: b_sock.park()?,
                stats,
            })
        });
        Ok(RelayRun { stop, gates, done })
    }

    /// Stops the relay and takes its sockets back onto the calling runtime.
    pub(super) async fn finish(self) -> Result<RelayEnded, RelayError> {
        let _ = self.stop.send(());
        let out = self.done.await??;
        Ok(RelayEnded {
            a: out.a.attach()?,
            session: out.session,
            b: out.b.attach()?,
            stats: out.stats,
        })
    }
}

/// One bridge attempt in progress.
pub(super) struct Bridge {
    pub(super) leg: CallHandle,
    reply: Option<Reply>,
    opts: BridgeOpts,
    dest: String,
    /// Answer timeout; `None` once answered.
    pub(super) ring_deadline: Option<tokio::time::Instant>,
    pub(super) answered_at: Option<Instant>,
    /// The B leg's RTP socket until the relay takes it.
    rtp: Option<RtpSocket>,
    pub(super) relay: Option<RelayRun>,
    timed_out: bool,
    caller_gone: bool,
    /// A provisional response arrived (a CANCEL can be sent).
    progress_seen: bool,
    ringback: bool,
    /// Renders and plays the ringback; aborted when the bridge ends, so a ringback still
    /// being rendered then never starts playing over what the script does next.
    ringback_task: Option<tokio::task::JoinHandle<()>>,
    _slot: TrunkSlot,
    /// Set when this bridge is a transfer's fallback.
    pub(super) transfer: bool,
    /// What the B leg negotiated, once known (a REFER from the caller re-bridges it).
    pub(super) b_neg: Option<Negotiated>,
    /// The leg a caller's accepted REFER is placing, then the one B is bridged to instead.
    pub(super) refer: Option<super::refer_in::ReferLeg>,
}

pub(super) fn leg_media(neg: &Negotiated) -> LegMedia {
    LegMedia {
        codec: match neg.codec {
            Codec::Pcmu => G711::Pcmu,
            Codec::Pcma => G711::Pcma,
        },
        audio_pt: neg.payload_type,
        dtmf_pt: neg.dtmf_payload_type,
    }
}

fn outcome(status: &str, code: u16, duration: f64, dest: &str) -> Json {
    json!({"status": status, "sipCode": code, "duration": duration, "destination": dest})
}

impl CallState {
    /// `ctx.bridge(...)`: place the B leg; the reply comes when the bridge ends.
    pub(super) async fn start_bridge(
        &mut self,
        dest: String,
        opts: BridgeOpts,
        reply: Reply,
        transfer: bool,
    ) {
        if self.ended {
            let _ = reply.send(Err(hangup_error()));
            return;
        }
        if self.bridge.is_some() {
            let _ = reply.send(Err(HostError::error(
                "ctx.bridge: a bridge is already in progress on this call",
            )));
            return;
        }
        let limit = self.server.calls.max_bridge_attempts;
        self.bridge_attempts += 1;
        if self.bridge_attempts > limit {
            tracing::info!(call = ?self.call, limit, "bridge attempts limit reached");
            let _ = reply.send(Ok(json!({
                "status": "failed", "sipCode": 503, "duration": 0,
                "destination": dest,
                "reason": format!("this call reached its limit of {limit} bridge attempts"),
            })));
            return;
        }
        let caller_id = opts
            .caller_id
            .clone()
            .or_else(|| self.caller_number.clone());
        let dialed = match self.server.trunks.current().resolve(
            &dest,
            opts.trunk.as_deref(),
            caller_id.as_deref(),
        ) {
            Ok(d) => d,
            Err(e) => {
                let _ = reply.send(Err(HostError::error(format!("ctx.bridge: {e}"))));
                return;
            }
        };
        let slot = match dialed.acquire() {
            Ok(s) => s,
            Err(e @ TrunkError::AtLimit { .. }) => {
                tracing::info!(call = ?self.call, "bridge refused: {e}");
                let result = json!({"status": "failed", "sipCode": 503, "duration": 0,
                    "destination": dest, "reason": e.to_string()});
                self.attempt_failed(reply, result, &opts, 503).await;
                return;
            }
            Err(e) => {
                let _ = reply.send(Err(HostError::error(format!("ctx.bridge: {e}"))));
                return;
            }
        };
        let rtp = match RtpSocket::bind(&self.server.rtp_ports, self.server.rtp_ip).await {
            Ok(s) => s,
            Err(e) => {
                let result = outcome("failed", 503, 0.0, &dest);
                tracing::warn!(call = ?self.call, "no RTP port for the bridge: {e}");
                self.attempt_failed(reply, result, &opts, 503).await;
                return;
            }
        };
        let port = rtp.local_addr().map(|a| a.port()).unwrap_or_default();
        let oc = dialed.outbound_call(
            self.server.rtp_ip,
            port,
            self.caller_name.clone(),
            opts.headers.clone(),
        );
        let leg = match self.server.control.place(oc, self.events_tx.clone()).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(call = ?self.call, "outbound INVITE not sent: {e}");
                let result = outcome("failed", 503, 0.0, &dest);
                self.attempt_failed(reply, result, &opts, 503).await;
                return;
            }
        };
        tracing::info!(call = ?self.call, leg = leg.0, uri = %dialed.request_uri, "bridging");
        let timeout = opts
            .timeout
            .unwrap_or(Duration::from_secs(self.server.calls.ring_timeout_s.max(1)));
        self.server.control.live.update(self.call.0, |c| {
            c.state = "bridging";
            c.bridged_to = Some(leg.0);
        });
        self.bridge = Some(Box::new(Bridge {
            leg,
            reply: Some(reply),
            opts,
            dest,
            ring_deadline: Some(tokio::time::Instant::now() + timeout),
            answered_at: None,
            rtp: Some(rtp),
            relay: None,
            timed_out: false,
            caller_gone: false,
            progress_seen: false,
            ringback: false,
            ringback_task: None,
            _slot: slot,
            transfer,
            b_neg: None,
            refer: None,
        }));
    }

    /// An attempt that never placed a leg: resolve and, without continueOnFail, end the call.
    async fn attempt_failed(&mut self, reply: Reply, result: Json, opts: &BridgeOpts, code: u16) {
        let _ = reply.send(Ok(result));
        if !opts.continue_on_fail {
            self.end_after_bridge(code).await;
        }
    }

    /// The B leg's ring timeout passed: cancel it (its end reports `no-answer`).
    pub(super) async fn bridge_timed_out(&mut self) {
        let Some(b) = self.bridge.as_mut() else {
            return;
        };
        b.ring_deadline = None;
        b.timed_out = true;
        let leg = b.leg;
        let silent = !b.progress_seen;
        tracing::info!(call = ?self.call, leg = leg.0, "bridge not answered in time; cancelling");
        if let Err(e) = self.server.sip.hangup(leg).await {
            tracing::debug!(leg = leg.0, "cancel not sent: {e}");
        }
        if silent {
            // Nothing answered at all (a dead host): CANCEL must wait for a provisional that
            // may never come, so the script is not kept waiting for timer B; the stack still
            // cancels the INVITE if a late provisional arrives.
            self.bridge_ended(EndReason::Timeout).await;
        }
    }

    /// The caller is gone: end the B leg too (CANCEL or BYE).
    pub(super) async fn bridge_caller_gone(&mut self) {
        let Some(b) = self.bridge.as_mut() else {
            return;
        };
        if b.refer.as_ref().is_some_and(|r| r.connected) {
            // The caller transferred B away and left: B stays with the transfer target.
            return;
        }
        b.caller_gone = true;
        let leg = b.leg;
        if let Some(r) = b.refer.take() {
            let _ = self.server.sip.hangup(r.handle).await;
        }
        if let Err(e) = self.server.sip.hangup(leg).await {
            tracing::debug!(leg = leg.0, "B leg hangup not sent: {e}");
        }
    }

    /// An event of the B leg.
    pub(super) async fn bridge_event(&mut self, ev: CallEvent) {
        match ev {
            CallEvent::Progress { code, media } => {
                if let Some(b) = self.bridge.as_mut() {
                    b.progress_seen = true;
                }
                if let Some(neg) = media {
                    self.bridge_early_media(neg).await;
                } else if code == 180 || code == 183 {
                    self.bridge_ringing().await;
                }
            }
            CallEvent::Answered { media } => self.bridge_answered(media).await,
            CallEvent::Ended { reason, .. } => self.bridge_ended(reason).await,
            CallEvent::InDialog {
                kind: InDialogKind::ReInvite | InDialogKind::Update,
                media: Some(neg),
                ..
            } => self.callee_reoffered(neg).await,
            CallEvent::InDialog { .. }
            | CallEvent::Acked
            | CallEvent::Kill { .. }
            | CallEvent::ReferResponse { .. }
            | CallEvent::TransferNotify { .. } => {}
        }
    }

    /// The callee rings without media: ring the caller, or play ringback to an answered one.
    async fn bridge_ringing(&mut self) {
        if !self.answered {
            if !self.ringing_sent {
                self.ringing_sent = true;
                if let Err(e) = self.server.sip.ring(self.call, None).await {
                    tracing::debug!(call = ?self.call, "180 not sent: {e}");
                }
            }
            return;
        }
        let Some(b) = self.bridge.as_mut() else {
            return;
        };
        if b.ringback || b.relay.is_some() {
            return;
        }
        b.ringback = true;
        let Some(ctx) = self.media.get() else { return };
        // Rendered once and shared through the prompt cache, off the async threads.
        b.ringback_task = Some(tokio::spawn(async move {
            let prompts = ctx.prompts.clone();
            match tokio::task::spawn_blocking(move || prompts.load(RINGBACK)).await {
                Ok(Ok(samples)) => {
                    let _ = ctx.media.play(samples, false).await;
                }
                Ok(Err(e)) => tracing::warn!("ringback tone: {e}"),
                Err(e) => tracing::warn!("ringback tone: {e}"),
            }
        }));
    }

    /// The callee sent SDP before answering: pass its early media to the caller.
    async fn bridge_early_media(&mut self, neg: Negotiated) {
        if self.bridge.as_ref().is_none_or(|b| b.relay.is_some()) {
            return;
        }
        if !self.answered && self.media.get().is_none() {
            // 183 with our SDP so the caller hears the callee's ringback or announcement.
            if let Err(e) = self.ring(true).await {
                tracing::debug!(call = ?self.call, "183 not sent: {}", e.message);
                return;
            }
            self.ringing_sent = true;
        }
        self.start_relay(neg).await;
    }

    async fn bridge_answered(&mut self, media: Option<Negotiated>) {
        let Some(b) = self.bridge.as_mut() else {
            return;
        };
        b.ring_deadline = None;
        b.answered_at = Some(Instant::now());
        let leg = b.leg;
        if b.caller_gone {
            let _ = self.server.sip.hangup(leg).await;
            return;
        }
        self.cdr.legs.push(json!({
            "leg": leg.0, "destination": b.dest, "answered_at": now_ms(),
        }));
        self.server
            .control
            .live
            .update(self.call.0, |c| c.state = "bridged");
        if !self.answered {
            let headers = self
                .out_headers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Err(e) = self.answer(headers).await {
                tracing::info!(call = ?self.call, "caller not answered for the bridge: {}", e.message);
                let _ = self.server.sip.hangup(leg).await;
                return;
            }
        }
        let Some(neg) = media else {
            tracing::warn!(call = ?self.call, leg = leg.0, "callee answered without usable SDP");
            let _ = self.server.sip.hangup(leg).await;
            return;
        };
        self.start_relay(neg).await;
    }

    /// Move the caller's media from its task to the relay.
    async fn start_relay(&mut self, b_neg: Negotiated) {
        let Some(caller_neg) = self.negotiated.clone() else {
            return;
        };
        let Some(ctx) = self.media.get() else {
            return;
        };
        let Some(b) = self.bridge.as_mut() else {
            return;
        };
        if b.relay.is_some() {
            return;
        }
        let Some(b_sock) = b.rtp.take() else {
            return;
        };
        let Some(b_remote) = b_neg.remote_rtp else {
            b.rtp = Some(b_sock);
            return;
        };
        let (c_sock, c_session) = match ctx.media.detach().await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(call = ?self.call, "caller media not detached: {e}");
                if let Some(b) = self.bridge.as_mut() {
                    b.rtp = Some(b_sock);
                }
                return;
            }
        };
        let caller = leg_media(&caller_neg);
        let callee = leg_media(&b_neg);
        if let Some(b) = self.bridge.as_mut() {
            b.b_neg = Some(b_neg.clone());
        }
        let run = RelayRun::spawn(
            &self.server.media.relays,
            RelaySide {
                socket: c_sock,
                media: caller,
                remote: c_session.remote(),
                // The caller keeps hearing one stream: the relay continues the session's.
                out: OutStream::Continue(c_session.stream_position()),
                blocked: self.media.blocked_keys(),
            },
            RelaySide {
                socket: b_sock,
                media: callee,
                remote: b_remote,
                out: OutStream::New {
                    ssrc: fastrand::u32(..),
                },
                blocked: BlockedKeys::default(),
            },
            Some(c_session),
        );
        let run = match run {
            Ok(run) => run,
            Err(e) => {
                // The sockets are lost with the error: the call cannot carry media any more.
                tracing::warn!(call = ?self.call, "relay not started: {e}");
                return;
            }
        };
        if let Some(b) = self.bridge.as_mut() {
            b.relay = Some(run);
        }
        // A caller already on hold stays so.
        self.apply_gates();
    }

    /// The B leg ended: resolve the promise, give the caller its media back or hang it up.
    async fn bridge_ended(&mut self, reason: EndReason) {
        let Some(mut b) = self.bridge.take() else {
            return;
        };
        // B was re-bridged to a transfer target: that leg ends with it.
        if let Some(third) = b.refer.take() {
            if let Err(e) = self.server.sip.hangup(third.handle).await {
                tracing::debug!(leg = third.handle.0, "transfer target hangup not sent: {e}");
            }
        }
        let duration = b
            .answered_at
            .map_or(0.0, |t| (t.elapsed().as_millis() as f64) / 1000.0);
        let (status, code) = if b.answered_at.is_some() {
            ("completed", 200)
        } else {
            status_of(&reason, b.timed_out, b.caller_gone)
        };
        tracing::info!(call = ?self.call, leg = b.leg.0, status, code, duration, "bridge ended");
        if let Some(last) = self
            .cdr
            .legs
            .iter_mut()
            .rev()
            .find(|l| l["leg"] == json!(b.leg.0))
        {
            last["duration"] = json!(duration);
            last["status"] = json!(status);
        } else {
            self.cdr.legs.push(json!({
                "leg": b.leg.0, "destination": b.dest, "status": status, "sipCode": code,
            }));
        }
        if let Some(ringback) = b.ringback_task.take() {
            ringback.abort();
        }
        if let Some(run) = b.relay.take() {
            match run.finish().await {
                Ok(end) => {
                    let stats = end.stats;
                    tracing::debug!(call = ?self.call, ?stats, "relay stopped");
                    if let (false, Some(session)) = (self.ended, end.session) {
                        self.resume_media(end.a, session, stats.a_out);
                    }
                }
                Err(e) => tracing::warn!(call = ?self.call, "relay task failed: {e}"),
            }
        } else if b.ringback {
            if let Some(ctx) = self.media.get() {
                ctx.media.stop_playback();
            }
        }
        self.server.control.live.update(self.call.0, |c| {
            c.state = if c.answered_at_ms.is_some() {
                "answered"
            } else {
                "ringing"
            };
            c.bridged_to = None;
        });
        let mut result = outcome(status, code, duration, &b.dest);
        if b.transfer {
            // A transfer the peer would not take with REFER, carried out as a bridge.
            result["method"] = json!("bridge");
        }
        let failed = status != "completed";
        if let Some(reply) = b.reply.take() {
            let _ = reply.send(Ok(result));
        }
        if self.ended {
            return;
        }
        let end = if failed {
            !b.opts.continue_on_fail
        } else {
            b.opts.hangup_after
        };
        if end {
            self.end_after_bridge(code).await;
        }
    }

    /// Restart the caller's media task on the socket the relay gave back, continuing the
    /// stream the relay was sending to the caller (not the session's stale counters).
    fn resume_media(
        &mut self,
        socket: RtpSocket,
        mut session: MediaSession,
        relayed: Option<StreamPosition>,
    ) {
        let Some(old) = self.media.get() else { return };
        if let Some(pos) = relayed {
            session.continue_stream(pos, Instant::now());
        }
        // A caller that put us on hold during the bridge stays on hold.
        if let Some(neg) = &self.negotiated {
            session.set_sending(neg.local_direction.sends() && neg.remote_rtp.is_some());
        }
        let digits = old.media.digits.history();
        if !digits.is_empty() {
            self.cdr.digits.push(digits);
        }
        match media_task::spawn(socket, session) {
            Ok(handle) => {
                let mut ctx = old;
                ctx.media = handle;
                self.media.set(ctx);
            }
            Err(e) => tracing::warn!(call = ?self.call, "caller media not resumed: {e}"),
        }
    }

    /// Hang up the caller after a bridge: BYE when answered, else the callee's status.
    async fn end_after_bridge(&mut self, code: u16) {
        if self.ended {
            return;
        }
        self.ended = true;
        let _ = self.hangup.send(true);
        self.stop_media();
        let sent = if self.answered {
            self.ended_by("callee", "normal_clearing".into());
            self.commit_cdr_ahead().await;
            self.server.sip.hangup(self.call).await
        } else {
            let code = if (300..=699).contains(&code) {
                code
            } else {
                480
            };
            self.ended_by("callee", code.to_string());
            self.server
                .sip
                .reject(self.call, code, None, Vec::new())
                .await
        };
        if let Err(e) = sent {
            tracing::debug!(call = ?self.call, "caller hangup after bridge not sent: {e}");
        }
        self.release_hangup_waiters("local");
    }

    /// The script is over while a bridge runs: end the B leg and wait for it briefly.
    pub(super) async fn abandon_bridge(&mut self) {
        if let Some(b) = self.bridge.as_mut() {
            b.caller_gone = true;
            let leg = b.leg;
            let _ = self.server.sip.hangup(leg).await;
            if let Some(run) = b.relay.take() {
                let _ = run.finish().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_argument_form_is_read() {
        let (d, o) = parse_bridge_args(&[json!("1001")]).unwrap();
        assert_eq!((d.as_str(), o), ("1001", BridgeOpts::default()));
        let (d, o) = parse_bridge_args(&[json!(447700900123u64), json!(true)]).unwrap();
        assert_eq!(d, "447700900123");
        // ConnexCS's continue_on true: the script goes on after a failure and after a bridge.
        assert!(o.continue_on_fail && !o.hangup_after);
        let (_, o) = parse_bridge_args(&[json!("1"), json!("fail")]).unwrap();
        assert!(
            o.continue_on_fail && o.hangup_after,
            "'fail': only failures go on"
        );
        let (_, o) = parse_bridge_args(&[json!("1"), json!("completed")]).unwrap();
        assert!(
            !o.continue_on_fail && !o.hangup_after,
            "'completed': only answered bridges go on"
        );
        let (_, o) = parse_bridge_args(&[json!("1"), json!(false), json!(true)]).unwrap();
        assert!(!o.continue_on_fail && o.hangup_after);
        let (_, o) = parse_bridge_args(&[json!("x"), json!(false), json!(false)]).unwrap();
        assert!(!o.continue_on_fail && !o.hangup_after);
        let (_, o) = parse_bridge_args(&[
            json!("sip:1@127.0.0.1"),
            json!({"timeout": 12, "callerId": 555, "continueOnFail": true,
                   "headers": {"X-A": "1"}, "trunk": "t", "hangupAfterBridge": false}),
        ])
        .unwrap();
        assert_eq!(o.timeout, Some(Duration::from_secs(12)));
        assert_eq!(o.caller_id.as_deref(), Some("555"));
        assert_eq!(o.headers, vec![("X-A".to_string(), "1".to_string())]);
        assert_eq!(o.trunk.as_deref(), Some("t"));
        assert!(o.continue_on_fail && !o.hangup_after);
        let (_, o) =
            parse_bridge_args(&[json!("1"), json!({"headers": [{"key": "X-B", "value": 2}]})])
                .unwrap();
        assert_eq!(o.headers, vec![("X-B".to_string(), "2".to_string())]);
        for bad in [
            vec![],
            vec![json!("")],
            vec![json!({})],
            vec![json!("1"), json!("yes")],
            vec![json!("1"), json!({"timeout": -1})],
            vec![json!("1"), json!({"headers": {"Bad Name": "v"}})],
        ] {
            assert_eq!(
                parse_bridge_args(&bad).unwrap_err().name,
                "TypeError",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn end_reasons_map_to_statuses() {
        assert_eq!(
            status_of(&EndReason::Failed(486), false, false),
            ("busy", 486)
        );
        assert_eq!(
            status_of(&EndReason::Failed(487), true, false),
            ("no-answer", 408)
        );
        assert_eq!(
            status_of(&EndReason::Cancelled, false, true),
            ("cancelled", 487)
        );
        assert_eq!(
            status_of(&EndReason::Timeout, false, false),
            ("no-answer", 408)
        );
        assert_eq!(
            status_of(&EndReason::Failed(404), false, false),
            ("failed", 404)
        );
        assert_eq!(
            status_of(&EndReason::Failed(407), false, false),
            ("failed", 407)
        );
    }
}
