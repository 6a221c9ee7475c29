//! One script execution: a fresh context, its limits, its globals, its entry point, and the loop
//! that settles its promises, timers and host calls until the run completes.

use std::{
    cell::{Cell, RefCell},
    collections::{BTreeMap, HashMap, HashSet},
    rc::{Rc, Weak},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{future::LocalBoxFuture, stream::FuturesUnordered, StreamExt};
use rquickjs::{
    context::intrinsic,
    function::{Rest, This},
    object::Filter,
    qjs, Context, Ctx, Exception, Function, Module, Object, Persistent, Promise, Runtime, Value,
};
use serde::Serialize;
use serde_json::Value as Json;

use super::{
    arena::{self, Arena},
    compile::{CompiledScript, ImportAs, SourceKind, DRIVER_FUNCTIONS},
    error::ScriptError,
    exception::{describe_exception, script_error_from},
    host::{HostCall, HostError, HostModules, HostObject, HostResult, MethodKind, Registered},
    imports::{classify, Imports, Target},
    inspect::console_text,
    mode::{Limits, Mode},
    shared::{Interruptible, Membership, SharedRuntime},
};

/// What the caller of the core asks for.
pub struct RunRequest {
    pub script: Arc<CompiledScript>,
    pub mode: Mode,
    /// The input: `data` in `main(data)`, `vars()`.
    pub data: Json,
    /// The function to call in driver mode.
    pub function: Option<String>,
    /// The `ctx` of a class5 call, implemented by the voice layer.
    pub ctx: Option<Box<dyn HostObject + Send>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    pub level: LogLevel,
    pub message: String,
}

/// How a run ended, with what it logged and what it cost.
#[derive(Debug)]
pub struct RunOutput {
    pub result: Result<Json, ScriptError>,
    pub logs: Vec<LogLine>,
    pub duration: Duration,
    /// Time spent executing JavaScript.
    pub cpu: Duration,
}

/// The built-ins a script gets. No `Eval`: `eval` and `new Function` cannot compile code.
/// Typed arrays, `Map`/`Set`/`WeakMap`/`WeakSet` and `WeakRef`/`FinalizationRegistry` are
/// added on first use (see [`LAZY_INTRINSICS`]).
type RunIntrinsics = (intrinsic::Date, SharedRunIntrinsics);

/// [`RunIntrinsics`] for a class5 call's context in a shared runtime, where `Date` is added
/// on first use too.
type SharedRunIntrinsics = (
    intrinsic::RegExpCompiler,
    intrinsic::RegExp,
    intrinsic::Json,
    intrinsic::Proxy,
    intrinsic::Promise,
);

/// The globals QuickJS's typed-array intrinsic defines. Building them is a quarter of a
/// context's cost and routing scripts almost never touch them, so they appear on first access.
const TYPED_ARRAY_GLOBALS: [&str; 16] = [
    "ArrayBuffer",
    "SharedArrayBuffer",
    "Int8Array",
    "Uint8Array",
    "Uint8ClampedArray",
    "Int16Array",
    "Uint16Array",
    "Int32Array",
    "Uint32Array",
    "BigInt64Array",
    "BigUint64Array",
    "Float16Array",
    "Float32Array",
    "Float64Array",
    "DataView",
    "Atomics",
];

/// An intrinsic reachable only through global names, added to a context when a script first
/// reads or writes one of them.
struct LazyIntrinsic {
    names: &'static [&'static str],
    add: unsafe extern "C" fn(*mut qjs::JSContext) -> std::ffi::c_int,
    /// Deferred only in contexts of a shared runtime (class5 calls), where it is memory held
    /// for the whole call; elsewhere the context is created with it ([`RunIntrinsics`]).
    only_shared: bool,
}

/// Each costs a context 10–250 k instructions to build and as much to collect, and routing
/// scripts rarely use them. (`RegExp`, `JSON` and `Promise` stay eager: the language itself
/// reaches some of them without a global name, as regular expression literals and async
/// functions do.)
///
/// `Date` is the exception that is deferred in class5 calls only. There it costs every live
/// call 2 KB that few scripts need. A class4 context is restored from a pristine image, where
/// an eager `Date` costs 2 KB more copying, while adding it on first use costs 43 k
/// instructions in every run of a routing script that reads the clock (`scripts/routing.js`:
/// 592 k against 549 k per run in `examples/class4_loop`).
const LAZY_INTRINSICS: [LazyIntrinsic; 4] = [
    LazyIntrinsic {
        names: &TYPED_ARRAY_GLOBALS,
        add: qjs::JS_AddIntrinsicTypedArrays,
        only_shared: false,
    },
    LazyIntrinsic {
        names: &["Map", "Set", "WeakMap", "WeakSet"],
        add: qjs::JS_AddIntrinsicMapSet,
        only_shared: false,
    },
    LazyIntrinsic {
        names: &["WeakRef", "FinalizationRegistry"],
        add: qjs::JS_AddIntrinsicWeakRef,
        only_shared: false,
    },
    LazyIntrinsic {
        names: &["Date"],
        add: qjs::JS_AddIntrinsicDate,
        only_shared: true,
    },
];

const MAX_LOG_LINE: usize = 8 * 1024;
const MAX_TIMERS: usize = 10_000;

/// Which limit ended a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LimitHit {
    Cpu,
    Memory,
    Stack,
    Wall,
}

/// Per-run state shared by the run loop and the host functions installed in the context.
struct RunState {
    name: RefCell<String>,
    /// The script's content id, to remember scripts that cannot use a pristine image.
    script_id: RefCell<String>,
    mode: Cell<Mode>,
    limits: Limits,
    cpu_budget: Cell<Duration>,
    cpu_used: Cell<Duration>,
    slice_start: Cell<Option<Instant>>,
    limit_hit: Cell<Option<LimitHit>>,
    /// Set by `exit()` / `err()`: the run's answer, already converted to Rust.
    completion: RefCell<Option<Result<Json, ScriptError>>>,
    /// An exception nobody caught in a timer callback.
    uncaught: RefCell<Option<ScriptError>>,
    logs: RefCell<Vec<LogLine>>,
    /// Console lines and bytes this run has logged, and whether it hit its budget.
    log_spent: Cell<(usize, usize)>,
    log_truncated: Cell<bool>,
    /// The host's "stop now" signal for this run (see `HostObject::stopped`).
    stop_signal: RefCell<Option<LocalBoxFuture<'static, ()>>>,
    timers: RefCell<BTreeMap<(Instant, u64), Persistent<Function<'static>>>>,
    host_calls: RefCell<FuturesUnordered<LocalBoxFuture<'static, (u64, HostResult)>>>,
    settlers: RefCell<HashMap<u64, Settler>>,
    /// The input `vars()` returns. JS handles live here, never inside closures stored in JS:
    /// a Rust-held reference inside the context's own functions is a cycle QuickJS's GC
    /// cannot see, and would keep the whole context alive.
    input: RefCell<Option<Persistent<Value<'static>>>>,
    /// `module` objects of the scripts this run `require`d, by name: a second `require`
    /// returns the same exports (and a cycle gets the partial ones), as in Node.
    required: RefCell<HashMap<String, Persistent<Object<'static>>>>,
    next_id: Cell<u64>,
    /// Set when the context lives in a runtime shared with other calls (class5).
    member: Option<Membership>,
    /// The context is a pristine image's, restored after every run (see `arena.rs`).
    pristine: bool,
    /// The run made JS objects that own Rust data (a host module, `api`, `fetch`): restoring
    /// the image would leak that data, so the image's runtime is torn down properly instead.
    impure: Cell<bool>,
    /// A host function panicked during the run (and the script may have caught the error):
    /// Rust state tied to the runtime may be inconsistent, so it is never reused.
    panicked: Cell<bool>,
    /// The operator's `[env]` sets `APP_ID`, so runs do not.
    operator_app_id: Cell<bool>,
    /// The script of the run under way, for `process.env`'s per-run values, which are made
    /// only when a run first reads `process.env` (see `install_process_env`).
    script: RefCell<Option<Arc<CompiledScript>>>,
    /// The JS methods of the run's host objects (see `HostObject::js_methods`), by the index
    /// their functions were given.
    js_methods: RefCell<Vec<LazyJsMethods>>,
}

/// A host object's JS methods, made on first use.
struct LazyJsMethods {
    raw: Persistent<Object<'static>>,
    source: Arc<CompiledScript>,
    made: Option<Persistent<Object<'static>>>,
}

struct Settler {
    resolve: Persistent<Function<'static>>,
    reject: Persistent<Function<'static>>,
}

impl RunState {
    fn new(limits: Limits) -> Self {
        RunState {
            name: RefCell::new(String::new()),
            script_id: RefCell::new(String::new()),
            mode: Cell::new(Mode::App),
            cpu_budget: Cell::new(limits.app_cpu),
            limits,
            cpu_used: Cell::new(Duration::ZERO),
            slice_start: Cell::new(None),
            limit_hit: Cell::new(None),
            completion: RefCell::new(None),
            uncaught: RefCell::new(None),
            logs: RefCell::new(Vec::new()),
            log_spent: Cell::new((0, 0)),
            log_truncated: Cell::new(false),
            stop_signal: RefCell::new(None),
            timers: RefCell::new(BTreeMap::new()),
            host_calls: RefCell::new(FuturesUnordered::new()),
            settlers: RefCell::new(HashMap::new()),
            input: RefCell::new(None),
            required: RefCell::new(HashMap::new()),
            next_id: Cell::new(0),
            member: None,
            pristine: false,
            impure: Cell::new(false),
            panicked: Cell::new(false),
            operator_app_id: Cell::new(false),
            script: RefCell::new(None),
            js_methods: RefCell::new(Vec::new()),
        }
    }

    /// Forget the last run (a pristine image's state serves one run after another).
    fn reset(&self) {
        self.release_js();
        self.cpu_used.set(Duration::ZERO);
        self.slice_start.set(None);
        self.limit_hit.set(None);
        self.completion.borrow_mut().take();
        self.uncaught.borrow_mut().take();
        self.logs.borrow_mut().clear();
        self.log_spent.set((0, 0));
        self.log_truncated.set(false);
        self.next_id.set(0);
        self.impure.set(false);
    }

    /// Note a host function's panic: logged, the runtime marked never to be reused, and the
    /// run's error returned.
    fn host_panicked(&self, panic: &(dyn std::any::Any + Send)) -> ScriptError {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        tracing::error!(script = %self.name.borrow(), "host function panicked: {what}");
        self.panicked.set(true);
        ScriptError::internal(format!("internal error in a host function: {what}"))
    }

    /// Bind this (prepared, unused) state to the run about to start.
    fn begin(&self, script: &CompiledScript, mode: Mode) {
        self.name.borrow_mut().clone_from(&script.name);
        self.script_id.borrow_mut().clone_from(&script.id);
        self.mode.set(mode);
        self.cpu_budget.set(self.limits.cpu_for(mode));
    }

    fn next_id(&self) -> u64 {
        let id = self.next_id.get() + 1;
        self.next_id.set(id);
        id
    }

