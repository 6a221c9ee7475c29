//! ConnexCS ScriptForge scripts that need only the core modules (cxKV, cxUserspace,
//! `process.env`, `console`), run through the real binary: the examples of
//! `connexcs/scriptforge-examples` (our own-words equivalents in tests/fixtures/scriptforge/,
//! or the published scripts unchanged when `CALLFORGE_SCRIPTFORGE_DIR` names a checkout),
//! class4 over HTTP and over SIP with SIPp, apps and drivers over HTTP; ConnexCS's documented
//! module forms (`require` and ES `import` of cxKV / cxUserspace, imports between scripts);
//! the globals.

mod scriptforge_examples;
mod sip_support;
mod support;

use scriptforge_examples::source as fixture;
use std::path::Path;

use serde_json::{json, Value};
use support::{start, try_start, workdir};

/// Copy published examples into a scripts folder.
fn install(scripts: &Path, names: &[&str]) {
    for name in names {
        std::fs::write(scripts.join(format!("{name}.js")), fixture(name)).unwrap();
    }
}

fn routing(dest: &str, account: &str) -> Value {
    json!({"routing": {
        "cli": "441134960000", "dest_number": dest, "account_id": account,
        "egress_routing": [{"gw": {"a": {"cli": ""}}, "cost": 2}, {"gw": {"b": {"cli": ""}}, "cost": 1}]
    }})
}

fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn published_outbound_honeypot_blocks_the_fourth_call_with_603() {
    let dir = workdir("");
    let s = start(dir.path());
    install(&dir.path().join("scripts"), &["outbound-honeypot"]);
    let dest = "447700900400";
    // ConnexCS's script lets three calls through (the third arms a 30-minute block)...
    for attempt in 1..=3 {
        let (status, body) = s
            .post("/v1/run/outbound-honeypot?mode=class4", routing(dest, "77"))
            .await;
        assert_eq!(status, 200, "attempt {attempt}: {body}");
        assert_eq!(body["result"]["routing"]["dest_number"], dest);
    }
    // ...and refuses the fourth.
    let (status, body) = s
        .post("/v1/run/outbound-honeypot?mode=class4", routing(dest, "77"))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["error"],
        json!({"code": 603, "message": "Destination Blocked"})
    );
    // Another account calling the same number is not blocked.
    let (status, _) = s
        .post("/v1/run/outbound-honeypot?mode=class4", routing(dest, "78"))
        .await;
    assert_eq!(status, 200);
    // `kv` holds text: the counter (3, then +100) reads back as "103".
    s.put_script(
        "counter",
        "const { kv } = require('cxKV');\nasync function main(d) { return [await kv.get(d.key), await kv.get('nothing')] }",
    );
    let (_, body) = s
        .post("/v1/run/counter", json!({"key": format!("77:{dest}")}))
        .await;
    assert_eq!(body["result"], json!(["103", null]));
}

/// A SIP server with the published examples routed by prefix (class4) or number (class5).
fn sip_server() -> sip_support::Server {
    sip_server_logging(None)
}

fn sip_server_logging(log: Option<&Path>) -> sip_support::Server {
    let routes = r#"
[[route]]
match = "^4479"
script = "outbound-honeypot.js"
mode = "class4"
vars = "carriers.toml"

[[route]]
match = "^4478"
script = "dnc-check.js"
mode = "class4"
vars = "carriers.toml"

[[route]]
match = "^4476"
script = "random-cli.js"
mode = "class4"
vars = "carriers.toml"

[[route]]
match = "^5901$"
script = "pin-verification.js"
mode = "class5"

[[route]]
match = "^5902$"
script = "simple-greeting.js"
mode = "class5"
"#;
    let s = sip_support::start_logging(routes, log);
    install(
        &s.dir.path().join("scripts"),
        &[
            "outbound-honeypot",
            "dnc-check",
            "dnc-add",
            "random-cli",
            "pin-verification",
            "simple-greeting",
        ],
    );
    s
}

