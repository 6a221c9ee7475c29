//! The seam between scripts and the host: objects whose methods scripts call (`ctx`, `require`d modules).
//!
//! The core knows nothing of SIP, HTTP or storage. A host object lists its methods and answers
//! calls with JSON values, either at once or with a future the run awaits (the script sees a
//! promise). The voice layer implements `ctx` this way; host modules (`kv`, `lookup`, ...) too.

use std::{collections::BTreeMap, fmt, sync::Arc};

use futures::future::LocalBoxFuture;
use serde_json::Value as Json;

use super::mode::Mode;

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
}

/// A host module `require(name)` can return, shared by all runs.
pub trait HostModule: Send + Sync {
    /// A fresh object for one run (most modules return a cheap handle to shared state).
    fn instantiate(&self) -> Box<dyn HostObject>;
    /// Whether the module may be required in this mode (async modules are not in `script`).
    fn available_in(&self, mode: Mode) -> bool {
        mode.is_async()
    }
}

/// The `require` whitelist: module names (aliases included) to implementations.
#[derive(Clone, Default)]
pub struct HostModules {
    modules: BTreeMap<String, Arc<dyn HostModule>>,
}

impl fmt::Debug for HostModules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.modules.keys()).finish()
    }
}

impl HostModules {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register `module` under `name` and each alias (ScriptForge's `cxKV` for `kv`, say).
    pub fn register(&mut self, names: &[&str], module: Arc<dyn HostModule>) {
        for name in names {
            self.modules.insert((*name).to_string(), module.clone());
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn HostModule>> {
        self.modules.get(name)
    }

    /// The names a script may require in `mode`, for error messages and docs.
    pub fn allowed_in(&self, mode: Mode) -> Vec<&str> {
        self.modules
            .iter()
            .filter(|(_, m)| m.available_in(mode))
            .map(|(n, _)| n.as_str())
            .collect()
    }
}
