//! The seam between scripts and the host: objects whose methods scripts call (`ctx`, `require`d modules).
//!
//! The core knows nothing of SIP, HTTP or storage. A host object lists its methods and answers
//! calls with JSON values, either at once or with a future the run awaits (the script sees a
//! promise). The voice layer implements `ctx` this way; host modules (`kv`, `lookup`, ...) too.
//!
//! A method name with dots (`"lookup.tps"`) appears to scripts as a nested object
//! (`api.lookup.tps(...)`). A module may also ship a JS *prelude*: the source of a function
//! expression, compiled once to bytecode, that receives the raw host object and returns what
//! scripts see (the `fetch` module wraps its raw answer in a WHATWG-shaped `Response` this way).
//!
//! Each name a module is registered under is also an ES module (`import { kv } from 'cxKV'`),
//! compiled once at registration; `imports.rs` loads it into the runs that import it.

use std::{collections::BTreeMap, fmt, sync::Arc};

use futures::future::LocalBoxFuture;
use serde_json::Value as Json;

use super::{
    compile::{compile, CompiledScript},
    library::ScriptLibrary,
    mode::Mode,
};

/// Whether a method returns its value directly or a promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodKind {
    Sync,
    Async,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMethod {
    pub name: &'static str,
    pub kind: MethodKind,
}

impl HostMethod {
    pub const fn sync(name: &'static str) -> Self {
        HostMethod {
            name,
            kind: MethodKind::Sync,
        }
    }
    pub const fn asynchronous(name: &'static str) -> Self {
        HostMethod {
            name,
            kind: MethodKind::Async,
        }
    }
}

/// An error a host method raises in the script: `name` becomes the JS error's `name`
/// (`"Hangup"`, `"TypeError"`, ...), so scripts can tell them apart in `catch`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}: {message}")]
pub struct HostError {
    pub name: String,
    pub message: String,
}

impl HostError {
    pub fn new(name: impl Into<String>, message: impl Into<String>) -> Self {
        HostError {
            name: name.into(),
            message: message.into(),
        }
    }
    pub fn type_error(message: impl Into<String>) -> Self {
        Self::new("TypeError", message)
    }
    pub fn error(message: impl Into<String>) -> Self {
        Self::new("Error", message)
    }
}

pub type HostResult = Result<Json, HostError>;

/// The answer to a host call.
pub enum HostCall {
    Ready(HostResult),
    Pending(LocalBoxFuture<'static, HostResult>),
}

impl HostCall {
    /// The answer, waited for when it is pending.
    pub async fn settle(self) -> HostResult {
        match self {
            HostCall::Ready(result) => result,
            HostCall::Pending(future) => future.await,
        }
    }
}

/// Methods of a host object written in JS, for what does not cross into Rust as JSON
/// (callbacks, RegExps, loops in the background).
#[derive(Clone)]
pub struct JsMethods {
    pub names: &'static [&'static str],
    /// A function expression that receives the raw host object and returns an object holding
    /// the `names` methods.
    pub source: Arc<CompiledScript>,
}

impl fmt::Debug for HostCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostCall::Ready(r) => f.debug_tuple("Ready").field(r).finish(),
            HostCall::Pending(_) => f.write_str("Pending"),
        }
    }
}

/// An object exposed to scripts. Calls happen on the run's worker thread; futures may be `!Send`.
pub trait HostObject {
    fn methods(&self) -> &[HostMethod];
    /// Called with the method's name and its arguments as JSON (`undefined` becomes `null`).
    fn call(&self, method: &str, args: Vec<Json>) -> HostCall;
    /// Compiled prelude (a function expression) that wraps the raw object before scripts see
    /// it, for what JSON cannot carry (callbacks, RegExps): `cxJob`'s job ctx uses one. Methods
    /// that only some runs call belong in [`HostObject::js_methods`] instead, which is lazy.
    fn prelude(&self) -> Option<Arc<CompiledScript>> {
        None
    }
    /// Methods written in JS. Their code is evaluated in the run's context only when one of
    /// them is first called: a class5 call whose script never calls one keeps about 13 KiB less.
    fn js_methods(&self) -> Option<JsMethods> {
        None
    }
    /// Resolves when what the run serves is gone (a class5 call ended and its grace time
    /// passed): a run still waiting on timers or host calls then ends with a 408 error.
    fn stopped(&self) -> Option<futures::future::LocalBoxFuture<'static, ()>> {
        None
    }
}

/// A host module `require(name)` can return, shared by all runs.
pub trait HostModule: Send + Sync {
    /// A fresh object for one run (most modules return a cheap handle to shared state).
    fn instantiate(&self) -> Box<dyn HostObject>;
    /// Whether the module may be required in this mode (async modules are not in `script`).
    fn available_in(&self, mode: Mode) -> bool {
        mode.is_async()
    }
    /// JS source of a function expression `(function (raw) { ... })` that turns the raw host
    /// object into the value scripts see. It is compiled once, when the module is registered.
    fn prelude(&self) -> Option<&'static str> {
        None
    }
    /// The names `import { ... } from 'NAME'` offers. By default the top-level names of the
    /// object's methods; a module whose prelude reshapes the object lists its own.
    fn exports(&self) -> Option<&'static [&'static str]> {
        None
    }
}

