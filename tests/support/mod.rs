//! Real servers on loopback for the integration tests: the `callforge` binary itself, an HTTP
//! API (lookups, webhooks, fetch targets), an SMTP sink and Redis.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
    routing::{get, post},
    Json, Router,
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

pub const BIN: &str = env!("CARGO_BIN_EXE_callforge");
pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A running `callforge serve` in its own folder (config, scripts, database), killed on drop.
pub struct Engine {
    pub child: Child,
    pub base: String,
    pub dir: PathBuf,
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A folder with the shipped scripts copied into `scripts/` and `config` as `callforge.toml`.
pub fn workdir(config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    for entry in std::fs::read_dir(Path::new(ROOT).join("scripts")).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::copy(entry.path(), scripts.join(entry.file_name())).unwrap();
        }
    }
    std::fs::write(dir.path().join("callforge.toml"), config).unwrap();
    dir
}

/// Start `callforge serve` in `dir`; the error text is the process's stderr when it fails.
pub fn try_start(dir: &Path) -> Result<Engine, String> {
    let mut child = Command::new(BIN)
        .args(["serve", "--http", "127.0.0.1:0", "--config"])
        .arg(dir.join("callforge.toml"))
        .arg("--scripts")
        .arg(dir.join("scripts"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    if !line.contains("listening on") {
        let _ = child.wait();
        let mut err = String::new();
        use std::io::Read;
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        return Err(err);
    }
    // Keep draining stderr so the child never blocks on a full pipe.
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || for _ in BufReader::new(stderr).lines() {});
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    Ok(Engine {
        child,
        base: format!("http://{addr}"),
        dir: dir.to_path_buf(),
    })
}

pub fn start(dir: &Path) -> Engine {
    try_start(dir).unwrap_or_else(|e| panic!("callforge did not start: {e}"))
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

impl Engine {
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = client()
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = client()
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub fn put_script(&self, name: &str, source: &str) {
        std::fs::write(self.dir.join("scripts").join(format!("{name}.js")), source).unwrap();
    }
}

/// What the test HTTP server saw and how it misbehaves.
#[derive(Default)]
pub struct Api {
    /// Bodies posted to `/sms` and `/notify`, with their Authorization header.
    pub received: Mutex<Vec<(String, Option<String>, Value)>>,
    /// Requests to `/lookup/*`.
    pub lookups: AtomicUsize,
    /// `/sms` answers 503 to this many requests before succeeding.
    pub fail_first: AtomicUsize,
    pub hits: AtomicUsize,
}

#[derive(serde::Deserialize)]
struct NumberQuery {
    number: Option<String>,
}

async fn lookup_asr(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Query(q): Query<NumberQuery>,
) -> impl IntoResponse {
    api.lookups.fetch_add(1, Ordering::SeqCst);
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth != "Bearer lookup-secret" {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "bad token"})),
        );
    }
    let number = q.number.unwrap_or_default();
    // Numbers ending in 0 have a poor answer-seizure ratio.
    let asr = if number.ends_with('0') { 3.5 } else { 62.0 };
    (StatusCode::OK, Json(json!({"number": number, "asr": asr})))
}

async fn webhook(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    axum::extract::OriginalUri(uri): axum::extract::OriginalUri,
    Json(body): Json<Value>,
) -> impl IntoResponse {
    api.hits.fetch_add(1, Ordering::SeqCst);
    if api
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "try later"})),
        );
    }
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    api.received
        .lock()
        .unwrap()
        .push((uri.path().to_string(), auth, body));
    (StatusCode::OK, Json(json!({"id": "msg-1"})))
}

/// Start the test HTTP server on an ephemeral loopback port.
pub async fn http_server() -> (SocketAddr, Arc<Api>) {
    let api = Arc::new(Api::default());
    let app = Router::new()
        .route("/lookup/asr", get(lookup_asr).post(lookup_asr))
        .route("/sms", post(webhook))
        .route("/notify", post(webhook))
        .route(
            "/hooks/reject",
            post(|| async { (StatusCode::BAD_REQUEST, "no") }),
        )
        .route(
            "/json",
            get(|| async {
                (
                    [("x-answer", "42"), ("content-type", "application/json")],
                    r#"{"hello":"world","n":[1,2]}"#,
                )
            })
            .post(|body: String| async move { ([("x-echo", "yes")], body) }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        )
        .route("/big", get(|| async { "x".repeat(300_000) }))
        .route(
            "/redirect-out",
            get(|| async {
                (
                    StatusCode::FOUND,
                    [("location", "http://localhost:1/elsewhere")],
                    "",
                )
            }),
        )
        .route(
            "/text",
            get(|| async { (StatusCode::NOT_FOUND, "not here") }),
        )
        .with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, api)
}

/// One message the SMTP sink accepted.
#[derive(Debug, Clone)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    pub data: String,
    /// The `AUTH PLAIN` argument (base64) the client sent on this connection, if any.
    pub auth: Option<String>,
}

