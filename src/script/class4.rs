//! Class 4 routing results: scripts return the whole object or just `routing`; we normalise.

use serde_json::{Map, Value as Json};

/// Normalise a class4 script's result to the full object `{routing: {...}, ...vars}`.
///
/// Real scripts do both: `return data` (the whole object, changed in place) and
/// `return data.routing` (just the routing part). A result without a `routing` key is taken
/// as the routing part and put back into the input object; `null`/`undefined` means "no change".
/// The input is taken by value: the run owns it and it is never needed again.
pub fn normalise(input: Json, result: Json) -> Json {
    match result {
        Json::Null => input,
        Json::Object(ref obj) if obj.contains_key("routing") => result,
        routing => {
            let mut full = match input {
                Json::Object(obj) => obj,
                _ => Map::new(),
            };
            full.insert("routing".into(), routing);
            Json::Object(full)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn routing_only_results_are_put_back_in_the_whole_object() {
        let input = json!({"routing": {"cli": "1"}, "week": "9-21"});
        let out = normalise(input.clone(), json!({"cli": "2"}));
        assert_eq!(out, json!({"routing": {"cli": "2"}, "week": "9-21"}));
    }

    #[test]
    fn whole_objects_pass_and_null_means_unchanged() {
        let input = json!({"routing": {"cli": "1"}});
        let whole = json!({"routing": {"cli": "3"}, "extra": true});
        assert_eq!(normalise(input.clone(), whole.clone()), whole);
        assert_eq!(normalise(input.clone(), Json::Null), input);
    }
}
