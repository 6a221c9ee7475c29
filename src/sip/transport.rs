//! The thin tokio driver: sockets and a deadline map around the sans-IO [`UserAgent`].
//!
//! One task owns the user agent. Socket reader tasks feed it bytes; it executes the
//! agent's actions (send, arm timer, publish event) and the commands of the layer above.
//! No SIP logic lives here.

use super::framing::StreamFramer;
use super::sdp::{Direction, MediaConfig, Negotiated};
use super::tcp_guard::{read_deadline, Activity, ConnGuard, ConnTable, TcpLimits};
use super::transaction::{Target, TransportKind};
use super::ua::{
    Action, CallHandle, MessageHandle, OutboundCall, OutboundMessage, TimerId, UaConfig, UaError,
    UaEvent, UserAgent,
};
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant as TokioInstant;

/// One listening socket, written `udp:127.0.0.1:5060` or `tcp:[::1]:5060`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenSpec {
    pub transport: TransportKind,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ListenSpecError {
    #[error("listen spec {0:?} needs a transport prefix, like udp:127.0.0.1:5060")]
    MissingTransport(String),
    #[error("unknown transport {0:?} (expected udp or tcp)")]
    UnknownTransport(String),
    #[error("{0:?} is not an IP:port address (IPv6 goes in brackets: tcp:[::1]:5060)")]
    BadAddress(String),
}

impl FromStr for ListenSpec {
    type Err = ListenSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (proto, addr) = s
            .split_once(':')
            .ok_or_else(|| ListenSpecError::MissingTransport(s.to_string()))?;
        let transport = match proto.to_ascii_lowercase().as_str() {
            "udp" => TransportKind::Udp,
            "tcp" => TransportKind::Tcp,
            _ if proto.parse::<std::net::IpAddr>().is_ok() || proto.starts_with('[') => {
                return Err(ListenSpecError::MissingTransport(s.to_string()))
            }
            _ => return Err(ListenSpecError::UnknownTransport(proto.to_string())),
        };
        let addr = addr
            .parse()
            .map_err(|_| ListenSpecError::BadAddress(addr.to_string()))?;
        Ok(Self { transport, addr })
    }
}

impl std::fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.transport {
            TransportKind::Udp => "udp",
            TransportKind::Tcp => "tcp",
        };
        write!(f, "{p}:{}", self.addr)
    }
}

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("cannot bind {spec}: {source}")]
    Bind {
        spec: ListenSpec,
        source: std::io::Error,
    },
    #[error("no listen spec given")]
    NothingToListen,
    #[error("the SIP driver has stopped")]
    Stopped,
    #[error(transparent)]
    Ua(#[from] UaError),
}

enum Command {
    Invite(Box<OutboundCall>, Reply<CallHandle>),
    Ring(CallHandle, Option<MediaConfig>, Reply<Option<Negotiated>>),
    Answer(
        CallHandle,
        MediaConfig,
        Vec<(String, String)>,
        Reply<Option<Negotiated>>,
    ),
    Reject(
        CallHandle,
        u16,
        Option<String>,
        Vec<(String, String)>,
        Reply<()>,
    ),
    Redirect(CallHandle, Vec<String>, Reply<()>),
    Hangup(CallHandle, Vec<(String, String)>, Reply<()>),
    /// The reply waits for the MESSAGE's final status.
    Message(Box<OutboundMessage>, Reply<u16>),
    Refer(CallHandle, String, Reply<()>),
    Reoffer(CallHandle, Direction, Reply<()>),
    NotifyTransfer(CallHandle, u16, String, Reply<()>),
    Guard(Box<super::guard::GuardPolicy>),
    Drain(bool),
    Shutdown,
}

type Reply<T> = oneshot::Sender<Result<T, UaError>>;

enum Input {
    Message {
        bytes: Vec<u8>,
        source: Target,
        local: SocketAddr,
    },
    Connected {
        peer: SocketAddr,
        writer: mpsc::UnboundedSender<Vec<u8>>,
    },
    Disconnected {
        peer: SocketAddr,
    },
}

