//! Worker threads that execute runs in parallel; each drives many async runs on its own thread.
//!
//! QuickJS runtimes are not `Send`, so a run lives on one worker from start to end. A worker is
//! a current-thread tokio runtime with a `LocalSet`: a run awaiting a host call costs a task,
//! not a thread, so thousands of calls can wait at once on two cores.
//!
//! Besides single runs ([`WorkerPool::run`]), a caller can hand a worker a whole task
//! ([`WorkerPool::spawn`]): code that prepares a run, runs it with a [`LocalRunner`] and acts
//! on the result, all on the worker's thread. Class 4 over SIP uses this so a call never
//! crosses back to the caller's thread between the INVITE and the answer. A task can also be
//! pinned to one worker ([`WorkerPool::spawn_on`]): the HTTP API's per-worker acceptors.
//!
//! A run requested from one of the pool's own threads ([`WorkerPool::run_here_first`]) stays on
//! that thread: the HTTP connections a worker accepted run their class4 scripts where they are.

use std::{
    cell::Cell,
    rc::Rc,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
};

use futures::future::LocalBoxFuture;
use tokio::sync::{mpsc, oneshot};

use crate::lag::Lag;

use super::{
    error::EngineError,
    execution::{RunOutput, RunRequest, Sandbox},
    host::HostModules,
    mode::Limits,
};

/// Work for a worker thread: given the worker's runner, the future to drive there.
pub type LocalTask = Box<dyn FnOnce(LocalRunner) -> LocalBoxFuture<'static, ()> + Send>;

enum Job {
    Run {
        request: RunRequest,
        reply: oneshot::Sender<RunOutput>,
    },
    Task(LocalTask),
}

/// Runs scripts on the worker thread it was handed to (not `Send`: it stays there).
pub struct LocalRunner {
    sandbox: Rc<Sandbox>,
}

impl LocalRunner {
    /// Runs one script in a fresh context and gives its output to `answer`; the spent context
    /// is torn down (and the next one prepared) only after `answer` returns.
    pub async fn run<R>(&self, request: RunRequest, answer: impl FnOnce(RunOutput) -> R) -> R {
        let (output, spent) = self.sandbox.run_unrecycled(request).await;
        let answered = answer(output);
        self.sandbox.recycle(spent);
        answered
    }
}

struct Worker {
    jobs: mpsc::UnboundedSender<Job>,
    in_flight: Arc<AtomicUsize>,
    /// The worker's event-loop lag: see [`Lag`].
    lag: Arc<Lag>,
}

/// A fixed set of worker threads; runs go to the least busy one.
pub struct WorkerPool {
    workers: Vec<Worker>,
    /// Tells this pool's threads from another pool's (see [`HERE`]).
    id: usize,
}

/// Numbers the pools of the process.
static NEXT_POOL: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// On a worker thread: its pool's id and its index in that pool.
    static HERE: Cell<Option<(usize, usize)>> = const { Cell::new(None) };
}

impl WorkerPool {
    pub fn start(
        count: usize,
        limits: &Limits,
        modules: &HostModules,
        exec_host: &str,
        niceness: i32,
    ) -> Result<Self, EngineError> {
        let count = count.max(1);
        // The JS stack limit must fit well inside the thread's own stack.
        let stack = (limits.stack_bytes * 4).max(8 * 1024 * 1024);
        let mut workers = Vec::with_capacity(count);
        let id = NEXT_POOL.fetch_add(1, Ordering::Relaxed);
        for index in 0..count {
            let (tx, rx) = mpsc::unbounded_channel();
            let in_flight = Arc::new(AtomicUsize::new(0));
            let lag = Arc::new(Lag::new());
            let sandbox = (
                limits.clone(),
                modules.clone(),
                exec_host.to_string(),
                niceness,
            );
            let (counter, ticks) = (in_flight.clone(), lag.clone());
            thread::Builder::new()
                .name(format!("script-{index}"))
                .stack_size(stack)
                .spawn(move || {
                    HERE.with(|h| h.set(Some((id, index))));
                    worker_main(rx, counter, ticks, sandbox)
                })?;
            workers.push(Worker {
                jobs: tx,
                in_flight,
                lag,
            });
        }
        Ok(WorkerPool { workers, id })
    }

    pub fn size(&self) -> usize {
        self.workers.len()
    }

    /// Runs currently executing or waiting on each worker.
    pub fn in_flight(&self) -> usize {
        self.workers
            .iter()
            .map(|w| w.in_flight.load(Ordering::Relaxed))
            .sum()
    }

    /// How long new work waits before it starts on the most responsive worker. The least
    /// lagging one, not the average: one runaway run holding its worker must not make the
    /// whole engine look overloaded.
    pub fn lag(&self) -> std::time::Duration {
        let us = self
            .workers
            .iter()
            .map(|w| w.lag.now_us())
            .min()
            .unwrap_or(0);
        std::time::Duration::from_micros(us)
    }

