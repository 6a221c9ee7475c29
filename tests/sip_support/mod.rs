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
    start_full("", extra_sip, log)
}

/// [`start`] with `top` (other sections: `[http]`, `[calls]`...) before `[sip]`.
pub fn start_with_top(top: &str, extra_sip: &str) -> Server {
    start_full(top, extra_sip, None)
}

fn start_full(top: &str, extra_sip: &str, log: Option<&Path>) -> Server {
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
    // CALLFORGE_TEST_FAST_PATH=true|false runs every SIP test with that `[sip] fast_path`
    // (unless the test sets it itself).
    let fast = match std::env::var("CALLFORGE_TEST_FAST_PATH") {
        Ok(v) if !extra_sip.contains("fast_path") => format!("fast_path = {v}\n"),
        _ => String::new(),
    };
    std::fs::write(
        &cfg,
        format!(
            "{top}\n[sip]\nlisten = [\"udp:127.0.0.1:0\", \"tcp:127.0.0.1:0\"]\n{fast}{extra_sip}\n{ROUTES}"
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--http", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .arg("--scripts")
        .arg(&scripts)
        .env(
            "RUST_LOG",
            if log.is_some() {
                std::env::var("CF_LOG_LEVEL").unwrap_or_else(|_| "info".into())
            } else {
                "warn".into()
            },
        )
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

/// A SIPp far end running one call of a `tests/sipp/uas_*.xml` scenario in the background.
/// Killed on drop if still running; [`SippUas::finish`] says how the call went.
pub struct SippUas {
    child: Option<Child>,
    /// The SIP port it listens on (UDP, 127.0.0.1).
    pub port: u16,
    /// Its RTP port (`[media_port]` in the scenario's SDP).
    pub media_port: u16,
    scenario: String,
    work: tempfile::TempDir,
}

/// Starts `sipp -sf tests/sipp/<scenario> -i 127.0.0.1 -p <free port> -mp <free port> -m 1`
/// (`.xml` optional in `scenario`) with `-timeout 60s -timeout_error -nostdin`, errors and
/// the message trace in a temporary folder, then `extra_args` (a later `-timeout` wins).
/// Returns once SIPp's SIP socket is bound, so an INVITE sent next is not lost.
pub fn sipp_uas(scenario: &str, extra_args: &[&str]) -> SippUas {
    // A free port can be taken again before SIPp binds it, and SIPp also binds ports next to
    // the media port (video RTP at +2) that nobody checked: on a busy machine, start again on
    // other ports when SIPp says the address is in use. Any other early exit is a failure.
    for _ in 0..4 {
        match start_sipp_uas(scenario, extra_args) {
            Ok(uas) => return uas,
            Err(report) if report.contains("Address already in use") => continue,
            Err(report) => panic!("{report}"),
        }
    }
    start_sipp_uas(scenario, extra_args).unwrap_or_else(|report| panic!("{report}"))
}

fn start_sipp_uas(scenario: &str, extra_args: &[&str]) -> Result<SippUas, String> {
    let file = if scenario.ends_with(".xml") {
        scenario.to_string()
    } else {
        format!("{scenario}.xml")
    };
    let path = Path::new(ROOT).join("tests/sipp").join(&file);
    assert!(path.is_file(), "no scenario {}", path.display());
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let media_port = loop {
        let p = free_port();
        if p != port {
            break p;
        }
    };
    let child = Command::new("sipp")
        .arg("-sf")
        .arg(&path)
        .args(["-i", "127.0.0.1", "-p", &port.to_string()])
        .args(["-mp", &media_port.to_string(), "-m", "1"])
        .args(["-timeout", "60s", "-timeout_error", "-nostdin"])
        .args(["-trace_err", "-error_file"])
        .arg(work.path().join("errors.log"))
        .args(["-trace_msg", "-message_file"])
        .arg(work.path().join("messages.log"))
        .args(extra_args)
        .current_dir(work.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(work.path().join("stderr.log")).unwrap(),
        ))
        .spawn()
        .expect("sipp is installed (Debian package sip-tester)");
    let mut uas = SippUas {
        child: Some(child),
        port,
        media_port,
        scenario: file,
        work,
    };
    // Bounded wait for the socket, read from /proc so that probing never steals the port.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !udp_port_bound(port) {
        let exited = uas.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        if let Some(status) = exited {
            return Err(uas.report(Some(status)));
        }
        assert!(
            std::time::Instant::now() < until,
            "sipp did not bind 127.0.0.1:{port} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(uas)
}

/// Whether some socket is bound to UDP `port` on this machine (Linux /proc/net/udp{,6}).
fn udp_port_bound(port: u16) -> bool {
    let suffix = format!(":{port:04X}");
    ["/proc/net/udp", "/proc/net/udp6"].iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().nth(1))
                .any(|local| local.ends_with(&suffix))
        })
    })
}

impl SippUas {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `sip:<user>@127.0.0.1:<port>`.
    pub fn uri(&self, user: &str) -> String {
        format!("sip:{user}@{}", self.addr())
    }

    /// The SIP messages SIPp sent and received so far (its `-trace_msg` log).
    pub fn messages(&self) -> String {
        std::fs::read_to_string(self.work.path().join("messages.log")).unwrap_or_default()
    }

    /// Waits up to `timeout` for SIPp to finish its call (killing it after that): `Ok` on
    /// exit status 0, else the status with SIPp's error log, stderr and the end of its
    /// message trace.
    pub fn finish(mut self, timeout: Duration) -> Result<(), String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.poll(deadline) {
                Some(result) => return result,
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// [`SippUas::finish`] for async tests: waits without blocking the runtime, so the
    /// test's own peers (a `Call`, a `Callee`) keep answering meanwhile.
    pub async fn finish_async(mut self, timeout: Duration) -> Result<(), String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.poll(deadline) {
                Some(result) => return result,
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn poll(&mut self, deadline: std::time::Instant) -> Option<Result<(), String>> {
        let child = self.child.as_mut()?;
        let status = match child.try_wait() {
            Ok(Some(status)) => Some(status),
            Ok(None) if std::time::Instant::now() < deadline => return None,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                None
            }
        };
        self.child = None;
        Some(match status {
            Some(s) if s.success() => Ok(()),
            other => Err(self.report(other)),
        })
    }

    fn report(&self, status: Option<std::process::ExitStatus>) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.work.path().join(name)).unwrap_or_default();
        let tail = |text: String, n: usize| -> String {
            let skip = text.chars().count().saturating_sub(n);
            text.chars().skip(skip).collect()
        };
        format!(
            "sipp {} on port {}: {}\n--- errors ---\n{}\n--- stderr ---\n{}\n--- last messages ---\n{}",
            self.scenario,
            self.port,
            match status {
                Some(s) => format!("exit status {:?}", s.code()),
                None => "did not finish in time (killed)".to_string(),
            },
            tail(read("errors.log"), 4000),
            tail(read("stderr.log"), 2000),
            tail(read("messages.log"), 3000),
        )
    }
}

impl Drop for SippUas {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
