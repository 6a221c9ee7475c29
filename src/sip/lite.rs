//! A light reading of the INVITEs, ACKs and CANCELs the class4 fast path answers itself:
//! header slices over the datagram, no rsip tree, no copies.
//!
//! The reader accepts a plain subset of RFC 3261 only: CRLF line ends, no folded lines, no
//! compact header names, no header lists on one line, canonical spelling of the header names
//! the general parser canonicalises, single-valued headers given once, a `sip:`/`sips:`
//! Request-URI without headers or escapes. On that subset it sees exactly what
//! [`super::parse`] followed by rsip would, so answers built from it are the general path's.
//! Everything else is [`Unreadable`]: the caller hands the datagram to the general path,
//! which parses it fully and answers (or refuses) it as it always did.

use std::fmt::Write as _;

use super::message::{self, NameAddr, Via, MAGIC_COOKIE};

/// Why a datagram is left to the general path (not an error of the message: the general
/// path may well accept it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("left to the general SIP path: {0}")]
pub struct Unreadable(pub &'static str);

/// The methods the fast path reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Invite,
    Ack,
    Cancel,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Invite => "INVITE",
            Kind::Ack => "ACK",
            Kind::Cancel => "CANCEL",
        }
    }
}

/// Byte offsets of one header line's name and value in the datagram.
#[derive(Debug, Clone, Copy, Default)]
pub struct Span {
    name: (u32, u32),
    value: (u32, u32),
}

/// One request, read.
#[derive(Debug)]
pub struct Request<'a> {
    pub kind: Kind,
    pub uri: &'a str,
    head: &'a str,
    spans: &'a [Span],
    /// Index (in `spans`) of the first Via, From, To, Call-ID and CSeq.
    top_via: usize,
    from: usize,
    to: usize,
    call_id: usize,
    cseq: usize,
    pub max_forwards: Option<u8>,
    pub body: &'a [u8],
}

/// Header names the general path spells its own way (rsip's typed headers and the
/// normaliser's canonical names): another spelling of one of them is left to it.
const KNOWN: &[&str] = &[
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
    "Mime-Version",
    "Min-Expires",
    "Min-SE",
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
    "Session-Expires",
    "Subject",
    "Subscription-State",
    "Supported",
    "Timestamp",
    "To",
    "Unsupported",
    "User-Agent",
    "Via",
    "WWW-Authenticate",
    "Warning",
];

/// Headers whose presence changes what the general path answers an INVITE with (420, 406,
/// 422, Digest): such INVITEs are left to it.
const INVITE_LEFT_TO_GENERAL: &[&str] = &[
    "Require",
    "Accept",
    "Session-Expires",
    "Min-SE",
    "Authorization",
    "Proxy-Authorization",
];

/// Headers the general path takes once only (RFC 3261 §7.3.1).
const SINGLE: &[&str] = &[
    "From",
    "To",
    "Call-ID",
    "CSeq",
    "Max-Forwards",
    "Content-Type",
    "Content-Length",
];

/// Headers the normaliser splits at commas.
const LISTS: &[&str] = &["Via", "Contact", "Route", "Record-Route"];

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

/// The kind of request a datagram starts with, from its first bytes only.
pub fn peek(bytes: &[u8]) -> Option<Kind> {
    if bytes.starts_with(b"INVITE ") {
        Some(Kind::Invite)
    } else if bytes.starts_with(b"ACK ") {
        Some(Kind::Ack)
    } else if bytes.starts_with(b"CANCEL ") {
        Some(Kind::Cancel)
    } else {
        None
    }
}