/// Commands for the layer above; cheap to clone.
#[derive(Clone, Debug)]
pub struct SipHandle {
    commands: mpsc::UnboundedSender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl SipHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, TransportError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .map_err(|_| TransportError::Stopped)?;
        Ok(rx.await.map_err(|_| TransportError::Stopped)??)
    }

    /// Sends an out-of-dialog MESSAGE and waits for its final status (408 when unanswered).
    pub async fn message(&self, message: OutboundMessage) -> Result<u16, TransportError> {
        self.call(|r| Command::Message(Box::new(message), r)).await
    }

    /// Places an outbound call; progress comes as `CallProgress`/`CallAnswered`/`CallEnded`.
    /// `call.local` defaults to this stack's listener for the target's transport.
    pub async fn invite(&self, call: OutboundCall) -> Result<CallHandle, TransportError> {
        self.call(|r| Command::Invite(Box::new(call), r)).await
    }

    /// 180 Ringing, or 183 with early-media SDP when `media` is given.
    pub async fn ring(
        &self,
        call: CallHandle,
        media: Option<MediaConfig>,
    ) -> Result<Option<Negotiated>, TransportError> {
        self.call(|r| Command::Ring(call, media, r)).await
    }

    /// 200 OK with our SDP; see [`UserAgent::answer`].
    pub async fn answer(
        &self,
        call: CallHandle,
        media: MediaConfig,
    ) -> Result<Option<Negotiated>, TransportError> {
        self.call(|r| Command::Answer(call, media, Vec::new(), r))
            .await
    }

    /// 200 OK with our SDP and extra headers (invalid or core-owned names are dropped).
    pub async fn answer_with_headers(
        &self,
        call: CallHandle,
        media: MediaConfig,
        headers: Vec<(String, String)>,
    ) -> Result<Option<Negotiated>, TransportError> {
        self.call(|r| Command::Answer(call, media, headers, r))
            .await
    }

    /// A 3xx–6xx final response with optional reason phrase and extra headers.
    pub async fn reject(
        &self,
        call: CallHandle,
        code: u16,
        reason: Option<String>,
        headers: Vec<(String, String)>,
    ) -> Result<(), TransportError> {
        self.call(|r| Command::Reject(call, code, reason, headers, r))
            .await
    }

    /// [`reject`](Self::reject) without waiting for the driver's answer, callable from any
    /// thread; `Err` only when the stack has stopped. A call that ended meanwhile (a CANCEL
    /// won the race) is skipped by the user agent, as with `reject`.
    pub fn reject_detached(
        &self,
        call: CallHandle,
        code: u16,
        reason: Option<String>,
        headers: Vec<(String, String)>,
    ) -> Result<(), TransportError> {
        let (reply, _) = oneshot::channel();
        self.commands
            .send(Command::Reject(call, code, reason, headers, reply))
            .map_err(|_| TransportError::Stopped)
    }

    /// 302 with one Contact per URI.
    pub async fn redirect(
        &self,
        call: CallHandle,
        contacts: Vec<String>,
    ) -> Result<(), TransportError> {
        self.call(|r| Command::Redirect(call, contacts, r)).await
    }

    /// BYE (or 480 if not answered yet).
    pub async fn hangup(&self, call: CallHandle) -> Result<(), TransportError> {
        self.call(|r| Command::Hangup(call, Vec::new(), r)).await
    }

    /// BYE (or the final response / CANCEL `hangup` would send), with extra BYE headers.
    pub async fn hangup_with_headers(
        &self,
        call: CallHandle,
        headers: Vec<(String, String)>,
    ) -> Result<(), TransportError> {
        self.call(|r| Command::Hangup(call, headers, r)).await
    }

    /// Re-INVITEs an established call offering our media with `direction` (passing a hold
    /// across a bridge, and taking it back with `sendrecv`).
    pub async fn reoffer(
        &self,
        call: CallHandle,
        direction: Direction,
    ) -> Result<(), TransportError> {
        self.call(|r| Command::Reoffer(call, direction, r)).await
    }

    /// Blind transfer: sends a REFER to `refer_to` on an established call. Returns once it
    /// is sent; its final response comes as `ReferResponse`, progress as `TransferNotify`.
    pub async fn refer(&self, call: CallHandle, refer_to: String) -> Result<(), TransportError> {
        self.call(|r| Command::Refer(call, refer_to, r)).await
    }

    /// Reports the progress of a transfer the peer asked for (after an `InDialogRequest` of
    /// kind `Refer`, which needs `UaConfig::accept_refer`): a sipfrag NOTIFY
    /// `SIP/2.0 {code} {reason}`; a final code ends the subscription.
    pub async fn notify_transfer(
        &self,
        call: CallHandle,
        code: u16,
        reason: String,
    ) -> Result<(), TransportError> {
        self.call(|r| Command::NotifyTransfer(call, code, reason, r))
            .await
    }

    /// Stops the driver task.
    /// Replaces the source ACL and per-source limits; live calls are not touched.
    pub fn set_guard(&self, policy: super::guard::GuardPolicy) {
        let _ = self.commands.send(Command::Guard(Box::new(policy)));
    }

    /// Starts (or stops) draining: new INVITEs and OPTIONS get 503 with `Retry-After`.
    pub fn set_draining(&self, draining: bool) {
        let _ = self.commands.send(Command::Drain(draining));
    }

    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
    }
}

/// A running SIP stack: its command handle, its event stream and its bound addresses.
#[derive(Debug)]
pub struct SipTransport {
    pub handle: SipHandle,
    /// Unbounded so the driver never blocks on a slow consumer; consume it promptly.
    pub events: mpsc::UnboundedReceiver<UaEvent>,
    /// Actual bound addresses (ephemeral ports resolved).
    pub local_addrs: Vec<ListenSpec>,
    pub task: tokio::task::JoinHandle<()>,
    /// With [`start_fast`]: the UDP sockets for the fast path's workers, and what they need
    /// to hand datagrams to this stack.
    pub fast: Option<FastUdp>,
}

