//! ConnexCS's host modules added for issue 11, through the real binary over HTTP against real
//! servers on loopback: `cxRest` (a REST API started here), `cxTemplate` and `cxSend`'s
//! template and positional forms (the SMTP sink and webhook server of `support`), `cxPubSub`
//! (in-process, and across two engines over a real redis-server), `cxJob` (retries, progress,
//! results, and a restart of the binary) and `cxLLM` (an OpenAI-compatible server started
//! here). Published ScriptForge examples (own-words equivalents in `tests/fixtures/scriptforge/`, or the published scripts via `CALLFORGE_SCRIPTFORGE_DIR`) run from `tests/fixtures/scriptforge/`,
//! over HTTP and, for class4, over SIP with SIPp.

mod scriptforge_examples;
mod sip_support;
mod support;

use scriptforge_examples::source as scriptforge_source;
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    http::{HeaderMap, Method, StatusCode, Uri},
    response::IntoResponse,
    Json, Router,
};
use serde_json::{json, Value};
use support::{http_server, redis, smtp_sink, start, try_start, workdir, Engine};

/// One request the test API saw: method, path, query, Authorization header, body.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: String,
    auth: String,
    body: String,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A stand-in for ConnexCS's control-panel API under `/api/cp/`, recording every request.
async fn rest_api() -> (u16, Log) {
    let log: Log = Default::default();
    let seen = log.clone();
    let app = Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let seen = seen.clone();
            async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let path = uri.path().to_string();
                let query = uri.query().unwrap_or("").to_string();
                seen.lock().unwrap().push(Seen {
                    method: method.to_string(),
                    path: path.clone(),
                    query: query.clone(),
                    auth: auth.clone(),
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
                // base64("api@yourdomain.com:pw") and the bearer token of api@api.com.
                if auth != "Basic YXBpQHlvdXJkb21haW4uY29tOnB3" && auth != "Bearer tok" {
                    return (StatusCode::UNAUTHORIZED, Json(json!({"error": "auth"})));
                }
                let rest = path.strip_prefix("/api/cp/").unwrap_or("");
                match (method.as_str(), rest) {
                    ("GET", "customer") => (
                        StatusCode::OK,
                        Json(json!([{"id": 7, "name": "Acme"}, {"id": 8, "name": "Beta"}])),
                    ),
                    ("GET", "did") if query == "customer_id=42" => (
                        StatusCode::OK,
                        Json(json!([{"did": "441000000001"}, {"did": "441000000002"}])),
                    ),
                    ("GET", "slow") => {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        (StatusCode::OK, Json(json!(null)))
                    }
                    ("GET", r) if r.starts_with("customer/") => (
                        StatusCode::OK,
                        Json(json!({"id": &r[9..], "credit": "12.50", "currency": "GBP"})),
                    ),
                    ("POST" | "PUT" | "DELETE", r) if r.starts_with("customer") => (
                        StatusCode::OK,
                        Json(json!({"ok": true, "method": method.as_str()})),
                    ),
                    _ => (
                        StatusCode::NOT_FOUND,
                        Json(json!({"error": "no such resource"})),
                    ),
                }
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, log)
}

fn rest_config(port: u16) -> String {
    format!(
        "[fetch]\nallow = [\"127.0.0.1:{port}\"]\ntimeout_ms = 1000\n\
         [rest]\nurl = \"http://127.0.0.1:{port}/api/cp\"\n\
         [rest.users.\"api@yourdomain.com\"]\npassword = \"pw\"\n\
         [rest.users.\"api@api.com\"]\ntoken = \"tok\"\n"
    )
}

/// Copy an example into the engine's scripts folder.
fn put_fixture(s: &Engine, name: &str) {
    s.put_script(name, &scriptforge_source(name));
}

#[tokio::test]
async fn published_cxrest_scripts_call_the_configured_api() {
    let (port, log) = rest_api().await;
    let dir = workdir(&rest_config(port));
    let s = start(dir.path());
    put_fixture(&s, "api");
    let (status, body) = s.post("/v1/run/api", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["result"],
        json!([{"id": 7, "name": "Acme"}, {"id": 8, "name": "Beta"}])
    );
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("GET", "/api/cp/customer")
    );
    assert_eq!(seen[0].auth, "Basic YXBpQHlvdXJkb21haW4uY29tOnB3");
}

