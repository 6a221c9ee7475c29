//! Thread-per-core HTTP serving: every worker thread of the routing engine accepts on a
//! `SO_REUSEPORT` listener of its own for the API address and serves the connections it
//! accepted with hyper, on its own event loop. A class4 run over HTTP so starts, runs its
//! script in the worker's sandbox and is answered on one thread.
//!
//! Only `/v1/run/...` is served where it arrives. Every other request (admin, records, calls,
//! scripts, health, metrics, forms, drivers) is handed to the main runtime, which runs the
//! same router as before: those handlers may block briefly or spawn long-lived tasks, which
//! must not land on a script worker.

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::{pin, Pin},
    task::{Context, Poll},
};

use axum::{
    body::Body,
    http::{Request, Response, StatusCode},
    Router,
};
use futures::future::Either;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::{
    runtime::Handle,
    sync::{oneshot, watch},
    task::JoinHandle,
};
use tower::ServiceExt;

use super::listener::ConnectionGuard;
use crate::script::{Engine, EngineError, LocalTask};

/// The path prefix served on the worker that accepted the connection.
const LOCAL_PREFIX: &str = "/v1/run/";

/// Binds a listener that other listeners of this process can share the address with.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As tokio's own bind does, so a restart does not wait for TIME_WAIT to clear.
    socket.set_reuse_address(true)?;
    // The kernel spreads new connections over the sockets bound with it (by a hash of the
    // connection's addresses); only sockets of the same user can join the group.
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The per-worker servers, running; [`shut_down`](Self::shut_down) stops them.
pub struct PerCore {
    stop: watch::Sender<bool>,
    done: Vec<oneshot::Receiver<()>>,
}

/// Why the per-worker servers could not start.
#[derive(Debug, thiserror::Error)]
pub enum PerCoreError {
    #[error("cannot bind a per-worker HTTP listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start HTTP serving on a script worker: {0}")]
    Worker(#[from] EngineError),
}

impl PerCore {
    /// Starts one server on each of `engine`'s workers. `first` (already bound with [`bind`],
    /// which resolved a port 0) goes to worker 0; the others bind its address again.
    /// Requests that are not runs go to `main`.
    pub fn start(
        engine: &Engine,
        first: std::net::TcpListener,
        router: Router,
        guard: ConnectionGuard,
        main: Handle,
    ) -> Result<Self, PerCoreError> {
        let addr = first.local_addr().map_err(|source| PerCoreError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        let mut listeners = vec![first];
        for _ in 1..engine.workers() {
            listeners.push(bind(addr).map_err(|source| PerCoreError::Bind { addr, source })?);
        }
        let (stop, stopped) = watch::channel(false);
        let mut done = Vec::with_capacity(listeners.len());
        for (index, listener) in listeners.into_iter().enumerate() {
            let (finished, finished_rx) = oneshot::channel();
            done.push(finished_rx);
            let service = Dispatch {
                router: router.clone(),
                main: main.clone(),
            };
            let (guard, stopped) = (guard.clone(), stopped.clone());
            let task: LocalTask = Box::new(move |_runner| {
                Box::pin(async move {
                    serve_worker(index, listener, service, guard, stopped).await;
                    let _ = finished.send(());
                })
            });
            engine.spawn_on(index, task)?;
        }
        Ok(PerCore { stop, done })
    }

    /// Stops accepting, lets each connection finish the request it is serving (idle ones
    /// close at once), and returns when every connection is closed: what `axum::serve`'s
    /// graceful shutdown does.
    pub async fn shut_down(self) {
        let _ = self.stop.send(true);
        for done in self.done {
            let _ = done.await;
        }
    }
}

/// One worker's accept loop; returns once stopped and its last connection has closed.
async fn serve_worker(
    index: usize,
    listener: std::net::TcpListener,
    service: Dispatch,
    guard: ConnectionGuard,
    stopped: watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(
                worker = index,
                "HTTP listener cannot join the worker's loop: {e}"
            );
            return;
        }
    };
    // Each connection holds a receiver; `closed()` resolves when the last one is gone.
    let (open_tx, open_rx) = watch::channel(());
    let mut stop = stopped.clone();
    loop {
        tokio::select! {
            (io, peer) = guard.accept(&listener) => {
                let (service, stopped, open) = (service.clone(), stopped.clone(), open_rx.clone());
                tokio::task::spawn_local(async move {
                    serve_connection(io, service, stopped).await;
                    tracing::trace!(%peer, "HTTP connection closed");
                    drop(open);
                });
            }
            _ = stop.wait_for(|stop| *stop) => break,
        }
    }
    drop(listener);
    drop(open_rx);
    open_tx.closed().await;
}

async fn serve_connection(
    io: super::listener::GuardedStream,
    service: Dispatch,
    mut stopped: watch::Receiver<bool>,
) {
    let conn = hyper::server::conn::http1::Builder::new()
        // A pipelined batch of requests gets its answers in one write.
        .pipeline_flush(true)
        .serve_connection(TokioIo::new(io), service);
    let mut conn = pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::trace!("HTTP connection ended: {e}");
                }
                return;
            }
            _ = stopped.wait_for(|stop| *stop), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Runs go through the router here; the rest through the same router on the main runtime.
#[derive(Clone)]
struct Dispatch {
    router: Router,
    main: Handle,
}

impl hyper::service::Service<Request<Incoming>> for Dispatch {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<tower::util::Oneshot<Router, Request<Body>>, Forwarded>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let request = request.map(Body::new);
        let router = self.router.clone();
        if request.uri().path().starts_with(LOCAL_PREFIX) {
            return Either::Left(router.oneshot(request));
        }
        Either::Right(Forwarded(self.main.spawn(router.oneshot(request))))
    }
}

/// A request handled on the main runtime. Dropped with its connection, it cancels the
/// handler there, as a handler on the connection's own task would be.
pub struct Forwarded(JoinHandle<Result<Response<Body>, Infallible>>);

impl Future for Forwarded {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|joined| {
            joined.unwrap_or_else(|e| {
                tracing::error!("HTTP handler on the main runtime failed: {e}");
                let mut response = Response::new(Body::empty());
                *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                Ok(response)
            })
        })
    }
}

impl Drop for Forwarded {
    fn drop(&mut self) {
        self.0.abort();
    }
}
