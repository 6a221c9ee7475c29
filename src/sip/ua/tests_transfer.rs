//! Scenario tests for Digest-authenticated outbound INVITEs, outbound CANCEL/BYE edge cases
//! and blind transfer (REFER/NOTIFY, both directions), driven by a fake clock.

use super::*;
use crate::sip::digest::Credentials;
use md5::{Digest as _, Md5};
use std::time::Duration;

const PEER: &str = "198.51.100.9:5060";
const LOCAL: &str = "203.0.113.1:5060";
const REQUEST_URI: &str = "sip:+15557777@198.51.100.9";

const OFFER: &str = "v=0\r\no=c 1 1 IN IP4 198.51.100.9\r\ns=-\r\nc=IN IP4 198.51.100.9\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

struct H {
    ua: UserAgent,
    now: Instant,
    peer: Target,
    sent: Vec<(Target, String)>,
    events: Vec<UaEvent>,
}

impl H {
    fn new() -> Self {
        Self::with(UaConfig::default())
    }

    fn with(cfg: UaConfig) -> Self {
        Self {
            ua: UserAgent::new(cfg),
            now: Instant::now(),
            peer: Target {
                addr: PEER.parse().unwrap(),
                transport: TransportKind::Udp,
            },
            sent: Vec::new(),
            events: Vec::new(),
        }
    }

    fn drain(&mut self) {
        while let Some(a) = self.ua.poll_action() {
            match a {
                Action::Send {
                    to,
                    transport,
                    bytes,
                } => self.sent.push((
                    Target {
                        addr: to,
                        transport,
                    },
                    String::from_utf8(bytes).unwrap(),
                )),
                Action::Event(e) => self.events.push(e),
                Action::ArmTimer { at, .. } => assert!(at >= self.now, "timer armed in the past"),
            }
        }
    }

    fn input(&mut self, text: &str) {
        self.input_bytes(text.as_bytes());
    }

    fn input_bytes(&mut self, bytes: &[u8]) {
        self.ua
            .handle_input(bytes, self.peer, LOCAL.parse().unwrap(), self.now);
        self.drain();
    }

    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now = (self.now + ms(10)).min(end);
            if self.ua.poll_timeout().is_some_and(|t| t <= self.now) {
                self.ua.handle_timeout(self.now);
                self.drain();
            }
        }
    }

    fn take_sent(&mut self) -> Vec<String> {
        std::mem::take(&mut self.sent)
            .into_iter()
            .map(|(_, s)| s)
            .collect()
    }

    fn take_events(&mut self) -> Vec<UaEvent> {
        std::mem::take(&mut self.events)
    }

    /// Places an outbound call; returns it and the INVITE sent.
    fn outbound(&mut self, auth: Option<Credentials>) -> (CallHandle, String) {
        let oc = OutboundCall {
            target: self.peer,
            request_uri: REQUEST_URI.into(),
            from: NameAddr::parse("\"Callforge\" <sip:+15550001@203.0.113.1>").unwrap(),
            to: NameAddr::parse("<sip:+15557777@198.51.100.9>").unwrap(),
            media: MediaConfig::new("203.0.113.1".parse().unwrap(), 20000),
            local: Some(LOCAL.parse().unwrap()),
            headers: Vec::new(),
            auth,
        };
        let call = self.ua.invite(oc, self.now).unwrap();
        self.drain();
        let sent = self.take_sent();
        assert_eq!(sent.len(), 1, "{sent:?}");
        (call, sent[0].clone())
    }

    /// An outbound call answered by the callee (ACK sent, `CallAnswered` consumed).
    fn outbound_answered(&mut self) -> (CallHandle, String) {
        let (call, inv) = self.outbound(None);
        self.input(&reply(&inv, 200, "", Some(OFFER)));
        assert!(self.take_sent()[0].starts_with("ACK "));
        assert!(matches!(
            self.take_events().as_slice(),
            [UaEvent::CallAnswered { .. }]
        ));
        (call, inv)
    }

    /// An incoming call answered and ACKed; returns it and our To tag.
    fn incoming_established(&mut self) -> (CallHandle, String) {
        let inv = format!(
            "INVITE sip:+15550001@203.0.113.1 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bKinv1\r\nMax-Forwards: 70\r\nFrom: <sip:+15559999@198.51.100.9>;tag=caller1\r\nTo: <sip:+15550001@203.0.113.1>\r\nCall-ID: call-1@198.51.100.9\r\nCSeq: 1 INVITE\r\nContact: <sip:+15559999@198.51.100.9:5060>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{OFFER}",
            OFFER.len()
        );
        self.input(&inv);
        let call = match self.take_events().as_slice() {
            [UaEvent::IncomingCall(ic)] => ic.call,
            other => panic!("expected IncomingCall, got {other:?}"),
        };
        let media = MediaConfig::new("203.0.113.1".parse().unwrap(), 20000);
        self.ua.answer(call, &media, self.now).unwrap();
        self.drain();
        let ok = self.take_sent().pop().unwrap();
        let tag = hdr(&ok, "To")
            .unwrap()
            .split("tag=")
            .nth(1)
            .unwrap()
            .to_string();
        self.input(&from_caller("ACK", "z9hG4bKack1", 1, &tag, "", None));
        assert!(matches!(
            self.take_events().as_slice(),
            [UaEvent::CallAcked { .. }]
        ));
        self.take_sent();
        (call, tag)
    }
}

