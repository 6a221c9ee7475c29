//! `data` for a class5 script and the call variables `ctx.get()` starts with, from the INVITE.

use serde_json::{json, Map, Value as Json};

use crate::sip::{message, IncomingCall};

/// `{call_id, from, to, from_user, to_user, source_ip, headers}`.
pub fn call_data(call: &IncomingCall) -> Json {
    let headers: Map<String, Json> = {
        let mut m = Map::new();
        for h in call.request.headers.iter() {
            let (n, v) = message::name_value(h);
            m.entry(n).or_insert(Json::String(v));
        }
        m
    };
    json!({
        "call_id": message::call_id(&call.request.headers).unwrap_or_default(),
        "from": call.from.uri,
        "to": call.to.uri,
        "from_user": message::uri_user(&call.from.uri).unwrap_or_default(),
        "to_user": message::uri_user(&call.request.uri.to_string())
            .or_else(|| message::uri_user(&call.to.uri))
            .unwrap_or_default(),
        "source_ip": call.source.addr.ip().to_string(),
        "headers": headers,
    })
}

/// Every header of the INVITE as (name, value), for `ctx.header(name)` and `sip_h_<Name>`.
pub fn invite_headers(call: &IncomingCall) -> Vec<(String, String)> {
    call.request
        .headers
        .iter()
        .map(message::name_value)
        .collect()
}

/// The built-in variables: `sip_from_user`, `sip_to_user`, `sip_call_id`.
pub fn builtin_vars(data: &Json) -> Map<String, Json> {
    let mut m = Map::new();
    for (var, key) in [
        ("sip_from_user", "from_user"),
        ("sip_to_user", "to_user"),
        ("sip_call_id", "call_id"),
    ] {
        m.insert(var.into(), data[key].clone());
    }
    m
}
