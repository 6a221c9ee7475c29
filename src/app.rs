//! Wiring: configuration in, engine + script library + HTTP API + SIP (routes → class4/class5) running.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch, Notify};

use crate::{
    config::{Config, RouteMode, SipConfig},
    http::{self, ApiState},
    media::{EspeakRenderer, PortAllocator, PromptCache, RelayThreads, TtsCache, TtsRenderer},
    modules::originate::{Originator, OriginatorSlot},
    routing::{request::request_user, Class4Server, RouteError, RouteTable},
    script::{Engine, EngineConfig, EngineError, HostModules, ScriptLibrary},
    sip::{
        self,
        guard::{self, GuardPolicy},
        inbound_auth::{AuthOutcome, DigestVerifier},
        sdp::Codec,
        CallHandle, EndReason, EndedBy, ListenSpec, SipHandle, TransportError, UaConfig, UaEvent,
    },
    store::Records,
    voice::{
        control::{CallControl, DispatchCommand, LegEvent},
        media_bind::MediaShared,
        originate::OriginateRequest,
        remote_audio::{HttpTtsRenderer, RemoteAudio, RemoteAudioConfig},
        trunks::{TrunkTable, Trunks},
        CallEvent, VoiceServer,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot listen on {addr} for HTTP: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    PerCore(#[from] http::percore::PerCoreError),
    #[error(transparent)]
    Routes(#[from] RouteError),
    #[error("[sip] {0}")]
    SipConfig(String),
    #[error("SIP: {0}")]
    Sip(#[from] TransportError),
    #[error("{0}")]
    Exposure(String),
    #[error("[media] {what}: {source}")]
    Media {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// A started engine with its script library, ready to serve.
pub struct App {
    pub config: Config,
    pub engine: Arc<Engine>,
    /// Workers of their own for class4 decisions (SIP and HTTP), so runaway HTTP runs on
    /// `engine` never hold up routing.
    pub routing: Arc<Engine>,
    pub library: Arc<ScriptLibrary>,
    /// Where execution records (and CDRs) go; `None` when records are disabled.
    pub records: Option<Records>,
    /// The send channels: `api.send.sip` is attached to the SIP stack when it starts.
    pub send: Option<Arc<crate::modules::send::SendService>>,
    /// Where `originate()` and `/v1/calls` find the voice layer once SIP runs.
    pub originator: OriginatorSlot,
    /// Drain and reload state, shared with the HTTP admin endpoints.
    ops: Arc<Ops>,
    /// Running the embedded default: print how to call the demo routes.
    demo_banner: bool,
}

/// What the dispatcher consults for each new INVITE; swapped whole by a reload.
struct Admission {
    routes: RouteTable,
    realm: String,
    nonce_ttl: Duration,
    users: Arc<HashMap<String, String>>,
}

/// Drain and reload: the handles they act on, filled in as SIP starts.
pub struct Ops {
    config_path: Option<PathBuf>,
    /// The configuration as started (listeners and folders are not reloaded).
    started: Mutex<Config>,
    scripts_dir: PathBuf,
    draining: AtomicBool,
    drain_requested: Notify,
    sip: OnceLock<SipHandle>,
    admission: OnceLock<watch::Sender<Arc<Admission>>>,
    voice: OnceLock<CallControl>,
    trunks: OnceLock<Arc<TrunkTable>>,
    /// `[gateways]`, shared with the class 4 server and replaced on reload.
    gateways: crate::routing::Gateways,
    /// The SIP listeners as bound, in `[sip] listen` order.
    bound: OnceLock<Vec<ListenSpec>>,
}

impl Ops {
    fn start_drain(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            tracing::info!("draining: new calls get 503, live calls continue");
            crate::metrics::metrics().draining.set(1);
            if let Some(sip) = self.sip.get() {
                sip.set_draining(true);
            }
        }
        self.drain_requested.notify_one();
    }

    /// Reads the configuration file again and applies what can change live.
    fn reload_config(&self) -> Result<String, String> {
        let Some(path) = &self.config_path else {
            return Err("started without a configuration file: nothing to reload".into());
        };
        let mut next = Config::load(path).map_err(|e| e.to_string())?;
        let started = self
            .started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // Listeners and folders belong to the running process; keep them as started.
        next.sip.listen = started.sip.listen.clone();
        next.scripts.dir = started.scripts.dir.clone();
        let admission = admission(&next, &self.scripts_dir).map_err(|e| e.to_string())?;
        let bound = self.bound.get().cloned().unwrap_or_default();
        let policy = guard_policy(&next.sip, &bound).map_err(|e| e.to_string())?;
        check_exposure(&next).map_err(|e| e.to_string())?;
        let codecs = codecs(&next.sip).map_err(|e| e.to_string())?;
        let trunks = Trunks::build(&next.trunk, &codecs).map_err(|e| format!("[[trunk]] {e}"))?;
        check_gateways(&next.gateways).map_err(|e| e.to_string())?;
        let summary = format!(
            "{} routes, {} ACL entries, {} users, {} trunks, {} gateways",
            admission.routes.len(),
            policy.allow.len(),
            admission.users.len(),
            next.trunk.len(),
            next.gateways.len()
        );
        self.gateways.replace(next.gateways.clone());
        if let Some(table) = self.trunks.get() {
            table.replace(trunks);
        }
        if let Some(sip) = self.sip.get() {
            sip.set_guard(policy);
        }
        if let Some(tx) = self.admission.get() {
            tx.send_replace(Arc::new(admission));
        }
        *self.started.lock().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(summary)
    }
}

impl http::Admin for Ops {
    fn drain(&self) {
        self.start_drain();
    }

    fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    fn reload(&self) -> Result<String, String> {
        let result = self.reload_config();
        let m = crate::metrics::metrics();
        match &result {
            Ok(summary) => {
                tracing::info!(%summary, "configuration reloaded");
                crate::metrics::Metrics::inc(&m.config_reloads, "result", "ok");
            }
            Err(reason) => {
                tracing::warn!(%reason, "configuration reload refused; the running one stays");
                crate::metrics::Metrics::inc(&m.config_reloads, "result", "refused");
            }
        }
        result
    }
}

/// The routes and accounts of `config`, checked.
fn admission(config: &Config, scripts_dir: &std::path::Path) -> Result<Admission, AppError> {
    let routes = RouteTable::build(&config.route, scripts_dir)?;
    let mut users = HashMap::new();
    for u in &config.sip.user {
        if u.name.is_empty() || u.password.is_empty() {
            return Err(AppError::SipConfig(
                "[[sip.user]] needs a name and a password".into(),
            ));
        }
        if users.insert(u.name.clone(), u.password.clone()).is_some() {
            return Err(AppError::SipConfig(format!(
                "[[sip.user]] {:?} appears twice",
                u.name
            )));
        }
    }
    if config.route.iter().any(|r| r.auth) && users.is_empty() {
        return Err(AppError::SipConfig(
            "a route has auth = true but there is no [[sip.user]]".into(),
        ));
    }
    Ok(Admission {
        routes,
        realm: config.sip.realm.clone(),
        nonce_ttl: Duration::from_secs(config.sip.nonce_ttl_s.max(1)),
        users: Arc::new(users),
    })
}

/// The guard's rules from `[sip]`; `bound` are the listeners' addresses as bound, in the
/// order of `listen` (the configured ones before binding).
fn guard_policy(cfg: &SipConfig, bound: &[ListenSpec]) -> Result<GuardPolicy, AppError> {
    let nets = |what: &str, list: &[String]| {
        list.iter()
            .map(|a| guard::parse_net(a).map_err(|e| AppError::SipConfig(format!("{what}: {e}"))))
            .collect::<Result<Vec<_>, _>>()
    };
    let allow = nets("allow", &cfg.allow)?;
    let mut listeners = Vec::new();
    for (spec, list) in &cfg.listener_allow {
        let i = cfg
            .listen
            .iter()
            .position(|l| l.trim() == spec.trim())
            .ok_or_else(|| {
                AppError::SipConfig(format!(
                    "listener_allow {spec:?} is not one of listen = {:?}",
                    cfg.listen
                ))
            })?;
        let Some(b) = bound.get(i) else { continue };
        listeners.push((
            b.transport,
            b.addr,
            nets(&format!("listener_allow {spec:?}"), list)?,
        ));
    }
    Ok(GuardPolicy {
        allow,
        listeners,
        deny_action: cfg.deny_action,
        rate_per_source: cfg.rate_per_source,
        calls_per_source: cfg.calls_per_source,
        limit_action: cfg.limit_action,
        retry_after: 5,
    })
}

/// Refuses a SIP listener on a non-loopback address when a class5 route (whose script may
/// `ctx.bridge` to a trunk: toll fraud) is open to anyone: no `[sip] allow`, no route `allow`,
/// no `auth`. `[sip] insecure_open = true` accepts the risk.
pub fn check_exposure(config: &Config) -> Result<(), AppError> {
    if config.sip.insecure_open || !config.sip.enabled || !config.sip.allow.is_empty() {
        return Ok(());
    }
    let public: Vec<&String> = config
        .sip
        .listen
        .iter()
        .filter(|l| {
            l.parse::<ListenSpec>()
                .is_ok_and(|s| !s.addr.ip().is_loopback())
                && config
                    .sip
                    .listener_allow
                    .get(l.as_str())
                    .is_none_or(|list| list.is_empty())
        })
        .collect();
    let open: Vec<&str> = config
        .route
        .iter()
        .filter(|r| r.mode == RouteMode::Class5 && r.allow.is_empty() && !r.auth)
        .map(|r| r.pattern.as_str())
        .collect();
    if public.is_empty() || open.is_empty() {
        return Ok(());
    }
    Err(AppError::Exposure(format!(
        "refusing to start: SIP listens on {} (not loopback) and class5 route(s) {:?} can bridge calls to trunks for anyone who reaches it. \
         Set [sip] allow = [\"CIDR\", ...], or allow / auth = true on those routes, or [sip] insecure_open = true to accept the risk",
        public.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
        open
    )))
}

impl App {
    pub fn new(config: Config, mut modules: HostModules) -> Result<Self, AppError> {
        let library = Arc::new(ScriptLibrary::new(
            &config.scripts.dir,
            config.scripts.library_limits(),
        ));
        // Scripts import other scripts of the same folder (`import ... from './lib'`).
        modules.set_scripts(library.clone());
        let engine = Engine::start(EngineConfig {
            limits: config.limits.to_limits(),
            workers: config.limits.workers,
            worker_niceness: config.limits.worker_niceness.clamp(0, 19),
            modules: modules.clone(),
            ..EngineConfig::default()
        })?;
        // Routing answers SIP at the signalling's pace: same priority as the SIP thread.
        let routing = Engine::start(EngineConfig {
            limits: config.limits.to_limits(),
            workers: config.limits.class4_workers,
            worker_niceness: 0,
            modules,
            ..EngineConfig::default()
        })?;
        let ops = Arc::new(Ops {
            config_path: None,
            started: Mutex::new(config.clone()),
            scripts_dir: library.dir().to_path_buf(),
            draining: AtomicBool::new(false),
            drain_requested: Notify::new(),
            sip: OnceLock::new(),
            admission: OnceLock::new(),
            voice: OnceLock::new(),
            trunks: OnceLock::new(),
            gateways: crate::routing::Gateways::new(config.gateways.clone()),
            bound: OnceLock::new(),
        });
        Ok(App {
            ops,
            demo_banner: false,
            config,
            engine: Arc::new(engine),
            routing: Arc::new(routing),
            library,
            records: None,
            send: None,
            originator: OriginatorSlot::default(),
        })
    }

    /// The file `serve` read, re-read by SIGHUP and `POST /v1/admin/reload`.
    pub fn with_config_path(mut self, path: Option<PathBuf>) -> Self {
        if let Some(ops) = Arc::get_mut(&mut self.ops) {
            ops.config_path = path;
        }
        self
    }

    pub fn with_demo_banner(mut self, on: bool) -> Self {
        self.demo_banner = on;
        self
    }

    /// Write an execution record for every HTTP run, and serve `/v1/executions` and `/v1/cdrs`.
    pub fn with_records(mut self, records: Option<Records>) -> Self {
        self.records = records;
        self
    }

    pub fn with_send(mut self, send: Arc<crate::modules::send::SendService>) -> Self {
        self.send = Some(send);
        self
    }

    /// Share the slot the `originate` module reads, so scripts and the API see the same calls.
    pub fn with_originator(mut self, slot: OriginatorSlot) -> Self {
        self.originator = slot;
        self
    }

    pub fn router(&self) -> axum::Router {
        http::router(Arc::new(ApiState {
            engine: self.engine.clone(),
            routing: self.routing.clone(),
            library: self.library.clone(),
            token: self.config.http.token.clone(),
            max_body_bytes: self.config.http.max_body_bytes,
            records: self.records.clone(),
            calls: self.originator.clone(),
            admin: Some(self.ops.clone() as Arc<dyn http::Admin>),
            metrics: self.config.http.metrics,
            metrics_token: self.config.http.metrics_token.clone(),
        }))
    }

    /// Serve HTTP (and SIP when routes are configured) until ctrl-c / SIGTERM.
    pub async fn serve(self) -> Result<(), AppError> {
        check_exposure(&self.config)?;
        let sip = self.start_sip().await?;
        tokio::spawn(crate::memory::give_back_after_peaks(vec![
            self.engine.clone(),
            self.routing.clone(),
        ]));
        let addr = self.config.http.listen;
        if !addr.ip().is_loopback() && self.config.http.token.is_none() {
            tracing::warn!(
                "HTTP API on {addr} without [http] token: anyone who can reach it can run and upload scripts"
            );
        }
        let limits = http::listener::HttpLimits {
            header_timeout: Duration::from_secs(self.config.http.header_timeout_s.max(1)),
            idle_timeout: Duration::from_secs(self.config.http.idle_timeout_s.max(1)),
            max_per_source: self.config.http.max_connections_per_source.max(1),
        };
        let drain_timeout = Duration::from_secs(self.config.calls.drain_timeout_s);
        let served = if self.config.http.thread_per_core {
            // The first listener resolves a port 0; the routing workers bind the rest.
            let first =
                http::percore::bind(addr).map_err(|source| AppError::Bind { addr, source })?;
            let local = first.local_addr().unwrap_or(addr);
            let per_core = http::percore::PerCore::start(
                &self.routing,
                first,
                self.router(),
                http::listener::ConnectionGuard::new(limits),
                tokio::runtime::Handle::current(),
            )?;
            self.announce(local);
            drained(self.ops.clone(), drain_timeout).await;
            per_core.shut_down().await;
            Ok(())
        } else {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AppError::Bind { addr, source })?;
            self.announce(listener.local_addr().unwrap_or(addr));
            let listener = http::listener::GuardedListener::new(listener, limits);
            axum::serve(listener, self.router())
                .with_graceful_shutdown(drained(self.ops.clone(), drain_timeout))
                .await
                .map_err(AppError::Serve)
        };
        if let Some(handle) = sip {
            handle.shutdown();
        }
        served
    }

    /// Logs and prints the HTTP address (tests and wrappers read the printed line to learn an
    /// ephemeral port) and starts reloading on SIGHUP.
    fn announce(&self, local: std::net::SocketAddr) {
        tracing::info!(
            http = %local,
            scripts = %self.library.dir().display(),
            workers = self.engine.workers(),
            per_core = self.config.http.thread_per_core,
            "callforge listening"
        );
        println!("callforge http listening on {local}");
        spawn_reload_on_hup(self.ops.clone());
    }

    /// Starts SIP when there is at least one `[[route]]`; prints one line per listener.
    pub async fn start_sip(&self) -> Result<Option<SipHandle>, AppError> {
        let admission = admission(&self.config, self.library.dir())?;
        let configured = listen_specs(&self.config.sip).unwrap_or_default();
        let policy = guard_policy(&self.config.sip, &configured)?;
        let routes = &admission.routes;
        if !self.config.sip.enabled {
            tracing::info!("[sip] enabled = false: SIP not started");
            return Ok(None);
        }
        if routes.is_empty() {
            tracing::info!("no [[route]] configured: SIP not started");
            return Ok(None);
        }
        let cfg = &self.config.sip;
        check_gateways(&self.config.gateways)?;
        let specs = listen_specs(cfg)?;
        let mut ua = ua_config(cfg, self.config.calls.accept_refer);
        ua.guard = policy.clone();
        let fast_settings = crate::routing::fast::Settings {
            server: ua.user_agent.clone(),
            retry_after: ua.retry_after,
            max_calls: ua.max_calls,
            max_transactions: (ua.max_transactions / self.routing.workers().max(1)).max(1),
            timers: ua.timers,
            limits: ua.limits,
        };
        let fast_workers = if cfg.fast_path {
            self.routing.workers()
        } else {
            0
        };
        let mut transport = sip::start_fast(&specs, ua, tcp_limits(cfg), fast_workers).await.map_err(|e| match e {
            TransportError::Bind { spec, source } if source.kind() == std::io::ErrorKind::AddrInUse => {
                AppError::SipConfig(format!(
                    "cannot listen on {spec}: the port is already in use (another SIP server?). \
                     Choose free ports with `callforge serve --sip udp:127.0.0.1:5070 --sip tcp:127.0.0.1:5070` \
                     (or [sip] listen in the configuration file)"
                ))
            }
            other => AppError::Sip(other),
        })?;
        if !cfg.listener_allow.is_empty() {
            // Port-0 listeners are only known now that they are bound.
            transport
                .handle
                .set_guard(guard_policy(cfg, &transport.local_addrs)?);
        }
        let _ = self.ops.bound.set(transport.local_addrs.clone());
        for spec in &transport.local_addrs {
            tracing::info!(%spec, routes = routes.len(), "callforge sip listening");
            println!("callforge sip listening on {spec}");
        }
        if self.demo_banner {
            if let Some(udp) = transport
                .local_addrs
                .iter()
                .find(|s| s.transport == sip::TransportKind::Udp)
            {
                print_demo_banner(udp.addr);
            }
        }
        let rtp_ip = cfg.rtp_ip.unwrap_or_else(|| {
            let ip = specs[0].addr.ip();
            if ip.is_unspecified() {
                tracing::warn!(
                    "SIP bound to a wildcard address and no [sip] rtp_ip: SDP will say 127.0.0.1"
                );
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                ip
            }
        });
        let [lo, hi] = cfg.rtp_ports;
        if lo > hi {
            return Err(AppError::SipConfig(format!("rtp_ports {lo}-{hi} is empty")));
        }
        let handle = transport.handle.clone();
        let class4 = Class4Server {
            engine: self.routing.clone(),
            library: self.library.clone(),
            gateways: self.ops.gateways.clone(),
            sip: handle.clone(),
        };
        let codecs = codecs(cfg)?;
        let trunks = Trunks::build(&self.config.trunk, &codecs)
            .map_err(|e| AppError::SipConfig(e.to_string()))?;
        let (control, commands) = CallControl::new();
        let voice = VoiceServer {
            engine: self.engine.clone(),
            library: self.library.clone(),
            sip: handle.clone(),
            rtp_ports: Arc::new(PortAllocator::new(lo..=hi)),
            rtp_ip,
            codecs,
            media: media_shared(&self.config.media)?,
            records: self.records.clone(),
            control,
            trunks: Arc::new(TrunkTable::new(trunks)),
            calls: self.config.calls.clone(),
        };
        self.originator
            .attach(Arc::new(VoiceOriginator(voice.clone())));
        let verifier = DigestVerifier::new(
            &admission.realm,
            admission.nonce_ttl,
            admission.users.clone(),
        );
        let (admission_tx, admission_rx) = watch::channel(Arc::new(admission));
        let _ = self.ops.admission.set(admission_tx);
        let _ = self.ops.sip.set(handle.clone());
        let _ = self.ops.voice.set(voice.control.clone());
        let _ = self.ops.trunks.set(voice.trunks.clone());
        let main_loop = Arc::new(crate::lag::Lag::new());
        tokio::spawn(main_loop.clone().tick_forever());
        let shed = Shed {
            lag: (cfg.shed_lag_ms > 0).then(|| Duration::from_millis(cfg.shed_lag_ms)),
            main_loop,
        };
        if let Some(fast) = transport.fast.take() {
            let admission = admission_rx.clone();
            let routes: crate::routing::fast::RouteLookup =
                Arc::new(move |user| admission.borrow().routes.find(user).cloned());
            let (sheds, engine) = (shed.clone(), self.routing.clone());
            let overloaded: crate::routing::fast::Overloaded =
                Arc::new(move || sheds.overloaded(&engine));
            crate::routing::fast::FastPath {
                class4: class4.clone(),
                routes,
                overloaded,
                guard: fast.guard,
                injector: fast.injector.clone(),
                seed: fast.seed,
                settings: fast_settings,
            }
            .start(fast.sockets)
            .map_err(|e| AppError::SipConfig(format!("cannot start the class4 fast path: {e}")))?;
            // A worker this late has its queued datagrams read for it and handed to the
            // stack, which runs them on the least busy worker (or sheds them when every
            // worker is past `shed_lag_ms`). The kernel hashes one source address to one
            // worker, so a single SBC or SIPp socket would otherwise keep one core busy and
            // the other idle: at 12,000/s on a loaded machine that worker fell 500 ms behind
            // and shed 10-20% of the calls. Spilling at 50 ms lets the other core take the
            // excess while the caller's INVITE is still well inside T1.
            let late = match cfg.shed_lag_ms {
                0 => SPILL_AFTER,
                ms => SPILL_AFTER.min(Duration::from_millis(ms)),
            };
            tokio::spawn(crate::routing::fast::relieve_held_workers(
                self.routing.clone(),
                fast.spares,
                fast.injector.clone(),
                late,
            ));
            tracing::info!(
                workers = fast_workers,
                "SIP class4 fast path on the routing workers"
            );
        }
        tokio::spawn(dispatch(
            transport.events,
            commands,
            admission_rx,
            verifier,
            class4,
            voice,
            shed,
        ));
        if let Some(send) = &self.send {
            let from = format!("sip:callforge@{}", rtp_ip);
            send.attach_sip(Arc::new(StackMessenger {
                sip: handle.clone(),
                from,
            }));
        }
        Ok(Some(handle))
    }
}

/// Every `[gateways]` value must be a sip:/sips: URI with a host.
fn check_gateways(gateways: &std::collections::BTreeMap<String, String>) -> Result<(), AppError> {
    for (id, uri) in gateways {
        if sip::message::uri_host_port(uri).is_none_or(|(host, _)| host.is_empty()) {
            return Err(AppError::SipConfig(format!(
                "[gateways] {id} = {uri:?} is not a sip: URI with a host"
            )));
        }
    }
    Ok(())
}

fn listen_specs(cfg: &SipConfig) -> Result<Vec<ListenSpec>, AppError> {
    let specs = cfg
        .listen
        .iter()
        .map(|s| {
            s.parse::<ListenSpec>()
                .map_err(|e| AppError::SipConfig(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if specs.is_empty() {
        return Err(AppError::SipConfig("listen is empty".into()));
    }
    Ok(specs)
}

fn codecs(cfg: &SipConfig) -> Result<Vec<Codec>, AppError> {
    Codec::parse_list(&cfg.codecs).map_err(AppError::SipConfig)
}

/// Transactions the stack's table makes room for up front when class4 has the fast path.
const PRESIZED_WITH_FAST_PATH: usize = 8_192;

fn ua_config(cfg: &SipConfig, accept_refer: bool) -> UaConfig {
    let mut ua = UaConfig::default();
    ua.timers.t1 = Duration::from_millis(cfg.t1_ms.max(1));
    ua.max_calls = cfg.max_calls;
    ua.max_transactions = cfg.max_transactions;
    // With the fast path the routing workers hold class4's transactions: the stack's table
    // serves calls and what spills, and a 7 MiB table presized for class4 rates would be
    // resident after a few thousand calls (7 KiB per live call at 1,000 IVR calls).
    if cfg.fast_path {
        ua.presized_transactions = PRESIZED_WITH_FAST_PATH;
    }
    ua.limits.max_message_size = cfg.max_message_bytes;
    ua.pending_timeout = Duration::from_secs(cfg.pending_timeout_s.max(1));
    ua.accept_refer = accept_refer;
    ua
}

fn tcp_limits(cfg: &SipConfig) -> sip::TcpLimits {
    sip::TcpLimits {
        idle_timeout: Duration::from_secs(cfg.tcp_idle_timeout_s.max(1)),
        message_timeout: Duration::from_secs(cfg.tcp_message_timeout_s.max(1)),
        max_connections: cfg.tcp_max_connections.max(1),
        max_per_source: cfg.tcp_max_per_source.max(1),
    }
}

/// How late a fast-path worker may fall before the stack reads its socket queue for it.
const SPILL_AFTER: Duration = Duration::from_millis(50);

/// Early load shedding: a new INVITE gets 503 while the workers that would run its script
/// are this late (`[sip] shed_lag_ms`), instead of queueing where it would time out anyway
/// and hold memory meanwhile.
/// The SIP and media tasks' own runtime counts too: class5 set-up (sockets, SDP, tasks) is
/// spent there, and when it lags every call in progress suffers.
#[derive(Clone)]
struct Shed {
    lag: Option<Duration>,
    main_loop: Arc<crate::lag::Lag>,
}

impl Shed {
    fn overloaded(&self, engine: &Engine) -> bool {
        self.lag
            .is_some_and(|max| engine.lag() > max || self.main_loop.now() > max)
    }
}

/// Seconds a shed caller is asked to wait (`Retry-After`).
const SHED_RETRY_AFTER_S: u32 = 5;

/// Routes each new INVITE (404 when no route matches), forwards every call's events to the
/// task that owns it, and places outbound legs (registering them before their first event).
async fn dispatch(
    mut events: mpsc::UnboundedReceiver<UaEvent>,
    mut commands: mpsc::UnboundedReceiver<DispatchCommand>,
    mut admission: watch::Receiver<Arc<Admission>>,
    mut verifier: DigestVerifier,
    class4: Class4Server,
    voice: VoiceServer,
    shed: Shed,
) {
    let mut calls: HashMap<CallHandle, mpsc::UnboundedSender<LegEvent>> = HashMap::new();
    let mut refusals = RefusalLog::default();
    let mut commands_open = true;
    loop {
        let event = tokio::select! {
            biased;
            cmd = commands.recv(), if commands_open => {
                match cmd {
                    Some(DispatchCommand::Place { call, events, reply }) => {
                        let placed = voice.sip.invite(*call).await;
                        if let Ok(handle) = &placed {
                            calls.insert(*handle, events);
                        }
                        let _ = reply.send(placed);
                    }
                    Some(DispatchCommand::Deliver { call, event }) => {
                        if let Some(tx) = calls.get(&call) {
                            let _ = tx.send(Box::new((call, event)));
                        }
                    }
                    None => commands_open = false,
                }
                continue;
            }
            ev = events.recv() => match ev {
                Some(ev) => ev,
                None => break,
            },
        };
        let (call, ev) = match event {
            UaEvent::IncomingCall(incoming) => {
                if admission.has_changed().unwrap_or(false) {
                    let a = admission.borrow_and_update().clone();
                    verifier.update(&a.realm, a.nonce_ttl, a.users.clone());
                }
                let current = admission.borrow().clone();
                let user = request_user(&incoming);
                let route = current.routes.find(&user);
                if let Some(route) = route {
                    if let Some((code, headers)) =
                        admit(route, &incoming, &mut verifier, &mut refusals)
                    {
                        let sip = class4.sip.clone();
                        tokio::spawn(async move {
                            let _ = sip.reject(incoming.call, code, None, headers).await;
                        });
                        continue;
                    }
                }
                match route {
                    None => {
                        let sip = class4.sip.clone();
                        tokio::spawn(async move {
                            let _ = sip
                                .reject(incoming.call, 404, Some("No Route".into()), Vec::new())
                                .await;
                        });
                    }
                    Some(route)
                        if shed.overloaded(if route.mode == RouteMode::Class4 {
                            &class4.engine
                        } else {
                            &voice.engine
                        }) =>
                    {
                        tracing::debug!(call = ?incoming.call, "script workers overloaded: 503");
                        let sip = class4.sip.clone();
                        tokio::spawn(async move {
                            let retry =
                                vec![("Retry-After".to_string(), SHED_RETRY_AFTER_S.to_string())];
                            let _ = sip
                                .reject(incoming.call, 503, Some("Overloaded".into()), retry)
                                .await;
                        });
                    }
                    Some(route) if route.mode == RouteMode::Class4 => {
                        class4.submit(incoming, route.clone());
                    }
                    Some(route) => {
                        let handle = incoming.call;
                        calls.insert(handle, voice.start(incoming, route.clone()));
                    }
                }
                continue;
            }
            UaEvent::CallAcked { call, .. } => (call, CallEvent::Acked),
            UaEvent::InDialogRequest {
                call,
                kind,
                request,
                media,
            } => (
                call,
                CallEvent::InDialog {
                    kind,
                    request,
                    media,
                },
            ),
            UaEvent::CallCancelled { call } => (
                call,
                CallEvent::Ended {
                    remote: true,
                    reason: EndReason::Cancelled,
                },
            ),
            UaEvent::CallEnded { call, by, reason } => (
                call,
                CallEvent::Ended {
                    remote: by == EndedBy::Remote,
                    reason,
                },
            ),
            UaEvent::CallProgress { call, code, media } => {
                (call, CallEvent::Progress { code, media })
            }
            UaEvent::CallAnswered { call, media } => (call, CallEvent::Answered { media }),
            UaEvent::ReferResponse { call, code } => (call, CallEvent::ReferResponse { code }),
            UaEvent::TransferNotify { call, code } => (call, CallEvent::TransferNotify { code }),
            UaEvent::MessageResult { .. } => continue,
        };
        let terminal = matches!(ev, CallEvent::Ended { .. });
        if let Some(tx) = calls.get(&call) {
            let _ = tx.send(Box::new((call, ev)));
        }
        if terminal {
            calls.remove(&call);
        }
    }
}

/// How to call the embedded default's routes (scripts/demo.toml).
fn print_demo_banner(addr: SocketAddr) {
    println!(
        "\nNo configuration file: serving the demo routes of scripts/demo.toml.\n\
         Call them (Ctrl-C stops the engine):\n\
         \x20 IVR (menu, 1 sales, 2 support, 3 record + play back):\n\
         \x20   sipp -sn uac -s 1000 {addr} -m 1 -d 10000\n\
         \x20   softphone: sip:1000@{addr}\n\
         \x20 echo test (you hear yourself until you press a key): sip:echo@{addr}\n\
         \x20 class4 routing (302 to the cheapest carrier): sipp -sf tests/sipp/uac_302.xml -s 447700900123 {addr} -m 1\n\
         Other ports: callforge serve --sip udp:127.0.0.1:5070 --sip tcp:127.0.0.1:5070\n"
    );
}

/// One log line per refusal reason per 10 s (the metric counts them all).
#[derive(Default)]
struct RefusalLog(HashMap<&'static str, Instant>);

impl RefusalLog {
    fn note(&mut self, reason: &'static str, source: SocketAddr, detail: &str) {
        crate::metrics::Metrics::inc(&crate::metrics::metrics().sip_rejected, "reason", reason);
        let now = Instant::now();
        let due = self
            .0
            .get(reason)
            .is_none_or(|at| now.duration_since(*at) >= Duration::from_secs(10));
        if due {
            self.0.insert(reason, now);
            tracing::warn!(%source, reason, detail, "INVITE refused (logged at most every 10 s per reason)");
        }
    }
}

/// The route's own ACL and Digest check: `None` admits the call, else the status and headers
/// to refuse it with.
fn admit(
    route: &crate::routing::Route,
    incoming: &sip::IncomingCall,
    verifier: &mut DigestVerifier,
    refusals: &mut RefusalLog,
) -> Option<(u16, Vec<(String, String)>)> {
    let source = incoming.source.addr;
    if !guard::allowed(&route.allow, source.ip()) {
        refusals.note("route_acl", source, "source not in the route's allow list");
        return Some((403, Vec::new()));
    }
    if !route.auth {
        return None;
    }
    match verifier.check(&incoming.request, Instant::now()) {
        AuthOutcome::Authenticated(user) => {
            tracing::debug!(%source, %user, "caller authenticated");
            None
        }
        AuthOutcome::Challenge(header) => {
            crate::metrics::Metrics::inc(
                &crate::metrics::metrics().sip_rejected,
                "reason",
                "auth_challenge",
            );
            Some((401, vec![("WWW-Authenticate".to_string(), header)]))
        }
        AuthOutcome::Refused(why) => {
            refusals.note("auth", source, why);
            Some((403, Vec::new()))
        }
    }
}

/// Reloads the configuration on SIGHUP.
fn spawn_reload_on_hup(ops: Arc<Ops>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            let _ = http::Admin::reload(&*ops);
        }
    });
}

/// Resolves when the process may stop: after a drain (SIGTERM, ctrl-c or the admin API)
/// has let live calls end, or hung them up at `timeout`, and every CDR is written.
/// A second SIGTERM or ctrl-c exits at once.
async fn drained(ops: Arc<Ops>, timeout: Duration) {
    tokio::select! {
        _ = shutdown_signal() => ops.start_drain(),
        _ = ops.drain_requested.notified() => {}
    }
    tokio::spawn(async {
        shutdown_signal().await;
        tracing::warn!("second stop signal: exiting without waiting for live calls");
        std::process::exit(1);
    });
    let started = Instant::now();
    let mut hung_up = false;
    loop {
        let left = crate::lifecycle::in_flight();
        if left == 0 {
            break;
        }
        if !hung_up && started.elapsed() >= timeout {
            hung_up = true;
            if let Some(control) = ops.voice.get() {
                let live = control.live.list(crate::store::now_ms());
                tracing::warn!(
                    calls = live.len(),
                    "drain timeout: hanging up the calls still up"
                );
                for call in live {
                    control.hang_up(call.id, "drain_timeout");
                }
            }
        }
        if hung_up && started.elapsed() >= timeout + Duration::from_secs(10) {
            tracing::error!(
                left,
                "calls did not end 10 s after their BYE; exiting anyway"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if hung_up {
        // Our BYEs may need a retransmission or two.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tracing::info!(
        took_ms = started.elapsed().as_millis() as u64,
        "drained; exiting"
    );
}

/// The voice layer as `originate()` and `/v1/calls` see it.
struct VoiceOriginator(VoiceServer);

impl Originator for VoiceOriginator {
    fn originate(
        &self,
        request: serde_json::Value,
    ) -> futures::future::BoxFuture<'static, Result<u64, (u16, String)>> {
        let voice = self.0.clone();
        Box::pin(async move {
            let req: OriginateRequest =
                serde_json::from_value(request).map_err(|e| (400, format!("bad request: {e}")))?;
            voice
                .originate(req)
                .await
                .map_err(|e| (e.http_status(), e.to_string()))
        })
    }

    fn list(&self) -> serde_json::Value {
        let calls = self.0.control.live.list(crate::store::now_ms());
        serde_json::json!({"calls": calls, "trunks": self.0.trunks.current().usage().into_iter()
            .map(|(name, active, max)| serde_json::json!({"name": name, "active": active, "max_calls": max}))
            .collect::<Vec<_>>()})
    }

    fn get(&self, id: u64) -> Option<serde_json::Value> {
        self.0
            .control
            .live
            .get(id, crate::store::now_ms())
            .and_then(|c| serde_json::to_value(c).ok())
    }

    fn hang_up(&self, id: u64) -> bool {
        self.0.control.hang_up(id, "api")
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}

/// `api.send.sip` through this engine's SIP stack: a MESSAGE to an IP-literal SIP URI.
struct StackMessenger {
    sip: SipHandle,
    from: String,
}

/// Where to send a MESSAGE for `to`: its host must be an IP address (there is no DNS).
fn message_target(to: &str) -> Result<sip::Target, String> {
    let (host, port) = sip::message::uri_host_port(to)
        .ok_or_else(|| format!("{to:?} is not a SIP URI with a host"))?;
    let ip: IpAddr = host
        .trim_matches(|c| c == '[' || c == ']')
        .parse()
        .map_err(|_| format!("{to:?}: the host must be an IP address (no DNS lookups)"))?;
    let transport = if to.to_ascii_lowercase().contains(";transport=tcp") {
        sip::TransportKind::Tcp
    } else {
        sip::TransportKind::Udp
    };
    Ok(sip::Target {
        addr: SocketAddr::new(ip, port.unwrap_or(5060)),
        transport,
    })
}

impl crate::modules::send::SipMessenger for StackMessenger {
    fn message(
        &self,
        to: String,
        body: String,
        content_type: String,
    ) -> futures::future::BoxFuture<'static, Result<u16, String>> {
        let (sip, from) = (self.sip.clone(), self.from.clone());
        Box::pin(async move {
            let target = message_target(&to)?;
            sip.message(sip::OutboundMessage {
                target,
                to,
                from,
                content_type,
                body: body.into_bytes(),
                local: None,
            })
            .await
            .map_err(|e| e.to_string())
        })
    }
}

/// The caches and folders every call's media shares, from `[media]`.
fn media_shared(cfg: &crate::config::MediaConfig) -> Result<MediaShared, AppError> {
    std::fs::create_dir_all(&cfg.recordings).map_err(|source| AppError::Media {
        what: format!(
            "cannot create the recordings folder {}",
            cfg.recordings.display()
        ),
        source,
    })?;
    let invalid = |what: String| AppError::Media {
        what,
        source: std::io::Error::other("invalid [media] setting"),
    };
    let renderer: Box<dyn TtsRenderer> =
        if cfg.tts.starts_with("http://") || cfg.tts.starts_with("https://") {
            Box::new(
                HttpTtsRenderer::new(&cfg.tts, Duration::from_millis(cfg.url_timeout_ms))
                    .map_err(invalid)?,
            )
        } else {
            Box::new(EspeakRenderer {
                program: cfg.tts.clone().into(),
                ..EspeakRenderer::default()
            })
        };
    let remote = RemoteAudio::new(RemoteAudioConfig {
        allow: cfg.url_hosts.clone(),
        connect_timeout: Duration::from_millis(cfg.url_connect_timeout_ms),
        timeout: Duration::from_millis(cfg.url_timeout_ms),
    })
    .map_err(invalid)?;
    Ok(MediaShared {
        prompts: Arc::new(PromptCache::new(
            &cfg.dir,
            cfg.prompt_cache_mb * 1024 * 1024,
        )),
        tts: Arc::new(TtsCache::new(renderer, cfg.tts_cache_mb * 1024 * 1024)),
        remote: Arc::new(remote),
        recordings: cfg.recordings.clone(),
        default_voice: cfg.voice.clone(),
        inband_always: cfg.inband_dtmf,
        relays: Arc::new(
            RelayThreads::start(cfg.relay_threads, cfg.relay_priority).map_err(|source| {
                AppError::Media {
                    what: format!("cannot start {} relay threads", cfg.relay_threads),
                    source,
                }
            })?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateways_must_be_sip_uris() {
        let mut g = std::collections::BTreeMap::new();
        g.insert("a".to_string(), "sip:alpha.example.net:5060".to_string());
        g.insert("b".to_string(), "sips:10.0.0.1;transport=tls".to_string());
        assert!(check_gateways(&g).is_ok());
        g.insert("c".to_string(), "alpha.example.net".to_string());
        let e = check_gateways(&g).unwrap_err().to_string();
        assert!(e.contains("[gateways] c"), "{e}");
    }

    #[test]
    fn a_public_listener_with_an_open_class5_route_is_refused() {
        let open = "[sip]\nlisten = [\"udp:0.0.0.0:5060\"]\n[[route]]\nmatch = \".\"\nscript = \"x\"\nmode = \"class5\"\n";
        let e = check_exposure(&Config::parse(open, "t").unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("insecure_open") && e.contains("udp:0.0.0.0:5060"),
            "{e}"
        );
        for text in [
            open.replacen("[sip]\n", "[sip]\ninsecure_open = true\n", 1),
            open.replacen("[sip]\n", "[sip]\nallow = [\"192.0.2.0/24\"]\n", 1),
            format!("{open}[sip.listener_allow]\n\"udp:0.0.0.0:5060\" = [\"192.0.2.1\"]\n"),
        ] {
            let c = Config::parse(&text, "t").unwrap_or_else(|e| panic!("{text}: {e}"));
            assert!(check_exposure(&c).is_ok(), "{text}");
        }
        for guarded in ["auth = true", "allow = [\"192.0.2.1\"]"] {
            let c = Config::parse(&format!("{open}{guarded}\n"), "t").unwrap();
            assert!(check_exposure(&c).is_ok(), "{guarded}");
        }
        let lo = open.replace("0.0.0.0", "127.0.0.1");
        assert!(check_exposure(&Config::parse(&lo, "t").unwrap()).is_ok());
        let class4 = open.replace("class5", "class4");
        assert!(check_exposure(&Config::parse(&class4, "t").unwrap()).is_ok());
    }

    #[test]
    fn listen_specs_and_codecs_are_checked() {
        let mut cfg = SipConfig::default();
        assert_eq!(listen_specs(&cfg).unwrap().len(), 2);
        cfg.listen = vec!["127.0.0.1:5060".into()];
        assert!(listen_specs(&cfg).is_err());
        cfg.codecs = vec!["pcma".into()];
        assert_eq!(codecs(&cfg).unwrap(), vec![Codec::Pcma]);
        cfg.codecs = vec!["G729".into()];
        assert!(codecs(&cfg).is_err());
    }
}