#[tokio::test]
async fn the_published_random_cli_script_picks_a_did_of_the_account_as_cli() {
    let (port, log) = rest_api().await;
    let dir = workdir(&rest_config(port));
    let s = start(dir.path());
    put_fixture(&s, "random-cli-from-did");
    let dids = ["441000000001", "441000000002"];
    let mut picked = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let input = json!({"routing": {
            "account_id": 42, "cli": "447700900000", "dest_number": "4420",
            "egress_routing": [{"gw": {"1": {"cli": "447700900000"}, "2": {"cli": "447700900000"}}}],
        }});
        let (status, body) = s
            .post("/v1/run/random-cli-from-did?mode=class4", input)
            .await;
        assert_eq!(status, 200, "{body}");
        let routing = &body["result"]["routing"];
        let cli = routing["cli"].as_str().unwrap_or_default().to_string();
        assert!(dids.contains(&cli.as_str()), "{body}");
        assert_eq!(
            routing["dest_number"], "4420",
            "the rest of the routing stays"
        );
        for gw in ["1", "2"] {
            assert_eq!(routing["egress_routing"][0]["gw"][gw]["cli"], cli, "{body}");
        }
        picked.insert(cli);
    }
    assert_eq!(
        picked.len(),
        2,
        "random among the account's DIDs: {picked:?}"
    );
    let seen = log.lock().unwrap().clone();
    assert!(seen
        .iter()
        .all(|r| r.path == "/api/cp/did" && r.auth == "Bearer tok"));
}

#[tokio::test]
async fn the_published_random_cli_script_routes_a_sip_call_with_a_did_as_cli() {
    let (port, log) = rest_api().await;
    // A route of its own (inserted before the shared ones: first match wins).
    let extra = format!(
        "{}\n[[route]]\nmatch = \"^7000$\"\nscript = \"random-cli-from-did.js\"\nmode = \"class4\"\n",
        rest_config(port)
    );
    let server = sip_support::start(&extra);
    let scripts = server.dir.path().join("scripts");
    let source = scriptforge_source("random-cli-from-did");
    std::fs::write(scripts.join("random-cli-from-did.js"), source).unwrap();
    // The carriers come from the script's vars, as an operator would configure them.
    std::fs::write(
        scripts.join("random-cli-from-did.toml"),
        "[[routing.egress_routing]]\ngw = { alpha = { cli = \"0\" } }\n\
         [[routing.egress_routing]]\ngw = { bravo = { cli = \"0\" } }\n",
    )
    .unwrap();
    let udp = server.udp;
    let run = tokio::task::spawn_blocking(move || {
        sip_support::sipp("random_cli", udp, "7000", 10, &["-r", "20"])
    })
    .await
    .unwrap();
    sip_support::assert_all_ok(&run, 10);
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 10, "one API call per INVITE: {seen:?}");
    assert!(seen
        .iter()
        .all(|r| r.path == "/api/cp/did" && r.query == "customer_id=42"));
}

