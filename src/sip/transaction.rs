//! RFC 3261 §17 transactions (with RFC 6026 fixes) as sans-IO state machines, and their table.
//!
//! Each machine is fed events with the current instant and pushes [`TxOutput`]s; timers are
//! kept in the table's queue and re-checked against the machine's own record when popped,
//! so a timer that was superseded by a state change simply does nothing.

use super::message::{self, Via, MAGIC_COOKIE};
use super::timer::TimerQueue;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Transport a message travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    Udp,
    Tcp,
}

impl TransportKind {
    /// Reliable transports do not need retransmissions (RFC 3261 §17.1.1.2).
    pub fn is_reliable(self) -> bool {
        matches!(self, Self::Tcp)
    }

    pub fn via_name(self) -> &'static str {
        match self {
            Self::Udp => "UDP",
            Self::Tcp => "TCP",
        }
    }
}

/// Where a message goes (or came from).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    pub addr: SocketAddr,
    pub transport: TransportKind,
}

/// RFC 3261 timer values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerConfig {
    pub t1: Duration,
    pub t2: Duration,
    pub t4: Duration,
}

impl Default for TimerConfig {
    fn default() -> Self {
        Self {
            t1: DEFAULT_T1,
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

/// RFC 3261's default T1, which a peer uses unless it was told otherwise.
pub const DEFAULT_T1: Duration = Duration::from_millis(500);

impl TimerConfig {
    /// 64*T1: how long we keep retransmitting or waiting for our own requests and
    /// responses (timers B, F, H).
    pub fn t1x64(&self) -> Duration {
        self.t1 * 64
    }

    /// How long a peer may keep retransmitting at us: 64 times the larger of our T1 and
    /// the RFC default (timers J, L, M and dialog tombstones). A short `t1` speeds up our
    /// own retransmissions, but the peer's are paced by its T1, which we cannot know; a
    /// peer on the default T1 retransmits a BYE for 32 s, and forgetting the transaction
    /// after 64 x 100 ms would answer its last retransmissions with 481.
    pub fn peer_window(&self) -> Duration {
        self.t1.max(DEFAULT_T1) * 64
    }
}

/// Timer D for unreliable transports ("at least 32 seconds", RFC 3261 §17.1.1.2).
pub const TIMER_D: Duration = Duration::from_secs(32);

/// The RFC 3261 / RFC 6026 transaction timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TimerKind {
    A,
    B,
    D,
    E,
    F,
    G,
    H,
    I,
    J,
    K,
    L,
    M,
}

/// Key of a server transaction (§17.2.3), or of a client one (branch + method, §17.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TxKey {
    Rfc3261 {
        branch: String,
        sent_by: String,
        method: String,
    },
    /// RFC 2543 peers without a magic-cookie branch: Call-ID, From tag, CSeq number, top Via.
    Rfc2543 {
        call_id: String,
        from_tag: String,
        cseq: u32,
        via: String,
        method: String,
    },
    Client {
        branch: String,
        method: String,
    },
}

impl TxKey {
    /// The server transaction a request belongs to. An ACK maps to its INVITE's transaction.
    pub fn server(req: &rsip::Request) -> Option<Self> {
        let via = message::top_via(&req.headers)?;
        let method = match req.method {
            rsip::Method::Ack => "INVITE".to_string(),
            ref m => m.to_string(),
        };
        Some(Self::server_with_method(&via, req, method))
    }

    /// Key of the INVITE transaction a CANCEL targets (§9.2: same key, method INVITE).
    pub fn invite_for_cancel(cancel: &rsip::Request) -> Option<Self> {
        let via = message::top_via(&cancel.headers)?;
        Some(Self::server_with_method(&via, cancel, "INVITE".into()))
    }

    fn server_with_method(via: &Via, req: &rsip::Request, method: String) -> Self {
        match via.branch() {
            Some(b) if b.starts_with(MAGIC_COOKIE) => Self::Rfc3261 {
                branch: b.to_string(),
                sent_by: via.sent_by().to_ascii_lowercase(),
                method,
            },
            _ => Self::Rfc2543 {
                call_id: message::call_id(&req.headers).unwrap_or_default(),
                from_tag: message::from_tag(&req.headers).unwrap_or_default(),
                cseq: message::cseq(&req.headers).map(|c| c.0).unwrap_or(0),
                via: via.sent_by().to_ascii_lowercase(),
                method,
            },
        }
    }

    /// The client transaction a response belongs to.
    pub fn client_for_response(resp: &rsip::Response) -> Option<Self> {
        let via = message::top_via(&resp.headers)?;
        let (_, method) = message::cseq(&resp.headers).ok()?;
        Some(Self::Client {
            branch: via.branch()?.to_string(),
            method: method.to_ascii_uppercase(),
        })
    }
}

/// What the machines ask of their owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxOutput {
    Send {
        target: Target,
        bytes: Vec<u8>,
    },
    /// A response for the transaction user (client transactions only).
    Response {
        key: TxKey,
        response: rsip::Response,
    },
    /// Timer B/F (no final response) or H (no ACK for our final response).
    Timeout {
        key: TxKey,
    },
    Terminated {
        key: TxKey,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Calling,
    Trying,
    Proceeding,
    Completed,
    Confirmed,
    Accepted,
    Terminated,
}

/// Shared machinery: state, armed timers, and where to send.
#[derive(Debug)]
struct Core {
    key: TxKey,
    target: Target,
    state: State,
    cfg: TimerConfig,
    armed: Vec<(TimerKind, Instant)>,
}

impl Core {
    fn arm(&mut self, kind: TimerKind, at: Instant, q: &mut TimerQueue<(TxKey, TimerKind)>) {
        self.armed.retain(|(k, _)| *k != kind);
        self.armed.push((kind, at));
        q.arm(at, (self.key.clone(), kind));
    }

    fn disarm(&mut self, kind: TimerKind) {
        self.armed.retain(|(k, _)| *k != kind);
    }

    /// True (and consumed) if this timer is armed and due.
    fn take_due(&mut self, kind: TimerKind, now: Instant) -> bool {
        match self
            .armed
            .iter()
            .position(|(k, at)| *k == kind && *at <= now)
        {
            Some(i) => {
                self.armed.remove(i);
                true
            }
            None => false,
        }
    }