    /// Execute JavaScript, charging the time to the run's CPU budget.
    fn slice<R>(self: &Rc<Self>, context: &Context, f: impl FnOnce(Ctx<'_>) -> R) -> R {
        // In a shared runtime, interrupts and allocations are this run's while it executes.
        let _active = self.member.as_ref().map(|m| m.enter(self.clone()));
        self.slice_start.set(Some(Instant::now()));
        let out = context.with(f);
        if let Some(start) = self.slice_start.take() {
            self.cpu_used.set(self.cpu_used.get() + start.elapsed());
        }
        if let Some(m) = &self.member {
            m.collect_if_heavy();
        }
        out
    }

    /// Called by QuickJS every few thousand instructions: true aborts with an uncatchable error.
    fn should_interrupt(&self) -> bool {
        if self.completion.borrow().is_some() {
            return true;
        }
        if let Some(start) = self.slice_start.get() {
            if self.cpu_used.get() + start.elapsed() > self.cpu_budget.get() {
                self.limit_hit.set(Some(LimitHit::Cpu));
                return true;
            }
        }
        self.limit_hit.get().is_some()
    }

    fn limit_error(&self, hit: LimitHit) -> ScriptError {
        let message = match hit {
            LimitHit::Cpu => format!(
                "CPU time limit of {} ms exceeded",
                self.cpu_budget.get().as_millis()
            ),
            LimitHit::Memory => format!(
                "memory limit of {} MiB exceeded",
                self.limits.memory_bytes / (1024 * 1024)
            ),
            LimitHit::Stack => format!(
                "stack limit of {} KiB exceeded",
                self.limits.stack_bytes / 1024
            ),
            LimitHit::Wall => format!(
                "wall time limit of {} ms exceeded",
                self.limits.wall.as_millis()
            ),
        };
        ScriptError::internal(message)
    }

    /// If the run must stop now (exit/err, a limit, an uncaught timer error), how it ends.
    fn stop(&self) -> Option<Result<Json, ScriptError>> {
        if let Some(done) = self.completion.borrow().clone() {
            return Some(done);
        }
        if let Some(hit) = self.limit_hit.get() {
            return Some(Err(self.limit_error(hit)));
        }
        self.uncaught.borrow().clone().map(Err)
    }

    /// Turn a thrown value into the run's error, recognising the engine's own limits.
    fn error_from_thrown(&self, thrown: &Value<'_>) -> ScriptError {
        if let Some(Err(e)) = self.stop() {
            return e;
        }
        if thrown.is_null() {
            // QuickJS throws null when it cannot even allocate the error object.
            self.limit_hit.set(Some(LimitHit::Memory));
            return self.limit_error(LimitHit::Memory);
        }
        let described = describe_exception(thrown);
        if described.text.contains("out of memory") {
            self.limit_hit.set(Some(LimitHit::Memory));
            return self.limit_error(LimitHit::Memory);
        }
        if described.text.contains("stack overflow")
            || described.text.contains("Maximum call stack size exceeded")
        {
            self.limit_hit.set(Some(LimitHit::Stack));
            return self.limit_error(LimitHit::Stack);
        }
        if described.text.contains("interrupted") {
            if let Some(hit) = self.limit_hit.get() {
                return self.limit_error(hit);
            }
        }
        script_error_from(thrown)
    }

    /// The error for a failed rquickjs call: the pending exception, or the library's own error.
    fn error_from(&self, ctx: &Ctx<'_>, err: rquickjs::Error) -> ScriptError {
        match err {
            rquickjs::Error::Exception => {
                let thrown = ctx.catch();
                self.error_from_thrown(&thrown)
            }
            rquickjs::Error::Allocation => {
                self.limit_hit.set(Some(LimitHit::Memory));
                self.limit_error(LimitHit::Memory)
            }
            other => self
                .stop()
                .and_then(Result::err)
                .unwrap_or_else(|| ScriptError::internal(other.to_string())),
        }
    }

    fn log(&self, level: LogLevel, mut message: String) {
        if self.log_truncated.get() {
            return;
        }
        if message.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        // A console loop must not fill the server's disk before its CPU limit ends it: past
        // the run's budget one line says so and the rest is dropped.
        let (lines, bytes) = self.log_spent.get();
        if lines >= self.limits.max_log_lines || bytes + message.len() > self.limits.max_log_bytes {
            self.log_truncated.set(true);
            let note = format!(
                "console output truncated: this run logged {lines} lines ({bytes} bytes), the \
                 limit is {} lines or {} bytes",
                self.limits.max_log_lines, self.limits.max_log_bytes
            );
            tracing::warn!(target: "script", script = %self.name.borrow(), "{note}");
            self.logs.borrow_mut().push(LogLine {
                level: LogLevel::Warn,
                message: note,
            });
            return;
        }
        self.log_spent.set((lines + 1, bytes + message.len()));
        match level {
            LogLevel::Debug => {
                tracing::debug!(target: "script", script = %self.name.borrow(), "{message}")
            }
            LogLevel::Info => {
                tracing::info!(target: "script", script = %self.name.borrow(), "{message}")
            }
            LogLevel::Warn => {
                tracing::warn!(target: "script", script = %self.name.borrow(), "{message}")
            }
            LogLevel::Error => {
                tracing::error!(target: "script", script = %self.name.borrow(), "{message}")
            }
        }
        self.logs.borrow_mut().push(LogLine { level, message });
    }

    /// Drop every JS handle the run holds; must happen while the runtime is alive.
    fn release_js(&self) {
        self.stop_signal.borrow_mut().take();
        self.timers.borrow_mut().clear();
        self.settlers.borrow_mut().clear();
        self.input.borrow_mut().take();
        self.required.borrow_mut().clear();
        self.script.borrow_mut().take();
        self.js_methods.borrow_mut().clear();
        *self.host_calls.borrow_mut() = FuturesUnordered::new();
    }
}

impl Interruptible for RunState {
    fn should_interrupt(&self) -> bool {
        RunState::should_interrupt(self)
    }
}

/// A runtime with a fresh, never-used context whose common globals are installed, waiting for
/// its one run. Preparing happens off the request path (after the previous answer was sent).
struct Prepared {
    // Field order is drop order: JS handles and the context go before their runtime, and the
    // runtime before the arena it lives in.
    state: Rc<RunState>,
    /// A pristine context's own handles on its host functions (see [`pin_host_objects`]).
    pins: Vec<Persistent<Value<'static>>>,
    context: Context,
    rt: Runtime,
    image: Option<Image>,
}

/// A pristine runtime's saved bytes and the arena they are restored into.
struct Image {
    bytes: arena::Image,
    arena: Arena,
}

/// Drops a run's JS handles when the run ends, however it ends.
struct ReleaseOnDrop(Rc<RunState>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release_js();
    }
}

/// A context that has served its run, to be recycled by [`Sandbox::recycle`].
pub struct Spent {
    prepared: Prepared,
    /// False when the run hit a limit or panicked: the runtime is then never reused.
    reusable: bool,
}

/// The per-worker-thread executor: owns runtimes and runs scripts in fresh contexts.
pub struct Sandbox {
    limits: Limits,
    /// Shared: each run's `require` and `process.env` closures keep a handle for the run's
    /// life, and a copy of the module tables was several KiB per live call.
    modules: Arc<HostModules>,
    exec_host: String,
    ready: RefCell<Vec<Prepared>>,
    idle: RefCell<Vec<Runtime>>,
    recycled: Cell<u64>,
    /// Runtimes hosting class5 calls, several per runtime (see `shared.rs`).
    shared: RefCell<Vec<Rc<SharedRuntime>>>,
    /// The pristine context between runs (see [`Sandbox::build_pristine`]).
    pristine: RefCell<Option<Prepared>>,
    /// The state of the pristine context a run holds now (dead when none is out, including
    /// when a run's future was dropped without recycling it).
    pristine_out: RefCell<Weak<RunState>>,
    /// False after building one failed: runs then use ordinary fresh contexts.
    pristine_enabled: Cell<bool>,
    /// Content ids of scripts that use host modules: they run in ordinary fresh contexts.
    impure_scripts: RefCell<HashSet<String>>,
    /// Runs that ended with the pristine image restored.
    restores: Cell<u64>,
}

/// Address space reserved beyond twice the memory limit for a pristine runtime's arena.
const ARENA_SLACK: usize = 4 * 1024 * 1024;
/// A pristine runtime collects garbage during a run only past this much memory.
const PRISTINE_GC_THRESHOLD: usize = 4 * 1024 * 1024;
const MAX_IMPURE_SCRIPTS: usize = 4096;

/// Bytes allocated between automatic collections (see `new_runtime`).
const GC_THRESHOLD: usize = 128 * 1024;
/// Prepared contexts a worker keeps ready.
const MAX_READY: usize = 4;
const MAX_IDLE_RUNTIMES: usize = 32;
/// A runtime still holding more than this after a run and a GC is not reused.
const REUSE_MALLOC_CEILING: i64 = 8 * 1024 * 1024;
/// How often (in recycled runs) a runtime's memory use is measured; measuring costs a walk.
const MEMORY_CHECK_EVERY: u64 = 64;

impl Sandbox {
    pub fn new(limits: Limits, modules: HostModules, exec_host: String) -> Self {
        Sandbox {
            limits,
            modules: Arc::new(modules),
            exec_host,
            ready: RefCell::new(Vec::new()),
            idle: RefCell::new(Vec::new()),
            recycled: Cell::new(0),
            shared: RefCell::new(Vec::new()),
            pristine: RefCell::new(None),
            pristine_out: RefCell::new(Weak::new()),
            pristine_enabled: Cell::new(true),
            impure_scripts: RefCell::new(HashSet::new()),
            restores: Cell::new(0),
        }
    }

    fn new_runtime(&self) -> Result<Runtime, ScriptError> {
        let rt = Runtime::new()
            .map_err(|e| ScriptError::internal(format!("cannot create a JS runtime: {e}")))?;
        rt.set_memory_limit(self.limits.memory_bytes);
        rt.set_max_stack_size(self.limits.stack_bytes);
        // A class5 script holds its runtime for the whole call: collect at 128 KiB of new
        // allocations rather than QuickJS's 256 KiB, so a thousand waiting calls stay small.
        rt.set_gc_threshold(GC_THRESHOLD);
        Imports::install(&rt, &self.modules);
        Ok(rt)
    }

    fn prepare(&self, rt: Option<Runtime>) -> Result<Prepared, ScriptError> {
        let rt = match rt.or_else(|| self.idle.borrow_mut().pop()) {
            Some(rt) => rt,
            None => self.new_runtime()?,
        };
        let state = Rc::new(RunState::new(self.limits.clone()));
        let handler_state = state.clone();
        rt.set_interrupt_handler(Some(Box::new(move || handler_state.should_interrupt())));
        let context = Context::custom::<RunIntrinsics>(&rt)
            .map_err(|e| ScriptError::internal(format!("cannot create a JS context: {e}")))?;
        context
            .with(|ctx| install_common_globals(&ctx, &state, self))
            .map_err(|e| ScriptError::internal(format!("cannot install globals: {e}")))?;
        Ok(Prepared {
            state,
            pins: Vec::new(),
            context,
            rt,
            image: None,
        })
    }