#[tokio::test]
async fn cxrest_helpers_send_what_the_stub_describes_and_fail_with_rest_errors() {
    let (port, log) = rest_api().await;
    let dir = workdir(&rest_config(port));
    let s = start(dir.path());
    s.put_script(
        "crud",
        r#"const auth = require('cxRest');
        async function main() {
            const api = auth("api@api.com");
            const out = {};
            out.read = await api.read('customer', 7);
            out.readPath = await api.read('customer/8');
            out.create = await api.create('customer', {name: 'Joe'});
            out.update = await api.update('customer', 7, {name: 'Alice'});
            out.del = await api.delete('customer/7');
            out.viaAuth = (await require('cxRest').auth("api@api.com").get('customer', {name: 'A B', n: 2}))[0].id;
            const fails = {};
            for (const [k, f] of Object.entries({
                unknownUser: () => auth("nobody@x.com").get('customer'),
                notFound: () => api.get('missing'),
                escape: () => api.get('../admin'),
                slow: () => api.get('slow'),
            })) {
                try { await f(); fails[k] = 'resolved'; } catch (e) { fails[k] = e.name + ': ' + e.message; }
            }
            out.fails = fails;
            return out;
        }"#,
    );
    let started = Instant::now();
    let (status, body) = s.post("/v1/run/crud", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let r = &body["result"];
    assert_eq!(r["read"]["id"], "7");
    assert_eq!(r["read"]["credit"], "12.50");
    assert_eq!(r["readPath"]["id"], "8");
    assert_eq!(r["create"], json!({"ok": true, "method": "POST"}));
    assert_eq!(r["update"], json!({"ok": true, "method": "PUT"}));
    assert_eq!(r["del"], json!({"ok": true, "method": "DELETE"}));
    assert_eq!(r["viaAuth"], 7);
    let fails = &r["fails"];
    let text = |k: &str| fails[k].as_str().unwrap_or("").to_string();
    assert!(
        text("unknownUser")
            .starts_with("RestError: cxRest: API user 'nobody@x.com' is not configured"),
        "{fails}"
    );
    assert!(
        text("notFound").starts_with("RestError: cxRest: GET missing: HTTP 404"),
        "{fails}"
    );
    assert!(text("escape").starts_with("RestError:"), "{fails}");
    assert!(text("slow").contains("timed out"), "{fails}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the 1 s timeout applies"
    );
    let seen = log.lock().unwrap().clone();
    let find = |method: &str, path: &str| {
        seen.iter()
            .find(|s| s.method == method && s.path == path)
            .cloned()
            .unwrap_or_else(|| panic!("no {method} {path} in {seen:?}"))
    };
    assert_eq!(find("GET", "/api/cp/customer/7").auth, "Bearer tok");
    assert_eq!(
        serde_json::from_str::<Value>(&find("POST", "/api/cp/customer").body).unwrap(),
        json!({"name": "Joe"})
    );
    assert_eq!(
        serde_json::from_str::<Value>(&find("PUT", "/api/cp/customer/7").body).unwrap(),
        json!({"name": "Alice"})
    );
    find("DELETE", "/api/cp/customer/7");
    assert!(
        seen.iter()
            .any(|s| s.path == "/api/cp/customer" && s.query == "n=2&name=A+B"),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|s| s.path.contains("admin")),
        "a path with '..' never leaves the engine"
    );
}

#[test]
fn a_rest_host_outside_the_fetch_allow_list_is_a_startup_error() {
    let dir = workdir(
        "[rest]\nurl = \"http://127.0.0.1:9/api\"\n[rest.users.\"a@b.c\"]\npassword = \"x\"\n",
    );
    let err = try_start(dir.path()).err().expect("must not start");
    assert!(
        err.contains("[rest]") && err.contains("[fetch] allow"),
        "{err}"
    );
}

fn smtp_config(port: u16) -> String {
    format!(
        "[send.smtp]\nserver = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\nfrom = \"callforge@example.org\"\n"
    )
}

#[tokio::test]
async fn the_published_email_script_renders_its_template_into_the_mail() {
    let (smtp, mails) = smtp_sink().await;
    let dir = workdir(&smtp_config(smtp.port()));
    std::fs::create_dir_all(dir.path().join("templates")).unwrap();
    std::fs::write(
        dir.path().join("templates/scriptforge.toml"),
        "subject = \"Welcome, {{ name }}\"\n\
         text = \"Dear {{ name }},\\nyour account is ready.\"\n\
         html = \"<p>Dear <b>{{ name }}</b></p>\"\n",
    )
    .unwrap();
    let s = start(dir.path());
    put_fixture(&s, "email");
    let (status, body) = s.post("/v1/run/email", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["ok"], true, "{body}");
    let mails = mails.lock().unwrap().clone();
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].to, vec!["<joe@blogs.com>"]);
    let data = &mails[0].data;
    assert!(data.contains("Subject: Welcome, Joe Bloggs"), "{data}");
    assert!(data.contains("Dear Joe Bloggs,"), "{data}");
    assert!(data.contains("<b>Joe Bloggs</b>"), "{data}");

    // cxTemplate itself, and its named errors.
    s.put_script(
        "tpl",
        r#"const cxTemplate = require('cxTemplate');
        async function main() {
            const { subject, text, html, sms } = await cxTemplate.compile('scriptforge', {name: 'A & B'});
            const errors = [];
            for (const name of ['missing', '../callforge']) {
                try { await cxTemplate.compile(name, {}); } catch (e) { errors.push(e.name + ': ' + e.message); }
            }
            return { subject, text, html, sms, errors };
        }"#,
    );
    let (_, body) = s.post("/v1/run/tpl", json!({})).await;
    let r = &body["result"];
    assert_eq!(r["subject"], "Welcome, A & B");
    assert_eq!(r["text"], "Dear A & B,\nyour account is ready.");
    assert_eq!(r["html"], "<p>Dear <b>A &amp; B</b></p>");
    assert_eq!(r["sms"], "");
    let errors = r["errors"].as_array().unwrap();
    assert!(
        errors[0]
            .as_str()
            .unwrap()
            .starts_with("TemplateError: cxTemplate: no template 'missing'"),
        "{r}"
    );
    assert!(
        errors[1]
            .as_str()
            .unwrap()
            .contains("is not a template name"),
        "{r}"
    );
}