/// The UDP side of the class4 fast path (`[sip] fast_path`): for every worker, one socket per
/// UDP listener, all bound to the listener's address with `SO_REUSEPORT`, so the kernel
/// spreads datagrams over them by a hash of their addresses. The stack itself reads no UDP
/// socket then: whatever a worker does not answer itself it gives to [`Injector::deliver`].
#[derive(Debug)]
pub struct FastUdp {
    /// `sockets[worker]`: (socket, its listener's bound address), in listener order.
    pub sockets: Vec<Vec<(std::net::UdpSocket, SocketAddr)>>,
    /// The same sockets again (duplicated descriptors of the same sockets, not new members
    /// of the group), for whoever reads a held worker's queue in its place.
    pub spares: Vec<Vec<(std::net::UdpSocket, SocketAddr)>>,
    pub injector: Injector,
    /// The guard the user agent consults, shared so both paths keep one set of counters.
    pub guard: super::guard::SharedGuard,
    /// The stack's seed, for To tags derived from a Call-ID ([`super::ua::auto_tag`]).
    pub seed: u64,
}

/// Feeds datagrams to the stack as if its own UDP reader had received them; any thread.
#[derive(Debug, Clone)]
pub struct Injector(mpsc::UnboundedSender<Input>);

impl Injector {
    /// One datagram from `from`, received on the listener bound to `local`. `false` once
    /// the stack has stopped.
    pub fn deliver(&self, bytes: Vec<u8>, from: SocketAddr, local: SocketAddr) -> bool {
        self.0
            .send(Input::Message {
                bytes,
                source: Target {
                    addr: from,
                    transport: TransportKind::Udp,
                },
                local,
            })
            .is_ok()
    }
}

