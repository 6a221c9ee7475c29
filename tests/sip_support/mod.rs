//! Shared by the SIP integration tests: a `callforge serve` with SIP on ephemeral ports, and SIPp.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_callforge");
pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The routes every SIP test server has.
pub const ROUTES: &str = r#"
[[route]]
match = "^447700900123$"
script = "dnc.js"
mode = "class4"

[[route]]
match = "^44"
script = "routing.js"
mode = "class4"
vars = "carriers.toml"

[[route]]
match = "^5000$"
script = "answer_and_hangup.js"
mode = "class5"

[[route]]
match = "^5001$"
script = "answer_and_wait.js"
mode = "class5"

[[route]]
match = "^5002$"
script = "ring_and_wait.js"
mode = "class5"

[[route]]
match = "^5003$"
script = "reject_busy.js"
mode = "class5"

[[route]]
match = "^5004$"
script = "answer_with_header.js"
mode = "class5"

[[route]]
match = "^6000$"
script = "broken.js"
mode = "class4"
timeout_action = 503

[gateways]
alpha = "sip:alpha.example.net:5060"
bravo = "sip:bravo.example.net:5060"
charlie = "sip:charlie.example.net:5060"
delta = "sip:delta.example.net:5060"
echo = "sip:echo.example.net:5060"
"#;

/// A running `callforge serve` with SIP, killed on drop.
pub struct Server {
    pub child: Child,
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    pub http: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the server with the example scripts, a one-number CLI pool (so answers are
/// deterministic), the five test carriers and [`ROUTES`]; `extra` is appended to `[sip]`.
pub fn start(extra_sip: &str) -> Server {
    start_logging(extra_sip, None)
}

/// [`start`], with the server's log (at info level) written to `log` when given.
pub fn start_logging(extra_sip: &str, log: Option<&Path>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    for entry in std::fs::read_dir(Path::new(ROOT).join("scripts")).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::copy(entry.path(), scripts.join(entry.file_name())).unwrap();
        }
    }
    std::fs::write(
        scripts.join("routing.toml"),
        "[schedule]\nopen = 0\nclose = 24\n[cli]\npool = [\"442071234567\"]\n",
    )
    .unwrap();
    std::fs::copy(
        Path::new(ROOT).join("tests/sipp/carriers.toml"),
        scripts.join("carriers.toml"),
    )
    .unwrap();
    std::fs::write(
        scripts.join("broken.js"),
        "function main(d) { return d.nope.deeper; }",
    )
    .unwrap();
    let cfg = dir.path().join("callforge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[sip]\nlisten = [\"udp:127.0.0.1:0\", \"tcp:127.0.0.1:0\"]\n{extra_sip}\n{ROUTES}"
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--http", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .arg("--scripts")
        .arg(&scripts)
        .env("RUST_LOG", if log.is_some() { "info" } else { "warn" })
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(match log {
            Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
            None => Stdio::null(),
        })
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let (mut udp, mut tcp, mut http) = (None, None, None);
    while udp.is_none() || tcp.is_none() || http.is_none() {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        let addr = |l: &str| l.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        if let Some(rest) = line.strip_prefix("callforge sip listening on udp:") {
            udp = Some(SocketAddr::from(([127, 0, 0, 1], addr(rest))));
        } else if let Some(rest) = line.strip_prefix("callforge sip listening on tcp:") {
            tcp = Some(SocketAddr::from(([127, 0, 0, 1], addr(rest))));
        } else if let Some(rest) = line.strip_prefix("callforge http listening on ") {
            http = Some(rest.trim().parse().unwrap());
        }
    }
    Server {
        child,
        udp: udp.unwrap(),
        tcp: tcp.unwrap(),
        http: http.unwrap(),
        dir,
    }
}

/// A port free on 127.0.0.1 for both UDP and TCP right now (SIPp binds both for `-t t1`).
pub fn free_port() -> u16 {
    loop {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u.local_addr().unwrap().port();
        if port != 5060 && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// What a SIPp run reported.
#[derive(Debug)]
pub struct SippRun {
    pub status: i32,
    pub created: u64,
    pub successful: u64,
    pub failed: u64,
    pub errors: String,
}

/// Runs `tests/sipp/<scenario>.xml` against `target` with `-m calls`; `extra` adds options.
pub fn sipp(
    scenario: &str,
    target: SocketAddr,
    service: &str,
    calls: u32,
    extra: &[&str],
) -> SippRun {
    let scenario_path: PathBuf = Path::new(ROOT)
        .join("tests/sipp")
        .join(format!("{scenario}.xml"));
    sipp_file(&scenario_path, target, service, calls, extra)
}

/// Runs a scenario file given by path (one a test wrote, say) like [`sipp`].
pub fn sipp_file(
    scenario_path: &Path,
    target: SocketAddr,
    service: &str,
    calls: u32,
    extra: &[&str],
) -> SippRun {
    let work = tempfile::tempdir().unwrap();
    let stf = work.path().join("stat.csv");
    let err = work.path().join("errors.log");
    let local = free_port();
    let media = free_port();
    let status = Command::new("sipp")
        .arg(target.to_string())
        .arg("-sf")
        .arg(scenario_path)
        .args(["-s", service, "-m", &calls.to_string(), "-i", "127.0.0.1"])
        .args(["-p", &local.to_string(), "-mp", &media.to_string()])
        .args(["-timeout", "60s", "-timeout_error", "-nostdin"])
        .args(["-trace_stat", "-stf"])
        .arg(&stf)
        .args(["-trace_err", "-error_file"])
        .arg(&err)
        .args(extra)
        .current_dir(work.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("sipp is installed (Debian package sip-tester)");
    let stats = std::fs::read_to_string(&stf).unwrap_or_default();
    let mut rows = stats.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = rows.next().unwrap_or_default().split(';').collect();
    let last: Vec<&str> = rows.next_back().unwrap_or_default().split(';').collect();
    let col = |name: &str| -> u64 {
        header
            .iter()
            .position(|h| *h == name)
            .and_then(|i| last.get(i))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    SippRun {
        status: status.code().unwrap_or(-1),
        created: col("TotalCallCreated"),
        successful: col("SuccessfulCall(C)"),
        failed: col("FailedCall(C)"),
        errors: std::fs::read_to_string(&err).unwrap_or_default(),
    }
}

/// Asserts SIPp's exit code and that every call it placed succeeded.
pub fn assert_all_ok(run: &SippRun, calls: u64) {
    let errors: String = run.errors.chars().take(3000).collect();
    assert_eq!(run.status, 0, "sipp exit code; {run:?}\n{errors}");
    assert_eq!(run.created, calls, "calls created; {run:?}\n{errors}");
    assert_eq!(run.successful, calls, "successful calls; {run:?}\n{errors}");
    assert_eq!(run.failed, 0, "failed calls; {run:?}\n{errors}");
}

pub fn wait_a_little() {
    std::thread::sleep(Duration::from_millis(50));
}