/// First value of a header in a message (name compared case-insensitively).
fn hdr(msg: &str, name: &str) -> Option<String> {
    msg.split("\r\n")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
}

fn body(msg: &str) -> &str {
    msg.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("")
}

fn status_of(msg: &str) -> u16 {
    msg.split(' ').nth(1).unwrap().parse().unwrap()
}

fn statuses(sent: &[String]) -> Vec<u16> {
    sent.iter()
        .filter(|s| s.starts_with("SIP/2.0"))
        .map(|s| status_of(s))
        .collect()
}

fn branch(msg: &str) -> String {
    hdr(msg, "Via")
        .unwrap()
        .split("branch=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

/// A response to `req` from the peer (To tag `callee`, Contact on 1xx/2xx), with extra
/// header lines and an optional SDP body.
fn reply(req: &str, code: u16, extra: &str, sdp: Option<&str>) -> String {
    let mut out = format!("SIP/2.0 {code} Whatever\r\n");
    for l in req.split("\r\n").skip(1).take_while(|l| !l.is_empty()) {
        let name = l.split(':').next().unwrap_or("");
        if ["Via", "From", "Call-ID", "CSeq"].contains(&name) {
            out.push_str(l);
            out.push_str("\r\n");
        } else if name == "To" {
            out.push_str(l);
            if !l.contains("tag=") {
                out.push_str(";tag=callee");
            }
            out.push_str("\r\n");
        }
    }
    if (101..300).contains(&code) && req.starts_with("INVITE") {
        out.push_str("Contact: <sip:+15557777@198.51.100.9:5080>\r\n");
    }
    out.push_str(extra);
    let b = sdp.unwrap_or("");
    if sdp.is_some() {
        out.push_str("Content-Type: application/sdp\r\n");
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n{b}", b.len()));
    out
}

/// A request from the caller of an incoming call, inside its dialog.
fn from_caller(
    method: &str,
    branch: &str,
    cseq: u32,
    to_tag: &str,
    extra: &str,
    body: Option<(&str, &[u8])>,
) -> String {
    String::from_utf8(from_caller_bytes(method, branch, cseq, to_tag, extra, body)).unwrap()
}

fn from_caller_bytes(
    method: &str,
    branch: &str,
    cseq: u32,
    to_tag: &str,
    extra: &str,
    body: Option<(&str, &[u8])>,
) -> Vec<u8> {
    let (ctype, b) = match body {
        Some((t, b)) => (format!("Content-Type: {t}\r\n"), b),
        None => (String::new(), &b""[..]),
    };
    let head = format!(
        "{method} sip:callforge@203.0.113.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.9:5060;branch={branch}\r\nMax-Forwards: 70\r\nFrom: <sip:+15559999@198.51.100.9>;tag=caller1\r\nTo: <sip:+15550001@203.0.113.1>;tag={to_tag}\r\nCall-ID: call-1@198.51.100.9\r\nCSeq: {cseq} {method}\r\nContact: <sip:+15559999@198.51.100.9:5060>\r\n{extra}{ctype}Content-Length: {}\r\n\r\n",
        b.len()
    );
    [head.as_bytes(), b].concat()
}

/// A request from the callee of an outbound call (`inv`), inside its dialog.
fn from_callee(
    inv: &str,
    method: &str,
    branch: &str,
    cseq: u32,
    extra: &str,
    body: &str,
) -> String {
    let our_from = hdr(inv, "From").unwrap();
    format!(
        "{method} sip:callforge@203.0.113.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.9:5060;branch={branch}\r\nMax-Forwards: 70\r\nFrom: <sip:+15557777@198.51.100.9>;tag=callee\r\nTo: {our_from}\r\nCall-ID: {}\r\nCSeq: {cseq} {method}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        hdr(inv, "Call-ID").unwrap(),
        body.len()
    )
}

fn creds() -> Option<Credentials> {
    Some(Credentials {
        username: "alice".into(),
        password: "s3cret".into(),
    })
}

fn md5_hex(text: &str) -> String {
    hex::encode(Md5::digest(text.as_bytes()))
}

/// `key=value` parameters of a Digest credentials header.
fn digest_params(value: &str) -> HashMap<String, String> {
    let rest = value.strip_prefix("Digest ").expect("Digest scheme");
    rest.split(',')
        .filter_map(|p| {
            let (k, v) = p.trim().split_once('=')?;
            Some((k.to_string(), v.trim_matches('"').to_string()))
        })
        .collect()
}

// ---------------------------------------------------------------- Digest

#[test]
fn proxy_challenge_gets_an_authenticated_invite_then_answer() {
    let mut h = H::new();
    let (call, inv1) = h.outbound(creds());
    // An early dialog from the first INVITE (a proxy relaying 183 before challenging).
    h.input(&reply(&inv1, 183, "", None));
    h.take_events();
    h.input(&reply(
        &inv1,
        407,
        "Proxy-Authenticate: Digest realm=\"trunk.example\", nonce=\"n0nce-407\", qop=\"auth\", algorithm=MD5, opaque=\"op1\"\r\n",
        None,
    ));
    assert!(h.take_events().is_empty(), "the challenge is not the end");
    let sent = h.take_sent();
    assert_eq!(sent.len(), 2, "{sent:?}");
    let (ack, inv2) = (&sent[0], &sent[1]);
    assert!(
        ack.starts_with(&format!("ACK {REQUEST_URI} SIP/2.0\r\n")),
        "{ack}"
    );
    assert_eq!(hdr(ack, "CSeq").unwrap(), "1 ACK");
    assert_eq!(
        branch(ack),
        branch(&inv1),
        "non-2xx ACK is in the INVITE transaction"
    );

    assert!(
        inv2.starts_with(&format!("INVITE {REQUEST_URI} SIP/2.0\r\n")),
        "{inv2}"
    );
    assert_eq!(hdr(inv2, "CSeq").unwrap(), "2 INVITE");
    assert_ne!(branch(inv2), branch(&inv1), "a new transaction");
    assert_eq!(hdr(inv2, "Call-ID"), hdr(&inv1, "Call-ID"));
    assert_eq!(hdr(inv2, "From"), hdr(&inv1, "From"), "same From tag");
    assert_eq!(hdr(inv2, "To"), hdr(&inv1, "To"), "still no To tag");
    assert_eq!(body(inv2), body(&inv1), "same offer");
    assert!(hdr(inv2, "Authorization").is_none());

    let auth = hdr(inv2, "Proxy-Authorization").expect("Proxy-Authorization");
    let p = digest_params(&auth);
    assert_eq!(p["username"], "alice");
    assert_eq!(p["realm"], "trunk.example");
    assert_eq!(p["nonce"], "n0nce-407");
    assert_eq!(p["uri"], REQUEST_URI);
    assert_eq!(p["qop"], "auth");
    assert_eq!(p["nc"], "00000001");
    assert_eq!(p["opaque"], "op1");
    assert!(!p["cnonce"].is_empty());
    // RFC 2617 §3.2.2.1 with qop=auth, computed here from the formula.
    let ha1 = md5_hex("alice:trunk.example:s3cret");
    let ha2 = md5_hex(&format!("INVITE:{REQUEST_URI}"));
    let expected = md5_hex(&format!(
        "{ha1}:n0nce-407:00000001:{}:auth:{ha2}",
        p["cnonce"]
    ));
    assert_eq!(p["response"], expected);

    // A retransmitted 407 is absorbed by the first transaction (ACK again, no 3rd INVITE).
    h.input(&reply(
        &inv1,
        407,
        "Proxy-Authenticate: Digest realm=\"trunk.example\", nonce=\"n0nce-407\"\r\n",
        None,
    ));
    let again = h.take_sent();
    assert_eq!(again.len(), 1);
    assert!(again[0].starts_with("ACK "));

    // The answer comes from another branch (To tag `callee2`): its dialog is the call's.
    h.input(&reply(inv2, 200, "", Some(OFFER)).replace(";tag=callee", ";tag=callee2"));
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let ack = &sent[0];
    assert!(hdr(ack, "To").unwrap().ends_with(";tag=callee2"), "{ack}");
    assert!(
        ack.starts_with("ACK sip:+15557777@198.51.100.9:5080 SIP/2.0\r\n"),
        "{ack}"
    );
    assert_eq!(
        hdr(ack, "CSeq").unwrap(),
        "2 ACK",
        "the ACK names the 2nd INVITE"
    );
    assert_eq!(
        hdr(ack, "Proxy-Authorization").as_deref(),
        Some(auth.as_str()),
        "§13.2.2.4: the ACK carries the INVITE's credentials"
    );
    match h.take_events().as_slice() {
        [UaEvent::CallAnswered {
            call: c,
            media: Some(_),
        }] => assert_eq!(*c, call),
        other => panic!("{other:?}"),
    }
    // In-dialog requests continue the CSeq after the retried INVITE.
    h.ua.hangup(call, h.now).unwrap();
    h.drain();
    let bye = h.take_sent().pop().unwrap();
    assert_eq!(hdr(&bye, "CSeq").unwrap(), "3 BYE");
}

#[test]
fn www_challenge_without_qop_is_answered_in_authorization() {
    let mut h = H::new();
    let (call, inv1) = h.outbound(creds());
    h.input(&reply(
        &inv1,
        401,
        "WWW-Authenticate: Digest realm=\"gw.example\", nonce=\"abc\", algorithm=MD5\r\n",
        None,
    ));
    let sent = h.take_sent();
    assert_eq!(sent.len(), 2);
    let inv2 = &sent[1];
    assert_eq!(hdr(inv2, "CSeq").unwrap(), "2 INVITE");
    assert!(hdr(inv2, "Proxy-Authorization").is_none());
    let p = digest_params(&hdr(inv2, "Authorization").expect("Authorization"));
    assert!(!p.contains_key("qop") && !p.contains_key("cnonce"));
    // RFC 2069 form: MD5(HA1:nonce:HA2).
    let ha1 = md5_hex("alice:gw.example:s3cret");
    let ha2 = md5_hex(&format!("INVITE:{REQUEST_URI}"));
    assert_eq!(p["response"], md5_hex(&format!("{ha1}:abc:{ha2}")));
    h.input(&reply(inv2, 180, "", None));
    h.input(&reply(inv2, 200, "", Some(OFFER)));
    assert_eq!(
        h.take_events()
            .into_iter()
            .filter(|e| matches!(e, UaEvent::CallAnswered { call: c, .. } if *c == call))
            .count(),
        1
    );
}

#[test]
fn a_second_challenge_for_the_same_realm_fails_the_call() {
    for (code, challenge) in [
        (
            407,
            "Proxy-Authenticate: Digest realm=\"trunk.example\", nonce=\"n1\", qop=\"auth\"\r\n",
        ),
        (
            401,
            "WWW-Authenticate: Digest realm=\"gw.example\", nonce=\"n1\"\r\n",
        ),
    ] {
        let mut h = H::new();
        let (call, inv1) = h.outbound(creds());
        h.input(&reply(&inv1, code, challenge, None));
        let inv2 = h.take_sent().pop().unwrap();
        assert_eq!(hdr(&inv2, "CSeq").unwrap(), "2 INVITE");
        // Wrong password: the same realm challenges again (a fresh nonce).
        h.input(&reply(&inv2, code, &challenge.replace("n1", "n2"), None));
        let sent = h.take_sent();
        assert_eq!(sent.len(), 1, "only the ACK, no third INVITE: {sent:?}");
        assert!(sent[0].starts_with("ACK ") && sent[0].contains("CSeq: 2 ACK"));
        assert_eq!(
            h.take_events(),
            vec![UaEvent::CallEnded {
                call,
                by: EndedBy::Remote,
                reason: EndReason::Failed(code)
            }]
        );
        assert_eq!(h.ua.call_count(), 0);
    }
}

#[test]
fn challenges_fail_without_credentials_or_when_unanswerable() {
    for (auth, challenge) in [
        (
            None,
            "Proxy-Authenticate: Digest realm=\"r\", nonce=\"n\"\r\n",
        ),
        (creds(), "Proxy-Authenticate: Basic realm=\"r\"\r\n"),
        (
            creds(),
            "Proxy-Authenticate: Digest realm=\"r\", nonce=\"n\", algorithm=SHA-512\r\n",
        ),
        (creds(), ""),
    ] {
        let mut h = H::new();
        let (call, inv) = h.outbound(auth);
        h.input(&reply(&inv, 407, challenge, None));
        let sent = h.take_sent();
        assert_eq!(sent.len(), 1, "{challenge}: {sent:?}");
        assert!(sent[0].starts_with("ACK "));
        assert_eq!(
            h.take_events(),
            vec![UaEvent::CallEnded {
                call,
                by: EndedBy::Remote,
                reason: EndReason::Failed(407)
            }]
        );
    }
}

#[test]
fn cancel_after_an_authenticated_invite_names_the_new_transaction() {
    let mut h = H::new();
    let (call, inv1) = h.outbound(creds());
    h.input(&reply(&inv1, 180, "", None));
    h.take_events();
    h.input(&reply(
        &inv1,
        407,
        "Proxy-Authenticate: Digest realm=\"trunk.example\", nonce=\"n\"\r\n",
        None,
    ));
    let inv2 = h.take_sent().pop().unwrap();
    // Hang up before the new INVITE had a provisional (the 180 was the old one's): the
    // CANCEL waits for one (§9.1).
    h.ua.hangup(call, h.now).unwrap();
    h.drain();
    assert!(h.take_sent().is_empty());
    h.input(&reply(&inv2, 180, "", None));
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let cancel = &sent[0];
    assert!(
        cancel.starts_with(&format!("CANCEL {REQUEST_URI} SIP/2.0\r\n")),
        "{cancel}"
    );
    assert_eq!(hdr(cancel, "CSeq").unwrap(), "2 CANCEL");
    assert_eq!(branch(cancel), branch(&inv2));
    assert_ne!(branch(cancel), branch(&inv1));
    assert!(hdr(cancel, "Proxy-Authorization").is_none());
    h.input(&reply(cancel, 200, "", None));
    h.input(&reply(&inv2, 487, "", None));
    let ack = h.take_sent().pop().unwrap();
    assert!(
        ack.starts_with("ACK ") && ack.contains("CSeq: 2 ACK"),
        "{ack}"
    );
    assert_eq!(
        h.take_events(),
        vec![UaEvent::CallEnded {
            call,
            by: EndedBy::Local,
            reason: EndReason::Cancelled
        }]
    );
}

// ---------------------------------------------------------------- outbound CANCEL / BYE

#[test]
fn hangup_after_a_provisional_cancels_at_once_and_487_ends_cancelled() {
    let mut h = H::new();
    let (call, inv) = h.outbound(None);
    h.input(&reply(&inv, 183, "", None));
    h.take_events();
    h.ua.hangup(call, h.now).unwrap();
    h.drain();
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].starts_with("CANCEL ") && sent[0].contains("CSeq: 1 CANCEL"));
    assert_eq!(branch(&sent[0]), branch(&inv));
    assert!(
        h.take_events().is_empty(),
        "the call ends with the 487, not before"
    );
    h.input(&reply(&sent[0], 200, "", None));
    h.input(&reply(&inv, 487, "", None));
    assert_eq!(
        h.take_events(),
        vec![UaEvent::CallEnded {
            call,
            by: EndedBy::Local,
            reason: EndReason::Cancelled
        }]
    );
}

#[test]
fn hangup_before_a_provisional_cancels_when_one_arrives() {
    let mut h = H::new();
    let (call, inv) = h.outbound(None);
    h.ua.hangup(call, h.now).unwrap();
    h.drain();
    assert!(h.take_sent().is_empty());
    h.advance(ms(300));
    h.input(&reply(&inv, 180, "", None));
    assert!(
        h.take_events().is_empty(),
        "no CallProgress for a call being cancelled"
    );
    let sent = h.take_sent();
    assert!(sent[0].starts_with("CANCEL "), "{sent:?}");
    h.input(&reply(&inv, 487, "", None));
    assert_eq!(
        h.take_events(),
        vec![UaEvent::CallEnded {
            call,
            by: EndedBy::Local,
            reason: EndReason::Cancelled
        }]
    );
}

#[test]
fn hangup_before_a_provisional_that_never_comes_times_out() {
    let mut h = H::new();
    let (call, _) = h.outbound(None);
    h.ua.hangup(call, h.now).unwrap();
    h.drain();
    h.advance(ms(31_990));
    let sent = h.take_sent();
    assert!(
        sent.iter().all(|s| s.starts_with("INVITE ")),
        "only INVITE retransmissions, never a CANCEL: {sent:?}"
    );
    assert!(h.take_events().is_empty());
    h.advance(ms(10));
    assert_eq!(
        h.take_events(),
        vec![UaEvent::CallEnded {
            call,
            by: EndedBy::Local,
            reason: EndReason::Timeout
        }]
    );
    assert_eq!(h.ua.call_count(), 0);
}

#[test]
fn bye_from_the_callee_of_an_outbound_call_ends_it() {
    let mut h = H::new();
    let (call, inv) = h.outbound_answered();
    h.input(&from_callee(&inv, "BYE", "z9hG4bKcbye", 1, "", ""));
    let sent = h.take_sent();
    assert_eq!(statuses(&sent), vec![200]);
    assert_eq!(hdr(&sent[0], "CSeq").unwrap(), "1 BYE");
    assert_eq!(
        h.take_events(),
        vec![UaEvent::CallEnded {
            call,
            by: EndedBy::Remote,
            reason: EndReason::Bye
        }]
    );
    assert_eq!(h.ua.call_count(), 0);
}

// ---------------------------------------------------------------- REFER we send

#[test]
fn refer_reports_its_response_and_the_transfer_notifies() {
    let mut h = H::new();
    let (call, tag) = h.incoming_established();
    h.ua.refer(call, "sip:carol@198.51.100.20", h.now).unwrap();
    h.drain();
    let (to, refer) = h.sent.pop().unwrap();
    assert!(h.sent.is_empty());
    assert_eq!(to.addr, PEER.parse().unwrap(), "to the caller's Contact");
    assert!(
        refer.starts_with("REFER sip:+15559999@198.51.100.9:5060 SIP/2.0\r\n"),
        "{refer}"
    );
    assert_eq!(
        hdr(&refer, "Refer-To").unwrap(),
        "<sip:carol@198.51.100.20>"
    );
    assert_eq!(
        hdr(&refer, "Referred-By").unwrap(),
        "<sip:+15550001@203.0.113.1>"
    );
    assert_eq!(hdr(&refer, "CSeq").unwrap(), "1 REFER");
    assert!(hdr(&refer, "To").unwrap().contains("tag=caller1"));
    assert!(hdr(&refer, "From").unwrap().contains(&format!("tag={tag}")));
    assert!(hdr(&refer, "Contact").is_some());
    assert!(h.take_events().is_empty());

    h.input(&reply(&refer, 202, "", None));
    assert_eq!(
        h.take_events(),
        vec![UaEvent::ReferResponse { call, code: 202 }]
    );
    h.input(&reply(&refer, 202, "", None));
    assert!(
        h.take_events().is_empty(),
        "a retransmitted 202 is not reported again"
    );

    let frag = |line: &str, cseq: u32, state: &str| {
        from_caller(
            "NOTIFY",
            &format!("z9hG4bKn{cseq}"),
            cseq,
            &tag,
            &format!("Event: refer\r\nSubscription-State: {state}\r\n"),
            Some(("message/sipfrag;version=2.0", line.as_bytes())),
        )
    };
    h.input(&frag("SIP/2.0 180 Ringing\r\n", 2, "active;expires=60"));
    h.input(&frag(
        "SIP/2.0 200 OK\r\n",
        3,
        "terminated;reason=noresource",
    ));
    assert_eq!(statuses(&h.take_sent()), vec![200, 200]);
    assert_eq!(
        h.take_events(),
        vec![
            UaEvent::TransferNotify { call, code: 180 },
            UaEvent::TransferNotify { call, code: 200 },
        ]
    );
    // The call itself is still up: hanging up sends BYE with the next CSeq.
    h.ua.hangup(call, h.now).unwrap();
    h.drain();
    assert_eq!(hdr(&h.take_sent().pop().unwrap(), "CSeq").unwrap(), "2 BYE");
}

#[test]
fn refused_refer_on_an_outbound_call_is_reported() {
    let mut h = H::new();
    let (call, _) = h.outbound_answered();
    h.ua.refer(call, "<sip:carol@198.51.100.20>", h.now)
        .unwrap();
    h.drain();
    let (to, refer) = h.sent.pop().unwrap();
    assert_eq!(
        to.addr,
        "198.51.100.9:5080".parse().unwrap(),
        "to the callee's Contact"
    );
    assert!(refer.starts_with("REFER sip:+15557777@198.51.100.9:5080 SIP/2.0\r\n"));
    assert_eq!(hdr(&refer, "CSeq").unwrap(), "2 REFER");
    assert_eq!(
        hdr(&refer, "Referred-By").unwrap(),
        "<sip:+15550001@203.0.113.1>"
    );
    h.input(&reply(&refer, 100, "", None));
    assert!(h.take_events().is_empty(), "provisionals are not reported");
    h.input(&reply(&refer, 501, "", None));
    assert_eq!(
        h.take_events(),
        vec![UaEvent::ReferResponse { call, code: 501 }]
    );
}

#[test]
fn unanswered_refer_is_reported_as_408() {
    let mut h = H::new();
    let (call, _) = h.incoming_established();
    h.ua.refer(call, "sip:carol@198.51.100.20", h.now).unwrap();
    h.drain();
    h.advance(ms(31_990));
    assert!(h.take_events().is_empty());
    assert!(h.take_sent().len() >= 5, "timer E retransmits the REFER");
    h.advance(ms(10));
    assert_eq!(
        h.take_events(),
        vec![UaEvent::ReferResponse { call, code: 408 }]
    );
    assert_eq!(h.ua.call_count(), 1, "a failed REFER does not end the call");
}

#[test]
fn refer_needs_an_established_call_and_a_uri() {
    let mut h = H::new();
    let (out, _) = h.outbound(None);
    assert_eq!(
        h.ua.refer(out, "sip:carol@x", h.now),
        Err(UaError::WrongState("calling out"))
    );
    assert_eq!(
        h.ua.refer(CallHandle(999), "sip:carol@x", h.now),
        Err(UaError::UnknownCall)
    );
    let inv = "INVITE sip:+15550001@203.0.113.1 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bKi9\r\nMax-Forwards: 70\r\nFrom: <sip:a@198.51.100.9>;tag=a9\r\nTo: <sip:+15550001@203.0.113.1>\r\nCall-ID: c9\r\nCSeq: 1 INVITE\r\nContact: <sip:a@198.51.100.9>\r\nContent-Length: 0\r\n\r\n";
    h.input(inv);
    let incoming = match h.take_events().as_slice() {
        [UaEvent::IncomingCall(ic)] => ic.call,
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        h.ua.refer(incoming, "sip:carol@x", h.now),
        Err(UaError::WrongState(_))
    ));
    h.take_sent();
    let mut h = H::new();
    let (call, _) = h.incoming_established();
    for bad in ["carol", "sip:carol@x\r\nX-Evil: 1", ""] {
        assert!(
            matches!(h.ua.refer(call, bad, h.now), Err(UaError::InvalidUri(_))),
            "{bad:?}"
        );
    }
    h.drain();
    assert!(
        h.take_sent().is_empty(),
        "nothing sent for a refused command"
    );
}

