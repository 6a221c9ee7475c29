//! The far-end test peers, checked without callforge: the in-repo caller talks straight to
//! the in-repo callee, SIPp callers drive the callee, and small SIPp callers (or the in-repo
//! caller) drive each SIPp far end in `tests/sipp/uas_*.xml`.

mod caller;
mod sip_support;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use caller::{
    alaw_to_linear, best_correlation, linear_to_alaw, pcap_audio, pcap_rtp, read_wav, sdp_body,
    AcceptOpts, Call, Callee, Codec, Invite, Outcome, Sdp, SIPP_G711A_PCAP,
};
use sip_support::{assert_all_ok, sipp, sipp_uas};

const SECOND: Duration = Duration::from_secs(1);

fn prompt(name: &str) -> Vec<i16> {
    read_wav(&Path::new(sip_support::ROOT).join("media/ivr").join(name)).unwrap()
}

/// Polls `cond` every 10 ms for at most `within` (the awaited thing is a packet count or a
/// recorded request, which has no event of its own).
async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The middle of `reference` must be found in `heard` with a normalised correlation > 0.9.
fn assert_heard(heard: &[i16], reference: &[i16], what: &str) {
    let middle = &reference[1600..reference.len() - 1600];
    let (score, at) = best_correlation(heard, middle);
    assert!(
        score > 0.9,
        "{what}: correlation {score:.3} at {at} ({} samples heard, {} in the reference)",
        heard.len(),
        middle.len()
    );
}

/// The next SIP message on a raw socket (within a second).
async fn recv_sip(sock: &tokio::net::UdpSocket) -> caller::SipMessage {
    let mut buf = vec![0u8; 65536];
    let (n, _) = tokio::time::timeout(SECOND, sock.recv_from(&mut buf))
        .await
        .expect("a SIP message within a second")
        .unwrap();
    caller::SipMessage::parse(&buf[..n]).unwrap()
}

/// A caller offering `offer` places a call to a callee answering in `codec` after 100 ms.
async fn connect(codec: Codec, offer: &[Codec]) -> (Call, Callee, Invite) {
    let mut callee = Callee::listen(codec).await;
    let addr = callee.sip_addr();
    let (call, invite) = tokio::join!(
        Call::place_offering(addr, "5551234", offer, &[]),
        callee.accept(AcceptOpts::answer_after(100))
    );
    (call.unwrap(), callee, invite.unwrap())
}

// ---------------------------------------------------------------- codecs and references

#[test]
fn alaw_matches_the_g711_reference_points() {
    // Encoder outputs of an independent G.711 implementation (CPython's audioop.lin2alaw).
    let encoded = [
        (0, 0xd5),
        (7, 0xd5),
        (8, 0xd5),
        (-1, 0x55),
        (-8, 0x55),
        (-9, 0x55),
        (100, 0xd3),
        (-100, 0x53),
        (1000, 0xfa),
        (-1000, 0x7a),
        (4095, 0x9a),
        (-4096, 0x1a),
        (12345, 0xbd),
        (-12345, 0x3d),
        (32767, 0xaa),
        (-32768, 0x2a),
    ];
    for (linear, code) in encoded {
        assert_eq!(linear_to_alaw(linear), code, "encode {linear}");
    }
    // Decoder outputs: the middle of each interval, full scale 32256 (audioop.alaw2lin).
    let decoded = [
        (0xd5, 8),
        (0x55, -8),
        (0xaa, 32256),
        (0x2a, -32256),
        (0xfa, 1008),
        (0x80, 5504),
        (0x00, -5504),
        (0xff, 848),
        (0x7f, -848),
    ];
    for (code, linear) in decoded {
        assert_eq!(alaw_to_linear(code), linear, "decode {code:#04x}");
    }
    // Every code decodes to a value that encodes back to the same code.
    for code in 0..=255u8 {
        assert_eq!(
            linear_to_alaw(alaw_to_linear(code)),
            code,
            "code {code:#04x}"
        );
    }
}

#[test]
fn the_sipp_pcap_reads_as_thirty_millisecond_alaw() {
    let packets = pcap_rtp(Path::new(SIPP_G711A_PCAP)).unwrap();
    assert_eq!(packets.len(), 236);
    assert!(packets.iter().all(|p| p.pt == 8 && p.payload.len() == 240));
    let audio = pcap_audio(Path::new(SIPP_G711A_PCAP)).unwrap();
    assert_eq!(audio.len(), 236 * 240);
    let loudest = audio.iter().map(|s| s.unsigned_abs()).max().unwrap();
    assert!(
        loudest > 1000,
        "the recording is not silence: peak {loudest}"
    );
}