#[test]
fn published_pin_verification_logs_its_error_like_node_and_hangs_up() {
    // Both examples prompt with a file this engine does not ship: ctx.ivr fails, the script
    // catches it, logs `console.error('Script error:', error)`, says so and hangs up (BYE).
    let log = tempfile::NamedTempFile::new().unwrap();
    let s = sip_server_logging(Some(log.path()));
    for number in ["5901", "5902"] {
        let run = sip_support::sipp("class5_script_bye", s.udp, number, 1, &[]);
        sip_support::assert_all_ok(&run, 1);
    }
    // `console.error(text, error)`: the error prints as `Name: message`, not `{}`.
    let text = std::fs::read_to_string(log.path()).unwrap();
    for script in ["pin-verification", "simple-greeting"] {
        let errors: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("ERROR") && l.contains(&format!("script={script}")))
            .collect();
        assert_eq!(errors.len(), 1, "{script}: {text}");
        assert!(
            errors[0].contains("Error: ") && !errors[0].contains("{}"),
            "{}",
            errors[0]
        );
    }
}

#[test]
fn published_class4_examples_over_sip() {
    let s = sip_server();
    // outbound-honeypot: three calls to one number are redirected, the fourth is refused.
    let run = sip_support::sipp("class4_any_302", s.udp, "447900900401", 3, &["-l", "1"]);
    sip_support::assert_all_ok(&run, 3);
    let run = sip_support::sipp("class4_honeypot_603", s.udp, "447900900401", 1, &[]);
    sip_support::assert_all_ok(&run, 1);
    let run = sip_support::sipp("class4_any_302", s.udp, "447900900402", 1, &[]);
    sip_support::assert_all_ok(&run, 1);
    // dnc-add (an app, over HTTP) lists a caller; dnc-check refuses calls to it with 604.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let added: Value = rt.block_on(async {
        support::client()
            .post(format!("http://{}/v1/run/dnc-add?mode=app", s.http))
            .json(&json!({"Caller-Caller-ID-Number": "+447800900777"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(added["result"][0]["key"], "x-tts", "{added}");
    let run = sip_support::sipp("reject_604", s.udp, "447800900777", 2, &[]);
    sip_support::assert_all_ok(&run, 2);
    let run = sip_support::sipp("class4_any_302", s.udp, "447800900778", 2, &[]);
    sip_support::assert_all_ok(&run, 2);
    // random-cli only rewrites the CLI: every call is redirected.
    let run = sip_support::sipp("class4_any_302", s.udp, "447600900001", 5, &[]);
    sip_support::assert_all_ok(&run, 5);
}

#[tokio::test]
async fn published_dnc_add_and_dnc_check_share_a_userspace_table() {
    let dir = workdir("");
    let s = start(dir.path());
    install(&dir.path().join("scripts"), &["dnc-add", "dnc-check"]);
    let caller = json!({"Caller-Caller-ID-Number": "+447800900777"});
    let (status, body) = s.post("/v1/run/dnc-add?mode=app", caller.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"][0]["key"], "x-tts", "{body}");
    assert!(body["result"][0]["value"].is_string(), "{body}");
    // Adding twice: the script logs the error and rejects with it; both read as text.
    let (status, body) = s.post("/v1/run/dnc-add?mode=app", caller).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], 500);
    assert!(
        message(&body).starts_with("UserspaceError: userspace 'dnc' already has the key"),
        "{body}"
    );
    let logged = body["logs"][0]["message"].as_str().unwrap_or_default();
    assert!(
        logged.starts_with("UserspaceError: userspace 'dnc' already has the key '447800900777'"),
        "{body}"
    );
    let (status, body) = s
        .post(
            "/v1/run/dnc-check?mode=class4",
            routing("447800900777", "1"),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["error"],
        json!({"code": 604, "message": "Number on DNC List"})
    );
    let (status, body) = s
        .post(
            "/v1/run/dnc-check?mode=class4",
            routing("447800900778", "1"),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["routing"]["dest_number"], "447800900778");
    // The row dnc-add stored (a timestamp, not an object) reads back as {key, value}.
    s.put_script(
        "row",
        "const us = require('cxUserspace');\nasync function main() { const r = await us.read('dnc', '447800900777'); return [r.key, typeof r.value, r.value > 1.6e12] }",
    );
    let (_, body) = s.post("/v1/run/row", json!({})).await;
    assert_eq!(body["result"], json!(["447800900777", "number", true]));
}

#[tokio::test]
async fn published_routing_and_driver_examples_run_unchanged_over_http() {
    let dir = workdir("[lookup.asrplus]\nprovider = \"table\"\ncsv = \"asr.csv\"\n");
    std::fs::write(
        dir.path().join("asr.csv"),
        "number,status\n447700900111,Invalid\n447700900222,Valid\n",
    )
    .unwrap();
    let scripts = dir.path().join("scripts");
    install(
        &scripts,
        &[
            "random-cli",
            "random-cli-from-ranges",
            "better-date-time-restriction",
            "time-based-dialling",
            "did-driver",
            "asrplus-faster-call-fail",
        ],
    );
    // The vars the ranges example documents in its comment.
    std::fs::write(
        scripts.join("random-cli-from-ranges.toml"),
        "[cli]\nrange = [\n  [1000, 2000],\n  [6000, 8000]\n]\n",
    )
    .unwrap();
    let s = start(dir.path());

    for _ in 0..10 {
        let (status, body) = s
            .post("/v1/run/random-cli?mode=class4", routing("4420", "1"))
            .await;
        assert_eq!(status, 200, "{body}");
        let cli = body["result"]["routing"]["cli"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            ["1111111", "2222222", "3333333", "4444444"].contains(&cli.as_str()),
            "{body}"
        );
        for gw in ["a", "b"] {
            let at = body["result"]["routing"]["egress_routing"]
                .as_array()
                .unwrap()
                .iter()
                .find_map(|e| e["gw"].get(gw))
                .unwrap();
            assert_eq!(at["cli"], cli.as_str());
        }
        let (status, body) = s
            .post(
                "/v1/run/random-cli-from-ranges?mode=class4",
                routing("4420", "1"),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let cli = body["result"]["routing"]["cli"].as_i64().unwrap();
        assert!(
            (1000..=2000).contains(&cli) || (6000..=8000).contains(&cli),
            "{body}"
        );
    }

    // The time examples read the engine's clock: ask the engine what day and hour it is.
    s.put_script(
        "now",
        "function main(d) { const t = new Date(Date.now() + (d.offset || 0) * 3600e3); return [t.getDay(), t.getHours()] }",
    );
    let (_, now) = s.post("/v1/run/now", json!({})).await;
    let (day, hour) = (
        now["result"][0].as_i64().unwrap(),
        now["result"][1].as_i64().unwrap(),
    );
    // Shift the script's clock (its `offset` var) so its hour is 12 whatever the time here.
    let offset = 12 - hour;
    let schedule = |week: &str, weekend: &str| {
        let mut data = routing("4420", "1");
        data["schedule"] = json!({"week": week, "weekend": weekend, "offset": offset});
        data
    };
    let path = "/v1/run/better-date-time-restriction?mode=class4";
    let (status, body) = s.post(path, schedule("9-21", "9-21")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = s.post(path, schedule("13-21", "13-21")).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["error"],
        json!({"code": 480, "message": "Disallowed by Date/Time Restriction"})
    );
    let (status, body) = s.post(path, schedule("25-26", "25-26")).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["error"],
        json!({"code": 503, "message": "Date/Time Restriction Syntax Error"})
    );
    let (status, body) = s.post(path, routing("4420", "1")).await;
    assert_eq!(status, 200, "no schedule: allowed; {body}");

    let (status, body) = s
        .post(
            "/v1/run/time-based-dialling?mode=class4",
            routing("4420", "1"),
        )
        .await;
    if day == 0 {
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["error"]["code"], 480);
    } else {
        assert_eq!(status, 200, "{body}");
    }

    // The DID driver's functions are empty: each answers null.
    for f in ["search", "allocate", "release", "list"] {
        let (status, body) = s
            .post(
                &format!("/v1/drivers/did-driver/{f}"),
                json!({"number": "44", "did": "4420"}),
            )
            .await;
        assert_eq!(status, 200, "{f}: {body}");
        assert_eq!(body["result"], Value::Null, "{f}");
    }

    let path = "/v1/run/asrplus-faster-call-fail?mode=class4";
    let (status, body) = s.post(path, routing("447700900111", "1")).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["error"],
        json!({"code": 604, "message": "Number not Found (ASRPlus)"})
    );
    let (status, body) = s.post(path, routing("447700900222", "1")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["routing"]["asrPlus"]["status"], "Valid");
}