// ---------------------------------------------------------------- REFER we receive

fn refer_from_caller(tag: &str, cseq: u32, refer_to: &str) -> String {
    from_caller(
        "REFER",
        &format!("z9hG4bKref{cseq}"),
        cseq,
        tag,
        &format!("{refer_to}Referred-By: <sip:+15559999@198.51.100.9>\r\n"),
        None,
    )
}

#[test]
fn incoming_refer_is_declined_by_default() {
    let mut h = H::new();
    let (call, tag) = h.incoming_established();
    h.input(&refer_from_caller(
        &tag,
        2,
        "Refer-To: <sip:carol@198.51.100.20>\r\n",
    ));
    let sent = h.take_sent();
    assert_eq!(statuses(&sent), vec![603], "{sent:?}");
    assert!(
        sent[0].starts_with("SIP/2.0 603 Transfer Refused\r\n"),
        "{}",
        sent[0]
    );
    assert!(hdr(&sent[0], "To").unwrap().contains(&format!("tag={tag}")));
    assert!(h.take_events().is_empty());
    assert_eq!(
        h.ua.notify_transfer(call, 200, "OK", h.now),
        Err(UaError::WrongState("no transfer accepted on this call"))
    );
}

#[test]
fn accepted_refer_is_notified_until_a_final_status() {
    let mut h = H::with(UaConfig {
        accept_refer: true,
        ..UaConfig::default()
    });
    let (call, tag) = h.incoming_established();
    let refer = refer_from_caller(&tag, 2, "Refer-To: <sip:carol@198.51.100.20>\r\n");
    h.input(&refer);
    let sent = h.take_sent();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(
        sent[0].starts_with("SIP/2.0 202 Accepted\r\n"),
        "{}",
        sent[0]
    );
    assert_eq!(hdr(&sent[0], "CSeq").unwrap(), "2 REFER");
    let notify = &sent[1];
    assert!(
        notify.starts_with("NOTIFY sip:+15559999@198.51.100.9:5060 SIP/2.0\r\n"),
        "{notify}"
    );
    assert_eq!(hdr(notify, "Event").unwrap(), "refer");
    assert_eq!(
        hdr(notify, "Subscription-State").unwrap(),
        "active;expires=60"
    );
    assert_eq!(
        hdr(notify, "Content-Type").unwrap(),
        "message/sipfrag;version=2.0"
    );
    assert_eq!(body(notify).trim_end(), "SIP/2.0 100 Trying");
    assert_eq!(hdr(notify, "CSeq").unwrap(), "1 NOTIFY");
    assert!(hdr(notify, "Contact").is_some());
    match h.take_events().as_slice() {
        [UaEvent::InDialogRequest {
            call: c,
            kind: InDialogKind::Refer,
            request,
            media: None,
        }] => {
            assert_eq!(*c, call);
            assert_eq!(
                message::header(&request.headers, "Refer-To").as_deref(),
                Some("<sip:carol@198.51.100.20>")
            );
        }
        other => panic!("{other:?}"),
    }
    // The retransmitted REFER gets the same 202 and no second event or NOTIFY.
    h.input(&refer);
    assert_eq!(statuses(&h.take_sent()), vec![202]);
    assert!(h.take_events().is_empty());
    // A second REFER while the first is still running.
    h.input(&refer_from_caller(
        &tag,
        3,
        "Refer-To: <sip:dave@198.51.100.21>\r\n",
    ));
    assert_eq!(statuses(&h.take_sent()), vec![491]);

    h.ua.notify_transfer(call, 180, "Ringing", h.now).unwrap();
    h.drain();
    let n2 = h.take_sent().pop().unwrap();
    assert_eq!(hdr(&n2, "Subscription-State").unwrap(), "active;expires=60");
    assert_eq!(body(&n2).trim_end(), "SIP/2.0 180 Ringing");
    assert_eq!(hdr(&n2, "CSeq").unwrap(), "2 NOTIFY");
    h.input(&reply(&n2, 200, "", None));

    h.ua.notify_transfer(call, 200, "OK", h.now).unwrap();
    h.drain();
    let n3 = h.take_sent().pop().unwrap();
    assert_eq!(
        hdr(&n3, "Subscription-State").unwrap(),
        "terminated;reason=noresource"
    );
    assert_eq!(body(&n3).trim_end(), "SIP/2.0 200 OK");
    assert_eq!(hdr(&n3, "CSeq").unwrap(), "3 NOTIFY");
    // A 481 to the NOTIFY is only logged.
    h.input(&reply(&n3, 481, "", None));
    assert!(h.take_events().is_empty());
    assert_eq!(h.ua.call_count(), 1);
    assert_eq!(
        h.ua.notify_transfer(call, 200, "OK", h.now),
        Err(UaError::WrongState("transfer already reported as finished"))
    );
    // Bad statuses and CR/LF in the reason are not sent.
    let mut h = H::with(UaConfig {
        accept_refer: true,
        ..UaConfig::default()
    });
    let (call, tag) = h.incoming_established();
    h.input(&refer_from_caller(
        &tag,
        2,
        "Refer-To: <sip:carol@198.51.100.20>\r\n",
    ));
    h.take_sent();
    assert_eq!(
        h.ua.notify_transfer(call, 99, "x", h.now),
        Err(UaError::BadStatus(99))
    );
    h.ua.notify_transfer(call, 503, "Down\r\nX-Evil: 1", h.now)
        .unwrap();
    h.drain();
    let n = h.take_sent().pop().unwrap();
    assert_eq!(body(&n), "SIP/2.0 503 DownX-Evil: 1\r\n");
    assert!(hdr(&n, "X-Evil").is_none());
}