#[tokio::test]
async fn sms_takes_the_positional_form_and_templates() {
    let (addr, api) = http_server().await;
    let dir = workdir(&format!("[send.sms]\nurl = \"http://{addr}/sms\"\n"));
    std::fs::create_dir_all(dir.path().join("templates")).unwrap();
    std::fs::write(
        dir.path().join("templates/code.toml"),
        "sms = \"Your code is {{ code }}\"\n",
    )
    .unwrap();
    let s = start(dir.path());
    s.put_script(
        "sms",
        r#"const { sms } = require('cxSend');
        async function main() {
            const a = await sms('447000123456', 'Hello World!');
            const b = await sms({to: '447000123457', template: 'code', vars: {code: 4321}});
            return [a.ok, b.ok];
        }"#,
    );
    let (status, body) = s.post("/v1/run/sms", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], json!([true, true]));
    let received = api.received.lock().unwrap().clone();
    let bodies: Vec<Value> = received.iter().map(|r| r.2.clone()).collect();
    assert!(
        bodies.contains(&json!({"to": "447000123456", "text": "Hello World!"})),
        "{bodies:?}"
    );
    assert!(
        bodies.contains(&json!({"to": "447000123457", "text": "Your code is 4321"})),
        "{bodies:?}"
    );
}

const LISTENER: &str = r#"const { subscribe } = require('cxPubSub');
async function main(d) {
    return await new Promise((resolve) => {
        subscribe('calls', '1234', (payload) => resolve(payload));
    });
}"#;

const PUBLISHER: &str = r#"const { publish } = require('cxPubSub');
async function main(d) {
    await publish('calls', '999', {decoy: true});
    await publish('calls', '1234', {n: d.n, from: 'publisher'});
    return true;
}"#;

/// Start the listener on `a`, then publish from `b` until the listener answers: the first
/// event with id 1234 it saw, never the decoy published just before each one.
async fn listener_hears_publisher(a: &Engine, b: &Engine) {
    a.put_script("listener", LISTENER);
    b.put_script("publisher", PUBLISHER);
    let (url, client) = (format!("{}/v1/run/listener", a.base), support::client());
    let listening = tokio::spawn(async move {
        let r = client.post(url).json(&json!({})).send().await.unwrap();
        r.json::<Value>().await.unwrap()
    });
    for n in 0..100 {
        let (status, body) = b.post("/v1/run/publisher", json!({"n": n})).await;
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        if listening.is_finished() {
            break;
        }
    }
    let body = listening.await.unwrap();
    let payload = &body["result"];
    assert_eq!(payload["from"], "publisher", "{body}");
    assert!(payload["n"].is_u64(), "{body}");
    assert!(payload.get("decoy").is_none(), "{body}");
}

#[tokio::test]
async fn pubsub_delivers_json_events_between_runs_in_one_engine() {
    let dir = workdir("");
    let s = start(dir.path());
    listener_hears_publisher(&s, &s).await;
    // The stub's own example shape: subscribe(event, cb), then publish(event, payload).
    s.put_script(
        "self",
        r#"const { publish, subscribe } = require('cxPubSub');
        async function main() {
            const heard = new Promise((resolve) => subscribe('myEvent', (data) => resolve(data)));
            publish('myEvent', {my: 'data'});
            const sub = await subscribe('other', () => {});
            let bad;
            try { await publish('x', 'y', {big: 'z'.repeat(70000)}); } catch (e) { bad = e.name; }
            let many;
            try { for (let i = 0; i < 200; i++) await subscribe('e' + i, () => {}); } catch (e) { many = e.message; }
            return { heard: await heard, unsubscribed: sub.unsubscribe(), bad, many };
        }"#,
    );
    let (status, body) = s.post("/v1/run/self", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["result"],
        json!({"heard": {"my": "data"}, "unsubscribed": true, "bad": "TypeError",
               "many": "cxPubSub.subscribe: a run may hold at most 100 subscriptions"})
    );
}

