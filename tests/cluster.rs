//! The scale-out topology with real processes on loopback: Kamailio (Debian's package, running
//! deploy/kamailio/kamailio.cfg unchanged) dispatching over two `callforge serve` engines that
//! share a redis-server (kv) and a PostgreSQL server (CDRs, execution records, userspace).
//!
//! SIPp places class5 calls and class4 redirects through Kamailio at a steady rate. Both engines
//! take calls; a kv counter bumped by scripts on both ends exact; a userspace row written
//! through one engine is read through the other; every CDR is in PostgreSQL exactly once. Then
//! one engine is killed with SIGKILL mid-run: once the dispatcher marks it down every new call
//! succeeds on the other, and the only failures are the calls that were live on the dead
//! engine, counted exactly from SIPp's per-call log.

mod sip_support;
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use sip_support::{free_port, sipp_file, SippRun};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The engine binary: this build's, or `CALLFORGE_BIN` (a release build, for measurements).
fn engine_bin() -> String {
    std::env::var("CALLFORGE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_callforge").into())
}

/// The class5 script: counts the call in the shared kv, answers, waits for the caller's BYE.
const CALL_JS: &str = r#"// Cluster test: one class5 call.
async function main(data, ctx) {
  await require("kv").incr("cluster:calls", 1);
  await ctx.answer();
  await ctx.waitForHangup();
}
"#;

/// The class4 script: counts the decision in the shared kv, routes to the alpha gateway.
const ROUTE_JS: &str = r#"// Cluster test: one class4 decision.
async function main(data) {
  await require("kv").incr("cluster:routes", 1);
  const routing = data.routing;
  routing.egress_routing = [
    { gw: { alpha: { cli: "" } }, prefixes: [""], cost: 0.01, available: true, headers: [] },
  ];
  return routing;
}
"#;

const US_PUT_JS: &str = r#"// Cluster test: write a userspace row.
async function main(data) {
  await require("userspace").create("cluster", data.key, { written_by: data.engine });
  return "stored";
}
"#;

const US_GET_JS: &str = r#"// Cluster test: read a userspace row.
async function main(data) {
  return await require("userspace").read("cluster", data.key);
}
"#;

/// One `callforge serve` of the cluster, restartable on the same ports and folder.
struct Engine {
    name: String,
    sip_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    http: Option<SocketAddr>,
}

impl Engine {
    fn new(name: &str, pg_url: &str, redis_url: &str) -> Engine {
        let dir = tempfile::tempdir().unwrap();
        let scripts = dir.path().join("scripts");
        std::fs::create_dir_all(&scripts).unwrap();
        for (file, source) in [
            ("cluster_call.js", CALL_JS),
            ("cluster_route.js", ROUTE_JS),
            ("us_put.js", US_PUT_JS),
            ("us_get.js", US_GET_JS),
        ] {
            std::fs::write(scripts.join(file), source).unwrap();
        }
        let sip_port = free_port();
        std::fs::write(
            dir.path().join("callforge.toml"),
            format!(
                r#"[sip]
listen = ["udp:127.0.0.1:{sip_port}"]

[store]
url = "{pg_url}"
node = "{name}"
spool = "spool"

[kv]
backend = "{redis_url}"

[[route]]
match = "^5001$"
script = "cluster_call.js"
mode = "class5"

[[route]]
match = "^44"
script = "cluster_route.js"
mode = "class4"

[gateways]
alpha = "sip:alpha.example.net:5060"
"#
            ),
        )
        .unwrap();
        let mut engine = Engine {
            name: name.into(),
            sip_port,
            dir,
            child: None,
            http: None,
        };
        engine.start();
        engine
    }

