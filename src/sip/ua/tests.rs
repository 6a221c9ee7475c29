//! Scenario tests for the user agent core, driven by a fake clock.

use super::*;
use std::time::Duration;

const PEER: &str = "198.51.100.9:5060";
const LOCAL: &str = "203.0.113.1:5060";

const OFFER: &str = "v=0\r\no=c 1 1 IN IP4 198.51.100.9\r\ns=-\r\nc=IN IP4 198.51.100.9\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n";

struct H {
    ua: UserAgent,
    t0: Instant,
    now: Instant,
    peer: Target,
    sent: Vec<(Target, String)>,
    events: Vec<UaEvent>,
    /// Drop this many upcoming sends (packet loss).
    drop_next: usize,
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

impl H {
    fn new() -> Self {
        Self::with(UaConfig::default(), TransportKind::Udp)
    }

    fn with(cfg: UaConfig, transport: TransportKind) -> Self {
        let t0 = Instant::now();
        Self {
            ua: UserAgent::new(cfg),
            t0,
            now: t0,
            peer: Target {
                addr: PEER.parse().unwrap(),
                transport,
            },
            sent: Vec::new(),
            events: Vec::new(),
            drop_next: 0,
        }
    }

    fn drain(&mut self) {
        while let Some(a) = self.ua.poll_action() {
            match a {
                Action::Send {
                    to,
                    transport,
                    bytes,
                } => {
                    if self.drop_next > 0 {
                        self.drop_next -= 1;
                        continue;
                    }
                    self.sent.push((
                        Target {
                            addr: to,
                            transport,
                        },
                        String::from_utf8(bytes).unwrap(),
                    ));
                }
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

    /// Advances the clock in 10 ms steps, firing timers as a driver would.
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

    fn elapsed_ms(&self) -> u128 {
        (self.now - self.t0).as_millis()
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

    fn incoming_call(&mut self) -> CallHandle {
        self.input(&invite("z9hG4bKinv1", 1, Some(OFFER), ""));
        let evs = self.take_events();
        match evs.as_slice() {
            [UaEvent::IncomingCall(ic)] => ic.call,
            other => panic!("expected IncomingCall, got {other:?}"),
        }
    }

    fn media() -> MediaConfig {
        MediaConfig::new("203.0.113.1".parse().unwrap(), 20000)
    }

    /// INVITE, answer, ACK: returns the call and our To tag.
    fn established(&mut self) -> (CallHandle, String) {
        let call = self.incoming_call();
        self.ua.answer(call, &Self::media(), self.now).unwrap();
        self.drain();
        let ok = self.take_sent().pop().unwrap();
        let tag = to_tag_of(&ok);
        self.input(&in_dialog("ACK", "z9hG4bKack1", 1, &tag, None));
        assert!(matches!(
            self.take_events().as_slice(),
            [UaEvent::CallAcked { .. }]
        ));
        (call, tag)
    }
}

fn invite(branch: &str, cseq: u32, sdp: Option<&str>, extra: &str) -> String {
    let body = sdp.unwrap_or("");
    let ctype = if sdp.is_some() {
        "Content-Type: application/sdp\r\n"
    } else {
        ""
    };
    format!(
        "INVITE sip:+15550001@203.0.113.1 SIP/2.0\r\n\
Via: SIP/2.0/UDP 198.51.100.9:5060;branch={branch}\r\n\
Max-Forwards: 70\r\n\
From: <sip:+15559999@198.51.100.9>;tag=caller1\r\n\
To: <sip:+15550001@203.0.113.1>\r\n\
Call-ID: call-1@198.51.100.9\r\n\
CSeq: {cseq} INVITE\r\n\
Contact: <sip:+15559999@198.51.100.9:5060>\r\n\
{extra}{ctype}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn in_dialog(method: &str, branch: &str, cseq: u32, to_tag: &str, sdp: Option<&str>) -> String {
    let body = sdp.unwrap_or("");
    let ctype = if sdp.is_some() {
        "Content-Type: application/sdp\r\n"
    } else {
        ""
    };
    format!(
        "{method} sip:callforge@203.0.113.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 198.51.100.9:5060;branch={branch}\r\n\
Max-Forwards: 70\r\n\
From: <sip:+15559999@198.51.100.9>;tag=caller1\r\n\
To: <sip:+15550001@203.0.113.1>;tag={to_tag}\r\n\
Call-ID: call-1@198.51.100.9\r\n\
CSeq: {cseq} {method}\r\n\
Contact: <sip:+15559999@198.51.100.9:5060>\r\n\
{ctype}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn to_tag_of(msg: &str) -> String {
    let to = msg.lines().find(|l| l.starts_with("To:")).unwrap();
    to.split("tag=").nth(1).unwrap().trim().to_string()
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

#[test]
fn options_out_of_dialog_gets_200_with_capabilities() {
    let mut h = H::new();
    h.input("OPTIONS sip:203.0.113.1 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bKo\r\nFrom: <sip:ping@x>;tag=p\r\nTo: <sip:203.0.113.1>\r\nCall-ID: ping1\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n");
    let sent = h.take_sent();
    assert_eq!(statuses(&sent), vec![200]);
    assert!(sent[0]
        .contains("Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, REFER, NOTIFY\r\n"));
    assert!(sent[0].contains("Accept: application/sdp\r\n"));
    assert!(sent[0].contains("Supported: timer\r\n"));
    assert!(
        sent[0].contains("To: <sip:203.0.113.1>;tag="),
        "§8.2.6.2 To tag"
    );
    assert!(h.take_events().is_empty());
}

#[test]
fn invite_ring_answer_ack_with_2xx_retransmissions() {
    let mut h = H::new();
    let call = h.incoming_call();
    assert_eq!(statuses(&h.take_sent()), vec![100], "100 Trying at once");
    h.ua.ring(call, None, h.now).unwrap();
    h.drain();
    let ringing = h.take_sent();
    assert_eq!(statuses(&ringing), vec![180]);
    let tag = to_tag_of(&ringing[0]);
    let neg = h.ua.answer(call, &H::media(), h.now).unwrap().unwrap();
    assert_eq!(neg.codec, sdp::Codec::Pcmu);
    assert_eq!(neg.dtmf_payload_type, Some(101));
    h.drain();
    let ok = h.take_sent();
    assert_eq!(statuses(&ok), vec![200]);
    assert_eq!(to_tag_of(&ok[0]), tag, "same To tag as the 180");
    assert!(ok[0].contains("m=audio 20000 RTP/AVP 0 101\r\n"));
    assert!(ok[0].contains("Contact: <sip:callforge@203.0.113.1:5060>\r\n"));
    // Retransmitted at T1, 3*T1, 7*T1 ...
    let mut at = Vec::new();
    for _ in 0..400 {
        h.advance(ms(10));
        if !h.take_sent().is_empty() {
            at.push(h.elapsed_ms());
        }
    }
    assert_eq!(at, vec![500, 1500, 3500]);
    h.input(&in_dialog("ACK", "z9hG4bKack1", 1, &tag, None));
    assert_eq!(
        h.take_events(),
        vec![UaEvent::CallAcked { call, answer: None }]
    );
    h.advance(ms(40_000));
    assert!(h.take_sent().is_empty(), "no retransmission after ACK");
    assert!(h.take_events().is_empty());
}

#[test]
fn invite_retransmission_is_absorbed() {
    let mut h = H::new();
    let call = h.incoming_call();
    h.take_sent();
    h.input(&invite("z9hG4bKinv1", 1, Some(OFFER), ""));
    assert_eq!(statuses(&h.take_sent()), vec![100], "100 resent");
    assert!(h.take_events().is_empty(), "no second IncomingCall");
    h.ua.answer(call, &H::media(), h.now).unwrap();
    h.drain();
    h.take_sent();
    h.input(&invite("z9hG4bKinv1", 1, Some(OFFER), ""));
    assert!(
        h.take_sent().is_empty(),
        "Accepted: INVITE retransmission absorbed"
    );
    assert!(h.take_events().is_empty());
}

#[test]
fn no_ack_within_64_t1_sends_bye() {
    let mut h = H::new();
    let call = h.incoming_call();
    h.ua.answer(call, &H::media(), h.now).unwrap();
    h.drain();
    h.take_sent();
    h.advance(ms(31_990));
    assert!(h.take_events().is_empty(), "not before 64*T1");
    assert!(h.take_sent().iter().all(|s| s.starts_with("SIP/2.0 200")));
    h.advance(ms(10));
    assert_eq!(
        h.take_events(),
        vec![UaEvent::CallEnded {
            call,
            by: EndedBy::Local,
            reason: EndReason::NoAck
        }]
    );
    let sent = h.take_sent();
    let bye = sent
        .iter()
        .find(|s| s.starts_with("BYE "))
        .expect("BYE sent");
    assert!(bye.starts_with("BYE sip:+15559999@198.51.100.9:5060 SIP/2.0\r\n"));
    assert!(bye.contains("CSeq: 1 BYE\r\n"));
    assert!(bye.contains("To: <sip:+15559999@198.51.100.9>;tag=caller1\r\n"));
}

#[test]
fn lost_200_is_retransmitted_until_acked() {
    let mut h = H::new();
    let call = h.incoming_call();
    h.take_sent();
    h.drop_next = 3; // the 200 and its first two retransmissions are lost
    h.ua.answer(call, &H::media(), h.now).unwrap();
    h.drain();
    assert!(h.take_sent().is_empty());
    h.advance(ms(3_400));
    assert!(h.take_sent().is_empty());
    h.advance(ms(100));
    let sent = h.take_sent();
    assert_eq!(
        statuses(&sent),
        vec![200],
        "third retransmission arrives at 3.5 s"
    );
    let tag = to_tag_of(&sent[0]);
    h.input(&in_dialog("ACK", "z9hG4bKa", 1, &tag, None));
    assert!(matches!(
        h.take_events().as_slice(),
        [UaEvent::CallAcked { .. }]
    ));
}

#[test]
fn cancel_gets_200_and_invite_487() {
    let mut h = H::new();
    let call = h.incoming_call();
    h.take_sent();
    h.input("CANCEL sip:+15550001@203.0.113.1 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bKinv1\r\nMax-Forwards: 70\r\nFrom: <sip:+15559999@198.51.100.9>;tag=caller1\r\nTo: <sip:+15550001@203.0.113.1>\r\nCall-ID: call-1@198.51.100.9\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n");
    let sent = h.take_sent();
    assert_eq!(statuses(&sent), vec![200, 487]);
    assert!(sent[0].contains("CSeq: 1 CANCEL"));
    assert!(sent[1].contains("CSeq: 1 INVITE"));
    assert_eq!(h.take_events(), vec![UaEvent::CallCancelled { call }]);
    assert_eq!(
        h.ua.answer(call, &H::media(), h.now),
        Err(UaError::UnknownCall)
    );
    // 487 is retransmitted (timer G) until the ACK, which the transaction absorbs.
    h.advance(ms(500));
    assert_eq!(statuses(&h.take_sent()), vec![487]);
    let tag = to_tag_of(&sent[1]);
    h.input(&in_dialog("ACK", "z9hG4bKinv1", 1, &tag, None).replace(
        "sip:callforge@203.0.113.1:5060",
        "sip:+15550001@203.0.113.1",
    ));
    h.advance(ms(40_000));
    assert!(h.take_sent().is_empty(), "ACK stopped timer G");
    assert!(h.take_events().is_empty());
    assert_eq!(h.ua.transaction_count(), 0, "timers I and J cleaned up");
}

#[test]
fn unknown_dialog_gets_481() {
    let mut h = H::new();
    h.input(&in_dialog("BYE", "z9hG4bKb", 2, "nosuchtag", None));
    assert_eq!(statuses(&h.take_sent()), vec![481]);
    h.input(&in_dialog("INFO", "z9hG4bKi", 3, "nosuchtag", None));
    assert_eq!(statuses(&h.take_sent()), vec![481]);
    // Out-of-dialog BYE as well.
    h.input(&invite("z9hG4bKbb", 1, None, "").replace("INVITE", "BYE"));
    assert_eq!(statuses(&h.take_sent()), vec![481]);
    h.input(&in_dialog("ACK", "z9hG4bKa", 1, "nosuchtag", None));
    assert!(h.take_sent().is_empty(), "never answer an ACK");
}

#[test]
fn remote_bye_ends_call_and_options_in_dialog() {
    let mut h = H::new();
    let (call, tag) = h.established();
    h.take_sent();
    h.input(&in_dialog("OPTIONS", "z9hG4bKo2", 2, &tag, None));
    assert_eq!(statuses(&h.take_sent()), vec![200]);
    assert!(matches!(
        h.take_events().as_slice(),
        [UaEvent::InDialogRequest {
            kind: InDialogKind::Options,
            ..
        }]
    ));
    h.input(&in_dialog("INFO", "z9hG4bKi2", 3, &tag, None));
    assert_eq!(statuses(&h.take_sent()), vec![200]);
    h.take_events();
    h.input(&in_dialog("BYE", "z9hG4bKb2", 4, &tag, None));
    assert_eq!(statuses(&h.take_sent()), vec![200]);
    assert_eq!(
        h.take_events(),
        vec![UaEvent::CallEnded {
            call,
            by: EndedBy::Remote,
            reason: EndReason::Bye
        }]
    );
    // Retransmitted BYE is answered by its transaction, not by a 481.
    h.input(&in_dialog("BYE", "z9hG4bKb2", 4, &tag, None));
    assert_eq!(statuses(&h.take_sent()), vec![200]);
    assert_eq!(h.ua.call_count(), 0);
}

#[test]
fn lower_cseq_in_dialog_gets_500() {
    let mut h = H::new();
    let (_, tag) = h.established();
    h.take_sent();
    h.input(&in_dialog("INFO", "z9hG4bKi5", 5, &tag, None));
    assert_eq!(statuses(&h.take_sent()), vec![200]);
    h.input(&in_dialog("INFO", "z9hG4bKi4", 4, &tag, None));
    assert_eq!(statuses(&h.take_sent()), vec![500]);
}

#[test]
fn reinvite_hold_is_answered_recvonly() {
    let mut h = H::new();
    let (call, tag) = h.established();
    h.take_sent();
    let hold = OFFER
        .replace("a=sendrecv", "a=sendonly")
        .replace("o=c 1 1", "o=c 1 2");
    h.input(&in_dialog("INVITE", "z9hG4bKre1", 2, &tag, Some(&hold)));
    let sent = h.take_sent();
    assert_eq!(statuses(&sent), vec![200]);
    assert!(sent[0].contains("a=recvonly\r\n"), "{}", sent[0]);
    assert!(sent[0].contains("o=callforge "));
    match h.take_events().as_slice() {
        [UaEvent::InDialogRequest {
            call: c,
            kind: InDialogKind::ReInvite,
            media: Some(neg),
            ..
        }] => {
            assert_eq!(*c, call);
            assert_eq!(neg.local_direction, sdp::Direction::RecvOnly);
        }
        other => panic!("{other:?}"),
    }
    // The re-INVITE's 2xx is retransmitted until its ACK.
    h.advance(ms(500));
    assert_eq!(statuses(&h.take_sent()), vec![200]);
    h.input(&in_dialog("ACK", "z9hG4bKre1a", 2, &tag, None));
    h.advance(ms(5_000));
    assert!(h.take_sent().is_empty());
    // Unacceptable offer in a re-INVITE: 488, call survives.
    let video_only = "v=0\r\nc=IN IP4 198.51.100.9\r\nm=audio 4000 RTP/AVP 18\r\n";
    h.input(&in_dialog(
        "INVITE",
        "z9hG4bKre2",
        3,
        &tag,
        Some(video_only),
    ));
    assert_eq!(statuses(&h.take_sent()), vec![488]);
    assert_eq!(h.ua.call_count(), 1);
}

#[test]
fn session_timer_expiry_sends_bye_and_refresh_postpones_it() {
    let mut h = H::new();
    h.input(&invite(
        "z9hG4bKst",
        1,
        Some(OFFER),
        "Session-Expires: 120\r\nSupported: timer\r\n",
    ));
    let call = match h.take_events().as_slice() {
        [UaEvent::IncomingCall(ic)] => ic.call,
        other => panic!("{other:?}"),
    };
    h.take_sent();
    h.ua.answer(call, &H::media(), h.now).unwrap();
    h.drain();
    let ok = h.take_sent().pop().unwrap();
    assert!(ok.contains("Session-Expires: 120;refresher=uac\r\n"));
    assert!(ok.contains("Require: timer\r\n"));
    let tag = to_tag_of(&ok);
    h.input(&in_dialog("ACK", "z9hG4bKsta", 1, &tag, None));
    h.take_events();
    // Refresh at 60 s with UPDATE: expiry moves to 60 + 120 - 32 = 148 s.
    h.advance(ms(60_000));
    h.input(&in_dialog("UPDATE", "z9hG4bKup", 2, &tag, None).replace(
        "Content-Length",
        "Session-Expires: 120;refresher=uac\r\nSupported: timer\r\nContent-Length",
    ));
    assert_eq!(statuses(&h.take_sent()), vec![200]);
    h.take_events();
    h.advance(ms(147_990 - 60_000));
    assert!(h.take_events().is_empty(), "not expired before 148 s");
    h.advance(ms(20));
    assert_eq!(
        h.take_events(),
        vec![UaEvent::CallEnded {
            call,
            by: EndedBy::Local,
            reason: EndReason::SessionExpired
        }]
    );
    assert!(h.take_sent().iter().any(|s| s.starts_with("BYE ")));
}

#[test]
fn session_interval_too_small_gets_422_and_require_gets_420() {
    let mut h = H::new();
    h.input(&invite(
        "z9hG4bKs1",
        1,
        Some(OFFER),
        "Session-Expires: 30\r\n",
    ));
    let sent = h.take_sent();
    assert_eq!(statuses(&sent), vec![422]);
    assert!(sent[0].contains("Min-SE: 90\r\n"));
    h.input(&invite("z9hG4bKs2", 1, Some(OFFER), "Require: 100rel\r\n"));
    let sent = h.take_sent();
    assert_eq!(statuses(&sent), vec![420]);
    assert!(sent[0].contains("Unsupported: 100rel\r\n"));
    assert!(h.take_events().is_empty());
}

#[test]
fn hangup_sends_bye_that_survives_loss() {
    let mut h = H::new();
    let (call, _) = h.established();
    h.take_sent();
    h.drop_next = 2;
    h.ua.hangup(call, h.now).unwrap();
    h.drain();
    assert_eq!(
        h.take_events(),
        vec![UaEvent::CallEnded {
            call,
            by: EndedBy::Local,
            reason: EndReason::Bye
        }]
    );
    h.advance(ms(1_490));
    assert!(h.take_sent().is_empty());
    h.advance(ms(10));
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1, "timer E retransmission at 1.5 s");
    let bye = &sent[0];
    let branch = bye
        .split("branch=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap();
    h.input(&format!("SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 203.0.113.1:5060;branch={branch};rport\r\nFrom: <sip:+15550001@203.0.113.1>;tag=x\r\nTo: <sip:+15559999@198.51.100.9>;tag=caller1\r\nCall-ID: call-1@198.51.100.9\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n"));
    h.advance(ms(40_000));
    assert!(h.take_sent().is_empty(), "no retransmission after the 200");
    assert_eq!(h.ua.transaction_count(), 0);
}

#[test]
fn hangup_before_ack_waits_for_ack() {
    let mut h = H::new();
    let call = h.incoming_call();
    h.ua.answer(call, &H::media(), h.now).unwrap();
    h.drain();
    let tag = to_tag_of(&h.take_sent().pop().unwrap());
    h.ua.hangup(call, h.now).unwrap();
    h.drain();
    assert!(!h.take_sent().iter().any(|s| s.starts_with("BYE")));
    h.input(&in_dialog("ACK", "z9hG4bKa", 1, &tag, None));
    assert!(h.take_sent().iter().any(|s| s.starts_with("BYE")));
}

#[test]
fn redirect_and_reject() {
    let mut h = H::new();
    let call = h.incoming_call();
    h.take_sent();
    h.ua.redirect(
        call,
        &[
            "sip:+15550002@gw1.example".into(),
            "<sip:+15550002@gw2.example>;q=0.5".into(),
        ],
        h.now,
    )
    .unwrap();
    h.drain();
    let sent = h.take_sent();
    assert_eq!(statuses(&sent), vec![302]);
    assert!(sent[0].starts_with("SIP/2.0 302 Moved Temporarily\r\n"));
    assert!(sent[0].contains(
        "Contact: <sip:+15550002@gw1.example>\r\nContact: <sip:+15550002@gw2.example>;q=0.5\r\n"
    ));
    assert_eq!(
        h.take_events(),
        vec![UaEvent::CallEnded {
            call,
            by: EndedBy::Local,
            reason: EndReason::Rejected(302)
        }]
    );

    let mut h = H::new();
    let call = h.incoming_call();
    h.take_sent();
    assert_eq!(
        h.ua.reject(call, 200, None, &[], h.now),
        Err(UaError::BadStatus(200))
    );
    h.ua.reject(
        call,
        486,
        Some("Busy Here"),
        &[("Reason".into(), "Q.850;cause=17".into())],
        h.now,
    )
    .unwrap();
    h.drain();
    let sent = h.take_sent();
    assert!(sent[0].starts_with("SIP/2.0 486 Busy Here\r\n"));
    assert!(sent[0].contains("Reason: Q.850;cause=17\r\n"));
}

#[test]
fn no_common_codec_lets_caller_send_488() {
    let mut h = H::new();
    let g729 = "v=0\r\nc=IN IP4 198.51.100.9\r\nm=audio 4000 RTP/AVP 18\r\n";
    h.input(&invite("z9hG4bKg", 1, Some(g729), ""));
    let call = match h.take_events().as_slice() {
        [UaEvent::IncomingCall(ic)] => ic.call,
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        h.ua.answer(call, &H::media(), h.now),
        Err(UaError::Sdp(SdpError::NoCommonCodec { .. }))
    ));
    h.ua.reject(call, 488, None, &[], h.now).unwrap();
    h.drain();
    assert_eq!(statuses(&h.take_sent()), vec![100, 488]);
}

#[test]
fn rport_and_received_decide_where_responses_go() {
    let mut h = H::new();
    // Client behind NAT: Via says 10.0.0.5:5060 with rport, packet came from PEER.
    h.input("OPTIONS sip:203.0.113.1 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKn;rport\r\nFrom: <sip:a@x>;tag=p\r\nTo: <sip:b@y>\r\nCall-ID: n1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n");
    let (to, msg) = h.sent.pop().unwrap();
    assert_eq!(to.addr, PEER.parse().unwrap());
    assert!(
        msg.contains(
            "Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKn;rport=5060;received=198.51.100.9\r\n"
        ),
        "{msg}"
    );
    // No rport: received is added, the Via port is used.
    h.input("OPTIONS sip:203.0.113.1 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.5:5070;branch=z9hG4bKm\r\nFrom: <sip:a@x>;tag=p\r\nTo: <sip:b@y>\r\nCall-ID: n2\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n");
    let (to, msg) = h.sent.pop().unwrap();
    assert_eq!(to.addr, "198.51.100.9:5070".parse().unwrap());
    assert!(msg.contains(";received=198.51.100.9\r\n"));
    // Sent-by matching the source: nothing added.
    h.input("OPTIONS sip:203.0.113.1 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bKq\r\nFrom: <sip:a@x>;tag=p\r\nTo: <sip:b@y>\r\nCall-ID: n3\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n");
    let (_, msg) = h.sent.pop().unwrap();
    assert!(msg.contains("Via: SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bKq\r\n"));
}

#[test]
fn tcp_has_no_2xx_retransmissions_but_still_gives_up() {
    let mut h = H::with(UaConfig::default(), TransportKind::Tcp);
    let call = h.incoming_call();
    h.ua.answer(call, &H::media(), h.now).unwrap();
    h.drain();
    let ok = h.take_sent();
    assert!(ok[1].contains("Contact: <sip:callforge@203.0.113.1:5060;transport=tcp>"));
    h.advance(ms(31_990));
    assert!(h.take_sent().is_empty());
    h.advance(ms(10));
    assert!(matches!(
        h.take_events().as_slice(),
        [UaEvent::CallEnded {
            reason: EndReason::NoAck,
            ..
        }]
    ));
}

#[test]
fn limits_give_503_with_retry_after() {
    let cfg = UaConfig {
        max_calls: 1,
        ..UaConfig::default()
    };
    let mut h = H::with(cfg, TransportKind::Udp);
    h.incoming_call();
    h.take_sent();
    h.input(&invite("z9hG4bKsecond", 1, Some(OFFER), "").replace("call-1@", "call-2@"));
    let sent = h.take_sent();
    assert_eq!(statuses(&sent), vec![503]);
    assert!(sent[0].contains("Retry-After: 5\r\n"));

    let cfg = UaConfig {
        max_transactions: 0,
        ..UaConfig::default()
    };
    let mut h = H::with(cfg, TransportKind::Udp);
    h.input(&invite("z9hG4bKx", 1, Some(OFFER), ""));
    assert_eq!(statuses(&h.take_sent()), vec![503]);
    assert!(h.take_events().is_empty());
}

#[test]
fn malformed_corpus_gets_400_or_is_dropped() {
    let good = invite("z9hG4bKm", 1, Some(OFFER), "");
    let cases: Vec<(String, Option<u16>)> = vec![
        (
            good.replace("Call-ID: call-1@198.51.100.9\r\n", ""),
            Some(400),
        ),
        (good.replace("CSeq: 1 INVITE\r\n", ""), Some(400)),
        (
            good.replace("From: <sip:+15559999@198.51.100.9>;tag=caller1\r\n", ""),
            Some(400),
        ),
        (
            good.replace("To: <sip:+15550001@203.0.113.1>\r\n", ""),
            Some(400),
        ),
        (
            good.replace("Via: SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bKm\r\n", ""),
            None,
        ),
        (
            good.replace(
                &format!("Content-Length: {}", OFFER.len()),
                "Content-Length: 9999",
            ),
            Some(400),
        ),
        (
            good.replace(
                &format!("Content-Length: {}", OFFER.len()),
                "Content-Length: abc",
            ),
            Some(400),
        ),
        (
            good.replace("CSeq: 1 INVITE", "CSeq: one INVITE"),
            Some(400),
        ),
        (good.replace("From: <sip:", "From: <garbage"), Some(400)),
        (
            good.replace("INVITE sip:", "FROB sip:")
                .replace("1 INVITE", "1 FROB"),
            Some(501),
        ),
        (
            good.replace("c=IN IP4 198.51.100.9", "c=IN IP4 nowhere"),
            Some(400),
        ),
        (
            good.replace(
                "INVITE sip:+15550001@203.0.113.1",
                "INVITE http://example.com/",
            ),
            Some(416),
        ),
        (good[..40].to_string(), None),
        ("\u{0}\u{1}\u{2}garbage\r\n\r\n".to_string(), None),
        (
            format!(
                "{}X-Huge: {}\r\n\r\n",
                &good[..good.find("\r\n\r\n").unwrap() + 2],
                "a".repeat(70_000)
            ),
            Some(513),
        ),
        // Compact forms and folding are fine, not malformed.
        (
            good.replace("Call-ID:", "i:")
                .replace("Via: SIP/2.0/UDP", "v: SIP/2.0/UDP\r\n  "),
            Some(100),
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let mut h = H::new();
        h.input(text);
        let got = statuses(&h.take_sent());
        match want {
            Some(code) => assert_eq!(got.first(), Some(code), "case {i}: {got:?}"),
            None => assert!(got.is_empty(), "case {i} should be dropped, got {got:?}"),
        }
    }
    // Reason phrase names the problem.
    let mut h = H::new();
    h.input(&good.replace("Call-ID: call-1@198.51.100.9\r\n", ""));
    assert!(h.take_sent()[0].starts_with("SIP/2.0 400 Missing Call-ID header\r\n"));
    // Binary garbage of every length never panics.
    let mut h = H::new();
    let mut seed: u32 = 7;
    for len in 0..800 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 24) as u8
            })
            .collect();
        h.input_bytes(&bytes);
    }
    for cut in 0..good.len() {
        h.input_bytes(&good.as_bytes()[..cut]);
    }
}

fn established_with(h: &mut H, extra: &str) -> (CallHandle, String) {
    h.input(&invite("z9hG4bKst2", 1, Some(OFFER), extra));
    let call = match h.take_events().as_slice() {
        [UaEvent::IncomingCall(ic)] => ic.call,
        other => panic!("{other:?}"),
    };
    h.take_sent();
    h.ua.answer(call, &H::media(), h.now).unwrap();
    h.drain();
    let ok = h.take_sent().pop().unwrap();
    let tag = to_tag_of(&ok);
    h.input(&in_dialog("ACK", "z9hG4bKack2", 1, &tag, None));
    h.take_events();
    (call, tag)
}

fn reply_to(req: &str, code: u16, sdp: Option<&str>) -> String {
    let mut out = format!("SIP/2.0 {code} X\r\n");
    for l in req.lines() {
        if ["Via:", "From:", "To:", "Call-ID:", "CSeq:"]
            .iter()
            .any(|p| l.starts_with(p))
        {
            out.push_str(l);
            if l.starts_with("To:") && !l.contains("tag=") {
                out.push_str(";tag=peer");
            }
            out.push_str("\r\n");
        }
    }
    let body = sdp.unwrap_or("");
    if sdp.is_some() {
        out.push_str("Content-Type: application/sdp\r\n");
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    out
}

#[test]
fn uas_refresher_sends_update_at_half_interval() {
    let mut h = H::new();
    let (_, _) = established_with(
        &mut h,
        "Session-Expires: 120;refresher=uas\r\nSupported: timer\r\nAllow: INVITE, ACK, BYE, CANCEL, UPDATE\r\n",
    );
    h.advance(ms(59_990));
    assert!(h.take_sent().is_empty(), "no refresh before SE/2");
    h.advance(ms(10));
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1);
    let update = &sent[0];
    assert!(
        update.starts_with("UPDATE sip:+15559999@198.51.100.9:5060 SIP/2.0\r\n"),
        "{update}"
    );
    assert!(update.contains("Session-Expires: 120;refresher=uas\r\n"));
    assert!(update.contains("CSeq: 1 UPDATE\r\n"));
    h.input(&reply_to(update, 200, None));
    // Next refresh 60 s after the 200.
    h.advance(ms(59_990));
    assert!(h.take_sent().is_empty());
    h.advance(ms(10));
    assert!(h.take_sent()[0].contains("CSeq: 2 UPDATE\r\n"));
}

#[test]
fn uas_refresher_uses_reinvite_and_acks_its_2xx() {
    let mut h = H::new();
    let (call, _) = established_with(
        &mut h,
        "Session-Expires: 120;refresher=uas\r\nSupported: timer\r\n",
    );
    h.advance(ms(60_000));
    let sent = h.take_sent();
    let reinvite = sent
        .iter()
        .find(|s| s.starts_with("INVITE "))
        .expect("re-INVITE");
    assert!(
        reinvite.contains("m=audio 20000 RTP/AVP 0 101\r\n"),
        "offers our current SDP"
    );
    h.input(&reply_to(reinvite, 200, Some(OFFER)));
    let sent = h.take_sent();
    assert!(
        sent.iter().any(
            |s| s.starts_with("ACK sip:+15559999@198.51.100.9:5060 SIP/2.0\r\n")
                && s.contains("CSeq: 1 ACK")
        ),
        "{sent:?}"
    );
    // A failed refresh (481) ends the call with BYE.
    h.advance(ms(60_000));
    let sent = h.take_sent();
    let reinvite = sent.iter().find(|s| s.starts_with("INVITE ")).unwrap();
    h.input(&reply_to(reinvite, 481, None));
    assert_eq!(
        h.take_events(),
        vec![UaEvent::CallEnded {
            call,
            by: EndedBy::Local,
            reason: EndReason::RefreshFailed
        }]
    );
    let sent = h.take_sent();
    assert!(
        sent.iter().any(|s| s.starts_with("ACK ")),
        "481 is ACKed in-transaction"
    );
    assert!(sent.iter().any(|s| s.starts_with("BYE ")));
}

#[test]
fn ipv6_contact_and_tel_request_uri() {
    let mut h = H::new();
    let text = invite("z9hG4bK6", 1, Some(OFFER), "")
        .replace(
            "INVITE sip:+15550001@203.0.113.1 SIP/2.0",
            "INVITE tel:+15550001 SIP/2.0",
        )
        .replace(
            "Contact: <sip:+15559999@198.51.100.9:5060>",
            "Contact: <sip:+15559999@[2001:db8::9]:5062>",
        );
    h.input(&text);
    let call = match h.take_events().as_slice() {
        [UaEvent::IncomingCall(ic)] => {
            assert_eq!(ic.request.uri.to_string(), "tel:+15550001");
            assert_eq!(
                message::uri_user(&ic.from.uri).as_deref(),
                Some("+15559999")
            );
            ic.call
        }
        other => panic!("{other:?}"),
    };
    h.ua.answer(call, &H::media(), h.now).unwrap();
    h.drain();
    let tag = to_tag_of(&h.take_sent().pop().unwrap());
    h.input(&in_dialog("ACK", "z9hG4bKa6", 1, &tag, None));
    h.ua.hangup(call, h.now).unwrap();
    h.drain();
    let (to, bye) = h.sent.pop().unwrap();
    assert!(
        bye.starts_with("BYE sip:+15559999@[2001:db8::9]:5062 SIP/2.0\r\n"),
        "{bye}"
    );
    assert_eq!(to.addr, "[2001:db8::9]:5062".parse().unwrap());
}

#[test]
fn early_media_183_then_same_sdp_in_200() {
    let mut h = H::new();
    let call = h.incoming_call();
    h.take_sent();
    let neg = h.ua.ring(call, Some(&H::media()), h.now).unwrap();
    assert!(neg.is_some());
    h.drain();
    let p = h.take_sent().pop().unwrap();
    assert!(p.starts_with("SIP/2.0 183 Session Progress\r\n"));
    h.ua.answer(call, &H::media(), h.now).unwrap();
    h.drain();
    let ok = h.take_sent().pop().unwrap();
    let sdp_of = |m: &str| m.split("\r\n\r\n").nth(1).unwrap().to_string();
    assert_eq!(sdp_of(&p), sdp_of(&ok));
}

#[test]
fn invite_without_sdp_gets_our_offer_and_ack_carries_answer() {
    let mut h = H::new();
    h.input(&invite("z9hG4bKdo", 1, None, ""));
    let call = match h.take_events().as_slice() {
        [UaEvent::IncomingCall(ic)] if ic.offer.is_none() => ic.call,
        other => panic!("{other:?}"),
    };
    h.take_sent();
    assert_eq!(h.ua.answer(call, &H::media(), h.now), Ok(None));
    h.drain();
    let ok = h.take_sent().pop().unwrap();
    assert!(ok.contains("m=audio 20000 RTP/AVP 0 8 101\r\n"));
    let tag = to_tag_of(&ok);
    h.input(&in_dialog("ACK", "z9hG4bKa", 1, &tag, Some(OFFER)));
    match h.take_events().as_slice() {
        [UaEvent::CallAcked {
            answer: Some(sdp), ..
        }] => assert_eq!(sdp.media[0].port, 40000),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unanswered_call_times_out_with_408() {
    let mut h = H::new();
    let call = h.incoming_call();
    h.take_sent();
    h.advance(ms(179_990));
    assert!(h.take_events().is_empty());
    h.advance(ms(10));
    assert_eq!(statuses(&h.take_sent()), vec![408]);
    assert_eq!(
        h.take_events(),
        vec![UaEvent::CallEnded {
            call,
            by: EndedBy::Local,
            reason: EndReason::NotAnswered
        }]
    );
    assert_eq!(h.ua.call_count(), 0);
}

#[test]
fn cancel_after_answer_gets_200_without_effect() {
    let mut h = H::new();
    let call = h.incoming_call();
    h.ua.answer(call, &H::media(), h.now).unwrap();
    h.drain();
    h.take_sent();
    let cancel = "CANCEL sip:+15550001@203.0.113.1 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bKinv1\r\nMax-Forwards: 70\r\nFrom: <sip:+15559999@198.51.100.9>;tag=caller1\r\nTo: <sip:+15550001@203.0.113.1>\r\nCall-ID: call-1@198.51.100.9\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n";
    h.input(cancel);
    assert_eq!(statuses(&h.take_sent()), vec![200]);
    assert!(h.take_events().is_empty());
    assert_eq!(h.ua.call_count(), 1);
    h.input(&cancel.replace("z9hG4bKinv1", "z9hG4bKnone"));
    assert_eq!(
        statuses(&h.take_sent()),
        vec![481],
        "a CANCEL matching nothing"
    );
}

#[test]
fn extra_header_names_cannot_inject() {
    let mut h = H::new();
    let call = h.incoming_call();
    h.take_sent();
    h.ua.reject(
        call,
        603,
        Some("Decline\r\nX-Evil: 1"),
        &[
            ("X-Ok".into(), "a\r\nX-Evil: 2".into()),
            ("Bad: Name".into(), "v".into()),
        ],
        h.now,
    )
    .unwrap();
    h.drain();
    let sent = h.take_sent();
    assert!(
        sent[0].starts_with("SIP/2.0 603 DeclineX-Evil: 1\r\n"),
        "{}",
        sent[0]
    );
    assert!(sent[0].contains("X-Ok: aX-Evil: 2\r\n"));
    assert!(!sent[0].contains("Bad: Name"));
    assert_eq!(sent[0].matches("\r\nX-Evil").count(), 0);
}

#[test]
fn mutated_messages_never_panic() {
    let mut h = H::new();
    let (_, tag) = h.established();
    let seeds = [
        invite("z9hG4bKf1", 2, Some(OFFER), "Session-Expires: 100\r\nSupported: timer\r\n"),
        in_dialog("INVITE", "z9hG4bKf2", 3, &tag, Some(OFFER)),
        in_dialog("BYE", "z9hG4bKf3", 4, &tag, None),
        in_dialog("INFO", "z9hG4bKf4", 5, &tag, Some("Signal=5\r\n")),
        in_dialog("ACK", "z9hG4bKf5", 1, &tag, None),
        "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 203.0.113.1:5060;branch=z9hG4bKx\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: c\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n".to_string(),
    ];
    let mut seed: u64 = 0x1234_5678;
    let mut rnd = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n.max(1) as u64) as usize
    };
    let alphabet = b" :;,<>\"=@\r\n\t0123456789zZ[]/\\\x00\xff";
    for i in 0..6000 {
        let mut m = seeds[i % seeds.len()].clone().into_bytes();
        for _ in 0..1 + rnd(4) {
            match rnd(5) {
                0 => {
                    let at = rnd(m.len());
                    m[at] = alphabet[rnd(alphabet.len())];
                }
                1 => m.truncate(rnd(m.len() + 1)),
                2 => {
                    let (a, b) = (rnd(m.len()), rnd(m.len()));
                    let (a, b) = (a.min(b), a.max(b));
                    let chunk = m[a..b].to_vec();
                    let at = rnd(m.len() + 1);
                    m.splice(at..at, chunk);
                }
                3 => {
                    let (a, b) = (rnd(m.len()), rnd(m.len()));
                    m.drain(a.min(b)..a.max(b));
                }
                _ => {
                    let at = rnd(m.len() + 1);
                    m.insert(at, alphabet[rnd(alphabet.len())]);
                }
            }
        }
        h.input_bytes(&m);
        if i % 100 == 0 {
            h.advance(ms(700));
        }
        h.take_sent();
        h.take_events();
    }
}

fn outbound(h: &mut H) -> (CallHandle, String) {
    let oc = OutboundCall {
        target: h.peer,
        request_uri: "sip:+15557777@198.51.100.9".into(),
        from: NameAddr::parse("\"Callforge\" <sip:+15550001@203.0.113.1>").unwrap(),
        to: NameAddr::parse("<sip:+15557777@198.51.100.9>").unwrap(),
        media: H::media(),
        local: Some(LOCAL.parse().unwrap()),
        headers: vec![("X-Account".into(), "42".into())],
        auth: None,
    };
    let call = h.ua.invite(oc, h.now).unwrap();
    h.drain();
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1);
    (call, sent[0].clone())
}

/// A response from the callee to our request, with To tag `callee`.
fn callee_reply(req: &str, code: u16, sdp: Option<&str>) -> String {
    let mut out = reply_to(req, code, sdp).replace(";tag=peer", ";tag=callee");
    if (101..300).contains(&code) {
        out = out.replacen(
            "Content-Length",
            "Contact: <sip:+15557777@198.51.100.9:5080>\r\nContent-Length",
            1,
        );
    }
    out
}

#[test]
fn outbound_call_progress_answer_ack_and_remote_bye() {
    let mut h = H::new();
    let (call, inv) = outbound(&mut h);
    assert!(
        inv.starts_with("INVITE sip:+15557777@198.51.100.9 SIP/2.0\r\n"),
        "{inv}"
    );
    assert!(inv.contains("CSeq: 1 INVITE\r\n"));
    assert!(inv.contains("X-Account: 42\r\n"));
    assert!(inv.contains("m=audio 20000 RTP/AVP 0 8 101\r\n"));
    h.input(&callee_reply(&inv, 180, None));
    assert_eq!(
        h.take_events(),
        vec![UaEvent::CallProgress {
            call,
            code: 180,
            media: None
        }]
    );
    h.input(&callee_reply(&inv, 200, Some(OFFER)));
    let ack = h.take_sent();
    assert_eq!(ack.len(), 1);
    assert!(
        ack[0].starts_with("ACK sip:+15557777@198.51.100.9:5080 SIP/2.0\r\n"),
        "{}",
        ack[0]
    );
    assert!(ack[0].contains("CSeq: 1 ACK\r\n"));
    assert!(ack[0].contains(";tag=callee"));
    match h.take_events().as_slice() {
        [UaEvent::CallAnswered {
            call: c,
            media: Some(m),
        }] => {
            assert_eq!(*c, call);
            assert_eq!(m.remote_rtp, Some("198.51.100.9:40000".parse().unwrap()));
        }
        other => panic!("{other:?}"),
    }
    // Retransmitted 2xx: the same ACK again, no new event.
    h.input(&callee_reply(&inv, 200, Some(OFFER)));
    assert_eq!(h.take_sent(), ack);
    assert!(h.take_events().is_empty());
    // The callee hangs up; its BYE names our From tag as To tag.
    let our_tag = inv
        .split("tag=")
        .nth(1)
        .unwrap()
        .split("\r\n")
        .next()
        .unwrap();
    let bye = format!("BYE sip:callforge@203.0.113.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bKcb\r\nFrom: <sip:+15557777@198.51.100.9>;tag=callee\r\nTo: \"Callforge\" <sip:+15550001@203.0.113.1>;tag={our_tag}\r\nCall-ID: {}\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n",
        inv.split("Call-ID: ").nth(1).unwrap().split("\r\n").next().unwrap());
    h.input(&bye);
    assert_eq!(statuses(&h.take_sent()), vec![200]);
    assert_eq!(
        h.take_events(),
        vec![UaEvent::CallEnded {
            call,
            by: EndedBy::Remote,
            reason: EndReason::Bye
        }]
    );
}

#[test]
fn outbound_failure_is_acked_and_reported() {
    let mut h = H::new();
    let (call, inv) = outbound(&mut h);
    h.input(&callee_reply(&inv, 486, None));
    let sent = h.take_sent();
    assert!(sent[0].starts_with("ACK sip:+15557777@198.51.100.9 SIP/2.0\r\n"));
    assert_eq!(
        h.take_events(),
        vec![UaEvent::CallEnded {
            call,
            by: EndedBy::Remote,
            reason: EndReason::Failed(486)
        }]
    );
}

#[test]
fn outbound_cancel_waits_for_a_provisional() {
    let mut h = H::new();
    let (call, inv) = outbound(&mut h);
    h.ua.hangup(call, h.now).unwrap();
    h.drain();
    assert!(
        h.take_sent().is_empty(),
        "no CANCEL before a provisional (§9.1)"
    );
    h.input(&callee_reply(&inv, 180, None));
    let sent = h.take_sent();
    let cancel = &sent[0];
    assert!(cancel.starts_with("CANCEL sip:+15557777@198.51.100.9 SIP/2.0\r\n"));
    assert!(cancel.contains("CSeq: 1 CANCEL\r\n"));
    let inv_branch = inv
        .split("branch=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap();
    assert!(cancel.contains(&format!("branch={inv_branch}")));
    h.input(&callee_reply(cancel, 200, None));
    h.input(&callee_reply(&inv, 487, None));
    assert!(h.take_sent()[0].starts_with("ACK "));
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
fn outbound_without_response_retransmits_then_times_out() {
    let mut h = H::new();
    let (call, _) = outbound(&mut h);
    h.advance(ms(31_990));
    assert_eq!(
        h.take_sent().len(),
        6,
        "timer A: 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s"
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
}

#[test]
fn outbound_local_hangup_after_answer_sends_bye_to_contact() {
    let mut h = H::new();
    let (call, inv) = outbound(&mut h);
    h.input(&callee_reply(&inv, 200, Some(OFFER)));
    h.take_sent();
    h.take_events();
    h.ua.hangup(call, h.now).unwrap();
    h.drain();
    let (to, bye) = h.sent.pop().unwrap();
    assert_eq!(to.addr, "198.51.100.9:5080".parse().unwrap());
    assert!(bye.starts_with("BYE sip:+15557777@198.51.100.9:5080 SIP/2.0\r\n"));
    assert!(bye.contains("CSeq: 2 BYE\r\n"));
}

#[test]
fn bye_crossing_ours_gets_200() {
    let mut h = H::new();
    let (call, tag) = h.established();
    h.take_sent();
    h.ua.hangup(call, h.now).unwrap();
    h.drain();
    h.take_sent();
    h.take_events();
    h.input(&in_dialog("BYE", "z9hG4bKcross", 2, &tag, None));
    assert_eq!(statuses(&h.take_sent()), vec![200]);
    assert!(h.take_events().is_empty(), "the call already ended once");
    // Long after, the dialog is forgotten.
    h.advance(ms(40_000));
    h.take_sent();
    h.input(&in_dialog("BYE", "z9hG4bKlate", 3, &tag, None));
    assert_eq!(statuses(&h.take_sent()), vec![481]);
}

#[test]
fn bye_retransmitted_on_the_default_t1_is_answered_200_when_our_t1_is_short() {
    // SIPp's BYE with T1 = 500 ms, our 200s lost: its retransmissions come at
    // 0.5, 1.5, 3.5, 7.5 s... Our T1 of 100 ms must not make us forget the BYE after 6.4 s.
    let mut cfg = UaConfig::default();
    cfg.timers.t1 = ms(100);
    let mut h = H::with(cfg, TransportKind::Udp);
    let (_, tag) = h.established();
    h.take_sent();
    h.input(&in_dialog("BYE", "z9hG4bKlossy", 2, &tag, None));
    assert_eq!(statuses(&h.take_sent()), vec![200]);
    let mut at = 0;
    for gap in [500, 1_000, 2_000, 4_000, 4_000, 4_000, 4_000, 4_000, 4_000] {
        h.advance(ms(gap));
        at += gap;
        h.input(&in_dialog("BYE", "z9hG4bKlossy", 2, &tag, None));
        assert_eq!(
            statuses(&h.take_sent()),
            vec![200],
            "BYE retransmission {at} ms after the first"
        );
    }
}

#[test]
fn a_dialog_we_ended_is_remembered_for_the_peers_window_when_our_t1_is_short() {
    let mut cfg = UaConfig::default();
    cfg.timers.t1 = ms(100);
    let mut h = H::with(cfg, TransportKind::Udp);
    let (call, tag) = h.established();
    h.ua.hangup(call, h.now).unwrap();
    h.drain();
    h.take_sent();
    h.take_events();
    // The peer's own BYE, sent before ours reached it and retransmitted until 10 s.
    h.advance(ms(10_000));
    h.take_sent();
    h.input(&in_dialog("BYE", "z9hG4bKcross", 2, &tag, None));
    assert_eq!(
        statuses(&h.take_sent()),
        vec![200],
        "not 481 after 64 x 100 ms"
    );
    assert!(h.take_events().is_empty());
    h.advance(ms(30_000));
    h.take_sent();
    h.input(&in_dialog("BYE", "z9hG4bKlater", 3, &tag, None));
    assert_eq!(
        statuses(&h.take_sent()),
        vec![481],
        "forgotten after 64 x 500 ms"
    );
}

#[test]
fn an_acked_inbound_call_keeps_only_the_invites_naming_headers_and_still_works() {
    let mut h = H::new();
    let (call, tag) = h.established();
    h.take_sent();
    let kept = &h.ua.calls[&call].invite;
    assert!(kept.body.is_empty(), "the offer SDP is not kept");
    let names: Vec<String> = kept
        .headers
        .iter()
        .map(|hd| crate::sip::message::name_value(hd).0)
        .collect();
    assert_eq!(names, ["Via", "From", "To", "Call-ID", "CSeq"]);
    // A late retransmission of the INVITE is still absorbed by its transaction.
    h.input(&invite("z9hG4bKinv1", 1, Some(OFFER), ""));
    assert!(h.take_sent().is_empty(), "the retransmission is absorbed");
    assert!(h.take_events().is_empty());
    // The BYE still names the dialog.
    h.ua.hangup(call, h.now).unwrap();
    h.drain();
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1);
    let bye = &sent[0];
    assert!(bye.starts_with("BYE "), "{bye}");
    assert!(bye.contains("Call-ID: call-1@198.51.100.9\r\n"), "{bye}");
    assert!(bye.contains(&format!(";tag={tag}")), "{bye}");
    assert!(bye.contains("CSeq: 1 BYE\r\n"), "{bye}");
}
