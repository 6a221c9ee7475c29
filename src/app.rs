//! Wiring: configuration in, engine + script library + HTTP API + SIP (routes → class4/class5) running.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::sync::mpsc;

use crate::{
    config::{Config, RouteMode, SipConfig},
    http::{self, ApiState},
    media::{EspeakRenderer, PortAllocator, PromptCache, TtsCache, TtsRenderer},
    modules::originate::{Originator, OriginatorSlot},
    routing::{request::request_user, Class4Server, RouteError, RouteTable},
    script::{Engine, EngineConfig, EngineError, HostModules, ScriptLibrary},
    sip::{
        self, sdp::Codec, CallHandle, EndReason, EndedBy, ListenSpec, SipHandle, TransportError,
        UaConfig, UaEvent,
    },
    store::Records,
    voice::{
        control::{CallControl, DispatchCommand, LegEvent},
        media_bind::MediaShared,
        originate::OriginateRequest,
        remote_audio::{HttpTtsRenderer, RemoteAudio, RemoteAudioConfig},
        trunks::Trunks,
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
    Routes(#[from] RouteError),
    #[error("[sip] {0}")]
    SipConfig(String),
    #[error("SIP: {0}")]
    Sip(#[from] TransportError),
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
}

impl App {
    pub fn new(config: Config, modules: HostModules) -> Result<Self, AppError> {
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
        let library = ScriptLibrary::new(&config.scripts.dir, config.scripts.library_limits());
        Ok(App {
            config,
            engine: Arc::new(engine),
            routing: Arc::new(routing),
            library: Arc::new(library),
            records: None,
            send: None,
            originator: OriginatorSlot::default(),
        })
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
        }))
    }

    /// Serve HTTP (and SIP when routes are configured) until ctrl-c / SIGTERM.
    pub async fn serve(self) -> Result<(), AppError> {
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
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Bind { addr, source })?;
        let local = listener.local_addr().unwrap_or(addr);
        tracing::info!(
            http = %local,
            scripts = %self.library.dir().display(),
            workers = self.engine.workers(),
            "callforge listening"
        );
        // Tests and wrappers read this line to learn an ephemeral port.
        println!("callforge http listening on {local}");
        let limits = http::listener::HttpLimits {
            header_timeout: Duration::from_secs(self.config.http.header_timeout_s.max(1)),
            idle_timeout: Duration::from_secs(self.config.http.idle_timeout_s.max(1)),
            max_per_source: self.config.http.max_connections_per_source.max(1),
        };
        let listener = http::listener::GuardedListener::new(listener, limits);
        let served = axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(AppError::Serve);
        if let Some(handle) = sip {
            handle.shutdown();
        }
        served
    }

    /// Starts SIP when there is at least one `[[route]]`; prints one line per listener.
    pub async fn start_sip(&self) -> Result<Option<SipHandle>, AppError> {
        let routes = RouteTable::build(&self.config.route, self.library.dir())?;
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
        let transport = sip::start_with(
            &specs,
            ua_config(cfg, self.config.calls.accept_refer),
            tcp_limits(cfg),
        )
        .await?;
        for spec in &transport.local_addrs {
            tracing::info!(%spec, routes = routes.len(), "callforge sip listening");
            println!("callforge sip listening on {spec}");
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
            gateways: Arc::new(self.config.gateways.clone()),
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
            trunks: Arc::new(trunks),
            calls: self.config.calls.clone(),
        };
        self.originator
            .attach(Arc::new(VoiceOriginator(voice.clone())));
        let main_loop = Arc::new(crate::lag::Lag::new());
        tokio::spawn(main_loop.clone().tick_forever());
        let shed = Shed {
            lag: (cfg.shed_lag_ms > 0).then(|| Duration::from_millis(cfg.shed_lag_ms)),
            main_loop,
        };
        tokio::spawn(dispatch(
            transport.events,
            commands,
            routes,
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

fn ua_config(cfg: &SipConfig, accept_refer: bool) -> UaConfig {
    let mut ua = UaConfig::default();
    ua.timers.t1 = Duration::from_millis(cfg.t1_ms.max(1));
    ua.max_calls = cfg.max_calls;
    ua.max_transactions = cfg.max_transactions;
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

/// Early load shedding: a new INVITE gets 503 while the workers that would run its script
/// are this late (`[sip] shed_lag_ms`), instead of queueing where it would time out anyway
/// and hold memory meanwhile.
/// The SIP and media tasks' own runtime counts too: class5 set-up (sockets, SDP, tasks) is
/// spent there, and when it lags every call in progress suffers.
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
    routes: RouteTable,
    class4: Class4Server,
    voice: VoiceServer,
    shed: Shed,
) {
    let mut calls: HashMap<CallHandle, mpsc::UnboundedSender<LegEvent>> = HashMap::new();
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
                            let _ = tx.send((call, event));
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
                let user = request_user(&incoming);
                match routes.find(&user) {
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
            let _ = tx.send((call, ev));
        }
        if terminal {
            calls.remove(&call);
        }
    }
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
        serde_json::json!({"calls": calls, "trunks": self.0.trunks.usage().into_iter()
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
