//! Reading and writing the headers the SIP core depends on, building responses, serialising.
//!
//! rsip keeps headers as strings (typed parsing on demand). We read the few headers the core
//! needs with small parsers of our own, because rsip's typed parsers reject values that
//! real carriers send (bare `rport`, unknown methods in CSeq, IPv6 sent-by).

use rsip::headers::UntypedHeader;
use rsip::{Header, Headers};
use std::borrow::Cow;
use std::fmt;

/// Name and value of any rsip header, borrowed from it.
///
/// Header lookups run a dozen times per request (validation, routing facts, dialog state);
/// copying every header's name and value on each of them cost a class4 call about 160 k
/// instructions, 15% of its CPU, so lookups compare in place and copy only what they return.
pub fn name_value_ref(h: &Header) -> (&str, Cow<'_, str>) {
    macro_rules! typed {
        ($($variant:ident => $name:literal),* $(,)?) => {
            match h {
                Header::Other(n, v) => (n.as_str(), Cow::Borrowed(v.as_str())),
                $(Header::$variant(v) => ($name, Cow::Borrowed(v.value())),)*
                // A variant a newer rsip adds: fall back to its "Name: value" text.
                #[allow(unreachable_patterns)]
                other => {
                    let s = other.to_string();
                    let (n, v) = s.split_once(':').unwrap_or((s.as_str(), ""));
                    (unknown_name(n.trim()), Cow::Owned(v.trim().to_string()))
                }
            }
        };
    }
    typed! {
        Accept => "Accept", AcceptEncoding => "Accept-Encoding",
        AcceptLanguage => "Accept-Language", AlertInfo => "Alert-Info", Allow => "Allow",
        AuthenticationInfo => "Authentication-Info", Authorization => "Authorization",
        CSeq => "CSeq", CallId => "Call-ID", CallInfo => "Call-Info", Contact => "Contact",
        ContentDisposition => "Content-Disposition", ContentEncoding => "Content-Encoding",
        ContentLanguage => "Content-Language", ContentLength => "Content-Length",
        ContentType => "Content-Type", Date => "Date", ErrorInfo => "Error-Info",
        Event => "Event", Expires => "Expires", From => "From", InReplyTo => "In-Reply-To",
        MaxForwards => "Max-Forwards", MimeVersion => "Mime-Version",
        MinExpires => "Min-Expires", Organization => "Organization", Priority => "Priority",
        ProxyAuthenticate => "Proxy-Authenticate",
        ProxyAuthorization => "Proxy-Authorization", ProxyRequire => "Proxy-Require",
        RecordRoute => "Record-Route", ReplyTo => "Reply-To", Require => "Require",
        RetryAfter => "Retry-After", Route => "Route", Server => "Server",
        Subject => "Subject", SubscriptionState => "Subscription-State",
        Supported => "Supported", Timestamp => "Timestamp", To => "To",
        Unsupported => "Unsupported", UserAgent => "User-Agent", Via => "Via",
        Warning => "Warning", WwwAuthenticate => "WWW-Authenticate",
    }
}

/// A header name only the fallback above can produce; leaked once per distinct name (there
/// are at most as many as rsip has variants).
fn unknown_name(name: &str) -> &'static str {
    use std::sync::{Mutex, OnceLock};
    static NAMES: OnceLock<Mutex<Vec<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(known) = names.iter().find(|n| **n == name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    names.push(leaked);
    leaked
}

/// Name and value of any rsip header, copied.
pub fn name_value(h: &Header) -> (String, String) {
    let (n, v) = name_value_ref(h);
    (n.to_string(), v.into_owned())
}

/// All values of a header, in order (name compared case-insensitively).
pub fn headers_named(headers: &Headers, name: &str) -> Vec<String> {
    headers
        .iter()
        .map(name_value_ref)
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// First value of a header.
pub fn header(headers: &Headers, name: &str) -> Option<String> {
    headers
        .iter()
        .map(name_value_ref)
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.into_owned())
}

