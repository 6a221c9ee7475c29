//! The engine facade: a worker pool of sandboxes (each applies the mode's conventions, such as
//! class4 normalisation, to its runs).

use std::sync::Arc;

use serde_json::Value as Json;

use super::{
    compile::CompiledScript,
    error::EngineError,
    execution::{RunOutput, RunRequest},
    host::{HostModules, HostObject},
    mode::{Limits, Mode},
    pool::{LocalTask, WorkerPool},
};

/// Settings of an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub limits: Limits,
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    pub modules: HostModules,
    /// `process.env.EXEC_HOST`.
    pub exec_host: String,
    /// How much nicer than the rest of the process the workers run (0 = same priority).
    pub worker_niceness: i32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            limits: Limits::default(),
            workers: 0,
            modules: HostModules::new(),
            exec_host: hostname(),
            worker_niceness: 0,
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Runs scripts in fresh sandboxed contexts on a pool of worker threads.
pub struct Engine {
    pool: WorkerPool,
    limits: Limits,
}

/// One run as the caller describes it.
pub struct Invocation {
    pub script: Arc<CompiledScript>,
    pub mode: Mode,
    pub data: Json,
    pub function: Option<String>,
    pub ctx: Option<Box<dyn HostObject + Send>>,
}

impl Invocation {
    pub fn new(script: Arc<CompiledScript>, mode: Mode, data: Json) -> Self {
        Invocation {
            script,
            mode,
            data,
            function: None,
            ctx: None,
        }
    }
}

impl Engine {
    pub fn start(config: EngineConfig) -> Result<Self, EngineError> {
        let workers = if config.workers == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            config.workers
        };
        let pool = WorkerPool::start(
            workers,
            &config.limits,
            &config.modules,
            &config.exec_host,
            config.worker_niceness,
        )?;
        Ok(Engine {
            pool,
            limits: config.limits,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn workers(&self) -> usize {
        self.pool.size()
    }

    /// How late worker `index` is (see [`WorkerPool::worker_lag`]).
    pub fn worker_lag(&self, index: usize) -> std::time::Duration {
        self.pool.worker_lag(index)
    }

    /// How long new work waits before it starts (see [`WorkerPool::lag`]).
    pub fn lag(&self) -> std::time::Duration {
        self.pool.lag()
    }

    /// Runs executing or waiting on the workers.
    pub fn in_flight(&self) -> usize {
        self.pool.in_flight()
    }

    /// `driver` for scripts exporting driver functions, else `app` (the `run` command's default).
    pub fn default_mode(script: &CompiledScript) -> Mode {
        if script.is_driver {
            Mode::Driver
        } else {
            Mode::App
        }
    }

    /// Run once; the result follows the mode's conventions (class4 results are normalised).
    pub async fn run(&self, inv: Invocation) -> Result<RunOutput, EngineError> {
        self.pool
            .run(RunRequest {
                script: inv.script,
                mode: inv.mode,
                data: inv.data,
                function: inv.function,
                ctx: inv.ctx,
            })
            .await
    }

    /// Like [`run`](Self::run), but a run asked for on one of this engine's own worker threads
    /// stays on that thread (see [`WorkerPool::run_here_first`]).
    pub async fn run_here_first(&self, inv: Invocation) -> Result<RunOutput, EngineError> {
        self.pool
            .run_here_first(RunRequest {
                script: inv.script,
                mode: inv.mode,
                data: inv.data,
                function: inv.function,
                ctx: inv.ctx,
            })
            .await
    }

    /// Hands `task` to the least busy worker thread, which drives it there: the task prepares
    /// its runs, runs them with the given [`LocalRunner`](super::pool::LocalRunner) and acts on
    /// their results without crossing threads again. Nothing is returned to the caller.
    pub fn spawn_local(&self, task: LocalTask) -> Result<(), EngineError> {
        self.pool.spawn(task)
    }

    /// Hands `task` to worker thread `index` (see [`WorkerPool::spawn_on`]).
    pub fn spawn_on(&self, index: usize, task: LocalTask) -> Result<(), EngineError> {
        self.pool.spawn_on(index, task)
    }
}