/// Binds a UDP socket that other sockets of this process can share the address with
/// (`SO_REUSEPORT`); non-blocking, for tokio.
pub fn bind_shared_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // A worker reads its socket between script runs, not on a thread of its own: a larger
    // queue rides out a few milliseconds without a read (a busy machine) instead of dropping
    // datagrams the callers must then retransmit. The kernel caps it at net.core.rmem_max.
    if let Err(e) = socket.set_recv_buffer_size(FAST_RECV_BUFFER) {
        tracing::debug!("SO_RCVBUF not raised: {e}");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The receive queue asked for each fast-path socket (bytes; Linux counts its bookkeeping in it).
const FAST_RECV_BUFFER: usize = 4 << 20;

/// `workers` sockets sharing `addr` (port 0: the first one picks the port). A port given
/// explicitly is first bound plainly and released, so that another process holding it (even
/// with `SO_REUSEPORT`, which would otherwise let us join its group silently) fails loudly.
fn bind_udp_group(addr: SocketAddr, workers: usize) -> std::io::Result<Vec<std::net::UdpSocket>> {
    if addr.port() != 0 {
        drop(std::net::UdpSocket::bind(addr)?);
    }
    let first = bind_shared_udp(addr)?;
    let bound = first.local_addr()?;
    let mut group = vec![first];
    for _ in 1..workers.max(1) {
        group.push(bind_shared_udp(bound)?);
    }
    Ok(group)
}

/// How the stack sends on a UDP listener: its own socket, or (fast path) a duplicate of a
/// worker's socket that is never read nor registered with an event loop, so datagrams
/// arriving for the workers do not wake this thread.
enum UdpOut {
    Owned(Arc<UdpSocket>),
    Shared(std::net::UdpSocket),
}

fn random_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Binds every spec and starts the driver. `cfg.seed` is replaced with a random one.
pub async fn start(specs: &[ListenSpec], cfg: UaConfig) -> Result<SipTransport, TransportError> {
    start_with(specs, cfg, TcpLimits::default()).await
}

/// [`start`] with the TCP connection limits given.
pub async fn start_with(
    specs: &[ListenSpec],
    cfg: UaConfig,
    tcp_limits: TcpLimits,
) -> Result<SipTransport, TransportError> {
    start_fast(specs, cfg, tcp_limits, 0).await
}

/// [`start_with`], and with `fast_workers > 0` every UDP listener is bound once per fast-path
/// worker instead of being read by the stack (see [`FastUdp`]).
pub async fn start_fast(
    specs: &[ListenSpec],
    mut cfg: UaConfig,
    tcp_limits: TcpLimits,
    fast_workers: usize,
) -> Result<SipTransport, TransportError> {
    if specs.is_empty() {
        return Err(TransportError::NothingToListen);
    }
    cfg.seed = random_seed();
    if cfg.advertised_addr.is_none() {
        for spec in specs {
            if spec.transport == TransportKind::Udp && spec.addr.ip().is_unspecified() {
                tracing::warn!(%spec, "UDP bound to a wildcard address without advertised_addr: Via/Contact will carry an unroutable address");
            }
        }
    }
    let max_message = cfg.limits.max_message_size;
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    // Bind everything before spawning anything, so a failed bind leaves nothing running.
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    let mut local_addrs = Vec::new();
    let mut fast_sockets: Vec<Vec<(std::net::UdpSocket, SocketAddr)>> = Vec::new();
    let mut spares: Vec<Vec<(std::net::UdpSocket, SocketAddr)>> = Vec::new();
    for spec in specs {
        let bind_err = |source| TransportError::Bind {
            spec: *spec,
            source,
        };
        match spec.transport {
            TransportKind::Udp if fast_workers > 0 => {
                let group = bind_udp_group(spec.addr, fast_workers).map_err(bind_err)?;
                let addr = group[0].local_addr().map_err(bind_err)?;
                let sender = group[0].try_clone().map_err(bind_err)?;
                local_addrs.push(ListenSpec {
                    transport: TransportKind::Udp,
                    addr,
                });
                udp.push((UdpOut::Shared(sender), addr));
                for (worker, socket) in group.into_iter().enumerate() {
                    if fast_sockets.len() <= worker {
                        fast_sockets.push(Vec::new());
                        spares.push(Vec::new());
                    }
                    spares[worker].push((socket.try_clone().map_err(bind_err)?, addr));
                    fast_sockets[worker].push((socket, addr));
                }
            }
            TransportKind::Udp => {
                let sock = Arc::new(UdpSocket::bind(spec.addr).await.map_err(bind_err)?);
                let addr = sock.local_addr().map_err(bind_err)?;
                local_addrs.push(ListenSpec {
                    transport: TransportKind::Udp,
                    addr,
                });
                udp.push((UdpOut::Owned(sock), addr));
            }
            TransportKind::Tcp => {
                let listener = TcpListener::bind(spec.addr).await.map_err(bind_err)?;
                let addr = listener.local_addr().map_err(bind_err)?;
                local_addrs.push(ListenSpec {
                    transport: TransportKind::Tcp,
                    addr,
                });
                tcp.push(listener);
            }
        }
    }
    let mut sockets = Vec::new();
    for (sock, addr) in &udp {
        if let UdpOut::Owned(sock) = sock {
            let reader = udp_reader(sock.clone(), *addr, max_message, in_tx.clone());
            sockets.push(tokio::spawn(reader));
        }
    }
    let fast = (!fast_sockets.is_empty()).then(|| FastUdp {
        sockets: fast_sockets,
        spares,
        injector: Injector(in_tx.clone()),
        guard: super::guard::SharedGuard::default(),
        seed: cfg.seed,
    });
    for listener in tcp {
        sockets.push(tokio::spawn(tcp_acceptor(
            listener,
            max_message,
            ConnTable::new(tcp_limits),
            in_tx.clone(),
        )));
    }
    let ua = UserAgent::new(cfg);
    let fast = fast.map(|f| FastUdp {
        guard: ua.shared_guard(),
        ..f
    });
    let driver = Driver {
        ua,
        listeners: local_addrs.clone(),
        udp,
        conns: HashMap::new(),
        deadlines: BTreeMap::new(),
        pending_messages: std::collections::HashMap::new(),
        events: ev_tx,
        inputs: in_tx,
        max_message,
        tcp_limits,
        sockets,
    };
    let task = tokio::spawn(driver.run(in_rx, cmd_rx));
    Ok(SipTransport {
        handle: SipHandle { commands: cmd_tx },
        events: ev_rx,
        local_addrs,
        task,
        fast,
    })
}

async fn udp_reader(
    sock: Arc<UdpSocket>,
    local: SocketAddr,
    max: usize,
    out: mpsc::UnboundedSender<Input>,
) {
    // One byte more than the limit so oversize datagrams reach the parser and get 513.
    let mut buf = vec![0u8; max.max(65_535) + 1];
    loop {
        match sock.recv_from(&mut buf).await {
            Ok((n, from)) => {
                let input = Input::Message {
                    bytes: buf[..n].to_vec(),
                    source: Target {
                        addr: from,
                        transport: TransportKind::Udp,
                    },
                    local,
                };
                if out.send(input).is_err() {
                    return;
                }
            }
            // ICMP port-unreachable surfaces as an error on some platforms; keep reading.
            Err(e) => tracing::debug!(error = %e, "udp recv error"),
        }
    }
}

async fn tcp_acceptor(
    listener: TcpListener,
    max: usize,
    table: Arc<ConnTable>,
    out: mpsc::UnboundedSender<Input>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let guard = match table.admit(peer.ip()) {
                    Ok(guard) => guard,
                    Err(e) => {
                        tracing::debug!(%peer, "TCP connection refused: {e}");
                        drop(stream);
                        continue;
                    }
                };
                let (limits, out) = (table.limits(), out.clone());
                tokio::spawn(tcp_connection(stream, peer, max, limits, Some(guard), out));
            }
            Err(e) => {
                tracing::warn!(error = %e, "tcp accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads one connection until it closes, goes idle, is too slow with a message or is told to
/// make room. `guard` is the accepted connection's place in its listener's table (`None` for
/// connections we opened: they have no cap, and no first-message deadline).
async fn tcp_connection(
    stream: TcpStream,
    peer: SocketAddr,
    max: usize,
    limits: TcpLimits,
    guard: Option<ConnGuard>,
    out: mpsc::UnboundedSender<Input>,
) {
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let (activity, close) = match &guard {
        Some(g) => (g.activity.clone(), Some(g.close.clone())),
        None => (Arc::new(Activity::starting_now()), None),
    };
    let (mut rd, mut wr) = stream.into_split();
    let (wtx, mut wrx) = mpsc::unbounded_channel::<Vec<u8>>();
    if out.send(Input::Connected { peer, writer: wtx }).is_err() {
        return;
    }
    let written = activity.clone();
    tokio::spawn(async move {
        while let Some(bytes) = wrx.recv().await {
            // Touched before writing: the peer can react to these bytes before this task
            // runs again, and a connection that answered later must look younger than this
            // one (a late touch made the longest-idle choice pick the wrong connection). A
            // write stuck on a peer that does not read does not count as activity.
            written.touch();
            if wr.write_all(&bytes).await.is_err() {
                break;
            }
        }
    });
    let mut framer = StreamFramer::new(max);
    let mut buf = vec![0u8; 16 * 1024];
    // A new inbound connection owes us its first message within the message timeout.
    let mut partial_since = guard.as_ref().map(|_| std::time::Instant::now());
    let closed = async {
        match &close {
            Some(c) => c.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(closed);
    'read: loop {
        let deadline = read_deadline(&limits, activity.last(), partial_since);
        let n = tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = tokio::time::sleep_until(deadline.into()) => {
                let now = std::time::Instant::now();
                if read_deadline(&limits, activity.last(), partial_since) > now {
                    continue; // our own writes kept it alive
                }
                let why = if partial_since.is_some_and(|t| t + limits.message_timeout <= now) {
                    "message not completed in time"
                } else {
                    "idle"
                };
                tracing::debug!(%peer, "closing TCP connection: {why}");
                break;
            }
            _ = &mut closed => break,
        };
        activity.touch();
        framer.push(&buf[..n]);
        let mut completed = false;
        loop {
            match framer.next_message() {
                Ok(Some(bytes)) => {
                    completed = true;
                    let source = Target {
                        addr: peer,
                        transport: TransportKind::Tcp,
                    };
                    if out
                        .send(Input::Message {
                            bytes,
                            source,
                            local,
                        })
                        .is_err()
                    {
                        break 'read;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "closing TCP connection");
                    break 'read;
                }
            }
        }
        partial_since = match (framer.buffered() > 0, completed) {
            (false, _) => None,
            (true, true) => Some(std::time::Instant::now()),
            (true, false) => partial_since.or_else(|| Some(std::time::Instant::now())),
        };
    }
    let _ = out.send(Input::Disconnected { peer });
    drop(guard);
}

struct Driver {
    ua: UserAgent,
    listeners: Vec<ListenSpec>,
    /// With their local addresses, known at bind time (no getsockname per send).
    udp: Vec<(UdpOut, SocketAddr)>,
    conns: HashMap<SocketAddr, mpsc::UnboundedSender<Vec<u8>>>,
    deadlines: BTreeMap<std::time::Instant, TimerId>,
    events: mpsc::UnboundedSender<UaEvent>,
    /// MESSAGEs whose senders wait for the final status.
    pending_messages: std::collections::HashMap<MessageHandle, Reply<u16>>,
    inputs: mpsc::UnboundedSender<Input>,
    max_message: usize,
    /// Idle and slow-message deadlines of the connections we open.
    tcp_limits: TcpLimits,
    /// Reader and acceptor tasks, stopped with the driver so the ports are released.
    sockets: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        for t in &self.sockets {
            t.abort();
        }
    }
}

fn now() -> std::time::Instant {
    TokioInstant::now().into_std()
}

impl Driver {
    async fn run(
        mut self,
        mut inputs: mpsc::UnboundedReceiver<Input>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) {
        loop {
            let sleep_until = self
                .deadlines
                .keys()
                .next()
                .map(|at| TokioInstant::from_std(*at));
            tokio::select! {
                Some(input) = inputs.recv() => self.on_input(input),
                cmd = commands.recv() => match cmd {
                    Some(Command::Shutdown) | None => return,
                    Some(cmd) => self.on_command(cmd),
                },
                _ = sleep(sleep_until) => {
                    let now = now();
                    while let Some((&at, _)) = self.deadlines.iter().next() {
                        if at > now {
                            break;
                        }
                        self.deadlines.remove(&at);
                    }
                    self.ua.handle_timeout(now);
                }
            }
            self.flush().await;
        }
    }

    fn on_input(&mut self, input: Input) {
        match input {
            Input::Message {
                bytes,
                source,
                local,
            } => self.ua.handle_input(&bytes, source, local, now()),
            Input::Connected { peer, writer } => {
                self.conns.insert(peer, writer);
            }
            Input::Disconnected { peer } => {
                self.conns.remove(&peer);
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        let t = now();
        match cmd {
            Command::Invite(mut oc, r) => {
                if oc.local.is_none() {
                    oc.local = self
                        .listeners
                        .iter()
                        .find(|l| l.transport == oc.target.transport)
                        .map(|l| l.addr);
                }
                let _ = r.send(self.ua.invite(*oc, t));
            }
            Command::Ring(c, m, r) => {
                let _ = r.send(self.ua.ring(c, m.as_ref(), t));
            }
            Command::Answer(c, m, h, r) => {
                let _ = r.send(self.ua.answer_with_headers(c, &m, &h, t));
            }
            Command::Reject(c, code, reason, h, r) => {
                let _ = r.send(self.ua.reject(c, code, reason.as_deref(), &h, t));
            }
            Command::Redirect(c, contacts, r) => {
                let _ = r.send(self.ua.redirect(c, &contacts, t));
            }
            Command::Hangup(c, headers, r) => {
                let _ = r.send(self.ua.hangup_with_headers(c, headers, t));
            }
            Command::Message(mut m, r) => {
                if m.local.is_none() {
                    m.local = self
                        .listeners
                        .iter()
                        .find(|l| l.transport == m.target.transport)
                        .map(|l| l.addr);
                }
                match self.ua.message(*m, t) {
                    Ok(handle) => {
                        self.pending_messages.insert(handle, r);
                    }
                    Err(e) => {
                        let _ = r.send(Err(e));
                    }
                }
            }
            Command::Refer(c, refer_to, r) => {
                let _ = r.send(self.ua.refer(c, &refer_to, t));
            }
            Command::Reoffer(c, direction, r) => {
                let _ = r.send(self.ua.reoffer_direction(c, direction, t));
            }
            Command::NotifyTransfer(c, code, reason, r) => {
                let _ = r.send(self.ua.notify_transfer(c, code, &reason, t));
            }
            Command::Guard(policy) => self.ua.set_guard_policy(*policy),
            Command::Drain(on) => self.ua.set_draining(on),
            Command::Shutdown => {}
        }
    }

    async fn flush(&mut self) {
        while let Some(action) = self.ua.poll_action() {
            match action {
                Action::Send {
                    to,
                    transport,
                    bytes,
                } => self.send(to, transport, bytes).await,
                Action::ArmTimer { at, id } => {
                    self.deadlines.insert(at, id);
                }
                Action::Event(UaEvent::MessageResult { message, code }) => {
                    if let Some(r) = self.pending_messages.remove(&message) {
                        let _ = r.send(Ok(code));
                    }
                }
                Action::Event(ev) => {
                    if self.events.send(ev).is_err() {
                        tracing::debug!("SIP event receiver dropped");
                    }
                }
            }
        }
    }

    async fn send(&mut self, to: SocketAddr, transport: TransportKind, bytes: Vec<u8>) {
        match transport {
            TransportKind::Udp => {
                let sock = self
                    .udp
                    .iter()
                    .find(|(_, local)| local.is_ipv4() == to.is_ipv4())
                    .or(self.udp.first())
                    .map(|(s, _)| s);
                let sent = match sock {
                    Some(UdpOut::Owned(s)) => s.send_to(&bytes, to).await.map(drop),
                    Some(UdpOut::Shared(s)) => send_shared(s, &bytes, to).await,
                    None => {
                        tracing::warn!(%to, "no UDP socket to send from");
                        Ok(())
                    }
                };
                if let Err(e) = sent {
                    tracing::debug!(%to, error = %e, "udp send failed");
                }
            }
            TransportKind::Tcp => {
                if let Some(w) = self.conns.get(&to) {
                    if w.send(bytes).is_ok() {
                        return;
                    }
                    self.conns.remove(&to);
                    return;
                }
                // No connection (closed, or a new destination): connect in the background.
                let inputs = self.inputs.clone();
                let (max, limits) = (self.max_message, self.tcp_limits);
                tokio::spawn(async move {
                    match TcpStream::connect(to).await {
                        Ok(mut stream) => {
                            if stream.write_all(&bytes).await.is_ok() {
                                tcp_connection(stream, to, max, limits, None, inputs).await;
                            }
                        }
                        Err(e) => tracing::warn!(%to, error = %e, "tcp connect failed"),
                    }
                });
            }
        }
    }
}

/// Sends on a non-blocking socket no event loop watches: a full send buffer (rare for UDP)
/// is waited out in short sleeps, a few times, before the datagram is given up.
async fn send_shared(
    socket: &std::net::UdpSocket,
    bytes: &[u8],
    to: SocketAddr,
) -> std::io::Result<()> {
    let mut tries = 0;
    loop {
        match socket.send_to(bytes, to) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && tries < 5 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn sleep(until: Option<TokioInstant>) {
    match until {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs() {
        let s: ListenSpec = "udp:127.0.0.1:5060".parse().unwrap();
        assert_eq!(s.transport, TransportKind::Udp);
        assert_eq!(s.to_string(), "udp:127.0.0.1:5060");
        let s: ListenSpec = "TCP:[::1]:5070".parse().unwrap();
        assert_eq!(s.transport, TransportKind::Tcp);
        assert_eq!(s.addr, "[::1]:5070".parse().unwrap());
        assert!(matches!(
            "127.0.0.1:5060".parse::<ListenSpec>(),
            Err(ListenSpecError::MissingTransport(_))
        ));
        assert!(matches!(
            "sctp:127.0.0.1:5060".parse::<ListenSpec>(),
            Err(ListenSpecError::UnknownTransport(_))
        ));
        assert!(matches!(
            "udp:localhost".parse::<ListenSpec>(),
            Err(ListenSpecError::BadAddress(_))
        ));
    }

    fn options(branch: &str, transport: &str, from: SocketAddr) -> String {
        format!(
            "OPTIONS sip:{from} SIP/2.0\r\nVia: SIP/2.0/{transport} {from};branch={branch};rport\r\nFrom: <sip:test@{from}>;tag=t1\r\nTo: <sip:callforge@{from}>\r\nCall-ID: {branch}@test\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
    }

    #[tokio::test]
    async fn options_over_udp_and_tcp_get_200() {
        let specs: Vec<ListenSpec> = vec![
            "udp:127.0.0.1:0".parse().unwrap(),
            "tcp:127.0.0.1:0".parse().unwrap(),
        ];
        let sip = start(&specs, UaConfig::default()).await.unwrap();
        let udp_addr = sip.local_addrs[0].addr;
        let tcp_addr = sip.local_addrs[1].addr;

        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let me = client.local_addr().unwrap();
        client
            .send_to(options("z9hG4bKudp1", "UDP", me).as_bytes(), udp_addr)
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let (n, _) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.recv_from(&mut buf),
        )
        .await
        .expect("udp reply in time")
        .unwrap();
        let reply = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(reply.starts_with("SIP/2.0 200 OK\r\n"), "{reply}");
        assert!(reply.contains(&format!("rport={}", me.port())));

        let mut tcp = TcpStream::connect(tcp_addr).await.unwrap();
        let me = tcp.local_addr().unwrap();
        // Split the request across two writes to exercise framing on the server.
        let req = options("z9hG4bKtcp1", "TCP", me);
        let (a, b) = req.as_bytes().split_at(30);
        tcp.write_all(a).await.unwrap();
        tcp.flush().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        tcp.write_all(b).await.unwrap();
        let mut got = Vec::new();
        let reply = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                let n = tcp.read(&mut buf).await.unwrap();
                assert!(n > 0, "connection closed early");
                got.extend_from_slice(&buf[..n]);
                let mut f = StreamFramer::new(65_535);
                f.push(&got);
                if let Ok(Some(m)) = f.next_message() {
                    return String::from_utf8_lossy(&m).to_string();
                }
            }
        })
        .await
        .expect("tcp reply in time");
        assert!(reply.starts_with("SIP/2.0 200 OK\r\n"), "{reply}");
        assert!(reply.contains("Allow: INVITE"));
        sip.handle.shutdown();
    }

    #[tokio::test]
    async fn bind_errors_name_the_spec() {
        let first = start(&["tcp:127.0.0.1:0".parse().unwrap()], UaConfig::default())
            .await
            .unwrap();
        let taken = first.local_addrs[0];
        let err = start(&[taken], UaConfig::default()).await.unwrap_err();
        assert!(
            err.to_string().starts_with(&format!("cannot bind {taken}")),
            "{err}"
        );
        assert!(matches!(
            start(&[], UaConfig::default()).await,
            Err(TransportError::NothingToListen)
        ));
        first.handle.shutdown();
    }

    #[tokio::test]
    async fn invite_event_and_command_round_trip() {
        let sip = start(&["udp:127.0.0.1:0".parse().unwrap()], UaConfig::default())
            .await
            .unwrap();
        let SipTransport {
            handle,
            mut events,
            local_addrs,
            ..
        } = sip;
        let server = local_addrs[0].addr;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let me = client.local_addr().unwrap();
        let invite = format!(
            "INVITE sip:1000@{server} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKi1\r\nFrom: <sip:a@{me}>;tag=a\r\nTo: <sip:1000@{server}>\r\nCall-ID: inv1\r\nCSeq: 1 INVITE\r\nContact: <sip:a@{me}>\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        );
        client.send_to(invite.as_bytes(), server).await.unwrap();
        let ev = tokio::time::timeout(std::time::Duration::from_secs(5), events.recv())
            .await
            .unwrap()
            .unwrap();
        let UaEvent::IncomingCall(ic) = ev else {
            panic!("{ev:?}")
        };
        let call = ic.call;
        handle
            .redirect(call, vec!["sip:1000@gw.example".into()])
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let mut codes = Vec::new();
        while !codes.contains(&302) {
            let (n, _) = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                client.recv_from(&mut buf),
            )
            .await
            .unwrap()
            .unwrap();
            let s = String::from_utf8_lossy(&buf[..n]).to_string();
            codes.push(s[8..11].parse::<u16>().unwrap());
        }
        assert_eq!(codes, vec![100, 302]);
        assert!(matches!(
            handle
                .answer(call, MediaConfig::new("127.0.0.1".parse().unwrap(), 4000))
                .await,
            Err(TransportError::Ua(UaError::UnknownCall))
        ));
        handle.shutdown();
    }

    async fn read_msg(tcp: &mut TcpStream, framer: &mut StreamFramer) -> String {
        let mut buf = vec![0u8; 4096];
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                if let Ok(Some(m)) = framer.next_message() {
                    return String::from_utf8_lossy(&m).to_string();
                }
                let n = tcp.read(&mut buf).await.unwrap();
                assert!(n > 0, "connection closed");
                framer.push(&buf[..n]);
            }
        })
        .await
        .expect("message in time")
    }

    #[tokio::test]
    async fn tcp_call_answer_ack_and_local_bye_on_the_same_connection() {
        let sip = start(&["tcp:127.0.0.1:0".parse().unwrap()], UaConfig::default())
            .await
            .unwrap();
        let SipTransport {
            handle,
            mut events,
            local_addrs,
            ..
        } = sip;
        let server = local_addrs[0].addr;
        let mut tcp = TcpStream::connect(server).await.unwrap();
        let me = tcp.local_addr().unwrap();
        let sdp = "v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 4000 RTP/AVP 8 0\r\n";
        let invite = format!(
            "INVITE sip:1000@{server} SIP/2.0\r\nVia: SIP/2.0/TCP {me};branch=z9hG4bKt1\r\nFrom: <sip:a@{me}>;tag=a\r\nTo: <sip:1000@{server}>\r\nCall-ID: tcp1\r\nCSeq: 1 INVITE\r\nContact: <sip:a@{me};transport=tcp>\r\nMax-Forwards: 70\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
            sdp.len()
        );
        tcp.write_all(invite.as_bytes()).await.unwrap();
        let mut framer = StreamFramer::new(65_535);
        assert!(read_msg(&mut tcp, &mut framer)
            .await
            .starts_with("SIP/2.0 100 Trying"));
        let Some(UaEvent::IncomingCall(ic)) = events.recv().await else {
            panic!("no call")
        };
        let mut media = MediaConfig::new("127.0.0.1".parse().unwrap(), 5000);
        media.codecs = vec![crate::sip::Codec::Pcma];
        let neg = handle.answer(ic.call, media).await.unwrap().unwrap();
        assert_eq!(neg.payload_type, 8);
        let ok = read_msg(&mut tcp, &mut framer).await;
        assert!(ok.starts_with("SIP/2.0 200 OK"), "{ok}");
        let tag = ok
            .split("To: ")
            .nth(1)
            .unwrap()
            .split("tag=")
            .nth(1)
            .unwrap()
            .split("\r\n")
            .next()
            .unwrap()
            .to_string();
        let ack = format!(
            "ACK sip:callforge@{server};transport=tcp SIP/2.0\r\nVia: SIP/2.0/TCP {me};branch=z9hG4bKt2\r\nFrom: <sip:a@{me}>;tag=a\r\nTo: <sip:1000@{server}>;tag={tag}\r\nCall-ID: tcp1\r\nCSeq: 1 ACK\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        );
        tcp.write_all(ack.as_bytes()).await.unwrap();
        assert!(matches!(
            events.recv().await,
            Some(UaEvent::CallAcked { .. })
        ));
        handle.hangup(ic.call).await.unwrap();
        let bye = read_msg(&mut tcp, &mut framer).await;
        assert!(bye.starts_with("BYE sip:a@"), "{bye}");
        assert!(bye.contains("Via: SIP/2.0/TCP "));
        handle.shutdown();
    }

    #[tokio::test]
    async fn outbound_invite_over_udp_is_answered() {
        let sip = start(&["udp:127.0.0.1:0".parse().unwrap()], UaConfig::default())
            .await
            .unwrap();
        let SipTransport {
            handle, mut events, ..
        } = sip;
        let callee = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let callee_addr = callee.local_addr().unwrap();
        let oc = OutboundCall {
            target: Target {
                addr: callee_addr,
                transport: TransportKind::Udp,
            },
            request_uri: format!("sip:2000@{callee_addr}"),
            from: crate::sip::message::NameAddr::new("sip:1000@127.0.0.1"),
            to: crate::sip::message::NameAddr::new(format!("sip:2000@{callee_addr}")),
            media: MediaConfig::new("127.0.0.1".parse().unwrap(), 6000),
            local: None,
            headers: Vec::new(),
            auth: None,
        };
        let call = handle.invite(oc).await.unwrap();
        let mut buf = vec![0u8; 8192];
        let (n, from) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            callee.recv_from(&mut buf),
        )
        .await
        .unwrap()
        .unwrap();
        let invite = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(invite.starts_with("INVITE sip:2000@"), "{invite}");
        let mut reply = String::from("SIP/2.0 200 OK\r\n");
        for l in invite.lines() {
            if ["Via:", "From:", "Call-ID:", "CSeq:"]
                .iter()
                .any(|p| l.starts_with(p))
            {
                reply.push_str(l);
                reply.push_str("\r\n");
            }
            if l.starts_with("To:") {
                reply.push_str(l);
                reply.push_str(";tag=b\r\n");
            }
        }
        let sdp = "v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 7000 RTP/AVP 0\r\n";
        reply.push_str(&format!(
            "Contact: <sip:2000@{callee_addr}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
            sdp.len()
        ));
        callee.send_to(reply.as_bytes(), from).await.unwrap();
        let (n, _) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            callee.recv_from(&mut buf),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("ACK sip:2000@"));
        match tokio::time::timeout(std::time::Duration::from_secs(5), events.recv()).await {
            Ok(Some(UaEvent::CallAnswered {
                call: c,
                media: Some(m),
            })) => {
                assert_eq!(c, call);
                assert_eq!(m.remote_rtp, Some("127.0.0.1:7000".parse().unwrap()));
            }
            other => panic!("{other:?}"),
        }
        handle.shutdown();
    }
}
