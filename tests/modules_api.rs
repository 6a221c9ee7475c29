//! The host modules through the real binary over HTTP, against real servers on loopback:
//! the shipped ConnexCS-style examples (DNC 604, honeypot 603, ASR fast fail), lookups,
//! email to an SMTP sink, webhooks with retries, fetch, and clear errors for bad config,
//! unreachable and slow servers, oversize responses and disallowed hosts.

mod support;

use std::sync::atomic::Ordering;

use serde_json::{json, Value};
use support::{http_server, smtp_sink, start, try_start, workdir};

fn routing(dest: &str, account: &str) -> Value {
    json!({"routing": {
        "cli": "441134960000", "dest_number": dest, "account_id": account,
        "egress_routing": [{"gw": {"a": {}}, "cost": 2}, {"gw": {"b": {}}, "cost": 1}]
    }})
}

#[tokio::test]
async fn dnc_check_rejects_604_from_a_csv_table() {
    let dir = workdir("[lookup.tps]\nprovider = \"table\"\ncsv = \"scripts/dnc_list.csv\"\n");
    let s = start(dir.path());
    for listed in ["447700900123", "447700900999", "+447700900123"] {
        let (status, body) = s
            .post("/v1/run/dnc_check?mode=class4", routing(listed, "1"))
            .await;
        assert_eq!(status, 422, "{listed}: {body}");
        assert_eq!(
            body["error"],
            json!({"code": 604, "message": "Number on DNC List"})
        );
    }
    let (status, body) = s
        .post(
            "/v1/run/dnc_check?mode=class4",
            routing("447700900555", "1"),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["routing"]["dest_number"], "447700900555");
    // The lookup answers the row's fields.
    s.put_script(
        "tps_row",
        "async function main(d){ return await api.lookup.tps(d.n) }",
    );
    let (_, body) = s
        .post("/v1/run/tps_row", json!({"n": "447700900999"}))
        .await;
    assert_eq!(body["result"]["reason"], "regulator");
    assert_eq!(body["result"]["found"], true);
}

