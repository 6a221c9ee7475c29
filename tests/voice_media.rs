//! Class 5 media end to end: the in-repo test caller places real calls over loopback to
//! `callforge serve` and checks what it hears (correlated against the shipped prompts,
//! decoded here independently), the pacing of what it receives, the digits the script
//! collected, and the recording the script made of what the caller said.

mod caller;
mod sip_support;

use std::{path::Path, time::Duration};

use caller::{best_correlation, decode_ulaw, pacing_ms, tone, ulaw_to_linear, Call};

const ROUTES: &str = r#"
[[route]]
match = "^7000$"
script = "ivr.js"
mode = "class5"

[[route]]
match = "^7001$"
script = "collect_digits.js"
mode = "class5"

[[route]]
match = "^7002$"
script = "say_hello.js"
mode = "class5"

[[route]]
match = "^7003$"
script = "wait_for.js"
mode = "class5"

[[route]]
match = "^7004$"
script = "echo_test.js"
mode = "class5"
"#;

/// A µ-law WAV (the shipped prompts' format) decoded without callforge's code.
fn ulaw_wav(path: &Path) -> Vec<i16> {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[0..4], b"RIFF");
    let mut at = 12;
    while at + 8 <= bytes.len() {
        let id = &bytes[at..at + 4];
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        if id == b"fmt " {
            let format = u16::from_le_bytes([bytes[at + 8], bytes[at + 9]]);
            assert_eq!(format, 7, "{} is µ-law", path.display());
        }
        if id == b"data" {
            return bytes[at + 8..at + 8 + len]
                .iter()
                .map(|&b| ulaw_to_linear(b))
                .collect();
        }
        at += 8 + len + (len & 1);
    }
    panic!("no data chunk in {}", path.display());
}

fn prompt(name: &str) -> Vec<i16> {
    ulaw_wav(&Path::new(sip_support::ROOT).join("media/ivr").join(name))
}

/// A server with the voice routes and a media folder of the test's own (the shipped prompts
/// copied in), with recordings inside it as in the default layout.
fn start() -> (sip_support::Server, tempfile::TempDir) {
    let media = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(media.path().join("ivr")).unwrap();
    for entry in std::fs::read_dir(Path::new(sip_support::ROOT).join("media/ivr")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(
            entry.path(),
            media.path().join("ivr").join(entry.file_name()),
        )
        .unwrap();
    }
    let extra = format!(
        "[media]\ndir = \"{0}\"\nrecordings = \"{0}/recordings\"\n{ROUTES}",
        media.path().display()
    );
    (sip_support::start(&extra), media)
}

/// The prompt is in what the caller heard: a middle second of it correlates above 0.9.
fn assert_heard(heard: &[i16], reference: &[i16], what: &str) {
    let mid = reference.len() / 2;
    let window = &reference[mid.saturating_sub(4000)..(mid + 4000).min(reference.len())];
    let (score, _) = best_correlation(heard, window);
    assert!(score > 0.9, "{what}: correlation {score:.3}");
}

#[tokio::test]
async fn ivr_plays_the_menu_takes_the_branch_and_paces_at_20ms() {
    let (server, _media) = start();
    let mut call = Call::place(server.udp, "7000").await.expect("answered");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    call.send_digits("2").await;
    let bye = call
        .wait_for_bye(Duration::from_secs(20))
        .await
        .expect("the script hangs up after the branch");
    assert_eq!(bye.header("X-IVR-Choice"), Some("2"));
    let packets = call.audio_packets();
    let heard = decode_ulaw(&packets);
    assert_heard(&heard, &prompt("welcome.wav"), "welcome");
    assert_heard(&heard, &prompt("support.wav"), "support branch");
    assert_heard(&heard, &prompt("goodbye.wav"), "goodbye");
    let (mean, p99) = pacing_ms(&packets);
    println!(
        "pacing over {} packets: mean {mean:.2} ms, p99 {p99:.2} ms",
        packets.len()
    );
    assert!((19.5..20.5).contains(&mean), "mean interval {mean:.2} ms");
    assert!(p99 < 35.0, "p99 interval {p99:.2} ms");
    // One SSRC, sequence numbers without gaps, timestamps +160 per packet.
    assert!(packets.windows(2).all(|w| w[0].ssrc == w[1].ssrc));
    assert!(packets
        .windows(2)
        .all(|w| w[1].seq == w[0].seq.wrapping_add(1)));
    assert!(packets
        .windows(2)
        .all(|w| w[1].ts.wrapping_sub(w[0].ts) % 160 == 0));
}

#[tokio::test]
async fn digits_collected_equal_the_digits_sent() {
    let (server, _media) = start();
    let mut call = Call::place(server.udp, "7001").await.expect("answered");
    tokio::time::sleep(Duration::from_millis(300)).await;
    call.send_digits("4071*9#").await;
    let bye = call
        .wait_for_bye(Duration::from_secs(10))
        .await
        .expect("BYE");
    assert_eq!(bye.header("X-Digits"), Some("4071*9"));
    assert_eq!(bye.header("X-Status"), Some("success"));
}

