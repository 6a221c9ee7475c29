//! Robustness under abuse, against the real binary on loopback: runaway HTTP runs beside
//! class4 routing, OPTIONS floods and the admission cap, class5 scripts outliving their call,
//! console floods and forged log lines, TCP connection limits (SIP and HTTP), and CDRs across
//! kill -9.
//!
//! `CALLFORGE_BIN=path` runs these against another build (to show a defect on older code).

mod sip_support;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream, UdpSocket},
};

fn bin() -> String {
    std::env::var("CALLFORGE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_callforge").into())
}

/// A `callforge serve` with its stderr in `dir/stderr.log`, killed on drop.
struct Engine {
    child: Child,
    http: SocketAddr,
    udp: Option<SocketAddr>,
    tcp: Option<SocketAddr>,
    log: PathBuf,
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `config` to `dir/callforge.toml` and starts the engine on it (scripts from
/// `dir/scripts`); `color` leaves the environment as a user's shell would (no NO_COLOR).
fn start(dir: &Path, config: &str, extra: &[&str]) -> Engine {
    std::fs::create_dir_all(dir.join("scripts")).unwrap();
    std::fs::write(dir.join("callforge.toml"), config).unwrap();
    let log = dir.join(format!("stderr-{}.log", fastrand::u32(..)));
    let mut child = Command::new(bin())
        .args(["serve", "--http", "127.0.0.1:0", "--config"])
        .arg(dir.join("callforge.toml"))
        .arg("--scripts")
        .arg(dir.join("scripts"))
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut udp, mut tcp) = (None, None);
    let port = |l: &str| l.rsplit(':').next().unwrap().trim().parse::<u16>().unwrap();
    let http = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.wait();
            panic!(
                "engine exited before listening: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        if let Some(rest) = line.strip_prefix("callforge sip listening on udp:") {
            udp = Some(SocketAddr::from(([127, 0, 0, 1], port(rest))));
        } else if let Some(rest) = line.strip_prefix("callforge sip listening on tcp:") {
            tcp = Some(SocketAddr::from(([127, 0, 0, 1], port(rest))));
        } else if let Some(rest) = line.strip_prefix("callforge http listening on ") {
            break rest.trim().parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Engine {
        child,
        http,
        udp,
        tcp,
        log,
    }
}

fn script(dir: &Path, name: &str, source: &str) {
    std::fs::create_dir_all(dir.join("scripts")).unwrap();
    std::fs::write(dir.join("scripts").join(name), source).unwrap();
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

async fn post(e: &Engine, path: &str, body: Value) -> (u16, Value) {
    let r = http()
        .post(format!("http://{}{path}", e.http))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn get(e: &Engine, path: &str) -> Value {
    http()
        .get(format!("http://{}{path}", e.http))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn invite(user: &str, local: SocketAddr, target: SocketAddr, call_id: &str) -> String {
    format!(
        "INVITE sip:{user}@{target} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK{call_id}\r\n\
         From: <sip:441000000000@{local}>;tag=f{call_id}\r\nTo: <sip:{user}@{target}>\r\n\
         Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:a@{local}>\r\nMax-Forwards: 70\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn options(local: SocketAddr, target: SocketAddr, n: u32) -> String {
    format!(
        "OPTIONS sip:ping@{target} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKopt{n}\r\n\
         From: <sip:probe@{local}>;tag=o{n}\r\nTo: <sip:ping@{target}>\r\nCall-ID: opt{n}\r\n\
         CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
}

fn status_of(datagram: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(datagram).ok()?;
    text.strip_prefix("SIP/2.0 ")?.get(..3)?.parse().ok()
}

/// Sends an INVITE and waits for its final status; the time it took.
async fn invite_final(sock: &UdpSocket, target: SocketAddr, user: &str) -> (u16, Duration) {
    let call_id = format!("c{}", fastrand::u64(..));
    let local = sock.local_addr().unwrap();
    let started = Instant::now();
    sock.send_to(invite(user, local, target, &call_id).as_bytes(), target)
        .await
        .unwrap();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, _) = tokio::time::timeout(Duration::from_secs(30), sock.recv_from(&mut buf))
            .await
            .expect("a final response")
            .unwrap();
        let msg = &buf[..n];
        if !String::from_utf8_lossy(msg).contains(&call_id) {
            continue;
        }
        if let Some(code) = status_of(msg).filter(|c| *c >= 200) {
            return (code, started.elapsed());
        }
    }
}

/// A class4 script that redirects every call to one gateway.
const REDIRECT: &str =
    "function main(d) { d.routing.egress_routing = [{uri: 'sip:gw.example.net'}]; return d; }\n";

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    let i = ((v.len() as f64) * 0.99).ceil() as usize;
    v[i.clamp(1, v.len()) - 1]
}

// ------------------------------------------------------------------ item 7: runaways vs class4

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn class4_decisions_keep_their_pace_while_runaway_http_runs_spin() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    script(d, "spin.js", "function main() { while (true) {} }\n");
    // Catastrophic backtracking: exponential in the length of the a's.
    script(
        d,
        "redos.js",
        "function main() { return /^(a+)+$/.test('a'.repeat(40) + 'b'); }\n",
    );
    script(d, "route.js", REDIRECT);
    let e = start(
        d,
        "[limits]\nworkers = 2\napp_cpu_ms = 4000\n[sip]\nlisten = [\"udp:127.0.0.1:0\"]\n\
         [[route]]\nmatch = \"^44\"\nscript = \"route.js\"\nmode = \"class4\"\n",
        &[],
    );
    let sip = e.udp.unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let body = json!({"routing": {"dest_number": "447700900555"}});
    let measure = |rounds: usize| {
        let (e, body, sock) = (&e, body.clone(), &sock);
        async move {
            let (mut web, mut sip_times) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                let t = Instant::now();
                let (status, _) = post(e, "/v1/run/route?mode=class4", body.clone()).await;
                assert_eq!(status, 200);
                web.push(t.elapsed());
                let (code, took) = invite_final(sock, sip, "447700900555").await;
                assert_eq!(code, 302);
                sip_times.push(took);
            }
            (p99(web), p99(sip_times))
        }
    };
    measure(10).await; // warm up
    let (web_normal, sip_normal) = measure(60).await;

    // Runaways: more than there are general workers, CPU loops and a ReDoS regex.
    let mut runaways = Vec::new();
    for i in 0..6 {
        let e_http = e.http;
        let name = if i % 3 == 2 { "redos" } else { "spin" };
        runaways.push(tokio::spawn(async move {
            http()
                .post(format!("http://{e_http}/v1/run/{name}"))
                .json(&json!({}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (web_busy, sip_busy) = measure(60).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the decisions were measured while the runaways ran (4 s CPU limit)"
    );
    for r in runaways {
        let status = r.await.unwrap().unwrap();
        assert_eq!(status, 422, "the runaway ended by its CPU limit");
    }
    let bound = |normal: Duration| (normal * 3).max(normal + Duration::from_millis(150));
    assert!(
        web_busy <= bound(web_normal),
        "HTTP class4 p99 {web_busy:?} while runaways spin, {web_normal:?} normally"
    );
    assert!(
        sip_busy <= bound(sip_normal),
        "SIP class4 p99 {sip_busy:?} while runaways spin, {sip_normal:?} normally"
    );
}

// ------------------------------------------------------ item 9: finished transactions and 503s

#[tokio::test]
async fn answered_options_flood_does_not_make_invites_get_503() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    script(d, "route.js", REDIRECT);
    // A tenth of the default max_transactions (50,000), so that a debug build sends the
    // flood well within timer J's 32 s; the default itself is measured with the load script.
    let e = start(
        d,
        "[sip]\nlisten = [\"udp:127.0.0.1:0\"]\nmax_transactions = 5000\n\
         [[route]]\nmatch = \"^44\"\nscript = \"route.js\"\nmode = \"class4\"\n",
        &[],
    );
    let sip = e.udp.unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = sock.local_addr().unwrap();
    let mut buf = vec![0u8; 65_536];
    let mut answered = 0u32;
    // 5,500 OPTIONS in batches, each batch answered before the next goes (nothing is lost
    // in socket buffers, so every one of them holds a transaction).
    for batch in 0..55u32 {
        for i in 0..100u32 {
            let n = batch * 100 + i;
            sock.send_to(options(local, sip, n).as_bytes(), sip)
                .await
                .unwrap();
        }
        let mut got = 0;
        while got < 100 {
            match tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await {
                Ok(Ok((n, _))) => {
                    if status_of(&buf[..n]) == Some(200) {
                        got += 1;
                    }
                }
                _ => break,
            }
        }
        answered += got;
    }
    assert!(answered >= 5_400, "OPTIONS answered: {answered}");
    for _ in 0..5 {
        let (code, _) = invite_final(&sock, sip, "447700900555").await;
        assert_eq!(code, 302, "INVITE after {answered} answered OPTIONS");
    }
}

// ------------------------------------------------- item 8: class5 scripts outliving their call

#[tokio::test]
async fn a_script_awaiting_timers_is_stopped_after_the_call_ends_and_its_cdr_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    script(
        d,
        "forever.js",
        "async function main(d, ctx) {\n  await ctx.answer();\n  \
         while (true) { await new Promise(r => setTimeout(r, 200)); }\n}\n",
    );
    // Defaults otherwise: [calls] after_hangup_s = 10.
    let e = start(
        d,
        &format!(
            "[store]\npath = \"{}/cf.db\"\n[calls]\nmax_duration_s = 3\n\
             [sip]\nlisten = [\"udp:127.0.0.1:0\"]\n\
             [[route]]\nmatch = \"^7000$\"\nscript = \"forever.js\"\nmode = \"class5\"\n",
            d.display()
        ),
        &[],
    );
    let sip = e.udp.unwrap();
    let cdrs = |e: &Engine| {
        let base = e.http;
        async move {
            http()
                .get(format!("http://{base}/v1/cdrs"))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        }
    };
    let wait_for_cdrs = |n: usize| {
        let e = &e;
        async move {
            let until = Instant::now() + Duration::from_secs(25);
            loop {
                let list = cdrs(e).await;
                let stopped = list
                    .iter()
                    .filter(|c| c["error"]["code"] == json!(408))
                    .count();
                if stopped >= n || Instant::now() > until {
                    return list;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    // The caller hangs up while the script waits on a timer.
    let run = tokio::task::spawn_blocking(move || {
        sip_support::sipp("class5_caller_bye", sip, "7000", 1, &[])
    })
    .await
    .unwrap();
    sip_support::assert_all_ok(&run, 1);
    let list = wait_for_cdrs(1).await;
    assert_eq!(list.len(), 1, "a CDR once the script was stopped: {list:?}");
    assert_eq!(list[0]["hangup_side"], "caller", "{list:?}");
    assert_eq!(get(&e, "/v1/calls").await["calls"], json!([]));

    // Nobody hangs up: max_duration_s ends the call (our BYE), then the run.
    let run = tokio::task::spawn_blocking(move || {
        sip_support::sipp("class5_script_bye", sip, "7000", 1, &[])
    })
    .await
    .unwrap();
    sip_support::assert_all_ok(&run, 1);
    let list = wait_for_cdrs(2).await;
    assert_eq!(list.len(), 2, "{list:?}");
    let cause = list
        .iter()
        .find_map(|c| c["hangup_cause"].as_str().filter(|c| *c == "max_duration"));
    assert!(cause.is_some(), "{list:?}");
    assert_eq!(get(&e, "/v1/calls").await["calls"], json!([]));
}

// ------------------------------------------------------------------ item 10 and logs

#[tokio::test]
async fn a_console_flood_is_cut_at_the_run_budget_with_one_truncated_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    script(
        d,
        "flood.js",
        "function main() {\n  for (let i = 0; i < 100000; i++) console.log('flood line ' + i + ' ' + 'x'.repeat(100));\n  return 1;\n}\n",
    );
    let e = start(d, "[limits]\napp_cpu_ms = 120000\n", &[]);
    let (status, out) = post(&e, "/v1/run/flood", json!({})).await;
    assert_eq!(status, 200, "{out}");
    let log = std::fs::read_to_string(&e.log).unwrap();
    assert!(
        log.len() < 1024 * 1024,
        "the server log grew by {} bytes",
        log.len()
    );
    assert_eq!(
        log.matches("console output truncated").count(),
        1,
        "one truncated line"
    );
    let captured = out["logs"].as_array().unwrap();
    assert!(captured.len() <= 1_001, "{} lines captured", captured.len());
    assert!(captured
        .last()
        .unwrap()
        .to_string()
        .contains("console output truncated"));
}

/// No raw control byte in the log, and nothing that starts a line but our own events.
fn assert_log_clean(log: &[u8]) {
    for (byte, name) in [(0x1bu8, "ESC"), (0x07, "BEL"), (0x00, "NUL"), (b'\r', "CR")] {
        assert!(
            !log.contains(&byte),
            "raw {name} in the log:\n{}",
            String::from_utf8_lossy(log)
        );
    }
    let text = String::from_utf8_lossy(log);
    for line in text.lines() {
        assert!(
            !line.starts_with("FORGED"),
            "a forged line made it into the log:\n{text}"
        );
    }
}

#[tokio::test]
async fn control_bytes_from_scripts_and_the_network_are_escaped_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    script(
        d,
        "forge.js",
        "function main() {\n  console.log('ok\\r\\nFORGED ERROR admin logged in\\u001b[2J\\u0007\\u0000 end');\n  return 1;\n}\n",
    );
    script(d, "route.js", "function main(d) { return d; }\n");
    let e = start(
        d,
        "[sip]\nlisten = [\"udp:127.0.0.1:0\"]\n\
         [[route]]\nmatch = \"^44\"\nscript = \"route.js\"\nmode = \"class4\"\n",
        &[],
    );
    let (status, _) = post(&e, "/v1/run/forge", json!({})).await;
    assert_eq!(status, 200);
    // Malformed SIP carrying control bytes: logged as it is refused.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sip = e.udp.unwrap();
    for msg in [
        &b"INVITE sip:44@x SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK\x1b[31mx\x07\x00\r\nFORGED via header\r\n\r\n"[..],
        &b"\x1b[2JFORGED\r\nFORGED ERROR\x07\x00\r\n\r\n"[..],
    ] {
        sock.send_to(msg, sip).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = std::fs::read(&e.log).unwrap();
    assert!(
        String::from_utf8_lossy(&log).contains("FORGED ERROR admin logged in"),
        "the script's line is there, escaped"
    );
    assert_log_clean(&log);
}

#[tokio::test]
async fn logs_are_plain_text_off_a_terminal_and_json_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let e = start(d, "", &[]);
    let _ = get(&e, "/healthz").await;
    let plain = std::fs::read(&e.log).unwrap();
    drop(e);
    assert!(
        String::from_utf8_lossy(&plain).contains("callforge listening"),
        "{}",
        String::from_utf8_lossy(&plain)
    );
    assert!(!plain.contains(&0x1b), "ANSI escapes in a log file");

    let e = start(d, "", &["--log-format", "json"]);
    let _ = get(&e, "/healthz").await;
    let log = std::fs::read_to_string(&e.log).unwrap();
    let mut events = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        events += 1;
    }
    assert!(events > 0 && log.contains("callforge listening"), "{log}");
}

// ------------------------------------------------------------ item 11: connection limits

/// True when the peer closed (EOF or reset) within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let until = Instant::now() + within;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

async fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

fn tcp_options(n: u32, to: SocketAddr) -> String {
    format!(
        "OPTIONS sip:ping@{to} SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKt{n}\r\n\
         From: <sip:p@127.0.0.1>;tag=t{n}\r\nTo: <sip:ping@{to}>\r\nCall-ID: tcp{n}\r\n\
         CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
}

/// Sends an OPTIONS and reads until its 200 (false if the connection failed or closed).
async fn tcp_ping(s: &mut TcpStream, n: u32, to: SocketAddr) -> bool {
    if s.write_all(tcp_options(n, to).as_bytes()).await.is_err() {
        return false;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("SIP/2.0 200") {
        match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return false,
        }
    }
    true
}

#[tokio::test]
async fn sip_tcp_closes_idle_and_slow_connections_and_caps_sources_without_lockout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    script(d, "route.js", "function main(d) { return d; }\n");
    let e = start(
        d,
        "[sip]\nlisten = [\"tcp:127.0.0.1:0\"]\ntcp_idle_timeout_s = 2\n\
         tcp_message_timeout_s = 1\ntcp_max_per_source = 3\ntcp_max_connections = 6\n\
         [[route]]\nmatch = \"^44\"\nscript = \"route.js\"\nmode = \"class4\"\n",
        &[],
    );
    let sip = e.tcp.unwrap();

    // Slow: half a message, then nothing.
    let mut slow = connect_from("127.0.0.1", sip).await;
    slow.write_all(b"OPTIONS sip:ping@x SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    assert!(
        closed_within(&mut slow, Duration::from_secs(5)).await,
        "slow message"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );

    // Idle: one full exchange, then silence.
    let mut idle = connect_from("127.0.0.1", sip).await;
    assert!(tcp_ping(&mut idle, 1, sip).await);
    let t = Instant::now();
    assert!(
        closed_within(&mut idle, Duration::from_secs(6)).await,
        "idle"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(1_800),
        "{:?}",
        t.elapsed()
    );

    // Per source: a fourth connection from 127.0.0.2 is refused, 127.0.0.3 is not affected.
    let mut from2 = Vec::new();
    for i in 0..3 {
        let mut s = connect_from("127.0.0.2", sip).await;
        assert!(tcp_ping(&mut s, 10 + i, sip).await, "connection {i}");
        from2.push(s);
    }
    let mut fourth = connect_from("127.0.0.2", sip).await;
    assert!(
        !tcp_ping(&mut fourth, 20, sip).await,
        "over the per-source cap"
    );
    let mut other = connect_from("127.0.0.3", sip).await;
    assert!(tcp_ping(&mut other, 21, sip).await, "another source");

    // Global: 6 held (3 + 1 + 2 more); the next one still gets in, the longest idle goes.
    let mut more = Vec::new();
    for (i, ip) in ["127.0.0.4", "127.0.0.5"].iter().enumerate() {
        let mut s = connect_from(ip, sip).await;
        assert!(tcp_ping(&mut s, 30 + i as u32, sip).await);
        more.push(s);
    }
    let mut newcomer = connect_from("127.0.0.6", sip).await;
    assert!(
        tcp_ping(&mut newcomer, 40, sip).await,
        "no lockout at the cap"
    );
    assert!(
        closed_within(&mut from2[0], Duration::from_secs(1)).await,
        "the longest-idle connection made room"
    );
}

#[tokio::test]
async fn http_closes_slow_header_and_idle_connections_and_caps_sources() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let e = start(
        d,
        "[http]\nheader_timeout_s = 1\nidle_timeout_s = 2\nmax_connections_per_source = 4\n",
        &[],
    );
    let addr = e.http;
    // Slow headers.
    let mut slow = connect_from("127.0.0.1", addr).await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut slow, Duration::from_secs(4)).await,
        "slow headers"
    );
    // Connected, nothing sent.
    let mut mute = connect_from("127.0.0.1", addr).await;
    assert!(
        closed_within(&mut mute, Duration::from_secs(4)).await,
        "mute"
    );
    // Idle keep-alive after a request.
    let mut idle = connect_from("127.0.0.1", addr).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let t = Instant::now();
    assert!(
        closed_within(&mut idle, Duration::from_secs(6)).await,
        "idle"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(1_500),
        "{:?}",
        t.elapsed()
    );
    // Per source. Each held connection is served once first: with one listener per routing
    // worker the kernel queues connections on several listeners, and only a connection the
    // engine has accepted counts, so an unserved one could still be waiting when the fifth
    // arrives on another worker.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = connect_from("127.0.0.2", addr).await;
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let n = c.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(c);
    }
    let mut fifth = connect_from("127.0.0.2", addr).await;
    let _ = fifth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert!(
        closed_within(&mut fifth, Duration::from_millis(800)).await,
        "over the per-source cap"
    );
    let mut other = connect_from("127.0.0.3", addr).await;
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = other.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

/// Thread-per-core HTTP: clients that send a request's headers a byte at a time hold
/// connections on both routing workers (the kernel spreads 16 connections over them), and
/// class4 runs on other connections (keep-alive, and pipelined) are still answered promptly.
#[tokio::test]
async fn slow_header_clients_do_not_stall_runs_on_the_same_workers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    script(
        d,
        "pick.js",
        "export default function main(data) { return {routing: {carriers: [data.to]}}; }",
    );
    let e = start(d, "[limits]\nclass4_workers = 2\n", &[]);
    let addr = e.http;
    let mut slow = Vec::new();
    for _ in 0..16 {
        let mut c = connect_from("127.0.0.1", addr).await;
        c.write_all(b"POST /v1/run/pick?mode=class4 HTTP/1.1\r\n")
            .await
            .unwrap();
        slow.push(c);
    }
    let dribble = tokio::spawn(async move {
        // One header byte per connection every 100 ms, never finishing the headers.
        for i in 0..40 {
            for c in slow.iter_mut() {
                let _ = c.write_all(&[b'X' + (i % 2) as u8]).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        slow
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Keep-alive runs on 8 other connections (reqwest reuses them).
    let client = http();
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..80 {
        let t = Instant::now();
        let r = client
            .post(format!("http://{addr}/v1/run/pick?mode=class4"))
            .json(&json!({"to": format!("carrier{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            body["result"]["routing"]["carriers"][0],
            format!("carrier{i}"),
            "{body}"
        );
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a run waited {slowest:?} behind slow clients"
    );
    // Three pipelined runs in one write on a fresh connection get three answers in order.
    let mut piped = connect_from("127.0.0.4", addr).await;
    let mut batch = Vec::new();
    for to in ["a", "b", "c"] {
        let body = format!("{{\"to\":\"{to}\"}}");
        batch.extend_from_slice(
            format!(
                "POST /v1/run/pick?mode=class4 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
    piped.write_all(&batch).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen)
        .matches("HTTP/1.1 200")
        .count()
        < 3
    {
        let n = tokio::time::timeout(Duration::from_secs(2), piped.read(&mut buf))
            .await
            .expect("pipelined answers in time")
            .unwrap();
        assert!(n > 0, "closed after {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen);
    let (a, b, c) = (
        text.find("\"a\"").unwrap(),
        text.find("\"b\"").unwrap(),
        text.find("\"c\"").unwrap(),
    );
    assert!(a < b && b < c, "answers out of order: {text}");
    assert!(started.elapsed() < Duration::from_secs(4));
    // The slow clients were still connected (their header deadline is 10 s), so they really
    // were holding the workers' attention while the runs went through.
    let mut slow = dribble.await.unwrap();
    for c in slow.iter_mut() {
        assert!(!closed_within(c, Duration::from_millis(10)).await);
    }
}

// ------------------------------------------------------------ item 13: CDRs across kill -9

/// Call-IDs of the calls whose BYE SIPp received, from its `-trace_msg` file.
fn byes_received(trace: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut lines = trace.lines();
    while let Some(line) = lines.next() {
        if !line.contains("message received") {
            continue;
        }
        let mut message = lines.by_ref().skip_while(|l| l.trim().is_empty());
        let Some(start) = message.next() else { break };
        if !start.starts_with("BYE ") {
            continue;
        }
        if let Some(id) = message
            .take_while(|l| !l.trim().is_empty())
            .find_map(|l| l.strip_prefix("Call-ID:").map(|v| v.trim().to_string()))
        {
            ids.push(id);
        }
    }
    ids
}

#[test]
fn every_call_whose_bye_went_out_has_its_cdr_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    script(
        d,
        "bye.js",
        "async function main(d, ctx) { await ctx.answer(); await ctx.hangup(); }\n",
    );
    let config = format!(
        "[store]\npath = \"{}/cf.db\"\n[sip]\nlisten = [\"udp:127.0.0.1:0\"]\n\
         [[route]]\nmatch = \"^5000$\"\nscript = \"bye.js\"\nmode = \"class5\"\n",
        d.display()
    );
    let mut completed = Vec::new();
    for round in 0..6 {
        let mut e = start(d, &config, &[]);
        let sip = e.udp.unwrap();
        let trace = d.join(format!("trace-{round}.log"));
        let scenario =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sipp/class5_script_bye.xml");
        let port = sip_support::free_port();
        let mut sipp = Command::new("sipp")
            .arg(sip.to_string())
            .arg("-sf")
            .arg(&scenario)
            .args(["-s", "5000", "-i", "127.0.0.1", "-p", &port.to_string()])
            .args(["-mp", &sip_support::free_port().to_string()])
            .args([
                "-r",
                "150",
                "-l",
                "100",
                "-m",
                "600",
                "-recv_timeout",
                "2000",
            ])
            .args(["-nostdin", "-trace_msg", "-message_file"])
            .arg(&trace)
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sipp is installed");
        // Kill the engine at a random moment while calls are going.
        std::thread::sleep(Duration::from_millis(1_000 + fastrand::u64(..1_500)));
        let _ = e.child.kill(); // SIGKILL
        let _ = e.child.wait();
        let _ = sipp.wait();
        let ids = byes_received(&std::fs::read_to_string(&trace).unwrap_or_default());
        completed.extend(ids);
    }
    assert!(
        completed.len() > 300,
        "enough calls completed to mean something: {}",
        completed.len()
    );
    let db = rusqlite::Connection::open(d.join("cf.db")).unwrap();
    let mut stmt = db.prepare("SELECT call_id FROM cdrs").unwrap();
    let stored: std::collections::HashSet<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let missing: Vec<&String> = completed
        .iter()
        .filter(|id| !stored.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} calls whose BYE went out have no CDR: {:?}",
        missing.len(),
        completed.len(),
        &missing[..missing.len().min(10)]
    );
}

/// The CDRs in the store's `cdrs` table, by Call-ID.
fn stored_cdr_ids(db: &Path) -> std::collections::HashSet<String> {
    let db = rusqlite::Connection::open(db).unwrap();
    let mut stmt = db.prepare("SELECT call_id FROM cdrs").unwrap();
    let ids = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    ids
}

/// The BYE the bridge code sends (the far end hung up, `hangupAfterBridge`) follows the
/// CDR's commit too, not only the script's own hang-up.
#[test]
fn every_bridged_call_whose_bye_went_out_has_its_cdr_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let uas_port = sip_support::free_port();
    script(
        d,
        "bridge.js",
        &format!(
            "async function main(d, ctx) {{ await ctx.answer(); \
             await ctx.bridge(\"sip:far@127.0.0.1:{uas_port}\", {{ timeout: 5 }}); \
             await new Promise((r) => setTimeout(r, 50)); }}\n"
        ),
    );
    let config = format!(
        "[store]\npath = \"{}/cf.db\"\n[sip]\nlisten = [\"udp:127.0.0.1:0\"]\n\
         [[route]]\nmatch = \"^5000$\"\nscript = \"bridge.js\"\nmode = \"class5\"\n",
        d.display()
    );
    let sipp_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sipp");
    let mut completed = Vec::new();
    for round in 0..6 {
        let mut e = start(d, &config, &[]);
        let sip = e.udp.unwrap();
        // The far end answers and hangs up 100 ms later; callforge then ends the caller leg.
        let mut uas = Command::new("sipp")
            .arg("-sf")
            .arg(sipp_dir.join("uas_answer_then_bye.xml"))
            .args(["-i", "127.0.0.1", "-p", &uas_port.to_string()])
            .args(["-mp", &sip_support::free_port().to_string()])
            .args(["-d", "100", "-nostdin"])
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sipp is installed");
        let trace = d.join(format!("bridge-trace-{round}.log"));
        let mut sipp = Command::new("sipp")
            .arg(sip.to_string())
            .arg("-sf")
            .arg(sipp_dir.join("class5_script_bye.xml"))
            .args(["-s", "5000", "-i", "127.0.0.1"])
            .args(["-p", &sip_support::free_port().to_string()])
            .args(["-mp", &sip_support::free_port().to_string()])
            .args(["-r", "60", "-l", "60", "-m", "250"])
            .args([
                "-recv_timeout",
                "3000",
                "-nostdin",
                "-trace_msg",
                "-message_file",
            ])
            .arg(&trace)
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sipp is installed");
        // Kill the engine at a random moment while bridged calls are ending.
        std::thread::sleep(Duration::from_millis(1_000 + fastrand::u64(..1_500)));
        let _ = e.child.kill(); // SIGKILL
        let _ = e.child.wait();
        let _ = sipp.wait();
        let _ = uas.kill();
        let _ = uas.wait();
        completed.extend(byes_received(
            &std::fs::read_to_string(&trace).unwrap_or_default(),
        ));
    }
    assert!(
        completed.len() > 100,
        "enough bridged calls completed to mean something: {}",
        completed.len()
    );
    let stored = stored_cdr_ids(&d.join("cf.db"));
    let missing: Vec<&String> = completed
        .iter()
        .filter(|id| !stored.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} bridged calls whose BYE went out have no CDR: {:?}",
        missing.len(),
        completed.len(),
        &missing[..missing.len().min(10)]
    );
}

// ------------------------------------------------------------- item 12: shedding early

#[tokio::test]
async fn invites_get_503_with_retry_after_at_once_while_the_script_workers_are_saturated() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    script(d, "route.js", REDIRECT);
    script(d, "spin.js", "function main() { while (true) {} }\n");
    let e = start(
        d,
        "[limits]\nclass4_workers = 1\nscript_cpu_ms = 4000\n\
         [sip]\nlisten = [\"udp:127.0.0.1:0\"]\nshed_lag_ms = 100\n\
         [[route]]\nmatch = \"^44\"\nscript = \"route.js\"\nmode = \"class4\"\n",
        &[],
    );
    let sip = e.udp.unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(invite_final(&sock, sip, "447700900555").await.0, 302);
    // A class4 run that spins holds the only routing worker for 4 s.
    let base = e.http;
    let spin = tokio::spawn(async move {
        http()
            .post(format!("http://{base}/v1/run/spin?mode=class4"))
            .json(&json!({}))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    // INVITEs every 300 ms while the spin holds the worker: once it is seen to lag, one is
    // answered 503 at once (queued ones would only get their 302 after the spin).
    let local = sock.local_addr().unwrap();
    let mut buf = vec![0u8; 65_536];
    let until = Instant::now() + Duration::from_millis(3_500);
    let mut shed = None;
    while shed.is_none() && Instant::now() < until && !spin.is_finished() {
        let call_id = format!("shed{}", fastrand::u64(..));
        sock.send_to(invite("447700900555", local, sip, &call_id).as_bytes(), sip)
            .await
            .unwrap();
        let asked = Instant::now();
        while asked.elapsed() < Duration::from_millis(300) {
            let left = Duration::from_millis(300).saturating_sub(asked.elapsed());
            let Ok(Ok((n, _))) = tokio::time::timeout(left, sock.recv_from(&mut buf)).await else {
                break;
            };
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            let fin = status_of(&buf[..n]).filter(|c| *c >= 200);
            if text.contains(&call_id) && fin.is_some() {
                // A 302 this early means the spin had not started yet: try again.
                if fin == Some(503) {
                    shed = Some(text);
                }
                break;
            }
        }
    }
    let answer = shed.expect("an INVITE answered at once while the worker was held");
    assert!(answer.starts_with("SIP/2.0 503"), "{answer}");
    assert!(answer.contains("Retry-After: "), "{answer}");
    assert_eq!(spin.await.unwrap().unwrap(), 422);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The queued INVITEs' 302s may still be on their way: fresh ones are admitted again.
    let mut code = 0;
    for _ in 0..5 {
        code = invite_final(&sock, sip, "447700900555").await.0;
        if code == 302 {
            break;
        }
    }
    assert_eq!(code, 302, "admitted again once the workers caught up");
}
