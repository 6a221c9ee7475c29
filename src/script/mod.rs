//! The interpreter core: ScriptForge-compatible JavaScript in a QuickJS sandbox, for every mode.
//!
//! It knows nothing of SIP or HTTP. Callers hand it a compiled script, a mode and input data
//! (and for class5 a `ctx` host object) and get back a result or a typed `{code, message}`.

mod arena;
pub mod class4;
pub mod compile;
pub mod engine;
pub mod error;
pub mod exception;
pub mod execution;
pub mod host;
mod imports;
mod inspect;
pub mod library;
pub mod mode;
pub mod pool;
mod shared;
pub mod vars;

pub use compile::{compile, CompiledScript, SourceKind};
pub use engine::{Engine, EngineConfig, Invocation};
pub use error::{CompileError, EngineError, LoadError, ScriptError};
pub use execution::{LogLevel, LogLine, RunOutput, RunRequest, Sandbox};
pub use host::{
    HostCall, HostError, HostMethod, HostModule, HostModules, HostObject, JsMethods, MethodKind,
};
pub use library::{LibraryLimits, ScriptLibrary};
pub use mode::{Limits, Mode};
pub use pool::{LocalRunner, LocalTask};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_imports;
