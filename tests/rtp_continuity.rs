//! RTP continuity across hand-overs, seen from real sockets: the in-repo caller and callee
//! record every packet callforge sends them. Toward the caller, one SSRC keeps one sequence
//! and one timeline through answer -> prompt -> ringback -> bridge (relay) -> back to the
//! script's media -> prompt, and through a bridge placed before answering (on 183 early
//! media, or on the callee's 200); toward the callee, the relayed stream starts with a
//! marker bit of its own.

mod caller;
mod sip_support;

use std::{collections::BTreeSet, path::Path, time::Duration};

use caller::{AcceptOpts, Call, Callee, Codec, Received};
use sip_support::Server;

const SECOND: Duration = Duration::from_secs(1);

const ROUTE: &str = r#"
[[route]]
match = "^relay$"
script = "prompt_bridge_prompt.js"
mode = "class5"
"#;

fn server() -> Server {
    let media = Path::new(sip_support::ROOT).join("media");
    sip_support::start_logging(
        &format!("[media]\ndir = \"{}\"\n{ROUTE}", media.display()),
        std::env::var("RTP_LOG").ok().as_deref().map(Path::new),
    )
}

/// A 400 Hz tone, `ms` long.
fn tone(ms: usize) -> Vec<i16> {
    (0..ms * 8)
        .map(|i| ((i as f64 * 400.0 * std::f64::consts::TAU / 8000.0).sin() * 6000.0) as i16)
        .collect()
}

/// One SSRC; every packet the next sequence number; timestamps rising, and following the
/// arrival times (a jump to a random timeline would be seconds to hours off).
fn assert_one_continuous_stream(what: &str, pkts: &[Received]) {
    assert!(pkts.len() > 50, "{what}: only {} packets", pkts.len());
    let ssrcs: BTreeSet<u32> = pkts.iter().map(|p| p.ssrc).collect();
    assert_eq!(ssrcs.len(), 1, "{what}: SSRCs {ssrcs:x?}");
    for (i, w) in pkts.windows(2).enumerate() {
        let (a, b) = (&w[0], &w[1]);
        assert_eq!(
            b.seq,
            a.seq.wrapping_add(1),
            "{what}: sequence {} -> {} at packet {} (ts {} -> {}, marker {})",
            a.seq,
            b.seq,
            i + 1,
            a.ts,
            b.ts,
            b.marker
        );
        let step = b.ts.wrapping_sub(a.ts) as i32;
        assert!(
            step > 0,
            "{what}: timestamp {} -> {} at packet {}",
            a.ts,
            b.ts,
            i + 1
        );
    }
    let first = &pkts[0];
    for (i, p) in pkts.iter().enumerate() {
        let ts_ms = p.ts.wrapping_sub(first.ts) as f64 / 8.0;
        let at_ms = (p.at - first.at).as_secs_f64() * 1000.0;
        assert!(
            (ts_ms - at_ms).abs() < 500.0,
            "{what}: packet {i} has timestamp {ts_ms:.0} ms into the stream but arrived at {at_ms:.0} ms"
        );
    }
}

#[tokio::test]
async fn answer_prompt_ringback_bridge_and_prompt_again_is_one_stream_for_the_caller() {
    let server = server();
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let to = callee.uri("4001");
    let headers = [("X-Bridge-To", to.as_str())];
    let mut call = Call::place_with(server.udp, "relay", &headers)
        .await
        .unwrap();
    let far = async {
        // Rings (the caller hears ringback), answers, talks, hangs up: the script goes on.
        let invite = callee.accept(AcceptOpts::answer_after(700)).await.unwrap();
        assert_eq!(invite.header("X-Leg"), Some("b"));
        let port = callee.sip_addr().port();
        assert!(
            invite.to.contains(&format!(":{port}")),
            "the B leg's To names the callee's port: {}",
            invite.to
        );
        callee.send_audio(&tone(1500)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(callee.bye().await.unwrap(), 200);
    };
    // The caller talks all along, so the bridge starts in the middle of its talk spurt.
    let talk = tone(6000);
    tokio::join!(call.send_audio(&talk), far);
    assert!(
        call.wait_for_bye(15 * SECOND).await.is_some(),
        "the script's closing prompt and BYE"
    );
    let heard = call.audio_packets();
    // Welcome (1.8 s), ringback, the callee (1.5 s), goodbye (2.7 s): well over 250 packets.
    assert!(heard.len() > 250, "{} packets", heard.len());
    assert_one_continuous_stream("toward the caller", &heard);

    let relayed = callee.audio_packets();
    assert!(
        relayed.first().is_some_and(|p| p.marker),
        "the B leg's stream starts with its own marker bit, not a copy of the caller's"
    );
    assert!(
        relayed.iter().skip(1).all(|p| !p.marker),
        "no other marker toward the callee: the caller talked without a pause"
    );
    assert_one_continuous_stream("toward the callee", &relayed);
}

#[tokio::test]
async fn a_bridge_before_answer_with_early_media_then_a_prompt_is_one_stream_for_the_caller() {
    let server = server();
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let to = callee.uri("4002");
    let headers = [("X-Bridge-To", to.as_str()), ("X-Bridge-Answer", "no")];
    let place = Call::place_with(server.udp, "relay", &headers);
    let far = async {
        callee.wait_for_invite(5 * SECOND).await.unwrap();
        // 183 with SDP: callforge answers the caller's INVITE with a 183 of its own (its
        // session starts sending), then relays the callee's early media.
        callee.ring(true).await.unwrap();
        callee.send_audio(&tone(1000)).await;
        callee.answer().await.unwrap();
        callee.send_audio(&tone(1000)).await;
        assert_eq!(callee.bye().await.unwrap(), 200);
    };
    let (call, ()) = tokio::join!(place, far);
    let call = call.unwrap();
    assert!(
        call.wait_for_bye(15 * SECOND).await.is_some(),
        "the script's closing prompt and BYE"
    );
    let heard = call.audio_packets();
    assert!(heard.len() > 200, "{} packets", heard.len());
    assert_one_continuous_stream("toward the caller", &heard);
}

#[tokio::test]
async fn a_bridge_the_callees_answer_answers_then_a_prompt_is_one_stream_for_the_caller() {
    // No early media: the callee's 200 answers the caller (whose session starts and hands
    // over to the relay at once); when the callee hangs up the script's prompt follows.
    let server = server();
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let to = callee.uri("4003");
    let headers = [("X-Bridge-To", to.as_str()), ("X-Bridge-Answer", "no")];
    let place = Call::place_with(server.udp, "relay", &headers);
    let far = async {
        callee.accept(AcceptOpts::answer_after(300)).await.unwrap();
        callee.send_audio(&tone(1500)).await;
        assert_eq!(callee.bye().await.unwrap(), 200);
    };
    let (call, ()) = tokio::join!(place, far);
    let call = call.unwrap();
    assert!(
        call.wait_for_bye(15 * SECOND).await.is_some(),
        "the script's closing prompt and BYE"
    );
    let heard = call.audio_packets();
    assert!(heard.len() > 150, "{} packets", heard.len());
    assert_one_continuous_stream("toward the caller", &heard);
}