/// Builds an rsip header from a name and value, using rsip's typed variants where the core
/// reads them back.
pub fn make_header(name: &str, value: impl Into<String>) -> Header {
    let value = value.into();
    match name {
        "Via" => Header::Via(rsip::headers::Via::new(value)),
        "Call-ID" => Header::CallId(rsip::headers::CallId::new(value)),
        "CSeq" => Header::CSeq(rsip::headers::CSeq::new(value)),
        "From" => Header::From(rsip::headers::From::new(value)),
        "To" => Header::To(rsip::headers::To::new(value)),
        "Contact" => Header::Contact(rsip::headers::Contact::new(value)),
        "Content-Length" => Header::ContentLength(rsip::headers::ContentLength::new(value)),
        _ => Header::Other(name.to_string(), value),
    }
}

/// Replaces every header of that name with one new value (or appends it).
pub fn set_header(headers: &mut Headers, name: &str, value: impl Into<String>) {
    remove_headers(headers, name);
    headers.push(make_header(name, value));
}

pub fn remove_headers(headers: &mut Headers, name: &str) {
    headers.retain(|h| !name_value_ref(h).0.eq_ignore_ascii_case(name));
}

/// Call-ID value.
pub fn call_id(headers: &Headers) -> Option<String> {
    header(headers, "Call-ID").map(|s| s.trim().to_string())
}

/// CSeq as (number, method name).
pub fn cseq(headers: &Headers) -> Result<(u32, String), String> {
    let v = header(headers, "CSeq").ok_or("missing")?;
    let mut it = v.split_whitespace();
    let num = it
        .next()
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| format!("bad sequence number in {v:?}"))?;
    let method = it.next().ok_or("no method")?.to_string();
    if it.next().is_some() {
        return Err("trailing data".into());
    }
    Ok((num, method))
}

/// From tag.
pub fn from_tag(headers: &Headers) -> Option<String> {
    NameAddr::parse(&header(headers, "From")?).ok()?.tag()
}

/// To tag.
pub fn to_tag(headers: &Headers) -> Option<String> {
    NameAddr::parse(&header(headers, "To")?).ok()?.tag()
}

/// Declared Content-Length, if present and numeric.
pub fn content_length(headers: &Headers) -> Option<usize> {
    header(headers, "Content-Length")?.trim().parse().ok()
}

/// Max-Forwards, if present and numeric.
pub fn max_forwards(headers: &Headers) -> Option<u8> {
    header(headers, "Max-Forwards")?.trim().parse().ok()
}

/// Contact headers, parsed (a `*` Contact is skipped).
pub fn contacts(headers: &Headers) -> Vec<NameAddr> {
    headers_named(headers, "Contact")
        .iter()
        .filter(|v| v.trim() != "*")
        .filter_map(|v| NameAddr::parse(v).ok())
        .collect()
}

/// Record-Route values in message order.
pub fn record_routes(headers: &Headers) -> Vec<String> {
    headers_named(headers, "Record-Route")
}

/// Top Via, parsed.
pub fn top_via(headers: &Headers) -> Option<Via> {
    Via::parse(&header(headers, "Via")?).ok()
}

/// True if an option tag appears in any `Supported`/`Require`-style header.
pub fn has_option_tag(headers: &Headers, name: &str, tag: &str) -> bool {
    headers_named(headers, name)
        .iter()
        .flat_map(|v| {
            v.split(',')
                .map(|t| t.trim().to_string())
                .collect::<Vec<_>>()
        })
        .any(|t| t.eq_ignore_ascii_case(tag))
}

/// A URI rsip cannot represent (IPv6 hosts, `tel:`, `urn:`), kept as exact text: rsip prints a
/// scheme-less, auth-less URI as its host string, so the text round-trips unchanged.
pub fn opaque_uri(raw: &str) -> rsip::Uri {
    rsip::Uri {
        host_with_port: rsip::Host::Domain(raw.into()).into(),
        ..Default::default()
    }
}

