//! The RFC 4475 torture messages (tests/data/rfc4475/, byte-exact) fed to the user agent
//! while a call is up: each valid one gets a sensible answer, each invalid one a 400 whose
//! reason says what is wrong (or the specific code RFC 4475 names), responses and non-SIP
//! are dropped without an answer, and the call that was up still ends cleanly afterwards.

use super::*;

const PEER: &str = "198.51.100.9:5060";
const LOCAL: &str = "203.0.113.1:5060";
const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/rfc4475");

const OFFER: &str = "v=0\r\no=c 1 1 IN IP4 198.51.100.9\r\ns=-\r\nc=IN IP4 198.51.100.9\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n";

/// What a message must get.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// This final response (and nothing else but a 100).
    Status(u16),
    /// A 400 whose reason phrase contains this text.
    BadRequest(&'static str),
    /// 100 Trying and a new incoming call for the layer above.
    IncomingCall,
    /// No answer at all (a response matching no transaction, or not SIP).
    Nothing,
}

use Expect::*;

/// Our verdicts; RFC 4475's section in the comment.
const CASES: &[(&str, Expect)] = &[
    // 3.1.1 valid messages
    ("TC_WSINV.dat", Status(481)), // 3.1.1.1: parsed; its To tag names no dialog of ours
    ("TC_INTMETH.dat", Status(501)), // 3.1.1.2: an extension method we do not implement
    ("TC_ESC01_V.dat", IncomingCall), // 3.1.1.3
    ("TC_ESCNULL_V.dat", Status(405)), // 3.1.1.4: REGISTER is not served here
    ("TC_ESC02_V.dat", Status(501)), // 3.1.1.5: RE%47IST%45R is not REGISTER
    ("TC_LWSDISP_V.dat", Status(200)), // 3.1.1.6
    ("TC_LONGREQ_V.dat", IncomingCall), // 3.1.1.7
    ("TC_DBLREQ.dat", Status(405)), // 3.1.1.8: the octets after the REGISTER are dropped
    ("TC_SEMIURI_V.dat", Status(200)), // 3.1.1.9
    ("TC_TRANSPORTS_V.dat", Status(200)), // 3.1.1.10
    ("TC_MPART01.dat", Status(405)), // 3.1.1.11: MESSAGE to us outside a dialog
    ("TC_UNREASON_V.dat", Nothing), // 3.1.1.12: a response to nothing we sent
    ("TC_NOREASON_V.dat", Nothing), // 3.1.1.13
    // 3.1.2 invalid messages
    ("TC_BADINV01_I.dat", BadRequest("Via")), // 3.1.2.1
    ("TC_CLERR_I.dat", BadRequest("Content-Length")), // 3.1.2.2
    ("TC_NCL_I.dat", BadRequest("Content-Length")), // 3.1.2.3
    ("TC_SCALAR02_V.dat", BadRequest("CSeq")), // 3.1.2.4
    ("TC_SCALARLG_V.dat", Nothing),           // 3.1.2.5: a response
    ("TC_QUOTBAL_I.dat", BadRequest("To")),   // 3.1.2.6
    ("TC_LTGTRURI_I.dat", BadRequest("angle brackets")), // 3.1.2.7
    ("TC_LWSRURI_I.dat", BadRequest("start line")), // 3.1.2.8
    ("TC_LWSSTART_V.dat", BadRequest("start line")), // 3.1.2.9
    ("TC_TRWS_I.dat", BadRequest("start line")), // 3.1.2.10
    ("TC_ESCRURI_V.dat", BadRequest("Request-URI")), // 3.1.2.11
    ("TC_BADDATE_V.dat", IncomingCall),       // 3.1.2.12: the Date is not used, so accepted
    ("TC_REGBADCT_I.dat", BadRequest("Contact")), // 3.1.2.13
    ("TC_BADASPEC_I.dat", Status(200)),       // 3.1.2.14: the RFC lets a liberal UA accept
    ("TC_BADDN_I.dat", BadRequest("blank line")), // 3.1.2.15 (this copy has no header end)
    ("TC_BADVERS_V.dat", Status(505)),        // 3.1.2.16
    ("TC_MISMATCH01_V.dat", BadRequest("CSeq")), // 3.1.2.17
    ("TC_MISMATCH02_V.dat", Status(501)),     // 3.1.2.18
    ("TC_BIGCODE_V.dat", Nothing),            // 3.1.2.19: a response
    // 3.2 transaction layer, 3.3 application layer, 3.4 backward compatibility
    ("TC_BADBRANCH_V.dat", Status(200)),                // 3.2.1
    ("TC_INSUF_I.dat", BadRequest("missing")),          // 3.3.1
    ("TC_UNKSCM_V.dat", Status(416)),                   // 3.3.2
    ("TC_NOVELSC_V.dat", Status(416)),                  // 3.3.3
    ("TC_UNKSM2_V.dat", Status(405)),                   // 3.3.4
    ("TC_BEXT01_V.dat", Status(420)),                   // 3.3.5
    ("TC_INVUT_V.dat", Status(415)),                    // 3.3.6
    ("TC_REGAUT01_V.dat", Status(405)),                 // 3.3.7
    ("TC_MULTI01_I.dat", BadRequest("more than once")), // 3.3.8
    ("TC_MCL01_I.dat", BadRequest("Content-Length")),   // 3.3.9
    ("TC_BCAST_V.dat", Nothing),                        // 3.3.10: a response
    ("TC_ZEROMF_V.dat", Status(200)), // 3.3.11: we are the UAS, Max-Forwards 0 is fine
    ("TC_CPARAM01_V.dat", Status(405)), // 3.3.12
    ("TC_CPARAM02_V.dat", Status(405)), // 3.3.13
    ("TC_REGESCRT_V.dat", Status(405)), // 3.3.14
    ("TC_SDP01_V.dat", Status(406)),  // 3.3.15: Accept excludes the SDP we would answer
    ("TC_INV2543_I.dat", IncomingCall), // 3.4.1: RFC 2543 syntax, accepted
    ("TC_TEST_I.dat", Nothing),       // not an RFC message; no SIP version, nothing to answer
];