    /// Build a runtime and a prepared context inside a fresh arena, and save the arena's
    /// bytes: every later run gets this never-used context back by copying them over.
    fn build_pristine(&self) -> Result<Prepared, ScriptError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            ScriptError::internal(format!("cannot build a pristine JS runtime: {what}: {e}"))
        };
        // Room for the memory limit twice over: TLSF merges freed neighbours, but a run that
        // frees in a scattered pattern still leaves holes (address space costs nothing
        // until touched).
        let capacity = self.limits.memory_bytes.saturating_mul(2) + ARENA_SLACK;
        let arena = Arena::new(capacity).map_err(|e| fail("reserving memory", &e))?;
        let rt = Runtime::new_with_alloc(arena.allocator()).map_err(|e| fail("runtime", &e))?;
        rt.set_memory_limit(self.limits.memory_bytes);
        rt.set_max_stack_size(self.limits.stack_bytes);
        // Garbage dies with the restore: collecting during a run only when it grows large.
        rt.set_gc_threshold(PRISTINE_GC_THRESHOLD);
        Imports::install(&rt, &self.modules);
        let mut state = RunState::new(self.limits.clone());
        state.pristine = true;
        let state = Rc::new(state);
        let handler_state = state.clone();
        rt.set_interrupt_handler(Some(Box::new(move || handler_state.should_interrupt())));
        let context = Context::custom::<RunIntrinsics>(&rt).map_err(|e| fail("context", &e))?;
        let pins = context
            .with(|ctx| {
                let ours = |ctx: &Ctx<'_>| -> rquickjs::Result<HashSet<String>> {
                    ctx.globals().own_keys(Filter::new().string()).collect()
                };
                let before = ours(&ctx)?;
                install_common_globals(&ctx, &state, self)?;
                install_timers(&ctx, &state)?;
                let random = install_fresh_random(&ctx)?;
                // Names we added are walked one level down; names we may have redefined
                // (`eval`) are pinned where they stand.
                let names = ours(&ctx)?.into_iter().map(|n| {
                    let descend = !before.contains(&n);
                    (n, descend)
                });
                let mut pins = vec![Persistent::save(&ctx, random.into_value())];
                pin_host_objects(&ctx, names, &mut pins)?;
                Ok::<_, rquickjs::Error>(pins)
            })
            .map_err(|e| fail("globals", &e))?;
        let bytes = arena.capture();
        tracing::debug!(bytes = bytes.len(), "built a pristine JS runtime image");
        Ok(Prepared {
            state,
            pins,
            context,
            rt,
            image: Some(Image { bytes, arena }),
        })
    }

    /// A fresh context for a class5 call, in a runtime shared with other calls.
    fn prepare_shared(&self) -> Result<Prepared, ScriptError> {
        let existing = self.shared.borrow().iter().find(|r| r.has_room()).cloned();
        let runtime = match existing {
            Some(r) => r,
            None => {
                let r = SharedRuntime::new(self.limits.stack_bytes, GC_THRESHOLD).map_err(|e| {
                    ScriptError::internal(format!("cannot create a JS runtime: {e}"))
                })?;
                Imports::install(&r.rt, &self.modules);
                self.shared.borrow_mut().push(r.clone());
                r
            }
        };
        let member = runtime.join(self.limits.memory_bytes);
        let context = Context::custom::<SharedRunIntrinsics>(&runtime.rt);
        let mut state = RunState::new(self.limits.clone());
        state.member = Some(member);
        let state = Rc::new(state);
        let prepared = context
            .map_err(|e| ScriptError::internal(format!("cannot create a JS context: {e}")))
            .and_then(|context| {
                context
                    .with(|ctx| {
                        install_common_globals(&ctx, &state, self)?;
                        // Its callbacks are queued by whichever call's allocation ran the
                        // collector, and would run (and be timed) as that call.
                        ctx.globals().remove("FinalizationRegistry")
                    })
                    .map_err(|e| ScriptError::internal(format!("cannot install globals: {e}")))?;
                Ok(context)
            });
        match prepared {
            Ok(context) => Ok(Prepared {
                state,
                pins: Vec::new(),
                context,
                rt: runtime.rt.clone(),
                image: None,
            }),
            Err(e) => {
                self.leave_shared(state, false);
                Err(e)
            }
        }
    }

    /// A shared-runtime run is over and its context dropped: free its place.
    fn leave_shared(&self, state: Rc<RunState>, healthy: bool) {
        // The context's own functions may hold the state until the runtime's next collection.
        let Some((runtime, slot)) = state.member.as_ref().map(|m| (m.runtime.clone(), m.slot))
        else {
            return;
        };
        drop(state);
        runtime.leave(slot, healthy);
        if runtime.members() == 0 {
            let mut all = self.shared.borrow_mut();
            let empty = all.iter().filter(|r| r.members() == 0).count();
            if runtime.is_retired() || empty > 1 {
                all.retain(|r| !Rc::ptr_eq(r, &runtime));
                drop(all);
                if let Ok(runtime) = Rc::try_unwrap(runtime) {
                    if runtime.rt.memory_usage().obj_count > 0 {
                        tracing::warn!("discarding a shared JS runtime that still holds objects");
                        std::mem::forget(runtime);
                    }
                }
            }
        }
    }

    /// The pristine context, when this script may use it: built on first use; not for
    /// scripts whose runs made objects owning Rust data (see [`RunState::impure`]), and not
    /// while another run on this thread holds it (an async run waiting for a host call).
    fn take_pristine(&self, script: &CompiledScript) -> Option<Prepared> {
        if !self.pristine_enabled.get() || self.impure_scripts.borrow().contains(&script.id) {
            return None;
        }
        if let Some(ready) = self.pristine.borrow_mut().take() {
            return Some(ready);
        }
        if self.pristine_out.borrow().strong_count() > 0 {
            return None;
        }
        match self.build_pristine() {
            Ok(p) => {
                *self.pristine_out.borrow_mut() = Rc::downgrade(&p.state);
                Some(p)
            }
            Err(e) => {
                tracing::warn!("pristine contexts disabled on this worker: {e}");
                self.pristine_enabled.set(false);
                None
            }
        }
    }

    /// Restore a pristine context for the next run, or tear its runtime down when restoring
    /// would leak (an impure run) or when a host function panicked mid-run.
    fn recycle_pristine(
        &self,
        state: Rc<RunState>,
        pins: Vec<Persistent<Value<'static>>>,
        context: Context,
        rt: Runtime,
        image: Image,
    ) {
        if !state.impure.get() && !state.panicked.get() {
            state.reset();
            // SAFETY: the run's handles are gone: `execute` dropped its `Persistent`s, and
            // `reset` the ones the state kept. The pins, context and runtime handles kept
            // here were taken before the capture, so the image accounts for them.
            unsafe { image.arena.restore(&image.bytes) };
            self.restores.set(self.restores.get() + 1);
            *self.pristine.borrow_mut() = Some(Prepared {
                state,
                pins,
                context,
                rt,
                image: Some(image),
            });
            return;
        }
        *self.pristine_out.borrow_mut() = Weak::new();
        if state.impure.get() {
            let mut impure = self.impure_scripts.borrow_mut();
            if impure.len() >= MAX_IMPURE_SCRIPTS {
                impure.clear();
            }
            impure.insert(state.script_id.borrow().clone());
        }
        state.release_js();
        drop(pins);
        drop(context);
        rt.set_interrupt_handler(None);
        drop(state);
        rt.run_gc();
        if rt.memory_usage().obj_count > 0 {
            // Freeing it would trip QuickJS's leak assertion; it is never touched again, so
            // its arena can go.
            tracing::warn!("discarding a pristine JS runtime that still holds objects");
            std::mem::forget(rt);
        } else {
            drop(rt);
        }
        drop(image);
    }

    /// How many runs ended by restoring the pristine image.
    pub fn pristine_restores(&self) -> u64 {
        self.restores.get()
    }

    /// Bytes a restore copies, when a pristine image is waiting for its next run.
    pub fn pristine_image_bytes(&self) -> Option<usize> {
        let slot = self.pristine.borrow();
        slot.as_ref()
            .and_then(|p| p.image.as_ref())
            .map(|i| i.bytes.len())
    }

    /// Prepare contexts ahead of time so the next runs skip context creation.
    pub fn prewarm(&self) {
        while self.ready.borrow().len() < MAX_READY {
            match self.prepare(None) {
                Ok(p) => self.ready.borrow_mut().push(p),
                Err(e) => {
                    tracing::warn!("cannot prewarm a script context: {e}");
                    return;
                }
            }
        }
    }

    /// Run one script to completion and recycle its context.
    pub async fn run(&self, req: RunRequest) -> RunOutput {
        let (output, spent) = self.run_unrecycled(req).await;
        self.recycle(spent);
        output
    }

    /// Run one script to completion. Never panics: a panic in a host callback is this run's
    /// 500. The caller answers first and then hands the spent context to [`Sandbox::recycle`],
    /// so tearing it down and preparing the next one stay off the request's path.
    pub async fn run_unrecycled(&self, mut req: RunRequest) -> (RunOutput, Option<Spent>) {
        let started = Instant::now();
        let prepared = if req.mode == Mode::Class5 {
            // Calls live long and many at once: they share runtimes (see `shared.rs`).
            self.prepare_shared()
        } else if let Some(pristine) = self.take_pristine(&req.script) {
            Ok(pristine)
        } else {
            let ready = self.ready.borrow_mut().pop();
            ready.map(Ok).unwrap_or_else(|| self.prepare(None))
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                let output = RunOutput {
                    result: Err(e),
                    logs: Vec::new(),
                    duration: started.elapsed(),
                    cpu: Duration::ZERO,
                };
                return (output, None);
            }
        };
        let state = prepared.state.clone();
        // If this future is dropped mid-run, the run's handles go before its context does
        // (declared after `prepared`, the guard is dropped first).
        let _release = ReleaseOnDrop(state.clone());
        state.begin(&req.script, req.mode);
        let mode = req.mode;
        // Class 4 normalises its answer against the input; other runs drop it once it is in
        // the context (a class5 call would otherwise hold a copy of its `data` all call long).
        let mut data = Some(std::mem::take(&mut req.data));
        let run = std::panic::AssertUnwindSafe(execute(&prepared.context, &state, req, &mut data));
        let mut result = match futures::FutureExt::catch_unwind(run).await {
            Ok(result) => result,
            Err(panic) => Err(state.host_panicked(&*panic)),
        };
        let limit = state.limit_hit.get();
        let reusable = limit.is_none() && !state.panicked.get();
        let m = crate::metrics::metrics();
        if let Some(hit) = limit {
            let kind = match hit {
                LimitHit::Cpu => "script_cpu",
                LimitHit::Memory => "script_memory",
                LimitHit::Stack => "script_stack",
                LimitHit::Wall => "script_wall",
            };
            crate::metrics::Metrics::inc(&m.limit_hits, "kind", kind);
        }
        let outcome = match (&result, limit) {
            (Ok(_), _) => "ok",
            (Err(_), Some(_)) => "limit",
            (Err(_), None) => "error",
        };
        m.script_run(mode.as_str(), outcome, started.elapsed());
        if let (Mode::Class4, Ok(value)) = (mode, &mut result) {
            // The input is not needed any more: normalising moves it instead of copying it.
            *value = super::class4::normalise(data.unwrap_or_default(), std::mem::take(value));
        }
        let logs = std::mem::take(&mut *state.logs.borrow_mut());
        let output = RunOutput {
            result,
            logs,
            duration: started.elapsed(),
            cpu: state.cpu_used.get(),
        };
        (output, Some(Spent { prepared, reusable }))
    }

    /// Tear down a spent context and, when its runtime is healthy, prepare the next one in it.
    pub fn recycle(&self, spent: Option<Spent>) {
        let Some(Spent { prepared, reusable }) = spent else {
            return;
        };
        let Prepared {
            state,
            pins,
            context,
            rt,
            image,
        } = prepared;
        if let Some(image) = image {
            self.recycle_pristine(state, pins, context, rt, image);
            return;
        }
        if state.member.is_some() {
            // Jobs the run left behind must not run in another call's slice: run them now,
            // as this run (which is over, so they are interrupted at once).
            if rt.is_job_pending() {
                state.completion.borrow_mut().get_or_insert(Ok(Json::Null));
                state.slice(&context, |ctx| while ctx.execute_pending_job() {});
            }
            state.release_js();
            drop(context);
            drop(rt);
            self.leave_shared(state, reusable);
            return;
        }
        state.release_js();
        drop(context);
        rt.set_interrupt_handler(None);
        drop(state);
        rt.run_gc();
        let count = self.recycled.get() + 1;
        self.recycled.set(count);
        let healthy = reusable
            && (count % MEMORY_CHECK_EVERY != 0
                || rt.memory_usage().malloc_size < REUSE_MALLOC_CEILING);
        if !healthy {
            // A runtime that still holds objects after its context is gone would abort in
            // QuickJS's own leak assertion when freed; leaking it is the lesser evil.
            if !reusable && rt.memory_usage().obj_count > 0 {
                tracing::warn!("discarding a JS runtime that still holds objects");
                std::mem::forget(rt);
            }
            return;
        }
        if self.ready.borrow().len() < MAX_READY {
            match self.prepare(Some(rt)) {
                Ok(p) => self.ready.borrow_mut().push(p),
                Err(e) => tracing::warn!("cannot prepare a script context: {e}"),
            }
        } else if self.idle.borrow().len() < MAX_IDLE_RUNTIMES {
            self.idle.borrow_mut().push(rt);
        }
    }
}

/// Where the script's entry points are found after its top level ran.
struct Loaded {
    namespace: Option<Persistent<Object<'static>>>,
    data: Persistent<Value<'static>>,
    ctx_object: Option<Persistent<Object<'static>>>,
}

async fn execute(
    context: &Context,
    state: &Rc<RunState>,
    req: RunRequest,
    data: &mut Option<Json>,
) -> Result<Json, ScriptError> {
    match execute_steps(context, state, req, data).await {
        Ok(json) => Ok(json),
        Err(Finished(answer)) => answer,
    }
}