#[tokio::test]
async fn pubsub_crosses_engines_through_redis() {
    let redis = redis();
    let config = format!("[kv]\nbackend = \"{}\"\n", redis.url);
    let (dir_a, dir_b) = (workdir(&config), workdir(&config));
    let (a, b) = (start(dir_a.path()), start(dir_b.path()));
    listener_hears_publisher(&a, &b).await;
}

#[tokio::test]
async fn pubsub_without_its_redis_rejects_with_a_named_error() {
    let port = support::free_port();
    let dir = workdir(&format!("[kv]\nbackend = \"redis://127.0.0.1:{port}/\"\n"));
    let s = start(dir.path());
    s.put_script(
        "down",
        r#"const { publish, subscribe } = require('cxPubSub');
        async function main() {
            const out = [];
            for (const f of [() => publish('e', {a: 1}), () => subscribe('e', () => {})]) {
                try { await f(); out.push('resolved'); } catch (e) { out.push(e.name + ': ' + e.message); }
            }
            return out;
        }"#,
    );
    let started = Instant::now();
    let (status, body) = s.post("/v1/run/down", json!({})).await;
    assert_eq!(status, 200, "{body}");
    for text in body["result"].as_array().unwrap() {
        let text = text.as_str().unwrap();
        assert!(
            text.starts_with("PubSubError: cxPubSub: redis://127.0.0.1:"),
            "{body}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(12));
}

const JOBS: &str = r#"const cxJob = require('cxJob');
const kv = require('kv');
async function main(d) {
    if (d.check) return await cxJob.get(d.check);
    if (d.slow) return (await cxJob.add(process.env.SCRIPTFORGE_NAME, 'slow', null)).id;
    if (d.later) {
        const job = await cxJob.add(process.env.SCRIPTFORGE_NAME, 'later', {v: d.later}, {delay: 1500});
        return job.id;
    }
    const job = await cxJob.add(process.env.SCRIPTFORGE_ID, 'processJob', {items: d.items}, {attempts: 3, backoff: 50});
    const result = await job.result;
    const failing = await cxJob.add(process.env.SCRIPTFORGE_ID, 'alwaysFails', null, {attempts: 2, backoff: {delay: 10}});
    let failure;
    try { await failing.result; } catch (e) { failure = e.name + ': ' + e.message; }
    let outside;
    try { cxJob.setProgress(1); } catch (e) { outside = e.name + ': ' + e.message; }
    return { result, job: await cxJob.get(job.id), failure, outside };
}
async function processJob(data) {
    const n = await kv.incr('job-tries');
    await cxJob.setProgress(n * 10);
    await cxJob.setData({seen: data.items.length, try: n});
    if (n < 3) throw new Error('not yet ' + n);
    return data.items.map((x) => x * 2);
}
async function alwaysFails() { throw new Error('broken on purpose'); }
async function slow(data) {
    await new Promise((resolve) => setTimeout(resolve, 2500));
    return 'slow done';
}
async function later(data) {
    await kv.set('later-ran', data.v);
    return 'ran ' + data.v + ' ' + data.cfg.tag;
}"#;

/// The operator's vars for `jobs.js`, merged into the data of its runs, jobs included.
const JOBS_VARS: &str = "[cfg]\ntag = \"T\"\n";

#[tokio::test]
async fn jobs_retry_record_progress_and_resolve_their_result() {
    let dir = workdir("");
    jobs_run_with_retries(&start(dir.path())).await;
}

#[tokio::test]
async fn jobs_in_redis_retry_record_progress_and_resolve_their_result() {
    let redis = redis();
    let dir = workdir(&format!("[kv]\nbackend = \"{}\"\n", redis.url));
    jobs_run_with_retries(&start(dir.path())).await;
}

async fn jobs_run_with_retries(s: &Engine) {
    s.put_script("jobs", JOBS);
    let (status, body) = s.post("/v1/run/jobs", json!({"items": [1, 2, 3]})).await;
    assert_eq!(status, 200, "{body}");
    let r = &body["result"];
    assert_eq!(r["result"], json!([2, 4, 6]), "{body}");
    let job = &r["job"];
    assert_eq!(job["state"], "completed");
    assert_eq!(job["attemptsMade"], 3);
    assert_eq!(job["progress"], 30);
    assert_eq!(job["data"], json!({"seen": 3, "try": 3}));
    assert_eq!(job["function"], "processJob");
    assert_eq!(job["script"], "jobs");
    let failure = r["failure"].as_str().unwrap_or("");
    assert!(failure.starts_with("JobError: cxJob: job "), "{r}");
    assert!(
        failure.contains("failed after 2 attempt(s)") && failure.contains("broken on purpose"),
        "{r}"
    );
    assert_eq!(
        r["outside"],
        "TypeError: cxJob.setProgress: this run is not a job"
    );
}

#[tokio::test]
async fn queued_jobs_survive_a_restart_of_the_binary() {
    let dir = workdir("");
    std::fs::write(dir.path().join("scripts/jobs.toml"), JOBS_VARS).unwrap();
    let first = start(dir.path());
    first.put_script("jobs", JOBS);
    job_outlives_its_engine(first, || start(dir.path())).await;
}

#[tokio::test]
async fn queued_jobs_in_redis_run_on_another_engine() {
    let redis = redis();
    let config = format!("[kv]\nbackend = \"{}\"\n", redis.url);
    let (dir_a, dir_b) = (workdir(&config), workdir(&config));
    let first = start(dir_a.path());
    first.put_script("jobs", JOBS);
    std::fs::write(dir_b.path().join("scripts/jobs.js"), JOBS).unwrap();
    std::fs::write(dir_b.path().join("scripts/jobs.toml"), JOBS_VARS).unwrap();
    job_outlives_its_engine(first, || start(dir_b.path())).await;
}

#[tokio::test]
async fn a_job_whose_engine_dies_while_running_it_is_run_by_another_after_its_lease() {
    let redis = redis();
    let config = format!(
        "[kv]\nbackend = \"{}\"\n[jobs]\nlease_ms = 1500\n",
        redis.url
    );
    let (dir_a, dir_b) = (workdir(&config), workdir(&config));
    std::fs::write(dir_b.path().join("scripts/jobs.js"), JOBS).unwrap();
    job_cut_short(start(dir_a.path()), || start(dir_b.path())).await;
}

#[tokio::test]
async fn a_job_cut_short_by_a_restart_runs_again_when_the_binary_restarts() {
    let dir = workdir("");
    job_cut_short(start(dir.path()), || start(dir.path())).await;
}

/// Start the 2.5 s job `slow` on `a`, kill `a` (SIGKILL) while it runs, and check that the
/// engine `next` starts completes it, the attempt cut short not counted.
async fn job_cut_short(a: Engine, next: impl FnOnce() -> Engine) {
    a.put_script("jobs", JOBS);
    let (_, body) = a.post("/v1/run/jobs", json!({"slow": true})).await;
    let id = body["result"].as_i64().expect("a job id");
    let state = |s: &Engine| {
        let (url, client) = (format!("{}/v1/run/jobs", s.base), support::client());
        async move {
            let r = client
                .post(url)
                .json(&json!({"check": id}))
                .send()
                .await
                .unwrap();
            r.json::<Value>().await.unwrap()["result"].clone()
        }
    };
    let until = Instant::now() + Duration::from_secs(5);
    while state(&a).await["state"] != "active" {
        assert!(
            Instant::now() < until,
            "the first engine never started the job"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(a);
    let b = next();
    let until = Instant::now() + Duration::from_secs(20);
    let job = loop {
        let job = state(&b).await;
        if job["state"] == "completed" || Instant::now() > until {
            break job;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["result"], "slow done");
    assert_eq!(
        job["attemptsMade"], 1,
        "the attempt cut short does not count: {job}"
    );
}

/// Queue a delayed job on `s`, kill `s` (SIGKILL) before the job is due, then check that
/// the engine `next` starts runs it once.
async fn job_outlives_its_engine(s: Engine, next: impl FnOnce() -> Engine) {
    let (status, body) = s.post("/v1/run/jobs", json!({"later": "v42"})).await;
    assert_eq!(status, 200, "{body}");
    let id = body["result"].as_i64().expect("a job id");
    let (_, pending) = s.post("/v1/run/jobs", json!({"check": id})).await;
    assert_eq!(pending["result"]["state"], "waiting", "{pending}");
    drop(s);
    let s = next();
    let until = Instant::now() + Duration::from_secs(15);
    let job = loop {
        let (_, body) = s.post("/v1/run/jobs", json!({"check": id})).await;
        if body["result"]["state"] == "completed" || Instant::now() > until {
            break body["result"].clone();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(
        job["result"], "ran v42 T",
        "the job's data has the script's vars"
    );
    assert_eq!(job["attemptsMade"], 1);
    s.put_script(
        "readkv",
        "async function main(){ return await require('kv').get('later-ran') }",
    );
    let (_, body) = s.post("/v1/run/readkv", json!({})).await;
    assert_eq!(body["result"], "v42");
}

/// An OpenAI-compatible chat-completions server: answers `reply <messages> to <last text>`
/// and 500 for the model "fail"; records each request body and Authorization header.
async fn llm_server() -> (u16, Arc<Mutex<Vec<(String, Value)>>>) {
    let log: Arc<Mutex<Vec<(String, Value)>>> = Default::default();
    let seen = log.clone();
    let app = Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |headers: HeaderMap, Json(body): Json<Value>| {
            let seen = seen.clone();
            async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                seen.lock().unwrap().push((auth, body.clone()));
                if body["model"] == "fail" {
                    return (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        Json(json!({"error": "down"})),
                    )
                        .into_response();
                }
                let messages = body["messages"].as_array().cloned().unwrap_or_default();
                let last = messages
                    .last()
                    .and_then(|m| m["content"].as_str())
                    .unwrap_or("")
                    .to_string();
                let content = format!("reply {} to {last}", messages.len());
                Json(json!({"choices": [{"message": {"role": "assistant", "content": content}}]}))
                    .into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, log)
}

#[tokio::test]
async fn llm_chat_keeps_one_conversation_per_chat_id() {
    let (port, log) = llm_server().await;
    let dir = workdir(&format!(
        "[fetch]\nallow = [\"127.0.0.1:{port}\"]\n\
         [llm]\nurl = \"http://127.0.0.1:{port}/v1\"\napi_key = \"sk-test\"\nmodel = \"small\"\n\
         [llm.assistants.support]\nsystem = \"You answer support calls.\"\n\
         [llm.assistants.broken]\nmodel = \"fail\"\n"
    ));
    let s = start(dir.path());
    s.put_script(
        "chat",
        r#"const { chat } = require('cxLLM');
        async function main() {
            const a = await chat('support', 'hello', 'c1');
            const b = await chat('support', 'again', 'c1');
            const c = await chat('support', 'other', 'c2');
            const errors = [];
            for (const who of ['nobody', 'broken']) {
                try { await chat(who, 'x'); } catch (e) { errors.push(e.name + ': ' + e.message); }
            }
            return { a, b, c, errors };
        }"#,
    );
    let (status, body) = s.post("/v1/run/chat", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let r = &body["result"];
    // system + user; then system + user + assistant + user; a new chat starts over.
    assert_eq!(r["a"], "reply 2 to hello");
    assert_eq!(r["b"], "reply 4 to again");
    assert_eq!(r["c"], "reply 2 to other");
    let errors = r["errors"].as_array().unwrap();
    assert!(
        errors[0]
            .as_str()
            .unwrap()
            .starts_with("LLMError: cxLLM: no assistant 'nobody'"),
        "{r}"
    );
    assert!(errors[1].as_str().unwrap().contains("HTTP 500"), "{r}");
    let seen = log.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        4,
        "the unknown assistant never reaches the server"
    );
    assert_eq!(seen[0].0, "Bearer sk-test");
    assert_eq!(seen[0].1["model"], "small");
    assert_eq!(
        seen[1].1["messages"],
        json!([
            {"role": "system", "content": "You answer support calls."},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "reply 2 to hello"},
            {"role": "user", "content": "again"},
        ])
    );
}
