//! Hold while bridged, end to end: the in-repo caller puts a bridged call on hold with a
//! `sendonly` re-INVITE and takes it back with `sendrecv`. callforge answers each correctly,
//! stops relaying the callee's audio to the caller while it is held, passes the hold and the
//! resume to the callee as re-INVITEs, and the caller's stream stays one stream throughout.

mod caller;
mod sip_support;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use caller::{AcceptOpts, Call, Callee, Codec, Received};
use sip_support::Server;

const SECOND: Duration = Duration::from_secs(1);

const ROUTE: &str = r#"
[[route]]
match = "^bridge$"
script = "bridge_to_header.js"
mode = "class5"
"#;

fn server() -> Server {
    let media = Path::new(sip_support::ROOT).join("media");
    sip_support::start_logging(
        &format!("[media]\ndir = \"{}\"\n{ROUTE}", media.display()),
        std::env::var("HOLD_LOG").ok().as_deref().map(Path::new),
    )
}

fn tone(ms: usize, hz: f64) -> Vec<i16> {
    (0..ms * 8)
        .map(|i| ((i as f64 * hz * std::f64::consts::TAU / 8000.0).sin() * 6000.0) as i16)
        .collect()
}

fn between(pkts: &[Received], from: Instant, to: Instant) -> usize {
    pkts.iter().filter(|p| p.at >= from && p.at < to).count()
}

/// Waits up to 3 s for the callee's `n`-th in-dialog INVITE and returns its body.
async fn nth_reinvite(callee: &Callee, n: usize) -> String {
    let until = Instant::now() + 3 * SECOND;
    loop {
        let invites: Vec<_> = callee
            .requests()
            .into_iter()
            .filter(|r| r.method() == Some("INVITE"))
            .collect();
        if let Some(r) = invites.get(n - 1) {
            return r.body.clone();
        }
        assert!(
            Instant::now() < until,
            "no re-INVITE #{n} reached the callee"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_caller_holding_a_bridged_call_is_sent_nothing_and_the_callee_is_told_both_ways() {
    let server = server();
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let to = callee.uri("5101");
    let headers = [("X-Bridge-To", to.as_str())];
    let (call, invite) = tokio::join!(
        Call::place_with(server.udp, "bridge", &headers),
        callee.accept(AcceptOpts::answer_after(100))
    );
    let mut call = call.unwrap();
    invite.unwrap();
    let (a, b) = (tone(1000, 400.0), tone(1000, 700.0));

    // Bridged: each side hears the other.
    let t0 = Instant::now();
    tokio::join!(call.send_audio(&a), callee.send_audio(&b));
    let t1 = Instant::now();
    assert!(
        between(&call.audio_packets(), t0, t1) > 30,
        "the caller hears the callee before the hold"
    );

    // A re-INVITE that keeps sendrecv (a session refresh) is not passed on: the callee's
    // first re-INVITE below is the hold.
    let refresh = call.reinvite("sendrecv").await.unwrap();
    assert_eq!(refresh.status(), Some(200));

    // Hold: answered recvonly, passed on as sendonly.
    let held = call.reinvite("sendonly").await.unwrap();
    assert_eq!(held.status(), Some(200), "{}", held.first_line);
    assert!(held.body.contains("a=recvonly"), "{}", held.body);
    let passed = nth_reinvite(&callee, 1).await;
    assert!(passed.contains("a=sendonly"), "hold passed on: {passed}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t2 = Instant::now();
    tokio::join!(call.send_audio(&a), callee.send_audio(&b));
    let t3 = Instant::now();
    assert_eq!(
        between(&call.audio_packets(), t2, t3),
        0,
        "nothing is relayed to the caller that holds"
    );
    assert!(
        between(&callee.audio_packets(), t2, t3) > 30,
        "the callee still hears the caller's side (music on hold)"
    );

    // Resume: answered sendrecv, passed on as sendrecv.
    let resumed = call.reinvite("sendrecv").await.unwrap();
    assert_eq!(resumed.status(), Some(200));
    assert!(resumed.body.contains("a=sendrecv"), "{}", resumed.body);
    let passed = nth_reinvite(&callee, 2).await;
    assert!(passed.contains("a=sendrecv"), "resume passed on: {passed}");
    let t4 = Instant::now();
    tokio::join!(call.send_audio(&a), callee.send_audio(&b));
    let t5 = Instant::now();
    assert!(
        between(&call.audio_packets(), t4, t5) > 30,
        "the caller hears the callee again"
    );

    // One stream toward the caller across the hold: one SSRC, no sequence gap.
    let heard = call.audio_packets();
    assert!(heard.iter().all(|p| p.ssrc == heard[0].ssrc));
    for w in heard.windows(2) {
        assert_eq!(
            w[1].seq,
            w[0].seq.wrapping_add(1),
            "sequence gap across the hold"
        );
    }
    let resumed_first = heard.iter().find(|p| p.at >= t3).unwrap();
    assert!(
        resumed_first.marker,
        "the resumed stream starts a talk spurt"
    );

    assert_eq!(call.bye().await.unwrap(), 200);
    assert!(callee.wait_for_bye(5 * SECOND).await.is_some());
}

#[tokio::test]
async fn a_callee_going_inactive_stops_the_relay_both_ways_and_the_caller_is_told() {
    let server = server();
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let to = callee.uri("5102");
    let headers = [("X-Bridge-To", to.as_str())];
    let (call, invite) = tokio::join!(
        Call::place_with(server.udp, "bridge", &headers),
        callee.accept(AcceptOpts::answer_after(100))
    );
    let mut call = call.unwrap();
    invite.unwrap();
    let (a, b) = (tone(600, 400.0), tone(600, 700.0));
    tokio::join!(call.send_audio(&a), callee.send_audio(&b));

    let held = callee.reinvite("inactive").await.unwrap();
    assert_eq!(held.status(), Some(200), "{}", held.first_line);
    assert!(held.body.contains("a=inactive"), "{}", held.body);
    // The caller is re-INVITEd inactive too.
    let until = Instant::now() + 3 * SECOND;
    while !call
        .requests
        .lock()
        .unwrap()
        .iter()
        .any(|r| r.method() == Some("INVITE") && r.body.contains("a=inactive"))
    {
        assert!(Instant::now() < until, "the hold did not reach the caller");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    // Both keep sending regardless: the relay must not pass anything either way.
    tokio::join!(call.send_audio(&a), callee.send_audio(&b));
    let t1 = Instant::now();
    assert_eq!(
        between(&callee.audio_packets(), t0, t1),
        0,
        "to the inactive callee"
    );
    assert_eq!(
        between(&call.audio_packets(), t0, t1),
        0,
        "from the inactive callee"
    );

    let resumed = callee.reinvite("sendrecv").await.unwrap();
    assert_eq!(resumed.status(), Some(200));
    let t2 = Instant::now();
    tokio::join!(call.send_audio(&a), callee.send_audio(&b));
    let t3 = Instant::now();
    assert!(between(&callee.audio_packets(), t2, t3) > 15);
    assert!(between(&call.audio_packets(), t2, t3) > 15);
    assert!(call
        .requests
        .lock()
        .unwrap()
        .iter()
        .any(|r| r.method() == Some("INVITE") && r.body.contains("a=sendrecv")));
    assert_eq!(callee.bye().await.unwrap(), 200);
    assert!(call.wait_for_bye(5 * SECOND).await.is_some());
}