#[tokio::test]
async fn connexcs_kv_and_userspace_shapes_in_both_module_forms() {
    kv_and_userspace_shapes("").await;
}

#[tokio::test]
async fn the_cxkv_shape_is_the_same_on_redis() {
    let redis = support::redis();
    kv_and_userspace_shapes(&format!("[kv]\nbackend = \"{}\"\n", redis.url)).await;
}

async fn kv_and_userspace_shapes(config: &str) {
    let dir = workdir(config);
    let s = start(dir.path());
    // The example of ConnexCS's cxKV stub, as written there.
    s.put_script(
        "kv_stub",
        r#"const {ko, kv, incr, keys, usage} = require('cxKV');
async function main(data) {
  await kv.set('hello', 'world');
  await ko.set('record', {hello: 'world'});
  let a = await kv.get('hello');
  let b = await ko.get('record');
  return {a, b};
}"#,
    );
    let (status, body) = s.post("/v1/run/kv_stub", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["result"],
        json!({"a": "world", "b": {"hello": "world"}})
    );
    // The migration guide's ES form, in class4; text and objects cross between the maps.
    s.put_script(
        "kv_es",
        r#"import { kv, ko, incr, keys, usage } from 'cxKV';
import cxKV from 'cxKV';
export async function main(data) {
    await kv.set('n', 5);
    await kv.set('json', { x: 1 });
    const counted = await incr('hits', 2);
    data.routing.kv = [await kv.get('hello'), await kv.get('n'), await ko.get('json'),
        await kv.get('record'), await ko.get('missing'), counted, await cxKV.incr('hits'),
        (await keys()).length, (await usage()).keys, await kv.del('n'), await kv.get('n')];
    return data;
}"#,
    );
    let (status, body) = s
        .post("/v1/run/kv_es?mode=class4", routing("4420", "1"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["result"]["routing"]["kv"],
        json!(["world", "5", {"x": 1}, "{\"hello\":\"world\"}", null, 2, 3, 5, 5, true, null])
    );
    // cxUserspace: rows with `.value`, get and random, by require and by import.
    s.put_script(
        "us_es",
        r#"import { get, create, update, random } from 'cxUserspace';
import cxUserspace from 'cxUserspace';
export async function main() {
    await create('pins', '1001', { value: '1234', owner: 'ada' });
    await create('pins', '1002', '9999');
    await update('pins', '1002', 4321);
    const one = await get('pins', '1001');
    const two = await cxUserspace.read('pins', '1002');
    const all = await get('pins');
    const picked = await random('pins');
    return [one.value, one.owner, two, all.length, ['1234', 4321].includes(picked.value),
            await get('pins', 'nope'), await random('empty')];
}"#,
    );
    let (status, body) = s.post("/v1/run/us_es", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["result"],
        json!(["1234", "ada", {"key": "1002", "value": 4321}, 2, true, null, null])
    );
    // A module that does not exist names the ones that do.
    s.put_script(
        "nope",
        "import { x } from 'cxNope';\nexport function main() { return 1 }",
    );
    let (status, body) = s.post("/v1/run/nope", json!({})).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        message(&body).contains("no such module 'cxNope'")
            && message(&body).contains("cxKV")
            && message(&body).contains("cxUserspace"),
        "{body}"
    );
}

