//! Out-of-dialog SIP MESSAGE (RFC 3428) sent by callforge (`api.send.sip`): one client
//! non-INVITE transaction; its final status (or 408 on timeout) comes back as an event.

use std::{net::SocketAddr, time::Instant};

use super::{ClientPurpose, UaError, UaEvent, UserAgent};
use crate::sip::{message, transaction::Target};

/// A MESSAGE to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundMessage {
    /// Next hop and transport.
    pub target: Target,
    /// Request-URI and To, e.g. `sip:alice@example.net`.
    pub to: String,
    /// From URI (a tag is added).
    pub from: String,
    pub content_type: String,
    pub body: Vec<u8>,
    /// Our socket address for Via (the transport driver fills it when `None`).
    pub local: Option<SocketAddr>,
}

/// Identifies one MESSAGE until its result event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageHandle(pub u64);

impl UserAgent {
    /// Send a MESSAGE; [`UaEvent::MessageResult`] reports its final status.
    pub fn message(&mut self, m: OutboundMessage, now: Instant) -> Result<MessageHandle, UaError> {
        self.set_now(now);
        let local = m
            .local
            .or(self.cfg.advertised_addr)
            .ok_or(UaError::WrongState("missing a local address"))?;
        if !m.to.starts_with("sip:") && !m.to.starts_with("sips:") {
            return Err(UaError::WrongState("MESSAGE needs a sip: or sips: URI"));
        }
        let our = self.cfg.advertised_addr.unwrap_or(local);
        let via = format!(
            "SIP/2.0/{} {our};branch=z9hG4bK{};rport",
            m.target.transport.via_name(),
            self.new_token()
        );
        let mut headers = rsip::Headers::default();
        for (n, v) in [
            ("Via", via),
            ("Max-Forwards", "70".to_string()),
            ("From", format!("<{}>;tag={}", m.from, self.new_token())),
            ("To", format!("<{}>", m.to)),
            ("Call-ID", format!("{}@{}", self.new_token(), our.ip())),
            ("CSeq", "1 MESSAGE".to_string()),
            ("User-Agent", self.cfg.user_agent.clone()),
            ("Content-Type", m.content_type.clone()),
        ] {
            headers.push(message::make_header(n, v));
        }
        let request = rsip::Request {
            method: rsip::Method::Message,
            uri: message::parse_uri(&m.to),
            version: rsip::Version::V2,
            headers,
            body: m.body,
        };
        let mut out = Vec::new();
        let key = self.txs.send_request(request, m.target, now, &mut out)?;
        self.next_message += 1;
        let handle = MessageHandle(self.next_message);
        self.messages.insert(key.clone(), handle);
        self.client_txs
            .insert(key, (super::CallHandle(0), ClientPurpose::Message));
        self.drain_tx(out, now);
        self.announce_timer();
        Ok(handle)
    }

    /// A final response (or a timeout, as 408) to one of our MESSAGEs.
    pub(super) fn message_result(&mut self, key: &crate::sip::transaction::TxKey, code: u16) {
        if let Some(handle) = self.messages.remove(key) {
            self.emit(UaEvent::MessageResult {
                message: handle,
                code,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::{transaction::TransportKind, ua::Action, UaConfig};
    use std::time::Duration;

    fn message(ua: &mut UserAgent, now: Instant) -> (MessageHandle, String) {
        let peer: SocketAddr = "127.0.0.1:5099".parse().unwrap();
        let handle = ua
            .message(
                OutboundMessage {
                    target: Target {
                        addr: peer,
                        transport: TransportKind::Udp,
                    },
                    to: "sip:bob@127.0.0.1:5099".into(),
                    from: "sip:callforge@127.0.0.1".into(),
                    content_type: "text/plain".into(),
                    body: b"hi".to_vec(),
                    local: Some("127.0.0.1:5070".parse().unwrap()),
                },
                now,
            )
            .unwrap();
        let mut sent = String::new();
        while let Some(a) = ua.poll_action() {
            if let Action::Send { bytes, .. } = a {
                sent = String::from_utf8(bytes).unwrap();
            }
        }
        (handle, sent)
    }

    fn result(ua: &mut UserAgent) -> Option<(MessageHandle, u16)> {
        let mut out = None;
        while let Some(a) = ua.poll_action() {
            if let Action::Event(UaEvent::MessageResult { message, code }) = a {
                out = Some((message, code));
            }
        }
        out
    }

    #[test]
    fn a_final_response_is_reported_once() {
        let now = Instant::now();
        let mut ua = UserAgent::new(UaConfig::default());
        let (handle, sent) = message(&mut ua, now);
        assert!(
            sent.starts_with("MESSAGE sip:bob@127.0.0.1:5099 SIP/2.0\r\n"),
            "{sent}"
        );
        assert!(sent.ends_with("\r\n\r\nhi"), "{sent}");
        let header = |name: &str| {
            sent.lines()
                .find(|l| {
                    l.to_ascii_lowercase()
                        .starts_with(&format!("{}:", name.to_ascii_lowercase()))
                })
                .unwrap_or_default()
                .split_once(':')
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default()
        };
        let reply = format!(
            "SIP/2.0 200 OK\r\nVia: {}\r\nFrom: {}\r\nTo: {};tag=x\r\nCall-ID: {}\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n",
            header("Via"),
            header("From"),
            header("To"),
            header("Call-ID")
        );
        let source = Target {
            addr: "127.0.0.1:5099".parse().unwrap(),
            transport: TransportKind::Udp,
        };
        ua.handle_input(
            reply.as_bytes(),
            source,
            "127.0.0.1:5070".parse().unwrap(),
            now,
        );
        assert_eq!(result(&mut ua), Some((handle, 200)));
        ua.handle_input(
            reply.as_bytes(),
            source,
            "127.0.0.1:5070".parse().unwrap(),
            now,
        );
        assert_eq!(
            result(&mut ua),
            None,
            "a retransmitted 200 is not reported again"
        );
    }

    #[test]
    fn silence_ends_as_408_after_timer_f() {
        let now = Instant::now();
        let mut ua = UserAgent::new(UaConfig::default());
        let (handle, _) = message(&mut ua, now);
        let mut t = now;
        let mut retransmissions = 0;
        while t < now + Duration::from_secs(40) {
            t += Duration::from_millis(250);
            ua.handle_timeout(t);
            while let Some(a) = ua.poll_action() {
                match a {
                    Action::Send { .. } => retransmissions += 1,
                    Action::Event(UaEvent::MessageResult { message, code }) => {
                        assert_eq!((message, code), (handle, 408));
                        assert!(t >= now + Duration::from_secs(32), "timer F is 64*T1");
                        assert!(retransmissions >= 5, "timer E resent it");
                        return;
                    }
                    _ => {}
                }
            }
        }
        panic!("no result after 40 s");
    }
}
