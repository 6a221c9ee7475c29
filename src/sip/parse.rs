//! Bytes to rsip messages: normalises what rsip does not understand, then validates.
//!
//! rsip parses a strict subset of RFC 3261: it knows neither compact header names nor
//! folded lines, keeps comma-joined header values as one header, ignores Content-Length
//! and rejects unknown methods outright. So we first normalise the header section into
//! a [`RawMessage`] (one canonical header per line), and only then hand a re-serialised
//! copy to rsip. The [`RawMessage`] also lets us answer requests rsip refuses (400/501).

use super::message::{self, NameAddr, Via};
use thiserror::Error;

/// Limits applied before anything else is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseLimits {
    /// Largest accepted message, header section and body together.
    pub max_message_size: usize,
    /// Most header lines (after unfolding and list splitting).
    pub max_headers: usize,
    /// Longest single header line (after unfolding).
    pub max_header_len: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        Self {
            max_message_size: 64 * 1024,
            max_headers: 128,
            max_header_len: 8 * 1024,
        }
    }
}

/// What is wrong with a message that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    #[error("message is empty")]
    Empty,
    #[error("message is {size} bytes, above the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("header section is not valid UTF-8")]
    NotUtf8,
    #[error("no blank line ends the header section")]
    NoHeaderEnd,
    #[error("malformed start line: {0}")]
    BadStartLine(String),
    #[error("unsupported SIP version {0}")]
    BadVersion(String),
    #[error("unknown method {0}")]
    UnknownMethod(String),
    #[error("malformed header line: {0}")]
    BadHeaderLine(String),
    #[error("{count} header lines, above the {limit} limit")]
    TooManyHeaders { count: usize, limit: usize },
    #[error("a header line is {len} bytes, above the {limit}-byte limit")]
    HeaderTooLong { len: usize, limit: usize },
    #[error("Content-Length {0:?} is not a number")]
    BadContentLength(String),
    #[error("Content-Length given twice with different values ({0} and {1})")]
    ConflictingContentLength(usize, usize),
    #[error("Request-URI must not be enclosed in angle brackets: {0}")]
    BracketedRequestUri(String),
    #[error("body has {actual} bytes but Content-Length says {declared}")]
    BodyTruncated { declared: usize, actual: usize },
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    #[error("malformed {header} header: {detail}")]
    BadHeader {
        header: &'static str,
        detail: String,
    },
    #[error("{0} appears more than once with different values")]
    DuplicateHeader(&'static str),
    #[error("{0}: a URI with headers (?) must be enclosed in <>")]
    UnbracketedUriHeaders(&'static str),
    #[error("Request-URI must not carry URI headers (?): {0}")]
    RequestUriHeaders(String),
    #[error("CSeq method {cseq} does not match request method {method}")]
    CSeqMethodMismatch { cseq: String, method: String },
    #[error("rsip rejected the message: {0}")]
    Rsip(String),
}

impl ParseError {
    /// A short reason phrase for a `400 Bad Request` (no CR/LF, bounded length).
    pub fn reason_phrase(&self) -> String {
        let mut s: String = self
            .to_string()
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(100)
            .collect();
        if let Some(first) = s.get(..1) {
            let upper = first.to_ascii_uppercase();
            s.replace_range(..1, &upper);
        }
        s
    }
}

/// The first line of a message, already split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    Request { method: String, uri: String },
    Response { code: u16, reason: String },
}

