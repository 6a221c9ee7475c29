//! The class4 fast path (`[sip] fast_path`): every routing worker thread reads a UDP socket
//! of its own (the listener's address, bound again with `SO_REUSEPORT`), and answers the
//! class4 INVITEs it receives itself: a light reading of the datagram
//! ([`crate::sip::lite`]), the general path's admission, the script in the worker's
//! sandbox, the 302 or final status sent from the same socket. No thread hop, no rsip tree,
//! no 100 Trying when the answer is immediate (RFC 3261 §17.2.1 allows that).
//!
//! Every socket of the group may receive any datagram. What a worker does not answer itself
//! (other methods, responses, in-dialog requests, class5 or unrouted INVITEs, routes with
//! Digest auth, anything outside the light reader's plain subset) goes to the SIP stack
//! unchanged, through [`Injector::deliver`], as if the stack's own UDP reader had read it.
//!
//! Retransmissions: the kernel picks a socket of the group by a hash of the datagram's
//! source and destination addresses, and the group does not change while we serve, so a
//! caller's retransmitted INVITE, its ACK and its CANCEL (same source address and port, as
//! RFC 3261 §18.1.1 requires of UDP clients) reach the worker whose table holds the
//! transaction. A caller that changed source port in between would reach another worker,
//! which does not know the branch and runs the script again; the caller's own client
//! transaction, already completed by the first final response, takes a second one as a
//! retransmission and ACKs it again, so the call still follows the first answer.

use std::{
    cell::{Cell, RefCell},
    net::SocketAddr,
    rc::Rc,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Instant,
};

use serde_json::{Map, Value as Json};
use tokio::sync::Notify;

use super::{redirect::Decision, request, Class4Server, Route};
use crate::{
    config::RouteMode,
    metrics::{metrics, Metrics},
    script::{EngineError, LocalRunner, LocalTask, Mode, RunRequest},
    sip::{
        guard::{self, SharedGuard, Verdict as GuardVerdict},
        lite::{self, Answer, Kind, Span},
        message::{self, NameAddr, Via},
        redirect_tx::{Slot, Table, TableError, Verdict},
        ua::{auto_tag, response_target, stamp_via},
        Injector, ParseLimits, SessionDescription, Target, TimerConfig, TransportKind,
    },
    udp::ReadWatchedUdp,
};

/// Finds the route of a Request-URI user (the current `[[route]]` table, reloads included).
pub type RouteLookup = Arc<dyn Fn(&str) -> Option<Arc<Route>> + Send + Sync>;
/// True while new INVITEs must be shed (`[sip] shed_lag_ms`).
pub type Overloaded = Arc<dyn Fn() -> bool + Send + Sync>;

/// Seconds a shed caller is asked to wait, as the dispatcher says.
const SHED_RETRY_AFTER_S: &str = "5";

/// Class4 calls the fast path is running (they count against `[sip] max_calls` with the
/// stack's own calls).
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// The stack's settings the fast path answers by.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `Server` header.
    pub server: String,
    /// `Retry-After` when over a limit.
    pub retry_after: u32,
    pub max_calls: usize,
    /// Transactions at work per worker (a share of `[sip] max_transactions`).
    pub max_transactions: usize,
    pub timers: TimerConfig,
    pub limits: ParseLimits,
}

/// What every worker needs; cloned into each.
#[derive(Clone)]
pub struct FastPath {
    pub class4: Class4Server,
    pub routes: RouteLookup,
    pub overloaded: Overloaded,
    pub guard: SharedGuard,
    pub injector: Injector,
    /// The stack's seed: To tags of stateless answers match the general path's.
    pub seed: u64,
    pub settings: Settings,
}

impl FastPath {
    /// Starts the fast path on each routing worker: `sockets[i]` are worker `i`'s.
    pub fn start(
        self,
        sockets: Vec<Vec<(std::net::UdpSocket, SocketAddr)>>,
    ) -> Result<(), EngineError> {
        for (index, sockets) in sockets.into_iter().enumerate() {
            let shared = self.clone();
            let task: LocalTask = Box::new(move |runner| {
                Box::pin(async move { serve_worker(index, shared, sockets, runner).await })
            });
            self.class4.engine.spawn_on(index, task)?;
        }
        Ok(())
    }
}

