//! A class4 result → the SIP answer: 302 with ordered, q-valued Contacts, or a final status.
//!
//! Each egress entry of `routing.egress_routing`, in the script's order, gives one Contact
//! per gateway id in its `gw` object (`<sip:DEST@HOST>` with HOST from `[gateways]`), or one
//! Contact from its `uri` field (a URI with a user part is used as it is; a host-only URI
//! gets `DEST@` put in). DEST is the entry's `dest_number` when the script set one, else
//! `routing.dest_number`. The script's per-target changes travel as Contact header
//! parameters: the gateway's `cli` as `cli="…"`, each `headers` entry `{key, value}` as
//! `KEY="value"` (header names that are not SIP tokens are dropped). q values descend
//! from 1.0 in steps of 1/n, so the order survives any proxy that sorts by q.

use std::collections::BTreeMap;

use serde_json::Value as Json;

use crate::script::ScriptError;

/// What to answer an INVITE with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// 302 with these Contact header values, best first.
    Redirect(Vec<String>),
    /// A final status and reason phrase.
    Reject { code: u16, reason: String },
}

/// Why a result cannot become Contacts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedirectError {
    #[error("the result has no routing.egress_routing array")]
    NoEgress,
    #[error("no egress entry names a known gateway or a uri")]
    NoUsableTarget,
    #[error("the destination number is missing")]
    NoDestination,
}

/// Maps a script's outcome to the SIP answer. Script errors `[code, msg]` (300–699) become
/// that status; 500s (failures, limits, timeouts) and anything else become `timeout_action`.
pub fn decide(
    outcome: &Result<Json, ScriptError>,
    gateways: &BTreeMap<String, String>,
    timeout_action: u16,
) -> Decision {
    match outcome {
        Ok(full) => match contacts(full, gateways) {
            Ok(c) => Decision::Redirect(c),
            Err(e) => Decision::Reject {
                code: 503,
                reason: sanitize_reason(&e.to_string()),
            },
        },
        Err(e) if (300..=699).contains(&e.code) && e.code != 500 => Decision::Reject {
            code: e.code,
            reason: sanitize_reason(&e.message),
        },
        Err(e) => Decision::Reject {
            code: timeout_action,
            reason: sanitize_reason(&e.message),
        },
    }
}