/// A message after normalisation: canonical header names, one value per line, body cut
/// to Content-Length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    pub start: StartLine,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// RFC 3261 §7.3.3 compact forms plus the ones later RFCs registered.
fn expand_compact(name: &str) -> Option<&'static str> {
    if name.len() != 1 {
        return None;
    }
    Some(match name.as_bytes()[0].to_ascii_lowercase() {
        b'a' => "Accept-Contact",
        b'b' => "Referred-By",
        b'c' => "Content-Type",
        b'd' => "Request-Disposition",
        b'e' => "Content-Encoding",
        b'f' => "From",
        b'i' => "Call-ID",
        b'j' => "Reject-Contact",
        b'k' => "Supported",
        b'l' => "Content-Length",
        b'm' => "Contact",
        b'o' => "Event",
        b'r' => "Refer-To",
        b's' => "Subject",
        b't' => "To",
        b'u' => "Allow-Events",
        b'v' => "Via",
        b'x' => "Session-Expires",
        b'y' => "Identity",
        _ => return None,
    })
}

const CANONICAL: &[&str] = &[
    "Accept",
    "Allow",
    "Call-ID",
    "Contact",
    "Content-Length",
    "Content-Type",
    "CSeq",
    "Expires",
    "From",
    "Max-Forwards",
    "Min-SE",
    "Record-Route",
    "Require",
    "Route",
    "Session-Expires",
    "Supported",
    "To",
    "Via",
    "User-Agent",
    "Server",
    "Retry-After",
    "Unsupported",
];

/// Headers whose comma-separated values we split into one header each, so every layer can
/// treat "one header = one value".
const LIST_HEADERS: &[&str] = &["Via", "Contact", "Route", "Record-Route"];

