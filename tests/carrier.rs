//! Carrier operation with real processes: source ACL, Digest authentication of callers,
//! per-source rate limits, `/metrics` against SIPp's own statistics, drain on SIGTERM, reload.

mod sip_support;

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use sip_support::{assert_all_ok, sipp, start, Server};

/// Sends one out-of-dialog request from `from` (an IP on loopback) and returns the status code
/// of the first final response, or `None` if nothing final came within `wait`.
fn request_from(
    from: &str,
    to: SocketAddr,
    method: &str,
    user: &str,
    wait: Duration,
) -> Option<u16> {
    response_from(from, to, method, user, wait)
        .and_then(|text| text.get(8..11).and_then(|c| c.parse().ok()))
}

/// The final response to one request, as text.
fn response_from(
    from: &str,
    to: SocketAddr,
    method: &str,
    user: &str,
    wait: Duration,
) -> Option<String> {
    let sock = UdpSocket::bind((from, 0)).unwrap();
    let local = sock.local_addr().unwrap();
    let call_id = format!("{}-{}", fastrand_id(), local.port());
    let msg = format!(
        "{method} sip:{user}@{to} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK{call_id}\r\nFrom: <sip:test@{local}>;tag=t{call_id}\r\nTo: <sip:{user}@{to}>\r\nCall-ID: {call_id}\r\nCSeq: 1 {method}\r\nContact: <sip:test@{local}>\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    );
    sock.send_to(msg.as_bytes(), to).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]);
            let code: u16 = text.get(8..11).and_then(|c| c.parse().ok()).unwrap_or(0);
            if code >= 200 {
                return Some(text.into_owned());
            }
        }
    }
    None
}

fn fastrand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

fn http_get(s: &Server, path: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = reqwest::get(format!("http://{}{path}", s.http))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    })
}

fn http_post(s: &Server, path: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = reqwest::Client::new()
            .post(format!("http://{}{path}", s.http))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    })
}

/// The value of one sample line of the `/metrics` text (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn cdr_count(s: &Server) -> usize {
    let (_, body) = http_get(s, "/v1/cdrs?limit=500");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["items"].as_array().map(Vec::len).unwrap_or(0)
}

#[test]
fn source_outside_the_acl_gets_403_and_never_reaches_a_script() {
    let s = start("allow = [\"127.0.0.1/32\"]");
    let code = request_from("127.0.0.2", s.udp, "INVITE", "5000", Duration::from_secs(3));
    assert_eq!(code, Some(403), "INVITE from 127.0.0.2");
    // The listed source is served: a full class5 call from 127.0.0.1.
    let run = sipp("class5_script_bye", s.udp, "5000", 2, &["-r", "10"]);
    assert_all_ok(&run, 2);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cdr_count(&s), 2, "only the admitted calls have CDRs");
    let (_, m) = http_get(&s, "/metrics");
    assert_eq!(
        metric(&m, "callforge_sip_rejected_total{reason=\"acl\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "callforge_calls_ended_total{outcome=\"completed\"}"),
        2.0,
        "{m}"
    );
}

#[test]
fn acl_drop_answers_nothing() {
    let s = start("allow = [\"127.0.0.1\"]\ndeny_action = \"drop\"");
    let code = request_from(
        "127.0.0.2",
        s.udp,
        "OPTIONS",
        "x",
        Duration::from_millis(1500),
    );
    assert_eq!(code, None);
    assert_eq!(
        request_from("127.0.0.1", s.udp, "OPTIONS", "x", Duration::from_secs(3)),
        Some(200)
    );
}

const AUTH_ROUTE: &str = r#"
[[sip.user]]
name = "alice"
password = "s3cret"

[[route]]
match = "^7000$"
script = "answer_and_hangup.js"
mode = "class5"
auth = true
allow = ["127.0.0.1"]
"#;

