//! `[sip] fast_path = true`: class4 INVITEs answered on the routing workers' own sockets.
//! Each test checks an answer against the general path's (the same server without the fast
//! path) or against RFC 3261's transaction rules, over real UDP on 127.0.0.1.

mod sip_support;

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use sip_support::{assert_all_ok, sipp, start, start_with_top, ROOT};

const FAST: &str = "fast_path = true\n";
const GENERAL: &str = "fast_path = false\n";

fn sdp() -> &'static str {
    "v=0\r\no=t 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n"
}

fn invite(user: &str, branch: &str, local: SocketAddr, extra: &str) -> String {
    format!(
        "INVITE sip:{user}@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK{branch};rport\r\nVia: SIP/2.0/UDP 10.9.9.9:5060;branch=z9hG4bKup{branch}\r\nFrom: <sip:441000000000@127.0.0.1>;tag=f{branch}\r\nTo: <sip:{user}@127.0.0.1>\r\nCall-ID: {branch}@test\r\nCSeq: 1 INVITE\r\nContact: <sip:t@{local}>\r\nMax-Forwards: 70\r\nX-Account-ID: 1001\r\n{extra}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{}",
        sdp().len(),
        sdp()
    )
}

/// The ACK or CANCEL of [`invite`]'s transaction (same branch); `to` is the To to send.
fn in_transaction(method: &str, user: &str, branch: &str, local: SocketAddr, to: &str) -> String {
    format!(
        "{method} sip:{user}@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK{branch};rport\r\nFrom: <sip:441000000000@127.0.0.1>;tag=f{branch}\r\nTo: {to}\r\nCall-ID: {branch}@test\r\nCSeq: 1 {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
}

fn client() -> (UdpSocket, SocketAddr) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let local = sock.local_addr().unwrap();
    (sock, local)
}

/// Every datagram received within `wait`.
fn receive_for(sock: &UdpSocket, wait: Duration) -> Vec<String> {
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 65_536];
    let mut got = Vec::new();
    while Instant::now() < deadline {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
    got
}

/// The first final response to `call_id` (1xx skipped).
fn final_for(sock: &UdpSocket, call_id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < deadline {
        let Ok((n, _)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        if !text.starts_with("SIP/2.0 1") && text.contains(call_id) {
            return text;
        }
    }
    panic!("no final response for {call_id}");
}

fn ask(sock: &UdpSocket, server: SocketAddr, msg: &str, call_id: &str) -> String {
    sock.send_to(msg.as_bytes(), server).unwrap();
    final_for(sock, call_id)
}

fn header<'a>(resp: &'a str, name: &str) -> Option<&'a str> {
    resp.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

