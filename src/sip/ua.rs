//! The sans-IO user agent core: bytes and timer expiries in; sends, timers and call events out.
//!
//! It ties parsing, transactions, dialogs and SDP together for the UAS side of calls
//! (incoming INVITE → events; answer/ring/reject/redirect/hangup commands). Everything takes
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

/// Methods we accept, for `Allow`.
pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE";
/// Option tags we understand, for `Supported` and to check `Require`.
pub const SUPPORTED: &str = "timer";

/// Settings of the user agent core.
#[derive(Debug, Clone)]
pub struct UaConfig {
    pub timers: TimerConfig,
    pub limits: ParseLimits,
    pub max_transactions: usize,
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
}

impl Default for UaConfig {
    fn default() -> Self {
        Self {
            timers: TimerConfig::default(),
            limits: ParseLimits::default(),
            max_transactions: 10_000,
            max_calls: 1_000,
            retry_after: 5,
            min_se: 90,
            user_agent: "callforge".into(),
            contact_user: "callforge".into(),
            advertised_addr: None,
            seed: 0x5eed_ca11_f0e6_e001,
            pending_timeout: std::time::Duration::from_secs(180),
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
    peer_allows_update: bool,
    /// Outbound (UAC) call state: we placed it.
    outbound: bool,
    provisional_seen: bool,
    /// Hangup before any provisional: CANCEL goes out with the first one (§9.1).
    cancel_pending: bool,
    cancel_sent: bool,
    /// Our ACK for the 2xx, resent when the 2xx is retransmitted.
    ack: Option<(Target, Vec<u8>)>,
}

/// The user agent core. Feed it with [`handle_input`](Self::handle_input),
/// [`handle_timeout`](Self::handle_timeout) and commands; drain [`poll_action`](Self::poll_action).
#[derive(Debug)]
pub struct UserAgent {
    cfg: UaConfig,
    txs: TransactionTable,
    calls: HashMap<CallHandle, Call>,
    dialogs: HashMap<DialogId, CallHandle>,
    invites: HashMap<TxKey, CallHandle>,
    client_txs: HashMap<TxKey, (CallHandle, ClientPurpose)>,
    timers: TimerQueue<(CallHandle, CallTimer)>,
    actions: VecDeque<Action>,
    announced: Option<Instant>,
    next_id: u64,
    next_call: u64,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// RFC 3581 / §18.2.1: stamp `received` and `rport` on the top Via.
fn stamp_via(via: &mut Via, source: Target) {
    let host_ip = via
        .host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok();
    let rport_requested = via.rport().is_some();
    if rport_requested {
        via.set_param("rport", Some(source.addr.port().to_string()));
    }
    if rport_requested || host_ip != Some(source.addr.ip()) {
        via.set_param("received", Some(source.addr.ip().to_string()));
    }
}

/// §18.2.2 + RFC 3581: where a response to a request with this (stamped) Via goes.
fn response_target(via: Option<&Via>, source: Target) -> Target {
    let Some(via) = via else {
        return source;
    };
    if source.transport.is_reliable() {
        return source;
    }
    let ip = via
        .received()
        .and_then(|r| r.parse().ok())
        .or_else(|| {
            via.host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .ok()
        })
        .unwrap_or(source.addr.ip());
    let port = match via.rport() {
        Some(Some(p)) => p,
        _ => via.port.unwrap_or(5060),
    };
    Target {
        addr: SocketAddr::new(ip, port),
        transport: source.transport,
    }
}

/// Reads enough of an unparseable request to answer it: (method, response base).
fn salvage(bytes: &[u8]) -> Option<(String, ResponseBase)> {
    let head = &bytes[..bytes.len().min(16 * 1024)];
    let text = String::from_utf8_lossy(head);
    let mut lines = text.lines().skip_while(|l| l.trim().is_empty());
    let first = lines.next()?;
    if first.starts_with("SIP/") {
        return None;
    }
    let method = first.split(' ').next()?.to_string();
    if method.is_empty() || method.eq_ignore_ascii_case("ACK") || !first.contains(" SIP/") {
        return None;
    }
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            let n = n.trim();
            let full = match n.to_ascii_lowercase().as_str() {
                "v" | "via" => "Via",
                "f" | "from" => "From",
                "t" | "to" => "To",
                "i" | "call-id" => "Call-ID",
                "cseq" => "CSeq",
                _ => return None,
            };
            Some((full.to_string(), v.trim().to_string()))
        })
        .flat_map(|(n, v)| {
            if n == "Via" {
                parse::split_list(&v)
                    .into_iter()
                    .map(|x| ("Via".to_string(), x))
                    .collect()
            } else {
                vec![(n, v)]
            }
        });
    let base = ResponseBase::from_headers(headers);
    if base.vias.is_empty() {
        return None;
    }
    Some((method, base))
}

impl UserAgent {
    pub fn new(cfg: UaConfig) -> Self {
        Self {
            txs: TransactionTable::new(cfg.timers, cfg.max_transactions),
            cfg,
            calls: HashMap::new(),
            dialogs: HashMap::new(),
            invites: HashMap::new(),
            client_txs: HashMap::new(),
            timers: TimerQueue::default(),
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
                    match self.client_txs.get(&key).copied() {
                        Some((call, ClientPurpose::Refresh)) => {
                            self.end_with_bye(call, EndReason::RefreshFailed, now)
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
        self.handle_input_inner(bytes, source, local, now);
        self.announce_timer();
    }

    fn handle_input_inner(
        &mut self,
        bytes: &[u8],
        source: Target,
        local: SocketAddr,
        now: Instant,
    ) {
        let parsed = parse::normalise(bytes, &self.cfg.limits).and_then(|raw| {
            let msg = raw.to_rsip()?;
            match &msg {
                rsip::SipMessage::Request(r) => parse::validate_request(r)?,
                rsip::SipMessage::Response(r) => parse::validate_response(r)?,
            }
            Ok((raw, msg))
        });
        match parsed {
            Ok((_, rsip::SipMessage::Request(req))) => self.on_request(req, source, local, now),
            Ok((_, rsip::SipMessage::Response(resp))) => {
                let mut out = Vec::new();
                if !self.txs.on_response(resp, now, &mut out) {
                    tracing::debug!(%source.addr, "stray response dropped");
                }
                self.drain_tx(out, now);
            }
            Err(err) => self.on_malformed(bytes, source, err),
        }
    }

    fn on_malformed(&mut self, bytes: &[u8], source: Target, err: ParseError) {
        let Some((method, base)) = salvage(bytes) else {
            tracing::warn!(%source.addr, error = %err, "dropping unparseable SIP message");
            return;
        };
        let (code, reason) = match &err {
            ParseError::UnknownMethod(_) => (501, None),
            ParseError::TooLarge { .. } => (513, None),
            ParseError::BadVersion(_) => (505, None),
            _ => (400, Some(err.reason_phrase())),
        };
        tracing::warn!(%source.addr, %method, error = %err, code, "rejecting malformed request");
        let mut base = base;
        let via = base
            .vias
            .first()
            .and_then(|v| Via::parse(v).ok())
            .map(|mut v| {
                stamp_via(&mut v, source);
                v
            });
        if let (Some(v), Some(first)) = (&via, base.vias.first_mut()) {
            *first = v.to_string();
        }
        let target = response_target(via.as_ref(), source);
        let tag = self.auto_tag(base.call_id.as_deref().unwrap_or(""));
        let mut resp = base.response(code, reason.as_deref(), Some(&tag));
        if code == 501 {
            resp.headers.push(message::make_header("Allow", ALLOW));
        }
        self.push_server_header(&mut resp);
        self.send_raw(target, message::to_bytes(&resp.into()));
    }

    fn push_server_header(&self, resp: &mut rsip::Response) {
        resp.headers
            .push(message::make_header("Server", self.cfg.user_agent.clone()));
    }

    fn on_request(
        &mut self,
        mut req: rsip::Request,
        source: Target,
        local: SocketAddr,
        now: Instant,
    ) {
        let mut via = match message::top_via(&req.headers) {
            Some(v) => v,
            None => return,
        };
        stamp_via(&mut via, source);
        if let Some(h) = req
            .headers
            .iter_mut()
            .find(|h| matches!(h, rsip::Header::Via(_)))
        {
            *h = message::make_header("Via", via.to_string());
        }
        let target = response_target(Some(&via), source);

        let mut out = Vec::new();
        let matched = self.txs.match_request(&req, now, &mut out);
        self.drain_tx(out, now);
        let key = match matched {
            Some(ServerMatch::Absorbed) => return,
            Some(ServerMatch::New(key)) => key,
            None => return,
        };

        match req.method {
            rsip::Method::Ack => self.on_ack(&req, now),
            rsip::Method::Cancel => self.on_cancel(&req, key, target, now),
            _ if message::to_tag(&req.headers).is_some() => {
                self.on_in_dialog(req, key, target, now)
            }
            rsip::Method::Invite => self.on_invite(req, key, source, target, local, now),
            rsip::Method::Options => {
                let resp = self.options_response(&req, None);
                self.respond_new(key, &req, resp, target, now);
            }
            rsip::Method::Bye | rsip::Method::Info | rsip::Method::Update | rsip::Method::PRack => {
                let resp = self.simple_response(&req, 481, None);
                self.respond_new(key, &req, resp, target, now);
            }
            _ => {
                // Known to rsip but not something this UA does (REGISTER, SUBSCRIBE, ...).
                let mut resp = self.simple_response(&req, 405, None);
                resp.headers.push(message::make_header("Allow", ALLOW));
                self.respond_new(key, &req, resp, target, now);
            }
        }
    }

    fn simple_response(
        &self,
        req: &rsip::Request,
        code: u16,
        to_tag: Option<&str>,
    ) -> rsip::Response {
        let auto;
        let to_tag = match to_tag {
            // §8.2.6.2: every response but 100 carries a To tag.
            None if code > 100 => {
                auto = self.auto_tag(&message::call_id(&req.headers).unwrap_or_default());
                Some(auto.as_str())
            }
            t => t,
        };
        let mut resp = message::response_to(req, code, to_tag);
        self.push_server_header(&mut resp);
        resp
    }

    /// A To tag for responses outside any call, derived from the Call-ID so that a
    /// retransmitted request gets the same tag.
    fn auto_tag(&self, call_id: &str) -> String {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(call_id, &mut h);
        format!(
            "{:016x}",
            splitmix(self.cfg.seed ^ std::hash::Hasher::finish(&h))
        )
    }

    fn options_response(&self, req: &rsip::Request, to_tag: Option<&str>) -> rsip::Response {
        let mut resp = self.simple_response(req, 200, to_tag);
        resp.headers.push(message::make_header("Allow", ALLOW));
        resp.headers
            .push(message::make_header("Accept", "application/sdp"));
        resp.headers
            .push(message::make_header("Supported", SUPPORTED));
        resp
    }

    /// Answers a request that has no transaction yet: statefully if there is room, so that
    /// retransmissions get the same answer, otherwise statelessly.
    fn respond_new(
        &mut self,
        key: TxKey,
        req: &rsip::Request,
        resp: rsip::Response,
        target: Target,
        now: Instant,
    ) {
        let is_invite = req.method == rsip::Method::Invite;
        let mut out = Vec::new();
        if self
            .txs
            .create_server(key.clone(), is_invite, target, None, &mut out)
            .is_ok()
            && self.txs.respond(&key, &resp, now, &mut out).is_ok()
        {
            self.drain_tx(out, now);
        } else {
            self.send_raw(target, message::to_bytes(&resp.into()));
        }
    }

    fn overloaded(&self, req: &rsip::Request) -> rsip::Response {
        let mut resp = self.simple_response(req, 503, None);
        resp.headers.push(message::make_header(
            "Retry-After",
            self.cfg.retry_after.to_string(),
        ));
        resp
    }

    fn on_invite(
        &mut self,
        req: rsip::Request,
        key: TxKey,
        source: Target,
        target: Target,
        local: SocketAddr,
        now: Instant,
    ) {
        if self.calls.len() >= self.cfg.max_calls {
            let resp = self.overloaded(&req);
            self.respond_new(key, &req, resp, target, now);
            return;
        }
        let unsupported: Vec<String> = message::headers_named(&req.headers, "Require")
            .iter()
            .flat_map(|v| {
                v.split(',')
                    .map(|t| t.trim().to_string())
                    .collect::<Vec<_>>()
            })
            .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("timer"))
            .collect();
        if !unsupported.is_empty() {
            let mut resp = self.simple_response(&req, 420, None);
            resp.headers
                .push(message::make_header("Unsupported", unsupported.join(", ")));
            self.respond_new(key, &req, resp, target, now);
            return;
        }
        let session_timer = match SessionTimer::negotiate(&req.headers, self.cfg.min_se) {
            Ok(st) => st,
            Err(too_small) => {
                let mut resp = self.simple_response(&req, 422, None);
                resp.headers
                    .push(message::make_header("Min-SE", too_small.min_se.to_string()));
                self.respond_new(key, &req, resp, target, now);
                return;
            }
        };
        let offer = match self.read_offer(&req) {
            Ok(o) => o,
            Err(resp) => {
                self.respond_new(key, &req, *resp, target, now);
                return;
            }
        };
        let local_tag = self.new_token();
        let contact = self.contact_uri(local, source.transport);
        let Ok(dialog) = Dialog::uas(&req, &local_tag, &contact) else {
            let resp = self.simple_response(&req, 400, None);
            self.respond_new(key, &req, resp, target, now);
            return;
        };
        let trying = message::to_bytes(&self.simple_response(&req, 100, None).into());
        let mut out = Vec::new();
        if self
            .txs
            .create_server(key.clone(), true, target, Some(trying), &mut out)
            .is_err()
        {
            let resp = self.overloaded(&req);
            self.send_raw(target, message::to_bytes(&resp.into()));
            return;
        }
        self.drain_tx(out, now);
        self.next_call += 1;
        let handle = CallHandle(self.next_call);
        let session_id = splitmix(self.cfg.seed ^ self.next_call) >> 1;
        self.dialogs.insert(dialog.id.clone(), handle);
        self.invites.insert(key.clone(), handle);
        let peer_allows_update = message::has_option_tag(&req.headers, "Allow", "UPDATE");
        self.calls.insert(
            handle,
            Call {
                state: CallState::Incoming,
                invite: req.clone(),
                invite_key: key,
                source: target,
                local,
                dialog,
                offer: offer.clone(),
                media: None,
                local_sdp: None,
                session_id,
                awaiting_ack: None,
                retransmit: None,
                session_timer,
                refreshed_at: now,
                bye_pending: false,
                peer_allows_update,
                outbound: false,
                provisional_seen: false,
                cancel_pending: false,
                cancel_sent: false,
                ack: None,
            },
        );
        self.timers
            .arm(now + self.cfg.pending_timeout, (handle, CallTimer::Pending));
        let (from, to) = match self.calls.get(&handle) {
            Some(c) => (c.dialog.remote.clone(), {
                let mut to = c.dialog.local.clone();
                to.params.retain(|(k, _)| !k.eq_ignore_ascii_case("tag"));
                to
            }),
            None => return,
        };
        self.emit(UaEvent::IncomingCall(Box::new(IncomingCall {
            call: handle,
            request: req,
            from,
            to,
            offer,
            source,
        })));
    }

    /// Reads an SDP body; the error is the response to send (400 or 415).
    fn read_offer(
        &self,
        req: &rsip::Request,
    ) -> Result<Option<SessionDescription>, Box<rsip::Response>> {
        if req.body.is_empty() {
            return Ok(None);
        }
        let ctype = message::header(&req.headers, "Content-Type").unwrap_or_default();
        let ctype = ctype
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if !ctype.is_empty() && ctype != "application/sdp" {
            let mut resp = self.simple_response(req, 415, None);
            resp.headers
                .push(message::make_header("Accept", "application/sdp"));
            return Err(Box::new(resp));
        }
        SessionDescription::parse(&req.body).map(Some).map_err(|e| {
            let tag = self.auto_tag(&message::call_id(&req.headers).unwrap_or_default());
            let mut resp = message::ResponseBase::from_request(req).response(
                400,
                Some(&format!("Malformed SDP: {e}")),
                Some(&tag),
            );
            self.push_server_header(&mut resp);
            Box::new(resp)
        })
    }

    fn on_cancel(&mut self, req: &rsip::Request, key: TxKey, target: Target, now: Instant) {
        let invite_key = TxKey::invite_for_cancel(req);
        let call = invite_key
            .as_ref()
            .and_then(|k| self.invites.get(k).copied());
        let invite_tx = invite_key.as_ref().and_then(|k| self.txs.get(k));
        let pending = invite_tx.is_some_and(|tx| tx.awaiting_final());
        let Some(call) = call.filter(|_| pending) else {
            // §9.2: a CANCEL for an already-answered INVITE gets 200 and changes nothing;
            // only a CANCEL matching no transaction gets 481.
            let code = if invite_tx.is_some() { 200 } else { 481 };
            let resp = self.simple_response(req, code, None);
            self.respond_new(key, req, resp, target, now);
            return;
        };
        let resp = self.simple_response(req, 200, None);
        self.respond_new(key, req, resp, target, now);
        if let Some(c) = self.calls.get(&call) {
            let tag = c.dialog.id.local_tag.clone();
            let ik = c.invite_key.clone();
            let resp = self.simple_response(&c.invite, 487, Some(&tag));
            let mut out = Vec::new();
            let _ = self.txs.respond(&ik, &resp, now, &mut out);
            self.drain_tx(out, now);
        }
        self.remove_call(call);
        self.emit(UaEvent::CallCancelled { call });
    }

    fn on_ack(&mut self, req: &rsip::Request, now: Instant) {
        let Some(id) = DialogId::of_incoming(req) else {
            return;
        };
        let Some(&handle) = self.dialogs.get(&id) else {
            return;
        };
        let seq = message::cseq(&req.headers).map(|c| c.0).ok();
        let Some(call) = self.calls.get_mut(&handle) else {
            return;
        };
        if call.awaiting_ack.is_none() || call.awaiting_ack != seq {
            return;
        }
        call.awaiting_ack = None;
        call.retransmit = None;
        let initial = call.state == CallState::Answered;
        call.state = CallState::Confirmed;
        let answer = if req.body.is_empty() {
            None
        } else {
            SessionDescription::parse(&req.body).ok()
        };
        let bye_pending = call.bye_pending;
        if initial {
            self.emit(UaEvent::CallAcked {
                call: handle,
                answer,
            });
        }
        if bye_pending {
            self.end_with_bye(handle, EndReason::Bye, now);
        }
    }

    fn on_in_dialog(&mut self, req: rsip::Request, key: TxKey, target: Target, now: Instant) {
        let handle = DialogId::of_incoming(&req).and_then(|id| self.dialogs.get(&id).copied());
        let Some(handle) = handle else {
            let resp = self.simple_response(&req, 481, None);
            self.respond_new(key, &req, resp, target, now);
            return;
        };
        let seq = message::cseq(&req.headers).map(|c| c.0).unwrap_or(0);
        let Some(call) = self.calls.get_mut(&handle) else {
            return;
        };
        if let Err(e) = call.dialog.check_remote_cseq(seq) {
            let mut resp =
                message::ResponseBase::from_request(&req).response(500, Some(&e.to_string()), None);
            self.push_server_header(&mut resp);
            self.respond_new(key, &req, resp, target, now);
            return;
        }
        match req.method {
            rsip::Method::Bye => {
                let resp = self.simple_response(&req, 200, None);
                self.respond_new(key, &req, resp, target, now);
                if let Some(c) = self.calls.get(&handle) {
                    if !c.outbound && matches!(c.state, CallState::Incoming | CallState::Early) {
                        // BYE in an early dialog: the INVITE still needs a final answer.
                        let (ik, tag) = (c.invite_key.clone(), c.dialog.id.local_tag.clone());
                        let resp = self.simple_response(&c.invite, 487, Some(&tag));
                        let mut out = Vec::new();
                        let _ = self.txs.respond(&ik, &resp, now, &mut out);
                        self.drain_tx(out, now);
                    }
                }
                self.remove_call(handle);
                self.emit(UaEvent::CallEnded {
                    call: handle,
                    by: EndedBy::Remote,
                    reason: EndReason::Bye,
                });
            }
            rsip::Method::Options => {
                let resp = self.options_response(&req, None);
                self.respond_new(key, &req, resp, target, now);
                self.emit(UaEvent::InDialogRequest {
                    call: handle,
                    kind: InDialogKind::Options,
                    request: Box::new(req),
                    media: None,
                });
            }
            rsip::Method::Info => {
                let resp = self.simple_response(&req, 200, None);
                self.respond_new(key, &req, resp, target, now);
                self.emit(UaEvent::InDialogRequest {
                    call: handle,
                    kind: InDialogKind::Info,
                    request: Box::new(req),
                    media: None,
                });
            }
            rsip::Method::Invite | rsip::Method::Update => {
                self.on_offer_in_dialog(handle, req, key, target, now)
            }
            _ => {
                let mut resp = self.simple_response(&req, 501, None);
                resp.headers.push(message::make_header("Allow", ALLOW));
                self.respond_new(key, &req, resp, target, now);
            }
        }
    }

    /// re-INVITE or UPDATE: session refresh and/or new offer, answered automatically with the
    /// media configuration given at answer time.
    fn on_offer_in_dialog(
        &mut self,
        handle: CallHandle,
        req: rsip::Request,
        key: TxKey,
        target: Target,
        now: Instant,
    ) {
        let is_invite = req.method == rsip::Method::Invite;
        let kind = if is_invite {
            InDialogKind::ReInvite
        } else {
            InDialogKind::Update
        };
        let Some(call) = self.calls.get(&handle) else {
            return;
        };
        if call.state != CallState::Confirmed || call.awaiting_ack.is_some() {
            // §14.2: an INVITE while ours is unfinished gets 491; before answer, 500 would do
            // too, but 491 makes the peer retry later, which is what we want.
            let resp = self.simple_response(&req, 491, None);
            self.respond_new(key, &req, resp, target, now);
            return;
        }
        let st = match SessionTimer::negotiate(&req.headers, self.cfg.min_se) {
            Ok(st) => st,
            Err(too_small) => {
                let mut resp = self.simple_response(&req, 422, None);
                resp.headers
                    .push(message::make_header("Min-SE", too_small.min_se.to_string()));
                self.respond_new(key, &req, resp, target, now);
                return;
            }
        };
        let offer = match self.read_offer(&req) {
            Ok(o) => o,
            Err(resp) => {
                self.respond_new(key, &req, *resp, target, now);
                return;
            }
        };
        let Some(call) = self.calls.get_mut(&handle) else {
            return;
        };
        let mut negotiated = None;
        let body = match (&offer, &call.media) {
            (Some(o), Some(media)) => match sdp::negotiate(o, media) {
                Ok(neg) => {
                    let version = call
                        .local_sdp
                        .as_ref()
                        .map(|s| s.session_version + 1)
                        .unwrap_or(1);
                    let ans = sdp::build_answer(o, &neg, media, call.session_id, version);
                    call.local_sdp = Some(ans.clone());
                    negotiated = Some(neg);
                    Some(ans.to_bytes())
                }
                Err(e) => {
                    let tag = call.dialog.id.local_tag.clone();
                    let mut resp = ResponseBase::from_request(&req).response(
                        488,
                        Some(&format!("Not Acceptable Here ({e})")),
                        Some(&tag),
                    );
                    self.push_server_header(&mut resp);
                    self.respond_new(key, &req, resp, target, now);
                    return;
                }
            },
            // No offer in a re-INVITE: our current SDP becomes the offer (§14.2).
            (None, _) if is_invite => call.local_sdp.as_ref().map(SessionDescription::to_bytes),
            _ => None,
        };
        call.dialog.refresh_target(&req.headers);
        if st.is_some() {
            call.session_timer = st;
        }
        call.refreshed_at = now;
        let seq = message::cseq(&req.headers).map(|c| c.0).unwrap_or(0);
        let tag = call.dialog.id.local_tag.clone();
        let contact = call.dialog.local_contact.clone();
        let timer_headers = call
            .session_timer
            .map(|s| s.response_headers())
            .unwrap_or_default();
        let mut resp = message::response_to(&req, 200, Some(&tag));
        resp.headers
            .push(message::make_header("Contact", format!("<{contact}>")));
        for (n, v) in timer_headers {
            resp.headers.push(message::make_header(&n, v));
        }
        resp.headers.push(message::make_header("Allow", ALLOW));
        resp.headers
            .push(message::make_header("Supported", SUPPORTED));
        self.push_server_header(&mut resp);
        if let Some(b) = body {
            resp.headers
                .push(message::make_header("Content-Type", "application/sdp"));
            resp.body = b;
        }
        let bytes = message::to_bytes(&resp.clone().into());
        self.respond_new(key, &req, resp, target, now);
        if is_invite {
            let t = self.cfg.timers;
            if let Some(call) = self.calls.get_mut(&handle) {
                let retx =
                    AnswerRetransmit::new(bytes, t.t1, t.t2, target.transport.is_reliable(), now);
                call.awaiting_ack = Some(seq);
                self.arm_retransmit(handle, &retx);
                if let Some(call) = self.calls.get_mut(&handle) {
                    call.retransmit = Some(retx);
                }
            }
        }
        self.arm_session_timer(handle);
        self.emit(UaEvent::InDialogRequest {
            call: handle,
            kind,
            request: Box::new(req),
            media: negotiated,
        });
    }

    fn on_client_response(&mut self, key: TxKey, resp: rsip::Response, now: Instant) {
        let Some(&(handle, purpose)) = self.client_txs.get(&key) else {
            return;
        };
        let code = resp.status_code.code();
        if purpose == ClientPurpose::Invite {
            self.on_invite_response(handle, resp, now);
            return;
        }
        if purpose != ClientPurpose::Refresh || code < 200 {
            return;
        }
        if (200..300).contains(&code) {
            let is_invite = matches!(&key, TxKey::Client { method, .. } if method == "INVITE");
            let Some(call) = self.calls.get_mut(&handle) else {
                return;
            };
            call.refreshed_at = now;
            if is_invite {
                // The ACK for a 2xx is end-to-end, outside the transaction (§13.2.2.4).
                let seq = message::cseq(&resp.headers).map(|c| c.0).unwrap_or(1);
                let branch = self.new_token();
                if let Some(call) = self.calls.get_mut(&handle) {
                    let via = format!(
                        "SIP/2.0/{} {};branch=z9hG4bK{branch};rport",
                        call.source.transport.via_name(),
                        self.cfg.advertised_addr.unwrap_or(call.local)
                    );
                    let ack = call
                        .dialog
                        .build_request(rsip::Method::Ack, &via, Some(seq), None);
                    let target = Self::next_hop(call);
                    self.send_raw(target, message::to_bytes(&ack.into()));
                }
            }
            self.arm_session_timer(handle);
        } else if code == 408 || code == 481 {
            self.end_with_bye(handle, EndReason::RefreshFailed, now);
        }
    }

    // ---------------------------------------------------------------- timers

    /// Runs everything due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut out = Vec::new();
        self.txs.handle_timeout(now, &mut out);
        self.drain_tx(out, now);
        while let Some((_, (handle, timer))) = self.timers.pop_due(now) {
            self.on_call_timer(handle, timer, now);
        }
        self.announce_timer();
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

    fn send_in_dialog(
        &mut self,
        handle: CallHandle,
        method: rsip::Method,
        body: Option<(&str, Vec<u8>)>,
        purpose: ClientPurpose,
        now: Instant,
    ) {
        let Some(via) = self.our_via(handle) else {
            return;
        };
        let Some(call) = self.calls.get_mut(&handle) else {
            return;
        };
        let mut req = call.dialog.build_request(method, &via, None, body);
        req.headers.push(message::make_header(
            "User-Agent",
            self.cfg.user_agent.clone(),
        ));
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
        let target = Self::next_hop(call);
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
            self.dialogs.remove(&c.dialog.id);
            self.invites.remove(&c.invite_key);
        }
    }

    // ---------------------------------------------------------------- commands

    fn pending_call(&self, handle: CallHandle) -> Result<&Call, UaError> {
        let call = self.calls.get(&handle).ok_or(UaError::UnknownCall)?;
        match call.state {
            CallState::Incoming | CallState::Early => Ok(call),
            s => Err(UaError::WrongState(s.name())),
        }
    }

    /// Sends 180 Ringing, or 183 Session Progress with an SDP answer (early media) when
    /// `media` is given. Returns the negotiated media for 183.
    pub fn ring(
        &mut self,
        handle: CallHandle,
        media: Option<&MediaConfig>,
        now: Instant,
    ) -> Result<Option<Negotiated>, UaError> {
        let call = self.pending_call(handle)?;
        let tag = call.dialog.id.local_tag.clone();
        let contact = call.dialog.local_contact.clone();
        let mut resp = message::response_to(
            &call.invite,
            if media.is_some() { 183 } else { 180 },
            Some(&tag),
        );
        resp.headers
            .push(message::make_header("Contact", format!("<{contact}>")));
        self.push_server_header(&mut resp);
        let mut negotiated = None;
        if let Some(media) = media {
            let (sdp, neg) = self.make_answer(handle, media)?;
            resp.headers
                .push(message::make_header("Content-Type", "application/sdp"));
            resp.body = sdp.to_bytes();
            negotiated = neg;
        }
        let call = self.calls.get_mut(&handle).ok_or(UaError::UnknownCall)?;
        call.state = CallState::Early;
        let key = call.invite_key.clone();
        let mut out = Vec::new();
        self.txs.respond(&key, &resp, now, &mut out)?;
        self.drain_tx(out, now);
        self.announce_timer();
        Ok(negotiated)
    }

    /// Negotiates (or offers, when the INVITE had no SDP) and remembers our SDP.
    fn make_answer(
        &mut self,
        handle: CallHandle,
        media: &MediaConfig,
    ) -> Result<(SessionDescription, Option<Negotiated>), UaError> {
        let call = self.calls.get_mut(&handle).ok_or(UaError::UnknownCall)?;
        // An answer already sent in a 183 must be repeated unchanged in the 200 (RFC 3264 §8).
        if let (Some(existing), Some(offer)) = (&call.local_sdp, &call.offer) {
            let neg = sdp::negotiate(offer, media)?;
            return Ok((existing.clone(), Some(neg)));
        }
        let (sdp, neg) = match &call.offer {
            Some(offer) => {
                let neg = sdp::negotiate(offer, media)?;
                (
                    sdp::build_answer(offer, &neg, media, call.session_id, 1),
                    Some(neg),
                )
            }
            None => (
                sdp::build_offer(media, call.session_id, 1, sdp::Direction::SendRecv),
                None,
            ),
        };
        call.media = Some(media.clone());
        call.local_sdp = Some(sdp.clone());
        Ok((sdp, neg))
    }

    /// Answers with 200 OK and our SDP. Returns the negotiated media, or `None` when the
    /// INVITE had no offer (ours went in the 200; the peer's answer arrives in `CallAcked`).
    /// On [`UaError::Sdp`] the call is still pending: reject it with 488.
    pub fn answer(
        &mut self,
        handle: CallHandle,
        media: &MediaConfig,
        now: Instant,
    ) -> Result<Option<Negotiated>, UaError> {
        self.pending_call(handle)?;
        let (sdp, neg) = self.make_answer(handle, media)?;
        let call = self.calls.get(&handle).ok_or(UaError::UnknownCall)?;
        let tag = call.dialog.id.local_tag.clone();
        let contact = call.dialog.local_contact.clone();
        let mut resp = message::response_to(&call.invite, 200, Some(&tag));
        resp.headers
            .push(message::make_header("Contact", format!("<{contact}>")));
        if let Some(st) = call.session_timer {
            for (n, v) in st.response_headers() {
                resp.headers.push(message::make_header(&n, v));
            }
        }
        resp.headers.push(message::make_header("Allow", ALLOW));
        resp.headers
            .push(message::make_header("Supported", SUPPORTED));
        self.push_server_header(&mut resp);
        resp.headers
            .push(message::make_header("Content-Type", "application/sdp"));
        resp.body = sdp.to_bytes();
        let key = call.invite_key.clone();
        let reliable = call.source.transport.is_reliable();
        let seq = message::cseq(&call.invite.headers)
            .map(|c| c.0)
            .unwrap_or(0);
        let bytes = message::to_bytes(&resp.clone().into());
        let mut out = Vec::new();
        self.txs.respond(&key, &resp, now, &mut out)?;
        self.drain_tx(out, now);
        let t = self.cfg.timers;
        let retx = AnswerRetransmit::new(bytes, t.t1, t.t2, reliable, now);
        self.arm_retransmit(handle, &retx);
        if let Some(call) = self.calls.get_mut(&handle) {
            call.state = CallState::Answered;
            call.awaiting_ack = Some(seq);
            call.retransmit = Some(retx);
            call.refreshed_at = now;
        }
        self.arm_session_timer(handle);
        self.announce_timer();
        Ok(neg)
    }

    /// Rejects a pending call with a 3xx–6xx final response and extra headers.
    pub fn reject(
        &mut self,
        handle: CallHandle,
        code: u16,
        reason: Option<&str>,
        extra_headers: &[(String, String)],
        now: Instant,
    ) -> Result<(), UaError> {
        if !(300..=699).contains(&code) {
            return Err(UaError::BadStatus(code));
        }
        self.final_response(handle, code, reason, extra_headers, now)?;
        self.emit(UaEvent::CallEnded {
            call: handle,
            by: EndedBy::Local,
            reason: EndReason::Rejected(code),
        });
        self.announce_timer();
        Ok(())
    }

    fn final_response(
        &mut self,
        handle: CallHandle,
        code: u16,
        reason: Option<&str>,
        extra_headers: &[(String, String)],
        now: Instant,
    ) -> Result<(), UaError> {
        let call = self.pending_call(handle)?;
        let tag = call.dialog.id.local_tag.clone();
        let mut resp = ResponseBase::from_request(&call.invite).response(code, reason, Some(&tag));
        for (n, v) in extra_headers {
            let valid = !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.!%*_+`'~".contains(c));
            if !valid {
                tracing::warn!(header = %n, "dropping extra header with an invalid name");
                continue;
            }
            let clean: String = v.chars().filter(|c| *c != '\r' && *c != '\n').collect();
            resp.headers.push(message::make_header(n, clean));
        }
        self.push_server_header(&mut resp);
        let key = call.invite_key.clone();
        let mut out = Vec::new();
        self.txs.respond(&key, &resp, now, &mut out)?;
        self.drain_tx(out, now);
        self.remove_call(handle);
        Ok(())
    }

    /// Redirects a pending call: 302 with one Contact per target URI, in order.
    pub fn redirect(
        &mut self,
        handle: CallHandle,
        contacts: &[String],
        now: Instant,
    ) -> Result<(), UaError> {
        let headers: Vec<(String, String)> = contacts
            .iter()
            .map(|c| {
                let v = if c.trim_start().starts_with('<') || c.contains('"') {
                    c.clone()
                } else {
                    format!("<{}>", c.trim())
                };
                ("Contact".to_string(), v)
            })
            .collect();
        self.reject(handle, 302, None, &headers, now)
    }

    /// Ends a call: BYE once established (after the ACK, per §15), 480 while still pending.
    pub fn hangup(&mut self, handle: CallHandle, now: Instant) -> Result<(), UaError> {
        let call = self.calls.get_mut(&handle).ok_or(UaError::UnknownCall)?;
        match call.state {
            CallState::Calling => self.cancel_outbound(handle, now),
            CallState::Incoming | CallState::Early => {
                return self.reject(handle, 480, None, &[], now)
            }
            CallState::Answered => call.bye_pending = true,
            CallState::Confirmed => self.end_with_bye(handle, EndReason::Bye, now),
        }
        self.announce_timer();
        Ok(())
    }
}

mod outbound;
pub use outbound::OutboundCall;

#[cfg(test)]
mod tests;
