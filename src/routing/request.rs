//! `data` for a class4 run, built from an INVITE: `data.routing` = the call's facts.
//!
//! `routing` gets `cli` (P-Asserted-Identity user, else From user), `dest_number`
//! (Request-URI user), `account_id` (the `X-Account-ID` header when present, else null),
//! `headers` (first value of each INVITE header, by name as received), `source_ip` and
//! `egress_routing` (empty unless the vars give one). Vars then apply: a `routing` table in
//! the vars gives defaults for `routing` (typically `egress_routing`, the carriers), the
//! request's facts win there; every other top-level var wins over the data, as over HTTP.

use serde_json::{json, Map, Value as Json};

use crate::sip::{message, IncomingCall};

/// Request-URI user of an INVITE (`""` when it has none).
pub fn request_user(call: &IncomingCall) -> String {
    message::uri_user(&call.request.uri.to_string()).unwrap_or_default()
}

/// The calling number: P-Asserted-Identity's user, else From's.
pub fn cli(call: &IncomingCall) -> String {
    message::header(&call.request.headers, "P-Asserted-Identity")
        .and_then(|v| message::NameAddr::parse(&v).ok())
        .and_then(|na| message::uri_user(&na.uri))
        .or_else(|| message::uri_user(&call.from.uri))
        .unwrap_or_default()
}

/// First value of each header, by the name it arrived with.
pub fn headers_object(call: &IncomingCall) -> Map<String, Json> {
    let mut out = Map::new();
    for h in call.request.headers.iter() {
        let (name, value) = message::name_value(h);
        out.entry(name).or_insert(Json::String(value));
    }
    out
}

/// `data` with `data.routing` from the INVITE (no vars applied yet).
pub fn routing_data(call: &IncomingCall) -> Json {
    let account = message::header(&call.request.headers, "X-Account-ID");
    routing_json(
        cli(call),
        request_user(call),
        account.as_deref(),
        headers_object(call),
        call.source.addr.ip(),
    )
}

/// `data` with `data.routing` from an INVITE's facts, however it was read (the general
/// path's rsip tree, or the fast path's header slices).
pub fn routing_json(
    cli: String,
    dest_number: String,
    account_id: Option<&str>,
    headers: Map<String, Json>,
    source_ip: std::net::IpAddr,
) -> Json {
    let account_id = account_id
        .map(|v| {
            let v = v.trim();
            v.parse::<i64>()
                .map(Json::from)
                .unwrap_or_else(|_| json!(v))
        })
        .unwrap_or(Json::Null);
    json!({
        "routing": {
            "cli": cli,
            "dest_number": dest_number,
            "account_id": account_id,
            "headers": headers,
            "source_ip": source_ip.to_string(),
            "egress_routing": [],
        }
    })
}

/// Applies vars: `vars.routing` keys are defaults under `data.routing`; other keys win.
pub fn apply_vars(data: Json, vars: &Json) -> Json {
    let (Json::Object(mut data), Json::Object(vars)) = (data, vars) else {
        return Json::Null;
    };
    for (k, v) in vars {
        match (k.as_str(), v, data.get_mut("routing")) {
            ("routing", Json::Object(defaults), Some(Json::Object(routing))) => {
                for (dk, dv) in defaults {
                    let empty = match routing.get(dk) {
                        None | Some(Json::Null) => true,
                        Some(Json::Array(a)) => a.is_empty(),
                        Some(Json::String(s)) => s.is_empty(),
                        _ => false,
                    };
                    if empty {
                        routing.insert(dk.clone(), dv.clone());
                    }
                }
            }
            _ => {
                data.insert(k.clone(), v.clone());
            }
        }
    }
    Json::Object(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::{parse, ParseLimits, Target, TransportKind};

    fn incoming(extra: &str) -> IncomingCall {
        let text = format!(
            "INVITE sip:447700900555@cf.example SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bK1\r\nFrom: \"Ann\" <sip:441000000000@carrier.example>;tag=a\r\nTo: <sip:447700900555@cf.example>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\n{extra}Content-Length: 0\r\n\r\n"
        );
        let rsip::SipMessage::Request(request) =
            parse::parse(text.as_bytes(), &ParseLimits::default()).unwrap()
        else {
            panic!("not a request")
        };
        let from =
            message::NameAddr::parse(&message::header(&request.headers, "From").unwrap()).unwrap();
        let to =
            message::NameAddr::parse(&message::header(&request.headers, "To").unwrap()).unwrap();
        IncomingCall {
            call: crate::sip::CallHandle(1),
            request,
            from,
            to,
            offer: None,
            source: Target {
                addr: "10.0.0.9:5060".parse().unwrap(),
                transport: TransportKind::Udp,
            },
        }
    }

    #[test]
    fn routing_comes_from_from_ruri_and_headers() {
        let d = routing_data(&incoming("X-Account-ID: 1001\r\n"));
        let r = &d["routing"];
        assert_eq!(r["cli"], "441000000000");
        assert_eq!(r["dest_number"], "447700900555");
        assert_eq!(r["account_id"], 1001);
        assert_eq!(r["source_ip"], "10.0.0.9");
        assert_eq!(r["headers"]["Call-ID"], "c1");
        assert_eq!(r["egress_routing"], json!([]));
    }

    #[test]
    fn pai_wins_over_from() {
        let d = routing_data(&incoming(
            "P-Asserted-Identity: <sip:+442079460000@carrier.example>\r\n",
        ));
        assert_eq!(d["routing"]["cli"], "+442079460000");
        assert_eq!(d["routing"]["account_id"], Json::Null);
    }

    #[test]
    fn vars_routing_gives_defaults_and_other_vars_win() {
        let d = json!({"routing": {"cli": "1", "egress_routing": []}, "x": 1});
        let v = json!({"routing": {"cli": "spoof", "egress_routing": [{"gw": {"a": {}}}]}, "x": 2});
        let out = apply_vars(d, &v);
        assert_eq!(out["routing"]["cli"], "1");
        assert_eq!(out["routing"]["egress_routing"][0]["gw"], json!({"a": {}}));
        assert_eq!(out["x"], 2);
    }
}