/// Reads, in place of a worker held by a long run, the datagrams queued on its sockets and
/// hands them to the SIP stack, which sheds them (503) or runs them on a worker that is free,
/// as without the fast path. The kernel keeps sending a held worker its share of the
/// traffic (the hash does not know it is busy); without this, those callers would wait for
/// the run to end. `spares[i]` are duplicates of worker `i`'s sockets; a worker is held once
/// its event loop is `late` or later. Runs on the SIP stack's runtime; checks every 20 ms.
pub async fn relieve_held_workers(
    engine: Arc<crate::script::Engine>,
    spares: Vec<Vec<(std::net::UdpSocket, SocketAddr)>>,
    injector: Injector,
    late: std::time::Duration,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; 65_536];
    loop {
        tick.tick().await;
        for (index, sockets) in spares.iter().enumerate() {
            if engine.worker_lag(index) < late {
                continue;
            }
            for (socket, local) in sockets {
                let mut taken = 0;
                // A bounded batch per tick: the worker may resume meanwhile.
                while taken < 1024 {
                    match socket.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            taken += 1;
                            if !injector.deliver(buf[..n].to_vec(), from, *local) {
                                return;
                            }
                        }
                        Err(_) => break, // WouldBlock: the queue is empty
                    }
                }
                if taken > 0 {
                    tracing::debug!(worker = index, taken, "read a held worker's datagrams");
                }
            }
        }
    }
}

/// One worker's state; lives on its thread.
struct Worker {
    shared: FastPath,
    runner: LocalRunner,
    sockets: Vec<(ReadWatchedUdp, SocketAddr)>,
    table: RefCell<Table>,
    /// Woken when the table's next deadline may have moved earlier.
    rearm: Notify,
    spans: RefCell<Vec<Span>>,
    /// Scratch of answers, which may be built while `spans` holds the request being read.
    answer_spans: RefCell<Vec<Span>>,
    key: RefCell<String>,
    out: RefCell<Vec<u8>>,
    next_tag: Cell<u64>,
}

async fn serve_worker(
    index: usize,
    shared: FastPath,
    sockets: Vec<(std::net::UdpSocket, SocketAddr)>,
    runner: LocalRunner,
) {
    let mut joined = Vec::with_capacity(sockets.len());
    for (socket, local) in sockets {
        match ReadWatchedUdp::from_std(socket) {
            Ok(s) => joined.push((s, local)),
            Err(e) => {
                tracing::error!(
                    worker = index,
                    "SIP fast-path socket cannot join the worker's loop: {e}"
                );
                return;
            }
        }
    }
    let max = shared.settings.limits.max_message_size;
    let cap = shared.settings.max_transactions;
    let timers = shared.settings.timers;
    let worker = Rc::new(Worker {
        next_tag: Cell::new(crate::sip::ua::splitmix(shared.seed ^ (index as u64 + 1))),
        shared,
        runner,
        sockets: joined,
        table: RefCell::new(Table::new(timers, cap)),
        rearm: Notify::new(),
        spans: RefCell::new(Vec::with_capacity(32)),
        answer_spans: RefCell::new(Vec::with_capacity(32)),
        key: RefCell::new(String::with_capacity(96)),
        out: RefCell::new(Vec::with_capacity(1024)),
    });
    for socket in 0..worker.sockets.len() {
        tokio::task::spawn_local(read_socket(worker.clone(), socket, max));
    }
    run_timers(worker).await;
}

async fn read_socket(worker: Rc<Worker>, socket: usize, max: usize) {
    // One byte more than the limit, so an oversize datagram is seen as such (and goes to
    // the general path, which answers 513).
    let mut buf = vec![0u8; max.max(65_535) + 1];
    loop {
        let received = worker.sockets[socket].0.recv_from(&mut buf).await;
        match received {
            Ok((n, from)) => worker.on_datagram(socket, &buf[..n], from),
            Err(e) => tracing::debug!(error = %e, "udp recv error"),
        }
    }
}

async fn run_timers(worker: Rc<Worker>) {
    loop {
        let next = worker.table.borrow().next_deadline();
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {
                // tokio's timers tick in whole milliseconds and may fire up to one early by
                // this clock: what fired is due, or the loop would spin until it is.
                let now = next.map_or_else(Instant::now, |at| Instant::now().max(at));
                let mut table = worker.table.borrow_mut();
                table.handle_timeout(now, |socket, to, bytes| worker.send(socket, to, bytes));
            }
            _ = worker.rearm.notified() => {}
        }
    }
}

/// The facts of a new INVITE that its answer is built from later.
struct NewCall {
    slot: Slot,
    socket: usize,
    to: SocketAddr,
    top_via: String,
    tag: String,
    /// When the INVITE arrived (the call set-up histogram).
    arrived: Instant,
}

