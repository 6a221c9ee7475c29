//! Reading thrown JavaScript values: their text and position, and the ScriptForge error mapping.

use rquickjs::{Array, Object, Value};

use super::error::ScriptError;

/// What a thrown value says about itself.
#[derive(Debug, Clone, Default)]
pub struct Described {
    /// `Name: message` for errors, the value's text otherwise.
    pub text: String,
    /// The error's `message` alone (for errors).
    pub message: Option<String>,
    pub line: Option<u32>,
    pub stack: Option<String>,
}

impl Described {
    /// The first `name:line:col` frame of the stack that points into the script `name`.
    pub fn location_in(&self, name: &str) -> Option<(u32, u32)> {
        let stack = self.stack.as_deref()?;
        stack.lines().find_map(|frame| {
            let at = frame.find(name)?;
            let rest = frame[at + name.len()..].trim_start_matches(':');
            let mut parts = rest.split(|c: char| !c.is_ascii_digit());
            let line = parts.next()?.parse().ok()?;
            let column = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
            Some((line, column))
        })
    }
}

fn string_prop(obj: &Object<'_>, key: &str) -> Option<String> {
    obj.get::<_, Option<rquickjs::Coerced<String>>>(key)
        .ok()
        .flatten()
        .map(|c| c.0)
}

/// Describe any thrown value without running script code that could throw again.
pub fn describe_exception(value: &Value<'_>) -> Described {
    if let Some(obj) = value.as_object() {
        if obj.is_error() {
            let name = string_prop(obj, "name").unwrap_or_else(|| "Error".into());
            let message = string_prop(obj, "message").unwrap_or_default();
            let text = if message.is_empty() {
                name
            } else {
                format!("{name}: {message}")
            };
            return Described {
                text,
                message: Some(message),
                line: obj.get::<_, Option<u32>>("lineNumber").ok().flatten(),
                stack: string_prop(obj, "stack"),
            };
        }
    }
    Described {
        text: value_text(value),
        ..Default::default()
    }
}

/// A short human text for any value (used for thrown non-errors and console output).
pub fn value_text(value: &Value<'_>) -> String {
    if let Some(s) = value.as_string() {
        return s.to_string().unwrap_or_default();
    }
    if value.is_undefined() {
        return "undefined".into();
    }
    if value.is_null() {
        return "null".into();
    }
    if value.is_object() && !value.is_function() {
        if let Ok(Some(json)) = value.ctx().json_stringify(value.clone()) {
            if let Ok(s) = json.to_string() {
                return s;
            }
        }
    }
    value
        .get::<rquickjs::Coerced<String>>()
        .map(|c| c.0)
        .unwrap_or_else(|_| format!("<{}>", value.type_name()))
}

/// A SIP-style code a script may use: an integer in 100..=699.
pub fn sip_code(value: &Value<'_>) -> Option<u16> {
    let n = value.as_number()?;
    (n.fract() == 0.0 && (100.0..=699.0).contains(&n)).then_some(n as u16)
}

/// `"480 Outside hours"` → (480, "Outside hours").
pub fn split_leading_code(text: &str) -> Option<(u16, &str)> {
    let head = text.get(..3)?;
    if !head.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let rest = &text[3..];
    if !(rest.is_empty() || rest.starts_with(' ') || rest.starts_with(':')) {
        return None;
    }
    let code: u16 = head.parse().ok()?;
    (100..=699)
        .contains(&code)
        .then(|| (code, rest.trim_start_matches(':').trim()))
}

/// The ScriptForge mapping of a thrown (or `err()`-ed) value to `{code, message}`:
/// `[604, "DNC"]` → 604; `Error("480 Outside hours")` → 480; `{code, message}` → as given;
/// anything else → 500 with the value's text.
pub fn script_error_from(value: &Value<'_>) -> ScriptError {
    if let Some(arr) = value.as_array() {
        if let Some(err) = from_pair(arr) {
            return err;
        }
    }
    if let Some(obj) = value.as_object() {
        if !obj.is_error() && !obj.is_array() {
            if let Ok(code) = obj.get::<_, Value>("code") {
                if let Some(code) = sip_code(&code) {
                    let message = string_prop(obj, "message").unwrap_or_default();
                    return ScriptError::new(code, message);
                }
            }
        }
    }
    let described = describe_exception(value);
    if let Some(message) = &described.message {
        if let Some((code, rest)) = split_leading_code(message) {
            return ScriptError::new(code, rest);
        }
    }
    ScriptError::new(500, described.text)
}

fn from_pair(arr: &Array<'_>) -> Option<ScriptError> {
    let first: Value = arr.get(0).ok()?;
    let code = sip_code(&first).or_else(|| {
        first
            .as_string()
            .and_then(|s| s.to_string().ok())
            .and_then(|s| s.trim().parse::<u16>().ok())
            .filter(|c| (100..=699).contains(c))
    })?;
    let message = arr
        .get::<Value>(1)
        .ok()
        .filter(|v| !v.is_undefined())
        // An Error as the message (`[500, err]`) reads as `Name: message`, not `{}`.
        .map(|v| describe_exception(&v).text)
        .unwrap_or_default();
    Some(ScriptError::new(code, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_codes_are_split_only_when_they_are_sip_codes() {
        assert_eq!(
            split_leading_code("480 Outside hours"),
            Some((480, "Outside hours"))
        );
        assert_eq!(split_leading_code("604"), Some((604, "")));
        assert_eq!(split_leading_code("4800 calls"), None);
        assert_eq!(split_leading_code("099 x"), None);
        assert_eq!(split_leading_code("abc"), None);
        assert_eq!(split_leading_code("é"), None);
    }
}