    fn send(&self, bytes: &[u8], out: &mut Vec<TxOutput>) {
        out.push(TxOutput::Send {
            target: self.target,
            bytes: bytes.to_vec(),
        });
    }

    fn terminate(&mut self, out: &mut Vec<TxOutput>) {
        if self.state != State::Terminated {
            self.state = State::Terminated;
            self.armed.clear();
            out.push(TxOutput::Terminated {
                key: self.key.clone(),
            });
        }
    }

    fn reliable(&self) -> bool {
        self.target.transport.is_reliable()
    }
}

#[derive(Debug)]
enum Kind {
    InviteServer {
        last: Option<Vec<u8>>,
        g: Duration,
    },
    NonInviteServer {
        last: Option<Vec<u8>>,
    },
    InviteClient {
        request: Box<rsip::Request>,
        bytes: Vec<u8>,
        a: Duration,
        ack: Option<Vec<u8>>,
    },
    NonInviteClient {
        bytes: Vec<u8>,
        e: Duration,
    },
}

/// One transaction of any of the four kinds.
#[derive(Debug)]
pub struct Transaction {
    core: Core,
    kind: Kind,
}

impl Transaction {
    pub fn is_terminated(&self) -> bool {
        self.core.state == State::Terminated
    }

    pub fn target(&self) -> Target {
        self.core.target
    }

    /// True once the transaction's work is done and it only lingers to absorb the peer's
    /// retransmissions (or to repeat our ACK): timers D, I, J, K, L and M. Such a transaction
    /// costs a little memory and no work, so it does not count against admission.
    pub fn is_resting(&self) -> bool {
        match (&self.kind, self.core.state) {
            (_, State::Confirmed | State::Accepted) => true,
            (Kind::InviteServer { .. }, _) => false,
            (_, State::Completed) => true,
            _ => false,
        }
    }

    /// True while a server INVITE transaction can still send a final response.
    pub fn awaiting_final(&self) -> bool {
        matches!(self.core.state, State::Trying | State::Proceeding)
    }

    /// A retransmitted request hit this server transaction.
    fn on_request_retransmit(&mut self, out: &mut Vec<TxOutput>) {
        let last = match (&self.kind, self.core.state) {
            // RFC 6026 §7.1: in Accepted, retransmitted INVITEs are absorbed (the TU resends 2xx).
            (Kind::InviteServer { last, .. }, State::Proceeding | State::Completed) => last.clone(),
            (Kind::NonInviteServer { last }, State::Proceeding | State::Completed) => last.clone(),
            _ => None,
        };
        if let Some(bytes) = last {
            self.core.send(&bytes, out);
        }
    }

    /// ACK for our non-2xx final response (server INVITE).
    fn on_ack(
        &mut self,
        now: Instant,
        q: &mut TimerQueue<(TxKey, TimerKind)>,
        out: &mut Vec<TxOutput>,
    ) {
        if !matches!(self.kind, Kind::InviteServer { .. }) || self.core.state != State::Completed {
            return;
        }
        self.core.state = State::Confirmed;
        self.core.disarm(TimerKind::G);
        self.core.disarm(TimerKind::H);
        if self.core.reliable() {
            self.core.terminate(out);
        } else {
            let at = now + self.core.cfg.t4;
            self.core.arm(TimerKind::I, at, q);
        }
    }

    /// The TU responds through this server transaction.
    fn respond(
        &mut self,
        code: u16,
        bytes: Vec<u8>,
        now: Instant,
        q: &mut TimerQueue<(TxKey, TimerKind)>,
        out: &mut Vec<TxOutput>,
    ) -> Result<(), TxError> {
        let cfg = self.core.cfg;
        match &mut self.kind {
            Kind::InviteServer { last, g } => {
                if !matches!(self.core.state, State::Proceeding) {
                    return Err(TxError::WrongState);
                }
                self.core.send(&bytes, out);
                match code {
                    100..=199 => *last = Some(bytes),
                    200..=299 => {
                        *last = None;
                        self.core.state = State::Accepted;
                        self.core.arm(TimerKind::L, now + cfg.peer_window(), q);
                    }
                    _ => {
                        *last = Some(bytes);
                        self.core.state = State::Completed;
                        if !self.core.reliable() {
                            *g = cfg.t1;
                            self.core.arm(TimerKind::G, now + cfg.t1, q);
                        }
                        self.core.arm(TimerKind::H, now + cfg.t1x64(), q);
                    }
                }
            }
            Kind::NonInviteServer { last } => {
                if !matches!(self.core.state, State::Trying | State::Proceeding) {
                    return Err(TxError::WrongState);
                }
                self.core.send(&bytes, out);
                *last = Some(bytes);
                if code < 200 {
                    self.core.state = State::Proceeding;
                } else {
                    self.core.state = State::Completed;
                    if self.core.reliable() {
                        self.core.terminate(out);
                    } else {
                        self.core.arm(TimerKind::J, now + cfg.peer_window(), q);
                    }
                }
            }
            _ => return Err(TxError::WrongState),
        }
        Ok(())
    }

