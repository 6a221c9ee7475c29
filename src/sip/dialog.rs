//! Dialog state (RFC 3261 §12), UAS 2xx retransmission (§13.3.1.4, RFC 6026) and session
//! timers (RFC 4028), all driven by the caller's clock.

use super::message::{self, NameAddr};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Call-ID plus both tags, from our point of view.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DialogId {
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: String,
}

impl DialogId {
    /// The dialog an incoming in-dialog request names (To tag is ours).
    pub fn of_incoming(req: &rsip::Request) -> Option<Self> {
        Some(Self {
            call_id: message::call_id(&req.headers)?,
            local_tag: message::to_tag(&req.headers)?,
            remote_tag: message::from_tag(&req.headers).unwrap_or_default(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Uas,
    Uac,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DialogError {
    #[error("request has no {0}")]
    Missing(&'static str),
    #[error("CSeq {got} is lower than the last one seen ({last})")]
    CSeqOutOfOrder { got: u32, last: u32 },
}

/// Dialog state shared by UAS and UAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dialog {
    pub id: DialogId,
    pub role: Role,
    /// Our From/To value (with our tag).
    pub local: NameAddr,
    /// Their From/To value (with their tag).
    pub remote: NameAddr,
    /// Where in-dialog requests go (the peer's Contact).
    pub remote_target: String,
    /// Route set, in the order requests must carry it.
    pub route_set: Vec<String>,
    pub local_cseq: u32,
    pub remote_cseq: Option<u32>,
    /// Our Contact URI.
    pub local_contact: String,
}

impl Dialog {
    /// UAS dialog from an INVITE and the tag we put in our response.
    pub fn uas(
        invite: &rsip::Request,
        local_tag: &str,
        local_contact: &str,
    ) -> Result<Self, DialogError> {
        let h = &invite.headers;
        let call_id = message::call_id(h).ok_or(DialogError::Missing("Call-ID"))?;
        let remote =
            NameAddr::parse(&message::header(h, "From").ok_or(DialogError::Missing("From"))?)
                .map_err(|_| DialogError::Missing("From"))?;
        let mut local =
            NameAddr::parse(&message::header(h, "To").ok_or(DialogError::Missing("To"))?)
                .map_err(|_| DialogError::Missing("To"))?;
        local.set_param("tag", Some(local_tag.to_string()));
        let remote_target = message::contacts(h)
            .first()
            .map(|c| c.uri.clone())
            .unwrap_or_else(|| remote.uri.clone());
        let (seq, _) = message::cseq(h).map_err(|_| DialogError::Missing("CSeq"))?;
        Ok(Self {
            id: DialogId {
                call_id,
                local_tag: local_tag.to_string(),
                remote_tag: remote.tag().unwrap_or_default(),
            },
            role: Role::Uas,
            local,
            remote,
            remote_target,
            // §12.1.1: the UAS keeps Record-Route in received order.
            route_set: message::record_routes(h),
            local_cseq: 0,
            remote_cseq: Some(seq),
            local_contact: local_contact.to_string(),
        })
    }

    /// UAC dialog from our INVITE and a 1xx/2xx response carrying a To tag.
    pub fn uac(
        invite: &rsip::Request,
        resp: &rsip::Response,
        local_contact: &str,
    ) -> Result<Self, DialogError> {
        let (ih, rh) = (&invite.headers, &resp.headers);
        let call_id = message::call_id(ih).ok_or(DialogError::Missing("Call-ID"))?;
        let local =
            NameAddr::parse(&message::header(ih, "From").ok_or(DialogError::Missing("From"))?)
                .map_err(|_| DialogError::Missing("From"))?;
        let remote = NameAddr::parse(&message::header(rh, "To").ok_or(DialogError::Missing("To"))?)
            .map_err(|_| DialogError::Missing("To"))?;
        let remote_tag = remote.tag().ok_or(DialogError::Missing("To tag"))?;
        let (seq, _) = message::cseq(ih).map_err(|_| DialogError::Missing("CSeq"))?;
        let mut route_set = message::record_routes(rh);
        // §12.1.2: the UAC uses Record-Route in reverse order.
        route_set.reverse();
        Ok(Self {
            id: DialogId {
                call_id,
                local_tag: local.tag().unwrap_or_default(),
                remote_tag,
            },
            role: Role::Uac,
            remote_target: message::contacts(rh)
                .first()
                .map(|c| c.uri.clone())
                .unwrap_or_else(|| invite.uri.to_string()),
            local,
            remote,
            route_set,
            local_cseq: seq,
            remote_cseq: None,
            local_contact: local_contact.to_string(),
        })
    }

    /// §12.2.2: a lower remote CSeq is out of order (the caller answers 500).
    pub fn check_remote_cseq(&mut self, seq: u32) -> Result<(), DialogError> {
        if let Some(last) = self.remote_cseq {
            if seq < last {
                return Err(DialogError::CSeqOutOfOrder { got: seq, last });
            }
        }
        self.remote_cseq = Some(seq);
        Ok(())
    }

    /// Updates the remote target from a target-refresh request or response.
    pub fn refresh_target(&mut self, headers: &rsip::Headers) {
        if let Some(c) = message::contacts(headers).first() {
            self.remote_target = c.uri.clone();
        }
    }

    /// URI of the next hop: first route if loose routing, otherwise the remote target.
    pub fn next_hop_uri(&self) -> String {
        match self.route_set.first() {
            Some(r) => NameAddr::parse(r)
                .map(|n| n.uri)
                .unwrap_or_else(|_| r.clone()),
            None => self.remote_target.clone(),
        }
    }

    /// Builds an in-dialog request (§12.2.1.1). `via` is our full Via value with a fresh
    /// branch. ACK reuses the INVITE's CSeq number; other methods take the next one.
    pub fn build_request(
        &mut self,
        method: rsip::Method,
        via: &str,
        ack_cseq: Option<u32>,
        body: Option<(&str, Vec<u8>)>,
    ) -> rsip::Request {
        let seq = match (method, ack_cseq) {
            (rsip::Method::Ack, Some(s)) => s,
            _ => {
                self.local_cseq = self.local_cseq.wrapping_add(1).max(1);
                self.local_cseq
            }
        };
        let mut routes = self.route_set.clone();
        let first_is_loose = routes
            .first()
            .and_then(|r| NameAddr::parse(r).ok())
            .is_none_or(|n| n.uri.to_ascii_lowercase().contains(";lr"));
        let uri_text = if first_is_loose {
            self.remote_target.clone()
        } else {
            // Strict routing (RFC 2543 proxies): first route becomes the Request-URI.
            let first = routes.remove(0);
            routes.push(format!("<{}>", self.remote_target));
            NameAddr::parse(&first).map(|n| n.uri).unwrap_or(first)
        };
        let uri = message::parse_uri(&uri_text);
        let mut headers = rsip::Headers::default();
        headers.push(message::make_header("Via", via));
        for r in routes {
            headers.push(message::make_header("Route", r));
        }
        headers.push(message::make_header("Max-Forwards", "70"));
        headers.push(message::make_header("From", self.local.to_string()));
        headers.push(message::make_header("To", self.remote.to_string()));
        headers.push(message::make_header("Call-ID", self.id.call_id.clone()));
        headers.push(message::make_header("CSeq", format!("{seq} {method}")));
        // Target-refresh requests carry our Contact, and so do REFER and NOTIFY
        // (RFC 3515 §2.4.1 and RFC 6665 §8.2.1: they create or refresh a subscription).
        if matches!(
            method,
            rsip::Method::Invite
                | rsip::Method::Update
                | rsip::Method::Refer
                | rsip::Method::Notify
        ) {
            headers.push(message::make_header(
                "Contact",
                format!("<{}>", self.local_contact),
            ));
        }
        let body = match body {
            Some((ctype, bytes)) => {
                headers.push(message::make_header("Content-Type", ctype));
                bytes
            }
            None => Vec::new(),
        };
        rsip::Request {
            method,
            uri,
            version: rsip::Version::V2,
            headers,
            body,
        }
    }
}

/// What a 2xx retransmission timer asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetransmitStep {
    /// Send the 2xx again; next one at this instant.
    Resend {
        bytes: Vec<u8>,
        next: Instant,
    },
    /// 64*T1 passed without ACK: the dialog must be torn down with BYE.
    GiveUp,
    Idle,
}

/// UAS 2xx retransmission until ACK (§13.3.1.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerRetransmit {
    bytes: Vec<u8>,
    interval: Duration,
    t2: Duration,
    next: Option<Instant>,
    give_up_at: Instant,
}

impl AnswerRetransmit {
    /// Starts after the first send at `now`. On reliable transports nothing is resent, but
    /// the give-up deadline still applies.
    pub fn new(bytes: Vec<u8>, t1: Duration, t2: Duration, reliable: bool, now: Instant) -> Self {
        Self {
            bytes,
            interval: t1,
            t2,
            next: (!reliable).then_some(now + t1),
            give_up_at: now + t1 * 64,
        }
    }

    pub fn next_resend(&self) -> Option<Instant> {
        self.next
    }

    pub fn give_up_at(&self) -> Instant {
        self.give_up_at
    }

    pub fn on_timer(&mut self, now: Instant) -> RetransmitStep {
        if now >= self.give_up_at {
            self.next = None;
            return RetransmitStep::GiveUp;
        }
        match self.next {
            Some(at) if at <= now => {
                self.interval = (self.interval * 2).min(self.t2);
                let next = now + self.interval;
                self.next = Some(next);
                RetransmitStep::Resend {
                    bytes: self.bytes.clone(),
                    next,
                }
            }
            _ => RetransmitStep::Idle,
        }
    }
}

/// Who sends session refreshes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresher {
    Uac,
    Uas,
}

/// A negotiated RFC 4028 session timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTimer {
    pub interval: Duration,
    pub refresher: Refresher,
    /// The UAC said `Supported: timer`, so our 2xx carries `Require: timer`.
    pub peer_supports: bool,
}

/// Why a session-timer negotiation rejects a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntervalTooSmall {
    pub min_se: u32,
}

