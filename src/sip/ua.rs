//! The sans-IO user agent core: bytes and timer expiries in; sends, timers and call events out.
//!
//! It ties parsing, transactions, dialogs and SDP together: incoming calls (INVITE → events;
//! ring/answer/reject/redirect/hangup commands, in `commands`), everything else that arrives
//! (`incoming`), outbound calls (`outbound`) and where replies go (`reply`). Everything takes
//! `now` from the caller, so tests drive it with a fake clock.

use super::dialog::{AnswerRetransmit, Dialog, DialogId, Refresher, RetransmitStep, SessionTimer};
use super::message::{self, NameAddr, ResponseBase, Via};
use super::parse::{self, ParseError, ParseLimits};
use super::sdp::{self, MediaConfig, Negotiated, SdpError, SessionDescription};
use super::timer::TimerQueue;
use super::transaction::{
    ServerMatch, Target, TimerConfig, TransactionTable, TransportKind, TxError, TxKey, TxOutput,
};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;
use thiserror::Error;

/// True for a datagram that only keeps a NAT binding open: CR/LF/space/tab/NUL only, or a
/// STUN message (RFC 5389: top two bits zero, the magic cookie at bytes 4..8).
fn is_keep_alive(bytes: &[u8]) -> bool {
    let blank = bytes
        .iter()
        .all(|b| matches!(b, b'\r' | b'\n' | b' ' | b'\t' | 0));
    let stun = bytes.len() >= 20 && bytes[0] & 0xC0 == 0 && bytes[4..8] == [0x21, 0x12, 0xA4, 0x42];
    blank || stun
}

/// Methods we accept, for `Allow`.
pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, REFER, NOTIFY";
/// Option tags we understand, for `Supported` and to check `Require`.
pub const SUPPORTED: &str = "timer";

/// Settings of the user agent core.
#[derive(Debug, Clone)]
pub struct UaConfig {
    pub timers: TimerConfig,
    pub limits: ParseLimits,
    pub max_transactions: usize,
    /// Room the transaction table makes before the first transaction (it grows past it).
    pub presized_transactions: usize,
    pub max_calls: usize,
    /// Seconds put in `Retry-After` when we are over a limit.
    pub retry_after: u32,
    /// Smallest session interval we accept (RFC 4028 Min-SE).
    pub min_se: u32,
    /// Value of the `Server`/`User-Agent` header.
    pub user_agent: String,
    /// User part of our Contact.
    pub contact_user: String,
    /// Address to put in Via/Contact instead of the receiving socket's (NAT, 0.0.0.0 binds).
    pub advertised_addr: Option<SocketAddr>,
    /// Seed for tags, branches and SDP session ids; the driver passes a random value.
    pub seed: u64,
    /// A call the layer above neither answers nor rejects within this time gets 408.
    pub pending_timeout: std::time::Duration,
    /// Accept in-dialog REFERs (blind transfer asked by the peer): 202 + NOTIFY and an
    /// `InDialogRequest { kind: Refer }` event. When false they get 603 and nothing goes up.
    pub accept_refer: bool,
    /// Source ACL and per-source limits for new requests (see [`super::guard`]).
    pub guard: super::guard::GuardPolicy,
}

impl Default for UaConfig {
    fn default() -> Self {
        Self {
            timers: TimerConfig::default(),
            limits: ParseLimits::default(),
            max_transactions: 10_000,
            presized_transactions: super::transaction::PRESIZED_TRANSACTIONS,
            max_calls: 1_000,
            retry_after: 5,
            min_se: 90,
            user_agent: "callforge".into(),
            contact_user: "callforge".into(),
            advertised_addr: None,
            seed: 0x5eed_ca11_f0e6_e001,
            pending_timeout: std::time::Duration::from_secs(180),
            accept_refer: false,
            guard: super::guard::GuardPolicy::default(),
        }
    }
}

/// Opaque handle of one call, stable for the call's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallHandle(pub u64);

/// Identifies an armed timer (informational: on expiry call [`UserAgent::handle_timeout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimerId(pub u64);

/// Who ended a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedBy {
    Remote,
    Local,
}