/// A minimal SMTP server (plain, no TLS) that accepts every message and keeps it.
pub async fn smtp_sink() -> (SocketAddr, Arc<Mutex<Vec<Mail>>>) {
    let mails = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let store = mails.clone();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = tokio::io::BufReader::new(read).lines();
                let _ = write.write_all(b"220 sink ESMTP\r\n").await;
                let mut from = String::new();
                let mut to = Vec::new();
                let mut auth = None;
                while let Ok(Some(line)) = lines.next_line().await {
                    let upper = line.to_ascii_uppercase();
                    let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
                        b"250-sink\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n"
                    } else if upper.starts_with("AUTH PLAIN ") {
                        auth = Some(line[11..].trim().to_string());
                        b"235 accepted\r\n"
                    } else if upper.starts_with("MAIL FROM:") {
                        from = line[10..].trim().to_string();
                        b"250 ok\r\n"
                    } else if upper.starts_with("RCPT TO:") {
                        to.push(line[8..].trim().to_string());
                        b"250 ok\r\n"
                    } else if upper == "DATA" {
                        let _ = write.write_all(b"354 go ahead\r\n").await;
                        let mut data = String::new();
                        while let Ok(Some(l)) = lines.next_line().await {
                            if l == "." {
                                break;
                            }
                            data.push_str(&l);
                            data.push('\n');
                        }
                        store.lock().unwrap().push(Mail {
                            from: std::mem::take(&mut from),
                            to: std::mem::take(&mut to),
                            data,
                            auth: auth.clone(),
                        });
                        b"250 queued\r\n"
                    } else if upper == "QUIT" {
                        let _ = write.write_all(b"221 bye\r\n").await;
                        return;
                    } else if upper == "RSET" || upper == "NOOP" {
                        b"250 ok\r\n"
                    } else {
                        b"502 not implemented\r\n"
                    };
                    if write.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, mails)
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` on a random loopback port without persistence, stopped on drop.
/// Fails the test when redis-server is missing: `tools/ensure-deps.sh --test` installs it.
pub struct Redis {
    child: Child,
    pub url: String,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn redis() -> Redis {
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is missing: run tools/ensure-deps.sh --test");
    let redis = Redis {
        child,
        url: format!("redis://127.0.0.1:{port}/"),
    };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return redis;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("redis-server did not start on port {port}");
}

/// A PostgreSQL server in a temporary folder on a random loopback port, stopped on drop.
/// PostgreSQL refuses to run as root: as root it runs as `nobody` (through `runuser`).
/// Fails the test when the binaries are missing: `tools/ensure-deps.sh --test` installs them.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    pub url: String,
}

/// The folder holding `initdb`, `pg_ctl` and `postgres`: on PATH, or Debian's versioned folder.
fn postgres_bin() -> PathBuf {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("pg_ctl").is_file() && dir.join("initdb").is_file() {
                return dir;
            }
        }
    }
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    debian.retain(|d| d.join("pg_ctl").is_file());
    debian.sort();
    debian
        .pop()
        .expect("PostgreSQL is missing: run tools/ensure-deps.sh --test")
}

impl Postgres {
    /// Run one of PostgreSQL's programs as the unprivileged owner of the data folder.
    fn command(&self, program: &str) -> Command {
        pg_command(&self.bin, program)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Start the server (again) on the same port and data.
    pub fn start(&self) {
        let out = self
            .command("pg_ctl")
            .arg("start")
            .arg("-w")
            .arg("-t")
            .arg("30")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"))
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
                self.port,
                self.dir.path().display()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
        );
    }

    /// Stop the server at once (connections are cut, as when the database host goes away).
    pub fn stop(&self) {
        let out = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-w")
            .arg("-m")
            .arg("immediate")
            .arg("-D")
            .arg(self.data())
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl stop failed: {out:?}");
    }

    /// Run `sql` with psql and return its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", "postgres", "-c", sql])
            .output()
            .expect("psql is missing: run tools/ensure-deps.sh --test");
        assert!(
            out.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

fn pg_command(bin: &Path, program: &str) -> Command {
    let path = bin.join(program);
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.data())
            .output();
    }
}

pub fn postgres() -> Postgres {
    let bin = postgres_bin();
    let dir = tempfile::tempdir().unwrap();
    if unsafe { libc::geteuid() } == 0 {
        // `nobody` owns the folder: PostgreSQL writes its data and socket there.
        let nobody = unsafe { libc::getpwnam(c"nobody".as_ptr()) };
        assert!(!nobody.is_null(), "no user 'nobody' to run PostgreSQL as");
        let (uid, gid) = unsafe { ((*nobody).pw_uid, (*nobody).pw_gid) };
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
    }
    let port = free_port();
    let pg = Postgres {
        bin,
        port,
        url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        dir,
    };
    let out = pg
        .command("initdb")
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "-D",
        ])
        .arg(pg.data())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    pg.start();
    pg
}