/// Reads a request; `spans` is scratch space, reused from one datagram to the next.
pub fn read<'a>(
    bytes: &'a [u8],
    spans: &'a mut Vec<Span>,
    limits: &super::ParseLimits,
) -> Result<Request<'a>, Unreadable> {
    let kind = peek(bytes).ok_or(Unreadable("not an INVITE, ACK or CANCEL"))?;
    if bytes.len() > limits.max_message_size || bytes.len() > u32::MAX as usize {
        return Err(Unreadable("too large"));
    }
    let head_end = memchr::memmem::find(bytes, b"\r\n\r\n").ok_or(Unreadable("no header end"))?;
    let head =
        std::str::from_utf8(&bytes[..head_end]).map_err(|_| Unreadable("header not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let start = lines.next().unwrap_or("");
    let mut parts = start.split(' ');
    let (method, uri, version) = (parts.next(), parts.next(), parts.next());
    if parts.next().is_some() || method != Some(kind.name()) || version != Some("SIP/2.0") {
        return Err(Unreadable("start line"));
    }
    let uri = uri.unwrap_or("");
    let plain_uri = (uri.starts_with("sip:") || uri.starts_with("sips:"))
        && uri
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"<>?%\"".contains(&b));
    if !plain_uri {
        return Err(Unreadable("Request-URI"));
    }
    spans.clear();
    let base = head.as_ptr() as usize;
    let offset = |s: &str| (s.as_ptr() as usize - base) as u32;
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err(Unreadable("folded line"));
        }
        if line.bytes().any(|b| b == b'\r' || b == b'\n') {
            return Err(Unreadable("bare CR or LF"));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or(Unreadable("header line without colon"))?;
        let name = name.trim_end();
        let value = value.trim();
        if name.len() < 2 || !name.bytes().all(is_token_byte) {
            return Err(Unreadable("header name"));
        }
        if KNOWN
            .iter()
            .any(|k| k.eq_ignore_ascii_case(name) && *k != name)
        {
            return Err(Unreadable("header name spelling"));
        }
        if value.len() > limits.max_header_len {
            return Err(Unreadable("long header"));
        }
        let (n, v) = (offset(name), offset(value));
        spans.push(Span {
            name: (n, n + name.len() as u32),
            value: (v, v + value.len() as u32),
        });
        if spans.len() > limits.max_headers {
            return Err(Unreadable("too many headers"));
        }
    }
    let spans: &'a [Span] = spans;
    let at = |s: &Span, r: (u32, u32)| -> &'a str {
        let _ = s;
        &head[r.0 as usize..r.1 as usize]
    };
    let mut first = [usize::MAX; 7]; // SINGLE, in order
    let (mut top_via, mut content_length) = (usize::MAX, None::<usize>);
    for (i, s) in spans.iter().enumerate() {
        let (name, value) = (at(s, s.name), at(s, s.value));
        if let Some(k) = SINGLE.iter().position(|n| *n == name) {
            if first[k] != usize::MAX {
                return Err(Unreadable("single-valued header repeated"));
            }
            first[k] = i;
        }
        if LISTS.contains(&name) && value.contains(',') {
            return Err(Unreadable("header list on one line"));
        }
        if kind == Kind::Invite && INVITE_LEFT_TO_GENERAL.contains(&name) {
            return Err(Unreadable("header the general path acts on"));
        }
        match name {
            "Via" => {
                check_via(value)?;
                if top_via == usize::MAX {
                    top_via = i;
                }
            }
            "From" | "To" | "Contact" if !value.contains('<') && value.contains('?') => {
                return Err(Unreadable("unbracketed URI headers"));
            }
            "Content-Length" => {
                let canonical = !value.is_empty()
                    && value.bytes().all(|b| b.is_ascii_digit())
                    && (value == "0" || !value.starts_with('0'));
                if !canonical {
                    return Err(Unreadable("Content-Length"));
                }
                content_length = value.parse().ok();
            }
            _ => {}
        }
    }
    let [from, to, call_id, cseq, max_forwards, _, length] = first;
    if top_via == usize::MAX || [from, to, call_id, cseq, length].contains(&usize::MAX) {
        return Err(Unreadable("a required header is missing"));
    }
    let value = |i: usize| at(&spans[i], spans[i].value);
    for i in [from, to] {
        NameAddr::parse(value(i)).map_err(|_| Unreadable("From or To"))?;
    }
    if value(call_id).is_empty() {
        return Err(Unreadable("empty Call-ID"));
    }
    let mut cseq_parts = value(cseq).split(' ');
    let cseq_ok = cseq_parts.next().is_some_and(|n| {
        !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && n.parse::<u32>().is_ok()
    }) && cseq_parts.next() == Some(kind.name())
        && cseq_parts.next().is_none();
    if !cseq_ok {
        return Err(Unreadable("CSeq"));
    }
    let max_forwards = match max_forwards {
        usize::MAX => None,
        i => Some(
            value(i)
                .parse::<u8>()
                .map_err(|_| Unreadable("Max-Forwards"))?,
        ),
    };
    let available = &bytes[head_end + 4..];
    let declared = content_length.ok_or(Unreadable("Content-Length"))?;
    let body = available
        .get(..declared)
        .ok_or(Unreadable("body shorter than Content-Length"))?;
    Ok(Request {
        kind,
        uri,
        head,
        spans,
        top_via,
        from,
        to,
        call_id,
        cseq,
        max_forwards,
        body,
    })
}