#[test]
fn sdp_offers_are_read_with_dynamic_and_static_payload_types() {
    let sdp = Sdp::parse(
        "v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio 40000 RTP/AVP 0 96 8 97\r\na=rtpmap:96 opus/48000/2\r\n\
         a=rtpmap:97 telephone-event/8000\r\na=sendonly\r\n",
    )
    .unwrap();
    assert_eq!(sdp.rtp, Some("127.0.0.1:40000".parse().unwrap()));
    assert_eq!(sdp.pt_for(Codec::Pcmu), Some(0));
    assert_eq!(sdp.pt_for(Codec::Pcma), Some(8));
    assert_eq!(sdp.telephone_event(), Some(97));
    assert_eq!(sdp.direction, "sendonly");
    assert_eq!(sdp.first_codec(), Some((Codec::Pcmu, 0)));
}

// ---------------------------------------------------------------- caller <-> callee

#[tokio::test]
async fn caller_and_callee_hear_each_other() {
    let (mut call, mut callee, invite) = connect(Codec::Pcmu, &[Codec::Pcmu]).await;
    assert_eq!(invite.outcome, Outcome::Answered);
    assert_eq!(invite.user(), "5551234");
    assert_eq!(invite.header("call-id"), Some(call.call_id.as_str()));
    assert_eq!(invite.offer.as_ref().unwrap().pt_for(Codec::Pcmu), Some(0));
    assert!(callee.acked(), "the caller ACKed the 200");
    assert_eq!(call.codec, Codec::Pcmu);

    let (welcome, goodbye) = (prompt("welcome.wav"), prompt("goodbye.wav"));
    tokio::join!(call.send_audio(&welcome), callee.send_audio(&goodbye));
    let (up, down) = (welcome.len() / 160, goodbye.len() / 160);
    assert!(
        eventually(SECOND, || callee.audio_packets().len() >= up
            && call.audio_packets().len() >= down)
        .await,
        "all packets arrive"
    );
    assert_heard(
        &callee.received_audio(),
        &welcome,
        "callee hears the caller",
    );
    assert_heard(&call.received_audio(), &goodbye, "caller hears the callee");
    assert_eq!(call.bye().await, Ok(200));
}

#[tokio::test]
async fn digits_cross_in_both_directions_once_per_event() {
    let (mut call, mut callee, _) = connect(Codec::Pcmu, &[Codec::Pcmu]).await;
    tokio::join!(call.send_digits("123#"), callee.send_digits("*09D"));
    assert!(
        eventually(SECOND, || callee.received_digits() == "123#"
            && call.received_digits() == "*09D")
        .await,
        "callee got {:?}, caller got {:?}",
        callee.received_digits(),
        call.received_digits()
    );
}

#[tokio::test]
async fn caller_hangs_up_and_the_callee_sees_the_bye() {
    let (mut call, callee, _) = connect(Codec::Pcmu, &[Codec::Pcmu]).await;
    assert_eq!(call.bye().await, Ok(200));
    let bye = callee
        .wait_for_bye(SECOND)
        .await
        .expect("BYE reached the callee");
    assert_eq!(bye.header("Call-ID"), Some(call.call_id.as_str()));
}

#[tokio::test]
async fn callee_hangs_up_and_the_caller_sees_the_bye() {
    let (call, mut callee, _) = connect(Codec::Pcmu, &[Codec::Pcmu]).await;
    assert_eq!(callee.bye().await, Ok(200));
    let bye = call
        .wait_for_bye(SECOND)
        .await
        .expect("BYE reached the caller");
    assert_eq!(bye.header("Call-ID"), Some(call.call_id.as_str()));
}

#[tokio::test]
async fn a_pcma_callee_picks_pcma_from_a_pcmu_pcma_offer_and_audio_survives() {
    let (mut call, mut callee, invite) = connect(Codec::Pcma, &[Codec::Pcmu, Codec::Pcma]).await;
    assert_eq!(invite.offer.as_ref().unwrap().payloads, vec![0, 8, 101]);
    assert_eq!((call.codec, call.audio_pt), (Codec::Pcma, 8));

    let (welcome, goodbye) = (prompt("welcome.wav"), prompt("goodbye.wav"));
    tokio::join!(call.send_audio(&welcome), callee.send_audio(&goodbye));
    let (up, down) = (welcome.len() / 160, goodbye.len() / 160);
    assert!(
        eventually(SECOND, || callee.audio_packets().len() >= up
            && call.audio_packets().len() >= down)
        .await,
        "all packets arrive as payload type 8"
    );
    assert_heard(&callee.received_audio(), &welcome, "callee hears A-law");
    assert_heard(&call.received_audio(), &goodbye, "caller hears A-law");
}

