//! Where responses go and how unparseable requests are still answered (RFC 3261 §18.2, RFC 3581).

use super::*;

/// RFC 3581 / §18.2.1: stamp `received` and `rport` on the top Via.
pub(crate) fn stamp_via(via: &mut Via, source: Target) {
    let host_ip = via
        .host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok();
    let rport_requested = via.rport().is_some();
    if rport_requested {
        via.set_param("rport", Some(source.addr.port().to_string()));
    }
    if rport_requested || host_ip != Some(source.addr.ip()) {
        via.set_param("received", Some(source.addr.ip().to_string()));
    }
}

/// §18.2.2 + RFC 3581: where a response to a request with this (stamped) Via goes.
pub(crate) fn response_target(via: Option<&Via>, source: Target) -> Target {
    let Some(via) = via else {
        return source;
    };
    if source.transport.is_reliable() {
        return source;
    }
    let ip = via
        .received()
        .and_then(|r| r.parse().ok())
        .or_else(|| {
            via.host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .ok()
        })
        .unwrap_or(source.addr.ip());
    let port = match via.rport() {
        Some(Some(p)) => p,
        _ => via.port.unwrap_or(5060),
    };
    Target {
        addr: SocketAddr::new(ip, port),
        transport: source.transport,
    }
}

/// Reads enough of an unparseable request to answer it: (method, response base).
pub(super) fn salvage(bytes: &[u8]) -> Option<(String, ResponseBase)> {
    let head = &bytes[..bytes.len().min(16 * 1024)];
    let text = String::from_utf8_lossy(head);
    let mut lines = text.lines().skip_while(|l| l.trim().is_empty());
    let first = lines.next()?;
    if first.starts_with("SIP/") {
        return None;
    }
    let method = first.split(' ').next()?.to_string();
    if method.is_empty() || method.eq_ignore_ascii_case("ACK") || !first.contains(" SIP/") {
        return None;
    }
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            let n = n.trim();
            let full = match n.to_ascii_lowercase().as_str() {
                "v" | "via" => "Via",
                "f" | "from" => "From",
                "t" | "to" => "To",
                "i" | "call-id" => "Call-ID",
                "cseq" => "CSeq",
                _ => return None,
            };
            Some((full.to_string(), v.trim().to_string()))
        })
        .flat_map(|(n, v)| {
            if n == "Via" {
                parse::split_list(&v)
                    .into_iter()
                    .map(|x| ("Via".to_string(), x))
                    .collect()
            } else {
                vec![(n, v)]
            }
        });
    let base = ResponseBase::from_headers(headers);
    if base.vias.is_empty() {
        return None;
    }
    Some((method, base))
}