/// A registered module with its compiled prelude (or why the prelude did not compile), and
/// the ES module that `import ... from` its name loads.
#[derive(Clone)]
pub struct Registered {
    pub module: Arc<dyn HostModule>,
    pub prelude: Option<Result<Arc<CompiledScript>, String>>,
    /// A module named like the host module: its default export is what `require` returns,
    /// its named exports that value's properties. Compiled once, at registration.
    pub es_module: Option<Result<Arc<CompiledScript>, String>>,
}

impl Registered {
    fn new(name: &str, module: Arc<dyn HostModule>) -> Self {
        let prelude = module.prelude().map(|source| {
            compile(&format!("<prelude {name}>"), source)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        });
        Registered {
            module,
            prelude,
            es_module: None,
        }
    }

    /// The same module under `name`, with the ES module of that name.
    fn named(&self, name: &str) -> Self {
        let mut exports: Vec<String> = match self.module.exports() {
            Some(list) => list.iter().map(|s| s.to_string()).collect(),
            None => self
                .module
                .instantiate()
                .methods()
                .iter()
                .map(|m| m.name.split('.').next().unwrap_or(m.name).to_string())
                .collect(),
        };
        exports.sort();
        exports.dedup();
        let source = es_module_source(name, &exports);
        let es_module =
            super::compile::compile_import(name, &source, super::compile::ImportAs::Module)
                .map(Arc::new)
                .map_err(|e| e.to_string());
        Registered {
            es_module: Some(es_module),
            ..self.clone()
        }
    }
}

/// The source of the ES module standing for host module `name`: it takes the value
/// `require(name)` gives (so both forms see the same object, with the same mode checks).
fn es_module_source(name: &str, exports: &[String]) -> String {
    let quoted = serde_json::to_string(name).unwrap_or_else(|_| "\"\"".into());
    let mut source = format!("const m = require({quoted});\nexport default m;\n");
    for (i, export) in exports
        .iter()
        .filter(|e| is_identifier_name(e) && *e != "default")
        .enumerate()
    {
        source.push_str(&format!(
            "const e{i} = m[{q}];\nexport {{ e{i} as {export} }};\n",
            q = serde_json::to_string(export).unwrap_or_default()
        ));
    }
    source
}

fn is_identifier_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '$')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
}

/// The `require` whitelist: module names (aliases included) to implementations, plus the
/// host objects installed as globals (`api`, `fetch`) in the modes where they are available.
#[derive(Clone, Default)]
pub struct HostModules {
    modules: BTreeMap<String, Registered>,
    globals: BTreeMap<String, Registered>,
    /// The scripts folder, for imports between scripts (`import ... from './lib'`).
    scripts: Option<Arc<ScriptLibrary>>,
    /// Operator variables every run sees in `process.env` (`[env]` in callforge.toml).
    env: Arc<Vec<(String, String)>>,
}

impl fmt::Debug for HostModules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostModules")
            .field("require", &self.modules.keys().collect::<Vec<_>>())
            .field("globals", &self.globals.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl HostModules {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register `module` under `name` and each alias (ScriptForge's `cxKV` for `kv`, say).
    pub fn register(&mut self, names: &[&str], module: Arc<dyn HostModule>) {
        let Some(first) = names.first() else { return };
        let registered = Registered::new(first, module);
        for name in names {
            self.modules
                .insert((*name).to_string(), registered.named(name));
        }
    }

    /// Let scripts import other scripts of `library`'s folder.
    pub fn set_scripts(&mut self, library: Arc<ScriptLibrary>) {
        self.scripts = Some(library);
    }

    pub fn scripts(&self) -> Option<&Arc<ScriptLibrary>> {
        self.scripts.as_ref()
    }

    /// Operator variables for `process.env` (a run's own variables win over these).
    pub fn set_env(&mut self, env: Vec<(String, String)>) {
        self.env = Arc::new(env);
    }

    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// Every module name, whatever the mode (for the errors of `import`).
    pub fn names(&self) -> Vec<&str> {
        self.modules.keys().map(String::as_str).collect()
    }

    /// Install `module` as the global `name` (e.g. `api`, `fetch`) in the modes it is
    /// available in; elsewhere the global is `undefined`. Built on first access, so a run
    /// that never touches it pays only for an accessor.
    pub fn register_global(&mut self, name: &str, module: Arc<dyn HostModule>) {
        self.globals
            .insert(name.to_string(), Registered::new(name, module));
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn HostModule>> {
        self.modules.get(name).map(|r| &r.module)
    }

    pub fn entry(&self, name: &str) -> Option<&Registered> {
        self.modules.get(name)
    }

    pub fn globals(&self) -> impl Iterator<Item = (&str, &Registered)> {
        self.globals.iter().map(|(n, r)| (n.as_str(), r))
    }

    /// The names a script may require in `mode`, for error messages and docs.
    pub fn allowed_in(&self, mode: Mode) -> Vec<&str> {
        self.modules
            .iter()
            .filter(|(_, r)| r.module.available_in(mode))
            .map(|(n, _)| n.as_str())
            .collect()
    }
}