#[tokio::test]
async fn a_reinvite_to_hold_gets_our_sdp_with_the_direction_mirrored() {
    let (call, mut callee, invite) = connect(Codec::Pcmu, &[Codec::Pcmu]).await;
    let sip = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let moved_rtp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = sip.local_addr().unwrap();
    let offer = sdp_body(
        "caller",
        2,
        moved_rtp.local_addr().unwrap(),
        &[(0, Codec::Pcmu)],
        Some(101),
        "sendonly",
    );
    let head = |method: &str| {
        format!(
            "{method} sip:callee@{} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK{method}2\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: 2 {method}\r\n",
            callee.sip_addr(),
            invite.from,
            call.to_header,
            call.call_id
        )
    };
    let reinvite = format!(
        "{}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{offer}",
        head("INVITE"),
        offer.len()
    );
    sip.send_to(reinvite.as_bytes(), callee.sip_addr())
        .await
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let (n, _) = tokio::time::timeout(SECOND, sip.recv_from(&mut buf))
        .await
        .expect("an answer to the re-INVITE")
        .unwrap();
    let ok = caller::SipMessage::parse(&buf[..n]).unwrap();
    assert_eq!(ok.status(), Some(200), "{}", ok.first_line);
    let answer = Sdp::parse(&ok.body).unwrap();
    assert_eq!(answer.direction, "recvonly");
    assert!(
        ok.body.contains("o=callee 1 2 "),
        "version bumped: {}",
        ok.body
    );
    let ack = format!("{}Content-Length: 0\r\n\r\n", head("ACK"));
    sip.send_to(ack.as_bytes(), callee.sip_addr())
        .await
        .unwrap();
    assert!(callee
        .requests()
        .iter()
        .any(|r| r.method() == Some("INVITE")));
    // Media now goes to the address of the new offer.
    callee.send_audio(&prompt("welcome.wav")[..800]).await;
    let (n, _) = tokio::time::timeout(SECOND, moved_rtp.recv_from(&mut buf))
        .await
        .expect("RTP at the re-INVITE's address")
        .unwrap();
    assert_eq!(n, 12 + 160);
}

#[tokio::test]
async fn a_retransmitted_invite_is_one_call_and_gets_the_last_response_again() {
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let target = callee.sip_addr();
    let sip = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = sip.local_addr().unwrap();
    let offer = sdp_body("raw", 1, local, &[(0, Codec::Pcmu)], None, "sendrecv");
    let head = |method: &str, to: &str| {
        format!(
            "{method} sip:5551234@{target} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKraw1\r\nFrom: <sip:raw@{local}>;tag=r1\r\nTo: {to}\r\nCall-ID: raw-retransmit\r\nCSeq: 1 {method}\r\n"
        )
    };
    let invite = format!(
        "{}Contact: <sip:raw@{local}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{offer}",
        head("INVITE", &format!("<sip:5551234@{target}>")),
        offer.len()
    );
    let raw_caller = async {
        sip.send_to(invite.as_bytes(), target).await.unwrap();
        sip.send_to(invite.as_bytes(), target).await.unwrap();
        let mut statuses = Vec::new();
        let ok = loop {
            let r = recv_sip(&sip).await;
            statuses.push(r.status().unwrap());
            if r.status() == Some(200) {
                break r;
            }
        };
        // The 200 was lost, say: the INVITE again gets the 200 again.
        sip.send_to(invite.as_bytes(), target).await.unwrap();
        let again = recv_sip(&sip).await;
        assert_eq!(again.status(), Some(200));
        assert_eq!(again.header("To"), ok.header("To"));
        let to = ok.header("To").unwrap().to_string();
        let ack = format!("{}Content-Length: 0\r\n\r\n", head("ACK", &to));
        sip.send_to(ack.as_bytes(), target).await.unwrap();
        statuses
    };
    let (invite, statuses) = tokio::join!(callee.accept(AcceptOpts::default()), raw_caller);
    assert_eq!(invite.unwrap().outcome, Outcome::Answered);
    assert_eq!(statuses, vec![100, 180, 200]);
    let second = callee.wait_for_invite(Duration::from_millis(300)).await;
    assert!(second.is_err(), "the retransmissions made no second call");
}