/// A Via as the normaliser would leave it: one space after the protocol, no other white
/// space, no empty parameter, and parseable.
fn check_via(value: &str) -> Result<(), Unreadable> {
    let canonical = value.split_once(' ').is_some_and(|(proto, rest)| {
        !proto.is_empty() && !rest.is_empty() && !rest.contains([' ', '\t'])
    });
    let empty_param = value.split(';').skip(1).any(|p| p.trim().is_empty());
    if !canonical || empty_param || Via::parse(value).is_err() {
        return Err(Unreadable("Via"));
    }
    Ok(())
}

impl<'a> Request<'a> {
    fn value(&self, i: usize) -> &'a str {
        let s = self.spans[i];
        &self.head[s.value.0 as usize..s.value.1 as usize]
    }

    fn name(&self, i: usize) -> &'a str {
        let s = self.spans[i];
        &self.head[s.name.0 as usize..s.name.1 as usize]
    }

    /// Every header line, (name, value), in order.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        (0..self.spans.len()).map(|i| (self.name(i), self.value(i)))
    }

    /// First value of a header, the name compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    pub fn top_via(&self) -> &'a str {
        self.value(self.top_via)
    }

    /// The Via values after the top one.
    pub fn lower_vias(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.headers()
            .skip(self.top_via + 1)
            .filter(|(n, _)| *n == "Via")
            .map(|(_, v)| v)
    }

    pub fn from(&self) -> &'a str {
        self.value(self.from)
    }

    pub fn to(&self) -> &'a str {
        self.value(self.to)
    }

    pub fn call_id(&self) -> &'a str {
        self.value(self.call_id)
    }

    pub fn cseq(&self) -> &'a str {
        self.value(self.cseq)
    }

    /// True when To carries a tag (an in-dialog request, or the ACK of a final response).
    pub fn to_has_tag(&self) -> bool {
        // The header's parameters: after the name-addr's `>`, or after the addr-spec.
        let to = self.to();
        let params = match to.rfind('>') {
            Some(end) => &to[end + 1..],
            None => to.split_once(';').map_or("", |(_, p)| p),
        };
        params.split(';').any(|p| {
            let name = p.split('=').next().unwrap_or("").trim();
            name.eq_ignore_ascii_case("tag")
        })
    }

    /// The top Via's branch and sent-by, which name the INVITE transaction this request
    /// belongs to (RFC 3261 §17.2.3), written into `out`; false for a pre-RFC 3261 branch.
    /// The Via was checked canonical by [`read`]: `PROTOCOL SENT-BY;params`, no spaces.
    pub fn transaction_id(&self, out: &mut String) -> bool {
        let Some((_, rest)) = self.top_via().split_once(' ') else {
            return false;
        };
        let mut parts = rest.split(';');
        let sent_by = parts.next().unwrap_or("");
        let branch = parts.find_map(|p| {
            let (name, value) = p.split_once('=')?;
            name.eq_ignore_ascii_case("branch").then_some(value)
        });
        let Some(branch) = branch.filter(|b| b.starts_with(MAGIC_COOKIE)) else {
            return false;
        };
        out.clear();
        out.push_str(branch);
        out.push(' ');
        out.push_str(sent_by);
        true
    }
}