#[test]
fn sipp_digest_authentication_succeeds_and_a_wrong_password_is_refused() {
    let s = start(AUTH_ROUTE);
    let run = sipp(
        "uac_auth_in",
        s.udp,
        "7000",
        3,
        &["-r", "10", "-au", "alice", "-ap", "s3cret"],
    );
    assert_all_ok(&run, 3);
    let bad = sipp(
        "uac_auth_in",
        s.udp,
        "7000",
        1,
        &["-au", "alice", "-ap", "guess"],
    );
    assert_eq!(bad.successful, 0, "{bad:?}");
    assert_eq!(bad.failed, 1, "{bad:?}");
    assert!(bad.errors.contains("403"), "{}", bad.errors);
    // An INVITE without credentials is challenged, never run.
    assert_eq!(
        request_from("127.0.0.1", s.udp, "INVITE", "7000", Duration::from_secs(3)),
        Some(401)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        cdr_count(&s),
        3,
        "only the authenticated calls ran the script"
    );
    let (_, m) = http_get(&s, "/metrics");
    assert_eq!(
        metric(&m, "callforge_sip_rejected_total{reason=\"auth\"}"),
        1.0,
        "{m}"
    );
}

#[test]
fn a_flood_from_one_source_is_limited_while_another_sources_calls_complete() {
    let s = start("rate_per_source = 20");
    let target = s.udp;
    // 127.0.0.2 sends 400 OPTIONS as fast as it can; 127.0.0.1 places 30 redirected calls at
    // 10/s meanwhile (under its own 20/s).
    let flood = std::thread::spawn(move || {
        let sock = UdpSocket::bind("127.0.0.2:0").unwrap();
        let local = sock.local_addr().unwrap();
        // Answers are read while sending, so none is lost to a full socket buffer.
        let reader = sock.try_clone().unwrap();
        let counts = std::thread::spawn(move || {
            reader
                .set_read_timeout(Some(Duration::from_millis(1500)))
                .unwrap();
            let (mut ok, mut busy) = (0, 0);
            let mut buf = [0u8; 4096];
            while let Ok((n, _)) = reader.recv_from(&mut buf) {
                match &buf[8..11.min(n)] {
                    b"200" => ok += 1,
                    b"503" => busy += 1,
                    _ => {}
                }
            }
            (ok, busy)
        });
        for i in 0..400 {
            let msg = format!(
                "OPTIONS sip:x@{target} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKf{i}\r\nFrom: <sip:f@{local}>;tag=f{i}\r\nTo: <sip:x@{target}>\r\nCall-ID: flood{i}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            );
            sock.send_to(msg.as_bytes(), target).unwrap();
            std::thread::sleep(Duration::from_micros(500));
        }
        counts.join().unwrap()
    });
    let run = sipp("redirect", s.udp, "447700900555", 30, &["-r", "10"]);
    let (ok, busy) = flood.join().unwrap();
    assert_all_ok(&run, 30);
    assert_eq!(ok + busy, 400, "every OPTIONS was answered: {ok} + {busy}");
    assert!(
        busy > 300,
        "the flood was limited: {ok} answered, {busy} refused"
    );
    // Half a second of flooding or so: the 20-request burst plus the tokens refilled meanwhile.
    assert!((20..=60).contains(&ok), "{ok} OPTIONS got through");
    let (_, m) = http_get(&s, "/metrics");
    assert_eq!(
        metric(&m, "callforge_sip_rejected_total{reason=\"rate\"}"),
        busy as f64,
        "{m}"
    );
}

#[test]
fn metrics_scraped_during_a_sipp_run_match_sipps_statistics() {
    let s = start("");
    let target = s.udp;
    let runner =
        std::thread::spawn(move || sipp("redirect", target, "447700900555", 300, &["-r", "100"]));
    // Scrape while SIPp runs: counters already moving, never ahead of what SIPp sent.
    std::thread::sleep(Duration::from_millis(1500));
    let (status, during) = http_get(&s, "/metrics");
    assert_eq!(status, 200);
    let mid = metric(
        &during,
        "callforge_sip_requests_received_total{method=\"INVITE\"}",
    );
    assert!(mid > 0.0 && mid < 300.0, "mid-run INVITEs: {mid}");
    let run = runner.join().unwrap();
    assert_all_ok(&run, 300);
    std::thread::sleep(Duration::from_millis(200));
    let (_, after) = http_get(&s, "/metrics");
    let n = run.created as f64;
    for series in [
        "callforge_sip_requests_received_total{method=\"INVITE\"}",
        "callforge_sip_requests_received_total{method=\"ACK\"}",
        "callforge_sip_responses_sent_total{code=\"302\"}",
        "callforge_class4_decisions_total{code=\"302\"}",
        "callforge_script_runs_total{mode=\"class4\",outcome=\"ok\"}",
        "callforge_call_setup_seconds_count",
    ] {
        assert_eq!(metric(&after, series), n, "{series}\n{after}");
    }
    assert_eq!(
        metric(
            &after,
            "callforge_script_run_duration_seconds_count{mode=\"class4\"}"
        ),
        n
    );
    assert!(after.contains("callforge_build_info{version="), "{after}");
}

#[test]
fn metrics_can_require_their_own_token() {
    let dir_cfg = "[http]\nmetrics_token = \"m3trics\"\n";
    let s = sip_support::start_with_top(dir_cfg, "");
    let (status, _) = http_get(&s, "/metrics");
    assert_eq!(status, 401);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, body) = rt.block_on(async {
        let r = reqwest::Client::new()
            .get(format!("http://{}/metrics", s.http))
            .bearer_auth("m3trics")
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    assert_eq!(status, 200);
    assert!(body.contains("callforge_sip_transactions"), "{body}");
}

const LONG_CALL: &str = r#"
[[route]]
match = "^7200$"
script = "long_call.js"
mode = "class5"
"#;

#[test]
fn sigterm_during_50_live_calls_drains_them_with_every_cdr_written() {
    let mut s = sip_support::start_with_top("[records]\njsonl = \"records.jsonl\"\n", LONG_CALL);
    std::fs::write(
        s.dir.path().join("scripts/long_call.js"),
        "async function main(data, ctx) { await ctx.answer(); await new Promise((r) => setTimeout(r, 5000)); await ctx.hangup(); }",
    )
    .unwrap();
    let target = s.udp;
    let runner = std::thread::spawn(move || {
        sipp(
            "class5_script_bye",
            target,
            "7200",
            50,
            &["-r", "100", "-l", "50"],
        )
    });
    // SIGTERM once all 50 calls are live (a fixed wait let a slow SIPp on a busy machine send
    // its last INVITEs after the drain began, and those rightly got 503).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, calls) = http_get(&s, "/v1/calls");
        let live = calls.matches("\"state\"").count();
        if live >= 50 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = s.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(Duration::from_millis(200));
    // Draining: OPTIONS and new INVITEs get 503, health says so.
    assert_eq!(
        request_from("127.0.0.1", target, "OPTIONS", "x", Duration::from_secs(2)),
        Some(503)
    );
    assert_eq!(
        request_from(
            "127.0.0.1",
            target,
            "INVITE",
            "7200",
            Duration::from_secs(2)
        ),
        Some(503)
    );
    let (status, health) = http_get(&s, "/healthz");
    assert_eq!(status, 503);
    assert!(health.contains("draining"), "{health}");
    let run = runner.join().unwrap();
    assert_all_ok(&run, 50);
    let exit = wait_exit(&mut s, Duration::from_secs(15));
    assert_eq!(exit, Some(0), "callforge exits 0 after draining");
    let jsonl = std::fs::read_to_string(s.dir.path().join("records.jsonl")).unwrap_or_default();
    let cdrs = jsonl.lines().filter(|l| l.contains("\"cdr\"")).count();
    assert_eq!(cdrs, 50, "one CDR per call");
}

#[test]
fn drain_timeout_hangs_up_calls_that_do_not_end() {
    let mut s = sip_support::start_with_top("[calls]\ndrain_timeout_s = 1\n", "");
    let target = s.udp;
    // answer_and_wait.js never hangs up: the drain timeout must send BYE (the scenario waits for it).
    let runner =
        std::thread::spawn(move || sipp("class5_script_bye", target, "5001", 5, &["-r", "50"]));
    std::thread::sleep(Duration::from_millis(800));
    let (status, _) = http_post(&s, "/v1/admin/drain");
    assert_eq!(status, 202);
    let run = runner.join().unwrap();
    assert_all_ok(&run, 5);
    assert_eq!(wait_exit(&mut s, Duration::from_secs(15)), Some(0));
}

fn wait_exit(s: &mut Server, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = s.child.try_wait() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn reload_swaps_a_route_live_and_refuses_a_bad_config_whole() {
    let route = |script: &str| {
        format!("[[route]]\nmatch = \"^7300$\"\nscript = \"{script}\"\nmode = \"class4\"\n")
    };
    let s = sip_support::start_with_top("", &route("first.js"));
    let scripts = s.dir.path().join("scripts");
    std::fs::write(
        scripts.join("first.js"),
        "function main() { throw new Error(\"486 first\"); }",
    )
    .unwrap();
    std::fs::write(
        scripts.join("second.js"),
        "function main() { throw new Error(\"488 second\"); }",
    )
    .unwrap();
    let call = || request_from("127.0.0.1", s.udp, "INVITE", "7300", Duration::from_secs(3));
    assert_eq!(call(), Some(486));
    let cfg = s.dir.path().join("callforge.toml");
    let original = std::fs::read_to_string(&cfg).unwrap();
    // A broken file (bad regex in a new route) is refused whole: the old route stays.
    std::fs::write(
        &cfg,
        format!("[[route]]\nmatch = \"(\"\nscript = \"x\"\nmode = \"class4\"\n{original}"),
    )
    .unwrap();
    let (status, body) = http_post(&s, "/v1/admin/reload");
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("regex"), "{body}");
    assert_eq!(call(), Some(486));
    // The same route now runs another script, through SIGHUP.
    std::fs::write(&cfg, original.replace("first.js", "second.js")).unwrap();
    let pid = s.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = call();
    while got != Some(488) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        got = call();
    }
    assert_eq!(got, Some(488));
    let (status, body) = http_post(&s, "/v1/admin/reload");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn reload_puts_new_gateways_into_the_next_redirects() {
    let route = "[[route]]\nmatch = \"^7400$\"\nscript = \"via_alpha.js\"\nmode = \"class4\"\n";
    let s = sip_support::start_with_top("", route);
    std::fs::write(
        s.dir.path().join("scripts/via_alpha.js"),
        "function main(data) { data.routing.egress_routing = [{gw: {alpha: {}}}]; return data; }",
    )
    .unwrap();
    let contact = || {
        let text = response_from("127.0.0.1", s.udp, "INVITE", "7400", Duration::from_secs(3))
            .expect("an answer");
        assert!(text.starts_with("SIP/2.0 302"), "{text}");
        text.lines()
            .find(|l| l.to_ascii_lowercase().starts_with("contact:"))
            .map(str::to_string)
            .expect("a Contact")
    };
    let before = contact();
    assert!(before.contains("alpha.example.net"), "{before}");
    let cfg = s.dir.path().join("callforge.toml");
    let original = std::fs::read_to_string(&cfg).unwrap();
    assert!(original.contains("alpha.example.net"), "{original}");
    // A gateway that is not a SIP URI is refused whole; the old table stays.
    std::fs::write(&cfg, original.replace("sip:alpha.example.net", "http://x")).unwrap();
    let (status, body) = http_post(&s, "/v1/admin/reload");
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("[gateways] alpha"), "{body}");
    assert!(contact().contains("alpha.example.net"));
    std::fs::write(
        &cfg,
        original.replace("alpha.example.net", "alpha-new.example.org"),
    )
    .unwrap();
    let (status, body) = http_post(&s, "/v1/admin/reload");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("gateways"), "{body}");
    let after = contact();
    assert!(after.contains("alpha-new.example.org"), "{after}");
}