impl SessionTimer {
    /// UAS side of RFC 4028 §9 for an INVITE/UPDATE. `Ok(None)` means no session timer.
    pub fn negotiate(
        headers: &rsip::Headers,
        our_min_se: u32,
    ) -> Result<Option<Self>, IntervalTooSmall> {
        let Some(se) = message::header(headers, "Session-Expires") else {
            return Ok(None);
        };
        let mut parts = se.split(';');
        let Some(secs) = parts.next().and_then(|s| s.trim().parse::<u32>().ok()) else {
            return Ok(None);
        };
        let their_min = message::header(headers, "Min-SE")
            .and_then(|m| {
                m.split(';')
                    .next()
                    .and_then(|s| s.trim().parse::<u32>().ok())
            })
            .unwrap_or(90);
        if secs < our_min_se {
            return Err(IntervalTooSmall {
                min_se: our_min_se.max(their_min),
            });
        }
        let peer_supports = message::has_option_tag(headers, "Supported", "timer");
        let asked = parts.find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case("refresher")
                .then(|| v.trim().to_ascii_lowercase())
        });
        let refresher = match asked.as_deref() {
            Some("uas") => Refresher::Uas,
            Some("uac") if peer_supports => Refresher::Uac,
            // A peer that does not support timers cannot refresh: we must (§9).
            _ if !peer_supports => Refresher::Uas,
            _ => Refresher::Uac,
        };
        Ok(Some(Self {
            interval: Duration::from_secs(secs.into()),
            refresher,
            peer_supports,
        }))
    }

    /// Headers for our 2xx.
    pub fn response_headers(&self) -> Vec<(String, String)> {
        let who = match self.refresher {
            Refresher::Uac => "uac",
            Refresher::Uas => "uas",
        };
        let mut h = vec![(
            "Session-Expires".to_string(),
            format!("{};refresher={who}", self.interval.as_secs()),
        )];
        if self.peer_supports {
            h.push(("Require".to_string(), "timer".to_string()));
        }
        h
    }

    /// When the non-refreshing side sends BYE: expiry minus min(32 s, interval/3) (§10).
    pub fn expiry_deadline(&self, refreshed_at: Instant) -> Instant {
        let margin = Duration::from_secs(32).min(self.interval / 3);
        refreshed_at + self.interval - margin
    }

    /// When the refreshing side refreshes: half the interval (§7.2).
    pub fn refresh_deadline(&self, refreshed_at: Instant) -> Instant {
        refreshed_at + self.interval / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::parse::{parse, ParseLimits};

    fn req(text: &str) -> rsip::Request {
        match parse(text.as_bytes(), &ParseLimits::default()).unwrap() {
            rsip::SipMessage::Request(r) => r,
            _ => panic!(),
        }
    }

    const INVITE: &str = "INVITE sip:b@10.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\nRecord-Route: <sip:p1.example;lr>, <sip:p2.example;lr>\r\nFrom: <sip:a@x>;tag=rem\r\nTo: <sip:b@y>\r\nCall-ID: c\r\nCSeq: 10 INVITE\r\nContact: <sip:a@192.0.2.1:5070>\r\nSession-Expires: 1800;refresher=uac\r\nSupported: timer, 100rel\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn uas_dialog_builds_bye_with_routes_and_next_cseq() {
        let inv = req(INVITE);
        let mut d = Dialog::uas(&inv, "loc", "sip:cf@10.0.0.1:5060").unwrap();
        assert_eq!(d.id.remote_tag, "rem");
        assert_eq!(d.remote_target, "sip:a@192.0.2.1:5070");
        assert_eq!(d.route_set.len(), 2);
        assert_eq!(d.next_hop_uri(), "sip:p1.example;lr");
        let bye = d.build_request(
            rsip::Method::Bye,
            "SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx",
            None,
            None,
        );
        let text = String::from_utf8(message::to_bytes(&bye.into())).unwrap();
        assert!(
            text.starts_with("BYE sip:a@192.0.2.1:5070 SIP/2.0\r\n"),
            "{text}"
        );
        assert!(text.contains("Route: <sip:p1.example;lr>\r\nRoute: <sip:p2.example;lr>\r\n"));
        assert!(text.contains("From: <sip:b@y>;tag=loc\r\n"));
        assert!(text.contains("To: <sip:a@x>;tag=rem\r\n"));
        assert!(text.contains("CSeq: 1 BYE\r\n"));
    }

    #[test]
    fn cseq_order() {
        let mut d = Dialog::uas(&req(INVITE), "loc", "sip:cf@h").unwrap();
        assert!(d.check_remote_cseq(11).is_ok());
        assert_eq!(
            d.check_remote_cseq(9),
            Err(DialogError::CSeqOutOfOrder { got: 9, last: 11 })
        );
    }

    #[test]
    fn retransmit_doubles_to_t2_and_gives_up_at_64_t1() {
        let t0 = Instant::now();
        let (t1, t2) = (Duration::from_millis(500), Duration::from_secs(4));
        let mut r = AnswerRetransmit::new(b"200".to_vec(), t1, t2, false, t0);
        let mut sends = Vec::new();
        let mut now = t0;
        loop {
            now += Duration::from_millis(50);
            match r.on_timer(now) {
                RetransmitStep::Resend { .. } => sends.push((now - t0).as_millis()),
                RetransmitStep::GiveUp => break,
                RetransmitStep::Idle => {}
            }
        }
        assert_eq!(&sends[..5], &[500, 1500, 3500, 7500, 11500]);
        assert_eq!((now - t0).as_millis(), 32_000);
    }

    #[test]
    fn session_timer_negotiation() {
        let inv = req(INVITE);
        let st = SessionTimer::negotiate(&inv.headers, 90).unwrap().unwrap();
        assert_eq!(st.refresher, Refresher::Uac);
        assert_eq!(st.interval, Duration::from_secs(1800));
        let h = st.response_headers();
        assert!(h.contains(&("Require".into(), "timer".into())));
        let t0 = Instant::now();
        assert_eq!(st.expiry_deadline(t0), t0 + Duration::from_secs(1800 - 32));
        let small = req(&INVITE.replace("1800;refresher=uac", "60"));
        assert_eq!(
            SessionTimer::negotiate(&small.headers, 90),
            Err(IntervalTooSmall { min_se: 90 })
        );
        let no_support = req(&INVITE
            .replace("Supported: timer, 100rel", "Supported: 100rel")
            .replace(";refresher=uac", ""));
        assert_eq!(
            SessionTimer::negotiate(&no_support.headers, 90)
                .unwrap()
                .unwrap()
                .refresher,
            Refresher::Uas
        );
    }
}
