//! The ScriptForge examples that talk to ConnexCS's REST API and were not covered elsewhere,
//! through the real binary against a REST API started here on loopback:
//! `balance-announcer` (class5, on a real call from the in-repo caller carrying
//! `X-Customer-ID`), `add-header` (class4 over HTTP; broken as published, returns the routing
//! unchanged) and `account-jump` (class4; needs ConnexCS's internal `cxHelper`, which callforge
//! does not have, so it must fail with a named error and leave the engine unharmed).
//! Scripts come from `tests/fixtures/scriptforge/` (our own-words equivalents) or, when
//! `CALLFORGE_SCRIPTFORGE_DIR` names a checkout of `connexcs/scriptforge-examples`, the
//! published scripts unchanged; only what both share is asserted (not the spoken text).

mod caller;
mod scriptforge_examples;
mod sip_support;
mod support;

use scriptforge_examples::source as scriptforge_source;
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    http::{HeaderMap, StatusCode, Uri},
    Json, Router,
};
use caller::{best_correlation, Call};
use serde_json::{json, Value};
use support::{start, workdir, ROOT};

const SECOND: Duration = Duration::from_secs(1);

/// base64("api@test.com:pw"): balance-announcer's API user.
const TEST_USER_AUTH: &str = "Basic YXBpQHRlc3QuY29tOnB3";
/// base64("api@yourdomain.com:pw"): account-jump's API user.
const DOMAIN_USER_AUTH: &str = "Basic YXBpQHlvdXJkb21haW4uY29tOnB3";

/// One request the test API saw: path (under `/api/cp/`), query and Authorization header.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    path: String,
    query: String,
    auth: String,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A stand-in for ConnexCS's control-panel API: `customer/12` has a balance of 12.50 USD,