fn as_text(v: &Json) -> Option<String> {
    match v {
        Json::String(s) if !s.is_empty() => Some(s.clone()),
        Json::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The Contact values for a normalised class4 result (`{routing: {...}}`).
pub fn contacts(
    full: &Json,
    gateways: &BTreeMap<String, String>,
) -> Result<Vec<String>, RedirectError> {
    let routing = &full["routing"];
    let entries = routing["egress_routing"]
        .as_array()
        .ok_or(RedirectError::NoEgress)?;
    let default_dest = as_text(&routing["dest_number"]);
    let mut targets: Vec<(String, String)> = Vec::new(); // (uri, params)
    for entry in entries {
        let dest = as_text(&entry["dest_number"]).or_else(|| default_dest.clone());
        let headers = header_params(&entry["headers"]);
        if let Some(uri) = entry["uri"].as_str().filter(|u| !u.trim().is_empty()) {
            let uri = uri.trim().trim_start_matches('<').trim_end_matches('>');
            let target = if uri.contains('@') {
                uri.to_string()
            } else {
                let dest = dest.clone().ok_or(RedirectError::NoDestination)?;
                with_user(uri, &dest)
            };
            targets.push((target, headers.clone()));
            continue;
        }
        let Some(gws) = entry["gw"].as_object() else {
            continue;
        };
        for (id, gw) in gws {
            let Some(base) = gateways.get(id) else {
                tracing::warn!(gateway = %id, "egress entry names a gateway missing from [gateways]; skipped");
                continue;
            };
            let dest = dest.clone().ok_or(RedirectError::NoDestination)?;
            let mut params = String::new();
            if let Some(cli) = as_text(&gw["cli"]) {
                params.push_str(&format!(";cli={}", quote(&cli)));
            }
            params.push_str(&headers);
            targets.push((with_user(base, &dest), params));
        }
    }
    if targets.is_empty() {
        return Err(RedirectError::NoUsableTarget);
    }
    let n = targets.len();
    Ok(targets
        .into_iter()
        .enumerate()
        .map(|(i, (uri, params))| format!("<{uri}>;q={}{params}", q_value(i, n)))
        .collect())
}

/// `sip:host:port;params` + user → `sip:user@host:port;params` (scheme kept, old user replaced).
fn with_user(uri: &str, user: &str) -> String {
    let (scheme, rest) = match uri.split_once(':') {
        Some((s, r)) if s.eq_ignore_ascii_case("sip") || s.eq_ignore_ascii_case("sips") => (s, r),
        _ => ("sip", uri),
    };
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}:{}@{host}", escape_user(user))
}

/// Keeps characters allowed unescaped in a SIP user part; escapes the rest (RFC 3261 §25.1).
fn escape_user(user: &str) -> String {
    let mut out = String::with_capacity(user.len());
    for b in user.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.!~*'()&=+$,;?/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// q for position `i` of `n`: 1.0, then down in steps of 1/n (three decimals at most).
fn q_value(i: usize, n: usize) -> String {
    let milli = 1000 - (i * 1000 / n.max(1));
    let milli = milli.max(1);
    if milli == 1000 {
        "1.0".into()
    } else {
        let s = format!("0.{milli:03}");
        s.trim_end_matches('0').to_string()
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b))
}

fn quote(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `headers: [{key, value}]` → `;KEY="value"` for each valid header name.
fn header_params(headers: &Json) -> String {
    let mut out = String::new();
    for h in headers.as_array().map(Vec::as_slice).unwrap_or_default() {
        let (Some(key), Some(value)) = (h["key"].as_str(), as_text(&h["value"])) else {
            continue;
        };
        if !is_token(key) || key.eq_ignore_ascii_case("q") {
            tracing::debug!(header = %key, "egress header with an unusable name dropped");
            continue;
        }
        out.push_str(&format!(";{key}={}", quote(&value)));
    }
    out
}

/// A reason phrase safe to put on the status line: no control characters, at most 128 chars.
pub fn sanitize_reason(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(128)
        .collect();
    let cleaned = cleaned.trim();
    if cleaned.is_empty() {
        "Script Error".into()
    } else {
        cleaned.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gws() -> BTreeMap<String, String> {
        [
            ("alpha", "sip:alpha.example.net:5060"),
            ("bravo", "sip:10.1.1.1;transport=tcp"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
    }

    #[test]
    fn entries_become_ordered_contacts_with_q_and_params() {
        let full = json!({"routing": {"dest_number": "447700900555", "egress_routing": [
            {"gw": {"bravo": {"cli": "4420"}}, "headers": [{"key": "X-Route-Cost", "value": "0.009"}]},
            {"gw": {"alpha": {"cli": ""}}, "headers": [{"key": "bad name", "value": "x"}, {"key": "X-Q", "value": "a\"b"}]},
            {"uri": "sip:+1555@direct.example"},
            {"uri": "sip:host.example:5080", "dest_number": "999"},
            {"gw": {"unknown": {}}},
        ]}});
        let c = contacts(&full, &gws()).unwrap();
        assert_eq!(
            c,
            vec![
                "<sip:447700900555@10.1.1.1;transport=tcp>;q=1.0;cli=\"4420\";X-Route-Cost=\"0.009\"",
                "<sip:447700900555@alpha.example.net:5060>;q=0.75;X-Q=\"a\\\"b\"",
                "<sip:+1555@direct.example>;q=0.5",
                "<sip:999@host.example:5080>;q=0.25",
            ]
        );
    }

    #[test]
    fn q_values_descend_strictly() {
        for n in 1..40 {
            let qs: Vec<f64> = (0..n).map(|i| q_value(i, n).parse().unwrap()).collect();
            assert_eq!(qs[0], 1.0);
            assert!(qs.windows(2).all(|w| w[0] > w[1]), "{n}: {qs:?}");
            assert!(qs.iter().all(|q| *q > 0.0));
        }
    }

    #[test]
    fn outcomes_map_to_statuses() {
        let g = gws();
        let dnc = Err(ScriptError::new(604, "Number on DNC List"));
        assert_eq!(
            decide(&dnc, &g, 500),
            Decision::Reject {
                code: 604,
                reason: "Number on DNC List".into()
            }
        );
        let fail = Err(ScriptError::new(500, "CPU time limit of 2000 ms exceeded"));
        assert!(matches!(
            decide(&fail, &g, 503),
            Decision::Reject { code: 503, .. }
        ));
        let weird = Err(ScriptError::new(180, "ringing?"));
        assert!(matches!(
            decide(&weird, &g, 500),
            Decision::Reject { code: 500, .. }
        ));
        let none = Ok(json!({"routing": {"dest_number": "1", "egress_routing": []}}));
        assert!(matches!(
            decide(&none, &g, 500),
            Decision::Reject { code: 503, .. }
        ));
        let bad = Ok(json!({"routing": {}}));
        assert!(matches!(
            decide(&bad, &g, 500),
            Decision::Reject { code: 503, .. }
        ));
        let multi = Err(ScriptError::new(480, "line1\r\nInjected: x"));
        let Decision::Reject { reason, .. } = decide(&multi, &g, 500) else {
            panic!()
        };
        assert!(!reason.contains('\n') && !reason.contains('\r'));
    }
}