/// Parses a URI with rsip when it can (sip/sips with a host rsip understands), otherwise keeps
/// it opaque. Never fails.
pub fn parse_uri(raw: &str) -> rsip::Uri {
    let raw = raw.trim();
    let lower = raw.to_ascii_lowercase();
    let sipish = lower.starts_with("sip:") || lower.starts_with("sips:");
    if sipish && !raw.contains('[') {
        if let Ok(u) = rsip::Uri::try_from(raw) {
            return u;
        }
    }
    opaque_uri(raw)
}

/// User part of a URI string: `sip:+1555@h` → `+1555`, `tel:+1555;npdi` → `+1555`.
pub fn uri_user(uri: &str) -> Option<String> {
    let uri = uri.trim().trim_start_matches('<').trim_end_matches('>');
    let (scheme, rest) = uri.split_once(':')?;
    if scheme.eq_ignore_ascii_case("tel") {
        let num = rest.split(';').next()?.trim();
        return (!num.is_empty()).then(|| num.to_string());
    }
    let (user, _) = rest.split_once('@')?;
    let user = user.split(':').next()?;
    (!user.is_empty()).then(|| user.to_string())
}

/// Host and port of a sip/sips URI string (IPv6 brackets kept off the host).
pub fn uri_host_port(uri: &str) -> Option<(String, Option<u16>)> {
    let uri = uri.trim().trim_start_matches('<').trim_end_matches('>');
    let (scheme, rest) = uri.split_once(':')?;
    if !scheme.eq_ignore_ascii_case("sip") && !scheme.eq_ignore_ascii_case("sips") {
        return None;
    }
    let rest = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
    let hostport = rest.split([';', '?']).next()?;
    let (host, port) = split_host_port(hostport).ok()?;
    Some((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
    ))
}

type Params = Vec<(String, Option<String>)>;

fn parse_params(s: &str) -> Params {
    s.split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.trim().to_string(), Some(v.trim().to_string())),
            None => (p.to_string(), None),
        })
        .collect()
}

fn write_params(f: &mut fmt::Formatter<'_>, params: &Params) -> fmt::Result {
    for (k, v) in params {
        match v {
            Some(v) => write!(f, ";{k}={v}")?,
            None => write!(f, ";{k}")?,
        }
    }
    Ok(())
}

fn get_param<'a>(params: &'a Params, name: &str) -> Option<&'a Option<String>> {
    params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// A parsed Via value: `SIP/2.0/UDP host:port;params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    pub transport: String,
    pub host: String,
    pub port: Option<u16>,
    pub params: Vec<(String, Option<String>)>,
}

/// The RFC 3261 branch prefix that marks a globally unique branch.
pub const MAGIC_COOKIE: &str = "z9hG4bK";

impl Via {
    pub fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        let (proto, rest) = value
            .split_once(|c: char| c.is_ascii_whitespace())
            .ok_or("no sent-by")?;
        let mut parts = proto.split('/').map(str::trim);
        let (name, version, transport) = (parts.next(), parts.next(), parts.next());
        if !matches!(name, Some(n) if n.eq_ignore_ascii_case("SIP"))
            || version != Some("2.0")
            || transport.is_none_or(str::is_empty)
        {
            return Err(format!("bad protocol {proto:?}"));
        }
        let rest = rest.trim();
        let (sent_by, params) = match rest.find(';') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let sent_by = sent_by.trim();
        let (host, port) = split_host_port(sent_by)?;
        Ok(Self {
            transport: transport.unwrap_or_default().to_ascii_uppercase(),
            host,
            port,
            params: parse_params(params),
        })
    }

    pub fn branch(&self) -> Option<&str> {
        get_param(&self.params, "branch").and_then(|v| v.as_deref())
    }

    /// `None`: no rport; `Some(None)`: bare `rport` (client asks for it); `Some(Some(p))`.
    pub fn rport(&self) -> Option<Option<u16>> {
        get_param(&self.params, "rport").map(|v| v.as_deref().and_then(|p| p.parse().ok()))
    }

    pub fn received(&self) -> Option<&str> {
        get_param(&self.params, "received").and_then(|v| v.as_deref())
    }

    /// `host[:port]` as written, used for transaction matching.
    pub fn sent_by(&self) -> String {
        match self.port {
            Some(p) => format!("{}:{p}", self.host),
            None => self.host.clone(),
        }
    }

    /// Sets (or adds) a parameter.
    pub fn set_param(&mut self, name: &str, value: Option<String>) {
        match self
            .params
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            Some(p) => p.1 = value,
            None => self.params.push((name.to_string(), value)),
        }
    }

    pub fn is_reliable(&self) -> bool {
        !self.transport.eq_ignore_ascii_case("UDP")
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIP/2.0/{} {}", self.transport, self.sent_by())?;
        write_params(f, &self.params)
    }
}