/// `cli?cli=441134960000` belongs to company 77; anything else is a 404. Wrong credentials are
/// a 401. Every request is recorded.
async fn rest_api() -> (u16, Log) {
    let log: Log = Default::default();
    let seen = log.clone();
    let app = Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
        let seen = seen.clone();
        async move {
            let auth = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let path = uri
                .path()
                .strip_prefix("/api/cp/")
                .unwrap_or("")
                .to_string();
            let query = uri.query().unwrap_or("").to_string();
            seen.lock().unwrap().push(Seen {
                path: path.clone(),
                query: query.clone(),
                auth: auth.clone(),
            });
            if auth != TEST_USER_AUTH && auth != DOMAIN_USER_AUTH {
                return (StatusCode::UNAUTHORIZED, Json(json!({"error": "auth"})));
            }
            match (path.as_str(), query.as_str()) {
                ("customer/12", _) => (
                    StatusCode::OK,
                    Json(json!({"id": 12, "credit": "12.50", "currency": "USD"})),
                ),
                ("cli", "cli=441134960000") => (
                    StatusCode::OK,
                    Json(json!([{"company_id": 77, "cli": "441134960000"}])),
                ),
                _ => (
                    StatusCode::NOT_FOUND,
                    Json(json!({"error": "no such resource"})),
                ),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, log)
}

fn rest_config(port: u16) -> String {
    format!(
        "[fetch]\nallow = [\"127.0.0.1:{port}\"]\ntimeout_ms = 2000\n\
         [rest]\nurl = \"http://127.0.0.1:{port}/api/cp\"\n\
         [rest.users.\"api@test.com\"]\npassword = \"pw\"\n\
         [rest.users.\"api@yourdomain.com\"]\npassword = \"pw\"\n"
    )
}

/// 20 ms frames (8 kHz) whose peak passes speech level.
fn loud_frames(heard: &[i16]) -> Vec<usize> {
    heard
        .chunks(160)
        .enumerate()
        .filter(|(_, c)| c.iter().map(|&s| (s as i32).abs()).max().unwrap_or(0) > 2000)
        .map(|(i, _)| i)
        .collect()
}

/// A SIP server whose number `balance` runs balance-announcer as class5, with the REST API
/// configured; the server's log goes to a file.
struct Rig {
    server: sip_support::Server,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Rig {
    fn new(rest_port: u16) -> Rig {
        let log_dir = tempfile::tempdir().unwrap();
        let log = log_dir.path().join("callforge.log");
        let server = sip_support::start_logging(
            &format!(
                "{}\n[[route]]\nmatch = \"^balance$\"\nscript = \"balance-announcer.js\"\nmode = \"class5\"\n",
                rest_config(rest_port)
            ),
            Some(&log),
        );
        std::fs::write(
            server.dir.path().join("scripts/balance-announcer.js"),
            scriptforge_source("balance-announcer"),
        )
        .unwrap();
        Rig {
            server,
            log,
            _log_dir: log_dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Waits until the caller has heard speech and then `quiet` without any.
async fn until_speech_stops(call: &Call, quiet: Duration, within: Duration) -> Vec<i16> {
    let until = Instant::now() + within;
    let mut last_loud = None;
    let mut last_change = Instant::now();
    while Instant::now() < until {
        let heard = call.received_audio();
        let loud = loud_frames(&heard).last().copied();
        if loud != last_loud {
            last_loud = loud;
            last_change = Instant::now();
        } else if loud.is_some() && last_change.elapsed() >= quiet {
            return heard;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    call.received_audio()
}

#[tokio::test]
async fn balance_announcer_answers_implicitly_speaks_the_balance_twice_and_waits() {
    let (port, api) = rest_api().await;
    let rig = Rig::new(port);
    let mut call = Call::place_with(rig.server.udp, "balance", &[("X-Customer-ID", "12")])
        .await
        .expect("the script never calls answer(); its first tts answers the call");
    let heard = until_speech_stops(&call, 3 * SECOND, 40 * SECOND).await;

    // The customer named by the header was asked for, as the API user the script authorised.
    let seen = api.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![Seen {
            path: "customer/12".into(),
            query: String::new(),
            auth: TEST_USER_AUTH.into(),
        }]
    );

    // The caller hears speech, and the same rendering twice: a slice of the first one is found
    // again later in what was heard.
    let loud = loud_frames(&heard);
    assert!(loud.len() > 50, "speech heard: {} loud frames", loud.len());
    let first = loud[0] * 160;
    let slice = &heard[first..(first + 4000).min(heard.len())];
    let after = (first + 8000).min(heard.len());
    let (score, _) = best_correlation(&heard[after..], slice);
    assert!(score > 0.9, "the balance is spoken twice: {score:.3}");

    // Then waitForHangup: the call stays up until the caller ends it.
    assert!(
        call.wait_for_bye(2 * SECOND).await.is_none(),
        "the script waits for the caller to hang up"
    );
    assert_eq!(call.bye().await, Ok(200));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = rig.log();
    assert!(
        log.contains("answering the call implicitly"),
        "the implicit answer is logged: {log}"
    );
    assert!(!log.contains("class5 script ended with an error"), "{log}");
}

#[tokio::test]
async fn balance_announcer_without_a_customer_header_says_one_message_and_ends() {
    let (port, api) = rest_api().await;
    let rig = Rig::new(port);
    let call = Call::place(rig.server.udp, "balance")
        .await
        .expect("the apology's tts answers the call");
    call.wait_for_bye(30 * SECOND)
        .await
        .expect("the script ends after one message, and so does the call");
    let heard = call.received_audio();
    let loud = loud_frames(&heard);
    assert!(
        loud.len() > 10,
        "one message heard: {} loud frames",
        loud.len()
    );
    assert!(
        api.lock().unwrap().is_empty(),
        "no customer to look up, no REST request"
    );
    assert!(!rig.log().contains("class5 script ended with an error"));
}

/// The routing every class4 test here starts from.
fn five_carriers() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("tests/data/five_carriers.json")).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn add_header_is_broken_as_published_and_returns_the_routing_unchanged() {
    let dir = workdir("");
    let s = start(dir.path());
    s.put_script("add-header", &scriptforge_source("add-header"));
    let input = five_carriers();
    let (status, body) = s
        .post("/v1/run/add-header?mode=class4", input.clone())
        .await;
    assert_eq!(status, 200, "{body}");
    // `+Date()` is NaN and `headers` lands on the array of routes, which JSON does not carry:
    // no X-Timestamp anywhere, the routing is exactly what went in.
    assert_eq!(body["result"]["routing"], input["routing"], "{body}");
    assert!(!body.to_string().contains("X-Timestamp"), "{body}");
    // Without routes the script cannot even set its property: a TypeError, reported.
    let (status, body) = s
        .post("/v1/run/add-header?mode=class4", json!({"routing": {}}))
        .await;
    assert_ne!(status, 200, "{body}");
    assert!(body.to_string().contains("TypeError"), "{body}");
}

/// Class4 input for account-jump: the CLI company 77 owns, and two routes carrying the two
/// headers the script rewrites.
fn account_jump_input() -> Value {
    let headers = json!([{"key": "X-Customer-ID", "value": ""}, {"key": "X-CX-Sec", "value": ""}]);
    json!({"routing": {
        "cli": "441134960000", "dest_number": "447700900555", "server": "pbx1",
        "egress_routing": [
            {"gw": {"alpha": {"cli": ""}}, "headers": headers},
            {"gw": {"bravo": {"cli": ""}}, "headers": headers},
        ]
    }})
}

#[tokio::test]
async fn account_jump_fails_with_a_named_error_for_the_missing_cx_helper() {
    let (port, api) = rest_api().await;
    let dir = workdir(&rest_config(port));
    let s = start(dir.path());
    s.put_script("account-jump", &scriptforge_source("account-jump"));
    // Twice: the failure is the same each time, and the engine stays up.
    for attempt in 1..=2 {
        let (status, body) = s
            .post("/v1/run/account-jump?mode=class4", account_jump_input())
            .await;
        assert!(status >= 400, "attempt {attempt}: {body}");
        let text = body.to_string();
        assert!(
            text.contains("require('cxHelper'): no such module"),
            "attempt {attempt}: the error names cxHelper: {body}"
        );
        assert!(
            text.contains("cxRest"),
            "the error lists the modules that exist: {body}"
        );
    }
    assert!(
        api.lock().unwrap().is_empty(),
        "the script fails at load, before its REST call"
    );

    // The rest of the engine is unaffected: the same REST call the script makes, and the same
    // per-route rewrite without the key, work in a script of our own on the same engine.
    s.put_script(
        "jump-without-key",
        r#"const rest = require('cxRest');
async function main(data) {
  const owners = await rest.auth("api@yourdomain.com").get('cli', { cli: data.routing.cli });
  if (!owners.length) throw new Error('401 CLI Not Authorized');
  data.routing.egress_routing.forEach(route => {
    route.headers.find(h => h.key === 'X-Customer-ID').value = owners[0].company_id;
  });
  return data;
}"#,
    );
    let (status, body) = s
        .post("/v1/run/jump-without-key?mode=class4", account_jump_input())
        .await;
    assert_eq!(status, 200, "{body}");
    for route in 0..2 {
        assert_eq!(
            body["result"]["routing"]["egress_routing"][route]["headers"][0],
            json!({"key": "X-Customer-ID", "value": 77}),
            "{body}"
        );
    }
    assert_eq!(
        api.lock().unwrap().clone(),
        vec![Seen {
            path: "cli".into(),
            query: "cli=441134960000".into(),
            auth: DOMAIN_USER_AUTH.into(),
        }]
    );
}