/// The response with the To tag (random per call) replaced.
fn without_tag(resp: &str) -> String {
    resp.lines()
        .map(|l| match l.split_once(";tag=") {
            Some((head, _)) if l.starts_with("To: ") => format!("{head};tag=X"),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The value of `callforge_class4_decisions_total{code}` in /metrics.
async fn decisions(http: SocketAddr, code: u16) -> u64 {
    let text = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("callforge_class4_decisions_total") && l.contains(&format!("\"{code}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[tokio::test]
async fn the_fast_302_is_the_general_paths_and_agrees_with_http() {
    let (fast, general) = (start(FAST), start(GENERAL));
    let (sock, local) = client();
    for (user, branch) in [
        ("447700900555", "eq1"),
        ("447700900123", "eq2"),
        ("6000", "eq3"),
    ] {
        let a = ask(
            &sock,
            fast.udp,
            &invite(user, &format!("{branch}a"), local, ""),
            &format!("{branch}a@test"),
        );
        let b = ask(
            &sock,
            general.udp,
            &invite(user, &format!("{branch}b"), local, ""),
            &format!("{branch}b@test"),
        );
        assert_eq!(
            without_tag(&a).replace(&format!("{branch}a"), "B"),
            without_tag(&b).replace(&format!("{branch}b"), "B"),
            "fast:\n{a}\ngeneral:\n{b}"
        );
        assert!(header(&a, "To").unwrap().contains(";tag="), "{a}");
    }
    // The 5-carrier answer, and HTTP gives the same carriers in the same order.
    let resp = ask(
        &sock,
        fast.udp,
        &invite("447700900555", "eq4", local, ""),
        "eq4@test",
    );
    assert!(
        resp.starts_with("SIP/2.0 302 Moved Temporarily\r\n"),
        "{resp}"
    );
    let contacts: Vec<&str> = resp
        .lines()
        .filter_map(|l| l.strip_prefix("Contact: "))
        .collect();
    assert_eq!(contacts.len(), 3, "{resp}");
    let carriers: Value = toml::from_str(
        &std::fs::read_to_string(format!("{ROOT}/tests/sipp/carriers.toml")).unwrap(),
    )
    .unwrap();
    let body = json!({"routing": {
        "cli": "441000000000", "dest_number": "447700900555", "account_id": 1001,
        "egress_routing": carriers["routing"]["egress_routing"],
    }});
    let http: Value = reqwest::Client::new()
        .post(format!("http://{}/v1/run/routing?mode=class4", fast.http))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = http["result"]["routing"]["egress_routing"]
        .as_array()
        .unwrap();
    assert_eq!(entries.len(), contacts.len(), "{http}");
    for (entry, contact) in entries.iter().zip(&contacts) {
        let (gw, conf) = entry["gw"].as_object().unwrap().iter().next().unwrap();
        assert!(
            contact.starts_with(&format!("<sip:447700900555@{gw}.example.net:5060>")),
            "{contact}"
        );
        let cli = conf["cli"].as_str().unwrap();
        assert!(contact.contains(&format!(";cli=\"{cli}\"")), "{contact}");
    }
}

#[tokio::test]
async fn a_retransmitted_invite_gets_the_same_302_and_runs_the_script_once() {
    let s = start(FAST);
    let (sock, local) = client();
    let msg = invite("447700900555", "rtx1", local, "");
    let first = ask(&sock, s.udp, &msg, "rtx1@test");
    let second = ask(&sock, s.udp, &msg, "rtx1@test");
    assert_eq!(first, second);
    assert_eq!(decisions(s.http, 302).await, 1);
    // No 100 Trying for an immediate answer: only the 302 (and its timer G copies) came.
    sock.send_to(invite("447700900555", "rtx2", local, "").as_bytes(), s.udp)
        .unwrap();
    let got = receive_for(&sock, Duration::from_millis(300));
    assert!(
        !got.is_empty() && got.iter().all(|r| r.starts_with("SIP/2.0 302 ")),
        "{got:?}"
    );
}

#[test]
fn the_ack_stops_the_302s_retransmissions() {
    let s = start(FAST);
    let (sock, local) = client();
    let resp = ask(
        &sock,
        s.udp,
        &invite("447700900555", "ack1", local, ""),
        "ack1@test",
    );
    // Not ACKed: timer G sends the 302 again after T1 (500 ms), then 1 s later.
    let again = receive_for(&sock, Duration::from_millis(1000));
    assert!(again.contains(&resp), "no retransmission: {again:?}");
    let to = header(&resp, "To").unwrap();
    sock.send_to(
        in_transaction("ACK", "447700900555", "ack1", local, to).as_bytes(),
        s.udp,
    )
    .unwrap();
    let after = receive_for(&sock, Duration::from_millis(2500));
    assert!(after.is_empty(), "answers after the ACK: {after:?}");
}

#[test]
fn a_cancel_after_the_answer_gets_200_and_changes_nothing() {
    let s = start(FAST);
    let (sock, local) = client();
    let resp = ask(
        &sock,
        s.udp,
        &invite("447700900555", "can1", local, ""),
        "can1@test",
    );
    assert!(resp.starts_with("SIP/2.0 302 "), "{resp}");
    sock.send_to(
        in_transaction(
            "CANCEL",
            "447700900555",
            "can1",
            local,
            "<sip:447700900555@127.0.0.1>",
        )
        .as_bytes(),
        s.udp,
    )
    .unwrap();
    let got = receive_for(&sock, Duration::from_millis(700));
    let ok = got
        .iter()
        .find(|r| r.contains("CSeq: 1 CANCEL"))
        .unwrap_or_else(|| panic!("no answer to the CANCEL: {got:?}"));
    assert!(ok.starts_with("SIP/2.0 200 OK\r\n"), "{ok}");
    assert!(!got.iter().any(|r| r.starts_with("SIP/2.0 487")), "{got:?}");
    // A CANCEL that names no transaction is the general path's: 481.
    sock.send_to(
        in_transaction(
            "CANCEL",
            "447700900555",
            "nothing",
            local,
            "<sip:447700900555@127.0.0.1>",
        )
        .as_bytes(),
        s.udp,
    )
    .unwrap();
    let resp = final_for(&sock, "nothing@test");
    assert!(resp.starts_with("SIP/2.0 481 "), "{resp}");
}

#[test]
fn class5_options_and_unrouted_go_through_the_general_path_on_the_same_port() {
    let s = start(FAST);
    let (sock, local) = client();
    let resp = ask(&sock, s.udp, &invite("5003", "c5", local, ""), "c5@test");
    assert!(resp.starts_with("SIP/2.0 486 "), "{resp}");
    let resp = ask(&sock, s.udp, &invite("999", "nr", local, ""), "nr@test");
    assert!(resp.starts_with("SIP/2.0 404 No Route"), "{resp}");
    let options = format!(
        "OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKopt\r\nFrom: <sip:probe@127.0.0.1>;tag=o\r\nTo: <sip:127.0.0.1>\r\nCall-ID: opt@test\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    );
    let resp = ask(&sock, s.udp, &options, "opt@test");
    assert!(resp.starts_with("SIP/2.0 200 OK"), "{resp}");
    // A compact-form INVITE is left to the general path, which still answers it 302.
    let compact = invite("447700900555", "cf", local, "").replace("Call-ID: ", "i: ");
    let resp = ask(&sock, s.udp, &compact, "cf@test");
    assert!(resp.starts_with("SIP/2.0 302 "), "{resp}");
    // Over TCP nothing changed.
    let run = sipp(
        "redirect",
        s.tcp,
        "447700900555",
        5,
        &["-t", "t1", "-r", "10"],
    );
    assert_all_ok(&run, 5);
}

#[test]
fn the_acl_the_rate_limit_and_the_route_acl_apply_on_both_paths() {
    let (sock, local) = client();
    for (label, sip) in [("fast", FAST), ("general", GENERAL)] {
        let s = start(&format!("{sip}allow = [\"10.1.1.1\"]\n"));
        let resp = ask(
            &sock,
            s.udp,
            &invite("447700900555", &format!("acl{label}"), local, ""),
            &format!("acl{label}@test"),
        );
        assert!(resp.starts_with("SIP/2.0 403 "), "{label}: {resp}");
        let s = start(&format!("{sip}rate_per_source = 2\n"));
        let mut codes = Vec::new();
        for i in 0..5 {
            let resp = ask(
                &sock,
                s.udp,
                &invite("447700900555", &format!("rate{label}{i}"), local, ""),
                &format!("rate{label}{i}@test"),
            );
            codes.push(resp[8..11].to_string());
        }
        assert_eq!(
            codes.iter().filter(|c| *c == "302").count(),
            2,
            "{label}: {codes:?}"
        );
        assert_eq!(
            codes.iter().filter(|c| *c == "503").count(),
            3,
            "{label}: {codes:?}"
        );
        // A route's own allow list: 403, the same response from both paths.
        let acl = "[[route]]\nmatch = \"^4477$\"\nscript = \"routing.js\"\nmode = \"class4\"\nallow = [\"10.9.9.9\"]\n";
        let s = start_with_top(acl, sip);
        let resp = ask(
            &sock,
            s.udp,
            &invite("4477", &format!("racl{label}"), local, ""),
            &format!("racl{label}@test"),
        );
        assert!(
            resp.starts_with("SIP/2.0 403 Forbidden\r\n"),
            "{label}: {resp}"
        );
    }
}

#[test]
fn malformed_invites_get_the_general_paths_answers_and_the_server_keeps_serving() {
    let (fast, general) = (start(FAST), start(GENERAL));
    let (sock, local) = client();
    let cases: Vec<(&str, String)> = vec![
        (
            "dup",
            invite("447700900555", "m1", local, "")
                .replace("CSeq: 1 INVITE\r\n", "CSeq: 1 INVITE\r\nCSeq: 2 INVITE\r\n"),
        ),
        (
            "cseq",
            invite("447700900555", "m2", local, "").replace("CSeq: 1 INVITE", "CSeq: 1 BYE"),
        ),
        (
            "length",
            invite("447700900555", "m3", local, "")
                .replace("Content-Length: ", "Content-Length: 9"),
        ),
        (
            "sdp",
            invite("447700900555", "m4", local, "").replace("v=0", "x=0"),
        ),
        (
            "require",
            invite("447700900555", "m5", local, "Require: 100rel\r\n"),
        ),
        (
            "max-forwards",
            invite("447700900555", "m6", local, "").replace("Max-Forwards: 70", "Max-Forwards: 0"),
        ),
        (
            "ctype",
            invite("447700900555", "m7", local, "").replace("application/sdp", "text/plain"),
        ),
        (
            "via",
            invite("447700900555", "m8", local, "").replace(";rport", ";;rport"),
        ),
    ];
    for (what, msg) in &cases {
        let cid = msg
            .lines()
            .find_map(|l| l.strip_prefix("Call-ID: "))
            .unwrap()
            .to_string();
        let a = ask(&sock, fast.udp, msg, &cid);
        let b = ask(&sock, general.udp, msg, &cid);
        assert_eq!(
            a.lines().next(),
            b.lines().next(),
            "{what}: fast\n{a}\ngeneral\n{b}"
        );
    }
    for junk in [
        &b"INVITE \xff\xfe\r\n\r\n"[..],
        b"INVITE sip:x SIP/2.0\r\n\r\n",
        b"ACK",
        b"CANCEL x",
    ] {
        sock.send_to(junk, fast.udp).unwrap();
    }
    let resp = ask(
        &sock,
        fast.udp,
        &invite("447700900555", "after", local, ""),
        "after@test",
    );
    assert!(resp.starts_with("SIP/2.0 302 "), "{resp}");
}

#[tokio::test]
async fn draining_refuses_new_invites_on_the_fast_path_too() {
    let s = start(FAST);
    let (sock, local) = client();
    let resp = ask(
        &sock,
        s.udp,
        &invite("447700900555", "d1", local, ""),
        "d1@test",
    );
    assert!(resp.starts_with("SIP/2.0 302 "), "{resp}");
    // A live class5 call (answered, never ACKed: it lasts through timer H) keeps the
    // draining server up.
    let resp = ask(
        &sock,
        s.udp,
        &invite("5001", "live", local, ""),
        "live@test",
    );
    assert!(resp.starts_with("SIP/2.0 200 "), "{resp}");
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/admin/drain", s.http))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let resp = ask(
        &sock,
        s.udp,
        &invite("447700900555", "d2", local, ""),
        "d2@test",
    );
    assert!(resp.starts_with("SIP/2.0 503 "), "{resp}");
}

#[test]
fn sipp_redirect_load_with_the_fast_path() {
    let s = start(FAST);
    let run = sipp("redirect", s.udp, "447700900555", 200, &["-r", "200"]);
    assert_all_ok(&run, 200);
    let run = sipp("reject_604", s.udp, "447700900123", 50, &["-r", "100"]);
    assert_all_ok(&run, 50);
    let run = sipp(
        "redirect",
        s.udp,
        "447700900555",
        100,
        &["-r", "100", "-lost", "10"],
    );
    assert_all_ok(&run, 100);
}

/// A class4 route whose script takes 1.5 s (it awaits a timer), in front of the shared ones.
const SLOW_ROUTE: &str =
    "[[route]]\nmatch = \"^7777$\"\nscript = \"slow.js\"\nmode = \"class4\"\nvars = \"carriers.toml\"\n";

#[test]
fn while_the_script_runs_a_retransmission_gets_100_and_a_cancel_gets_200_and_487() {
    let s = start_with_top(SLOW_ROUTE, FAST);
    std::fs::write(
        s.dir.path().join("scripts/slow.js"),
        "async function main(d) { await new Promise((r) => setTimeout(r, 1500)); return d; }\n",
    )
    .unwrap();
    let (sock, local) = client();
    let msg = invite("7777", "slow1", local, "");
    sock.send_to(msg.as_bytes(), s.udp).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    sock.send_to(msg.as_bytes(), s.udp).unwrap();
    let got = receive_for(&sock, Duration::from_millis(400));
    assert!(
        got.len() == 1 && got[0].starts_with("SIP/2.0 100 Trying\r\n"),
        "{got:?}"
    );
    sock.send_to(
        in_transaction("CANCEL", "7777", "slow1", local, "<sip:7777@127.0.0.1>").as_bytes(),
        s.udp,
    )
    .unwrap();
    let got = receive_for(&sock, Duration::from_millis(2500));
    let statuses: Vec<&str> = got.iter().map(|r| &r[..11]).collect();
    assert!(
        got.iter()
            .any(|r| r.starts_with("SIP/2.0 200 OK") && r.contains("CSeq: 1 CANCEL")),
        "{statuses:?}"
    );
    let terminated = got
        .iter()
        .find(|r| r.starts_with("SIP/2.0 487 "))
        .unwrap_or_else(|| panic!("no 487: {statuses:?}"));
    assert!(terminated.contains("CSeq: 1 INVITE"), "{terminated}");
    assert!(
        !got.iter().any(|r| r.starts_with("SIP/2.0 302")),
        "{statuses:?}"
    );
    // The ACK of the 487 ends its retransmissions.
    let to = header(terminated, "To").unwrap();
    sock.send_to(
        in_transaction("ACK", "7777", "slow1", local, to).as_bytes(),
        s.udp,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let after = receive_for(&sock, Duration::from_millis(1500));
    assert!(after.is_empty(), "{after:?}");
}

/// The fast path joins a port with `SO_REUSEPORT`, which would let it share a port another
/// process holds the same way: the first bind is plain, so the engine still refuses to start.
#[test]
fn a_port_held_by_another_socket_even_with_reuseport_is_refused_loudly() {
    use socket2::{Domain, Protocol, Socket, Type};
    let held = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    held.set_reuse_port(true).unwrap();
    held.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let port = held.local_addr().unwrap().as_socket().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("callforge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[sip]\nlisten = [\"udp:127.0.0.1:{port}\"]\nfast_path = true\n[[route]]\nmatch = \"^44\"\nscript = \"routing.js\"\nmode = \"class4\"\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(sip_support::BIN)
        .args(["serve", "--http", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .args(["--scripts", &format!("{ROOT}/scripts")])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started on a held port: {err}");
    assert!(err.contains("already in use"), "{err}");
}