struct Ua {
    ua: UserAgent,
    now: Instant,
    sent: Vec<String>,
    events: Vec<UaEvent>,
}

impl Ua {
    fn new() -> Self {
        Ua {
            ua: UserAgent::new(UaConfig::default()),
            now: Instant::now(),
            sent: Vec::new(),
            events: Vec::new(),
        }
    }

    fn input(&mut self, bytes: &[u8]) {
        let peer = Target {
            addr: PEER.parse().unwrap(),
            transport: TransportKind::Udp,
        };
        self.ua
            .handle_input(bytes, peer, LOCAL.parse().unwrap(), self.now);
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(a) = self.ua.poll_action() {
            match a {
                Action::Send { bytes, .. } => {
                    self.sent.push(String::from_utf8_lossy(&bytes).into_owned())
                }
                Action::Event(e) => self.events.push(e),
                Action::ArmTimer { .. } => {}
            }
        }
    }

    fn take(&mut self) -> (Vec<String>, Vec<UaEvent>) {
        (
            std::mem::take(&mut self.sent),
            std::mem::take(&mut self.events),
        )
    }
}

fn status_line(msg: &str) -> &str {
    msg.lines().next().unwrap_or_default()
}

fn finals(sent: &[String]) -> Vec<&str> {
    sent.iter()
        .map(|s| status_line(s))
        .filter(|l| l.starts_with("SIP/2.0 ") && !l.starts_with("SIP/2.0 100 "))
        .collect()
}

fn dialog_request(method: &str, branch: &str, cseq: u32, to_tag: &str) -> String {
    format!(
        "{method} sip:callforge@203.0.113.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP {PEER};branch={branch}\r\nMax-Forwards: 70\r\nFrom: <sip:alice@198.51.100.9>;tag=a1\r\nTo: <sip:100@203.0.113.1>;tag={to_tag}\r\nCall-ID: up@198.51.100.9\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
    )
}