async fn execute_steps(
    context: &Context,
    state: &Rc<RunState>,
    req: RunRequest,
    input: &mut Option<Json>,
) -> Result<Json, Finished> {
    let wall_deadline = state.limits.wall_for(req.mode).map(|w| Instant::now() + w);
    let script = req.script.clone();
    let ctx_host: Option<Rc<dyn HostObject>> = req.ctx.map(|b| Rc::from(b as Box<dyn HostObject>));
    *state.stop_signal.borrow_mut() = ctx_host.as_ref().and_then(|h| h.stopped());

    // Top level: globals, then the script's own top-level code.
    let (loaded, module_promise) = state
        .slice(context, |ctx| {
            let fail = |e| state.error_from(&ctx, e);
            let data = json_to_js(&ctx, input.as_ref().unwrap_or(&Json::Null)).map_err(fail)?;
            if req.mode != Mode::Class4 {
                input.take();
            }
            install_run_globals(&ctx, state, &script, data.clone()).map_err(fail)?;
            let ctx_object = match &ctx_host {
                Some(host) => {
                    let raw = host_object_to_js(&ctx, state, host.clone()).map_err(fail)?;
                    let object = match host.prelude() {
                        None => raw,
                        Some(prelude) => wrap_with_prelude(&ctx, &prelude, raw).map_err(fail)?,
                    };
                    Some(Persistent::save(&ctx, object))
                }
                None => None,
            };
            let (namespace, promise) = evaluate_top_level(&ctx, &script).map_err(fail)?;
            Ok((
                Loaded {
                    namespace: namespace.map(|n| Persistent::save(&ctx, n)),
                    data: Persistent::save(&ctx, data),
                    ctx_object,
                },
                promise.map(|p| Persistent::save(&ctx, p)),
            ))
        })
        .map_err(|e| state.finish_with(e))?;
    if let Some(done) = state.finished() {
        return Err(done);
    }
    if let Some(promise) = module_promise {
        settle(state, context, promise, wall_deadline).await?;
    }

    // The entry point.
    let returned = state
        .slice(context, |ctx| {
            let fail = |e| state.error_from(&ctx, e);
            let entry = find_entry(&ctx, &loaded, req.mode, req.function.as_deref())?;
            let data = loaded.data.clone().restore(&ctx).map_err(fail)?;
            let ctx_arg = match &loaded.ctx_object {
                Some(o) => o.clone().restore(&ctx).map_err(fail)?.into_value(),
                None => Value::new_undefined(ctx.clone()),
            };
            let value: Value = entry.call((data, ctx_arg)).map_err(fail)?;
            Ok(match value.as_promise() {
                Some(p) => Returned::Promise(Persistent::save(&ctx, p.clone())),
                None => Returned::Value(Persistent::save(&ctx, value)),
            })
        })
        .map_err(|e| state.finish_with(e))?;
    if let Some(done) = state.finished() {
        return Err(done);
    }
    let value = match returned {
        Returned::Value(v) => v,
        Returned::Promise(p) => settle(state, context, p, wall_deadline).await?,
    };
    state
        .slice(context, |ctx| {
            let value = value.restore(&ctx).map_err(|e| state.error_from(&ctx, e))?;
            // `return vars` (scripts that use the input as the object `vars`) is the input.
            let value = if value.is_function()
                && ctx.globals().get::<_, Value>("vars").ok().as_ref() == Some(&value)
            {
                loaded
                    .data
                    .clone()
                    .restore(&ctx)
                    .map_err(|e| state.error_from(&ctx, e))?
            } else {
                value
            };
            js_to_json(&ctx, value).map_err(|e| match e {
                rquickjs::Error::Exception => {
                    let thrown = ctx.catch();
                    ScriptError::internal(format!(
                        "the result is not JSON-serialisable: {}",
                        describe_exception(&thrown).text
                    ))
                }
                other => state.error_from(&ctx, other),
            })
        })
        .map_err(|e| state.finish_with(e))
}

enum Returned {
    Value(Persistent<Value<'static>>),
    Promise(Persistent<Promise<'static>>),
}

/// The run ended early (exit/err, a limit, a rejection): its final answer.
struct Finished(Result<Json, ScriptError>);

impl RunState {
    /// A failed step ends the run with exit()/err()'s answer when one was given, else with `e`.
    fn finish_with(&self, e: ScriptError) -> Finished {
        Finished(self.stop().unwrap_or(Err(e)))
    }
    fn finished(&self) -> Option<Finished> {
        self.stop().map(Finished)
    }
}

/// Run jobs, timers and host calls until `promise` settles (or the run must stop).
async fn settle(
    state: &Rc<RunState>,
    context: &Context,
    promise: Persistent<Promise<'static>>,
    wall_deadline: Option<Instant>,
) -> Result<Persistent<Value<'static>>, Finished> {
    loop {
        loop {
            let more = state.slice(context, |ctx| ctx.execute_pending_job());
            if let Some(done) = state.finished() {
                return Err(done);
            }
            if !more {
                break;
            }
        }
        let settled = state.slice(context, |ctx| {
            let p = promise
                .clone()
                .restore(&ctx)
                .map_err(|e| state.error_from(&ctx, e))?;
            match p.state() {
                rquickjs::promise::PromiseState::Pending => Ok(None),
                rquickjs::promise::PromiseState::Resolved => {
                    let v: Value = p
                        .result()
                        .unwrap_or_else(|| Ok(Value::new_undefined(ctx.clone())))
                        .map_err(|e| state.error_from(&ctx, e))?;
                    Ok(Some(Persistent::save(&ctx, v)))
                }
                rquickjs::promise::PromiseState::Rejected => {
                    let reason = match p.result::<Value>() {
                        Some(Err(rquickjs::Error::Exception)) | None => ctx.catch(),
                        Some(Ok(v)) => v,
                        Some(Err(e)) => return Err(state.error_from(&ctx, e)),
                    };
                    Err(state.error_from_thrown(&reason))
                }
            }
        });
        match settled {
            Err(e) => return Err(state.finish_with(e)),
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
        }
        if let Err(e) = wait_for_event(state, context, wall_deadline).await {
            return Err(state.finish_with(e));
        }
        if let Some(done) = state.finished() {
            return Err(done);
        }
    }
}

/// Wait for the next timer or host call, and deliver it to the script.
async fn wait_for_event(
    state: &Rc<RunState>,
    context: &Context,
    wall_deadline: Option<Instant>,
) -> Result<(), ScriptError> {
    let next_timer = state.timers.borrow().keys().next().map(|(at, _)| *at);
    let mut calls = std::mem::take(&mut *state.host_calls.borrow_mut());
    if next_timer.is_none() && calls.is_empty() {
        return Err(ScriptError::internal(
            "the script's promise never settled: nothing is pending (no timer, no host call)",
        ));
    }
    let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let timer_at = next_timer.unwrap_or(far);
    let wall_at = wall_deadline.unwrap_or(far);
    enum Event {
        Host(u64, HostResult),
        Timer,
        Wall,
        Stopped,
    }
    let mut stop = state.stop_signal.borrow_mut().take();
    let event = tokio::select! {
        Some((id, result)) = calls.next(), if !calls.is_empty() => Event::Host(id, result),
        _ = tokio::time::sleep_until(timer_at.into()), if next_timer.is_some() => Event::Timer,
        _ = tokio::time::sleep_until(wall_at.into()), if wall_deadline.is_some() => Event::Wall,
        _ = async {
            match stop.as_mut() {
                Some(signal) => signal.await,
                None => std::future::pending().await,
            }
        }, if stop.is_some() => Event::Stopped,
    };
    if !matches!(event, Event::Stopped) {
        *state.stop_signal.borrow_mut() = stop;
    }
    // Calls the script started meanwhile cannot exist (no JS ran), but keep both sets anyway.
    let mut current = state.host_calls.borrow_mut();
    calls.extend(std::mem::take(&mut *current));
    *current = calls;
    drop(current);
    match event {
        Event::Wall => {
            state.limit_hit.set(Some(LimitHit::Wall));
            Err(state.limit_error(LimitHit::Wall))
        }
        Event::Stopped => Err(ScriptError::new(
            408,
            "the call ended and the script was still waiting: the run was stopped",
        )),
        Event::Timer => {
            let entry = {
                let mut timers = state.timers.borrow_mut();
                let key = *timers.keys().next().expect("a timer was due");
                timers.remove(&key)
            };
            if let Some(callback) = entry {
                state.slice(context, |ctx| {
                    let outcome = callback.restore(&ctx).and_then(|f| f.call::<_, Value>(()));
                    if let Err(e) = outcome {
                        let err = state.error_from(&ctx, e);
                        if state.stop().is_none() {
                            *state.uncaught.borrow_mut() = Some(err);
                        }
                    }
                });
            }
            Ok(())
        }
        Event::Host(id, result) => {
            let settler = state.settlers.borrow_mut().remove(&id);
            if let Some(settler) = settler {
                state.slice(context, |ctx| {
                    let delivered = deliver(&ctx, settler, result);
                    if let Err(e) = delivered {
                        let err = state.error_from(&ctx, e);
                        if state.stop().is_none() {
                            *state.uncaught.borrow_mut() = Some(err);
                        }
                    }
                });
            }
            Ok(())
        }
    }
}

fn deliver(ctx: &Ctx<'_>, settler: Settler, result: HostResult) -> rquickjs::Result<()> {
    match result {
        Ok(json) => {
            let value = json_to_js(ctx, &json)?;
            settler.resolve.restore(ctx)?.call::<_, ()>((value,))
        }
        Err(e) => {
            let error = host_error_to_js(ctx, &e)?;
            settler.reject.restore(ctx)?.call::<_, ()>((error,))
        }
    }
}

/// Run a classic script's bytecode; its completion value (the last expression) is returned.
fn eval_global_bytecode<'js>(ctx: &Ctx<'js>, bytecode: &[u8]) -> rquickjs::Result<Value<'js>> {
    // SAFETY: the bytecode was produced by `compile` from this crate's QuickJS build;
    // JS_ReadObject copies from the slice; JS_EvalFunction consumes the function value.
    let result = unsafe {
        let func = qjs::JS_ReadObject(
            ctx.as_raw().as_ptr(),
            bytecode.as_ptr(),
            bytecode.len() as _,
            qjs::JS_READ_OBJ_BYTECODE as i32,
        );
        if qjs::JS_IsException(func) {
            return Err(rquickjs::Error::Exception);
        }
        Value::from_raw(
            ctx.clone(),
            qjs::JS_EvalFunction(ctx.as_raw().as_ptr(), func),
        )
    };
    if result.is_exception() {
        return Err(rquickjs::Error::Exception);
    }
    Ok(result)
}

fn evaluate_top_level<'js>(
    ctx: &Ctx<'js>,
    script: &CompiledScript,
) -> rquickjs::Result<(Option<Object<'js>>, Option<Promise<'js>>)> {
    match script.kind {
        SourceKind::Global => {
            eval_global_bytecode(ctx, &script.bytecode)?;
            Ok((None, None))
        }
        SourceKind::Module => {
            // SAFETY: as above, the bytes are our own compiler's output.
            let declared = unsafe { Module::load(ctx.clone(), &script.bytecode)? };
            let (module, promise) = declared.eval()?;
            let namespace = module.namespace()?;
            Ok((Some(namespace), Some(promise)))
        }
    }
}

fn find_entry<'js>(
    ctx: &Ctx<'js>,
    loaded: &Loaded,
    mode: Mode,
    function: Option<&str>,
) -> Result<Function<'js>, ScriptError> {
    let globals = ctx.globals();
    let namespace = loaded.namespace.clone().and_then(|n| n.restore(ctx).ok());
    let module_exports = |key: &str| -> Option<Object<'js>> {
        let module: Object = globals.get("module").ok()?;
        module.get::<_, Option<Object>>(key).ok().flatten()
    };
    let lookup = |name: &str| -> Option<Function<'js>> {
        let from = |o: Option<Object<'js>>| {
            o.and_then(|o| o.get::<_, Option<Function>>(name).ok().flatten())
        };
        from(namespace.clone())
            .or_else(|| from(module_exports("exports")))
            .or_else(|| from(module_exports("export")))
            .or_else(|| globals.get::<_, Option<Function>>(name).ok().flatten())
    };
    if mode == Mode::Driver {
        let name = function.ok_or_else(|| {
            ScriptError::internal(format!(
                "driver mode needs a function name: one of {}",
                DRIVER_FUNCTIONS.join(", ")
            ))
        })?;
        return lookup(name).ok_or_else(|| {
            ScriptError::new(
                404,
                format!("the driver does not export a function '{name}'"),
            )
        });
    }
    if let Some(name) = function {
        return lookup(name)
            .ok_or_else(|| ScriptError::new(404, format!("the script has no function '{name}'")));
    }
    let default_export = namespace
        .as_ref()
        .and_then(|n| n.get::<_, Option<Function>>("default").ok().flatten());
    lookup("main")
        .or(default_export)
        .or_else(|| {
            let module: Object = globals.get("module").ok()?;
            module.get::<_, Option<Function>>("exports").ok().flatten()
        })
        .ok_or_else(|| {
            ScriptError::internal(
                "the script defines no entry point: declare function main(data), export one, or call exit()",
            )
        })
}