#[tokio::test]
async fn the_recording_contains_what_the_caller_said_and_is_played_back() {
    let (server, media) = start();
    let mut call = Call::place(server.udp, "7000").await.expect("answered");
    tokio::time::sleep(Duration::from_millis(3000)).await;
    call.send_digits("3").await;
    // "Please leave a message..." then a beep; then speak a two-tone phrase and press #.
    tokio::time::sleep(Duration::from_millis(5000)).await;
    let said = tone(&[523.0, 784.0], 1500, 9000.0);
    call.send_audio(&said).await;
    call.send_digits("#").await;
    let bye = call
        .wait_for_bye(Duration::from_secs(20))
        .await
        .expect("BYE");
    assert_eq!(bye.header("X-IVR-Choice"), Some("3"));
    let file = std::fs::read_dir(media.path().join("recordings"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "wav"))
        .expect("a recording was written");
    let mut wav = hound::WavReader::open(&file).unwrap();
    assert_eq!(wav.spec().sample_rate, 8000);
    assert_eq!(wav.spec().bits_per_sample, 16);
    let recorded: Vec<i16> = wav.samples::<i16>().map(Result::unwrap).collect();
    let (score, _) = best_correlation(&recorded, &said[2000..10000]);
    assert!(score > 0.9, "the recording holds what was said: {score:.3}");
    // And the caller heard it played back.
    let heard = decode_ulaw(&call.audio_packets());
    let (score, _) = best_correlation(&heard, &said[2000..10000]);
    assert!(score > 0.9, "playback heard: {score:.3}");
}

#[tokio::test]
async fn tts_speaks_and_the_caller_hears_speech() {
    let (server, _media) = start();
    let call = Call::place(server.udp, "7002").await.expect("answered");
    call.wait_for_bye(Duration::from_secs(15))
        .await
        .expect("BYE");
    let heard = decode_ulaw(&call.audio_packets());
    let loud = heard
        .chunks(160)
        .filter(|c| c.iter().map(|&s| (s as i32).abs()).max().unwrap_or(0) > 2000)
        .count();
    assert!(
        loud > 25,
        "at least half a second of speech: {loud} loud frames"
    );
}

#[tokio::test]
async fn wait_for_matches_a_regexp_quits_on_a_function_and_blocked_keys_never_arrive() {
    let (server, _media) = start();
    // 9 is blocked by the script: "12934#" reaches it as "1234#", which matches.
    let mut call = Call::place(server.udp, "7003").await.expect("answered");
    tokio::time::sleep(Duration::from_millis(300)).await;
    call.send_digits("12934#").await;
    let bye = call
        .wait_for_bye(Duration::from_secs(10))
        .await
        .expect("BYE");
    assert_eq!(bye.header("X-Wait"), Some("pin 1234#"));

    let mut call = Call::place(server.udp, "7003").await.expect("answered");
    tokio::time::sleep(Duration::from_millis(300)).await;
    call.send_digits("12*").await;
    let bye = call
        .wait_for_bye(Duration::from_secs(10))
        .await
        .expect("BYE");
    assert_eq!(bye.header("X-Wait"), Some("Quit 12*"));
}

#[tokio::test]
async fn every_call_writes_a_cdr_with_its_digits_and_who_hung_up() {
    let (server, _media) = start();
    let mut call = Call::place(server.udp, "7001").await.expect("answered");
    tokio::time::sleep(Duration::from_millis(300)).await;
    call.send_digits("55#").await;
    call.wait_for_bye(Duration::from_secs(10))
        .await
        .expect("BYE");
    let url = format!("http://{}/v1/cdrs?limit=10", server.http);
    let mut found = None;
    for _ in 0..50 {
        let page: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
        let rows = page["cdrs"]
            .as_array()
            .or(page["items"].as_array())
            .cloned()
            .unwrap_or_default();
        found = rows
            .into_iter()
            .find(|c| c["call_id"] == call.call_id.as_str());
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cdr = found.expect("a CDR for the call");
    assert_eq!(
        cdr["script"], "collect_digits",
        "a script is named by its file without .js"
    );
    assert_eq!(cdr["hangup_side"], "script");
    assert!(cdr["answered_at"].as_i64().unwrap() >= cdr["started_at"].as_i64().unwrap());
    assert!(cdr["ended_at"].as_i64().unwrap() >= cdr["answered_at"].as_i64().unwrap());
    assert_eq!(cdr["digits"], serde_json::json!(["55#"]));
    assert!(cdr["error"].is_null(), "{cdr}");
}

#[tokio::test]
async fn send_dtmf_arrives_as_rfc4733_events_and_echo_returns_the_callers_audio() {
    let (server, _media) = start();
    let mut call = Call::place(server.udp, "7004").await.expect("answered");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Each event is one RTP timestamp; its first packet carries the event code.
    let events: Vec<char> = {
        let received = call.received.lock().unwrap();
        let mut seen = Vec::new();
        let mut last_ts = None;
        for p in received.iter().filter(|p| p.pt == 101) {
            if last_ts != Some(p.ts) {
                last_ts = Some(p.ts);
                seen.push(match p.payload[0] {
                    10 => '*',
                    11 => '#',
                    d => (b'0' + d) as char,
                });
            }
        }
        seen
    };
    assert_eq!(events, vec!['1', '2', '#']);
    let said = tone(&[660.0, 990.0], 1000, 9000.0);
    call.send_audio(&said).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    call.send_digits("5").await;
    let bye = call
        .wait_for_bye(Duration::from_secs(10))
        .await
        .expect("BYE");
    assert_eq!(bye.header("X-Echo-Digit"), Some("5"));
    let heard = decode_ulaw(&call.audio_packets());
    let (score, _) = best_correlation(&heard, &said[2000..6000]);
    assert!(score > 0.9, "the caller heard themselves: {score:.3}");
}
