//! The threads that run bridged calls' RTP relays, apart from the tokio workers that run SIP,
//! call set-up and scripts: a relay's next datagram must not wait behind an INVITE being
//! parsed or a script being compiled. Each thread drives one current-thread tokio runtime of
//! its own; a bridge's relay task is placed on the thread with the fewest relays.
//!
//! The threads may run at a raised priority (`[media] relay_priority`): a relay wakes for
//! every datagram and runs for microseconds, so under CPU contention it is the wake-up delay,
//! not CPU, that costs latency. Raising priority needs privileges (CAP_SYS_NICE, or an
//! RLIMIT_NICE / RLIMIT_RTPRIO allowance); without them the threads run at normal priority
//! and one line is logged.

use std::{
    future::Future,
    io,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Once,
    },
};

use serde::Deserialize;
use tokio::{runtime::Handle, sync::oneshot, task::JoinHandle};

/// The scheduling the relay threads ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RelayPriority {
    /// The process's own priority.
    Normal,
    /// Nice -10 (Linux per-thread nice), where permitted.
    High,
    /// SCHED_FIFO at priority 10, where permitted (else nice -10, else normal).
    #[default]
    Realtime,
}

/// Nice value of [`RelayPriority::High`].
const HIGH_NICE: libc::c_int = -10;
/// SCHED_FIFO priority of [`RelayPriority::Realtime`]: low among real-time threads, so the
/// kernel's own real-time threads still come first.
const FIFO_PRIORITY: libc::c_int = 10;

struct Worker {
    handle: Handle,
    /// Relays running on this thread.
    live: Arc<AtomicUsize>,
}

/// The relay threads; dropping this stops them (relays still running end with it).
pub struct RelayThreads {
    workers: Vec<Worker>,
    /// Dropped with `self`: each thread's runtime then returns and is shut down.
    _stop: Vec<oneshot::Sender<()>>,
}

impl std::fmt::Debug for RelayThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayThreads")
            .field("threads", &self.workers.len())
            .finish()
    }
}

impl RelayThreads {
    /// Starts `threads` relay threads at `priority`. With 0, relays run as ordinary tasks on
    /// whichever runtime spawns them (the tokio workers), as before relay threads existed.
    pub fn start(threads: usize, priority: RelayPriority) -> io::Result<Self> {
        let mut workers = Vec::with_capacity(threads);
        let mut stops = Vec::with_capacity(threads);
        for i in 0..threads {
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("cf-relay-{i}"))
                .spawn(move || {
                    apply_priority(priority);
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_io()
                        .enable_time()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(rt.handle().clone()));
                    let _ = rt.block_on(stop_rx);
                })?;
            let handle = handle_rx
                .recv()
                .map_err(|_| io::Error::other("relay thread ended while starting"))??;
            workers.push(Worker {
                handle,
                live: Arc::new(AtomicUsize::new(0)),
            });
            stops.push(stop_tx);
        }
        Ok(RelayThreads {
            workers,
            _stop: stops,
        })
    }

    /// No relay threads: relays run on the caller's runtime.
    pub fn inline() -> Self {
        RelayThreads {
            workers: Vec::new(),
            _stop: Vec::new(),
        }
    }

    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Relays running on each thread.
    pub fn load(&self) -> Vec<usize> {
        self.workers
            .iter()
            .map(|w| w.live.load(Ordering::Relaxed))
            .collect()
    }

    /// Runs `relay` on the relay thread with the fewest relays (or on the current runtime
    /// when there are no relay threads). Sockets it uses must be registered from inside it
    /// (see [`super::rtp_socket::ParkedRtpSocket::attach`]).
    pub fn spawn<F>(&self, relay: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let Some(w) = self
            .workers
            .iter()
            .min_by_key(|w| w.live.load(Ordering::Relaxed))
        else {
            return tokio::spawn(relay);
        };
        let live = w.live.clone();
        live.fetch_add(1, Ordering::Relaxed);
        let guard = LiveGuard(live);
        w.handle.spawn(async move {
            let _guard = guard;
            relay.await
        })
    }
}

/// Counts a relay off its thread when it ends or is dropped.
struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

static PRIORITY_LOGGED: Once = Once::new();

/// Asks for `priority` for the calling thread; logs the outcome once per process.
fn apply_priority(priority: RelayPriority) {
    raise_priority_logged(priority, "relay threads", &PRIORITY_LOGGED);
}