/// JSON → a JS value, built with QuickJS's C API: properties are defined (as `JSON.parse`
/// does: a `__proto__` key is an own property) rather than set, and arrays are created whole.
fn json_to_js<'js>(ctx: &Ctx<'js>, json: &Json) -> rquickjs::Result<Value<'js>> {
    // SAFETY: the context is locked (we are inside `with`); `json_to_raw` returns an owned
    // value, which `from_raw` takes over.
    unsafe {
        let value = json_to_raw(ctx.as_raw().as_ptr(), json);
        if qjs::JS_IsException(value) {
            return Err(rquickjs::Error::Exception);
        }
        Ok(Value::from_raw(ctx.clone(), value))
    }
}

/// # Safety
/// `ctx` is a locked context. Returns an owned value or the exception marker.
unsafe fn json_to_raw(ctx: *mut qjs::JSContext, json: &Json) -> qjs::JSValue {
    let exception = qjs::JS_MKVAL(qjs::JS_TAG_EXCEPTION, 0);
    match json {
        Json::Null => qjs::JS_MKVAL(qjs::JS_TAG_NULL, 0),
        Json::Bool(b) => qjs::JS_MKVAL(qjs::JS_TAG_BOOL, i32::from(*b)),
        Json::Number(n) => match n.as_i64().and_then(|i| i32::try_from(i).ok()) {
            Some(i) => qjs::JS_MKVAL(qjs::JS_TAG_INT, i),
            None => qjs::JS_NewFloat64(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => qjs::JS_NewStringLen(ctx, s.as_ptr().cast(), s.len() as _),
        Json::Array(items) => {
            let mut values = Vec::with_capacity(items.len());
            for item in items {
                let value = json_to_raw(ctx, item);
                if qjs::JS_IsException(value) {
                    for v in values {
                        qjs::JS_FreeValue(ctx, v);
                    }
                    return exception;
                }
                values.push(value);
            }
            // Takes the values over, also when it fails.
            qjs::JS_NewArrayFrom(ctx, values.len() as _, values.as_ptr())
        }
        Json::Object(map) => {
            let object = qjs::JS_NewObject(ctx);
            if qjs::JS_IsException(object) {
                return object;
            }
            for (key, item) in map {
                let value = json_to_raw(ctx, item);
                if qjs::JS_IsException(value) {
                    qjs::JS_FreeValue(ctx, object);
                    return exception;
                }
                let atom = qjs::JS_NewAtomLen(ctx, key.as_ptr().cast(), key.len() as _);
                let defined = if atom == 0 {
                    qjs::JS_FreeValue(ctx, value);
                    -1
                } else {
                    // Takes `value` over.
                    let r = qjs::JS_DefinePropertyValue(
                        ctx,
                        object,
                        atom,
                        value,
                        qjs::JS_PROP_C_W_E as _,
                    );
                    qjs::JS_FreeAtom(ctx, atom);
                    r
                };
                if defined < 0 {
                    qjs::JS_FreeValue(ctx, object);
                    return exception;
                }
            }
            object
        }
    }
}

fn js_to_json<'js>(ctx: &Ctx<'js>, value: Value<'js>) -> rquickjs::Result<Json> {
    if value.is_undefined() || value.is_null() {
        return Ok(Json::Null);
    }
    if let Some(b) = value.as_bool() {
        return Ok(Json::Bool(b));
    }
    if let Some(i) = value.as_int() {
        return Ok(Json::from(i));
    }
    if let Some(s) = value.as_string() {
        return Ok(Json::String(s.to_string()?));
    }
    let proto: Option<Object> = ctx
        .globals()
        .get::<_, Object>("Object")
        .and_then(|o| o.get("prototype"))
        .ok();
    if let Some(proto) = proto {
        // SAFETY: the context is locked; `plain_to_json` only borrows the values it is given.
        let plain = unsafe {
            let proto = qjs::JS_VALUE_GET_PTR(proto.as_raw());
            plain_to_json(ctx.as_raw().as_ptr(), value.as_raw(), proto, 0)
        };
        if let Some(json) = plain {
            return Ok(json);
        }
    }
    match ctx.json_stringify(value)? {
        None => Ok(Json::Null),
        Some(text) => {
            serde_json::from_str(&text.to_string()?).map_err(|e| rquickjs::Error::FromJs {
                from: "value",
                to: "json",
                message: Some(e.to_string()),
            })
        }
    }
}

/// A JS string (or a property name) as Rust text; `None` when QuickJS cannot convert it.
///
/// # Safety
/// `ctx` is locked; `text` is what `JS_ToCStringLen2` / `JS_AtomToCStringLen` returned.
unsafe fn take_c_string(
    ctx: *mut qjs::JSContext,
    text: *const std::ffi::c_char,
    len: usize,
) -> Option<String> {
    if text.is_null() {
        return None;
    }
    let bytes = std::slice::from_raw_parts(text.cast::<u8>(), len);
    let out = String::from_utf8_lossy(bytes).into_owned();
    qjs::JS_FreeCString(ctx, text);
    Some(out)
}

/// Convert plain data (objects whose prototype is `Object.prototype`, arrays, strings,
/// numbers, booleans, null) straight to JSON, the way `JSON.stringify` would. `None` for
/// anything else (a Date, a `toJSON`, a Map, a Proxy, a cycle, a BigInt, a getter that
/// throws...): the caller then uses `JSON.stringify`, whose rules and errors are the
/// reference. QuickJS-NG's stringify costs about 25 ns per byte, so the common case skips it.
///
/// # Safety
/// `ctx` is locked; `value` is borrowed; `object_proto` is this context's `Object.prototype`.
unsafe fn plain_to_json(
    ctx: *mut qjs::JSContext,
    value: qjs::JSValue,
    object_proto: *mut std::ffi::c_void,
    depth: usize,
) -> Option<Json> {
    if depth > 64 {
        return None;
    }
    match qjs::JS_VALUE_GET_NORM_TAG(value) {
        qjs::JS_TAG_NULL => return Some(Json::Null),
        qjs::JS_TAG_BOOL => return Some(Json::Bool(qjs::JS_VALUE_GET_BOOL(value))),
        qjs::JS_TAG_INT => return Some(Json::from(qjs::JS_VALUE_GET_INT(value))),
        qjs::JS_TAG_FLOAT64 => {
            let f = qjs::JS_VALUE_GET_FLOAT64(value);
            // Integral doubles print as integers (and -0 as 0), as JSON.stringify does.
            if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                return Some(Json::from(f as i64));
            }
            return Some(serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number));
        }
        qjs::JS_TAG_STRING => {
            let mut len = 0;
            let text = qjs::JS_ToCStringLen2(ctx, &mut len, value, false);
            return take_c_string(ctx, text, len as usize).map(Json::String);
        }
        qjs::JS_TAG_OBJECT => {}
        _ => return None,
    }
    if qjs::JS_IsProxy(value) || qjs::JS_IsFunction(ctx, value) {
        return None;
    }
    // A skipped member: JSON.stringify writes null in arrays and leaves it out of objects.
    let skipped = |v: qjs::JSValue| {
        matches!(
            qjs::JS_VALUE_GET_NORM_TAG(v),
            qjs::JS_TAG_UNDEFINED | qjs::JS_TAG_SYMBOL
        ) || (qjs::JS_IsObject(v) && qjs::JS_IsFunction(ctx, v))
    };
    if qjs::JS_IsArray(value) {
        let mut len = 0i64;
        if qjs::JS_GetLength(ctx, value, &mut len) < 0 {
            return None;
        }
        let mut out = Vec::with_capacity(len.clamp(0, 1 << 16) as usize);
        for i in 0..len {
            let item = qjs::JS_GetPropertyInt64(ctx, value, i);
            let json = if qjs::JS_IsException(item) {
                None
            } else if skipped(item) {
                Some(Json::Null)
            } else {
                plain_to_json(ctx, item, object_proto, depth + 1)
            };
            qjs::JS_FreeValue(ctx, item);
            out.push(json?);
        }
        return Some(Json::Array(out));
    }
    let proto = qjs::JS_GetPrototype(ctx, value);
    let plain = qjs::JS_IsObject(proto) && qjs::JS_VALUE_GET_PTR(proto) == object_proto;
    qjs::JS_FreeValue(ctx, proto);
    if !plain {
        return None;
    }
    let mut tab: *mut qjs::JSPropertyEnum = std::ptr::null_mut();
    let mut count = 0u32;
    let flags = (qjs::JS_GPN_STRING_MASK | qjs::JS_GPN_ENUM_ONLY) as _;
    if qjs::JS_GetOwnPropertyNames(ctx, &mut tab, &mut count, value, flags) < 0 {
        return None;
    }
    let props = std::slice::from_raw_parts(tab, count as usize);
    let mut out = serde_json::Map::new();
    let mut complete = true;
    for prop in props {
        let mut len = 0;
        let key = qjs::JS_AtomToCStringLen(ctx, &mut len, prop.atom);
        let Some(key) = take_c_string(ctx, key, len as usize) else {
            complete = false;
            break;
        };
        if key == "toJSON" {
            complete = false;
            break;
        }
        let item = qjs::JS_GetProperty(ctx, value, prop.atom);
        let json = if qjs::JS_IsException(item) {
            None
        } else if skipped(item) {
            qjs::JS_FreeValue(ctx, item);
            continue;
        } else {
            plain_to_json(ctx, item, object_proto, depth + 1)
        };
        qjs::JS_FreeValue(ctx, item);
        match json {
            Some(json) => {
                out.insert(key, json);
            }
            None => {
                complete = false;
                break;
            }
        }
    }
    qjs::JS_FreePropertyEnum(ctx, tab, count);
    complete.then_some(Json::Object(out))
}

fn host_error_to_js<'js>(ctx: &Ctx<'js>, e: &HostError) -> rquickjs::Result<Value<'js>> {
    let exception = Exception::from_message(ctx.clone(), &e.message)?;
    let obj = exception.into_object();
    obj.set("name", e.name.as_str())?;
    Ok(obj.into_value())
}

/// Throw `value` so no `catch` or `finally` in the script can intercept it: exit()/err() use
/// this so nothing after them runs.
fn throw_uncatchable(ctx: &Ctx<'_>) -> rquickjs::Error {
    match Exception::from_message(ctx.clone(), "script exited") {
        Ok(exception) => {
            let value = exception.into_value();
            // SAFETY: marks an Error object we own; QuickJS then skips every handler while unwinding.
            unsafe { qjs::JS_SetUncatchableError(ctx.as_raw().as_ptr(), value.as_raw()) };
            ctx.throw(value)
        }
        Err(e) => e,
    }
}

fn args_to_json<'js>(ctx: &Ctx<'js>, args: Rest<Value<'js>>) -> rquickjs::Result<Vec<Json>> {
    args.0
        .into_iter()
        .map(|v| {
            if v.is_function() {
                Ok(Json::Null)
            } else {
                js_to_json(ctx, v)
            }
        })
        .collect()
}

/// Expose a host object (class5 `ctx`, a required module) as a JS object of functions.
///
/// One Rust closure per object serves all its methods: each method is a plain native
/// function object that hands its index to that closure (see [`call_host_method`]). A closure
/// per method cost about 300 bytes more each, in every live call's context.
fn host_object_to_js<'js>(
    ctx: &Ctx<'js>,
    state: &Rc<RunState>,
    host: Rc<dyn HostObject>,
) -> rquickjs::Result<Object<'js>> {
    // Its functions own Rust data: a pristine image must not simply be restored over them.
    state.impure.set(true);
    let obj = Object::new(ctx.clone())?;
    let js = host.js_methods();
    let js_index = match &js {
        Some(js) => {
            let mut all = state.js_methods.borrow_mut();
            all.push(LazyJsMethods {
                raw: Persistent::save(ctx, obj.clone()),
                source: js.source.clone(),
                made: None,
            });
            all.len() - 1
        }
        None => usize::MAX,
    };
    let js_names = js.as_ref().map_or(&[][..], |js| js.names);
    let dispatcher = {
        let (host, state) = (host.clone(), state.clone());
        host_fn(
            ctx,
            move |ctx: Ctx<'js>, this: This<Value<'js>>, index: usize, args: Rest<Value<'js>>| {
                guarded(&ctx, &state, || {
                    let methods = host.methods();
                    if let Some(method) = methods.get(index) {
                        return host_method_call(
                            &ctx,
                            &state,
                            &*host,
                            method.name,
                            method.kind,
                            args,
                        );
                    }
                    let Some(name) = index
                        .checked_sub(methods.len())
                        .and_then(|i| js_names.get(i))
                    else {
                        return Err(Exception::throw_internal(&ctx, "no such host method"));
                    };
                    let method = js_method(&ctx, &state, js_index, name)?;
                    method.call::<_, Value>((This(this.0), args))
                })
            },
        )?
    };
    let methods = host.methods();
    for (index, method) in methods.iter().enumerate() {
        // "lookup.tps" is the function `tps` of the nested object `lookup`.
        let (target, leaf) = match method.name.rsplit_once('.') {
            None => (obj.clone(), method.name),
            Some((path, leaf)) => (nested_object(ctx, &obj, path)?, leaf),
        };
        target.set(leaf, native_method(ctx, &dispatcher, leaf, index)?)?;
    }
    for (offset, name) in js_names.iter().enumerate() {
        obj.set(
            *name,
            native_method(ctx, &dispatcher, name, methods.len() + offset)?,
        )?;
    }
    Ok(obj)
}