    fn start(&mut self) {
        self.http = None;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("engine.log"))
            .unwrap();
        let mut child = Command::new(engine_bin())
            .args(["serve", "--http", "127.0.0.1:0", "--config"])
            .arg(self.dir.path().join("callforge.toml"))
            .arg("--scripts")
            .arg(self.dir.path().join("scripts"))
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut sip = false;
        while self.http.is_none() || !sip {
            let Some(Ok(line)) = lines.next() else {
                panic!("{} exited before listening: {}", self.name, self.log());
            };
            if let Some(rest) = line.strip_prefix("callforge http listening on ") {
                self.http = Some(rest.trim().parse().unwrap());
            } else if line.starts_with("callforge sip listening on udp:") {
                sip = true;
            }
        }
        // Keep reading stdout so the engine never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        self.child = Some(child);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("engine.log")).unwrap_or_default()
    }

    fn uri(&self) -> String {
        format!("sip:127.0.0.1:{}", self.sip_port)
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    async fn run(&self, script: &str, body: Value) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(format!("http://{}/v1/run/{script}", self.http.unwrap()))
            .json(&body)
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Kamailio with deploy/kamailio/kamailio.cfg, the engines in its dispatcher list, its
/// control socket in its folder (for `kamcmd dispatcher.list`).
struct Kamailio {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl Kamailio {
    fn start(engines: &[&Engine]) -> Kamailio {
        let dir = tempfile::tempdir().unwrap();
        let list: String = engines
            .iter()
            .map(|e| format!("1 {} 0 0\n", e.uri()))
            .collect();
        std::fs::write(dir.path().join("dispatcher.list"), list).unwrap();
        let port = free_port();
        let define = |name: &str, value: &str| format!("{name}={value}");
        let child = Command::new("kamailio")
            .arg("-DD")
            .arg("-E")
            .arg("-f")
            .arg(Path::new(ROOT).join("deploy/kamailio/kamailio.cfg"))
            .arg("-l")
            .arg(format!("udp:127.0.0.1:{port}"))
            .arg("-A")
            .arg(define(
                "DISPATCHER_LIST",
                &format!("\"{}\"", dir.path().join("dispatcher.list").display()),
            ))
            .arg("-A")
            .arg(define(
                "CTL_SOCKET",
                &format!("\"unix:{}\"", dir.path().join("ctl").display()),
            ))
            .arg("-A")
            .arg(define("PING_INTERVAL", "1"))
            .arg("-A")
            .arg(define("FR_TIMER", "1000"))
            .arg("-A")
            .arg(define("FR_INV_TIMER", "5000"))
            .args(["-m", "256", "-M", "8", "-Y"])
            .arg(dir.path())
            .arg("-w")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("kamailio.log")).unwrap(),
            ))
            .spawn()
            .expect("kamailio is missing: run tools/ensure-deps.sh --test");
        let kamailio = Kamailio {
            child,
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let up = wait_until(Duration::from_secs(15), || {
            kamailio.dispatcher().len() == engines.len()
        });
        assert!(up, "kamailio did not start: {}", kamailio.log());
        kamailio
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kamailio.log")).unwrap_or_default()
    }

    /// Each destination's URI and flags (`AP`: active and probed, `IP`: inactive, ...).
    fn dispatcher(&self) -> BTreeMap<String, String> {
        let out = Command::new("kamcmd")
            .arg("-s")
            .arg(format!("unix:{}", self.dir.path().join("ctl").display()))
            .arg("dispatcher.list")
            .output();
        let Ok(out) = out else {
            return BTreeMap::new();
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let mut map = BTreeMap::new();
        let mut uri = None;
        for line in text.lines().map(str::trim) {
            if let Some(u) = line.strip_prefix("URI: ") {
                uri = Some(u.to_string());
            } else if let Some(flags) = line.strip_prefix("FLAGS: ") {
                if let Some(u) = uri.take() {
                    map.insert(u, flags.to_string());
                }
            }
        }
        map
    }

    fn is_active(&self, engine: &Engine) -> bool {
        self.dispatcher()
            .get(&engine.uri())
            .is_some_and(|f| f.starts_with('A'))
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// A SIPp run through the proxy, its per-call log (`answered CALLID PORT`, `done CALLID`) kept.
struct Load {
    run: SippRun,
    /// Call-ID → the SIP port of the engine that answered.
    answered: BTreeMap<String, u16>,
    /// How many 2xx answers carried the proxy's Record-Route back.
    record_routed: usize,
    done: BTreeSet<String>,
    elapsed: Duration,
}

fn sipp_through(
    proxy: SocketAddr,
    scenario: &str,
    service: &str,
    calls: u32,
    rate: u32,
    hold_ms: u32,
) -> Load {
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("calls.log");
    let started = Instant::now();
    let run = sipp_file(
        &Path::new(ROOT).join("tests/sipp").join(scenario),
        proxy,
        service,
        calls,
        &[
            "-r",
            &rate.to_string(),
            "-d",
            &hold_ms.to_string(),
            "-trace_logs",
            "-log_file",
            log.to_str().unwrap(),
        ],
    );
    let elapsed = started.elapsed();
    let (mut answered, mut done) = (BTreeMap::new(), BTreeSet::new());
    let mut record_routed = 0;
    for line in std::fs::read_to_string(&log).unwrap_or_default().lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        // SIPp puts a time stamp before the message when it logs.
        if let Some(i) = words.iter().position(|w| *w == "answered") {
            if let (Some(id), Some(port)) = (words.get(i + 1), words.get(i + 2)) {
                answered.insert(id.to_string(), port.parse().unwrap_or(0));
                if words.get(i + 3).is_some_and(|w| w.len() > "rr=".len()) {
                    record_routed += 1;
                }
            }
        } else if let Some(i) = words.iter().position(|w| *w == "done") {
            if let Some(id) = words.get(i + 1) {
                done.insert(id.to_string());
            }
        }
    }
    Load {
        run,
        answered,
        record_routed,
        done,
        elapsed,
    }
}

fn sipp_in_background(
    proxy: SocketAddr,
    scenario: &'static str,
    service: &'static str,
    calls: u32,
    rate: u32,
    hold_ms: u32,
) -> std::thread::JoinHandle<Load> {
    std::thread::spawn(move || sipp_through(proxy, scenario, service, calls, rate, hold_ms))
}

/// One cluster at a time: two at once on a small machine starve each other's calls.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The whole topology.
struct Cluster {
    pg: support::Postgres,
    _redis: support::Redis,
    redis_url: String,
    a: Engine,
    b: Engine,
    kamailio: Kamailio,
    /// Last: released once everything above has stopped.
    _turn: std::sync::MutexGuard<'static, ()>,
}

fn cluster() -> Cluster {
    // A test that failed while holding the lock poisoned it; the next one may still run.
    let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let pg = support::postgres();
    let redis = support::redis();
    let redis_url = redis.url.clone();
    let a = Engine::new("engine-a", &pg.url, &redis_url);
    let b = Engine::new("engine-b", &pg.url, &redis_url);
    let kamailio = Kamailio::start(&[&a, &b]);
    let ready = wait_until(Duration::from_secs(15), || {
        kamailio.is_active(&a) && kamailio.is_active(&b)
    });
    assert!(
        ready,
        "the dispatcher never saw both engines up: {:?}\n{}",
        kamailio.dispatcher(),
        kamailio.log()
    );
    Cluster {
        pg,
        _redis: redis,
        redis_url,
        a,
        b,
        kamailio,
        _turn: turn,
    }
}

impl Cluster {
    fn kv_counter(&self, key: &str) -> i64 {
        let port = self
            .redis_url
            .rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches("/")
            .to_string();
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port, "GET", key])
            .output()
            .expect("redis-cli (package redis-tools, with redis-server)");
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim().trim_matches('"').parse().unwrap_or(0)
    }

    /// Call-ID → how many CDR rows it has, and the nodes that wrote them.
    fn cdrs(&self) -> BTreeMap<String, (usize, BTreeSet<String>)> {
        let mut map: BTreeMap<String, (usize, BTreeSet<String>)> = BTreeMap::new();
        for line in self.pg.psql("SELECT call_id, node FROM cdrs").lines() {
            if let Some((id, node)) = line.split_once('|') {
                let entry = map.entry(id.to_string()).or_default();
                entry.0 += 1;
                entry.1.insert(node.to_string());
            }
        }
        map
    }

    /// Wait until the CDR table holds `n` rows (CDRs are written when each call ends).
    fn wait_for_cdrs(&self, n: usize) -> usize {
        let mut count = 0;
        wait_until(Duration::from_secs(20), || {
            count = self
                .pg
                .psql("SELECT COUNT(*) FROM cdrs")
                .parse()
                .unwrap_or(0);
            count >= n
        });
        count
    }
}

