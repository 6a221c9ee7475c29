//! Wiring: configuration in, engine + script library + HTTP API (later SIP) running.

use std::{net::SocketAddr, sync::Arc};

use crate::{
    config::Config,
    http::{self, ApiState},
    script::{Engine, EngineConfig, EngineError, HostModules, ScriptLibrary},
    store::Records,
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
}

/// A started engine with its script library, ready to serve.
pub struct App {
    pub config: Config,
    pub engine: Arc<Engine>,
    pub library: Arc<ScriptLibrary>,
    /// Where execution records (and CDRs) go; `None` when records are disabled.
    pub records: Option<Records>,
}

impl App {
    pub fn new(config: Config, modules: HostModules) -> Result<Self, AppError> {
        let engine = Engine::start(EngineConfig {
            limits: config.limits.to_limits(),
            workers: config.limits.workers,
            modules,
            ..EngineConfig::default()
        })?;
        let library = ScriptLibrary::new(&config.scripts.dir, config.scripts.library_limits());
        Ok(App {
            config,
            engine: Arc::new(engine),
            library: Arc::new(library),
            records: None,
        })
    }

    /// Write an execution record for every HTTP run, and serve `/v1/executions` and `/v1/cdrs`.
    pub fn with_records(mut self, records: Option<Records>) -> Self {
        self.records = records;
        self
    }

    pub fn router(&self) -> axum::Router {
        http::router(Arc::new(ApiState {
            engine: self.engine.clone(),
            library: self.library.clone(),
            token: self.config.http.token.clone(),
            max_body_bytes: self.config.http.max_body_bytes,
            records: self.records.clone(),
        }))
    }

    /// Serve HTTP until ctrl-c / SIGTERM.
    pub async fn serve(self) -> Result<(), AppError> {
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
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(AppError::Serve)
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
