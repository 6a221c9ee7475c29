//! `api.send.sip` sends a real SIP MESSAGE through the engine's own SIP stack to SIPp, which
//! checks the body and answers 200; a far end that never answers ends as a clear failure.

mod sip_support;

use std::{path::Path, process::Command, time::Duration};

use serde_json::{json, Value};

async fn run_send(server: &sip_support::Server, to: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/run/send_sip", server.http))
        .json(&json!({"to": to}))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn a_message_reaches_sipp_and_its_200_resolves_the_send() {
    let server = sip_support::start("");
    let port = sip_support::free_port();
    let mut sipp = Command::new("sipp")
        .arg("-sf")
        .arg(Path::new(sip_support::ROOT).join("tests/sipp/message_uas.xml"))
        .args(["-i", "127.0.0.1", "-p", &port.to_string(), "-m", "1"])
        .args(["-timeout", "30s", "-timeout_error", "-nostdin"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("sipp is installed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = run_send(&server, &format!("sip:bob@127.0.0.1:{port}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["ok"], true, "{body}");
    let exit = tokio::task::spawn_blocking(move || sipp.wait().unwrap())
        .await
        .unwrap();
    assert!(
        exit.success(),
        "SIPp received the MESSAGE with the expected body"
    );
}

#[tokio::test]
async fn bad_targets_are_clear_errors() {
    let server = sip_support::start("");
    let (status, body) = run_send(&server, "sip:bob@example.invalid").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["ok"], false, "{body}");
    assert!(
        body["result"]["error"]
            .as_str()
            .unwrap()
            .contains("IP address"),
        "{body}"
    );
}