#[tokio::test]
async fn a_form_maintains_the_dnc_list_a_routing_script_reads() {
    let dir = workdir("[lookup.tps]\nprovider = \"table\"\nuserspace = \"dnc\"\n");
    let s = start(dir.path());
    let (status, _) = s
        .post(
            "/v1/run/dnc_check?mode=class4",
            routing("447700900777", "1"),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = s
        .post(
            "/v1/forms/dnc_form",
            json!({"action": "add", "number": "447700900777"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["added"], true);
    let (status, body) = s
        .post(
            "/v1/run/dnc_check?mode=class4",
            routing("447700900777", "1"),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["code"], 604);
    // userspaceLookup reads the same table by name.
    s.put_script(
        "us",
        "async function main(d){ return await api.lookup.userspaceLookup('dnc', d.n) }",
    );
    let (_, body) = s.post("/v1/run/us", json!({"n": "447700900777"})).await;
    assert_eq!(body["result"]["found"], true);
    assert_eq!(body["result"]["reason"], "requested");
    let (_, body) = s
        .post(
            "/v1/forms/dnc_form",
            json!({"action": "remove", "number": "447700900777"}),
        )
        .await;
    assert_eq!(body["result"]["removed"], true);
    let (status, _) = s
        .post(
            "/v1/run/dnc_check?mode=class4",
            routing("447700900777", "1"),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn honeypot_blocks_603_after_n_attempts_and_remembers_across_restart() {
    let dir = workdir("");
    let s = start(dir.path());
    let honeypot = "442079460000";
    for attempt in 1..=2 {
        let (status, body) = s
            .post("/v1/run/honeypot?mode=class4", routing(honeypot, "77"))
            .await;
        assert_eq!(status, 200, "attempt {attempt}: {body}");
    }
    let (status, body) = s
        .post("/v1/run/honeypot?mode=class4", routing(honeypot, "77"))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], 603);
    // Every call of the blocked account is refused; other accounts are not.
    let (status, _) = s
        .post(
            "/v1/run/honeypot?mode=class4",
            routing("447700900555", "77"),
        )
        .await;
    assert_eq!(status, 422);
    let (status, _) = s
        .post(
            "/v1/run/honeypot?mode=class4",
            routing("447700900555", "78"),
        )
        .await;
    assert_eq!(status, 200);
    drop(s);
    let s = start(dir.path());
    let (status, body) = s
        .post(
            "/v1/run/honeypot?mode=class4",
            routing("447700900555", "77"),
        )
        .await;
    assert_eq!(status, 422, "the count lives in the embedded store: {body}");
}

#[tokio::test]
async fn asr_fast_fail_uses_an_http_lookup_with_auth_and_a_cache() {
    let (addr, api) = http_server().await;
    let dir = workdir(&format!(
        "[lookup.asrplus]\nprovider = \"http\"\nurl = \"http://{addr}/lookup/asr?number={{number}}\"\nauth_header = \"Bearer lookup-secret\"\ncache_ttl_s = 60\n"
    ));
    let s = start(dir.path());
    let (status, body) = s
        .post(
            "/v1/run/asr_fastfail?mode=class4",
            routing("447700900120", "1"),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], 503);
    assert!(
        body["error"]["message"].as_str().unwrap().contains("3.5"),
        "{body}"
    );
    for _ in 0..3 {
        let (status, body) = s
            .post(
                "/v1/run/asr_fastfail?mode=class4",
                routing("447700900121", "1"),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let egress = body["result"]["routing"]["egress_routing"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(egress[0]["cost"], 1, "cheapest first");
    }
    assert_eq!(
        api.lookups.load(Ordering::SeqCst),
        2,
        "repeated numbers come from the cache"
    );
}

#[tokio::test]
async fn lookup_failures_are_clear_errors() {
    let (addr, _api) = http_server().await;
    let closed = support::free_port();
    let dir = workdir(&format!(
        r#"
[lookup.hlr]
provider = "http"
url = "http://{addr}/slow?n={{number}}"
timeout_ms = 300
[lookup.nnpc]
provider = "http"
url = "http://127.0.0.1:{closed}/nnpc/{{number}}"
[lookup.ping]
provider = "http"
url = "http://{addr}/lookup/asr?number={{number}}"
method = "POST"
"#
    ));
    let s = start(dir.path());
    s.put_script(
        "lk",
        "async function main(d){ try { return await api.lookup[d.name]('4477') } catch (e) { return e.name + ': ' + e.message } }",
    );
    let cases = [
        (
            "lrn",
            "LookupError: api.lookup.lrn is not configured: add a [lookup.lrn] section",
        ),
        ("hlr", "timed out after 300 ms"),
        ("nnpc", &format!("127.0.0.1:{closed}") as &str),
        ("ping", "answered 401"),
    ];
    for (name, needle) in cases {
        let started = std::time::Instant::now();
        let (status, body) = s.post("/v1/run/lk", json!({"name": name})).await;
        assert_eq!(status, 200, "{body}");
        let text = body["result"].as_str().unwrap_or_default();
        assert!(text.contains(needle), "{name}: {text}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "{name}"
        );
    }
}

#[tokio::test]
async fn email_reaches_the_smtp_sink() {
    let (smtp, mails) = smtp_sink().await;
    let dir = workdir(&format!(
        "[send.smtp]\nserver = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nfrom = \"callforge@example.org\"\nusername = \"cf-user\"\npassword = \"s3cret\"\n",
        smtp.port()
    ));
    let s = start(dir.path());
    s.put_script(
        "mail",
        r#"async function main(d){
            return await api.send.email({to: d.to, subject: "Missed call from " + d.from, text: "Call back " + d.from, html: "<b>Call back</b>"});
        }"#,
    );
    let (status, body) = s
        .post(
            "/v1/run/mail",
            json!({"to": "ops@example.org", "from": "447700900123"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["ok"], true, "{body}");
    assert_eq!(body["result"]["attempts"], 1);
    let mails = mails.lock().unwrap().clone();
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert!(mail.from.contains("callforge@example.org"), "{mail:?}");
    assert_eq!(mail.to, vec!["<ops@example.org>"]);
    assert!(
        mail.data.contains("Subject: Missed call from 447700900123"),
        "{}",
        mail.data
    );
    assert!(
        mail.data.contains("Call back 447700900123"),
        "{}",
        mail.data
    );
    assert!(mail.data.contains("text/html"), "{}", mail.data);
    // base64("\0cf-user\0s3cret"): the credentials from the config.
    assert_eq!(mail.auth.as_deref(), Some("AGNmLXVzZXIAczNjcmV0"));
    // Bad params are the script's error, at once.
    s.put_script(
        "badmail",
        "async function main(){ try { await api.send.email({subject: 'x'}) } catch (e) { return e.message } }",
    );
    let (_, body) = s.post("/v1/run/badmail", json!({})).await;
    assert!(
        body["result"].as_str().unwrap().contains("to is required"),
        "{body}"
    );
}

#[tokio::test]
async fn sms_webhook_fills_its_template_and_retries_with_backoff() {
    let (addr, api) = http_server().await;
    api.fail_first.store(2, Ordering::SeqCst);
    let dir = workdir(&format!(
        r#"
[send]
retries = 3
backoff_ms = 50
[send.sms]
url = "http://{addr}/sms"
auth_header = "Bearer sms-key"
template = '{{"destination": "{{{{to}}}}", "text": "{{{{text}}}} (via callforge)", "meta": {{"n": "{{{{n}}}}"}}}}'
[send.notify]
url = "http://{addr}/notify"
"#
    ));
    let s = start(dir.path());
    s.put_script(
        "sms",
        "async function main(){ return [await api.send.sms({to: '+447700900123', text: 'Hello', n: 5}), await require('cxSend').notify({event: 'call', id: 1})] }",
    );
    let (status, body) = s.post("/v1/run/sms", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"][0]["ok"], true, "{body}");
    assert_eq!(
        body["result"][0]["attempts"], 3,
        "two 503s, then success: {body}"
    );
    assert_eq!(body["result"][1]["ok"], true, "{body}");
    let received = api.received.lock().unwrap().clone();
    assert_eq!(received[0].0, "/sms");
    assert_eq!(received[0].1.as_deref(), Some("Bearer sms-key"));
    assert_eq!(
        received[0].2,
        json!({"destination": "+447700900123", "text": "Hello (via callforge)", "meta": {"n": 5}})
    );
    assert_eq!(received[1].0, "/notify");
    assert_eq!(
        received[1].2,
        json!({"event": "call", "id": 1}),
        "no template: params as-is"
    );
}

#[tokio::test]
async fn failed_sends_resolve_ok_false_after_retries_and_never_hang() {
    let (addr, _api) = http_server().await;
    let closed = support::free_port();
    let dir = workdir(&format!(
        r#"
[send]
retries = 2
backoff_ms = 20
[send.sms]
url = "http://127.0.0.1:{closed}/sms"
[send.notify]
url = "http://{addr}/hooks/reject"
[send.smtp]
server = "127.0.0.1"
port = {closed}
tls = "none"
from = "cf@example.org"
timeout_ms = 500
"#
    ));
    let s = start(dir.path());
    s.put_script(
        "fail",
        "async function main(){ return [await api.send.sms({to: '1'}), await api.send.notify({}), await api.send.email({to: 'a@example.org', text: 'x'})] }",
    );
    let started = std::time::Instant::now();
    let (status, body) = s.post("/v1/run/fail", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let r = &body["result"];
    assert_eq!(r[0]["ok"], false);
    assert_eq!(r[0]["attempts"], 3, "{r}");
    assert!(
        r[0]["error"]
            .as_str()
            .unwrap()
            .contains(&closed.to_string()),
        "{r}"
    );
    assert_eq!(r[1]["ok"], false);
    assert_eq!(r[1]["attempts"], 1, "a 400 is not retried: {r}");
    assert!(
        r[1]["error"].as_str().unwrap().contains("answered 400"),
        "{r}"
    );
    assert_eq!(r[2]["ok"], false);
    assert_eq!(r[2]["attempts"], 3, "{r}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    // An unconfigured channel names its config key.
    let dir = workdir("");
    let s = start(dir.path());
    s.put_script(
        "nocfg",
        "async function main(){ try { await api.send.email({to: 'a@b.c'}) } catch (e) { return e.name + ': ' + e.message } }",
    );
    let (_, body) = s.post("/v1/run/nocfg", json!({})).await;
    assert_eq!(
        body["result"],
        "SendError: api.send.email is not configured: add a [send.smtp] section to callforge.toml"
    );
}

#[tokio::test]
async fn fetch_returns_a_response_within_its_limits() {
    let (addr, _api) = http_server().await;
    let dir = workdir(&format!(
        "[fetch]\nallow = [\"127.0.0.1:{}\"]\nmax_response_bytes = 100000\ntimeout_ms = 2000\n",
        addr.port()
    ));
    let s = start(dir.path());
    s.put_script(
        "f",
        &format!(
            r#"async function main(d) {{
                const base = "http://{addr}";
                const r = await fetch(base + "/json");
                const j = await r.json();
                let reread = null;
                try {{ await r.text() }} catch (e) {{ reread = e.name }}
                const p = await fetch(base + "/json", {{method: "POST", body: {{a: 1}}, headers: {{"x-h": "v"}}}});
                const missing = await fetch(base + "/text");
                const errors = [];
                for (const [url, opts] of [
                    ["http://localhost:{port}/json", {{}}],
                    ["http://127.0.0.1:1/json", {{}}],
                    [base + "/big", {{}}],
                    [base + "/slow", {{timeout: 300}}],
                    [base + "/redirect-out", {{}}],
                    ["file:///etc/passwd", {{}}],
                ]) {{
                    try {{ await fetch(url, opts); errors.push("no error") }} catch (e) {{ errors.push(e.name + ": " + e.message) }}
                }}
                return {{
                    status: r.status, ok: r.ok, answer: r.headers.get("X-Answer"), none: r.headers.get("nope"),
                    json: j, reread, echo: await p.text(), echoHeader: p.headers.get("x-echo"),
                    missing: [missing.status, missing.ok, await missing.text()], errors,
                }};
            }}"#,
            port = addr.port()
        ),
    );
    let (status, body) = s.post("/v1/run/f", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let r = &body["result"];
    assert_eq!(r["status"], 200);
    assert_eq!(r["ok"], true);
    assert_eq!(r["answer"], "42");
    assert_eq!(r["none"], Value::Null);
    assert_eq!(r["json"], json!({"hello": "world", "n": [1, 2]}));
    assert_eq!(r["reread"], "TypeError");
    assert_eq!(r["echo"], r#"{"a":1}"#);
    assert_eq!(r["echoHeader"], "yes");
    assert_eq!(r["missing"], json!([404, false, "not here"]));
    let errors: Vec<&str> = r["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(
        errors[0].contains("host 'localhost:") && errors[0].contains("not in [fetch] allow"),
        "{errors:?}"
    );
    assert!(errors[1].contains("not in [fetch] allow"), "{errors:?}");
    assert!(
        errors[2].contains("larger than the 100000-byte limit"),
        "{errors:?}"
    );
    assert!(errors[3].contains("timed out after 300 ms"), "{errors:?}");
    assert!(
        errors[4].contains("redirect to host 'localhost'"),
        "{errors:?}"
    );
    assert!(errors[5].contains("only http and https"), "{errors:?}");
    assert!(
        errors.iter().all(|e| e.starts_with("TypeError: fetch:")),
        "{errors:?}"
    );
}

#[tokio::test]
async fn globals_and_the_require_whitelist_follow_the_mode() {
    let dir = workdir("");
    let s = start(dir.path());
    s.put_script(
        "g",
        "function main(){ let r; try { require('fs') } catch (e) { r = e.message } return [typeof api, typeof fetch, typeof api.lookup.tps, r] }",
    );
    let (_, body) = s.post("/v1/run/g", json!({})).await;
    assert_eq!(body["result"][0], "object");
    assert_eq!(body["result"][1], "function");
    assert_eq!(body["result"][2], "function");
    assert_eq!(
        body["result"][3],
        "require('fs'): no such module; allowed: cxJob, cxKV, cxLLM, cxOriginate, cxPubSub, cxRest, cxSend, cxTemplate, cxUserspace, job, kv, llm, lookup, originate, pubsub, rest, rss-parser, send, template, userspace"
    );
    s.put_script("g2", "function main(){ return [typeof api, typeof fetch] }");
    let (_, body) = s.post("/v1/run/g2?mode=script", json!({})).await;
    assert_eq!(body["result"], json!(["undefined", "undefined"]));
}

#[test]
fn bad_config_is_a_clear_startup_error() {
    let cases = [
        (
            "[lookup.tpss]\nprovider = \"table\"\ncsv = \"x.csv\"\n",
            "[lookup.tpss]: unknown lookup; expected one of tps, lrn",
        ),
        (
            "[lookup.tps]\nprovider = \"table\"\ncsv = \"missing.csv\"\n",
            "[lookup.tps]: csv",
        ),
        (
            "[lookup.tps]\nprovider = \"table\"\n",
            "needs exactly one of csv, sqlite or userspace",
        ),
        (
            "[lookup.lrn]\nprovider = \"http\"\nurl = \"not a url\"\n",
            "[lookup.lrn]: url",
        ),
        (
            "[kv]\nbackend = \"memcached://x\"\n",
            "[kv]: backend = \"memcached://x\"",
        ),
        ("[fetch]\nallow = [\"http://x/y\"]\n", "[fetch]: allow"),
        (
            "[send.sms]\nurl = \"http://127.0.0.1:1/\"\ntemplate = \"{not json\"\n",
            "[send.sms]: template is not JSON",
        ),
        (
            "[send.smtp]\nserver = \"127.0.0.1\"\ntls = \"none\"\nfrom = \"not an address\"\n",
            "[send.smtp]: from",
        ),
        (
            "[send.smtp]\nserver = \"127.0.0.1\"\nfrom = \"a@b.c\"\n",
            "missing field `tls`",
        ),
        ("[records]\nenabeld = false\n", "enabeld"),
        (
            "[store]\npath = \"/proc/no/such/dir/cf.db\"\n",
            "cannot open the store at /proc/no/such/dir/cf.db",
        ),
    ];
    for (config, needle) in cases {
        let dir = workdir(config);
        match try_start(dir.path()) {
            Ok(_) => panic!("started with {config}"),
            Err(stderr) => assert!(stderr.contains(needle), "{config}\n--> {stderr}"),
        }
    }
}

#[tokio::test]
async fn lrn_lookup_reads_an_sqlite_table() {
    let dir = workdir(
        "[lookup.lrn]\nprovider = \"table\"\nsqlite = \"numbers.db\"\ntable = \"lrn\"\nkey_column = \"msisdn\"\n",
    );
    {
        let db = rusqlite::Connection::open(dir.path().join("numbers.db")).unwrap();
        db.execute_batch(
            "CREATE TABLE lrn (msisdn TEXT PRIMARY KEY, lrn TEXT, carrier TEXT, cost REAL);
             INSERT INTO lrn VALUES ('12125550100', '2125550000', 'Verizon', 0.004);
             CREATE TABLE ported (msisdn TEXT PRIMARY KEY, lrn TEXT);
             INSERT INTO ported VALUES ('12125550100', '9999999999');",
        )
        .unwrap();
    }
    let s = start(dir.path());
    s.put_script(
        "lrn",
        r#"async function main(d) {
            const errs = [];
            for (const t of ["bad name;", "missing"]) {
                try { await api.lookup.lrn("1", t) } catch (e) { errs.push(e.name + ": " + e.message) }
            }
            return [await api.lookup.lrn(d.n), await api.lookup.lrn("+" + d.n, "ported"), await api.lookup.lrn("1"), errs];
        }"#,
    );
    let (status, body) = s.post("/v1/run/lrn", json!({"n": "12125550100"})).await;
    assert_eq!(status, 200, "{body}");
    let r = &body["result"];
    assert_eq!(r[0]["lrn"], "2125550000");
    assert_eq!(r[0]["carrier"], "Verizon");
    assert_eq!(r[0]["cost"], 0.004);
    assert_eq!(r[0]["found"], true);
    assert_eq!(r[1]["lrn"], "9999999999");
    assert_eq!(r[1]["table"], "ported");
    assert_eq!(r[2]["found"], false);
    assert!(r[3][0].as_str().unwrap().starts_with("TypeError"), "{r}");
    assert!(
        r[3][1].as_str().unwrap().contains("no such table: missing"),
        "{r}"
    );
}

#[test]
fn the_run_command_has_the_modules_of_its_config() {
    let dir = workdir("[lookup.tps]\nprovider = \"table\"\ncsv = \"scripts/dnc_list.csv\"\n");
    let run = |dest: &str| {
        std::process::Command::new(support::BIN)
            .arg("run")
            .arg(dir.path().join("scripts/dnc_check.js"))
            .args(["--mode", "class4", "--config"])
            .arg(dir.path().join("callforge.toml"))
            .args(["--data", &routing(dest, "1").to_string()])
            .output()
            .unwrap()
    };
    let out = run("447700900123");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("604"));
    let out = run("447700900555");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !dir.path().join("callforge.db").exists(),
        "no script touched the store"
    );
}