fn split_host_port(s: &str) -> Result<(String, Option<u16>), String> {
    if s.is_empty() {
        return Err("empty host".into());
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed IPv6 bracket")?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().map_err(|_| format!("bad port {p:?}"))?),
            None if after.is_empty() => None,
            None => return Err(format!("junk after IPv6 host: {after:?}")),
        };
        return Ok((format!("[{host}]"), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => {
            let port = p.parse().map_err(|_| format!("bad port {p:?}"))?;
            if h.is_empty() {
                return Err("empty host".into());
            }
            Ok((h.to_string(), Some(port)))
        }
        None => Ok((s.to_string(), None)),
    }
}

/// Where the `<` of a name-addr is, skipping quoted display names; an unterminated quoted
/// string is an error (RFC 4475 quotbal).
fn angle_outside_quotes(value: &str) -> Result<Option<usize>, String> {
    let (mut in_quote, mut escaped) = (false, false);
    for (i, c) in value.char_indices() {
        if in_quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_quote = false;
            }
            continue;
        }
        match c {
            '"' => in_quote = true,
            '<' => return Ok(Some(i)),
            _ => {}
        }
    }
    if in_quote {
        return Err("unterminated quoted display name".into());
    }
    Ok(None)
}

/// A name-addr or addr-spec with header parameters (From, To, Contact, Route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAddr {
    pub display: Option<String>,
    pub uri: String,
    pub params: Vec<(String, Option<String>)>,
}

impl NameAddr {
    pub fn new(uri: impl Into<String>) -> Self {
        Self {
            display: None,
            uri: uri.into(),
            params: Vec::new(),
        }
    }

    pub fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        if let Some(lt) = angle_outside_quotes(value)? {
            let display = value[..lt].trim().trim_matches('"').trim();
            let rest = &value[lt + 1..];
            let gt = rest.find('>').ok_or("unclosed <")?;
            let uri = rest[..gt].trim();
            if !uri.contains(':') {
                return Err(format!("bad URI {uri:?}"));
            }
            Ok(Self {
                display: (!display.is_empty()).then(|| display.to_string()),
                uri: uri.to_string(),
                params: parse_params(&rest[gt + 1..]),
            })
        } else {
            // addr-spec form: parameters after the URI belong to the header (RFC 3261 §20.10).
            let (uri, params) = match value.find(';') {
                Some(i) => (&value[..i], &value[i..]),
                None => (value, ""),
            };
            // White space may precede the `;` of a header parameter (RFC 4475 wsinv).
            let uri = uri.trim_end();
            if !uri.contains(':') || uri.contains(char::is_whitespace) || uri.contains('"') {
                return Err(format!("bad URI {uri:?}"));
            }
            Ok(Self {
                display: None,
                uri: uri.to_string(),
                params: parse_params(params),
            })
        }
    }

    pub fn tag(&self) -> Option<String> {
        get_param(&self.params, "tag").and_then(|v| v.clone())
    }

    pub fn param(&self, name: &str) -> Option<&Option<String>> {
        get_param(&self.params, name)
    }

    pub fn set_param(&mut self, name: &str, value: Option<String>) {
        match self
            .params
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            Some(p) => p.1 = value,
            None => self.params.push((name.to_string(), value)),
        }
    }
}

