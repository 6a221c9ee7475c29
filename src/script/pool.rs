//! Worker threads that execute runs in parallel; each drives many async runs on its own thread.
//!
//! QuickJS runtimes are not `Send`, so a run lives on one worker from start to end. A worker is
//! a current-thread tokio runtime with a `LocalSet`: a run awaiting a host call costs a task,
//! not a thread, so thousands of calls can wait at once on two cores.

use std::{
    rc::Rc,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
};

use tokio::sync::{mpsc, oneshot};

use super::{
    error::EngineError,
    execution::{RunOutput, RunRequest, Sandbox},
    host::HostModules,
    mode::Limits,
};

struct Job {
    request: RunRequest,
    reply: oneshot::Sender<RunOutput>,
}

struct Worker {
    jobs: mpsc::UnboundedSender<Job>,
    in_flight: Arc<AtomicUsize>,
}

/// A fixed set of worker threads; runs go to the least busy one.
pub struct WorkerPool {
    workers: Vec<Worker>,
}

impl WorkerPool {
    pub fn start(
        count: usize,
        limits: &Limits,
        modules: &HostModules,
        exec_host: &str,
    ) -> Result<Self, EngineError> {
        let count = count.max(1);
        // The JS stack limit must fit well inside the thread's own stack.
        let stack = (limits.stack_bytes * 4).max(8 * 1024 * 1024);
        let mut workers = Vec::with_capacity(count);
        for index in 0..count {
            let (tx, rx) = mpsc::unbounded_channel();
            let in_flight = Arc::new(AtomicUsize::new(0));
            let sandbox = (limits.clone(), modules.clone(), exec_host.to_string());
            let counter = in_flight.clone();
            thread::Builder::new()
                .name(format!("script-{index}"))
                .stack_size(stack)
                .spawn(move || worker_main(rx, counter, sandbox))?;
            workers.push(Worker {
                jobs: tx,
                in_flight,
            });
        }
        Ok(WorkerPool { workers })
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

    pub async fn run(&self, request: RunRequest) -> Result<RunOutput, EngineError> {
        let worker = self
            .workers
            .iter()
            .min_by_key(|w| w.in_flight.load(Ordering::Relaxed))
            .ok_or(EngineError::ShuttingDown)?;
        let (reply, answer) = oneshot::channel();
        worker.in_flight.fetch_add(1, Ordering::Relaxed);
        if worker.jobs.send(Job { request, reply }).is_err() {
            worker.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::ShuttingDown);
        }
        answer.await.map_err(|_| EngineError::ShuttingDown)
    }
}

fn worker_main(
    mut jobs: mpsc::UnboundedReceiver<Job>,
    in_flight: Arc<AtomicUsize>,
    (limits, modules, exec_host): (Limits, HostModules, String),
) {
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
    local.block_on(&runtime, async move {
        while let Some(job) = jobs.recv().await {
            let sandbox = sandbox.clone();
            let in_flight = in_flight.clone();
            tokio::task::spawn_local(async move {
                let (output, spent) = sandbox.run_unrecycled(job.request).await;
                in_flight.fetch_sub(1, Ordering::Relaxed);
                let _ = job.reply.send(output);
                // Answer first: tearing down the context and preparing the next is not the
                // caller's wait.
                sandbox.recycle(spent);
            });
        }
    });
}