/// What a response carries besides the request's Via/From/To/Call-ID/CSeq.
pub struct Answer<'r> {
    pub code: u16,
    /// `None`: the standard phrase.
    pub reason: Option<&'r str>,
    /// Added to To unless it has a tag already.
    pub to_tag: Option<&'r str>,
    /// The top Via as stamped with `received`/`rport`.
    pub top_via: &'r str,
    pub extra: &'r [(&'r str, &'r str)],
    /// The `Server` header's value.
    pub server: &'r str,
}

/// Writes a response to `req` into `out` (cleared first), byte for byte as the user agent
/// writes its responses: status line, Vias, From, To, Call-ID, CSeq, the extra headers, Server,
/// Content-Length.
pub fn write_response(out: &mut Vec<u8>, req: &Request<'_>, answer: &Answer<'_>) {
    out.clear();
    out.extend_from_slice(b"SIP/2.0 ");
    let _ = write!(Bytes(out), "{} ", answer.code);
    match answer.reason {
        Some(r) => {
            for c in r.chars().filter(|c| !c.is_control()).take(120) {
                let _ = Bytes(out).write_char(c);
            }
        }
        None => out.extend_from_slice(message::reason_phrase(answer.code).as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    line(out, "Via", answer.top_via);
    for via in req.lower_vias() {
        line(out, "Via", via);
    }
    line(out, "From", req.from());
    let to = req.to();
    match (answer.to_tag, NameAddr::parse(to)) {
        (Some(tag), Ok(mut na)) if na.tag().is_none() => {
            na.set_param("tag", Some(tag.to_string()));
            line(out, "To", &na.to_string());
        }
        _ => line(out, "To", to),
    }
    line(out, "Call-ID", req.call_id());
    line(out, "CSeq", req.cseq());
    for (name, value) in answer.extra {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        for c in value.chars().filter(|c| *c != '\r' && *c != '\n') {
            let _ = Bytes(out).write_char(c);
        }
        out.extend_from_slice(b"\r\n");
    }
    line(out, "Server", answer.server);
    out.extend_from_slice(b"Content-Length: 0\r\n\r\n");
}

fn line(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `fmt::Write` into a byte buffer.
struct Bytes<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::ParseLimits;

    const INVITE: &str = "INVITE sip:447700900555@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-1;rport\r\n\
Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-0\r\n\
From: <sip:441000000000@127.0.0.1:5999>;tag=a1\r\n\
To: <sip:447700900555@127.0.0.1:5060>\r\n\
Call-ID: c1@x\r\n\
CSeq: 1 INVITE\r\n\
X-Account-ID: 1001\r\n\
Max-Forwards: 70\r\n\
Content-Length: 0\r\n\r\n";

    fn read_str(text: &str) -> Result<(), Unreadable> {
        let mut spans = Vec::new();
        read(text.as_bytes(), &mut spans, &ParseLimits::default()).map(drop)
    }

    #[test]
    fn a_plain_invite_is_read_in_place() {
        let mut spans = Vec::new();
        let r = read(INVITE.as_bytes(), &mut spans, &ParseLimits::default()).unwrap();
        assert_eq!(r.kind, Kind::Invite);
        assert_eq!(r.uri, "sip:447700900555@127.0.0.1:5060");
        assert_eq!(r.call_id(), "c1@x");
        assert_eq!(r.header("x-account-id"), Some("1001"));
        assert_eq!(r.max_forwards, Some(70));
        assert_eq!(r.lower_vias().count(), 1);
        assert!(!r.to_has_tag());
        let mut id = String::new();
        assert!(r.transaction_id(&mut id));
        assert_eq!(id, "z9hG4bK-1 127.0.0.1:5999");
        let mut spans = Vec::new();
        let tagged = INVITE.replace("127.0.0.1:5060>\r\n", "127.0.0.1:5060>;TAG=x\r\n");
        let r = read(tagged.as_bytes(), &mut spans, &ParseLimits::default()).unwrap();
        assert!(r.to_has_tag());
        let old = INVITE.replace("branch=z9hG4bK-1", "branch=1");
        let r = read(old.as_bytes(), &mut spans, &ParseLimits::default()).unwrap();
        assert!(!r.transaction_id(&mut id));
    }

    #[test]
    fn anything_outside_the_plain_subset_is_left_to_the_general_path() {
        for (what, text) in [
            ("compact", INVITE.replace("Call-ID: c1@x", "i: c1@x")),
            ("spelling", INVITE.replace("Call-ID:", "Call-Id:")),
            (
                "folded",
                INVITE.replace("X-Account-ID: 1001", "X-Account-ID: 1\r\n 001"),
            ),
            (
                "bare LF",
                INVITE.replace("CSeq: 1 INVITE\r\n", "CSeq: 1 INVITE\n"),
            ),
            (
                "twice",
                INVITE.replace("CSeq: 1 INVITE", "CSeq: 1 INVITE\r\nCSeq: 2 INVITE"),
            ),
            (
                "via list",
                INVITE.replace("rport\r\n", "rport, SIP/2.0/UDP h;branch=z9hG4bKx\r\n"),
            ),
            ("via space", INVITE.replace("5999;branch", "5999 ; branch")),
            ("empty param", INVITE.replace(";rport", ";;rport")),
            ("cseq", INVITE.replace("1 INVITE", "1 BYE")),
            (
                "max-forwards",
                INVITE.replace("Max-Forwards: 70", "Max-Forwards: 700"),
            ),
            (
                "length",
                INVITE.replace("Content-Length: 0", "Content-Length: 5"),
            ),
            ("no length", INVITE.replace("Content-Length: 0\r\n", "")),
            (
                "require",
                INVITE.replace("Max-Forwards", "Require: 100rel\r\nMax-Forwards"),
            ),
            (
                "uri",
                INVITE.replace("sip:447700900555@127.0.0.1:5060 SIP", "tel:+44 SIP"),
            ),
            (
                "brackets",
                INVITE.replace("sip:447700900555@127.0.0.1:5060 SIP", "<sip:a@b> SIP"),
            ),
            (
                "version",
                INVITE.replace("SIP/2.0\r\nVia", "SIP/3.0\r\nVia"),
            ),
            (
                "no from",
                INVITE.replace("From: <sip:441000000000@127.0.0.1:5999>;tag=a1\r\n", ""),
            ),
            ("options", INVITE.replace("INVITE sip", "OPTIONS sip")),
        ] {
            assert!(read_str(&text).is_err(), "{what} was read");
        }
        assert!(read_str("INVITE sip:a@b SIP/2.0\r\n").is_err());
        assert!(read_str("").is_err());
        assert!(read_str("\u{0}\u{ff}").is_err());
    }

    #[test]
    fn the_response_is_the_user_agents() {
        let mut spans = Vec::new();
        let r = read(INVITE.as_bytes(), &mut spans, &ParseLimits::default()).unwrap();
        let mut out = Vec::new();
        let top = "SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-1;rport=5999;received=127.0.0.1";
        write_response(
            &mut out,
            &r,
            &Answer {
                code: 302,
                reason: None,
                to_tag: Some("abc"),
                top_via: top,
                extra: &[("Contact", "<sip:1@h>;q=1.0")],
                server: "callforge",
            },
        );
        // What the user agent's ResponseBase + to_bytes write for the same request.
        let rsip::SipMessage::Request(req) =
            crate::sip::parse::parse(INVITE.as_bytes(), &ParseLimits::default()).unwrap()
        else {
            panic!("not a request")
        };
        let mut req = req;
        message::set_header(&mut req.headers, "Via", top);
        // set_header put the stamped Via last: put it back on top, as the UA does.
        let mut headers: Vec<_> = req.headers.iter().cloned().collect();
        let stamped = headers.pop().unwrap();
        headers.insert(0, stamped);
        headers.insert(
            1,
            message::make_header("Via", "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-0"),
        );
        req.headers = headers.into();
        let mut resp = message::ResponseBase::from_request(&req).response(302, None, Some("abc"));
        resp.headers
            .push(message::make_header("Contact", "<sip:1@h>;q=1.0"));
        resp.headers
            .push(message::make_header("Server", "callforge"));
        let expected = message::to_bytes(&resp.into());
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&expected)
        );
    }
}