#[test]
fn every_torture_message_gets_its_answer_and_the_call_that_was_up_survives() {
    let mut h = Ua::new();
    // A call is up before the torture starts.
    let invite = format!(
        "INVITE sip:100@203.0.113.1 SIP/2.0\r\nVia: SIP/2.0/UDP {PEER};branch=z9hG4bKup1\r\nMax-Forwards: 70\r\nFrom: <sip:alice@198.51.100.9>;tag=a1\r\nTo: <sip:100@203.0.113.1>\r\nCall-ID: up@198.51.100.9\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@{PEER}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{OFFER}",
        OFFER.len()
    );
    h.input(invite.as_bytes());
    let (_, events) = h.take();
    let Some(UaEvent::IncomingCall(ic)) = events.first() else {
        panic!("{events:?}")
    };
    let call = ic.call;
    let media = MediaConfig::new("203.0.113.1".parse().unwrap(), 20000);
    h.ua.answer(call, &media, h.now).unwrap();
    h.drain();
    let (sent, _) = h.take();
    let tag = sent
        .iter()
        .find_map(|s| s.lines().find(|l| l.starts_with("To:")))
        .and_then(|to| to.split("tag=").nth(1))
        .unwrap()
        .trim()
        .to_string();
    h.input(dialog_request("ACK", "z9hG4bKupack", 1, &tag).as_bytes());
    h.take();

    let mut files: Vec<String> = std::fs::read_dir(CORPUS)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".dat"))
        .collect();
    files.sort();
    assert_eq!(files.len(), CASES.len(), "every corpus file has a verdict");
    let mut failures = Vec::new();
    for (file, expect) in CASES {
        assert!(files.iter().any(|f| f == file), "{file} is in the corpus");
        let bytes = std::fs::read(format!("{CORPUS}/{file}")).unwrap();
        h.input(&bytes);
        let (sent, events) = h.take();
        let got = finals(&sent);
        let incoming = events.iter().any(|e| matches!(e, UaEvent::IncomingCall(_)));
        let ok = match expect {
            Status(code) => {
                got.len() == 1 && got[0].starts_with(&format!("SIP/2.0 {code} ")) && !incoming
            }
            BadRequest(word) => {
                got.len() == 1
                    && got[0].starts_with("SIP/2.0 400 ")
                    && got[0].to_lowercase().contains(&word.to_lowercase())
                    && !incoming
            }
            IncomingCall => {
                incoming && got.is_empty() && sent.iter().any(|s| s.starts_with("SIP/2.0 100 "))
            }
            Nothing => sent.is_empty() && events.is_empty(),
        };
        if !ok {
            failures.push(format!(
                "{file}: wanted {expect:?}, sent {got:?} (incoming call: {incoming})"
            ));
        }
        // Specific headers the named codes promise.
        if let (Status(420), Some(resp)) = (expect, sent.first()) {
            assert!(
                resp.contains("Unsupported: nothingSupportsThis, nothingSupportsThisEither\r\n"),
                "{resp}"
            );
        }
        if let (Status(415 | 406), Some(resp)) = (expect, sent.first()) {
            assert!(resp.contains("Accept: application/sdp\r\n"), "{resp}");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The call that was up is untouched: its BYE is answered and ends it.
    h.input(dialog_request("BYE", "z9hG4bKupbye", 2, &tag).as_bytes());
    let (sent, events) = h.take();
    assert_eq!(finals(&sent), vec!["SIP/2.0 200 OK"]);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, UaEvent::CallEnded { call: c, .. } if *c == call)),
        "{events:?}"
    );
}

#[test]
fn keep_alives_get_no_answer() {
    let mut h = Ua::new();
    // A STUN Binding request (RFC 5389): type 0x0001, length 0, magic cookie, transaction id.
    let stun = [
        0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ];
    for ka in [&b"\r\n\r\n"[..], b"\r\n", b"\0\0\0\0", b" ", &stun] {
        h.input(ka);
        let (sent, events) = h.take();
        assert!(sent.is_empty() && events.is_empty(), "{ka:?}");
    }
}

#[test]
fn via_with_legal_white_space_is_accepted_and_answered_to_its_sent_by() {
    let mut h = Ua::new();
    let msg = "OPTIONS sip:203.0.113.1 SIP/2.0\r\nVia: SIP / 2.0 / UDP 198.51.100.9 : 5070 ; branch = z9hG4bKlws ; rport\r\nFrom: <sip:ping@x>;tag=p\r\nTo: <sip:203.0.113.1>\r\nCall-ID: lws1\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n";
    h.input(msg.as_bytes());
    let (sent, _) = h.take();
    assert_eq!(finals(&sent), vec!["SIP/2.0 200 OK"]);
    assert!(
        sent[0].contains("Via: SIP/2.0/UDP 198.51.100.9:5070;branch=z9hG4bKlws;rport="),
        "{}",
        sent[0]
    );
}