impl Worker {
    fn send(&self, socket: usize, to: SocketAddr, bytes: &[u8]) {
        count_sent(bytes);
        let Some((s, _)) = self.sockets.get(socket) else {
            return;
        };
        if let Err(e) = s.send_to(bytes, to) {
            tracing::debug!(%to, error = %e, "udp send failed");
        }
    }

    fn forward(&self, socket: usize, bytes: &[u8], from: SocketAddr) {
        let local = self.sockets[socket].1;
        if !self.shared.injector.deliver(bytes.to_vec(), from, local) {
            tracing::debug!("SIP stack stopped; datagram dropped");
        }
    }

    fn new_tag(&self) -> String {
        let t = crate::sip::ua::splitmix(self.next_tag.get());
        self.next_tag.set(t);
        format!("{t:016x}")
    }

    fn on_datagram(self: &Rc<Self>, socket: usize, bytes: &[u8], from: SocketAddr) {
        if lite::peek(bytes).is_none() {
            return self.forward(socket, bytes, from);
        }
        let now = Instant::now();
        let mut spans = self.spans.borrow_mut();
        let req = match lite::read(bytes, &mut spans, &self.shared.settings.limits) {
            Ok(r) => r,
            Err(why) => {
                tracing::trace!(%from, "{why}");
                return self.forward(socket, bytes, from);
            }
        };
        let mut key = self.key.borrow_mut();
        if !req.transaction_id(&mut key) {
            return self.forward(socket, bytes, from);
        }
        let source = Target {
            addr: from,
            transport: TransportKind::Udp,
        };
        match req.kind {
            Kind::Ack => {
                let verdict = self.table.borrow_mut().on_ack(&key, now);
                if verdict == Verdict::Unknown {
                    return self.forward(socket, bytes, from);
                }
                metrics().sip_requests_received.inc("ACK");
            }
            Kind::Cancel => {
                let verdict = self.table.borrow_mut().on_cancel(&key);
                match verdict {
                    Verdict::Unknown => self.forward(socket, bytes, from),
                    Verdict::CancelAnswered | Verdict::CancelRunning => {
                        metrics().sip_requests_received.inc("CANCEL");
                        let Some((top, to)) = stamped(&req, source) else {
                            return;
                        };
                        let tag = auto_tag(self.shared.seed, req.call_id());
                        self.answer_stateless(socket, to, &req, &top, 200, Some(&tag), &[]);
                        if verdict == Verdict::CancelRunning {
                            self.cancel_running(&key, now);
                        }
                    }
                    _ => {}
                }
            }
            Kind::Invite => {
                {
                    let table = self.table.borrow();
                    match table.on_invite(&key) {
                        Verdict::Unknown => {}
                        Verdict::Resend { socket, to, bytes } => {
                            metrics().sip_requests_received.inc("INVITE");
                            self.send(socket, to, bytes);
                            return;
                        }
                        Verdict::Trying => {
                            metrics().sip_requests_received.inc("INVITE");
                            if let Some((top, to)) = stamped(&req, source) {
                                self.answer_stateless(socket, to, &req, &top, 100, None, &[]);
                            }
                            return;
                        }
                        _ => {
                            metrics().sip_requests_received.inc("INVITE");
                            return;
                        }
                    }
                }
                self.on_new_invite(socket, bytes, &req, &key, source, now);
            }
        }
    }

    /// A CANCEL won the race against the script: the INVITE gets 487 now.
    fn cancel_running(&self, key: &str, now: Instant) {
        let mut table = self.table.borrow_mut();
        let Some((slot, socket, to, request)) = table.cancelled(key) else {
            return;
        };
        let mut spans = Vec::new();
        let Ok(invite) = lite::read(&request, &mut spans, &self.shared.settings.limits) else {
            return;
        };
        let source = Target {
            addr: to,
            transport: TransportKind::Udp,
        };
        let Some((top, _)) = stamped(&invite, source) else {
            return;
        };
        let tag = self.new_tag();
        let mut out = Vec::new();
        lite::write_response(
            &mut out,
            &invite,
            &Answer {
                code: 487,
                reason: None,
                to_tag: Some(&tag),
                top_via: &top,
                extra: &[],
                server: &self.shared.settings.server,
            },
        );
        if table.complete(slot, out, true, now) {
            if let Some(bytes) = table.response(slot) {
                self.send(socket, to, bytes);
            }
        }
        drop(table);
        self.rearm.notify_one();
    }

    #[allow(clippy::too_many_arguments)]
    fn answer_stateless(
        &self,
        socket: usize,
        to: SocketAddr,
        req: &lite::Request<'_>,
        top_via: &str,
        code: u16,
        to_tag: Option<&str>,
        extra: &[(&str, &str)],
    ) {
        let mut out = self.out.borrow_mut();
        lite::write_response(
            &mut out,
            req,
            &Answer {
                code,
                reason: None,
                to_tag,
                top_via,
                extra,
                server: &self.shared.settings.server,
            },
        );
        self.send(socket, to, &out);
    }