    /// How late worker `index`'s event loop runs (zero for an index out of range).
    pub fn worker_lag(&self, index: usize) -> std::time::Duration {
        self.workers
            .get(index)
            .map_or(std::time::Duration::ZERO, |w| w.lag.now())
    }

    /// The least busy worker, counted as taking one more job.
    fn pick(&self) -> Result<&Worker, EngineError> {
        let worker = self
            .workers
            .iter()
            .min_by_key(|w| w.in_flight.load(Ordering::Relaxed))
            .ok_or(EngineError::ShuttingDown)?;
        worker.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(worker)
    }

    fn send(worker: &Worker, job: Job) -> Result<(), EngineError> {
        worker.jobs.send(job).map_err(|_| {
            worker.in_flight.fetch_sub(1, Ordering::Relaxed);
            EngineError::ShuttingDown
        })
    }

    pub async fn run(&self, request: RunRequest) -> Result<RunOutput, EngineError> {
        let worker = self.pick()?;
        let (reply, answer) = oneshot::channel();
        Self::send(worker, Job::Run { request, reply })?;
        answer.await.map_err(|_| EngineError::ShuttingDown)
    }

    /// Like [`run`](Self::run), but when called on one of this pool's worker threads the run
    /// stays on that thread instead of going to the least busy worker: no thread hop, no
    /// wake-up of another thread. (It still goes through the worker's queue, so the caller's
    /// future stays `Send` and may be polled anywhere on that thread.)
    pub async fn run_here_first(&self, request: RunRequest) -> Result<RunOutput, EngineError> {
        let here = HERE
            .with(Cell::get)
            .filter(|(pool, _)| *pool == self.id)
            .and_then(|(_, index)| self.workers.get(index));
        let Some(worker) = here else {
            return self.run(request).await;
        };
        worker.in_flight.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        Self::send(worker, Job::Run { request, reply })?;
        answer.await.map_err(|_| EngineError::ShuttingDown)
    }

    /// Hands `task` to the least busy worker, which drives it to completion on its thread.
    pub fn spawn(&self, task: LocalTask) -> Result<(), EngineError> {
        let worker = self.pick()?;
        Self::send(worker, Job::Task(task))
    }

    /// Hands `task` to worker `index` (0..[`size`](Self::size)), for work that belongs to one
    /// thread, such as a socket of its own. It counts as one job of that worker until it ends.
    pub fn spawn_on(&self, index: usize, task: LocalTask) -> Result<(), EngineError> {
        let worker = self.workers.get(index).ok_or(EngineError::ShuttingDown)?;
        worker.in_flight.fetch_add(1, Ordering::Relaxed);
        Self::send(worker, Job::Task(task))
    }
}

/// Lower the calling thread's priority by `niceness` (Linux: `setpriority` on id 0 is this
/// thread). On a busy machine the kernel then serves the RTP pacing and SIP threads first: a
/// late packet is heard, a script slice a millisecond later is not. Lowering needs no
/// privileges; raising would.
fn lower_own_priority(niceness: i32) {
    if niceness <= 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread; failure only leaves the priority as is.
    unsafe {
        let current = libc::getpriority(libc::PRIO_PROCESS, 0);
        if libc::setpriority(libc::PRIO_PROCESS, 0, current + niceness) != 0 {
            tracing::debug!("script worker priority unchanged");
        }
    }
}

fn worker_main(
    mut jobs: mpsc::UnboundedReceiver<Job>,
    in_flight: Arc<AtomicUsize>,
    lag: Arc<Lag>,
    (limits, modules, exec_host, niceness): (Limits, HostModules, String, i32),
) {
    lower_own_priority(niceness);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("script worker cannot start its event loop: {e}");
            return;
        }
    };
    let sandbox = Rc::new(Sandbox::new(limits, modules, exec_host));
    sandbox.prewarm();
    let local = tokio::task::LocalSet::new();
    local.spawn_local(lag.tick_forever());
    local.block_on(&runtime, async move {
        while let Some(job) = jobs.recv().await {
            let sandbox = sandbox.clone();
            let in_flight = in_flight.clone();
            match job {
                Job::Run { request, reply } => {
                    tokio::task::spawn_local(async move {
                        let (output, spent) = sandbox.run_unrecycled(request).await;
                        in_flight.fetch_sub(1, Ordering::Relaxed);
                        let _ = reply.send(output);
                        // Answer first: tearing down the context and preparing the next is
                        // not the caller's wait.
                        sandbox.recycle(spent);
                    });
                }
                Job::Task(task) => {
                    let work = task(LocalRunner { sandbox });
                    tokio::task::spawn_local(async move {
                        work.await;
                        in_flight.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            }
        }
    });
}