#[test]
fn options_with_an_unsupported_require_gets_420_and_a_supported_one_200() {
    let mut h = Ua::new();
    let opts = |branch: &str, require: &str| {
        format!("OPTIONS sip:203.0.113.1 SIP/2.0\r\nVia: SIP/2.0/UDP {PEER};branch={branch}\r\nFrom: <sip:ping@x>;tag=p\r\nTo: <sip:203.0.113.1>\r\nCall-ID: {branch}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nRequire: {require}\r\nContent-Length: 0\r\n\r\n")
    };
    h.input(opts("z9hG4bKr1", "100rel, foo").as_bytes());
    let (sent, _) = h.take();
    assert_eq!(finals(&sent), vec!["SIP/2.0 420 Bad Extension"]);
    assert!(
        sent[0].contains("Unsupported: 100rel, foo\r\n"),
        "{}",
        sent[0]
    );
    h.input(opts("z9hG4bKr2", "timer").as_bytes());
    let (sent, _) = h.take();
    assert_eq!(finals(&sent), vec!["SIP/2.0 200 OK"]);
}

#[test]
fn the_two_dialog_creating_responses_copy_record_route_in_order() {
    let mut h = Ua::new();
    let invite = format!(
        "INVITE sip:100@203.0.113.1 SIP/2.0\r\nRecord-Route: <sip:p2.example;lr>\r\nVia: SIP/2.0/UDP 192.0.2.7;branch=z9hG4bKproxy\r\nVia: SIP/2.0/UDP {PEER};branch=z9hG4bKrr\r\nRecord-Route: <sip:p1.example;lr;ftag=x>\r\nMax-Forwards: 69\r\nFrom: <sip:alice@198.51.100.9>;tag=a1\r\nTo: <sip:100@203.0.113.1>\r\nCall-ID: rr@198.51.100.9\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@{PEER}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{OFFER}",
        OFFER.len()
    );
    h.input(invite.as_bytes());
    let (sent, events) = h.take();
    assert!(
        !sent[0].contains("Record-Route"),
        "not on the 100: {}",
        sent[0]
    );
    let Some(UaEvent::IncomingCall(ic)) = events.first() else {
        panic!("{events:?}")
    };
    let call = ic.call;
    let media = MediaConfig::new("203.0.113.1".parse().unwrap(), 20000);
    h.ua.ring(call, Some(&media), h.now).unwrap();
    h.ua.answer(call, &media, h.now).unwrap();
    h.drain();
    let (sent, _) = h.take();
    assert_eq!(finals(&sent).len(), 2, "183 and 200");
    for resp in &sent {
        assert!(
            resp.contains(
                "Record-Route: <sip:p2.example;lr>\r\nRecord-Route: <sip:p1.example;lr;ftag=x>\r\n"
            ),
            "{resp}"
        );
    }
    let tag = sent[1]
        .lines()
        .find(|l| l.starts_with("To:"))
        .and_then(|to| to.split("tag=").nth(1))
        .unwrap()
        .trim()
        .to_string();
    let ack = format!("ACK sip:callforge@203.0.113.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.7;branch=z9hG4bKproxyack\r\nVia: SIP/2.0/UDP {PEER};branch=z9hG4bKrrack\r\nMax-Forwards: 69\r\nFrom: <sip:alice@198.51.100.9>;tag=a1\r\nTo: <sip:100@203.0.113.1>;tag={tag}\r\nCall-ID: rr@198.51.100.9\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n");
    h.input(ack.as_bytes());
    h.take();
    // Our own BYE follows the route set toward the first proxy.
    h.ua.hangup(call, h.now).unwrap();
    h.drain();
    let (sent, _) = h.take();
    let bye = sent.iter().find(|s| s.starts_with("BYE ")).unwrap();
    assert!(
        bye.contains("Route: <sip:p2.example;lr>\r\nRoute: <sip:p1.example;lr;ftag=x>\r\n"),
        "{bye}"
    );
}
