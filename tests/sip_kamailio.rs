//! callforge behind a real record-routing, stateful proxy: Debian's Kamailio, started by the
//! test with a generated minimal configuration (record_route + t_relay, loose_route for
//! in-dialog requests, 404 for an in-dialog request that carries no Route) on random
//! loopback ports. SIPp places calls through it; they must end cleanly whether the caller or
//! the script hangs up, which needs our 2xx to carry the proxy's Record-Route (RFC 3261
//! §12.1.1) and our own BYE to follow the route set. Also checks the Kamailio configuration
//! that tests/load/compare_kamailio_redirect.sh benchmarks against.

mod sip_support;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sip_support::{assert_all_ok, free_port, sipp, start};

/// Where Debian (or a source build) keeps Kamailio's modules.
fn module_dir() -> PathBuf {
    let mut candidates: Vec<PathBuf> = [
        "/usr/lib/x86_64-linux-gnu/kamailio/modules",
        "/usr/lib/aarch64-linux-gnu/kamailio/modules",
        "/usr/lib/kamailio/modules",
        "/usr/local/lib64/kamailio/modules",
        "/usr/local/lib/kamailio/modules",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    if let Ok(dirs) = std::fs::read_dir("/usr/lib") {
        candidates.extend(dirs.flatten().map(|d| d.path().join("kamailio/modules")));
    }
    candidates
        .into_iter()
        .find(|d| d.join("tm.so").is_file())
        .expect("Kamailio's modules (Debian package kamailio; tools/ensure-deps.sh --test)")
}

/// A running Kamailio, killed on drop; its log is kept for assertions.
struct Proxy {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(port: u16, next_hop: SocketAddr, modules: &Path) -> String {
    format!(
        r#"#!KAMAILIO
debug=2
log_stderror=yes
children=2
auto_aliases=no
listen=udp:127.0.0.1:{port}
alias="127.0.0.1:{port}"
mpath="{modules}"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "textops.so"

request_route {{
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}
    if (is_method("CANCEL")) {{
        if (t_check_trans()) {{
            t_relay();
        }}
        exit;
    }}
    if (has_totag()) {{
        if (loose_route()) {{
            t_relay();
            exit;
        }}
        if (is_method("ACK")) {{
            if (t_check_trans()) {{
                t_relay();
            }}
            exit;
        }}
        xlog("L_ERR", "CF-TEST in-dialog $rm without a Route: 404\n");
        sl_send_reply("404", "Not here");
        exit;
    }}
    t_check_trans();
    record_route();
    $du = "sip:{next_hop}";
    t_relay();
}}
"#,
        modules = modules.display()
    )
}

fn start_proxy(next_hop: SocketAddr) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("kamailio.cfg");
    std::fs::write(&cfg, config(port, next_hop, &module_dir())).unwrap();
    let mut child = Command::new("kamailio")
        .arg("-f")
        .arg(&cfg)
        .args(["-DD", "-E", "-m", "64", "-M", "8", "-Y"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kamailio is installed (Debian package kamailio)");
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(mut l) = sink.lock() {
                l.push_str(&line);
                l.push('\n');
            }
        }
    });
    // Ready once it answers an OPTIONS-less probe: wait for the UDP port to be taken.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("kamailio exited ({status}):\n{}", log.lock().unwrap());
        }
        assert!(
            Instant::now() < deadline,
            "kamailio did not bind 127.0.0.1:{port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its workers start just after the bind.
    std::thread::sleep(Duration::from_millis(300));
    Proxy {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        log,
        _dir: dir,
    }
}

#[test]
fn calls_through_kamailio_end_cleanly_when_the_caller_hangs_up() {
    let server = start("");
    let proxy = start_proxy(server.udp);
    let run = sipp("rr_caller_bye", proxy.addr, "5001", 30, &["-r", "20"]);
    let log = proxy.log.lock().unwrap().clone();
    assert_all_ok(&run, 30);
    assert!(
        !log.contains("CF-TEST in-dialog"),
        "the proxy saw in-dialog requests without a Route:\n{log}"
    );
}