#[tokio::test]
async fn a_pcma_callee_refuses_a_pcmu_only_offer_with_488() {
    let mut callee = Callee::listen(Codec::Pcma).await;
    let addr = callee.sip_addr();
    let (call, invite) = tokio::join!(
        Call::place(addr, "5551234"),
        callee.accept(AcceptOpts::default())
    );
    let err = invite.unwrap_err();
    assert!(err.contains("lacks PCMA"), "{err}");
    let err = call.err().expect("the call fails");
    assert!(err.contains("488"), "{err}");
}

#[tokio::test]
async fn callee_rejects_with_the_code_asked_for() {
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let addr = callee.sip_addr();
    let (call, invite) = tokio::join!(
        Call::place(addr, "5551234"),
        callee.accept(AcceptOpts::reject(486, 50))
    );
    assert_eq!(invite.unwrap().outcome, Outcome::Rejected(486));
    let err = call.err().expect("the call fails");
    assert!(err.contains("486 Busy Here"), "{err}");
    assert!(callee.acked(), "the caller ACKed the 486");
}

#[tokio::test]
async fn early_media_reaches_the_caller_before_the_answer() {
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let addr = callee.sip_addr();
    let welcome = prompt("welcome.wav");
    let far_end = async {
        let invite = callee.wait_for_invite(10 * SECOND).await?;
        callee.ring(true).await?;
        callee.send_audio(&welcome).await;
        callee.answer().await.map(|()| invite)
    };
    let (call, invite) = tokio::join!(Call::place(addr, "early"), far_end);
    let (call, _) = (call.unwrap(), invite.unwrap());
    let expected = welcome.len() / 160;
    assert!(eventually(SECOND, || call.audio_packets().len() >= expected).await);
    assert_heard(&call.received_audio(), &welcome, "early media");
}

#[tokio::test]
async fn a_sipp_caller_cancels_and_the_callee_reports_it() {
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let addr = callee.sip_addr();
    let sipp_run = tokio::task::spawn_blocking(move || sipp("class5_cancel", addr, "5002", 1, &[]));
    let invite = callee
        .accept(AcceptOpts::ring_until_cancel())
        .await
        .unwrap();
    assert_eq!(invite.outcome, Outcome::Cancelled);
    assert!(callee.wait_for_cancel(Duration::ZERO).await.is_some());
    assert_all_ok(&sipp_run.await.unwrap(), 1);
    assert!(callee.acked(), "SIPp ACKed the 487");
}

#[tokio::test]
async fn a_sipp_caller_with_rtp_echo_hears_the_callee_and_hangs_up() {
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let addr = callee.sip_addr();
    let sipp_run = tokio::task::spawn_blocking(move || {
        sipp("uac_call", addr, "5551234", 1, &["-d", "4000", "-rtp_echo"])
    });
    let invite = callee.accept(AcceptOpts::answer_after(50)).await.unwrap();
    assert_eq!(
        invite.offer.as_ref().unwrap().first_codec(),
        Some((Codec::Pcmu, 0))
    );
    let goodbye = prompt("goodbye.wav"); // 2.7 s, inside SIPp's 4 s pause before its BYE
    callee.send_audio(&goodbye).await;
    let expected = goodbye.len() / 160;
    assert!(
        eventually(SECOND, || callee.audio_packets().len() >= expected).await,
        "{} of {expected} packets echoed",
        callee.audio_packets().len()
    );
    assert_heard(&callee.received_audio(), &goodbye, "SIPp's echo");
    assert!(callee.wait_for_bye(10 * SECOND).await.is_some());
    assert_all_ok(&sipp_run.await.unwrap(), 1);
}

// ---------------------------------------------------------------- SIPp far ends