impl fmt::Display for NameAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.display {
            write!(f, "\"{}\" ", d.replace('"', ""))?;
        }
        write!(f, "<{}>", self.uri)?;
        write_params(f, &self.params)
    }
}

/// Default reason phrase for a status code (rsip prints enum names such as `BusyHere`).
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        180 => "Ringing",
        181 => "Call Is Being Forwarded",
        182 => "Queued",
        183 => "Session Progress",
        200 => "OK",
        202 => "Accepted",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Moved Temporarily",
        305 => "Use Proxy",
        380 => "Alternative Service",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        410 => "Gone",
        413 => "Request Entity Too Large",
        415 => "Unsupported Media Type",
        416 => "Unsupported URI Scheme",
        420 => "Bad Extension",
        421 => "Extension Required",
        422 => "Session Interval Too Small",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        482 => "Loop Detected",
        483 => "Too Many Hops",
        484 => "Address Incomplete",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        489 => "Bad Event",
        491 => "Request Pending",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Server Time-out",
        505 => "Version Not Supported",
        513 => "Message Too Large",
        600 => "Busy Everywhere",
        603 => "Decline",
        604 => "Does Not Exist Anywhere",
        606 => "Not Acceptable",
        _ => "Unknown",
    }
}

/// A response with our own reason phrase (always `StatusCode::Other` so rsip prints it).
pub fn status(code: u16, reason: Option<&str>) -> rsip::StatusCode {
    let reason = reason
        .map(|r| {
            r.chars()
                .filter(|c| !c.is_control())
                .take(120)
                .collect::<String>()
        })
        .unwrap_or_else(|| reason_phrase(code).to_string());
    rsip::StatusCode::Other(code, reason)
}

/// Copies of the headers RFC 3261 §8.2.6 puts in every response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseBase {
    pub vias: Vec<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub call_id: Option<String>,
    pub cseq: Option<String>,
}

impl ResponseBase {
    pub fn from_request(req: &rsip::Request) -> Self {
        Self::from_headers(req.headers.iter().map(name_value))
    }

    pub fn from_headers(headers: impl Iterator<Item = (String, String)>) -> Self {
        let mut base = Self::default();
        for (n, v) in headers {
            match n.as_str() {
                "Via" => base.vias.push(v),
                "From" if base.from.is_none() => base.from = Some(v),
                "To" if base.to.is_none() => base.to = Some(v),
                "Call-ID" if base.call_id.is_none() => base.call_id = Some(v),
                "CSeq" if base.cseq.is_none() => base.cseq = Some(v),
                _ => {}
            }
        }
        base
    }

    /// Builds the response; `to_tag` is added to To unless it already carries one.
    pub fn response(
        &self,
        code: u16,
        reason: Option<&str>,
        to_tag: Option<&str>,
    ) -> rsip::Response {
        let mut headers = Headers::default();
        for v in &self.vias {
            headers.push(make_header("Via", v.clone()));
        }
        if let Some(f) = &self.from {
            headers.push(make_header("From", f.clone()));
        }
        if let Some(t) = &self.to {
            let mut to = t.clone();
            if let (Some(tag), Ok(mut na)) = (to_tag, NameAddr::parse(t)) {
                if na.tag().is_none() {
                    na.set_param("tag", Some(tag.to_string()));
                    to = na.to_string();
                }
            }
            headers.push(make_header("To", to));
        }
        if let Some(c) = &self.call_id {
            headers.push(make_header("Call-ID", c.clone()));
        }
        if let Some(c) = &self.cseq {
            headers.push(make_header("CSeq", c.clone()));
        }
        rsip::Response {
            status_code: status(code, reason),
            version: rsip::Version::V2,
            headers,
            body: Vec::new(),
        }
    }
}