#[tokio::test]
async fn scripts_import_scripts_of_the_folder_and_see_their_edits() {
    let dir = workdir("");
    let s = start(dir.path());
    // The migration guide's two forms: CommonJS with a bare name, and ES with './'.
    s.put_script(
        "get_customer_record",
        "function getCustomerRecord(id) { return { id, name: 'old' } }\nmodule.exports = { getCustomerRecord };",
    );
    s.put_script(
        "old_form",
        "const { getCustomerRecord } = require('get_customer_record');\nasync function main(d) { return getCustomerRecord(d.id) }",
    );
    s.put_script(
        "records",
        "export function getCustomerRecord(id) { return { id, name: 'es' } }",
    );
    s.put_script(
        "new_form",
        "import { getCustomerRecord } from './records';\nexport async function main(d) { return getCustomerRecord(d.id) }",
    );
    let (_, body) = s.post("/v1/run/old_form", json!({"id": 7})).await;
    assert_eq!(body["result"], json!({"id": 7, "name": "old"}), "{body}");
    let (_, body) = s
        .post(
            "/v1/run/new_form?mode=class4",
            json!({"id": 8, "routing": {}}),
        )
        .await;
    // A class4 result without `routing` is the routing part (see README, "Modes").
    assert_eq!(
        body["result"]["routing"],
        json!({"id": 8, "name": "es"}),
        "{body}"
    );
    // An edit of the imported script is seen by the next run.
    s.put_script(
        "records",
        "export function getCustomerRecord(id) { return { id, name: 'edited es' } }",
    );
    let (_, body) = s.post("/v1/run/new_form", json!({"id": 9})).await;
    assert_eq!(
        body["result"],
        json!({"id": 9, "name": "edited es"}),
        "{body}"
    );
    // Nothing outside the folder.
    std::fs::write(dir.path().join("secret.js"), "export const s = 1;").unwrap();
    s.put_script(
        "escape",
        "import { s } from '../secret';\nexport function main() { return s }",
    );
    let (status, body) = s.post("/v1/run/escape", json!({})).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        message(&body).contains("'../secret' is a path")
            && message(&body).contains("scripts folder only"),
        "{body}"
    );
}