#[tokio::test]
async fn uas_answer_plays_the_alaw_pcap_to_the_caller() {
    let uas = sipp_uas("uas_answer", &[]);
    let mut call = Call::place_offering(uas.addr(), "5551234", &[Codec::Pcmu, Codec::Pcma], &[])
        .await
        .unwrap();
    assert_eq!((call.codec, call.audio_pt), (Codec::Pcma, 8));
    // 70 packets of 30 ms: the first 2.1 s of the recording.
    assert!(
        eventually(5 * SECOND, || call.audio_packets().len() >= 70).await,
        "pcap audio arrives: {} packets",
        call.audio_packets().len()
    );
    let reference = pcap_audio(Path::new(SIPP_G711A_PCAP)).unwrap();
    assert_heard(&call.received_audio(), &reference[..14_400], "the pcap");
    assert_eq!(call.bye().await, Ok(200));
    uas.finish_async(10 * SECOND).await.unwrap();
}

#[test]
fn uas_answer_with_a_sipp_caller() {
    let uas = sipp_uas("uas_answer", &[]);
    assert_all_ok(
        &sipp("uac_call", uas.addr(), "5551234", 1, &["-d", "300"]),
        1,
    );
    uas.finish(10 * SECOND).unwrap();
}

#[test]
fn uas_answer_fails_when_the_offer_lacks_pcma() {
    let uas = sipp_uas("uas_answer", &["-timeout", "10s"]);
    // uac_busy offers PCMU only.
    let _ = sipp("uac_busy", uas.addr(), "5551234", 1, &["-timeout", "3s"]);
    let err = uas.finish(15 * SECOND).unwrap_err();
    assert!(err.contains("regexp"), "{err}");
}

#[test]
fn uas_answer_then_bye_hangs_up_after_the_pause() {
    let uas = sipp_uas("uas_answer_then_bye", &["-d", "300"]);
    assert_all_ok(&sipp("class5_script_bye", uas.addr(), "5551234", 1, &[]), 1);
    uas.finish(10 * SECOND).unwrap();
}

#[tokio::test]
async fn uas_answer_then_bye_hangs_up_on_the_in_repo_caller() {
    let uas = sipp_uas("uas_answer_then_bye", &["-d", "200"]);
    let call = Call::place(uas.addr(), "5551234").await.unwrap();
    let bye = call.wait_for_bye(5 * SECOND).await.expect("SIPp hangs up");
    assert_eq!(bye.header("Call-ID"), Some(call.call_id.as_str()));
    uas.finish_async(10 * SECOND).await.unwrap();
}

#[test]
fn uas_busy_answers_486() {
    let uas = sipp_uas("uas_busy", &[]);
    assert_all_ok(&sipp("uac_busy", uas.addr(), "5551234", 1, &[]), 1);
    uas.finish(10 * SECOND).unwrap();
}

#[test]
fn uas_noanswer_rings_until_cancel() {
    let uas = sipp_uas("uas_noanswer", &[]);
    assert_all_ok(&sipp("class5_cancel", uas.addr(), "5551234", 1, &[]), 1);
    uas.finish(10 * SECOND).unwrap();
}

fn auth_run(scenario: &str, uas_args: &[&str], user: &str, password: &str) -> Result<(), String> {
    let uas = sipp_uas(scenario, uas_args);
    let auth_uri = format!("5000@{}", uas.addr()); // SIPp puts "sip:" in front itself
    let _ = sipp(
        "uac_auth",
        uas.addr(),
        "5000",
        1,
        &[
            "-au",
            user,
            "-ap",
            password,
            "-auth_uri",
            &auth_uri,
            "-timeout",
            "5s",
        ],
    );
    uas.finish(10 * SECOND)
}

#[test]
fn uas_auth_challenges_with_407_and_checks_the_proxy_authorization() {
    auth_run("uas_auth", &["-set", "user", "alice"], "alice", "s3cret").unwrap();
    let err = auth_run("uas_auth", &["-set", "user", "alice"], "bob", "s3cret").unwrap_err();
    assert!(
        err.contains("username \"bob\", expected \"alice\""),
        "{err}"
    );
}

#[test]
fn uas_auth_401_verifies_the_digest_response() {
    let creds = ["-set", "user", "alice", "-set", "pass", "s3cret"];
    auth_run("uas_auth_401", &creds, "alice", "s3cret").unwrap();
    let err = auth_run("uas_auth_401", &creds, "alice", "wrong").unwrap_err();
    assert!(err.contains("not the MD5 digest"), "{err}");
}

#[test]
fn a_uas_scenario_fails_when_its_invite_never_comes() {
    let uas = sipp_uas("uas_busy", &["-timeout", "2s"]);
    let err = uas.finish(10 * SECOND).unwrap_err();
    assert!(err.contains("exit status"), "{err}");
}