/// A native function named `name` that calls `dispatcher` with `index` before its arguments.
fn native_method<'js>(
    ctx: &Ctx<'js>,
    dispatcher: &Function<'js>,
    name: &str,
    index: usize,
) -> rquickjs::Result<Function<'js>> {
    let c_name = std::ffi::CString::new(name)
        .map_err(|_| Exception::throw_internal(ctx, "a host method's name holds a NUL"))?;
    let magic = std::ffi::c_int::try_from(index)
        .map_err(|_| Exception::throw_internal(ctx, "too many host methods"))?;
    let mut data = [dispatcher.as_raw()];
    // SAFETY: the context is locked (we hold a Ctx); QuickJS duplicates `data`, and the
    // returned value is a new reference that Value::from_raw takes over.
    let value = unsafe {
        let raw = qjs::JS_NewCFunctionData2(
            ctx.as_raw().as_ptr(),
            Some(call_host_method),
            c_name.as_ptr(),
            0,
            magic,
            1,
            data.as_mut_ptr(),
        );
        if qjs::JS_IsException(raw) {
            return Err(rquickjs::Error::Exception);
        }
        Value::from_raw(ctx.clone(), raw)
    };
    value
        .into_function()
        .ok_or_else(|| Exception::throw_internal(ctx, "a host method is not callable"))
}

/// The body of every [`native_method`]: calls its dispatcher (`data[0]`) with its index
/// (`magic`) followed by the script's arguments, with the same `this`.
unsafe extern "C" fn call_host_method(
    ctx: *mut qjs::JSContext,
    this: qjs::JSValue,
    argc: std::ffi::c_int,
    argv: *mut qjs::JSValue,
    magic: std::ffi::c_int,
    data: *mut qjs::JSValue,
) -> qjs::JSValue {
    let given: &[qjs::JSValue] = match usize::try_from(argc) {
        Ok(n) if n > 0 && !argv.is_null() => std::slice::from_raw_parts(argv, n),
        _ => &[],
    };
    let mut args = Vec::with_capacity(given.len() + 1);
    args.push(qjs::JS_MKVAL(qjs::JS_TAG_INT, magic));
    args.extend_from_slice(given);
    let count = std::ffi::c_int::try_from(args.len()).unwrap_or(std::ffi::c_int::MAX);
    qjs::JS_Call(ctx, *data, this, count, args.as_mut_ptr())
}

/// The JS method `name` of the run's `index`th host object with JS methods, evaluating their
/// code on the first call.
fn js_method<'js>(
    ctx: &Ctx<'js>,
    state: &RunState,
    index: usize,
    name: &str,
) -> rquickjs::Result<Function<'js>> {
    let (raw, source, made) = {
        let all = state.js_methods.borrow();
        let Some(entry) = all.get(index) else {
            return Err(Exception::throw_internal(
                ctx,
                "a host object's JS methods are gone",
            ));
        };
        (entry.raw.clone(), entry.source.clone(), entry.made.clone())
    };
    let methods = match made {
        Some(made) => made.restore(ctx)?,
        None => {
            let methods = wrap_with_prelude(ctx, &source, raw.restore(ctx)?)?;
            if let Some(entry) = state.js_methods.borrow_mut().get_mut(index) {
                entry.made = Some(Persistent::save(ctx, methods.clone()));
            }
            methods
        }
    };
    methods.get::<_, Option<Function>>(name)?.ok_or_else(|| {
        Exception::throw_internal(ctx, &format!("a host object's JS code lacks {name}"))
    })
}

/// One call of a host object's method from JS.
fn host_method_call<'js>(
    ctx: &Ctx<'js>,
    state: &Rc<RunState>,
    host: &dyn HostObject,
    name: &'static str,
    kind: MethodKind,
    args: Rest<Value<'js>>,
) -> rquickjs::Result<Value<'js>> {
    let args = args_to_json(ctx, args)?;
    let call = host.call(name, args);
    let m = crate::metrics::metrics();
    crate::metrics::Metrics::inc(&m.host_calls, "method", name);
    let call = match call {
        HostCall::Ready(Err(e)) => {
            crate::metrics::Metrics::inc(&m.host_errors, "method", name);
            HostCall::Ready(Err(e))
        }
        HostCall::Pending(fut) => HostCall::Pending(Box::pin(async move {
            let r = fut.await;
            if r.is_err() {
                crate::metrics::Metrics::inc(
                    &crate::metrics::metrics().host_errors,
                    "method",
                    name,
                );
            }
            r
        })),
        ready => ready,
    };
    match (kind, call) {
        (MethodKind::Sync, HostCall::Ready(Ok(v))) => json_to_js(ctx, &v),
        (MethodKind::Sync, HostCall::Ready(Err(e))) => {
            let err = host_error_to_js(ctx, &e)?;
            Err(ctx.throw(err))
        }
        (_, call) => {
            let (promise, resolve, reject) = ctx.promise()?;
            let id = state.next_id();
            let settler = Settler {
                resolve: Persistent::save(ctx, resolve),
                reject: Persistent::save(ctx, reject),
            };
            match call {
                HostCall::Ready(result) => deliver(ctx, settler, result)?,
                HostCall::Pending(fut) => {
                    state.settlers.borrow_mut().insert(id, settler);
                    state
                        .host_calls
                        .borrow()
                        .push(Box::pin(async move { (id, fut.await) }));
                }
            }
            Ok(promise.into_value())
        }
    }
}

/// Run a host function's body. A panic in it ends the run with a 500 (an uncatchable error, so
/// the script cannot swallow it) and marks the run so its runtime is never reused: rquickjs
/// would otherwise keep the panic and resume it in whichever run next raises an error.
fn guarded<'js, T>(
    ctx: &Ctx<'js>,
    state: &RunState,
    body: impl FnOnce() -> rquickjs::Result<T>,
) -> rquickjs::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(result) => result,
        Err(panic) => {
            let error = state.host_panicked(&*panic);
            if state.completion.borrow().is_none() {
                *state.completion.borrow_mut() = Some(Err(error));
            }
            Err(throw_uncatchable(ctx))
        }
    }
}

/// `Function::new` with the function's prototype set to this context's `Function.prototype`.
/// rquickjs takes it from a cache kept per runtime, which holds the `Function.prototype` of
/// the runtime's first context: shared by every later context, and writable by their scripts.
/// The object is made with the right prototype from the start: setting it afterwards gives
/// every function a shape of its own, about 150 bytes each in every live call's context.
fn host_fn<'js, P, F>(ctx: &Ctx<'js>, f: F) -> rquickjs::Result<Function<'js>>
where
    F: rquickjs::function::IntoJsFunc<'js, P> + 'js,
{
    let body = move |params: rquickjs::function::Params<'_, 'js>| {
        params.check_params(F::param_requirements())?;
        f.call(params)
    };
    let proto = Function::prototype(ctx.clone());
    let object =
        rquickjs::Class::instance_proto(rquickjs::function::RustFunction(Box::new(body)), proto)?
            .into_inner();
    let Some(func) = object.into_value().into_function() else {
        return Err(Exception::throw_internal(
            ctx,
            "a host function is not callable",
        ));
    };
    func.with_length(F::param_requirements().min())
}

/// The object at the dotted `path` under `root`, creating empty objects on the way.
fn nested_object<'js>(
    ctx: &Ctx<'js>,
    root: &Object<'js>,
    path: &str,
) -> rquickjs::Result<Object<'js>> {
    let mut current = root.clone();
    for segment in path.split('.') {
        current = match current.get::<_, Option<Object>>(segment)? {
            Some(existing) => existing,
            None => {
                let created = Object::new(ctx.clone())?;
                current.set(segment, created.clone())?;
                created
            }
        };
    }
    Ok(current)
}

/// Pass a host object through its prelude (a compiled function expression).
fn wrap_with_prelude<'js>(
    ctx: &Ctx<'js>,
    prelude: &CompiledScript,
    raw: Object<'js>,
) -> rquickjs::Result<Object<'js>> {
    let wrap = eval_global_bytecode(ctx, &prelude.bytecode)?;
    let Some(wrap) = wrap.as_function() else {
        return Err(Exception::throw_internal(
            ctx,
            "a host object's prelude is not a function expression",
        ));
    };
    let wrapped: Value = wrap.call((raw,))?;
    wrapped.into_object().ok_or_else(|| {
        Exception::throw_internal(ctx, "a host object's prelude did not return an object")
    })
}

/// What a script sees for a registered module: its host object, passed through the module's
/// prelude when it has one.
fn module_value<'js>(
    ctx: &Ctx<'js>,
    state: &Rc<RunState>,
    name: &str,
    registered: &Registered,
) -> rquickjs::Result<Value<'js>> {
    let host: Rc<dyn HostObject> = Rc::from(registered.module.instantiate());
    let raw = host_object_to_js(ctx, state, host)?;
    match &registered.prelude {
        None => Ok(raw.into_value()),
        Some(Ok(prelude)) => {
            let wrap = eval_global_bytecode(ctx, &prelude.bytecode)?;
            let Some(wrap) = wrap.as_function() else {
                return Err(Exception::throw_internal(
                    ctx,
                    &format!("the prelude of module '{name}' is not a function expression"),
                ));
            };
            wrap.call((raw,))
        }
        Some(Err(e)) => Err(Exception::throw_internal(
            ctx,
            &format!("module '{name}' is unavailable: its prelude does not compile: {e}"),
        )),
    }
}

/// A random (version 4) UUID, for `process.env.CORRELATION_ID`.
fn random_uuid() -> String {
    let mut bytes = [0u8; 16];
    fastrand::fill(&mut bytes);
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    super::compile::uuid_text(&bytes)
}

/// `require` of a script of the scripts folder: a CommonJS script runs once per run with its
/// own `module`/`exports` and gives `module.exports`; an ES module gives its namespace.
fn require_script<'js>(
    ctx: &Ctx<'js>,
    state: &Rc<RunState>,
    library: &super::library::ScriptLibrary,
    stem: &str,
) -> rquickjs::Result<Value<'js>> {
    let cached = state.required.borrow().get(stem).cloned();
    if let Some(module) = cached {
        return module.restore(ctx)?.get("exports");
    }
    let module_name = format!("{stem}.js");
    let script = library
        .get_import(stem, &module_name, ImportAs::CommonJs)
        .map_err(|e| Exception::throw_syntax(ctx, &format!("require('./{stem}'): {e}")))?;
    let module = Object::new(ctx.clone())?;
    match script.kind {
        SourceKind::Module => {
            // SAFETY: the bytes are our own compiler's output.
            let declared = unsafe { Module::load(ctx.clone(), &script.bytecode)? };
            let (evaluated, promise) = declared.eval()?;
            while ctx.execute_pending_job() {}
            match promise.state() {
                rquickjs::promise::PromiseState::Resolved => {}
                rquickjs::promise::PromiseState::Rejected => {
                    let reason = match promise.result::<Value>() {
                        Some(Ok(v)) => v,
                        _ => ctx.catch(),
                    };
                    return Err(ctx.throw(reason));
                }
                rquickjs::promise::PromiseState::Pending => {
                    return Err(Exception::throw_type(
                        ctx,
                        &format!(
                            "require('./{stem}'): the module awaits at its top level; use import instead"
                        ),
                    ))
                }
            }
            module.set("exports", evaluated.namespace()?)?;
        }
        SourceKind::Global => {
            let exports = Object::new(ctx.clone())?;
            module.set("exports", exports.clone())?;
            state
                .required
                .borrow_mut()
                .insert(stem.to_string(), Persistent::save(ctx, module.clone()));
            let wrapper = eval_global_bytecode(ctx, &script.bytecode)?;
            let Some(wrapper) = wrapper.as_function() else {
                return Err(Exception::throw_internal(
                    ctx,
                    "a CommonJS wrapper is not a function",
                ));
            };
            let require: Value = ctx.globals().get("require")?;
            let ran = wrapper.call::<_, Value>((
                rquickjs::function::This(exports.clone()),
                exports,
                require,
                module.clone(),
                module_name.as_str(),
                ".",
            ));
            if let Err(e) = ran {
                // A script that failed to load is loaded afresh by the next `require`.
                state.required.borrow_mut().remove(stem);
                return Err(e);
            }
        }
    }
    state
        .required
        .borrow_mut()
        .insert(stem.to_string(), Persistent::save(ctx, module.clone()));
    module.get("exports")
}