fn canonical_name(name: &str) -> String {
    if let Some(full) = expand_compact(name) {
        return full.to_string();
    }
    CANONICAL
        .iter()
        .find(|c| c.eq_ignore_ascii_case(name))
        .map(|c| c.to_string())
        .unwrap_or_else(|| name.to_string())
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-.!%*_+`'~".contains(c)
}

/// Finds the end of the header section: returns (header bytes, offset of the body).
/// Accepts bare LF line ends because some devices send them.
pub(crate) fn split_head(bytes: &[u8]) -> Option<(&[u8], usize)> {
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\n' {
            let next = &bytes[i + 1..];
            if next.starts_with(b"\r\n") {
                return Some((&bytes[..i + 1], i + 3));
            }
            if next.starts_with(b"\n") {
                return Some((&bytes[..i + 1], i + 2));
            }
        }
        i += 1;
    }
    None
}

/// Splits a header value at top-level commas (not inside quotes or angle brackets).
pub(crate) fn split_list(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut in_quote, mut in_angle, mut escaped) = (false, false, false);
    for c in value.chars() {
        if escaped {
            escaped = false;
            cur.push(c);
            continue;
        }
        match c {
            '\\' if in_quote => escaped = true,
            '"' => in_quote = !in_quote,
            '<' if !in_quote => in_angle = true,
            '>' if !in_quote => in_angle = false,
            ',' if !in_quote && !in_angle => {
                let item = cur.trim();
                if !item.is_empty() {
                    out.push(item.to_string());
                }
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    let item = cur.trim();
    if !item.is_empty() {
        out.push(item.to_string());
    }
    out
}

fn parse_start_line(line: &str) -> Result<StartLine, ParseError> {
    let bad = || ParseError::BadStartLine(truncate(line, 80));
    if let Some(rest) = line.strip_prefix("SIP/") {
        let mut parts = rest.splitn(3, ' ');
        let version = parts.next().ok_or_else(bad)?;
        if version != "2.0" {
            return Err(ParseError::BadVersion(truncate(version, 20)));
        }
        let code = parts.next().ok_or_else(bad)?;
        let code: u16 = code.parse().map_err(|_| bad())?;
        if !(100..=699).contains(&code) {
            return Err(bad());
        }
        let reason = parts.next().unwrap_or("").to_string();
        return Ok(StartLine::Response { code, reason });
    }
    let parts: Vec<&str> = line.split(' ').collect();
    if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
        return Err(bad());
    }
    if !parts[0].chars().all(is_token_char) {
        return Err(bad());
    }
    match parts[2].strip_prefix("SIP/") {
        Some("2.0") => {}
        Some(v) => return Err(ParseError::BadVersion(truncate(v, 20))),
        None => return Err(bad()),
    }
    if parts[1].starts_with('<') {
        // RFC 4475 ltgtruri: a name-addr where an addr-spec belongs. Refused with a precise
        // 400 rather than guessed at: a proxy would forward it unchanged.
        return Err(ParseError::BracketedRequestUri(truncate(parts[1], 80)));
    }
    if !parts[1].contains(':') {
        return Err(bad());
    }
    Ok(StartLine::Request {
        method: parts[0].to_string(),
        uri: parts[1].to_string(),
    })
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Rewrites each Via of a (comma-separated) value without the linear white space RFC 3261
/// allows around its `/`, `:`, `;` and `=` separators (`SIP / 2.0 / UDP host ; branch = x`),
/// so every later reader sees `SIP/2.0/UDP host;branch=x`. A value that does not look like a
/// Via is left for the validator to refuse.
fn canonical_via_list(value: &str) -> String {
    split_list(value)
        .iter()
        .map(|v| canonical_via(v).unwrap_or_else(|| v.clone()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn canonical_via(value: &str) -> Option<String> {
    // sent-protocol: three tokens separated by "/" with optional white space around each.
    let mut rest = value.trim_start();
    let mut proto = Vec::with_capacity(3);
    for i in 0..3 {
        if i > 0 {
            rest = rest.trim_start().strip_prefix('/')?.trim_start();
        }
        let end = rest
            .find(|c: char| c == '/' || c.is_whitespace())
            .unwrap_or(rest.len());
        if end == 0 {
            return None;
        }
        proto.push(&rest[..end]);
        rest = &rest[end..];
    }
    // sent-by and params: no white space is significant outside quoted strings.
    let mut tail = String::with_capacity(rest.len());
    let (mut in_quote, mut escaped) = (false, false);
    for c in rest.trim().chars() {
        if in_quote {
            tail.push(c);
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
            '"' => {
                in_quote = true;
                tail.push(c);
            }
            c if c.is_whitespace() => {}
            c => tail.push(c),
        }
    }
    if tail.is_empty() {
        return None;
    }
    Some(format!("{} {tail}", proto.join("/")))
}

/// Normalises a complete message (one datagram, or one frame cut by the stream framer).
pub fn normalise(bytes: &[u8], limits: &ParseLimits) -> Result<RawMessage, ParseError> {
    if bytes.len() > limits.max_message_size {
        return Err(ParseError::TooLarge {
            size: bytes.len(),
            limit: limits.max_message_size,
        });
    }
    let start = bytes
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .ok_or(ParseError::Empty)?;
    let bytes = &bytes[start..];
    let (head, body_at) = split_head(bytes).ok_or(ParseError::NoHeaderEnd)?;
    let head = std::str::from_utf8(head).map_err(|_| ParseError::NotUtf8)?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let start_line = parse_start_line(lines.next().unwrap_or(""))?;

    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            // Folded continuation: RFC 3261 §7.3.1 says it is equivalent to one space.
            let last = headers
                .last_mut()
                .ok_or_else(|| ParseError::BadHeaderLine(truncate(line, 60)))?;
            last.1.push(' ');
            last.1.push_str(line.trim());
        } else {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| ParseError::BadHeaderLine(truncate(line, 60)))?;
            let name = name.trim_end();
            if name.is_empty() || !name.chars().all(is_token_char) {
                return Err(ParseError::BadHeaderLine(truncate(line, 60)));
            }
            let name = canonical_name(name);
            headers.push((name, value.trim().to_string()));
        }
        if let Some((_, v)) = headers.last() {
            if v.len() > limits.max_header_len {
                return Err(ParseError::HeaderTooLong {
                    len: v.len(),
                    limit: limits.max_header_len,
                });
            }
        }
        if headers.len() > limits.max_headers {
            return Err(ParseError::TooManyHeaders {
                count: headers.len(),
                limit: limits.max_headers,
            });
        }
    }

    let mut split = Vec::with_capacity(headers.len());
    for (name, mut value) in headers {
        if name == "Via" {
            value = canonical_via_list(&value);
        }
        let is_list = LIST_HEADERS.contains(&name.as_str()) && !(name == "Contact" && value == "*");
        if is_list {
            for item in split_list(&value) {
                split.push((name.clone(), item));
            }
        } else {
            split.push((name, value));
        }
    }
    if split.len() > limits.max_headers {
        return Err(ParseError::TooManyHeaders {
            count: split.len(),
            limit: limits.max_headers,
        });
    }

    let available = &bytes[body_at..];
    let mut declared_length = None;
    for (_, v) in split.iter().filter(|(n, _)| n == "Content-Length") {
        let n: usize = v
            .trim()
            .parse()
            .map_err(|_| ParseError::BadContentLength(truncate(v, 20)))?;
        match declared_length {
            // RFC 4475 mcl01: two lengths leave the body's end unknowable.
            Some(first) if first != n => {
                return Err(ParseError::ConflictingContentLength(first, n))
            }
            _ => declared_length = Some(n),
        }
    }
    let body = match declared_length {
        Some(declared) => {
            if declared > available.len() {
                return Err(ParseError::BodyTruncated {
                    declared,
                    actual: available.len(),
                });
            }
            // RFC 3261 §18.3: bytes beyond Content-Length in a datagram are discarded.
            available[..declared].to_vec()
        }
        None => available.to_vec(),
    };

    Ok(RawMessage {
        start: start_line,
        headers: split,
        body,
    })
}

impl RawMessage {
    /// First value of a header (names are canonical, the comparison ignores case anyway).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Serialises the normalised message and lets rsip parse it.
    pub fn to_rsip(&self) -> Result<rsip::SipMessage, ParseError> {
        let mut text = match &self.start {
            StartLine::Request { method, uri } => {
                if method.parse::<rsip::Method>().is_err() {
                    return Err(ParseError::UnknownMethod(truncate(method, 30)));
                }
                format!("{method} {uri} SIP/2.0\r\n")
            }
            StartLine::Response { code, reason } => format!("SIP/2.0 {code} {reason}\r\n"),
        }
        .into_bytes();
        for (name, value) in &self.headers {
            if name == "Content-Length" {
                continue;
            }
            text.extend_from_slice(name.as_bytes());
            text.extend_from_slice(b": ");
            text.extend_from_slice(value.as_bytes());
            text.extend_from_slice(b"\r\n");
        }
        text.extend_from_slice(format!("Content-Length: {}\r\n\r\n", self.body.len()).as_bytes());
        text.extend_from_slice(&self.body);
        let first_try = rsip::SipMessage::try_from(text.as_slice());
        let StartLine::Request { method, uri } = &self.start else {
            return first_try.map_err(|e| ParseError::Rsip(truncate(&e.to_string(), 120)));
        };
        match first_try {
            Ok(rsip::SipMessage::Request(mut req)) => {
                let lower = uri.to_ascii_lowercase();
                if !(lower.starts_with("sip:") || lower.starts_with("sips:")) {
                    // rsip prints unknown schemes as "tel://..."; keep the text instead.
                    req.uri = message::opaque_uri(uri);
                }
                Ok(rsip::SipMessage::Request(req))
            }
            Ok(other) => Ok(other),
            Err(e) => {
                // rsip cannot parse IPv6 hosts or tel:/urn: URIs: parse the rest with a
                // placeholder Request-URI, then put the original text back as an opaque URI.
                let line_end = text.iter().position(|b| *b == b'\n').unwrap_or(0);
                let mut retry = format!("{method} sip:placeholder.invalid SIP/2.0\r").into_bytes();
                retry.extend_from_slice(&text[line_end..]);
                match rsip::SipMessage::try_from(retry.as_slice()) {
                    Ok(rsip::SipMessage::Request(mut req)) => {
                        req.uri = message::opaque_uri(uri);
                        Ok(rsip::SipMessage::Request(req))
                    }
                    _ => Err(ParseError::Rsip(truncate(&e.to_string(), 120))),
                }
            }
        }
    }
}

/// Checks the headers every request needs before a transaction can be built from it.
pub fn validate_request(req: &rsip::Request) -> Result<(), ParseError> {
    let vias = message::headers_named(&req.headers, "Via");
    if vias.is_empty() {
        return Err(ParseError::MissingHeader("Via"));
    }
    for via in &vias {
        // Every Via must parse, and `;;` is not a parameter (RFC 4475 badinv01).
        let empty_param = via.split(';').skip(1).any(|p| p.trim().is_empty());
        if empty_param {
            return Err(ParseError::BadHeader {
                header: "Via",
                detail: format!("empty parameter in {:?}", truncate(via, 60)),
            });
        }
        Via::parse(via).map_err(|detail| ParseError::BadHeader {
            header: "Via",
            detail,
        })?;
    }
    validate_common(&req.headers)?;
    let (_, cseq_method) = message::cseq(&req.headers).map_err(|detail| ParseError::BadHeader {
        header: "CSeq",
        detail,
    })?;
    let uri = req.uri.to_string();
    if uri.contains('?') {
        // RFC 4475 escruri: headers belong in a URI we are given to dial, not in one we serve.
        return Err(ParseError::RequestUriHeaders(truncate(&uri, 80)));
    }
    let method = req.method.to_string();
    if !cseq_method.eq_ignore_ascii_case(&method) {
        return Err(ParseError::CSeqMethodMismatch {
            cseq: truncate(&cseq_method, 20),
            method,
        });
    }
    if let Some(mf) = message::header(&req.headers, "Max-Forwards") {
        mf.trim().parse::<u8>().map_err(|_| ParseError::BadHeader {
            header: "Max-Forwards",
            detail: truncate(&mf, 20),
        })?;
    }
    Ok(())
}

/// Checks a response enough for a client transaction to match it.
pub fn validate_response(resp: &rsip::Response) -> Result<(), ParseError> {
    let via = message::header(&resp.headers, "Via").ok_or(ParseError::MissingHeader("Via"))?;
    Via::parse(&via).map_err(|detail| ParseError::BadHeader {
        header: "Via",
        detail,
    })?;
    validate_common(&resp.headers)?;
    message::cseq(&resp.headers).map_err(|detail| ParseError::BadHeader {
        header: "CSeq",
        detail,
    })?;
    Ok(())
}

/// Header fields that may appear once (RFC 3261 §7.3.1; RFC 4475 multi01).
const SINGLE_VALUED: &[&str] = &[
    "From",
    "To",
    "Call-ID",
    "CSeq",
    "Max-Forwards",
    "Content-Type",
];

fn validate_common(headers: &rsip::Headers) -> Result<(), ParseError> {
    for name in SINGLE_VALUED {
        let values = message::headers_named(headers, name);
        if values.iter().skip(1).any(|v| v.trim() != values[0].trim()) {
            return Err(ParseError::DuplicateHeader(name));
        }
    }
    // RFC 4475 regbadct: without <>, a `?` would be read as the header's own parameters.
    for name in ["From", "To", "Contact"] {
        let bad = message::headers_named(headers, name)
            .iter()
            .any(|v| !v.contains('<') && v.contains('?'));
        if bad {
            return Err(ParseError::UnbracketedUriHeaders(name));
        }
    }
    for name in ["From", "To"] {
        let v =
            message::header(headers, name).ok_or(ParseError::MissingHeader(if name == "From" {
                "From"
            } else {
                "To"
            }))?;
        NameAddr::parse(&v).map_err(|detail| ParseError::BadHeader {
            header: if name == "From" { "From" } else { "To" },
            detail,
        })?;
    }
    let call_id =
        message::header(headers, "Call-ID").ok_or(ParseError::MissingHeader("Call-ID"))?;
    if call_id.trim().is_empty() {
        return Err(ParseError::BadHeader {
            header: "Call-ID",
            detail: "empty".into(),
        });
    }
    message::header(headers, "CSeq").ok_or(ParseError::MissingHeader("CSeq"))?;
    Ok(())
}

/// Parses and validates a complete message in one call.
pub fn parse(bytes: &[u8], limits: &ParseLimits) -> Result<rsip::SipMessage, ParseError> {
    let raw = normalise(bytes, limits)?;
    let msg = raw.to_rsip()?;
    match &msg {
        rsip::SipMessage::Request(r) => validate_request(r)?,
        rsip::SipMessage::Response(r) => validate_response(r)?,
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsip::prelude::*;

    pub(crate) const INVITE: &str = "INVITE sip:+15551234@10.0.0.1;user=phone SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKabc;rport\r\n\
Max-Forwards: 70\r\n\
From: \"Alice\" <sip:alice@192.0.2.10>;tag=1928\r\n\
To: <sip:+15551234@10.0.0.1>\r\n\
Call-ID: a84b4c76e66710@192.0.2.10\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@192.0.2.10:5060>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\r\nv=0\n";

    #[test]
    fn parses_plain_invite() {
        let msg = parse(INVITE.as_bytes(), &ParseLimits::default()).unwrap();
        let rsip::SipMessage::Request(req) = msg else {
            panic!("not a request")
        };
        assert_eq!(req.method, rsip::Method::Invite);
        assert_eq!(req.body, b"v=0\n");
        assert_eq!(
            req.call_id_header().unwrap().value(),
            "a84b4c76e66710@192.0.2.10"
        );
    }

    #[test]
    fn compact_forms_folding_and_case() {
        let text = "OPTIONS sip:x@10.0.0.1 SIP/2.0\r\n\
v: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1, SIP/2.0/TCP 192.0.2.2;branch=z9hG4bK2\r\n\
f: <sip:a@b>;tag=1\r\n\
t: <sip:x@10.0.0.1>\r\n\
i: cid\r\n\
cseq: 1\r\n  OPTIONS\r\n\
SUBJECT : hello\r\n\
\tworld\r\n\
l: 0\r\n\r\n";
        let raw = normalise(text.as_bytes(), &ParseLimits::default()).unwrap();
        let vias: Vec<_> = raw.headers.iter().filter(|(n, _)| n == "Via").collect();
        assert_eq!(vias.len(), 2);
        assert_eq!(raw.header("CSeq"), Some("1 OPTIONS"));
        assert_eq!(raw.header("Subject"), Some("hello world"));
        let msg = parse(text.as_bytes(), &ParseLimits::default()).unwrap();
        assert!(msg.is_request());
    }

    #[test]
    fn content_length_cuts_and_checks_body() {
        let base = INVITE.replace("Content-Length: 4", "Content-Length: 2");
        let msg = parse(base.as_bytes(), &ParseLimits::default()).unwrap();
        assert_eq!(msg.body(), b"v=");
        let long = INVITE.replace("Content-Length: 4", "Content-Length: 40");
        assert_eq!(
            parse(long.as_bytes(), &ParseLimits::default()),
            Err(ParseError::BodyTruncated {
                declared: 40,
                actual: 4
            })
        );
        let bad = INVITE.replace("Content-Length: 4", "Content-Length: x4");
        assert!(matches!(
            parse(bad.as_bytes(), &ParseLimits::default()),
            Err(ParseError::BadContentLength(_))
        ));
    }

    #[test]
    fn missing_headers_are_named() {
        for h in ["Via", "From", "To", "Call-ID", "CSeq"] {
            let text: String = INVITE
                .split("\r\n")
                .filter(|l| !l.starts_with(&format!("{h}:")))
                .collect::<Vec<_>>()
                .join("\r\n");
            assert_eq!(
                parse(text.as_bytes(), &ParseLimits::default()),
                Err(ParseError::MissingHeader(match h {
                    "Via" => "Via",
                    "From" => "From",
                    "To" => "To",
                    "Call-ID" => "Call-ID",
                    _ => "CSeq",
                })),
                "{h}"
            );
        }
    }

    #[test]
    fn limits_and_garbage_never_panic() {
        let limits = ParseLimits::default();
        let big = vec![b'a'; limits.max_message_size + 1];
        assert!(matches!(
            parse(&big, &limits),
            Err(ParseError::TooLarge { .. })
        ));
        let huge_header =
            INVITE.replace("Max-Forwards: 70", &format!("X-Big: {}", "a".repeat(9000)));
        assert!(matches!(
            parse(huge_header.as_bytes(), &limits),
            Err(ParseError::HeaderTooLong { .. })
        ));
        let many = INVITE.replace("Max-Forwards: 70\r\n", &"X-A: 1\r\n".repeat(200));
        assert!(matches!(
            parse(many.as_bytes(), &limits),
            Err(ParseError::TooManyHeaders { .. })
        ));
        let mut seed: u32 = 12345;
        for len in 0..600 {
            let mut garbage = Vec::with_capacity(len);
            for _ in 0..len {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                garbage.push((seed >> 16) as u8);
            }
            let _ = parse(&garbage, &limits);
        }
        for cut in 0..INVITE.len() {
            let _ = parse(&INVITE.as_bytes()[..cut], &limits);
        }
        assert_eq!(parse(b"\r\n\r\n", &limits), Err(ParseError::Empty));
        assert!(matches!(
            parse(b"HELLO\r\n\r\n", &limits),
            Err(ParseError::BadStartLine(_))
        ));
    }

    #[test]
    fn unknown_method_and_version_are_typed() {
        let text = INVITE
            .replace("INVITE sip", "FOO sip")
            .replace("314159 INVITE", "314159 FOO");
        let raw = normalise(text.as_bytes(), &ParseLimits::default()).unwrap();
        assert_eq!(raw.to_rsip(), Err(ParseError::UnknownMethod("FOO".into())));
        let v3 = INVITE.replace("user=phone SIP/2.0", "user=phone SIP/3.0");
        assert_eq!(
            normalise(v3.as_bytes(), &ParseLimits::default()),
            Err(ParseError::BadVersion("3.0".into()))
        );
    }

    #[test]
    fn cseq_method_mismatch_is_rejected() {
        let text = INVITE.replace("314159 INVITE", "314159 BYE");
        assert!(matches!(
            parse(text.as_bytes(), &ParseLimits::default()),
            Err(ParseError::CSeqMethodMismatch { .. })
        ));
    }

    #[test]
    fn request_uris_rsip_cannot_parse_are_kept_verbatim() {
        for uri in [
            "tel:+15551234",
            "sip:+1555@[2001:db8::1]:5060",
            "urn:service:sos",
        ] {
            let text = INVITE.replace("sip:+15551234@10.0.0.1;user=phone", uri);
            let rsip::SipMessage::Request(req) =
                parse(text.as_bytes(), &ParseLimits::default()).unwrap()
            else {
                panic!()
            };
            assert_eq!(req.uri.to_string(), uri);
        }
    }

    #[test]
    fn parses_response() {
        let text = "SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
        let msg = parse(text.as_bytes(), &ParseLimits::default()).unwrap();
        let rsip::SipMessage::Response(r) = msg else {
            panic!()
        };
        assert_eq!(r.status_code.code(), 180);
    }

    #[test]
    fn reason_phrase_is_one_line() {
        let e = ParseError::BadHeaderLine("x\r\ny".into());
        let r = e.reason_phrase();
        assert!(!r.contains('\r') && !r.contains('\n'));
        assert!(r.starts_with("Malformed"));
    }
}