/// Why a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// BYE received or sent.
    Bye,
    /// We rejected or redirected it with this final status.
    Rejected(u16),
    /// Our 2xx was never acknowledged within 64*T1; a BYE was sent.
    NoAck,
    /// The session timer expired without refresh; a BYE was sent.
    SessionExpired,
    /// A session refresh we sent failed (timeout or 408/481).
    RefreshFailed,
    /// Nobody answered or rejected within `pending_timeout`; 408 was sent.
    NotAnswered,
    /// Outbound: the callee answered with this final failure status (3xx–6xx).
    Failed(u16),
    /// Outbound: no response at all (timer B).
    Timeout,
    /// Outbound: we cancelled before the callee answered.
    Cancelled,
}

/// The kind of an in-dialog request passed up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InDialogKind {
    Info,
    ReInvite,
    Update,
    Options,
    /// A REFER we accepted (202 and `SIP/2.0 100 Trying` NOTIFY already sent); report its
    /// outcome with [`UserAgent::notify_transfer`].
    Refer,
}

/// A new incoming INVITE.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingCall {
    pub call: CallHandle,
    pub request: rsip::Request,
    /// Caller (From) and callee (To), parsed; `message::uri_user` gives the numbers.
    pub from: NameAddr,
    pub to: NameAddr,
    /// The SDP offer, `None` for a delayed-offer INVITE.
    pub offer: Option<SessionDescription>,
    /// Where the INVITE came from.
    pub source: Target,
}

/// What the layer above is told.
#[derive(Debug, Clone, PartialEq)]
pub enum UaEvent {
    /// A new INVITE; 100 Trying has been sent. Answer with a command.
    IncomingCall(Box<IncomingCall>),
    /// The ACK for our 2xx arrived; `answer` is its SDP when we made the offer.
    CallAcked {
        call: CallHandle,
        answer: Option<SessionDescription>,
    },
    /// The caller cancelled before we answered (200 to CANCEL and 487 were sent). Terminal.
    CallCancelled { call: CallHandle },
    /// The call is over. Terminal.
    CallEnded {
        call: CallHandle,
        by: EndedBy,
        reason: EndReason,
    },
    /// Outbound: a provisional response (180/183); `media` when it carried an SDP answer.
    CallProgress {
        call: CallHandle,
        code: u16,
        media: Option<Negotiated>,
    },
    /// Outbound: the callee answered (2xx, already ACKed).
    CallAnswered {
        call: CallHandle,
        media: Option<Negotiated>,
    },
    /// A request inside the dialog, already answered (200, or 488 for a bad offer).
    InDialogRequest {
        call: CallHandle,
        kind: InDialogKind,
        request: Box<rsip::Request>,
        /// New media parameters when the request carried an offer we accepted.
        media: Option<Negotiated>,
    },
    /// The final response to a REFER we sent with [`UserAgent::refer`]: 202 when the peer
    /// accepted the transfer, its refusal (405, 420, 501, 603, …), or 408 on timeout.
    ReferResponse { call: CallHandle, code: u16 },
    /// The peer reported the progress of the transfer we asked for: the status line of an
    /// `Event: refer` NOTIFY's `message/sipfrag` body (`SIP/2.0 180 Ringing` → 180).
    TransferNotify { call: CallHandle, code: u16 },
    /// The final status of a MESSAGE we sent (408 when nobody answered).
    MessageResult {
        message: message_out::MessageHandle,
        code: u16,
    },
}

/// Output of the core, drained with [`UserAgent::poll_action`].
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Send {
        to: SocketAddr,
        transport: TransportKind,
        bytes: Vec<u8>,
    },
    /// Call [`UserAgent::handle_timeout`] at (or after) this instant.
    ArmTimer {
        at: Instant,
        id: TimerId,
    },
    Event(UaEvent),
}

