//! The HTTP API of `callforge serve`, driven over a real socket on an ephemeral port.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_callforge");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A running `callforge serve`, killed on drop.
struct Server {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
    scripts: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(config: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    for entry in std::fs::read_dir(Path::new(ROOT).join("scripts")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), scripts.join(entry.file_name())).unwrap();
    }
    let cfg = dir.path().join("callforge.toml");
    std::fs::write(&cfg, config).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--http", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .arg("--scripts")
        .arg(&scripts)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    Server {
        child,
        base: format!("http://{addr}"),
        _dir: dir,
        scripts,
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn post_json(s: &Server, path: &str, body: &str) -> (u16, Value) {
    let r = client()
        .post(format!("{}{path}", s.base))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn run_returns_result_logs_and_duration() {
    let s = start("");
    let (status, body) = post_json(&s, "/v1/run/hello", r#"{"name":"api"}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], json!({"hello": "api", "script": "hello"}));
    assert!(body["logs"].is_array());
    assert!(body["duration_us"].as_u64().unwrap() >= 10_000, "{body}");
    let health = client()
        .get(format!("{}/healthz", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn script_errors_are_422_unknown_404_bad_json_400() {
    let s = start("");
    let (status, body) = post_json(
        &s,
        "/v1/run/dnc?mode=class4",
        r#"{"routing":{"dest_number":"447700900123"}}"#,
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(
        body["error"],
        json!({"code": 604, "message": "Number on DNC List"})
    );
    let (status, body) = post_json(&s, "/v1/run/nope", "{}").await;
    assert_eq!(status, 404);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not found"));
    let (status, body) = post_json(&s, "/v1/run/hello", "{\"name\": ").await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed JSON"),
        "{body}"
    );
    let (status, _) = post_json(&s, "/v1/run/hello?mode=warp", "{}").await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn class4_over_http_normalises_and_uses_the_vars_beside_the_script() {
    let s = start("");
    let data =
        std::fs::read_to_string(Path::new(ROOT).join("tests/data/five_carriers.json")).unwrap();
    let (status, body) = post_json(&s, "/v1/run/routing?mode=class4", &data).await;
    assert_eq!(status, 200, "{body}");
    let egress = body["result"]["routing"]["egress_routing"]
        .as_array()
        .unwrap();
    assert_eq!(egress.len(), 3);
    assert!(
        body["result"]["cli"]["pool"].is_array(),
        "vars merged: {body}"
    );
}

#[tokio::test]
async fn forms_accept_urlencoded_and_json() {
    let s = start("");
    let r = client()
        .post(format!("{}/v1/forms/contact_form", s.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("name=Ada+Lovelace&email=ada%40example.org")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["result"]["ok"], true);
    assert!(body["result"]["message"]
        .as_str()
        .unwrap()
        .contains("Ada Lovelace"));
    let (status, body) =
        post_json(&s, "/v1/forms/contact_form", r#"{"name":"","email":"x"}"#).await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["code"], 400);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("email is invalid"));
}

#[tokio::test]
async fn drivers_are_called_by_function_name() {
    let s = start("");
    let (status, body) =
        post_json(&s, "/v1/drivers/did_driver/search", r#"{"number":"4416"}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"][0]["city"], "Manchester");
    let (status, body) = post_json(
        &s,
        "/v1/drivers/did_driver/allocate",
        r#"{"did":"442071000001"}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["result"]["status"], "allocated");
    let (status, body) = post_json(&s, "/v1/drivers/did_driver/explode", "{}").await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["code"], 404);
}

#[tokio::test]
async fn scripts_are_uploaded_compiled_listed_and_deleted() {
    let s = start("");
    let c = client();
    let url = format!("{}/v1/scripts/greet", s.base);
    let r = c
        .put(&url)
        .body("function main(d){ return 'v1 ' + d.n }")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, body) = post_json(&s, "/v1/run/greet", r#"{"n":1}"#).await;
    assert_eq!(body["result"], "v1 1");

    // A broken upload is refused with its position, and the old version keeps serving.
    let r = c
        .put(&url)
        .body("function main(d){\n  return 'v2' +;\n}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("greet:2:"),
        "{body}"
    );
    let (_, body) = post_json(&s, "/v1/run/greet", r#"{"n":2}"#).await;
    assert_eq!(body["result"], "v1 2");
    let files: Vec<_> = std::fs::read_dir(&s.scripts)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("tmp") || n.starts_with('.'))
        .collect();
    assert!(files.is_empty(), "no temp files left behind: {files:?}");

    // Hot reload: an edit on disk is picked up on the next run without a restart.
    std::fs::write(
        s.scripts.join("greet.js"),
        "function main(d){ return 'v3 ' + d.n }",
    )
    .unwrap();
    let (_, body) = post_json(&s, "/v1/run/greet", r#"{"n":3}"#).await;
    assert_eq!(body["result"], "v3 3");

    let list: Value = c
        .get(format!("{}/v1/scripts", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(list["scripts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == "greet"));
    let src = c.get(&url).send().await.unwrap().text().await.unwrap();
    assert!(src.contains("v3"));
    assert_eq!(c.delete(&url).send().await.unwrap().status(), 204);
    assert_eq!(c.delete(&url).send().await.unwrap().status(), 404);
    let (status, _) = post_json(&s, "/v1/run/greet", "{}").await;
    assert_eq!(status, 404);
    let r = c
        .put(format!("{}/v1/scripts/..%2Fescape", s.base))
        .body("function main(){}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn oversize_bodies_and_script_counts_get_413() {
    let s = start("[http]\nmax_body_bytes = 1000\n[scripts]\nmax_scripts = 9\n");
    let big = format!("{{\"x\":\"{}\"}}", "a".repeat(2000));
    let (status, body) = post_json(&s, "/v1/run/hello", &big).await;
    assert_eq!(status, 413);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1000-byte"),
        "{body}"
    );
    let c = client();
    let mut last = 0;
    for i in 0..5 {
        last = c
            .put(format!("{}/v1/scripts/extra{i}", s.base))
            .body("function main(){}")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
    }
    assert_eq!(last, 413, "the examples plus uploads exceed 9 scripts");
}

#[tokio::test]
async fn a_bearer_token_guards_the_api_but_not_health() {
    let s = start("[http]\ntoken = \"s3cret\"\n");
    let c = client();
    let r = c
        .post(format!("{}/v1/run/hello", s.base))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(format!("{}/v1/run/hello", s.base))
        .bearer_auth("wrong")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(format!("{}/v1/run/hello", s.base))
        .bearer_auth("s3cret")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        c.get(format!("{}/healthz", s.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn a_runaway_script_fails_alone_while_others_are_served() {
    let s = start("[limits]\nscript_cpu_ms = 1500\n");
    std::fs::write(s.scripts.join("spin.js"), "function main(){ for(;;){} }").unwrap();
    let spin = {
        let base = s.base.clone();
        tokio::spawn(async move {
            let r = client()
                .post(format!("{base}/v1/run/spin?mode=script"))
                .body("{}")
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    for i in 0..20 {
        let (status, body) =
            post_json(&s, "/v1/run/legacy?mode=script", &format!("{{\"i\":{i}}}")).await;
        assert_eq!(status, 200);
        assert_eq!(body["result"]["i"], i);
    }
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "{:?}",
        started.elapsed()
    );
    let (status, body) = spin.await.unwrap();
    assert_eq!(status, 422);
    assert_eq!(body["error"]["code"], 500);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("CPU time limit of 1500 ms"));
}