#[tokio::test]
async fn process_env_set_env_var_and_console_errors() {
    let dir = workdir("[env]\nREGION = \"eu-west\"\nMAX_CALLS = 3\nDEBUG = true\n");
    let s = start(dir.path());
    s.put_script(
        "env",
        r#"function main(d) {
    if (d.set) setEnvVar('TENANT', d.set);
    try { JSON.parse('{') } catch (e) { console.error('Script error:', e) }
    console.log({ region: process.env.REGION, n: [1, 2] });
    const e = process.env;
    return [e.REGION, e.MAX_CALLS, e.DEBUG, e.APP_ID, e.SCRIPTFORGE_NAME, e.TENANT || null,
            /^[0-9a-f-]{36}$/.test(e.SCRIPTFORGE_UUID), /^[0-9a-f-]{36}$/.test(e.CORRELATION_ID)];
}"#,
    );
    let (status, body) = s.post("/v1/run/env", json!({"set": "acme"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["result"],
        json!(["eu-west", "3", "true", "env", "env", "acme", true, true])
    );
    let logs = body["logs"].as_array().unwrap();
    let error_line = logs[0]["message"].as_str().unwrap();
    assert!(
        error_line.starts_with("Script error: SyntaxError: ") && error_line.contains("\n    at "),
        "{error_line}"
    );
    assert_eq!(logs[0]["level"], "error");
    assert_eq!(logs[1]["message"], "{ region: 'eu-west', n: [ 1, 2 ] }");
    // Nothing set by one run is seen by the next.
    for _ in 0..4 {
        let (_, body) = s.post("/v1/run/env", json!({})).await;
        assert_eq!(body["result"][5], Value::Null, "{body}");
    }
    // An [env] value that is not text, a number or a boolean stops the engine at startup.
    let bad = workdir("[env]\nNESTED = { a = 1 }\n");
    let e = try_start(bad.path()).err().expect("a bad [env] is refused");
    assert!(
        e.contains("[env]: NESTED: expected text, a number or a boolean"),
        "{e}"
    );
}

#[test]
fn callforge_run_imports_from_the_scripts_own_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rates.js"),
        "module.exports = { rate: (n) => n * 0.01 };",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("calc.js"),
        "const { rate } = require('./rates');\nfunction main(d) { return rate(d.n) }",
    )
    .unwrap();
    let out = std::process::Command::new(support::BIN)
        .arg("run")
        .arg(dir.path().join("calc.js"))
        .args(["--data", r#"{"n": 300}"#])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
}

#[tokio::test]
async fn every_connexcs_module_imports_in_the_migration_guides_forms() {
    let dir = workdir("");
    let s = start(dir.path());
    s.put_script(
        "imports",
        r#"import { kv, ko } from 'cxKV';
import { get, create, update, random } from 'cxUserspace';
import { subscribe, publish } from 'cxPubSub';
import auth from 'cxRest';
import { auth as named } from 'cxRest';
import { email, sms } from 'cxSend';
import cxJob from 'cxJob';
import { add, setProgress } from 'cxJob';
import { compile } from 'cxTemplate';
import { chat } from 'cxLLM';
import originate, { list } from 'cxOriginate';
export function main() {
    return [kv.get, ko.set, get, create, update, random, subscribe, publish, auth, named,
            email, sms, cxJob.add, add, setProgress, compile, chat, originate, list].map(f => typeof f);
}"#,
    );
    let (status, body) = s.post("/v1/run/imports", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], json!(vec!["function"; 19]), "{body}");
}
