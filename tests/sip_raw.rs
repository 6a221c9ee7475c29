//! `callforge serve` with SIP, driven by hand-written messages over UDP/TCP: answers SIPp's
//! scenarios cannot check field by field (SIP vs HTTP parity, 404, timeout action, class5
//! reject headers) and a corpus of malformed messages the server must survive.

mod sip_support;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use sip_support::{start, ROOT};

fn invite(user: &str, branch: &str, local: SocketAddr, transport: &str, extra: &str) -> String {
    let sdp = "v=0\r\no=t 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n";
    format!(
        "INVITE sip:{user}@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/{transport} {local};branch=z9hG4bK{branch};rport\r\nFrom: <sip:441000000000@127.0.0.1>;tag=f{branch}\r\nTo: <sip:{user}@127.0.0.1>\r\nCall-ID: {branch}@test\r\nCSeq: 1 INVITE\r\nContact: <sip:t@{local}>\r\nMax-Forwards: 70\r\n{extra}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    )
}

fn options(branch: &str, local: SocketAddr, transport: &str) -> String {
    format!(
        "OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/{transport} {local};branch=z9hG4bK{branch}\r\nFrom: <sip:probe@127.0.0.1>;tag=o{branch}\r\nTo: <sip:127.0.0.1>\r\nCall-ID: {branch}@test\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
}

/// Sends `msg` over UDP and returns the first final (non-1xx) response for its Call-ID.
fn udp_final(sock: &UdpSocket, to: SocketAddr, msg: &str, call_id: &str) -> String {
    sock.send_to(msg.as_bytes(), to).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < deadline {
        let Ok((n, _)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        if text.starts_with("SIP/2.0 1") || !text.contains(call_id) {
            continue;
        }
        return text;
    }
    panic!("no final response for {call_id}");
}

fn udp_client() -> (UdpSocket, SocketAddr) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let local = sock.local_addr().unwrap();
    (sock, local)
}

fn status_line(resp: &str) -> &str {
    resp.lines().next().unwrap_or_default()
}

fn contacts(resp: &str) -> Vec<String> {
    resp.lines()
        .filter_map(|l| l.strip_prefix("Contact: "))
        .map(|s| s.trim().to_string())
        .collect()
}

#[tokio::test]
async fn sip_302_and_http_class4_agree() {
    let s = start("");
    let (sock, local) = udp_client();
    let resp = udp_final(
        &sock,
        s.udp,
        &invite("447700900555", "par1", local, "UDP", ""),
        "par1@test",
    );
    assert!(status_line(&resp).starts_with("SIP/2.0 302 "), "{resp}");
    let sip_contacts = contacts(&resp);

    // The same data over HTTP: the routing facts plus the carriers the route's vars add.
    let carriers: Value = toml::from_str(
        &std::fs::read_to_string(format!("{ROOT}/tests/sipp/carriers.toml")).unwrap(),
    )
    .unwrap();
    let body = json!({"routing": {
        "cli": "441000000000", "dest_number": "447700900555", "account_id": null,
        "egress_routing": carriers["routing"]["egress_routing"],
    }});
    let http: Value = reqwest::Client::new()
        .post(format!("http://{}/v1/run/routing?mode=class4", s.http))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = http["result"]["routing"]["egress_routing"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        entries.len(),
        sip_contacts.len(),
        "{http} vs {sip_contacts:?}"
    );
    for (entry, contact) in entries.iter().zip(&sip_contacts) {
        let (gw, conf) = entry["gw"].as_object().unwrap().iter().next().unwrap();
        let uri = format!("<sip:447700900555@{gw}.example.net:5060>");
        assert!(
            contact.starts_with(&uri),
            "{contact} should start with {uri}"
        );
        let cli = conf["cli"].as_str().unwrap();
        assert!(
            contact.contains(&format!(";cli=\"{cli}\"")),
            "{contact} lacks cli {cli}"
        );
        for h in entry["headers"].as_array().unwrap() {
            let p = format!(
                ";{}=\"{}\"",
                h["key"].as_str().unwrap(),
                h["value"].as_str().unwrap()
            );
            assert!(contact.contains(&p), "{contact} lacks {p}");
        }
    }
    // q strictly descending.
    let qs: Vec<f64> = sip_contacts
        .iter()
        .map(|c| {
            c.split(";q=")
                .nth(1)
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(qs.windows(2).all(|w| w[0] > w[1]), "{qs:?}");

    // The DNC script rejects the same way over both.
    let resp = udp_final(
        &sock,
        s.udp,
        &invite("447700900123", "par2", local, "UDP", ""),
        "par2@test",
    );
    assert_eq!(status_line(&resp), "SIP/2.0 604 Number on DNC List");
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/run/dnc?mode=class4", s.http))
        .json(&json!({"routing": {"dest_number": "447700900123"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["error"],
        json!({"code": 604, "message": "Number on DNC List"})
    );
}

#[test]
fn unmatched_failed_and_rejected_calls_get_their_statuses() {
    let s = start("");
    let (sock, local) = udp_client();
    let resp = udp_final(
        &sock,
        s.udp,
        &invite("999", "st1", local, "UDP", ""),
        "st1@test",
    );
    assert_eq!(status_line(&resp), "SIP/2.0 404 No Route");
    // broken.js throws a TypeError: a script failure, which this route maps to 503.
    let resp = udp_final(
        &sock,
        s.udp,
        &invite("6000", "st2", local, "UDP", ""),
        "st2@test",
    );
    assert!(status_line(&resp).starts_with("SIP/2.0 503 "), "{resp}");
    // Class 5 reject with a header the script set.
    let resp = udp_final(
        &sock,
        s.udp,
        &invite("5003", "st3", local, "UDP", ""),
        "st3@test",
    );
    assert_eq!(status_line(&resp), "SIP/2.0 486 Busy Here");
    assert!(resp.contains("X-Reason: closed"), "{resp}");
    // Class 5 answer carrying the header the script set; core-owned names are not added.
    let resp = udp_final(
        &sock,
        s.udp,
        &invite("5004", "st5", local, "UDP", ""),
        "st5@test",
    );
    assert!(status_line(&resp).starts_with("SIP/2.0 200"), "{resp}");
    assert!(resp.contains("X-Call-Tag: vip-441000000000"), "{resp}");
    assert_eq!(resp.matches("Via:").count(), 1, "{resp}");
    assert!(resp.contains("m=audio "), "{resp}");
    // P-Asserted-Identity is the CLI the script sees; the route still redirects.
    let resp = udp_final(
        &sock,
        s.udp,
        &invite(
            "447700900555",
            "st4",
            local,
            "UDP",
            "P-Asserted-Identity: <sip:+15550001@x>\r\n",
        ),
        "st4@test",
    );
    assert!(status_line(&resp).starts_with("SIP/2.0 302"), "{resp}");
}

/// Broken messages: truncated, bad Content-Length, binary garbage, missing Via/Call-ID/CSeq,
/// huge headers. Each may get an error response or be dropped; none may stop the server.
fn corpus(local: SocketAddr, transport: &str) -> Vec<Vec<u8>> {
    let good = invite("447700900555", "bad0", local, transport, "");
    let strip = |name: &str| -> Vec<u8> {
        good.lines()
            .filter(|l| !l.starts_with(name))
            .map(|l| format!("{l}\r\n"))
            .collect::<String>()
            .into_bytes()
    };
    let mut out = vec![
        good.as_bytes()[..good.len() / 2].to_vec(),
        good.replace("Content-Length: ", "Content-Length: 9")
            .into_bytes(),
        good.replace("Content-Length: ", "Content-Length: -")
            .into_bytes(),
        strip("Via:"),
        strip("Call-ID:"),
        strip("CSeq:"),
        strip("From:"),
        b"\x00\xff\xfe\x01garbage\r\n\r\n".to_vec(),
        (0..2000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect(),
        b"INVITE\r\n\r\n".to_vec(),
        b"SIP/2.0 200 OK\r\n\r\n".to_vec(),
        good.replace("SIP/2.0\r\n", "SIP/9.9\r\n").into_bytes(),
        good.replace("CSeq: 1 INVITE", "CSeq: x INVITE")
            .into_bytes(),
        good.replace(
            "Max-Forwards: 70\r\n",
            &format!("X-Huge: {}\r\n", "a".repeat(70_000)),
        )
        .into_bytes(),
        good.replace("Max-Forwards: 70\r\n", &"X-Many: 1\r\n".repeat(2_000))
            .into_bytes(),
    ];
    // UTF-8 breakage inside a header value.
    let mut bad_utf8 = good.clone().into_bytes();
    if let Some(i) = bad_utf8.windows(4).position(|w| w == b"From") {
        bad_utf8[i + 8] = 0xC3;
    }
    out.push(bad_utf8);
    out
}

#[test]
fn malformed_messages_over_udp_leave_the_server_serving() {
    let s = start("");
    let (sock, local) = udp_client();
    for msg in corpus(local, "UDP") {
        sock.send_to(&msg, s.udp).unwrap_or(0);
    }
    std::thread::sleep(Duration::from_millis(200));
    let resp = udp_final(&sock, s.udp, &options("ok1", local, "UDP"), "ok1@test");
    assert!(status_line(&resp).starts_with("SIP/2.0 200"), "{resp}");
    let resp = udp_final(
        &sock,
        s.udp,
        &invite("447700900555", "ok2", local, "UDP", ""),
        "ok2@test",
    );
    assert!(status_line(&resp).starts_with("SIP/2.0 302"), "{resp}");
}

#[test]
fn malformed_messages_over_tcp_leave_the_server_serving() {
    let s = start("");
    for msg in corpus("127.0.0.1:9".parse().unwrap(), "TCP") {
        // One connection per message: the server may close a connection it cannot frame.
        if let Ok(mut c) = TcpStream::connect(s.tcp) {
            c.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let _ = c.write_all(&msg);
            let mut sink = [0u8; 4096];
            let _ = c.read(&mut sink);
        }
    }
    let mut c = TcpStream::connect(s.tcp).unwrap();
    let local = c.local_addr().unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(options("tok", local, "TCP").as_bytes())
        .unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while !got.contains("\r\n\r\n") && Instant::now() < deadline {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(_) => {}
        }
    }
    assert!(got.starts_with("SIP/2.0 200"), "{got}");
    // And the UDP side still routes calls.
    let (sock, local) = udp_client();
    let resp = udp_final(
        &sock,
        s.udp,
        &invite("447700900555", "tok2", local, "UDP", ""),
        "tok2@test",
    );
    assert!(status_line(&resp).starts_with("SIP/2.0 302"), "{resp}");
}

#[test]
fn crlf_keep_alives_get_no_answer_and_no_warning() {
    // RFC 5626 §3.5.1 CRLF keep-alives, and the bare CRLF phones send through NAT every 30 s.
    let log = tempfile::NamedTempFile::new().unwrap();
    let s = sip_support::start_logging("", Some(log.path()));
    let (sock, local) = udp_client();
    // And STUN Binding requests (RFC 5389), the other keep-alive of RFC 5626.
    let stun = [
        0x00u8, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2,
    ];
    for _ in 0..5 {
        sock.send_to(b"\r\n\r\n", s.udp).unwrap();
        sock.send_to(b"\r\n", s.udp).unwrap();
        sock.send_to(&stun, s.udp).unwrap();
    }
    // An OPTIONS sent after them is answered, so they have been read by then.
    let resp = udp_final(&sock, s.udp, &options("ka1", local, "UDP"), "ka1@test");
    assert_eq!(status_line(&resp), "SIP/2.0 200 OK");
    let mut buf = [0u8; 2048];
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            text.contains("ka1@test"),
            "only the OPTIONS is answered: {text:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert!(
        !text.contains("WARN"),
        "keep-alives logged a warning:\n{text}"
    );
}
