//! Per-route variables (ScriptForge "Vars"): a TOML file merged into `data` as top-level keys.

use std::path::Path;

use serde_json::Value as Json;

#[derive(Debug, thiserror::Error)]
pub enum VarsError {
    #[error("cannot read vars file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("vars file {path} is not valid TOML: {message}")]
    Toml { path: String, message: String },
}

/// Read a vars file into a JSON object (`[schedule] week = "9-21"` → `{"schedule":{"week":"9-21"}}`).
pub fn load(path: &Path) -> Result<Json, VarsError> {
    let text = std::fs::read_to_string(path).map_err(|source| VarsError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text).map_err(|message| VarsError::Toml {
        path: path.display().to_string(),
        message,
    })
}

pub fn parse(text: &str) -> Result<Json, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    serde_json::to_value(table).map_err(|e| e.to_string())
}

/// Merge `vars` into `data` (an object) as top-level keys. Vars win over request data of the
/// same name: they are the operator's configuration, which a caller must not be able to spoof.
pub fn merge(data: Json, vars: &Json) -> Json {
    let Json::Object(vars) = vars else {
        return data;
    };
    let mut data = match data {
        Json::Object(map) => map,
        Json::Null => serde_json::Map::new(),
        other => {
            let mut map = serde_json::Map::new();
            map.insert("input".into(), other);
            map
        }
    };
    for (k, v) in vars {
        data.insert(k.clone(), v.clone());
    }
    Json::Object(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_become_nested_objects_and_override_data() {
        let vars = parse("limit = 3\n[schedule]\nweek = \"9-21\"\n").unwrap();
        let merged = merge(json!({"routing": {}, "limit": 10}), &vars);
        assert_eq!(merged["schedule"]["week"], "9-21");
        assert_eq!(merged["limit"], 3);
        assert!(merged["routing"].is_object());
    }

    #[test]
    fn bad_toml_is_a_clear_error() {
        let e = parse("week = ").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
    }
}