/// What differs per run: the input, `process.env`, and timers in async modes.
fn install_run_globals<'js>(
    ctx: &Ctx<'js>,
    state: &Rc<RunState>,
    script: &Arc<CompiledScript>,
    data: Value<'js>,
) -> rquickjs::Result<()> {
    let g = ctx.globals();
    *state.input.borrow_mut() = Some(Persistent::save(ctx, data.clone()));
    *state.script.borrow_mut() = Some(script.clone());
    // Published ScriptForge scripts also read the input as the object `vars`
    // (`vars.routing.cli = ...; return vars`): the `vars()` function carries the input's
    // top-level properties, the same objects, so changes through either are one change.
    // Only scripts that read it so pay for it (a few property sets per key).
    let input = data.as_object().filter(|_| script.reads_vars_object);
    if let (Some(input), Ok(vars)) = (input, g.get::<_, Object>("vars")) {
        for key in input.keys::<String>() {
            let key = key?;
            if matches!(key.as_str(), "name" | "length" | "prototype") {
                continue;
            }
            vars.set(key.as_str(), input.get::<_, Value>(key.as_str())?)?;
        }
    }
    match (state.mode.get().is_async(), state.pristine) {
        (true, false) => install_timers(ctx, state)?,
        // A pristine image has them already; the synchronous mode has none.
        (false, true) => {
            g.remove("setTimeout")?;
            g.remove("clearTimeout")?;
        }
        _ => {}
    }
    Ok(())
}

/// `process.env` as an accessor that builds the object on a run's first read (the operator's
/// `[env]`, `EXEC_HOST`, then the run's `SCRIPTFORGE_*`, `CORRELATION_ID` and `APP_ID`) and
/// then replaces itself with a plain data property. Most class4 runs never read it, and
/// filling it eagerly was about 2% of a run's instructions (a UUID and five property sets).
fn install_process_env<'js>(
    ctx: &Ctx<'js>,
    state: &Rc<RunState>,
    sandbox: &Sandbox,
    process: &Object<'js>,
) -> rquickjs::Result<()> {
    if sandbox
        .modules
        .env()
        .iter()
        .any(|(name, _)| name == "APP_ID")
    {
        state.operator_app_id.set(true);
    }
    // Defined with QuickJS's own call, not the global `Object.defineProperty`, which the
    // script may have replaced by the time it first reads `process.env`.
    let plain = |object: &Object<'js>, value: Value<'js>| {
        object.prop(
            "env",
            rquickjs::object::Property::from(value)
                .writable()
                .enumerable()
                .configurable(),
        )
    };

    let st = state.clone();
    let modules = sandbox.modules.clone();
    let exec_host = sandbox.exec_host.clone();
    let get = host_fn(
        ctx,
        move |ctx: Ctx<'js>, this: rquickjs::function::This<Object<'js>>| {
            let env = Object::new(ctx.clone())?;
            env.set("EXEC_HOST", exec_host.as_str())?;
            for (name, value) in modules.env() {
                env.set(name.as_str(), value.as_str())?;
            }
            if let Some(script) = st.script.borrow().as_ref() {
                env.set("SCRIPTFORGE_NAME", script.name.as_str())?;
                env.set("SCRIPTFORGE_ID", script.id.as_str())?;
                env.set("SCRIPTFORGE_UUID", script.uuid.as_str())?;
                env.set("CORRELATION_ID", random_uuid().as_str())?;
                if !st.operator_app_id.get() {
                    env.set("APP_ID", script.name.as_str())?;
                }
            }
            plain(&this.0, env.clone().into_value())?;
            rquickjs::Result::Ok(env)
        },
    )?;
    let set = host_fn(
        ctx,
        move |this: rquickjs::function::This<Object<'js>>, value: Value<'js>| plain(&this.0, value),
    )?;
    // At preparation no script has run yet: the global `Object.defineProperty` is the real one.
    let define: Function = ctx
        .globals()
        .get::<_, Object>("Object")?
        .get("defineProperty")?;
    let accessor = Object::new(ctx.clone())?;
    accessor.set("get", get)?;
    accessor.set("set", set)?;
    accessor.set("enumerable", true)?;
    accessor.set("configurable", true)?;
    define.call::<_, Value>((process.clone(), "env", accessor))?;
    Ok(())
}

/// Globals every run has, installed when the context is prepared (before its run is known).
fn install_common_globals<'js>(
    ctx: &Ctx<'js>,
    state: &Rc<RunState>,
    sandbox: &Sandbox,
) -> rquickjs::Result<()> {
    let g = ctx.globals();

    let st = state.clone();
    g.set(
        "vars",
        host_fn(ctx, move |ctx: Ctx<'js>| {
            guarded(&ctx, &st, || {
                let input = st.input.borrow().clone();
                match input {
                    Some(input) => input.restore(&ctx),
                    None => Ok(Value::new_undefined(ctx.clone())),
                }
            })
        })?,
    )?;

    let st = state.clone();
    g.set(
        "exit",
        host_fn(
            ctx,
            move |ctx: Ctx<'js>, value: rquickjs::function::Opt<Value<'js>>| {
                guarded(&ctx, &st, || {
                    let result = match value.0 {
                        None => Ok(Json::Null),
                        Some(v) => js_to_json(&ctx, v).map_err(|e| {
                            let text = match e {
                                rquickjs::Error::Exception => describe_exception(&ctx.catch()).text,
                                other => other.to_string(),
                            };
                            ScriptError::internal(format!(
                                "exit() got a value that is not JSON-serialisable: {text}"
                            ))
                        }),
                    };
                    if st.completion.borrow().is_none() {
                        *st.completion.borrow_mut() = Some(result);
                    }
                    Err::<(), _>(throw_uncatchable(&ctx))
                })
            },
        )?,
    )?;

    let st = state.clone();
    g.set(
        "err",
        host_fn(ctx, move |ctx: Ctx<'js>, args: Rest<Value<'js>>| {
            guarded(&ctx, &st, || {
                let error = match args.0.as_slice() {
                    [] => ScriptError::internal("err() called without an error"),
                    [single] => script_error_from(single),
                    [code, message, ..] => {
                        let pair = rquickjs::Array::new(ctx.clone())?;
                        pair.set(0, code.clone())?;
                        pair.set(1, message.clone())?;
                        script_error_from(&pair.into_value())
                    }
                };
                if st.completion.borrow().is_none() {
                    *st.completion.borrow_mut() = Some(Err(error));
                }
                Err::<(), _>(throw_uncatchable(&ctx))
            })
        })?,
    )?;

    let console = Object::new(ctx.clone())?;
    for (name, level) in [
        ("log", LogLevel::Info),
        ("info", LogLevel::Info),
        ("debug", LogLevel::Debug),
        ("warn", LogLevel::Warn),
        ("error", LogLevel::Error),
    ] {
        let st = state.clone();
        console.set(
            name,
            host_fn(ctx, move |ctx: Ctx<'js>, args: Rest<Value<'js>>| {
                guarded(&ctx, &st, || {
                    st.log(level, console_text(&args.0));
                    Ok(())
                })
            })?,
        )?;
    }
    g.set("console", console)?;

    let process = Object::new(ctx.clone())?;
    install_process_env(ctx, state, sandbox, &process)?;
    g.set("process", process)?;

    // `setEnvVar(name, value)`: sets `process.env[name]` (as text) for this run only; every
    // run starts from a fresh `process.env`.
    g.set(
        "setEnvVar",
        host_fn(
            ctx,
            move |ctx: Ctx<'js>, name: rquickjs::Coerced<String>, value: Value<'js>| {
                let process: Object = ctx.globals().get("process")?;
                let env: Object = process.get("env")?;
                let text = match value.as_string() {
                    Some(s) => s.to_string()?,
                    None if value.is_undefined() => "undefined".to_string(),
                    None => value.get::<rquickjs::Coerced<String>>()?.0,
                };
                env.set(name.0.as_str(), text)
            },
        )?,
    )?;

    let module = Object::new(ctx.clone())?;
    let exports = Object::new(ctx.clone())?;
    module.set("exports", exports.clone())?;
    g.set("module", module)?;
    g.set("exports", exports)?;

    let st = state.clone();
    let modules = sandbox.modules.clone();
    g.set(
        "require",
        host_fn(
            ctx,
            move |ctx: Ctx<'js>, name: rquickjs::Coerced<String>| {
                guarded(&ctx, &st, || {
                    let name = name.0;
                    let mode = st.mode.get();
                    let target = classify(&modules, &name);
                    if let (Ok(Target::Script(stem)), Some(library)) = (&target, modules.scripts())
                    {
                        return require_script(&ctx, &st, library, stem);
                    }
                    if let Err(why) = &target {
                        if name.starts_with('.') || name.contains('/') {
                            return Err(Exception::throw_type(&ctx, &format!("require: {why}")));
                        }
                    }
                    match modules.entry(&name).filter(|r| r.module.available_in(mode)) {
                        Some(registered) => module_value(&ctx, &st, &name, registered),
                        None => {
                            let allowed = modules.allowed_in(mode);
                            let list = if allowed.is_empty() {
                                format!("none in {mode} mode")
                            } else {
                                allowed.join(", ")
                            };
                            Err(Exception::throw_type(
                                &ctx,
                                &format!("require('{name}'): no such module; allowed: {list}"),
                            ))
                        }
                    }
                })
            },
        )?,
    )?;

    let disabled = |what: &'static str| {
        host_fn(ctx, move |ctx: Ctx<'js>| {
            Err::<(), _>(Exception::throw_type(
                &ctx,
                &format!("{what} is disabled in callforge scripts"),
            ))
        })
    };
    g.set("eval", disabled("eval")?)?;
    install_host_globals(ctx, state, &sandbox.modules)?;
    install_lazy_intrinsics(ctx, state.member.is_some())
}

/// Define each global host object (`api`, `fetch`) as an accessor that builds it on first
/// access, in the modes where it is available (elsewhere it reads as `undefined`), and then
/// replaces itself with a plain data property. The closures hold no JS handles.
fn install_host_globals<'js>(
    ctx: &Ctx<'js>,
    state: &Rc<RunState>,
    modules: &HostModules,
) -> rquickjs::Result<()> {
    let g = ctx.globals();
    for (name, registered) in modules.globals() {
        let name: Rc<str> = Rc::from(name);
        let (get_name, set_name) = (name.clone(), name.clone());
        let registered = registered.clone();
        let st = state.clone();
        let getter = move |ctx: Ctx<'js>| -> rquickjs::Result<Value<'js>> {
            if !registered.module.available_in(st.mode.get()) {
                return Ok(Value::new_undefined(ctx.clone()));
            }
            let value = module_value(&ctx, &st, &get_name, &registered)?;
            ctx.globals().prop(
                &*get_name,
                rquickjs::object::Property::from(value.clone())
                    .writable()
                    .configurable(),
            )?;
            Ok(value)
        };
        let setter = move |ctx: Ctx<'js>, value: Value<'js>| -> rquickjs::Result<()> {
            ctx.globals().prop(
                &*set_name,
                rquickjs::object::Property::from(value)
                    .writable()
                    .configurable()
                    .enumerable(),
            )
        };
        let (st_get, st_set) = (state.clone(), state.clone());
        let getter = host_fn(ctx, move |ctx: Ctx<'js>| {
            guarded(&ctx, &st_get, || getter(ctx.clone()))
        })?;
        let setter = host_fn(ctx, move |ctx: Ctx<'js>, value: Value<'js>| {
            guarded(&ctx, &st_set, || setter(ctx.clone(), value))
        })?;
        // Defined through `Object.defineProperty` (pristine at preparation) so the accessor
        // functions are ours, with this context's prototype (see `host_fn`).
        let define: Function = g.get::<_, Object>("Object")?.get("defineProperty")?;
        let descriptor = Object::new(ctx.clone())?;
        descriptor.set("get", getter)?;
        descriptor.set("set", setter)?;
        descriptor.set("configurable", true)?;
        define.call::<_, Value>((g.clone(), &*name, descriptor))?;
    }
    Ok(())
}