/// Asks for `priority` for the calling thread on behalf of `what` (other media threads, such
/// as the RTP ticker's); logs the outcome once per process.
pub(crate) fn raise_priority(priority: RelayPriority, what: &'static str) {
    static LOGGED: Once = Once::new();
    raise_priority_logged(priority, what, &LOGGED);
}

fn raise_priority_logged(priority: RelayPriority, what: &'static str, logged: &Once) {
    let outcome = match priority {
        RelayPriority::Normal => return,
        RelayPriority::High => set_nice(HIGH_NICE).map(|()| format!("nice {HIGH_NICE}")),
        RelayPriority::Realtime => match set_fifo(FIFO_PRIORITY) {
            Ok(()) => Ok(format!("SCHED_FIFO {FIFO_PRIORITY}")),
            Err(fifo) => set_nice(HIGH_NICE)
                .map(|()| format!("nice {HIGH_NICE} (SCHED_FIFO refused: {fifo})")),
        },
    };
    logged.call_once(|| match outcome {
        Ok(how) => tracing::info!("{what} run at {how}"),
        Err(e) => tracing::warn!(
            ?priority,
            "{what} run at normal priority: raising it was refused ({e})"
        ),
    });
}

#[cfg(target_os = "linux")]
fn set_nice(nice: libc::c_int) -> io::Result<()> {
    // On Linux, PRIO_PROCESS with a thread id sets that thread's nice value alone.
    // SAFETY: plain system calls on the calling thread's own id; no memory is passed.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(target_os = "linux")]
fn set_fifo(priority: libc::c_int) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pid 0 is the calling thread; `param` outlives the call.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_nice(_: libc::c_int) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "per-thread priority is only set on Linux",
    ))
}

#[cfg(not(target_os = "linux"))]
fn set_fifo(_: libc::c_int) -> io::Result<()> {
    set_nice(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread_name() -> String {
        std::thread::current()
            .name()
            .unwrap_or_default()
            .to_string()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relays_run_on_their_own_threads_spread_by_load() {
        let threads = RelayThreads::start(2, RelayPriority::Normal).unwrap();
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let mut held = Vec::new();
        for _ in 0..4 {
            let mut rx = release_rx.clone();
            held.push(threads.spawn(async move {
                let name = thread_name();
                let _ = rx.wait_for(|r| *r).await;
                name
            }));
        }
        tokio::task::yield_now().await;
        assert_eq!(
            threads.load(),
            vec![2, 2],
            "placed on the less loaded thread"
        );
        release_tx.send_replace(true);
        let mut names = Vec::new();
        for h in held {
            names.push(h.await.unwrap());
        }
        names.sort();
        assert_eq!(
            names,
            ["cf-relay-0", "cf-relay-0", "cf-relay-1", "cf-relay-1"]
        );
        assert_eq!(
            threads.load(),
            vec![0, 0],
            "finished relays are counted off"
        );
        // Not a tokio worker of the caller's runtime.
        assert!(!thread_name().starts_with("cf-relay"));
    }

    #[tokio::test]
    async fn with_no_threads_relays_run_on_the_current_runtime() {
        let threads = RelayThreads::inline();
        let here = std::thread::current().id();
        let there = threads
            .spawn(async { std::thread::current().id() })
            .await
            .unwrap();
        assert_eq!(here, there);
    }

    #[cfg(target_os = "linux")]
    fn own_nice() -> libc::c_int {
        // SAFETY: reads the calling thread's nice value; no memory is passed.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::getpriority(libc::PRIO_PROCESS, tid)
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn high_priority_is_taken_where_permitted_and_never_fails_where_not() {
        let mine = own_nice();
        // Whether this process may lower a thread's nice value (root, CAP_SYS_NICE, RLIMIT_NICE).
        let permitted = std::thread::spawn(|| set_nice(HIGH_NICE).is_ok())
            .join()
            .unwrap();
        let threads = RelayThreads::start(1, RelayPriority::High).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let relay_nice = rt.block_on(threads.spawn(async { own_nice() })).unwrap();
        if permitted {
            assert_eq!(relay_nice, HIGH_NICE);
        } else {
            assert_eq!(relay_nice, mine, "left at the process's priority");
        }
        assert_eq!(own_nice(), mine, "only the relay thread's priority changes");
    }

    #[test]
    fn dropping_stops_the_threads_and_their_relays() {
        let threads = RelayThreads::start(1, RelayPriority::Normal).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let pending = threads.spawn(std::future::pending::<()>());
        drop(threads);
        let joined = rt.block_on(pending);
        assert!(joined.unwrap_err().is_cancelled());
    }
}