fn sipp_report(load: &Load) -> String {
    let r = &load.run;
    let errors: String = r.errors.chars().take(3000).collect();
    format!(
        "sipp exit {}, created {}, successful {}, failed {}\n{errors}",
        r.status, r.created, r.successful, r.failed
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_shares_state_and_survives_a_kill9() {
    let mut c = cluster();

    // A userspace row written through engine A is read through engine B.
    let (status, body) =
        c.a.run("us_put", json!({"key": "4477009001", "engine": "engine-a"}))
            .await;
    assert_eq!(status, 200, "{body}\n{}", c.a.log());
    let (status, body) = c.b.run("us_get", json!({"key": "4477009001"})).await;
    assert_eq!(status, 200, "{body}\n{}", c.b.log());
    assert!(
        body.to_string().contains("\"written_by\":\"engine-a\""),
        "engine B read {body}"
    );

    // Phase 1: steady class5 calls and class4 redirects through the dispatcher, both engines up.
    let (calls, routes) = (120u32, 200u32);
    let class4 = sipp_in_background(
        c.kamailio.addr,
        "cluster_redirect.xml",
        "447700900555",
        routes,
        50,
        0,
    );
    let class5 = sipp_through(c.kamailio.addr, "cluster_call.xml", "5001", calls, 30, 300);
    let class4 = class4.join().unwrap();
    for (load, n) in [(&class5, calls), (&class4, routes)] {
        assert_eq!(load.run.successful, u64::from(n), "{}", sipp_report(load));
        assert_eq!(load.run.failed, 0, "{}", sipp_report(load));
    }
    let per_engine =
        |load: &Load, port: u16| load.answered.values().filter(|p| **p == port).count();
    let (on_a, on_b) = (
        per_engine(&class5, c.a.sip_port),
        per_engine(&class5, c.b.sip_port),
    );
    assert_eq!(
        on_a + on_b,
        calls as usize,
        "every call answered by one of the engines"
    );
    assert!(
        on_a > calls as usize / 4 && on_b > calls as usize / 4,
        "round robin: A {on_a}, B {on_b}"
    );
    // The kv counters, bumped by scripts on both engines, are exact.
    assert_eq!(c.kv_counter("cluster:calls"), i64::from(calls));
    assert_eq!(c.kv_counter("cluster:routes"), i64::from(routes));
    // Every class5 call's CDR is in PostgreSQL exactly once, from the engine that answered it.
    assert_eq!(c.wait_for_cdrs(calls as usize), calls as usize);
    let cdrs = c.cdrs();
    for id in &class5.done {
        let (n, nodes) = cdrs.get(id).unwrap_or_else(|| panic!("no CDR for {id}"));
        assert_eq!(*n, 1, "CDRs of {id}");
        let node = if class5.answered[id] == c.a.sip_port {
            "engine-a"
        } else {
            "engine-b"
        };
        assert!(
            nodes.contains(node),
            "{id} answered by {node}, CDR from {nodes:?}"
        );
    }
    eprintln!(
        "phase 1: {calls} class5 calls ({on_a} on A, {on_b} on B) in {:.1} s, {routes} class4 redirects in {:.1} s; \
         2xx with Record-Route: {} of {calls}",
        class5.elapsed.as_secs_f64(),
        class4.elapsed.as_secs_f64(),
        class5.record_routed
    );

    // Phase 2: calls held 2 s at 25/s (about 25 live on each engine), redirects at 40/s.
    // Engine A is killed once it has been in rotation for longer than a call lasts, so calls
    // are live on it (on a loaded machine a slow probe answer can take it out for a moment).
    // Round robin alternates over every INVITE: at equal rates the two SIPp streams would
    // interleave and every class5 call land on the same engine, so the rates differ.
    let (calls2, routes2) = (500u32, 800u32);
    let class5 = sipp_in_background(
        c.kamailio.addr,
        "cluster_call.xml",
        "5001",
        calls2,
        25,
        2_000,
    );
    let class4 = sipp_in_background(
        c.kamailio.addr,
        "cluster_redirect.xml",
        "447700900555",
        routes2,
        40,
        0,
    );
    let started = Instant::now();
    let mut active_since = None;
    while started.elapsed() < Duration::from_secs(12) {
        if c.kamailio.is_active(&c.a) {
            let since = *active_since.get_or_insert_with(Instant::now);
            if started.elapsed() > Duration::from_secs(4)
                && since.elapsed() > Duration::from_millis(2_500)
            {
                break;
            }
        } else {
            active_since = None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let killed_at = Instant::now();
    c.a.kill9();
    let marked_down = wait_until(Duration::from_secs(10), || !c.kamailio.is_active(&c.a));
    let failover = killed_at.elapsed();
    assert!(
        marked_down,
        "the dispatcher still sends to the dead engine: {:?}",
        c.kamailio.dispatcher()
    );
    let class5 = class5.join().unwrap();
    let class4 = class4.join().unwrap();

    // The calls live on engine A when it died: answered by A, never finished.
    let live_on_a: BTreeSet<&String> = class5
        .answered
        .iter()
        .filter(|(id, port)| **port == c.a.sip_port && !class5.done.contains(*id))
        .map(|(id, _)| id)
        .collect();
    let on_b_unfinished: Vec<&String> = class5
        .answered
        .iter()
        .filter(|(id, port)| **port == c.b.sip_port && !class5.done.contains(*id))
        .map(|(id, _)| id)
        .collect();
    assert!(
        on_b_unfinished.is_empty(),
        "calls on the surviving engine failed: {on_b_unfinished:?}"
    );
    eprintln!(
        "phase 2 raw: answered {} (A {}, B {}), done {}, failed {}",
        class5.answered.len(),
        class5
            .answered
            .values()
            .filter(|p| **p == c.a.sip_port)
            .count(),
        class5
            .answered
            .values()
            .filter(|p| **p == c.b.sip_port)
            .count(),
        class5.done.len(),
        class5.run.failed
    );
    assert!(
        !live_on_a.is_empty(),
        "the kill caught no live call: the test proves nothing"
    );
    assert_eq!(
        class5.run.failed,
        live_on_a.len() as u64,
        "the only failed calls are those live on the dead engine; {}",
        sipp_report(&class5)
    );
    assert_eq!(
        class5.run.successful + class5.run.failed,
        u64::from(calls2),
        "{}",
        sipp_report(&class5)
    );
    assert_eq!(class5.done.len() as u64, class5.run.successful);
    // No call was lost before it was answered: every INVITE found an engine (failover on timeout).
    assert_eq!(
        class5.answered.len() as u64,
        u64::from(calls2),
        "unanswered calls; {}",
        sipp_report(&class5)
    );
    // Redirects hold no dialog: none is lost, even those sent to A as it died.
    assert_eq!(
        class4.run.successful,
        u64::from(routes2),
        "{}",
        sipp_report(&class4)
    );
    assert_eq!(class4.run.failed, 0, "{}", sipp_report(&class4));
    // Each finished call has exactly one CDR; the survivor's calls all have theirs.
    let expected = calls as usize + class5.done.len();
    let settled = c.wait_for_cdrs(expected);
    let cdrs = c.cdrs();
    let duplicates: Vec<_> = cdrs.iter().filter(|(_, (n, _))| *n > 1).collect();
    assert!(duplicates.is_empty(), "CDRs written twice: {duplicates:?}");
    for id in class5
        .done
        .iter()
        .filter(|id| class5.answered[*id] == c.b.sip_port)
    {
        assert!(cdrs.contains_key(id), "no CDR for {id} (engine B)");
    }
    eprintln!(
        "phase 2: {calls2} class5 calls at 25/s held 2 s + {routes2} class4 at 40/s; kill -9 of A: \
         dispatcher marked it down {:.2} s later; {} calls lost (live on A), {} class5 ok, \
         {} class4 ok; CDRs {settled} (expected {expected})",
        failover.as_secs_f64(),
        live_on_a.len(),
        class5.run.successful,
        class4.run.successful
    );

    // docker-compose.yml validates when a compose tool is installed.
    compose_config_validates();
}

/// `docker compose config` (or `docker-compose config`) on the top-level compose file.
fn compose_config_validates() {
    let tries: [&[&str]; 2] = [&["docker", "compose"], &["docker-compose"]];
    for tool in tries {
        // `docker` without its compose plugin is no compose tool.
        let present = Command::new(tool[0])
            .args(&tool[1..])
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !present {
            continue;
        }
        let Ok(out) = Command::new(tool[0])
            .args(&tool[1..])
            .args(["-f", &format!("{ROOT}/docker-compose.yml"), "config", "-q"])
            .output()
        else {
            continue;
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{} config: {stderr}", tool.join(" "));
        eprintln!("{} config: docker-compose.yml is valid", tool.join(" "));
        return;
    }
    eprintln!("no docker compose tool here: docker-compose.yml not validated");
}

/// A measurement, not a check: class4 redirects through the dispatcher at the rate in
/// `CLUSTER_CPS` (default 1000/s) for 10 s; prints the rate achieved and the failures.
/// `CLUSTER_CPS=2000 cargo test --release --test cluster cps -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for the README, run by hand"]
async fn cluster_class4_cps() {
    let c = cluster();
    let rate: u32 = std::env::var("CLUSTER_CPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let calls = rate * 10;
    let load = sipp_through(
        c.kamailio.addr,
        "cluster_redirect.xml",
        "447700900555",
        calls,
        rate,
        0,
    );
    let secs = load.elapsed.as_secs_f64();
    eprintln!(
        "class4 through the dispatcher: offered {rate}/s, {} of {calls} redirected in {secs:.1} s \
         ({:.0}/s), {} failed; kv counter {}",
        load.run.successful,
        load.run.successful as f64 / secs,
        load.run.failed,
        c.kv_counter("cluster:routes")
    );
    if load.run.failed > 0 {
        eprintln!(
            "{}",
            sipp_report(&load).chars().take(1500).collect::<String>()
        );
        let log = c.kamailio.log();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        eprintln!("kamailio log, last lines:\n{}", tail.join("\n"));
    }
}

/// Drain (issue 13): SIGTERM moves traffic off an engine with zero failed calls.
///
/// NOT RUNNABLE ON THIS BRANCH ALONE: it needs graceful drain (SIGTERM → new INVITEs 503 +
/// Retry-After, OPTIONS 503, live calls finish, exit 0) from issue 13. It passed on a scratch
/// merge with that work; remove the `ignore` once both are merged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs graceful drain (issue 13): SIGTERM -> 503 to INVITE and OPTIONS, live calls finish"]
async fn cluster_drain_moves_traffic_with_zero_failures() {
    let mut c = cluster();
    // Engine A goes away and comes back: the dispatcher's probes bring it back into rotation.
    c.a.kill9();
    assert!(wait_until(Duration::from_secs(10), || !c
        .kamailio
        .is_active(&c.a)));
    c.a.start();
    assert!(
        wait_until(Duration::from_secs(10), || c.kamailio.is_active(&c.a)),
        "the restarted engine was not probed back up: {:?}",
        c.kamailio.dispatcher()
    );
    // Calls held 2 s at 25/s; B gets SIGTERM 4 s in, while about 25 calls are live on it.
    let calls = 300u32;
    let load = sipp_in_background(
        c.kamailio.addr,
        "cluster_call.xml",
        "5001",
        calls,
        25,
        2_000,
    );
    std::thread::sleep(Duration::from_secs(4));
    let b = c.b.child.as_ref().unwrap().id() as i32;
    let sigterm_ms = callforge::store::now_ms();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(b, libc::SIGTERM) }, 0);
    let marked_down = wait_until(Duration::from_secs(10), || !c.kamailio.is_active(&c.b));
    assert!(
        marked_down,
        "a draining engine answers OPTIONS 503: {:?}",
        c.kamailio.dispatcher()
    );
    let load = load.join().unwrap();
    assert_eq!(
        load.run.failed,
        0,
        "drain moves traffic without failures; {}",
        sipp_report(&load)
    );
    assert_eq!(
        load.run.successful,
        u64::from(calls),
        "{}",
        sipp_report(&load)
    );
    let status = c.b.child.take().unwrap().wait().unwrap();
    assert!(status.success(), "a drained engine exits 0: {status:?}");
    // Every call that ended on B left its CDR before B exited.
    let on_b: Vec<&String> = load
        .answered
        .iter()
        .filter(|(_, p)| **p == c.b.sip_port)
        .map(|(id, _)| id)
        .collect();
    assert!(!on_b.is_empty(), "engine B took no call before its drain");
    let cdrs = c.cdrs();
    for id in &on_b {
        assert_eq!(
            cdrs.get(*id).map(|(n, _)| *n),
            Some(1),
            "CDR of {id} (drained engine)"
        );
    }
    // Calls were live on B when it got SIGTERM: they ended after it, and B recorded them.
    let after: usize =
        c.pg.psql(&format!(
            "SELECT COUNT(*) FROM cdrs WHERE node = 'engine-b' AND ended_at > {sigterm_ms}"
        ))
        .parse()
        .unwrap();
    assert!(after > 0, "no call was live on B when it began to drain");
    eprintln!(
        "drain: {} calls on B, {after} of them ended after SIGTERM; {} of {calls} calls ok, 0 failed",
        on_b.len(),
        load.run.successful
    );
}

/// The shipped deployment files are valid: each engine configuration parses, and Kamailio
/// accepts its configuration with the shipped dispatcher list (`kamailio -c`).
#[test]
fn deploy_files_are_valid() {
    for n in [1, 2] {
        let path = Path::new(ROOT).join(format!("deploy/engine/engine{n}.toml"));
        if let Err(e) = callforge::config::Config::load(&path) {
            panic!("{}: {e}", path.display());
        }
    }
    let out = Command::new("kamailio")
        .arg("-c")
        .arg("-f")
        .arg(Path::new(ROOT).join("deploy/kamailio/kamailio.cfg"))
        .arg("-A")
        .arg(format!(
            "DISPATCHER_LIST=\"{ROOT}/deploy/kamailio/dispatcher.list\""
        ))
        .arg("-l")
        .arg(format!("udp:127.0.0.1:{}", free_port()))
        .output()
        .expect("kamailio is missing: run tools/ensure-deps.sh --test");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.to_lowercase().contains("config file ok"),
        "{text}"
    );
}