    fn on_new_invite(
        self: &Rc<Self>,
        socket: usize,
        bytes: &[u8],
        req: &lite::Request<'_>,
        key: &str,
        source: Target,
        now: Instant,
    ) {
        let forward = || self.forward(socket, bytes, source.addr);
        // In-dialog (re-INVITE), Max-Forwards 0 (the general path's answer stands), a body
        // the general path would refuse: all left to it.
        if req.to_has_tag() || req.max_forwards == Some(0) || !body_acceptable(req) {
            return forward();
        }
        let dest = message::uri_user(req.uri).unwrap_or_default();
        let Some(route) = (self.shared.routes)(&dest) else {
            return forward();
        };
        if route.mode != RouteMode::Class4 || route.auth {
            return forward();
        }
        let Some((top_via, to)) = stamped(req, source) else {
            return forward();
        };
        metrics().sip_requests_received.inc("INVITE");
        let local = self.sockets[socket].1;
        let verdict = self
            .shared
            .guard
            .lock()
            .check(source, local, &rsip::Method::Invite, now);
        match verdict {
            GuardVerdict::Pass => {}
            GuardVerdict::Drop(_) => return,
            GuardVerdict::Reject {
                code, retry_after, ..
            } => {
                // Stateless, as the user agent does: a flood must not fill the table.
                let tag = auto_tag(self.shared.seed, req.call_id());
                let retry = retry_after.map(|s| s.to_string());
                let extra: Vec<(&str, &str)> =
                    retry.iter().map(|s| ("Retry-After", s.as_str())).collect();
                return self.answer_stateless(socket, to, req, &top_via, code, Some(&tag), &extra);
            }
        }
        let calls = usize::try_from(metrics().sip_dialogs.get()).unwrap_or(0)
            + RUNNING.load(Ordering::Relaxed);
        if calls >= self.shared.settings.max_calls {
            Metrics::inc(&metrics().limit_hits, "kind", "sip_max_calls");
            return self.overloaded(socket, to, req, &top_via);
        }
        let slot = match self
            .table
            .borrow_mut()
            .begin(key, socket, to, bytes.to_vec())
        {
            Ok(slot) => slot,
            Err(TableError::Full(_)) => {
                Metrics::inc(&metrics().limit_hits, "kind", "sip_max_transactions");
                return self.overloaded(socket, to, req, &top_via);
            }
            // Not reachable (looked up above); answered by the general path if it were.
            Err(TableError::Exists) => return forward(),
        };
        let call = NewCall {
            slot,
            socket,
            to,
            top_via,
            tag: self.new_tag(),
            arrived: now,
        };
        if !guard::allowed(&route.allow, source.addr.ip()) {
            Metrics::inc(&metrics().sip_rejected, "reason", "route_acl");
            return self.finish_with(call, 403, None, &[]);
        }
        if (self.shared.overloaded)() {
            tracing::debug!("script workers overloaded: 503");
            return self.finish_with(
                call,
                503,
                Some("Overloaded"),
                &[("Retry-After", SHED_RETRY_AFTER_S)],
            );
        }
        let routing = routing_data(req, &call.top_via, source);
        let class4 = &self.shared.class4;
        let prepared = class4.prepare_with(routing, &route);
        let (script, data) = match prepared {
            Ok(ready) => ready,
            Err(decision) => return self.finish(call, decision),
        };
        let ip = source.addr.ip();
        self.shared.guard.lock().call_started(ip);
        RUNNING.fetch_add(1, Ordering::Relaxed);
        let in_flight = crate::lifecycle::InFlight::begin();
        let worker = self.clone();
        tokio::task::spawn_local(async move {
            let request = RunRequest {
                script,
                mode: Mode::Class4,
                data,
                function: None,
                ctx: None,
            };
            let answered = worker.clone();
            worker
                .runner
                .run(request, move |out| {
                    let decision = answered.shared.class4.decision(&route, out.result);
                    answered.finish(call, decision);
                })
                .await;
            RUNNING.fetch_sub(1, Ordering::Relaxed);
            worker.shared.guard.lock().call_ended(ip);
            drop(in_flight);
        });
    }