/// Why a command could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UaError {
    #[error("no such call")]
    UnknownCall,
    #[error("call is {0}; that command does not apply")]
    WrongState(&'static str),
    #[error("status {0} is not valid for this command")]
    BadStatus(u16),
    #[error(transparent)]
    Sdp(#[from] SdpError),
    #[error(transparent)]
    Transaction(#[from] TxError),
    #[error("too many calls")]
    Overloaded,
    #[error("invalid URI {0:?}")]
    InvalidUri(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallState {
    /// Our INVITE is out, no final response yet.
    Calling,
    /// INVITE received, nothing but 100 sent.
    Incoming,
    /// 18x sent.
    Early,
    /// 2xx sent, waiting for ACK.
    Answered,
    Confirmed,
}

impl CallState {
    fn name(self) -> &'static str {
        match self {
            Self::Calling => "calling out",
            Self::Incoming => "incoming",
            Self::Early => "ringing",
            Self::Answered => "answered (awaiting ACK)",
            Self::Confirmed => "established",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallTimer {
    Pending,
    Retransmit,
    SessionExpiry,
    SessionRefresh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientPurpose {
    Bye,
    Refresh,
    Invite,
    Cancel,
    /// An out-of-dialog MESSAGE (see `message_out.rs`).
    Message,
    /// A REFER we sent; its final response becomes `ReferResponse`.
    Refer,
    /// A NOTIFY about a transfer we accepted; responses are only logged.
    Notify,
}

#[derive(Debug)]
struct Call {
    state: CallState,
    invite: rsip::Request,
    invite_key: TxKey,
    source: Target,
    local: SocketAddr,
    dialog: Dialog,
    offer: Option<SessionDescription>,
    media: Option<MediaConfig>,
    local_sdp: Option<SessionDescription>,
    session_id: u64,
    /// CSeq of the INVITE (initial or re-INVITE) whose 2xx awaits ACK.
    awaiting_ack: Option<u32>,
    retransmit: Option<AnswerRetransmit>,
    session_timer: Option<SessionTimer>,
    refreshed_at: Instant,
    /// Hangup requested before the ACK arrived: BYE goes out when it does (§15).
    bye_pending: bool,
    /// Extra headers the layer above wants on our BYE (a script's `ctx.header(...)`).
    bye_headers: Vec<(String, String)>,
    peer_allows_update: bool,
    /// Outbound (UAC) call state: we placed it.
    outbound: bool,
    provisional_seen: bool,
    /// Hangup before any provisional: CANCEL goes out with the first one (§9.1).
    cancel_pending: bool,
    cancel_sent: bool,
    /// Our ACK for the 2xx, resent when the 2xx is retransmitted.
    ack: Option<(Target, Vec<u8>)>,
    /// Outbound: credentials and the Digest challenges answered so far.
    auth: Option<auth::AuthState>,
    /// A REFER the peer sent and we accepted: the implicit subscription's state.
    transfer: Option<transfer::TransferSubscription>,
    /// Inbound: the source address the guard counts this call against.
    admitted_from: Option<IpAddr>,
}

/// The user agent core. Feed it with [`handle_input`](Self::handle_input),
/// [`handle_timeout`](Self::handle_timeout) and commands; drain [`poll_action`](Self::poll_action).
#[derive(Debug)]
pub struct UserAgent {
    cfg: UaConfig,
    txs: TransactionTable,
    /// Boxed: the map keeps room for more calls than are live, and a call is about 1 KiB.
    calls: HashMap<CallHandle, Box<Call>>,
    dialogs: HashMap<DialogId, CallHandle>,
    invites: HashMap<TxKey, CallHandle>,
    client_txs: HashMap<TxKey, (CallHandle, ClientPurpose)>,
    /// Our MESSAGEs awaiting a final response.
    messages: HashMap<TxKey, message_out::MessageHandle>,
    next_message: u64,
    timers: TimerQueue<(CallHandle, CallTimer)>,
    /// Dialogs ended within the peer's retransmission window, so a BYE crossing ours (or
    /// a late retransmission of one we answered) gets 200, not 481.
    ended: VecDeque<(Instant, DialogId)>,
    /// The instant of the input being processed (for bookkeeping that has no `now` param).
    now: Option<Instant>,
    actions: VecDeque<Action>,
    announced: Option<Instant>,
    next_id: u64,
    next_call: u64,
    guard: super::guard::SharedGuard,
}

/// The method's name for the metrics, without allocating (`OTHER` for the rare ones).
fn method_name(m: &rsip::Method) -> &'static str {
    use rsip::Method::*;
    match m {
        Invite => "INVITE",
        Ack => "ACK",
        Bye => "BYE",
        Cancel => "CANCEL",
        Options => "OPTIONS",
        Register => "REGISTER",
        Info => "INFO",
        Update => "UPDATE",
        Refer => "REFER",
        Notify => "NOTIFY",
        Message => "MESSAGE",
        PRack => "PRACK",
        Subscribe => "SUBSCRIBE",
        _ => "OTHER",
    }
}

/// Counts an outgoing message by method or status code, read from its first line.
fn count_sent(bytes: &[u8]) {
    let m = crate::metrics::metrics();
    if let Some(rest) = bytes.strip_prefix(b"SIP/2.0 ") {
        let code = rest
            .get(..3)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| d.parse::<u16>().ok());
        if let Some(code) = code {
            m.sip_responses_sent.inc(code);
        }
    } else {
        let end = bytes.iter().position(|b| *b == b' ').unwrap_or(0);
        m.sip_requests_sent
            .inc(std::str::from_utf8(&bytes[..end]).unwrap_or("OTHER"));
    }
}

/// The To tag of a response outside any call: derived from the Call-ID and the stack's seed,
/// so a retransmitted request gets the same tag (shared with the class4 fast path).
pub fn auto_tag(seed: u64, call_id: &str) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(call_id, &mut h);
    format!("{:016x}", splitmix(seed ^ std::hash::Hasher::finish(&h)))
}

pub(crate) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl UserAgent {
    pub fn new(cfg: UaConfig) -> Self {
        Self {
            guard: super::guard::SharedGuard::new(super::guard::Guard::new(cfg.guard.clone())),
            txs: TransactionTable::presized(
                cfg.timers,
                cfg.max_transactions,
                cfg.presized_transactions,
            ),
            cfg,
            calls: HashMap::new(),
            dialogs: HashMap::new(),
            invites: HashMap::new(),
            client_txs: HashMap::new(),
            messages: HashMap::new(),
            next_message: 0,
            timers: TimerQueue::default(),
            ended: VecDeque::new(),
            now: None,
            actions: VecDeque::new(),
            announced: None,
            next_id: 0,
            next_call: 0,
        }
    }

    pub fn config(&self) -> &UaConfig {
        &self.cfg
    }

    /// Next output, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Earliest instant at which [`handle_timeout`](Self::handle_timeout) has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.txs.next_deadline(), self.timers.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Live calls.
    pub fn call_count(&self) -> usize {
        self.calls.len()
    }

    /// Live transactions.
    pub fn transaction_count(&self) -> usize {
        self.txs.len()
    }

    /// Replaces the ACL and per-source limits (live calls are not touched).
    pub fn set_guard_policy(&mut self, policy: super::guard::GuardPolicy) {
        self.guard.lock().set_policy(policy);
    }

    /// The source guard, shared with threads that admit requests themselves (the class4
    /// fast path).
    pub fn shared_guard(&self) -> super::guard::SharedGuard {
        self.guard.clone()
    }

    /// Draining: new INVITEs and OPTIONS get 503 with `Retry-After`; dialogs carry on.
    pub fn set_draining(&mut self, draining: bool) {
        self.guard.lock().set_draining(draining);
    }

    /// Publishes the live transaction and call counts (two atomic stores).
    fn publish_gauges(&self) {
        let m = crate::metrics::metrics();
        m.sip_transactions.set(self.txs.len() as i64);
        m.sip_dialogs.set(self.calls.len() as i64);
    }

    fn new_token(&mut self) -> String {
        self.next_id += 1;
        format!("{:016x}", splitmix(self.cfg.seed ^ splitmix(self.next_id)))
    }

    fn announce_timer(&mut self) {
        let next = self.poll_timeout();
        if let Some(at) = next.filter(|at| Some(*at) != self.announced) {
            self.next_id += 1;
            self.actions.push_back(Action::ArmTimer {
                at,
                id: TimerId(self.next_id),
            });
        }
        self.announced = next;
    }

    fn emit(&mut self, ev: UaEvent) {
        self.actions.push_back(Action::Event(ev));
    }

    fn send_raw(&mut self, target: Target, bytes: Vec<u8>) {
        count_sent(&bytes);
        self.actions.push_back(Action::Send {
            to: target.addr,
            transport: target.transport,
            bytes,
        });
    }

    fn drain_tx(&mut self, out: Vec<TxOutput>, now: Instant) {
        for o in out {
            match o {
                TxOutput::Send { target, bytes } => self.send_raw(target, bytes),
                TxOutput::Response { key, response } => self.on_client_response(key, response, now),
                TxOutput::Timeout { key } => {
                    self.message_result(&key, 408);
                    match self.client_txs.get(&key).copied() {
                        Some((call, ClientPurpose::Refresh)) => {
                            self.end_with_bye(call, EndReason::RefreshFailed, now)
                        }
                        Some((call, ClientPurpose::Refer)) => {
                            self.refer_result(call, 408);
                        }
                        Some((call, ClientPurpose::Invite))
                            if self
                                .calls
                                .get(&call)
                                .is_some_and(|c| c.state == CallState::Calling) =>
                        {
                            self.remove_call(call);
                            self.emit(UaEvent::CallEnded {
                                call,
                                by: EndedBy::Local,
                                reason: EndReason::Timeout,
                            });
                        }
                        _ => {}
                    }
                    tracing::debug!(?key, "transaction timed out");
                }
                TxOutput::Terminated { key } => {
                    self.client_txs.remove(&key);
                    self.invites.remove(&key);
                }
            }
        }
    }

    fn our_addr(&self, local: SocketAddr) -> SocketAddr {
        self.cfg.advertised_addr.unwrap_or(local)
    }

    fn contact_uri(&self, local: SocketAddr, transport: TransportKind) -> String {
        let addr = self.our_addr(local);
        let mut uri = format!("sip:{}@{}", self.cfg.contact_user, addr);
        if transport == TransportKind::Tcp {
            uri.push_str(";transport=tcp");
        }
        uri
    }

    // ---------------------------------------------------------------- input

    /// One datagram, or one framed stream message, from `source`, received on `local`.
    pub fn handle_input(&mut self, bytes: &[u8], source: Target, local: SocketAddr, now: Instant) {
        self.set_now(now);
        self.handle_input_inner(bytes, source, local, now);
        self.announce_timer();
        self.publish_gauges();
    }

    fn handle_input_inner(
        &mut self,
        bytes: &[u8],
        source: Target,
        local: SocketAddr,
        now: Instant,
    ) {
        if is_keep_alive(bytes) {
            // A keep-alive (RFC 5626 CRLF or STUN, or the blank datagrams phones send through
            // NAT every 30 s): nothing to answer (we do not offer RFC 5626 outbound, so no
            // pong is owed) and nothing worth a warning.
            tracing::trace!(%source.addr, len = bytes.len(), "keep-alive ignored");
            return;
        }
        let parsed = parse::normalise(bytes, &self.cfg.limits).and_then(|raw| {
            let msg = raw.to_rsip()?;
            match &msg {
                rsip::SipMessage::Request(r) => parse::validate_request(r)?,
                rsip::SipMessage::Response(r) => parse::validate_response(r)?,
            }
            Ok((raw, msg))
        });
        match parsed {
            Ok((_, rsip::SipMessage::Request(req))) => {
                crate::metrics::metrics()
                    .sip_requests_received
                    .inc(method_name(&req.method));
                self.on_request(req, source, local, now)
            }
            Ok((_, rsip::SipMessage::Response(resp))) => {
                crate::metrics::metrics()
                    .sip_responses_received
                    .inc(resp.status_code.code());
                let mut out = Vec::new();
                if !self.txs.on_response(resp, now, &mut out) {
                    tracing::debug!(%source.addr, "stray response dropped");
                }
                self.drain_tx(out, now);
            }
            Err(err) => self.on_malformed(bytes, source, err),
        }
    }

    // ---------------------------------------------------------------- timers

    /// Runs everything due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.set_now(now);
        let mut out = Vec::new();
        self.txs.handle_timeout(now, &mut out);
        self.drain_tx(out, now);
        while let Some((_, (handle, timer))) = self.timers.pop_due(now) {
            self.on_call_timer(handle, timer, now);
        }
        self.announce_timer();
        self.publish_gauges();
    }

    fn arm_retransmit(&mut self, handle: CallHandle, r: &AnswerRetransmit) {
        if let Some(at) = r.next_resend() {
            self.timers.arm(at, (handle, CallTimer::Retransmit));
        }
        self.timers
            .arm(r.give_up_at(), (handle, CallTimer::Retransmit));
    }

    fn arm_session_timer(&mut self, handle: CallHandle) {
        let Some(call) = self.calls.get(&handle) else {
            return;
        };
        let Some(st) = call.session_timer else {
            return;
        };
        let at = call.refreshed_at;
        match st.refresher {
            Refresher::Uac => self
                .timers
                .arm(st.expiry_deadline(at), (handle, CallTimer::SessionExpiry)),
            Refresher::Uas => self
                .timers
                .arm(st.refresh_deadline(at), (handle, CallTimer::SessionRefresh)),
        }
    }

    fn on_call_timer(&mut self, handle: CallHandle, timer: CallTimer, now: Instant) {
        let Some(call) = self.calls.get_mut(&handle) else {
            return;
        };
        match timer {
            CallTimer::Pending => {
                if call.state == CallState::Calling {
                    tracing::info!(
                        call = handle.0,
                        "outbound call not answered in time; cancelling"
                    );
                    self.cancel_outbound(handle, now);
                } else if matches!(call.state, CallState::Incoming | CallState::Early) {
                    tracing::warn!(
                        call = handle.0,
                        "call neither answered nor rejected in time"
                    );
                    let _ = self.final_response(handle, 408, None, &[], now);
                    self.emit(UaEvent::CallEnded {
                        call: handle,
                        by: EndedBy::Local,
                        reason: EndReason::NotAnswered,
                    });
                }
            }
            CallTimer::Retransmit => {
                let Some(r) = call.retransmit.as_mut() else {
                    return;
                };
                match r.on_timer(now) {
                    RetransmitStep::Resend { bytes, next } => {
                        let target = call.source;
                        self.timers.arm(next, (handle, CallTimer::Retransmit));
                        self.send_raw(target, bytes);
                    }
                    RetransmitStep::GiveUp => {
                        call.retransmit = None;
                        call.awaiting_ack = None;
                        tracing::warn!(call = handle.0, "no ACK for 2xx within 64*T1; sending BYE");
                        self.end_with_bye(handle, EndReason::NoAck, now);
                    }
                    RetransmitStep::Idle => {}
                }
            }
            CallTimer::SessionExpiry => {
                let Some(st) = call.session_timer else {
                    return;
                };
                if st.refresher == Refresher::Uac
                    && call.state == CallState::Confirmed
                    && now >= st.expiry_deadline(call.refreshed_at)
                {
                    tracing::info!(call = handle.0, "session timer expired; sending BYE");
                    self.end_with_bye(handle, EndReason::SessionExpired, now);
                }
            }
            CallTimer::SessionRefresh => {
                let Some(st) = call.session_timer else {
                    return;
                };
                if st.refresher == Refresher::Uas
                    && call.state == CallState::Confirmed
                    && now >= st.refresh_deadline(call.refreshed_at)
                {
                    self.send_refresh(handle, now);
                }
            }
        }
    }

    fn next_hop(call: &Call) -> Target {
        // Over TCP the peer's connection is the only path we know; over UDP a literal IP
        // next hop is used, anything needing DNS falls back to where the INVITE came from.
        if call.source.transport.is_reliable() {
            return call.source;
        }
        let uri = call.dialog.next_hop_uri();
        message::uri_host_port(&uri)
            .and_then(|(host, port)| {
                let ip: IpAddr = host.parse().ok()?;
                Some(Target {
                    addr: SocketAddr::new(ip, port.unwrap_or(5060)),
                    transport: call.source.transport,
                })
            })
            .unwrap_or(call.source)
    }

    fn our_via(&mut self, call: CallHandle) -> Option<String> {
        let branch = self.new_token();
        let c = self.calls.get(&call)?;
        Some(format!(
            "SIP/2.0/{} {};branch=z9hG4bK{branch};rport",
            c.source.transport.via_name(),
            self.our_addr(c.local)
        ))
    }

    /// Builds an in-dialog request (fresh branch, next CSeq) and where it goes.
    fn build_in_dialog(
        &mut self,
        handle: CallHandle,
        method: rsip::Method,
        body: Option<(&str, Vec<u8>)>,
        extra: &[(&str, String)],
    ) -> Option<(rsip::Request, Target)> {
        let via = self.our_via(handle)?;
        let call = self.calls.get_mut(&handle)?;
        let mut req = call.dialog.build_request(method, &via, None, body);
        req.headers.push(message::make_header(
            "User-Agent",
            self.cfg.user_agent.clone(),
        ));
        if method == rsip::Method::Bye {
            for (name, value) in &call.bye_headers {
                req.headers.push(message::make_header(name, value.clone()));
            }
        }
        if let (rsip::Method::Invite | rsip::Method::Update, Some(st)) =
            (method, call.session_timer)
        {
            req.headers.push(message::make_header(
                "Session-Expires",
                format!("{};refresher=uas", st.interval.as_secs()),
            ));
            req.headers
                .push(message::make_header("Supported", SUPPORTED));
        }
        for (name, value) in extra {
            req.headers.push(message::make_header(name, value.clone()));
        }
        Some((req, Self::next_hop(call)))
    }

    fn send_in_dialog(
        &mut self,
        handle: CallHandle,
        method: rsip::Method,
        body: Option<(&str, Vec<u8>)>,
        purpose: ClientPurpose,
        now: Instant,
    ) {
        self.send_in_dialog_with(handle, method, body, &[], purpose, now);
    }

    /// Sends an in-dialog request with extra headers through a client transaction (or once,
    /// without retransmissions, when the table is full).
    fn send_in_dialog_with(
        &mut self,
        handle: CallHandle,
        method: rsip::Method,
        body: Option<(&str, Vec<u8>)>,
        extra: &[(&str, String)],
        purpose: ClientPurpose,
        now: Instant,
    ) {
        let Some((req, target)) = self.build_in_dialog(handle, method, body, extra) else {
            return;
        };
        let mut out = Vec::new();
        match self.txs.send_request(req.clone(), target, now, &mut out) {
            Ok(key) => {
                self.client_txs.insert(key, (handle, purpose));
                self.drain_tx(out, now);
            }
            Err(e) => {
                // No room for a transaction: send once without retransmissions.
                tracing::warn!(error = %e, "sending in-dialog request without a transaction");
                self.send_raw(target, message::to_bytes(&req.into()));
            }
        }
    }

    fn send_refresh(&mut self, handle: CallHandle, now: Instant) {
        let Some(call) = self.calls.get(&handle) else {
            return;
        };
        if call.peer_allows_update {
            self.send_in_dialog(
                handle,
                rsip::Method::Update,
                None,
                ClientPurpose::Refresh,
                now,
            );
        } else {
            let body = call
                .local_sdp
                .as_ref()
                .map(|s| ("application/sdp", s.to_bytes()));
            self.send_in_dialog(
                handle,
                rsip::Method::Invite,
                body,
                ClientPurpose::Refresh,
                now,
            );
        }
    }

    /// Sends BYE (through a client non-INVITE transaction), forgets the call, reports it.
    fn end_with_bye(&mut self, handle: CallHandle, reason: EndReason, now: Instant) {
        if !self.calls.contains_key(&handle) {
            return;
        }
        self.send_in_dialog(handle, rsip::Method::Bye, None, ClientPurpose::Bye, now);
        self.remove_call(handle);
        self.emit(UaEvent::CallEnded {
            call: handle,
            by: EndedBy::Local,
            reason,
        });
    }

    fn remove_call(&mut self, handle: CallHandle) {
        if let Some(c) = self.calls.remove(&handle) {
            if let Some(ip) = c.admitted_from {
                self.guard.lock().call_ended(ip);
            }
            self.dialogs.remove(&c.dialog.id);
            self.invites.remove(&c.invite_key);
            if let (Some(now), false) = (self.now, c.dialog.id.remote_tag.is_empty()) {
                self.ended.push_back((now, c.dialog.id));
            }
        }
    }

    /// Records the current instant and forgets tombstones older than the peer's window.
    fn set_now(&mut self, now: Instant) {
        self.now = Some(now);
        let keep = self.cfg.timers.peer_window();
        while self
            .ended
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > keep)
        {
            self.ended.pop_front();
        }
    }

    /// True if this dialog ended recently.
    fn recently_ended(&self, id: &DialogId) -> bool {
        self.ended.iter().any(|(_, d)| d == id)
    }
}

mod auth;
mod commands;
mod hold;
mod incoming;
mod message_out;
mod outbound;
mod reply;
mod transfer;
pub use message_out::{MessageHandle, OutboundMessage};
pub use outbound::OutboundCall;
use reply::salvage;
pub(crate) use reply::{response_target, stamp_via};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_rfc4475;
#[cfg(test)]
mod tests_transfer;