/// RFC 3261 §8.2.6 response to a request.
pub fn response_to(req: &rsip::Request, code: u16, to_tag: Option<&str>) -> rsip::Response {
    ResponseBase::from_request(req).response(code, None, to_tag)
}

/// Serialises a message, fixing Content-Length to the body and keeping the body bytes as-is
/// (rsip's Display would lossily convert a non-UTF-8 body).
pub fn to_bytes(msg: &rsip::SipMessage) -> Vec<u8> {
    let (start, headers, body) = match msg {
        rsip::SipMessage::Request(r) => (
            format!("{} {} SIP/2.0", r.method, r.uri),
            &r.headers,
            &r.body,
        ),
        rsip::SipMessage::Response(r) => {
            let (code, reason) = match &r.status_code {
                rsip::StatusCode::Other(c, reason) => (*c, reason.clone()),
                other => (other.code(), reason_phrase(other.code()).to_string()),
            };
            (format!("SIP/2.0 {code} {reason}"), &r.headers, &r.body)
        }
    };
    let mut out = Vec::with_capacity(512 + body.len());
    out.extend_from_slice(start.as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in headers.iter() {
        let (n, v) = name_value(h);
        if n.eq_ignore_ascii_case("Content-Length") {
            continue;
        }
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names the borrowed accessor gives are the ones rsip prints (what scripts saw in
    /// their header data before), for every header rsip types, and values are untouched.
    #[test]
    fn borrowed_names_match_what_rsip_prints() {
        let names = [
            "Accept",
            "Accept-Encoding",
            "Accept-Language",
            "Alert-Info",
            "Allow",
            "Authentication-Info",
            "Authorization",
            "CSeq",
            "Call-ID",
            "Call-Info",
            "Contact",
            "Content-Disposition",
            "Content-Encoding",
            "Content-Language",
            "Content-Length",
            "Content-Type",
            "Date",
            "Error-Info",
            "Event",
            "Expires",
            "From",
            "In-Reply-To",
            "Max-Forwards",
            "MIME-Version",
            "Min-Expires",
            "Organization",
            "Priority",
            "Proxy-Authenticate",
            "Proxy-Authorization",
            "Proxy-Require",
            "Record-Route",
            "Reply-To",
            "Require",
            "Retry-After",
            "Route",
            "Server",
            "Subject",
            "Subscription-State",
            "Supported",
            "Timestamp",
            "To",
            "Unsupported",
            "User-Agent",
            "Via",
            "Warning",
            "WWW-Authenticate",
            "X-Custom",
        ];
        let mut raw = String::from("OPTIONS sip:a@b SIP/2.0\r\n");
        for (i, n) in names.iter().enumerate() {
            raw.push_str(&format!("{n}: value {i}\r\n"));
        }
        raw.push_str("\r\n");
        let req = rsip::Request::try_from(raw.as_bytes()).expect("parses");
        assert_eq!(req.headers.iter().count(), names.len());
        for (i, h) in req.headers.iter().enumerate() {
            let (n, v) = name_value_ref(h);
            let printed = h.to_string();
            let (pn, pv) = printed.split_once(':').expect("name: value");
            // rsip prints Call-Id; the core always called it Call-ID.
            let expected_name = if n == "Call-ID" { "Call-ID" } else { pn.trim() };
            assert_eq!(n, expected_name, "header {i}");
            assert!(n.eq_ignore_ascii_case(names[i]), "{n} vs {}", names[i]);
            assert_eq!(v, pv.trim());
            assert_eq!(v, format!("value {i}"));
            assert!(matches!(v, Cow::Borrowed(_)), "{n} was copied");
        }
    }

    #[test]
    fn via_parsing_and_rport() {
        let v = Via::parse("SIP/2.0/udp 192.0.2.1:5070;branch=z9hG4bK77;rport").unwrap();
        assert_eq!(v.transport, "UDP");
        assert_eq!(v.sent_by(), "192.0.2.1:5070");
        assert_eq!(v.branch(), Some("z9hG4bK77"));
        assert_eq!(v.rport(), Some(None));
        let mut v2 = v.clone();
        v2.set_param("rport", Some("6000".into()));
        v2.set_param("received", Some("10.1.1.1".into()));
        assert_eq!(
            v2.to_string(),
            "SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bK77;rport=6000;received=10.1.1.1"
        );
        let v6 = Via::parse("SIP/2.0/TCP [2001:db8::1]:5061;branch=z9hG4bKx").unwrap();
        assert_eq!(v6.host, "[2001:db8::1]");
        assert_eq!(v6.port, Some(5061));
        assert!(v6.is_reliable());
        assert!(Via::parse("garbage").is_err());
        assert!(Via::parse("SIP/2.0/UDP host:notaport").is_err());
    }

    #[test]
    fn uri_helpers_cover_what_rsip_cannot() {
        for raw in [
            "sip:[2001:db8::1]:5060;transport=tcp",
            "tel:+15551234;npdi",
            "urn:service:sos",
        ] {
            assert_eq!(parse_uri(raw).to_string(), raw);
        }
        assert_eq!(
            parse_uri("sip:+1555@10.0.0.1;user=phone").user(),
            Some("+1555")
        );
        assert_eq!(
            uri_user("sip:+15551234@10.0.0.1;user=phone").as_deref(),
            Some("+15551234")
        );
        assert_eq!(uri_user("tel:+15551234;npdi").as_deref(), Some("+15551234"));
        assert_eq!(uri_user("sip:10.0.0.1"), None);
        assert_eq!(
            uri_host_port("sip:a@[2001:db8::1]:5070;lr"),
            Some(("2001:db8::1".into(), Some(5070)))
        );
        assert_eq!(
            uri_host_port("sip:p.example;lr"),
            Some(("p.example".into(), None))
        );
        assert_eq!(uri_host_port("tel:+1"), None);
    }

    #[test]
    fn name_addr_forms() {
        let n = NameAddr::parse("\"Bob\" <sip:bob@b.example;transport=tcp>;tag=abc").unwrap();
        assert_eq!(n.display.as_deref(), Some("Bob"));
        assert_eq!(n.uri, "sip:bob@b.example;transport=tcp");
        assert_eq!(n.tag().as_deref(), Some("abc"));
        let n = NameAddr::parse("sip:bob@b.example;tag=xyz").unwrap();
        assert_eq!(n.uri, "sip:bob@b.example");
        assert_eq!(n.tag().as_deref(), Some("xyz"));
        assert!(NameAddr::parse("<sip:unclosed").is_err());
    }

    #[test]
    fn response_copies_rfc3261_headers() {
        let text = "INVITE sip:x@h SIP/2.0\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1\r\nVia: SIP/2.0/UDP b;branch=z9hG4bK2\r\nFrom: <sip:a@a>;tag=f\r\nTo: <sip:x@h>\r\nCall-ID: c1\r\nCSeq: 7 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n";
        let rsip::SipMessage::Request(req) =
            crate::sip::parse::parse(text.as_bytes(), &Default::default()).unwrap()
        else {
            panic!()
        };
        let resp = response_to(&req, 486, Some("tt"));
        let bytes = to_bytes(&resp.into());
        let s = String::from_utf8(bytes).unwrap();
        assert!(s.starts_with("SIP/2.0 486 Busy Here\r\n"), "{s}");
        assert!(s.contains(
            "Via: SIP/2.0/UDP a;branch=z9hG4bK1\r\nVia: SIP/2.0/UDP b;branch=z9hG4bK2\r\n"
        ));
        assert!(s.contains("To: <sip:x@h>;tag=tt\r\n"));
        assert!(s.contains("CSeq: 7 INVITE\r\n"));
        assert!(s.ends_with("Content-Length: 0\r\n\r\n"));
    }
}