    /// 503 + Retry-After, stateless, as the user agent answers over its limits.
    fn overloaded(&self, socket: usize, to: SocketAddr, req: &lite::Request<'_>, top_via: &str) {
        let tag = auto_tag(self.shared.seed, req.call_id());
        let retry = self.shared.settings.retry_after.to_string();
        self.answer_stateless(
            socket,
            to,
            req,
            top_via,
            503,
            Some(&tag),
            &[("Retry-After", retry.as_str())],
        );
    }

    /// Sends the class4 answer, as [`Class4Server`] has the user agent send it.
    fn finish(&self, call: NewCall, decision: Decision) {
        let code = match &decision {
            Decision::Redirect(_) => 302,
            Decision::Reject { code, .. } => *code,
        };
        metrics().class4_decisions.inc(code);
        match decision {
            Decision::Redirect(contacts) => {
                let extra: Vec<(&str, &str)> =
                    contacts.iter().map(|c| ("Contact", c.as_str())).collect();
                self.finish_with(call, 302, None, &extra)
            }
            Decision::Reject { code, reason } => self.finish_with(call, code, Some(&reason), &[]),
        }
    }

    /// Builds the final response from the stored INVITE and sends it (unless a CANCEL won).
    fn finish_with(&self, call: NewCall, code: u16, reason: Option<&str>, extra: &[(&str, &str)]) {
        let now = Instant::now();
        let mut table = self.table.borrow_mut();
        let Some(request) = table.request(call.slot) else {
            return; // cancelled and answered 487 meanwhile, or gone
        };
        let mut spans = self.answer_spans.borrow_mut();
        let built = lite::read(request, &mut spans, &self.shared.settings.limits).map(|invite| {
            let mut out = Vec::with_capacity(512);
            lite::write_response(
                &mut out,
                &invite,
                &Answer {
                    code,
                    reason,
                    to_tag: Some(&call.tag),
                    top_via: &call.top_via,
                    extra,
                    server: &self.shared.settings.server,
                },
            );
            out
        });
        drop(spans);
        let Ok(out) = built else {
            table.abandon(call.slot);
            return;
        };
        if table.complete(call.slot, out, false, now) {
            metrics()
                .call_setup
                .observe(now.saturating_duration_since(call.arrived));
            if let Some(bytes) = table.response(call.slot) {
                self.send(call.socket, call.to, bytes);
            }
            drop(table);
            self.rearm.notify_one();
        }
    }
}

/// The top Via stamped with `received`/`rport` and where responses go (RFC 3261 §18.2.2,
/// RFC 3581), as the user agent computes them.
fn stamped(req: &lite::Request<'_>, source: Target) -> Option<(String, SocketAddr)> {
    let mut via = Via::parse(req.top_via()).ok()?;
    stamp_via(&mut via, source);
    let to = response_target(Some(&via), source).addr;
    Some((via.to_string(), to))
}

/// False when the general path would refuse the INVITE's body (415, 400): no body, or SDP.
fn body_acceptable(req: &lite::Request<'_>) -> bool {
    if req.body.is_empty() {
        return true;
    }
    let ctype = req.header("Content-Type").unwrap_or("");
    let ctype = ctype.split(';').next().unwrap_or("").trim();
    (ctype.is_empty() || ctype.eq_ignore_ascii_case("application/sdp"))
        && SessionDescription::parse(req.body).is_ok()
}

/// `data.routing` of the INVITE, as [`request::routing_data`] builds it from the rsip tree.
fn routing_data(req: &lite::Request<'_>, top_via: &str, source: Target) -> Json {
    let user_of = |v: &str| {
        NameAddr::parse(v)
            .ok()
            .and_then(|na| message::uri_user(&na.uri))
    };
    let cli = req
        .header("P-Asserted-Identity")
        .and_then(user_of)
        .or_else(|| user_of(req.from()))
        .unwrap_or_default();
    let mut headers = Map::new();
    for (name, value) in req.headers() {
        if headers.contains_key(name) {
            continue;
        }
        let value = match name {
            "Via" => top_via.to_string(),
            "Content-Length" => req.body.len().to_string(),
            _ => value.to_string(),
        };
        headers.insert(name.to_string(), Json::String(value));
    }
    request::routing_json(
        cli,
        message::uri_user(req.uri).unwrap_or_default(),
        req.header("X-Account-ID"),
        headers,
        source.addr.ip(),
    )
}

/// Counts a response we send by its status code (read from its first line).
fn count_sent(bytes: &[u8]) {
    let code = bytes
        .strip_prefix(b"SIP/2.0 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|d| std::str::from_utf8(d).ok())
        .and_then(|d| d.parse::<u16>().ok());
    if let Some(code) = code {
        metrics().sip_responses_sent.inc(code);
    }
}