#[test]
fn calls_through_kamailio_end_cleanly_when_the_script_hangs_up() {
    let server = start("");
    let proxy = start_proxy(server.udp);
    let run = sipp("rr_script_bye", proxy.addr, "5000", 30, &["-r", "20"]);
    let log = proxy.log.lock().unwrap().clone();
    assert_all_ok(&run, 30);
    assert!(
        !log.contains("CF-TEST in-dialog"),
        "the proxy saw in-dialog requests without a Route:\n{log}"
    );
}

/// Sends `msg` to `to` until a datagram comes back (Kamailio's workers start just after it
/// binds), then gives the first reply and drains the retransmissions' answers.
fn ask(sock: &std::net::UdpSocket, to: SocketAddr, msg: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 65535];
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let first = loop {
        sock.send_to(msg.as_bytes(), to).unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            break String::from_utf8_lossy(&buf[..n]).into_owned();
        }
        assert!(Instant::now() < deadline, "no answer from {to} to:\n{msg}");
    };
    while sock.recv(&mut buf).is_ok() {}
    first
}

/// Kills a child process on drop (also when an assertion fails).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The native peers of tests/load/compare_kamailio_redirect.sh do what the benchmark says:
/// Kamailio accepts tools/bench/kamailio/redirect.cfg, stateless and with `-A STATEFUL` (tm),
/// answers an INVITE with a 302 carrying exactly one Contact (the dialled number at the
/// carrier), sends nothing back for the ACK (the next datagram is the 405 it gives an
/// OPTIONS), and answers other requests 405.
#[test]
fn benchmark_redirect_config_answers_one_contact_302_and_absorbs_the_ack() {
    redirect_peer_answers(&[]);
    redirect_peer_answers(&["-A", "STATEFUL"]);
}

fn redirect_peer_answers(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/bench/kamailio/redirect.cfg");
    let _kamailio = Killed(
        Command::new("kamailio")
            .arg("-f")
            .arg(&cfg)
            .args(extra)
            .arg("-L")
            .arg(module_dir())
            .arg("-l")
            .arg(format!("udp:127.0.0.1:{port}"))
            .args(["-DD", "-E", "-m", "64", "-M", "8", "-Y"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("kamailio is installed (Debian package kamailio)"),
    );
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let me = sock.local_addr().unwrap();
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let request = |method: &str, cseq: &str, to_tag: &str| {
        format!(
            "{method} sip:447700900555@{to} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-{method}\r\n\
             From: <sip:441000000000@{me}>;tag=t1\r\nTo: <sip:447700900555@{to}>{to_tag}\r\n\
             Call-ID: bench-redirect@127.0.0.1\r\nCSeq: {cseq}\r\nMax-Forwards: 70\r\n\
             Content-Length: 0\r\n\r\n"
        )
    };

    let reply = ask(&sock, to, &request("INVITE", "1 INVITE", ""));
    assert!(reply.starts_with("SIP/2.0 302 "), "{extra:?}: {reply}");
    let contacts: Vec<&str> = reply
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("contact:"))
        .collect();
    assert_eq!(
        contacts,
        ["Contact: <sip:447700900555@alpha.example.net:5060>"],
        "{extra:?}: {reply}"
    );
    let tag = reply
        .lines()
        .find(|l| l.starts_with("To:"))
        .and_then(|l| l.split_once(";tag="))
        .map(|(_, t)| t.trim().to_string())
        .expect("the 302 has a To tag");

    sock.send_to(
        request("ACK", "1 ACK", &format!(";tag={tag}")).as_bytes(),
        to,
    )
    .unwrap();
    let next = ask(&sock, to, &request("OPTIONS", "2 OPTIONS", ""));
    assert!(next.starts_with("SIP/2.0 405 "), "{extra:?}: {next}");
    assert!(next.contains("CSeq: 2 OPTIONS"), "{extra:?}: {next}");
}
