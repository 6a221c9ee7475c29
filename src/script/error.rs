//! Typed errors of the interpreter core: script errors users see, and compile/engine failures.

use serde::{Deserialize, Serialize};

/// The `{code, message}` a script run ends with when it does not produce a result.
///
/// `code` is a SIP-style status (100..=699): scripts reject calls with it (`[604, "DNC"]`),
/// and the engine uses 500 for failures (uncaught errors, limits, bad entry points).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code} {message}")]
pub struct ScriptError {
    pub code: u16,
    pub message: String,
}

impl ScriptError {
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        ScriptError {
            code,
            message: message.into(),
        }
    }

    /// An engine-side failure of the run (code 500).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }
}

/// A script that cannot be compiled: the position points into the script's own source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}:{line}:{column}: {message}")]
pub struct CompileError {
    pub name: String,
    pub line: u32,
    pub column: u32,
    pub message: String,
}

/// Why a script could not be found, read or compiled.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("script '{0}' not found")]
    NotFound(String),
    #[error("invalid script name '{0}': use letters, digits, '-', '_' and '.'")]
    BadName(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("script is not valid UTF-8: {0}")]
    NotUtf8(String),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("script too large: {size} bytes (limit {limit})")]
    TooLarge { size: usize, limit: usize },
    #[error("too many scripts: limit is {0}")]
    TooMany(usize),
}

/// Failures of the engine itself, not of a script.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the script engine is shutting down")]
    ShuttingDown,
    #[error("cannot start worker thread: {0}")]
    Spawn(#[from] std::io::Error),
}
