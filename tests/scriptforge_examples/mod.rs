//! Where the tests find the ScriptForge examples: our own-words equivalents in
//! `tests/fixtures/scriptforge/`, or the published scripts themselves when
//! `CALLFORGE_SCRIPTFORGE_DIR` names a checkout of `connexcs/scriptforge-examples`.
#![allow(dead_code)]

use std::path::PathBuf;

/// The folder the examples are read from.
pub fn dir() -> PathBuf {
    std::env::var_os("CALLFORGE_SCRIPTFORGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scriptforge")
        })
}

/// The source of example `name` (without `.js`).
pub fn source(name: &str) -> String {
    let path = dir().join(format!("{name}.js"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