/// Define each global of each [`LAZY_INTRINSICS`] entry as a configurable accessor that, on
/// the first get or set of any of the entry's names, adds the real intrinsic (whose definitions
/// replace the accessors) and then answers as the real property would.
///
/// The accessors are bare callable objects of a class of ours ([`lazy_class`]) with the name's
/// index as opaque: no Rust closure, no `name`/`length` properties. A context gets 44 of them
/// for a few hundred instructions each, far less than the intrinsics they stand for. Entries
/// deferred only in shared runtimes are skipped unless `shared`: the context has them.
fn install_lazy_intrinsics(ctx: &Ctx<'_>, shared: bool) -> rquickjs::Result<()> {
    let raw = ctx.as_raw().as_ptr();
    // SAFETY: the context is locked (we are inside `with`); every value created here is either
    // handed to a consuming call or freed before returning.
    unsafe {
        let Some(class) = lazy_class(qjs::JS_GetRuntime(raw)) else {
            return Err(rquickjs::Error::Unknown);
        };
        let global = qjs::JS_GetGlobalObject(raw);
        let null = qjs::JS_MKVAL(qjs::JS_TAG_NULL, 0);
        let mut outcome = Ok(());
        'entries: for (entry, lazy) in LAZY_INTRINSICS.iter().enumerate() {
            if lazy.only_shared && !shared {
                continue;
            }
            for (index, name) in lazy.names.iter().enumerate() {
                let accessor = |setter| {
                    let f = qjs::JS_NewObjectProtoClass(raw, null, class);
                    if !qjs::JS_IsException(f) {
                        let tag = lazy_tag(entry, index, setter);
                        qjs::JS_SetOpaque(f, tag as *mut std::ffi::c_void);
                    }
                    f
                };
                let (get, set) = (accessor(false), accessor(true));
                let atom = qjs::JS_NewAtomLen(raw, name.as_ptr().cast(), name.len() as _);
                let defined = if qjs::JS_IsException(get) || qjs::JS_IsException(set) || atom == 0 {
                    qjs::JS_FreeValue(raw, get);
                    qjs::JS_FreeValue(raw, set);
                    -1
                } else {
                    // Consumes `get` and `set`.
                    qjs::JS_DefinePropertyGetSet(
                        raw,
                        global,
                        atom,
                        get,
                        set,
                        qjs::JS_PROP_CONFIGURABLE as _,
                    )
                };
                if atom != 0 {
                    qjs::JS_FreeAtom(raw, atom);
                }
                if defined < 0 {
                    outcome = Err(rquickjs::Error::Exception);
                    break 'entries;
                }
            }
        }
        qjs::JS_FreeValue(raw, global);
        outcome
    }
}

/// The opaque of a lazy accessor: entry, name index, setter bit. Never 0 (QuickJS's "none").
fn lazy_tag(entry: usize, index: usize, setter: bool) -> usize {
    (1 << 16) | (entry << 8) | (index << 1) | usize::from(setter)
}

/// The class of the lazy accessors, registered in `rt` on first use.
///
/// Class ids are numbered per runtime. Every runtime here comes from `Sandbox::new_runtime`
/// and nothing but rquickjs (three ids, when the runtime is created) and this function
/// allocates ids, so this class gets the same id in every runtime and "that id is registered"
/// means "registered by this function".
///
/// # Safety
/// `rt` must be a live runtime whose lock the caller holds.
unsafe fn lazy_class(rt: *mut qjs::JSRuntime) -> Option<qjs::JSClassID> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CLASS: AtomicU32 = AtomicU32::new(0);
    let known = CLASS.load(Ordering::Relaxed);
    if known != 0 && qjs::JS_IsRegisteredClass(rt, known) {
        return Some(known);
    }
    let mut id: qjs::JSClassID = 0;
    qjs::JS_NewClassID(rt, &mut id);
    if known != 0 && id != known {
        tracing::warn!(
            known,
            id,
            "lazy-intrinsic class id differs between runtimes"
        );
    }
    let def = qjs::JSClassDef {
        class_name: c"LazyIntrinsic".as_ptr(),
        finalizer: None,
        gc_mark: None,
        call: Some(lazy_global),
        exotic: std::ptr::null_mut(),
    };
    if qjs::JS_NewClass(rt, id, &def) != 0 {
        return None;
    }
    CLASS.store(id, Ordering::Relaxed);
    Some(id)
}

/// The getter or setter of one lazy global; see [`install_lazy_intrinsics`].
unsafe extern "C" fn lazy_global(
    ctx: *mut qjs::JSContext,
    func: qjs::JSValue,
    _this: qjs::JSValue,
    argc: std::ffi::c_int,
    argv: *mut qjs::JSValue,
    _flags: std::ffi::c_int,
) -> qjs::JSValue {
    let exception = qjs::JS_MKVAL(qjs::JS_TAG_EXCEPTION, 0);
    let tag = qjs::JS_GetOpaque(func, qjs::JS_GetClassID(func)) as usize;
    let (entry, index, setter) = ((tag >> 8) & 0xff, (tag & 0xff) >> 1, tag & 1 == 1);
    let lazy = &LAZY_INTRINSICS[entry];
    let name = lazy.names[index];
    let global = qjs::JS_GetGlobalObject(ctx);
    let atom = qjs::JS_NewAtomLen(ctx, name.as_ptr().cast(), name.len() as _);
    if atom == 0 {
        qjs::JS_FreeValue(ctx, global);
        return exception;
    }
    // Still a placeholder (this very accessor is the property's getter or setter)? Then add the
    // intrinsic. A saved accessor called later just forwards to the property.
    let mut desc = std::mem::MaybeUninit::<qjs::JSPropertyDescriptor>::uninit();
    let found = qjs::JS_GetOwnProperty(ctx, desc.as_mut_ptr(), global, atom);
    let mut placeholder = false;
    if found > 0 {
        let desc = desc.assume_init();
        let same = |v: qjs::JSValue| {
            qjs::JS_IsObject(v) && qjs::JS_VALUE_GET_PTR(v) == qjs::JS_VALUE_GET_PTR(func)
        };
        placeholder = same(desc.getter) || same(desc.setter);
        qjs::JS_FreeValue(ctx, desc.getter);
        qjs::JS_FreeValue(ctx, desc.setter);
        qjs::JS_FreeValue(ctx, desc.value);
    }
    let mut failed = found < 0;
    if placeholder {
        // Remove every placeholder first: QuickJS defines `Atomics` as an auto-init property
        // and aborts if one already exists. A name the context had removed (class5 contexts
        // drop `FinalizationRegistry`) must stay removed once the intrinsic is added.
        let mut removed = [false; TYPED_ARRAY_GLOBALS.len()];
        for (i, other) in lazy.names.iter().enumerate() {
            let a = qjs::JS_NewAtomLen(ctx, other.as_ptr().cast(), other.len() as _);
            if a != 0 {
                removed[i] = qjs::JS_HasProperty(ctx, global, a) == 0;
                qjs::JS_DeleteProperty(ctx, global, a, 0);
                qjs::JS_FreeAtom(ctx, a);
            }
        }
        failed = (lazy.add)(ctx) < 0;
        for (i, other) in lazy.names.iter().enumerate() {
            if !failed && removed[i] {
                let a = qjs::JS_NewAtomLen(ctx, other.as_ptr().cast(), other.len() as _);
                if a != 0 {
                    qjs::JS_DeleteProperty(ctx, global, a, 0);
                    qjs::JS_FreeAtom(ctx, a);
                }
            }
        }
    }
    let answer = if failed {
        exception
    } else if setter {
        let value = if argc > 0 {
            qjs::JS_DupValue(ctx, *argv)
        } else {
            qjs::JS_MKVAL(qjs::JS_TAG_UNDEFINED, 0)
        };
        // Consumes `value`.
        if qjs::JS_SetProperty(ctx, global, atom, value) < 0 {
            exception
        } else {
            qjs::JS_MKVAL(qjs::JS_TAG_UNDEFINED, 0)
        }
    } else {
        qjs::JS_GetProperty(ctx, global, atom)
    };
    qjs::JS_FreeAtom(ctx, atom);
    qjs::JS_FreeValue(ctx, global);
    answer
}

/// `Math.random` from the thread's generator: a restored image would otherwise replay the
/// same QuickJS generator state, and so the same numbers, in every run.
fn install_fresh_random<'js>(ctx: &Ctx<'js>) -> rquickjs::Result<Function<'js>> {
    let math: Object = ctx.globals().get("Math")?;
    let random = host_fn(ctx, fastrand::f64)?.with_name("random")?;
    math.prop(
        "random",
        rquickjs::object::Property::from(random.clone())
            .writable()
            .configurable(),
    )?;
    Ok(random)
}

/// Hold a reference to every object the named globals hold, their accessors, and (for names
/// marked to descend) their own properties' objects: the host functions among them own Rust
/// closures.
///
/// A run of a pristine context may drop the last JS reference to one (`console.log = null`);
/// QuickJS would then free the closure, and the restored image would bring back a function
/// whose closure is gone. With a pin, the count never reaches zero during a run.
fn pin_host_objects<'js>(
    ctx: &Ctx<'js>,
    names: impl Iterator<Item = (String, bool)>,
    pins: &mut Vec<Persistent<Value<'static>>>,
) -> rquickjs::Result<()> {
    let describe: Function = ctx
        .globals()
        .get::<_, Object>("Object")?
        .get("getOwnPropertyDescriptor")?;
    let mut pending: Vec<(Object<'js>, String, bool)> = names
        .map(|(n, descend)| (ctx.globals(), n, descend))
        .collect();
    while let Some((owner, name, descend)) = pending.pop() {
        let Some(descriptor) = describe.call::<_, Option<Object>>((owner, name))? else {
            continue;
        };
        for part in ["value", "get", "set"] {
            let value: Value = descriptor.get(part)?;
            let Some(object) = value.as_object().cloned() else {
                continue;
            };
            if descend && part == "value" {
                for inner in object.own_keys::<String>(Filter::new().string()) {
                    pending.push((object.clone(), inner?, false));
                }
            }
            pins.push(Persistent::save(ctx, value));
        }
    }
    Ok(())
}

fn install_timers<'js>(ctx: &Ctx<'js>, state: &Rc<RunState>) -> rquickjs::Result<()> {
    let g = ctx.globals();
    {
        let st = state.clone();
        g.set(
            "setTimeout",
            host_fn(
                ctx,
                move |ctx: Ctx<'js>,
                      callback: Value<'js>,
                      delay: rquickjs::function::Opt<f64>,
                      args: Rest<Value<'js>>| {
                    guarded(&ctx, &st, || {
                        let Some(func) = callback.as_function().cloned() else {
                            return Err(Exception::throw_type(
                                &ctx,
                                "setTimeout: the callback must be a function",
                            ));
                        };
                        // `bind` may be a script's getter that calls setTimeout itself: no borrow
                        // of the timers may be held while JS runs.
                        let callback = if args.0.is_empty() {
                            func
                        } else {
                            // Bind the extra arguments now so the timer entry is just a function.
                            let bind: Function = func.get("bind")?;
                            let mut call_args =
                                rquickjs::function::Args::new(ctx.clone(), args.0.len() + 1);
                            call_args.this(func.clone())?;
                            call_args.push_arg(Value::new_undefined(ctx.clone()))?;
                            call_args.push_args(args.0)?;
                            call_args.apply::<Function>(&bind)?
                        };
                        let mut timers = st.timers.borrow_mut();
                        if timers.len() >= MAX_TIMERS {
                            return Err(Exception::throw_range(
                                &ctx,
                                &format!("setTimeout: more than {MAX_TIMERS} pending timers"),
                            ));
                        }
                        let ms = delay.0.filter(|d| d.is_finite() && *d > 0.0).unwrap_or(0.0);
                        let at =
                            Instant::now() + Duration::from_micros((ms.min(1e12) * 1000.0) as u64);
                        let id = st.next_id();
                        timers.insert((at, id), Persistent::save(&ctx, callback));
                        Ok(id as f64)
                    })
                },
            )?,
        )?;
        let st = state.clone();
        g.set(
            "clearTimeout",
            host_fn(ctx, move |id: rquickjs::function::Opt<f64>| {
                if let Some(id) = id.0 {
                    st.timers.borrow_mut().retain(|(_, t), _| *t as f64 != id);
                }
            })?,
        )?;
    }
    Ok(())
}