#[test]
fn incoming_refer_without_exactly_one_target_is_a_bad_request() {
    let mut h = H::with(UaConfig {
        accept_refer: true,
        ..UaConfig::default()
    });
    let (_, tag) = h.incoming_established();
    h.input(&refer_from_caller(&tag, 2, ""));
    h.input(&refer_from_caller(
        &tag,
        3,
        "Refer-To: <sip:carol@x>\r\nRefer-To: <sip:dave@x>\r\n",
    ));
    h.input(&refer_from_caller(
        &tag,
        4,
        "Refer-To: <sip:carol@x>, <sip:dave@x>\r\n",
    ));
    assert_eq!(statuses(&h.take_sent()), vec![400, 400, 400]);
    assert!(h.take_events().is_empty());
}

// ---------------------------------------------------------------- odd NOTIFYs and REFERs

#[test]
fn odd_notifies_and_refers_get_answers_not_panics() {
    let mut h = H::new();
    let (call, tag) = h.incoming_established();
    let bodies: [&[u8]; 7] = [
        b"",
        b"garbage",
        b"SIP/2.0 abc Ringing",
        b"SIP/2.0 1",
        b"\xff\xfe\x00\x01",
        b"SIP/2.0 \xe2\x82\xac\xe2\x82\xac OK",
        b"SIP/2.0 999 Nope",
    ];
    for (i, b) in bodies.iter().enumerate() {
        let cseq = 10 + i as u32;
        h.input_bytes(&from_caller_bytes(
            "NOTIFY",
            &format!("z9hG4bKodd{cseq}"),
            cseq,
            &tag,
            "Event: refer\r\nSubscription-State: active\r\n",
            Some(("message/sipfrag", b)),
        ));
    }
    // A status line in a body that is not a sipfrag is not a transfer report.
    h.input(&from_caller(
        "NOTIFY",
        "z9hG4bKtxt",
        20,
        &tag,
        "Event: refer\r\n",
        Some(("text/plain", b"SIP/2.0 200 OK")),
    ));
    assert_eq!(statuses(&h.take_sent()), vec![200; 8]);
    assert!(
        h.take_events().is_empty(),
        "no TransferNotify from a bad sipfrag"
    );
    // Compact `o` Event header, with an id parameter.
    h.input(&from_caller(
        "NOTIFY",
        "z9hG4bKcompact",
        21,
        &tag,
        "o: refer;id=7\r\n",
        Some(("message/sipfrag", b"SIP/2.0 486 Busy Here")),
    ));
    assert_eq!(statuses(&h.take_sent()), vec![200]);
    assert_eq!(
        h.take_events(),
        vec![UaEvent::TransferNotify { call, code: 486 }]
    );
    // Another event package, or none.
    h.input(&from_caller(
        "NOTIFY",
        "z9hG4bKpres",
        22,
        &tag,
        "Event: presence\r\n",
        None,
    ));
    h.input(&from_caller("NOTIFY", "z9hG4bKnoev", 23, &tag, "", None));
    assert_eq!(statuses(&h.take_sent()), vec![489, 489]);
    // Unknown dialog, and no dialog at all.
    h.input(&from_caller(
        "NOTIFY",
        "z9hG4bKgone",
        24,
        "nosuchtag",
        "Event: refer\r\n",
        None,
    ));
    let outside = "NOTIFY sip:callforge@203.0.113.1 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bKood\r\nMax-Forwards: 70\r\nFrom: <sip:x@198.51.100.9>;tag=x\r\nTo: <sip:callforge@203.0.113.1>\r\nCall-ID: ood-1\r\nCSeq: 1 NOTIFY\r\nEvent: refer\r\nContent-Length: 0\r\n\r\n";
    h.input(outside);
    h.input(
        &outside
            .replace("NOTIFY", "REFER")
            .replace("Event: refer", "Refer-To: <sip:carol@x>"),
    );
    let sent = h.take_sent();
    assert_eq!(statuses(&sent), vec![481, 481, 403]);
    assert!(sent[2].starts_with("SIP/2.0 403 Out-Of-Dialog REFER Not Accepted\r\n"));
    assert!(h.take_events().is_empty());
    // Mutated NOTIFYs/REFERs: whatever happens, no panic.
    let base = from_caller(
        "NOTIFY",
        "z9hG4bKmut",
        30,
        &tag,
        "Event: refer\r\n",
        Some(("message/sipfrag", b"SIP/2.0 200 OK")),
    );
    for cut in (0..base.len()).step_by(7) {
        h.input_bytes(&base.as_bytes()[..cut]);
        let mut flipped = base.clone().into_bytes();
        flipped[cut] ^= 0x20;
        h.input_bytes(&flipped);
    }
    h.input(
        &base
            .replace("NOTIFY", "REFER")
            .replace("Event: refer", "Refer-To: <"),
    );
    h.take_sent();
    h.take_events();
}

#[test]
fn allow_lists_refer_and_notify() {
    let mut h = H::new();
    h.input("OPTIONS sip:203.0.113.1 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bKo\r\nFrom: <sip:ping@x>;tag=p\r\nTo: <sip:203.0.113.1>\r\nCall-ID: ping1\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n");
    let ok = h.take_sent().pop().unwrap();
    let allow = hdr(&ok, "Allow").unwrap();
    assert!(
        allow.contains("REFER") && allow.contains("NOTIFY"),
        "{allow}"
    );
}