    /// A response arrived for this client transaction.
    fn on_response(
        &mut self,
        resp: rsip::Response,
        now: Instant,
        q: &mut TimerQueue<(TxKey, TimerKind)>,
        out: &mut Vec<TxOutput>,
    ) {
        let code = resp.status_code.code();
        let cfg = self.core.cfg;
        let key = self.core.key.clone();
        let reliable = self.core.reliable();
        match &mut self.kind {
            Kind::InviteClient { request, ack, .. } => match (self.core.state, code) {
                (State::Calling | State::Proceeding, 100..=199) => {
                    self.core.state = State::Proceeding;
                    self.core.disarm(TimerKind::A);
                    self.core.disarm(TimerKind::B);
                    out.push(TxOutput::Response {
                        key,
                        response: resp,
                    });
                }
                (State::Calling | State::Proceeding | State::Accepted, 200..=299) => {
                    if self.core.state != State::Accepted {
                        self.core.state = State::Accepted;
                        self.core.disarm(TimerKind::A);
                        self.core.disarm(TimerKind::B);
                        self.core.arm(TimerKind::M, now + cfg.peer_window(), q);
                    }
                    out.push(TxOutput::Response {
                        key,
                        response: resp,
                    });
                }
                (State::Calling | State::Proceeding, 300..=699) => {
                    let bytes = message::to_bytes(&build_ack(request, &resp).into());
                    self.core.send(&bytes, out);
                    *ack = Some(bytes);
                    self.core.state = State::Completed;
                    self.core.disarm(TimerKind::A);
                    self.core.disarm(TimerKind::B);
                    out.push(TxOutput::Response {
                        key,
                        response: resp,
                    });
                    if reliable {
                        self.core.terminate(out);
                    } else {
                        self.core.arm(TimerKind::D, now + TIMER_D, q);
                    }
                }
                (State::Completed, 300..=699) => {
                    if let Some(a) = ack.clone() {
                        self.core.send(&a, out);
                    }
                }
                _ => {}
            },
            Kind::NonInviteClient { .. } => match (self.core.state, code) {
                (State::Trying | State::Proceeding, 100..=199) => {
                    self.core.state = State::Proceeding;
                    out.push(TxOutput::Response {
                        key,
                        response: resp,
                    });
                }
                (State::Trying | State::Proceeding, 200..=699) => {
                    self.core.state = State::Completed;
                    self.core.disarm(TimerKind::E);
                    self.core.disarm(TimerKind::F);
                    out.push(TxOutput::Response {
                        key,
                        response: resp,
                    });
                    if reliable {
                        self.core.terminate(out);
                    } else {
                        self.core.arm(TimerKind::K, now + cfg.t4, q);
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }

    fn on_timer(
        &mut self,
        kind: TimerKind,
        now: Instant,
        q: &mut TimerQueue<(TxKey, TimerKind)>,
        out: &mut Vec<TxOutput>,
    ) {
        if !self.core.take_due(kind, now) {
            return;
        }
        let cfg = self.core.cfg;
        let key = self.core.key.clone();
        match (&mut self.kind, kind) {
            (Kind::InviteServer { last, g }, TimerKind::G) => {
                if let Some(bytes) = last.clone() {
                    self.core.send(&bytes, out);
                }
                *g = (*g * 2).min(cfg.t2);
                let at = now + *g;
                self.core.arm(TimerKind::G, at, q);
            }
            (Kind::InviteServer { .. }, TimerKind::H) => {
                out.push(TxOutput::Timeout { key });
                self.core.terminate(out);
            }
            (Kind::InviteClient { bytes, a, .. }, TimerKind::A) => {
                let b = bytes.clone();
                self.core.send(&b, out);
                *a *= 2;
                let at = now + *a;
                self.core.arm(TimerKind::A, at, q);
            }
            (Kind::NonInviteClient { bytes, e }, TimerKind::E) => {
                let b = bytes.clone();
                self.core.send(&b, out);
                *e = if self.core.state == State::Proceeding {
                    cfg.t2
                } else {
                    (*e * 2).min(cfg.t2)
                };
                let at = now + *e;
                self.core.arm(TimerKind::E, at, q);
            }
            (_, TimerKind::B | TimerKind::F) => {
                out.push(TxOutput::Timeout { key });
                self.core.terminate(out);
            }
            (
                _,
                TimerKind::D
                | TimerKind::I
                | TimerKind::J
                | TimerKind::K
                | TimerKind::L
                | TimerKind::M,
            ) => {
                self.core.terminate(out);
            }
            _ => {}
        }
    }
}

/// RFC 3261 §17.1.1.3: the ACK a client INVITE transaction sends for a non-2xx response.
pub fn build_ack(invite: &rsip::Request, resp: &rsip::Response) -> rsip::Request {
    let mut headers = rsip::Headers::default();
    if let Some(v) = message::header(&invite.headers, "Via") {
        headers.push(message::make_header("Via", v));
    }
    for r in message::headers_named(&invite.headers, "Route") {
        headers.push(message::make_header("Route", r));
    }
    headers.push(message::make_header("Max-Forwards", "70"));
    for name in ["From", "Call-ID"] {
        if let Some(v) = message::header(&invite.headers, name) {
            headers.push(message::make_header(name, v));
        }
    }
    if let Some(v) = message::header(&resp.headers, "To") {
        headers.push(message::make_header("To", v));
    }
    let seq = message::cseq(&invite.headers).map(|c| c.0).unwrap_or(1);
    headers.push(message::make_header("CSeq", format!("{seq} ACK")));
    rsip::Request {
        method: rsip::Method::Ack,
        uri: invite.uri.clone(),
        version: rsip::Version::V2,
        headers,
        body: Vec::new(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TxError {
    #[error("transaction table is full ({0} transactions)")]
    TableFull(usize),
    #[error("no such transaction")]
    NotFound,
    #[error("transaction cannot take that in its current state")]
    WrongState,
    #[error("request has no usable top Via branch")]
    NoBranch,
}

/// How an incoming request relates to the server transactions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMatch {
    /// A retransmission or a non-2xx ACK, fully handled by the transaction.
    Absorbed,
    /// No transaction: a new request (or an ACK for a 2xx, which belongs to the dialog).
    New(TxKey),
}

/// The most transactions a table makes room for before the first one arrives, unless told.
pub const PRESIZED_TRANSACTIONS: usize = 65_536;

/// Resting transactions (see [`Transaction::is_resting`]) kept per unit of the working cap;
/// beyond that the oldest are forgotten (a late retransmission then reads as a new request).
pub const RESTING_PER_WORKING: usize = 4;

/// All live transactions, their timers, and a size limit.
///
/// The limit counts *working* transactions only (waiting for the TU, a response or an ACK).
/// Resting ones, which only absorb retransmissions, used to count too: 55,000 answered
/// OPTIONS held a 50,000 cap for the 32 s of timer J and every INVITE got 503 meanwhile.
/// They are bounded separately, at `RESTING_PER_WORKING x max`, oldest forgotten first.
#[derive(Debug)]
pub struct TransactionTable {
    cfg: TimerConfig,
    max: usize,
    /// Boxed: the table is presized (below), and a bucket holding the whole transaction
    /// (about 200 bytes) made it 26 MB whose pages filled in as transactions came and went.
    txs: HashMap<TxKey, Box<Transaction>>,
    timers: TimerQueue<(TxKey, TimerKind)>,
    /// How many of `txs` are resting.
    resting: usize,
    /// Keys in the order they came to rest (some may be gone already): who is forgotten first.
    rest_order: VecDeque<TxKey>,
}

impl TransactionTable {
    pub fn new(cfg: TimerConfig, max: usize) -> Self {
        Self::presized(cfg, max, PRESIZED_TRANSACTIONS)
    }

    /// A table with room for `presize` transactions (at most `max`) before it first grows.
    pub fn presized(cfg: TimerConfig, max: usize, presize: usize) -> Self {
        Self {
            cfg,
            max,
            // Sized for the configured maximum up front: at 10,000 calls/s the table holds
            // 50,000 transactions (each lives 5 s after its ACK), and growing to that size
            // rehashes and faults in fresh pages all through the ramp. Buckets cost address
            // space only until used, but transactions land on random buckets, so a few
            // thousand make nearly all of the table's pages resident.
            txs: HashMap::with_capacity(max.min(presize)),
            timers: TimerQueue::default(),
            resting: 0,
            rest_order: VecDeque::new(),
        }
    }

    /// Every transaction held, working or resting.
    pub fn len(&self) -> usize {
        self.txs.len()
    }

    /// Transactions that still have work to do: what the admission limit counts.
    pub fn working(&self) -> usize {
        self.txs.len() - self.resting
    }

    /// Transactions that only absorb retransmissions.
    pub fn resting(&self) -> usize {
        self.resting
    }

    fn resting_cap(&self) -> usize {
        self.max.saturating_mul(RESTING_PER_WORKING).max(1)
    }

    /// Book-keeping after `key`'s transaction was fed something (`was_resting` before):
    /// count it when it came to rest, forget the oldest resting ones past their cap, and drop
    /// it if it terminated.
    fn settle(&mut self, key: &TxKey, was_resting: bool, out: &mut Vec<TxOutput>) {
        let now_resting = self.txs.get(key).is_some_and(|t| t.is_resting());
        match (was_resting, now_resting) {
            (false, true) => {
                self.resting += 1;
                self.rest_order.push_back(key.clone());
                self.forget_oldest_resting(out);
            }
            // A resting transaction only leaves that state by terminating.
            (true, false) => self.resting -= 1,
            _ => {}
        }
        self.reap(key);
    }

    fn forget_oldest_resting(&mut self, out: &mut Vec<TxOutput>) {
        while self.resting > self.resting_cap() {
            let Some(old) = self.rest_order.pop_front() else {
                break;
            };
            if self.txs.get(&old).is_some_and(|t| t.is_resting()) {
                if let Some(mut tx) = self.txs.remove(&old) {
                    self.resting -= 1;
                    tx.core.terminate(out);
                }
            }
        }
        // Keys of transactions that ended on their own leave from the front as they age.
        while self
            .rest_order
            .front()
            .is_some_and(|k| !self.txs.get(k).is_some_and(|t| t.is_resting()))
        {
            self.rest_order.pop_front();
        }
    }

    fn was_resting(&self, key: &TxKey) -> bool {
        self.txs.get(key).is_some_and(|t| t.is_resting())
    }

    pub fn is_empty(&self) -> bool {
        self.txs.is_empty()
    }

    pub fn get(&self, key: &TxKey) -> Option<&Transaction> {
        self.txs.get(key).map(|t| &**t)
    }

    /// Feeds a request to its server transaction if it has one.
    pub fn match_request(
        &mut self,
        req: &rsip::Request,
        now: Instant,
        out: &mut Vec<TxOutput>,
    ) -> Option<ServerMatch> {
        let key = TxKey::server(req)?;
        let was_resting = self.was_resting(&key);
        let Some(tx) = self.txs.get_mut(&key) else {
            return Some(ServerMatch::New(key));
        };
        if req.method == rsip::Method::Ack {
            if !matches!(tx.kind, Kind::InviteServer { .. }) || tx.core.state == State::Accepted {
                // ACK for a 2xx: it belongs to the dialog, not to the transaction.
                return Some(ServerMatch::New(key));
            }
            tx.on_ack(now, &mut self.timers, out);
        } else {
            tx.on_request_retransmit(out);
        }
        self.settle(&key, was_resting, out);
        Some(ServerMatch::Absorbed)
    }

    fn check_room(&self) -> Result<(), TxError> {
        if self.working() >= self.max {
            return Err(TxError::TableFull(self.max));
        }
        Ok(())
    }

    /// Creates a server transaction. For INVITE, `trying` (a 100) is sent at once.
    pub fn create_server(
        &mut self,
        key: TxKey,
        is_invite: bool,
        target: Target,
        trying: Option<Vec<u8>>,
        out: &mut Vec<TxOutput>,
    ) -> Result<(), TxError> {
        self.check_room()?;
        let core = Core {
            key: key.clone(),
            target,
            state: if is_invite {
                State::Proceeding
            } else {
                State::Trying
            },
            cfg: self.cfg,
            armed: Vec::new(),
        };
        let kind = if is_invite {
            if let Some(t) = &trying {
                core.send(t, out);
            }
            Kind::InviteServer {
                last: trying,
                g: self.cfg.t1,
            }
        } else {
            Kind::NonInviteServer { last: None }
        };
        self.txs.insert(key, Box::new(Transaction { core, kind }));
        Ok(())
    }

    /// Sends a response through a server transaction.
    pub fn respond(
        &mut self,
        key: &TxKey,
        response: &rsip::Response,
        now: Instant,
        out: &mut Vec<TxOutput>,
    ) -> Result<(), TxError> {
        let was_resting = self.was_resting(key);
        let tx = self.txs.get_mut(key).ok_or(TxError::NotFound)?;
        let bytes = message::to_bytes(&response.clone().into());
        tx.respond(
            response.status_code.code(),
            bytes,
            now,
            &mut self.timers,
            out,
        )?;
        self.settle(key, was_resting, out);
        Ok(())
    }

    /// Starts a client transaction for a request whose top Via already carries our branch.
    pub fn send_request(
        &mut self,
        request: rsip::Request,
        target: Target,
        now: Instant,
        out: &mut Vec<TxOutput>,
    ) -> Result<TxKey, TxError> {
        self.check_room()?;
        let via = message::top_via(&request.headers).ok_or(TxError::NoBranch)?;
        let branch = via.branch().ok_or(TxError::NoBranch)?.to_string();
        let key = TxKey::Client {
            branch,
            method: request.method.to_string(),
        };
        let bytes = message::to_bytes(&request.clone().into());
        let mut core = Core {
            key: key.clone(),
            target,
            state: State::Trying,
            cfg: self.cfg,
            armed: Vec::new(),
        };
        core.send(&bytes, out);
        let reliable = target.transport.is_reliable();
        let kind = if request.method == rsip::Method::Invite {
            core.state = State::Calling;
            if !reliable {
                core.arm(TimerKind::A, now + self.cfg.t1, &mut self.timers);
            }
            core.arm(TimerKind::B, now + self.cfg.t1x64(), &mut self.timers);
            Kind::InviteClient {
                request: Box::new(request),
                bytes,
                a: self.cfg.t1,
                ack: None,
            }
        } else {
            if !reliable {
                core.arm(TimerKind::E, now + self.cfg.t1, &mut self.timers);
            }
            core.arm(TimerKind::F, now + self.cfg.t1x64(), &mut self.timers);
            Kind::NonInviteClient {
                bytes,
                e: self.cfg.t1,
            }
        };
        self.txs
            .insert(key.clone(), Box::new(Transaction { core, kind }));
        Ok(key)
    }

    /// Feeds a response to its client transaction; false if none matched (stray response).
    pub fn on_response(
        &mut self,
        resp: rsip::Response,
        now: Instant,
        out: &mut Vec<TxOutput>,
    ) -> bool {
        let Some(key) = TxKey::client_for_response(&resp) else {
            return false;
        };
        let was_resting = self.was_resting(&key);
        let Some(tx) = self.txs.get_mut(&key) else {
            return false;
        };
        tx.on_response(resp, now, &mut self.timers, out);
        self.settle(&key, was_resting, out);
        true
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    /// Fires every due timer.
    pub fn handle_timeout(&mut self, now: Instant, out: &mut Vec<TxOutput>) {
        while let Some((_, (key, kind))) = self.timers.pop_due(now) {
            let was_resting = self.was_resting(&key);
            if let Some(tx) = self.txs.get_mut(&key) {
                tx.on_timer(kind, now, &mut self.timers, out);
            }
            self.settle(&key, was_resting, out);
        }
    }

    /// Drops `key`'s transaction once terminated (callers go through [`settle`](Self::settle),
    /// which keeps the resting count).
    fn reap(&mut self, key: &TxKey) {
        if self.txs.get(key).is_some_and(|t| t.is_terminated()) {
            self.txs.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::parse::{parse, ParseLimits};

    fn req(text: &str) -> rsip::Request {
        match parse(text.as_bytes(), &ParseLimits::default()).unwrap() {
            rsip::SipMessage::Request(r) => r,
            _ => panic!("not a request"),
        }
    }

    fn resp(text: &str) -> rsip::Response {
        match parse(text.as_bytes(), &ParseLimits::default()).unwrap() {
            rsip::SipMessage::Response(r) => r,
            _ => panic!("not a response"),
        }
    }

    fn invite(branch: &str) -> rsip::Request {
        req(&format!(
            "INVITE sip:b@10.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch={branch}\r\nFrom: <sip:a@x>;tag=f1\r\nTo: <sip:b@y>\r\nCall-ID: cid1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        ))
    }

    fn udp() -> Target {
        Target {
            addr: "192.0.2.1:5060".parse().unwrap(),
            transport: TransportKind::Udp,
        }
    }

    fn tcp() -> Target {
        Target {
            addr: "192.0.2.1:5060".parse().unwrap(),
            transport: TransportKind::Tcp,
        }
    }

    fn sends(out: &[TxOutput]) -> usize {
        out.iter()
            .filter(|o| matches!(o, TxOutput::Send { .. }))
            .count()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Steps a table to `at` and returns what it produced.
    fn step(t: &mut TransactionTable, at: Instant) -> Vec<TxOutput> {
        let mut out = Vec::new();
        t.handle_timeout(at, &mut out);
        out
    }

    #[test]
    fn server_invite_g_doubles_to_t2_and_h_gives_up() {
        let t0 = Instant::now();
        let mut t = TransactionTable::new(TimerConfig::default(), 10);
        let inv = invite("z9hG4bKs1");
        let key = TxKey::server(&inv).unwrap();
        let mut out = Vec::new();
        t.create_server(key.clone(), true, udp(), Some(b"100".to_vec()), &mut out)
            .unwrap();
        assert_eq!(sends(&out), 1, "100 Trying at once");
        out.clear();
        t.respond(
            &key,
            &message::response_to(&inv, 486, Some("x")),
            t0,
            &mut out,
        )
        .unwrap();
        assert_eq!(sends(&out), 1);
        // G fires at 0.5, 1.5, 3.5, 7.5, 11.5, ... (interval 0.5,1,2,4,4,...)
        let mut fired = Vec::new();
        let mut now = t0;
        while now < t0 + ms(32_000) {
            now += ms(50);
            let o = step(&mut t, now);
            if sends(&o) > 0 {
                fired.push((now - t0).as_millis());
            }
            if o.iter().any(|x| matches!(x, TxOutput::Timeout { .. })) {
                assert_eq!((now - t0).as_millis(), 32_000, "H = 64*T1");
                assert!(t.is_empty());
            }
        }
        assert_eq!(&fired[..5], &[500, 1500, 3500, 7500, 11500]);
        assert!(t.is_empty());
    }

    #[test]
    fn server_invite_retransmits_absorbed_and_ack_starts_timer_i() {
        let t0 = Instant::now();
        let mut t = TransactionTable::new(TimerConfig::default(), 10);
        let inv = invite("z9hG4bKs2");
        let key = TxKey::server(&inv).unwrap();
        let mut out = Vec::new();
        t.create_server(key.clone(), true, udp(), Some(b"100".to_vec()), &mut out)
            .unwrap();
        out.clear();
        // Retransmitted INVITE before the final answer: 100 resent.
        assert_eq!(
            t.match_request(&inv, t0, &mut out),
            Some(ServerMatch::Absorbed)
        );
        assert_eq!(
            out,
            vec![TxOutput::Send {
                target: udp(),
                bytes: b"100".to_vec()
            }]
        );
        out.clear();
        let r = message::response_to(&inv, 404, Some("tag9"));
        t.respond(&key, &r, t0, &mut out).unwrap();
        out.clear();
        assert_eq!(
            t.match_request(&inv, t0 + ms(100), &mut out),
            Some(ServerMatch::Absorbed)
        );
        assert_eq!(sends(&out), 1, "final resent on retransmitted INVITE");
        out.clear();
        let ack = req("ACK sip:b@10.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKs2\r\nFrom: <sip:a@x>;tag=f1\r\nTo: <sip:b@y>;tag=tag9\r\nCall-ID: cid1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            t.match_request(&ack, t0 + ms(200), &mut out),
            Some(ServerMatch::Absorbed)
        );
        assert!(out.is_empty());
        // G no longer resends; I = T4 terminates.
        assert_eq!(sends(&step(&mut t, t0 + ms(600))), 0);
        assert!(step(&mut t, t0 + ms(5_100)).is_empty());
        let o = step(&mut t, t0 + ms(5_200));
        assert!(matches!(o.as_slice(), [TxOutput::Terminated { .. }]));
        assert!(t.is_empty());
    }

    #[test]
    fn server_invite_2xx_goes_accepted_then_l() {
        let t0 = Instant::now();
        let mut t = TransactionTable::new(TimerConfig::default(), 10);
        let inv = invite("z9hG4bKs3");
        let key = TxKey::server(&inv).unwrap();
        let mut out = Vec::new();
        t.create_server(key.clone(), true, udp(), None, &mut out)
            .unwrap();
        t.respond(
            &key,
            &message::response_to(&inv, 200, Some("t")),
            t0,
            &mut out,
        )
        .unwrap();
        out.clear();
        assert_eq!(
            t.match_request(&inv, t0 + ms(10), &mut out),
            Some(ServerMatch::Absorbed)
        );
        assert!(
            out.is_empty(),
            "RFC 6026: INVITE retransmission absorbed in Accepted"
        );
        assert!(step(&mut t, t0 + ms(31_999)).is_empty());
        assert_eq!(step(&mut t, t0 + ms(32_000)).len(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn server_non_invite_j_and_reliable() {
        let t0 = Instant::now();
        let mut t = TransactionTable::new(TimerConfig::default(), 10);
        let opt = req("OPTIONS sip:b@10.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKo1\r\nFrom: <sip:a@x>;tag=f1\r\nTo: <sip:b@y>\r\nCall-ID: cid2\r\nCSeq: 5 OPTIONS\r\nContent-Length: 0\r\n\r\n");
        let key = TxKey::server(&opt).unwrap();
        let mut out = Vec::new();
        t.create_server(key.clone(), false, udp(), None, &mut out)
            .unwrap();
        assert_eq!(
            t.match_request(&opt, t0, &mut out),
            Some(ServerMatch::Absorbed)
        );
        assert!(out.is_empty(), "Trying absorbs retransmissions silently");
        t.respond(&key, &message::response_to(&opt, 200, None), t0, &mut out)
            .unwrap();
        out.clear();
        t.match_request(&opt, t0 + ms(1), &mut out);
        assert_eq!(sends(&out), 1, "last response resent");
        assert!(step(&mut t, t0 + ms(31_999)).is_empty());
        assert_eq!(step(&mut t, t0 + ms(32_000)).len(), 1);
        assert!(t.is_empty());

        let mut out = Vec::new();
        t.create_server(key.clone(), false, tcp(), None, &mut out)
            .unwrap();
        t.respond(&key, &message::response_to(&opt, 200, None), t0, &mut out)
            .unwrap();
        assert!(t.is_empty(), "J = 0 on reliable transports");
    }

    #[test]
    fn short_t1_paces_our_timers_but_not_the_peers_window() {
        let t0 = Instant::now();
        let cfg = TimerConfig {
            t1: ms(100),
            ..TimerConfig::default()
        };
        let mut t = TransactionTable::new(cfg, 10);
        let mut out = Vec::new();
        let mut answered = |request: &rsip::Request, code: u16, tag: Option<&str>| {
            let key = TxKey::server(request).unwrap();
            let invite = request.method == rsip::Method::Invite;
            t.create_server(key.clone(), invite, udp(), None, &mut out)
                .unwrap();
            let response = message::response_to(request, code, tag);
            t.respond(&key, &response, t0, &mut out).unwrap();
            key
        };
        // Non-INVITE server: the peer (on T1 = 500 ms) retransmits for 32 s; so do we absorb.
        let bye = req("BYE sip:b@10.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKj1\r\nFrom: <sip:a@x>;tag=f1\r\nTo: <sip:b@y>;tag=t1\r\nCall-ID: cid7\r\nCSeq: 3 BYE\r\nContent-Length: 0\r\n\r\n");
        answered(&bye, 200, None);
        // INVITE server answered 2xx: Accepted (timer L) for the peer's window too.
        let inv = invite("z9hG4bKl1");
        answered(&inv, 200, Some("t"));
        // INVITE server answered 486: timer H still gives up after 64 x our T1.
        let busy_key = answered(&invite("z9hG4bKh1"), 486, Some("b"));
        // INVITE client answered 2xx: Accepted (timer M) while the callee may resend it.
        let mut out = Vec::new();
        t.send_request(invite("z9hG4bKm2"), udp(), t0, &mut out)
            .unwrap();
        let ok = resp("SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKm2\r\nFrom: <sip:a@x>;tag=f1\r\nTo: <sip:b@y>;tag=rt\r\nCall-ID: cid1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n");
        t.on_response(ok.clone(), t0, &mut out);
        let o = step(&mut t, t0 + ms(6_400));
        assert!(
            o.iter()
                .any(|x| matches!(x, TxOutput::Timeout { key } if *key == busy_key)),
            "H = 64 x 100 ms: {o:?}"
        );
        // The peer's retransmissions on its own schedule, long after 64 x 100 ms.
        for at in [7_500, 15_500, 31_500] {
            out.clear();
            assert_eq!(
                t.match_request(&bye, t0 + ms(at), &mut out),
                Some(ServerMatch::Absorbed),
                "BYE retransmission at {at} ms"
            );
            assert_eq!(sends(&out), 1, "200 resent at {at} ms");
            assert_eq!(
                t.match_request(&inv, t0 + ms(at), &mut out),
                Some(ServerMatch::Absorbed),
                "INVITE retransmission at {at} ms"
            );
            out.clear();
            t.on_response(ok.clone(), t0 + ms(at), &mut out);
            assert!(
                matches!(out.as_slice(), [TxOutput::Response { .. }]),
                "2xx retransmission at {at} ms delivered for a re-ACK: {out:?}"
            );
        }
        step(&mut t, t0 + ms(31_999));
        assert_eq!(t.len(), 3, "J, L and M still running");
        step(&mut t, t0 + ms(32_000));
        assert!(t.is_empty(), "J, L and M fire at 64 x 500 ms");
    }

    #[test]
    fn client_invite_a_b_and_ack_for_non_2xx_with_d() {
        let t0 = Instant::now();
        let mut t = TransactionTable::new(TimerConfig::default(), 10);
        let inv = invite("z9hG4bKc1");
        let mut out = Vec::new();
        let key = t.send_request(inv.clone(), udp(), t0, &mut out).unwrap();
        assert_eq!(sends(&out), 1);
        let mut fired = Vec::new();
        let mut now = t0;
        let mut timed_out = None;
        while timed_out.is_none() {
            now += ms(50);
            let o = step(&mut t, now);
            if sends(&o) > 0 {
                fired.push((now - t0).as_millis());
            }
            if o.iter().any(|x| matches!(x, TxOutput::Timeout { .. })) {
                timed_out = Some((now - t0).as_millis());
            }
        }
        assert_eq!(fired, vec![500, 1500, 3500, 7500, 15500, 31500]);
        assert_eq!(timed_out, Some(32_000));

        // Now a 486: ACK generated in the transaction, D = 32 s absorbs repeats.
        let inv = invite("z9hG4bKc2");
        let mut out = Vec::new();
        t.send_request(inv, udp(), t0, &mut out).unwrap();
        out.clear();
        let r = resp("SIP/2.0 486 Busy Here\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKc2\r\nFrom: <sip:a@x>;tag=f1\r\nTo: <sip:b@y>;tag=rt\r\nCall-ID: cid1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n");
        assert!(t.on_response(r.clone(), t0 + ms(100), &mut out));
        let ack = out.iter().find_map(|o| match o {
            TxOutput::Send { bytes, .. } => Some(String::from_utf8(bytes.clone()).unwrap()),
            _ => None,
        });
        let ack = ack.unwrap();
        assert!(ack.starts_with("ACK sip:b@10.0.0.1 SIP/2.0\r\n"));
        assert!(ack.contains("branch=z9hG4bKc2"));
        assert!(ack.contains("To: <sip:b@y>;tag=rt"));
        assert!(ack.contains("CSeq: 1 ACK"));
        assert_eq!(
            out.iter()
                .filter(|o| matches!(o, TxOutput::Response { .. }))
                .count(),
            1
        );
        out.clear();
        t.on_response(r, t0 + ms(200), &mut out);
        assert_eq!(sends(&out), 1, "ACK resent");
        assert!(
            !out.iter().any(|o| matches!(o, TxOutput::Response { .. })),
            "no duplicate TU delivery"
        );
        assert!(step(&mut t, t0 + ms(32_099)).is_empty());
        assert_eq!(step(&mut t, t0 + ms(32_100)).len(), 1);
        let _ = key;
        assert!(t.is_empty());
    }

    #[test]
    fn client_non_invite_e_f_k() {
        let t0 = Instant::now();
        let mut t = TransactionTable::new(TimerConfig::default(), 10);
        let bye = req("BYE sip:b@10.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKb1\r\nFrom: <sip:a@x>;tag=f1\r\nTo: <sip:b@y>;tag=t\r\nCall-ID: cid1\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n");
        let mut out = Vec::new();
        t.send_request(bye.clone(), udp(), t0, &mut out).unwrap();
        let mut fired = Vec::new();
        let mut now = t0;
        let mut timeout_at = None;
        while timeout_at.is_none() {
            now += ms(50);
            let o = step(&mut t, now);
            if sends(&o) > 0 {
                fired.push((now - t0).as_millis());
            }
            if o.iter().any(|x| matches!(x, TxOutput::Timeout { .. })) {
                timeout_at = Some((now - t0).as_millis());
            }
        }
        assert_eq!(&fired[..6], &[500, 1500, 3500, 7500, 11500, 15500]);
        assert_eq!(timeout_at, Some(32_000));

        // Packet loss then 200: K = T4 after the final.
        let mut out = Vec::new();
        t.send_request(bye, udp(), t0, &mut out).unwrap();
        assert_eq!(sends(&step(&mut t, t0 + ms(500))), 1);
        let ok = resp("SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKb1\r\nFrom: <sip:a@x>;tag=f1\r\nTo: <sip:b@y>;tag=t\r\nCall-ID: cid1\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n");
        let mut out = Vec::new();
        t.on_response(ok.clone(), t0 + ms(600), &mut out);
        assert_eq!(out.len(), 1);
        out.clear();
        t.on_response(ok, t0 + ms(700), &mut out);
        assert!(out.is_empty(), "retransmitted final absorbed");
        assert!(step(&mut t, t0 + ms(5_599)).is_empty());
        assert_eq!(step(&mut t, t0 + ms(5_600)).len(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn client_invite_2xx_accepted_until_m() {
        let t0 = Instant::now();
        let mut t = TransactionTable::new(TimerConfig::default(), 10);
        let mut out = Vec::new();
        t.send_request(invite("z9hG4bKm1"), udp(), t0, &mut out)
            .unwrap();
        let ok = resp("SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKm1\r\nFrom: <sip:a@x>;tag=f1\r\nTo: <sip:b@y>;tag=rt\r\nCall-ID: cid1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n");
        let mut out = Vec::new();
        t.on_response(ok.clone(), t0 + ms(100), &mut out);
        assert_eq!(out.len(), 1, "2xx delivered, no ACK from the transaction");
        out.clear();
        t.on_response(ok, t0 + ms(600), &mut out);
        assert_eq!(
            out.len(),
            1,
            "RFC 6026: retransmitted 2xx also delivered, so the TU re-ACKs"
        );
        assert_eq!(sends(&step(&mut t, t0 + ms(2_000))), 0, "timer A stopped");
        assert!(step(&mut t, t0 + ms(32_099)).is_empty());
        assert_eq!(step(&mut t, t0 + ms(32_100)).len(), 1, "timer M");
        assert!(t.is_empty());
    }

    #[test]
    fn reliable_client_has_no_retransmit_timers() {
        let t0 = Instant::now();
        let mut t = TransactionTable::new(TimerConfig::default(), 10);
        let mut out = Vec::new();
        t.send_request(invite("z9hG4bKr1"), tcp(), t0, &mut out)
            .unwrap();
        assert!(
            step(&mut t, t0 + ms(31_999)).is_empty(),
            "no timer A on TCP"
        );
        assert_eq!(step(&mut t, t0 + ms(32_000)).len(), 2, "B still applies");
    }

    #[test]
    fn rfc2543_fallback_and_limits() {
        let t0 = Instant::now();
        let mut t = TransactionTable::new(TimerConfig::default(), 1);
        let old = invite("oldbranch1");
        let key = TxKey::server(&old).unwrap();
        assert!(matches!(key, TxKey::Rfc2543 { cseq: 1, .. }));
        let mut out = Vec::new();
        t.create_server(key.clone(), true, udp(), Some(b"100".to_vec()), &mut out)
            .unwrap();
        out.clear();
        assert_eq!(
            t.match_request(&old, t0, &mut out),
            Some(ServerMatch::Absorbed)
        );
        let other = invite("z9hG4bKnew");
        let k2 = TxKey::server(&other).unwrap();
        assert_eq!(
            t.create_server(k2, true, udp(), None, &mut out),
            Err(TxError::TableFull(1))
        );
    }

    fn options(branch: &str) -> rsip::Request {
        req(&format!("OPTIONS sip:b@10.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch={branch}\r\nFrom: <sip:a@x>;tag=f1\r\nTo: <sip:b@y>\r\nCall-ID: {branch}\r\nCSeq: 5 OPTIONS\r\nContent-Length: 0\r\n\r\n"))
    }

    /// Answers a new OPTIONS statefully, as the UA does; false when the table refused it.
    fn answer_options(t: &mut TransactionTable, branch: &str, now: Instant) -> bool {
        let o = options(branch);
        let key = TxKey::server(&o).unwrap();
        let mut out = Vec::new();
        t.create_server(key.clone(), false, udp(), None, &mut out)
            .is_ok()
            && t.respond(&key, &message::response_to(&o, 200, None), now, &mut out)
                .is_ok()
    }

    #[test]
    fn answered_requests_resting_in_timer_j_do_not_hold_the_cap() {
        let t0 = Instant::now();
        let mut t = TransactionTable::new(TimerConfig::default(), 10);
        for i in 0..30 {
            assert!(
                answer_options(&mut t, &format!("z9hG4bKopt{i}"), t0),
                "OPTIONS {i} refused with {} working, {} resting",
                t.working(),
                t.resting()
            );
        }
        assert_eq!((t.working(), t.resting()), (0, 30));
        // Their retransmissions are still absorbed with the same answer.
        let mut out = Vec::new();
        assert_eq!(
            t.match_request(&options("z9hG4bKopt3"), t0 + ms(900), &mut out),
            Some(ServerMatch::Absorbed)
        );
        assert_eq!(sends(&out), 1);
        // And a new INVITE still gets a transaction.
        let inv = invite("z9hG4bKafter");
        let key = TxKey::server(&inv).unwrap();
        out.clear();
        t.create_server(key, true, udp(), None, &mut out).unwrap();
        assert_eq!(t.working(), 1);
        step(&mut t, t0 + ms(32_000));
        assert_eq!((t.working(), t.resting()), (1, 0), "timer J ends the rest");
    }

    #[test]
    fn working_transactions_still_count_and_resting_ones_are_bounded() {
        let t0 = Instant::now();
        let mut t = TransactionTable::new(TimerConfig::default(), 3);
        let mut out = Vec::new();
        for i in 0..3 {
            let key = TxKey::server(&invite(&format!("z9hG4bKw{i}"))).unwrap();
            t.create_server(key, true, udp(), None, &mut out).unwrap();
        }
        let key = TxKey::server(&invite("z9hG4bKw9")).unwrap();
        assert_eq!(
            t.create_server(key, true, udp(), None, &mut out),
            Err(TxError::TableFull(3)),
            "INVITEs waiting for the TU are work"
        );
        // Resting ones past RESTING_PER_WORKING x max: the oldest are forgotten.
        let mut t = TransactionTable::new(TimerConfig::default(), 3);
        for i in 0..20 {
            assert!(answer_options(&mut t, &format!("z9hG4bKr{i}"), t0));
        }
        assert_eq!(t.resting(), 3 * RESTING_PER_WORKING);
        assert_eq!(t.len(), 3 * RESTING_PER_WORKING);
        out.clear();
        assert_eq!(
            t.match_request(&options("z9hG4bKr0"), t0, &mut out),
            Some(ServerMatch::New(
                TxKey::server(&options("z9hG4bKr0")).unwrap()
            )),
            "the oldest was forgotten"
        );
        assert_eq!(
            t.match_request(&options("z9hG4bKr19"), t0, &mut out),
            Some(ServerMatch::Absorbed),
            "the newest is kept"
        );
    }

    #[test]
    fn acked_error_responses_rest_in_timer_i() {
        let t0 = Instant::now();
        let mut t = TransactionTable::new(TimerConfig::default(), 1);
        let inv = invite("z9hG4bKi1");
        let key = TxKey::server(&inv).unwrap();
        let mut out = Vec::new();
        t.create_server(key.clone(), true, udp(), None, &mut out)
            .unwrap();
        t.respond(&key, &message::response_to(&inv, 302, None), t0, &mut out)
            .unwrap();
        assert_eq!(t.working(), 1, "waiting for the ACK is work (timer G/H)");
        let ack = req("ACK sip:b@10.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKi1\r\nFrom: <sip:a@x>;tag=f1\r\nTo: <sip:b@y>;tag=t\r\nCall-ID: cid1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            t.match_request(&ack, t0 + ms(10), &mut out),
            Some(ServerMatch::Absorbed)
        );
        assert_eq!((t.working(), t.resting()), (0, 1));
        let next = TxKey::server(&invite("z9hG4bKi2")).unwrap();
        t.create_server(next, true, udp(), None, &mut out)
            .expect("the cap of 1 is free again");
        step(&mut t, t0 + ms(5_010));
        assert_eq!((t.working(), t.resting()), (1, 0));
    }
}