#[test]
fn serve_refuses_a_public_listener_with_an_open_class5_route() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("callforge.toml");
    std::fs::write(
        &cfg,
        "[sip]\nlisten = [\"udp:0.0.0.0:0\"]\n[[route]]\nmatch = \".\"\nscript = \"answer_and_hangup\"\nmode = \"class5\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(sip_support::BIN)
        .args(["serve", "--http", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("insecure_open") && err.contains("[sip] allow"),
        "{err}"
    );
}

/// `serve` without a configuration file, as `tools/start.sh` runs it, from the repository root.
#[test]
fn the_embedded_default_answers_calls_and_says_how() {
    let port = sip_support::free_port();
    let udp = format!("udp:127.0.0.1:{port}");
    let tcp = format!("tcp:127.0.0.1:{port}");
    let serve = |http: &str| {
        std::process::Command::new(sip_support::BIN)
            .args(["serve", "--http", http, "--sip", &udp, "--sip", &tcp])
            .current_dir(sip_support::ROOT)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = serve("127.0.0.1:0");
    let stdout = child.stdout.take().unwrap();
    let mut banner = String::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.unwrap();
        banner.push_str(&line);
        banner.push('\n');
        if line.starts_with("callforge http listening") {
            break;
        }
    }
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(child);
    assert!(
        banner.contains(&format!("sipp -sn uac -s 1000 {target}")),
        "{banner}"
    );
    assert!(banner.contains(&format!("sip:1000@{target}")), "{banner}");
    assert!(
        banner.contains("tests/sipp/uac_302.xml -s 447700900123"),
        "{banner}"
    );
    // The class4 demo route redirects; the IVR answers (SIPp hangs up after 1 s).
    let run = sipp("uac_302", target, "447700900123", 2, &[]);
    assert_all_ok(&run, 2);
    let ivr = sipp("uac_call", target, "1000", 1, &["-d", "1000"]);
    assert_eq!((ivr.successful, ivr.failed), (1, 0), "{ivr:?}");
    // A second engine on the same port says which flag to use.
    let second = serve("127.0.0.1:0").wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert!(
        err.contains("already in use") && err.contains("--sip"),
        "{err}"
    );
}

#[test]
fn concurrent_calls_are_limited_per_source() {
    let s = start(&format!("calls_per_source = 2\n{LONG_CALL}"));
    std::fs::write(
        s.dir.path().join("scripts/long_call.js"),
        "async function main(data, ctx) { await ctx.answer(); await new Promise((r) => setTimeout(r, 3000)); await ctx.hangup(); }",
    )
    .unwrap();
    let target = s.udp;
    // Two calls from 127.0.0.1 stay up for 3 s, then the script hangs up.
    let runner =
        std::thread::spawn(move || sipp("class5_script_bye", target, "7200", 2, &["-r", "10"]));
    std::thread::sleep(Duration::from_millis(1200));
    // A third INVITE from the same source is refused before routing; another source is not
    // limited (it reaches routing: 404 for a number without a route).
    assert_eq!(
        request_from(
            "127.0.0.1",
            target,
            "INVITE",
            "nobody",
            Duration::from_secs(2)
        ),
        Some(503)
    );
    assert_eq!(
        request_from(
            "127.0.0.2",
            target,
            "INVITE",
            "nobody",
            Duration::from_secs(2)
        ),
        Some(404)
    );
    assert_all_ok(&runner.join().unwrap(), 2);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        request_from(
            "127.0.0.1",
            target,
            "INVITE",
            "nobody",
            Duration::from_secs(2)
        ),
        Some(404),
        "the ended calls no longer count"
    );
    let (_, m) = http_get(&s, "/metrics");
    assert_eq!(
        metric(&m, "callforge_sip_rejected_total{reason=\"concurrent\"}"),
        1.0,
        "{m}"
    );
}
