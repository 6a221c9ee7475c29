//! Outbound legs end to end: `ctx.bridge` with the in-repo caller on one side and the in-repo
//! callee or SIPp far ends on the other (audio both ways checked by correlation, PCMU↔PCMA
//! transcoding, DTMF across, BYE from each side, busy, no answer, CANCEL, a 407 challenge),
//! trunk and call limits, the calling-card example, and originating calls over HTTP.

mod caller;
mod sip_support;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use caller::{best_correlation, read_wav, AcceptOpts, Call, Callee, Codec};
use serde_json::{json, Value};
use sip_support::{assert_all_ok, sipp, sipp_uas, Server};

const SECOND: Duration = Duration::from_secs(1);

fn prompt(name: &str) -> Vec<i16> {
    read_wav(&Path::new(sip_support::ROOT).join("media/ivr").join(name)).unwrap()
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

/// Polls `cond` every 20 ms for at most `within`.
async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const BRIDGE_ROUTE: &str = r#"
[[route]]
match = "^bridge$"
script = "bridge_to_header.js"
mode = "class5"

[[route]]
match = "^transfer$"
script = "transfer_to_header.js"
mode = "class5"

[[route]]
match = "^hold$"
script = "play_welcome.js"
mode = "class5"

[[route]]
match = "^fallback$"
script = "bridge_fallback.js"
mode = "class5"

[[route]]
match = "^card$"
script = "calling_card.js"
mode = "class5"
"#;

/// A server with the bridge routes, the shipped prompts and `extra` config (trunks, limits).
fn server(extra: &str) -> Server {
    let media = Path::new(sip_support::ROOT).join("media");
    sip_support::start_logging(
        &format!(
            "[media]\ndir = \"{}\"\n{extra}\n{BRIDGE_ROUTE}",
            media.display()
        ),
        std::env::var("BRIDGE_LOG").ok().as_deref().map(Path::new),
    )
}

/// The CDRs the server wrote, newest last.
async fn cdrs(server: &Server) -> Vec<Value> {
    let url = format!("http://{}/v1/cdrs?limit=100", server.http);
    let page: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    page["items"].as_array().cloned().unwrap_or_default()
}

/// The script's result (the bridge outcome) from the newest CDR, once it is written.
async fn last_result(server: &Server) -> Value {
    let until = Instant::now() + 5 * SECOND;
    loop {
        if let Some(c) = cdrs(server).await.last() {
            return c["result"].clone();
        }
        assert!(Instant::now() < until, "no CDR written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn audio_crosses_both_ways_transcoded_and_dtmf_crosses_then_the_caller_hangs_up() {
    let server = server("");
    let mut callee = Callee::listen(Codec::Pcma).await;
    let to = callee.uri("2001");
    let headers = [("X-Bridge-To", to.as_str())];
    let (call, invite) = tokio::join!(
        Call::place_with(server.udp, "bridge", &headers),
        callee.accept(AcceptOpts::answer_after(300))
    );
    let mut call = call.unwrap();
    let invite = invite.unwrap();
    assert_eq!(invite.user(), "2001");
    assert_eq!(
        invite.header("X-Leg"),
        Some("b"),
        "the script's header is on the B leg"
    );
    assert_eq!(call.codec, Codec::Pcmu, "the caller's leg stays PCMU");

    let (welcome, menu) = (prompt("welcome.wav"), prompt("menu.wav"));
    tokio::join!(call.send_audio(&welcome), callee.send_audio(&menu));
    call.send_digits("12#").await;
    callee.send_digits("9").await;
    assert!(
        eventually(3 * SECOND, || callee.received_digits() == "12#"
            && call.received_digits() == "9")
        .await,
        "digits across the bridge: callee {:?}, caller {:?}",
        callee.received_digits(),
        call.received_digits()
    );
    assert_heard(
        &callee.received_audio(),
        &welcome,
        "the callee (PCMA) hears the caller (PCMU)",
    );
    assert_heard(
        &call.received_audio(),
        &menu,
        "the caller (PCMU) hears the callee (PCMA)",
    );

    assert_eq!(call.bye().await.unwrap(), 200);
    assert!(
        callee.wait_for_bye(5 * SECOND).await.is_some(),
        "the caller's BYE ends the callee's leg"
    );
    let result = last_result(&server).await;
    assert_eq!(result["status"], "completed", "{result}");
    assert_eq!(result["sipCode"], 200);
    assert!(result["duration"].as_f64().unwrap() > 1.0, "{result}");
    let cdr = cdrs(&server).await.pop().unwrap();
    assert_eq!(cdr["legs"][0]["status"], "completed", "{cdr}");
}

#[tokio::test]
async fn a_bye_from_the_callee_ends_the_caller_too() {
    let server = server("");
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let to = callee.uri("2002");
    let headers = [("X-Bridge-To", to.as_str())];
    let (call, invite) = tokio::join!(
        Call::place_with(server.udp, "bridge", &headers),
        callee.accept(AcceptOpts::answer_after(100))
    );
    let call = call.unwrap();
    invite.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(callee.bye().await.unwrap(), 200);
    assert!(
        call.wait_for_bye(5 * SECOND).await.is_some(),
        "the callee's BYE ends the caller's leg"
    );
    assert_eq!(last_result(&server).await["status"], "completed");
}

#[tokio::test]
async fn the_callees_answer_answers_an_unanswered_caller_and_early_media_reaches_it() {
    let server = server("");
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let to = callee.uri("2003");
    let headers = [("X-Bridge-To", to.as_str()), ("X-Bridge-Answer", "no")];
    let place = Call::place_with(server.udp, "bridge", &headers);
    let far = async {
        callee.wait_for_invite(5 * SECOND).await.unwrap();
        callee.ring(true).await.unwrap();
        // Early media: the caller hears this before anyone answers.
        callee.send_audio(&prompt("welcome.wav")).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let answering = Instant::now();
        callee.answer().await.unwrap();
        answering
    };
    let (call, answering) = tokio::join!(place, far);
    let mut call = call.unwrap();
    let early = call
        .audio_packets()
        .iter()
        .filter(|p| p.at < answering)
        .count();
    assert!(
        early >= 50,
        "only {early} packets reached the caller before the callee answered"
    );
    let welcome_len = prompt("welcome.wav").len();
    eventually(3 * SECOND, || call.received_audio().len() >= welcome_len).await;
    assert_heard(
        &call.received_audio(),
        &prompt("welcome.wav"),
        "early media from the callee",
    );
    assert_eq!(call.bye().await.unwrap(), 200);
    assert!(callee.wait_for_bye(5 * SECOND).await.is_some());
}

#[tokio::test]
async fn busy_resolves_busy_and_the_script_goes_on() {
    let server = server("");
    let uas = sipp_uas("uas_busy", &[]);
    let to = uas.uri("3001");
    let call = Call::place_with(
        server.udp,
        "bridge",
        &[("X-Bridge-To", to.as_str()), ("X-Continue", "1")],
    )
    .await
    .unwrap();
    let bye = call
        .wait_for_bye(10 * SECOND)
        .await
        .expect("the script hangs up");
    assert_eq!(bye.header("X-Bridge"), Some("busy/486"));
    uas.finish_async(10 * SECOND).await.unwrap();
}

#[tokio::test]
async fn a_callee_that_never_answers_is_cancelled_at_the_timeout() {
    let server = server("");
    let uas = sipp_uas("uas_noanswer", &[]);
    let to = uas.uri("3002");
    let started = Instant::now();
    let call = Call::place_with(
        server.udp,
        "bridge",
        &[
            ("X-Bridge-To", to.as_str()),
            ("X-Continue", "1"),
            ("X-Bridge-Timeout", "2"),
        ],
    )
    .await
    .unwrap();
    let bye = call
        .wait_for_bye(10 * SECOND)
        .await
        .expect("the script hangs up");
    assert_eq!(bye.header("X-Bridge"), Some("no-answer/408"));
    assert!(started.elapsed() >= 2 * SECOND);
    // The scenario fails unless it got a CANCEL (and our ACK for its 487).
    uas.finish_async(10 * SECOND).await.unwrap();
}

#[tokio::test]
async fn the_callers_hangup_while_the_callee_rings_cancels_it() {
    let server = server("");
    let uas = sipp_uas("uas_noanswer", &[]);
    let to = uas.uri("3003");
    let mut call = Call::place_with(server.udp, "bridge", &[("X-Bridge-To", to.as_str())])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(call.bye().await.unwrap(), 200);
    uas.finish_async(10 * SECOND).await.unwrap();
    let result = last_result(&server).await;
    assert_eq!(result["status"], "cancelled", "{result}");
}

#[tokio::test]
async fn a_407_challenge_is_answered_with_the_trunks_credentials() {
    let uas = sipp_uas("uas_auth", &["-set", "user", "alice"]);
    let server = server(&format!(
        "[[trunk]]\nname = \"carrier\"\nuri = \"127.0.0.1:{}\"\nusername = \"alice\"\npassword = \"s3cret\"\n",
        uas.port
    ));
    let mut call = Call::place_with(server.udp, "bridge", &[("X-Bridge-To", "carrier:4401")])
        .await
        .unwrap();
    assert!(
        eventually(5 * SECOND, || uas
            .messages()
            .contains("Proxy-Authorization"))
        .await,
        "the INVITE was re-sent with credentials"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(call.bye().await.unwrap(), 200);
    uas.finish_async(10 * SECOND).await.unwrap();
    assert_eq!(last_result(&server).await["status"], "completed");
}

#[tokio::test]
async fn a_full_trunk_fails_the_second_bridge_with_503() {
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let server = server(&format!(
        "[[trunk]]\nname = \"small\"\nuri = \"{}\"\nmax_calls = 1\n",
        callee.sip_addr()
    ));
    let headers = [("X-Bridge-To", "7001")];
    let (first, invite) = tokio::join!(
        Call::place_with(server.udp, "bridge", &headers),
        callee.accept(AcceptOpts::answer_after(50))
    );
    let mut first = first.unwrap();
    invite.unwrap();
    let second = Call::place_with(
        server.udp,
        "bridge",
        &[("X-Bridge-To", "7002"), ("X-Continue", "1")],
    )
    .await
    .unwrap();
    let bye = second
        .wait_for_bye(5 * SECOND)
        .await
        .expect("refused at once");
    assert_eq!(bye.header("X-Bridge"), Some("failed/503"));
    assert_eq!(first.bye().await.unwrap(), 200);
}

#[tokio::test]
async fn calls_are_hung_up_at_the_maximum_duration() {
    let server = server("[calls]\nmax_duration_s = 2\n");
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let to = callee.uri("2004");
    let started = Instant::now();
    let headers = [("X-Bridge-To", to.as_str())];
    let (call, invite) = tokio::join!(
        Call::place_with(server.udp, "bridge", &headers),
        callee.accept(AcceptOpts::answer_after(50))
    );
    let call = call.unwrap();
    invite.unwrap();
    assert!(
        call.wait_for_bye(6 * SECOND).await.is_some(),
        "caller hung up"
    );
    assert!(
        callee.wait_for_bye(2 * SECOND).await.is_some(),
        "callee hung up"
    );
    let took = started.elapsed();
    assert!(took >= 2 * SECOND && took < 5 * SECOND, "{took:?}");
    last_result(&server).await;
    let cdr = cdrs(&server).await.pop().unwrap();
    assert_eq!(cdr["hangup_cause"], "max_duration", "{cdr}");
}

#[tokio::test]
async fn the_calling_card_example_collects_a_number_and_bridges_to_it() {
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let server = server(&format!(
        "[[trunk]]\nname = \"pstn\"\nuri = \"{}\"\n",
        callee.sip_addr()
    ));
    let mut call = Call::place(server.udp, "card").await.unwrap();
    // Let the prompt start, then dial 4420 and end with #.
    tokio::time::sleep(Duration::from_millis(500)).await;
    call.send_digits("4420#").await;
    let invite = callee
        .accept(AcceptOpts::answer_after(100))
        .await
        .expect("the card bridges to the number");
    assert_eq!(invite.user(), "4420");
    let support = prompt("support.wav");
    callee.send_audio(&support).await;
    assert_heard(
        &call.received_audio(),
        &support,
        "the caller hears the callee",
    );
    assert_eq!(callee.bye().await.unwrap(), 200);
    // The bridge completed: the script returns and the call ends.
    assert!(call.wait_for_bye(5 * SECOND).await.is_some());
}

#[tokio::test]
async fn originate_places_a_call_runs_a_script_lists_and_hangs_it_up() {
    let server = server("");
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}/v1/calls", server.http);
    // Bad requests are refused before any INVITE.
    let bad = http
        .post(&base)
        .body(r#"{"to": "sip:1@127.0.0.1:9", "script": "nope.js"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 404);
    let bad = http.post(&base).body("{").send().await.unwrap();
    assert_eq!(bad.status(), 400);
    let no_trunk = http
        .post(&base)
        .json(&json!({"to": "4420", "script": "play_welcome.js"}))
        .send()
        .await
        .unwrap();
    assert_eq!(no_trunk.status(), 400);
    let body: Value = no_trunk.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no [[trunk]]"),
        "{body}"
    );

    let placed = http
        .post(&base)
        .json(&json!({"to": callee.uri("5001"), "from": "15550100",
                      "script": "play_welcome.js", "data": {"campaign": "c7"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), 201);
    let id = placed.json::<Value>().await.unwrap()["id"]
        .as_u64()
        .unwrap();
    let invite = callee.accept(AcceptOpts::answer_after(100)).await.unwrap();
    assert_eq!(invite.user(), "5001");
    assert!(invite.from.contains("15550100"), "{}", invite.from);

    // The callee's 200 is on its way when accept() returns: the listing shows the call
    // answered once the engine has taken it in (bounded wait; ringing until then).
    let deadline = std::time::Instant::now() + 5 * SECOND;
    let live = loop {
        let list: Value = http.get(&base).send().await.unwrap().json().await.unwrap();
        let live = list["calls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == json!(id))
            .cloned()
            .expect("the call is listed");
        if live["state"] == "answered" || std::time::Instant::now() > deadline {
            break live;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(live["direction"], "outbound");
    assert_eq!(live["state"], "answered", "{live}");

    // The script plays the welcome prompt to the callee.
    assert!(
        eventually(5 * SECOND, || callee.received_audio().len() > 8000 * 3).await,
        "the script's audio reaches the callee"
    );
    assert_heard(
        &callee.received_audio(),
        &prompt("welcome.wav"),
        "the originated call's script",
    );
    let del = http.delete(format!("{base}/{id}")).send().await.unwrap();
    assert_eq!(del.status(), 204);
    assert!(callee.wait_for_bye(3 * SECOND).await.is_some());
    // The call leaves the live list once its task has finished (CDR written).
    let until = Instant::now() + 3 * SECOND;
    loop {
        let now = http.get(format!("{base}/{id}")).send().await.unwrap();
        if now.status() == 404 {
            break;
        }
        assert!(Instant::now() < until, "the hung-up call is still listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gone = http.delete(format!("{base}/{id}")).send().await.unwrap();
    assert_eq!(gone.status(), 404);
    last_result(&server).await;
    let cdr = cdrs(&server).await.pop().unwrap();
    assert_eq!(cdr["hangup_cause"], "api", "{cdr}");
    // The script saw data.direction and the request's data.
    assert_eq!(
        cdr["result"],
        json!({"direction": "outbound", "campaign": "c7"})
    );
}

/// Runs a SIPp caller scenario without blocking the test's runtime.
async fn sipp_caller(
    scenario: &'static str,
    server: &Server,
    service: &'static str,
    target: String,
) -> sip_support::SippRun {
    let addr = server.udp;
    tokio::task::spawn_blocking(move || {
        sipp(scenario, addr, service, 1, &["-set", "target", &target])
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn transfer_after_answer_is_a_refer_followed_by_notify_and_bye() {
    let server = server("");
    let run = sipp_caller(
        "uac_transfer",
        &server,
        "transfer",
        "sip:4420@127.0.0.1:5999".into(),
    )
    .await;
    assert_all_ok(&run, 1);
    let result = last_result(&server).await;
    assert_eq!(result["status"], "transferred", "{result}");
    assert_eq!(result["method"], "refer");
    assert_eq!(result["target"], "sip:4420@127.0.0.1:5999");
}

#[tokio::test]
async fn transfer_falls_back_to_a_bridge_when_the_caller_refuses_refer() {
    let server = server("");
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let target = callee.uri("4421");
    let caller = sipp_caller("uac_refer_refused", &server, "transfer", target);
    let far = async {
        let invite = callee.accept(AcceptOpts::answer_after(100)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(callee.bye().await.unwrap(), 200);
        invite
    };
    let (run, invite) = tokio::join!(caller, far);
    assert_all_ok(&run, 1);
    assert_eq!(invite.user(), "4421");
    let result = last_result(&server).await;
    assert_eq!(result["status"], "completed", "{result}");
    assert_eq!(result["method"], "bridge", "{result}");
}

#[tokio::test]
async fn transfer_before_answer_is_a_302() {
    let server = server("");
    let run = sipp_caller(
        "uac_redirected",
        &server,
        "transfer",
        "sip:4420@127.0.0.1:5999".into(),
    )
    .await;
    assert_all_ok(&run, 1);
    assert_eq!(last_result(&server).await["status"], "transferred");
}

#[tokio::test]
async fn a_refer_from_the_caller_is_refused_by_default() {
    let server = server("");
    let run = sipp_caller("uac_refer_in", &server, "hold", String::new()).await;
    assert_all_ok(&run, 1);
}

#[tokio::test]
async fn app_scripts_originate_list_and_hang_up_calls() {
    let server = server("");
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let http = reqwest::Client::new();
    let dialer = r#"async function main(d) {
        const originate = require('originate');
        if (d.hangup) return originate.hangup(d.hangup);
        const placed = await originate({to: d.to, script: "play_welcome.js", data: {campaign: "js"}});
        return {id: placed.id, listed: originate.list().calls.some(c => c.id === placed.id)};
    }"#;
    let put = http
        .put(format!("http://{}/v1/scripts/dialer.js", server.http))
        .body(dialer)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let run = |body: Value| {
        let http = http.clone();
        let url = format!("http://{}/v1/run/dialer.js?mode=app", server.http);
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()["result"].clone()
        }
    };
    let (placed, invite) = tokio::join!(
        run(json!({"to": callee.uri("6001")})),
        callee.accept(AcceptOpts::answer_after(100))
    );
    assert_eq!(invite.unwrap().user(), "6001");
    assert_eq!(placed["listed"], json!(true), "{placed}");
    let id = placed["id"].as_u64().unwrap();
    assert_eq!(run(json!({"hangup": id})).await, json!(true));
    assert!(callee.wait_for_bye(3 * SECOND).await.is_some());
    // Once the call's task has finished, the id is no longer live.
    let mut gone = false;
    for _ in 0..50 {
        if run(json!({"hangup": id})).await == json!(false) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert!(gone, "the hung-up call leaves the live list");
}

#[tokio::test]
async fn a_bridged_callers_refer_hands_the_far_party_to_the_target() {
    let server = server("[calls]\naccept_refer = true\n");
    let mut b = Callee::listen(Codec::Pcmu).await;
    let mut c = Callee::listen(Codec::Pcma).await;
    let (b_uri, c_uri) = (b.uri("8001"), c.uri("8002"));
    let addr = server.udp;
    let caller = tokio::task::spawn_blocking(move || {
        sipp(
            "uac_refer_bridged",
            addr,
            "bridge",
            1,
            &["-set", "target", &b_uri, "-set", "referto", &c_uri],
        )
    });
    b.accept(AcceptOpts::answer_after(100)).await.unwrap();
    let invite = c.accept(AcceptOpts::answer_after(200)).await.unwrap();
    assert_eq!(invite.user(), "8002");
    let run = caller.await.unwrap();
    assert_all_ok(&run, 1);
    // B and C now talk through callforge (C answered PCMA: transcoded).
    let menu = prompt("menu.wav");
    b.send_audio(&menu).await;
    assert_heard(&c.received_audio(), &menu, "the transfer target hears B");
    assert_eq!(c.bye().await.unwrap(), 200);
    assert!(b.wait_for_bye(5 * SECOND).await.is_some(), "C's BYE ends B");
    let cdr = {
        let until = Instant::now() + 5 * SECOND;
        loop {
            let all = cdrs(&server).await;
            if let Some(c) = all.last() {
                break c.clone();
            }
            assert!(Instant::now() < until);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(cdr["hangup_cause"], "transferred", "{cdr}");
}

#[tokio::test]
async fn a_caller_cancelling_while_the_bridge_rings_cancels_the_callee() {
    let server = server("");
    let uas = sipp_uas("uas_noanswer", &[]);
    let run = sipp_caller("uac_cancel_bridge", &server, "bridge", uas.uri("3004")).await;
    assert_all_ok(&run, 1);
    uas.finish_async(10 * SECOND).await.unwrap();
    assert_eq!(last_result(&server).await["status"], "cancelled");
}

/// The fallback script against a busy first destination and an answering backup.
async fn fallback(extra: &str) -> (Value, Option<String>) {
    let server = server(extra);
    let busy = sipp_uas("uas_busy", &[]);
    let mut backup = Callee::listen(Codec::Pcmu).await;
    let (first, second) = (busy.uri("3005"), backup.uri("3006"));
    let headers = [
        ("X-Bridge-To", first.as_str()),
        ("X-Bridge-Backup", second.as_str()),
    ];
    let mut call = Call::place_with(server.udp, "fallback", &headers)
        .await
        .unwrap();
    let answered =
        tokio::time::timeout(3 * SECOND, backup.accept(AcceptOpts::answer_after(50))).await;
    let outcome = if answered.is_ok() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(call.bye().await.unwrap(), 200);
        None
    } else {
        let bye = call
            .wait_for_bye(5 * SECOND)
            .await
            .expect("the script hangs up");
        bye.header("X-Bridge").map(str::to_string)
    };
    busy.finish_async(10 * SECOND).await.unwrap();
    (last_result(&server).await, outcome)
}

#[tokio::test]
async fn a_failed_bridge_falls_back_to_a_second_destination() {
    let (result, hung_up) = fallback("").await;
    assert_eq!(hung_up, None, "the backup answered");
    assert_eq!(result["first"]["status"], "busy", "{result}");
    assert_eq!(result["second"]["status"], "completed", "{result}");
}

#[tokio::test]
async fn bridge_attempts_beyond_the_limit_fail_with_503() {
    let (result, hung_up) = fallback("[calls]\nmax_bridge_attempts = 1\n").await;
    assert_eq!(hung_up.as_deref(), Some("failed/503"));
    assert_eq!(result["first"]["status"], "busy", "{result}");
    assert!(
        result["second"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("limit of 1 bridge attempts"),
        "{result}"
    );
}

#[tokio::test]
async fn a_silent_destination_resolves_no_answer_at_the_ring_timeout() {
    let server = server("");
    // A bound socket that never answers: no 100, no 180, nothing to CANCEL.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = format!("sip:3007@{}", silent.local_addr().unwrap());
    let headers = [
        ("X-Bridge-To", to.as_str()),
        ("X-Continue", "1"),
        ("X-Bridge-Timeout", "1"),
    ];
    let started = Instant::now();
    let call = Call::place_with(server.udp, "bridge", &headers)
        .await
        .unwrap();
    let bye = call
        .wait_for_bye(5 * SECOND)
        .await
        .expect("the script goes on");
    assert_eq!(bye.header("X-Bridge"), Some("no-answer/408"));
    assert!(started.elapsed() < 4 * SECOND, "{:?}", started.elapsed());
}

#[tokio::test]
async fn an_answered_caller_hears_ringback_while_the_callee_rings() {
    let server = server("");
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let to = callee.uri("2005");
    let headers = [("X-Bridge-To", to.as_str())];
    let (call, invite) = tokio::join!(
        Call::place_with(server.udp, "bridge", &headers),
        callee.accept(AcceptOpts::answer_after(1500))
    );
    let mut call = call.unwrap();
    invite.unwrap();
    // 440 + 480 Hz, as callforge plays it while a callee rings without early media.
    let ringback = caller::tone(&[440.0, 480.0], 800, 4000.0);
    let heard = call.received_audio();
    let (score, _) = best_correlation(&heard, &ringback[800..5600]);
    assert!(
        score > 0.9,
        "ringback correlation {score:.3} over {} samples",
        heard.len()
    );
    assert_eq!(call.bye().await.unwrap(), 200);
}

#[tokio::test]
async fn cx_originate_takes_connexcs_positional_arguments() {
    let server = server("");
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let http = reqwest::Client::new();
    // originate(companyId, serverAlias, destination, cli, extension): no alias means the
    // default route; the extension names the class5 script run once the callee answers.
    let dialer = r#"const cx = require('cxOriginate');
    async function main(d) {
        let bad;
        try { await cx.originate(1234, null, d.to); } catch (e) { bad = e.name; }
        const placed = await cx(1234, null, d.to, '441234567890', 'play_welcome');
        return {id: placed.id, bad};
    }"#;
    let put = http
        .put(format!("http://{}/v1/scripts/cxdialer.js", server.http))
        .body(dialer)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let url = format!("http://{}/v1/run/cxdialer.js?mode=app", server.http);
    let to = callee.uri("6002");
    let run = async {
        let r = http
            .post(url)
            .json(&json!({"to": to}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["result"].clone()
    };
    let (placed, invite) = tokio::join!(run, callee.accept(AcceptOpts::answer_after(100)));
    let invite = invite.unwrap();
    assert_eq!(invite.user(), "6002");
    let from = invite.header("From").unwrap_or("").to_string();
    assert!(
        from.contains("441234567890"),
        "the cli is the caller ID: {from}"
    );
    assert_eq!(placed["bad"], "TypeError", "{placed}");
    assert!(placed["id"].as_u64().is_some(), "{placed}");
    // The extension's script runs on the answered call: the callee hears its prompt.
    assert!(
        eventually(5 * SECOND, || callee.received_audio().len() > 8000 * 3).await,
        "the script's audio reaches the callee"
    );
    assert_heard(
        &callee.received_audio(),
        &prompt("welcome.wav"),
        "the extension's script",
    );
    assert_eq!(callee.bye().await.unwrap(), 200);
}
