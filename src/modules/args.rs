//! Reading script arguments (JSON) with errors that name the method and the argument.

use std::time::Duration;

use serde_json::Value as Json;

use crate::script::HostError;

/// Argument `index` of `method` as a string; numbers are accepted and turned into text.
pub fn string(method: &str, args: &[Json], index: usize, what: &str) -> Result<String, HostError> {
    match args.get(index) {
        Some(Json::String(s)) => Ok(s.clone()),
        Some(Json::Number(n)) => Ok(n.to_string()),
        _ => Err(HostError::type_error(format!(
            "{method}: argument {} ({what}) must be a string",
            index + 1
        ))),
    }
}

/// An optional string argument (`undefined`/`null` mean absent).
pub fn opt_string(
    method: &str,
    args: &[Json],
    index: usize,
    what: &str,
) -> Result<Option<String>, HostError> {
    match args.get(index) {
        None | Some(Json::Null) => Ok(None),
        Some(_) => string(method, args, index, what).map(Some),
    }
}

/// An optional number of seconds (`undefined`, `null` or 0 mean none).
pub fn opt_seconds(
    method: &str,
    args: &[Json],
    index: usize,
    what: &str,
) -> Result<Option<Duration>, HostError> {
    match args.get(index) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Number(n)) => match n.as_f64() {
            Some(s) if (0.0..=1e10).contains(&s) => {
                Ok(Some(Duration::from_secs_f64(s)).filter(|d| !d.is_zero()))
            }
            _ => Err(HostError::type_error(format!(
                "{method}: argument {} ({what}) must be a non-negative number of seconds",
                index + 1
            ))),
        },
        Some(_) => Err(HostError::type_error(format!(
            "{method}: argument {} ({what}) must be a number of seconds",
            index + 1
        ))),
    }
}

/// An object argument (`undefined`/`null` give an empty object when `optional`).
pub fn object(
    method: &str,
    args: &[Json],
    index: usize,
    optional: bool,
) -> Result<serde_json::Map<String, Json>, HostError> {
    match args.get(index) {
        Some(Json::Object(o)) => Ok(o.clone()),
        None | Some(Json::Null) if optional => Ok(serde_json::Map::new()),
        _ => Err(HostError::type_error(format!(
            "{method}: argument {} must be an object",
            index + 1
        ))),
    }
}
