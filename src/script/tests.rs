//! Behaviour tests of the interpreter core: entry forms, completion rules, globals, limits.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::FutureExt;
use serde_json::{json, Value as Json};

use super::*;

fn engine_with(limits: Limits) -> Engine {
    Engine::start(EngineConfig {
        limits,
        workers: 2,
        ..EngineConfig::default()
    })
    .unwrap()
}

async fn run_in(engine: &Engine, source: &str, mode: Mode, data: Json) -> RunOutput {
    let script = Arc::new(compile("test", source).unwrap());
    engine
        .run(Invocation::new(script, mode, data))
        .await
        .unwrap()
}

async fn run(source: &str, mode: Mode, data: Json) -> RunOutput {
    run_in(&engine_with(Limits::default()), source, mode, data).await
}

fn err(code: u16, message: &str) -> Result<Json, ScriptError> {
    Err(ScriptError::new(code, message))
}

/// What the script returned: class4 hands its answer back as the routing object.
pub(super) fn as_returned(mode: Mode, result: Json) -> Json {
    match mode {
        Mode::Class4 => result["routing"].clone(),
        _ => result,
    }
}

#[tokio::test]
async fn every_entry_form_runs() {
    let data = json!({"n": 2});
    let cases = [
        ("function main(data) { return data.n * 2 }", json!(4)),
        ("async function main(data) { return data.n * 3 }", json!(6)),
        ("export function main(data) { return data.n + 1 }", json!(3)),
        (
            "export default async function (data) { return data.n - 1 }",
            json!(1),
        ),
        (
            "function main(){ var data = vars(); exit(data); }",
            json!({"n": 2}),
        ),
    ];
    for (src, want) in cases {
        let out = run(src, Mode::App, data.clone()).await;
        assert_eq!(out.result, Ok(want), "{src}");
    }
}

#[tokio::test]
async fn drivers_export_their_functions_in_every_form() {
    let engine = engine_with(Limits::default());
    let sources = [
        "module.exports = { search: (q) => ({found: q.number}), list: () => [1,2] }",
        "module.export = { search(q) { return {found: q.number} }, list() { return [1,2] } }",
        "export async function search(q) { return {found: q.number} }\nexport function list() { return [1,2] }",
    ];
    for src in sources {
        let script = Arc::new(compile("drv", src).unwrap());
        assert!(script.is_driver, "{src}");
        let mut inv = Invocation::new(script.clone(), Mode::Driver, json!({"number": "4420"}));
        inv.function = Some("search".into());
        let out = engine.run(inv).await.unwrap();
        assert_eq!(out.result, Ok(json!({"found": "4420"})), "{src}");
        let mut inv = Invocation::new(script.clone(), Mode::Driver, Json::Null);
        inv.function = Some("allocate".into());
        let out = engine.run(inv).await.unwrap();
        assert_eq!(out.result.unwrap_err().code, 404, "{src}");
    }
}

#[tokio::test]
async fn exit_wins_and_nothing_after_it_runs() {
    let src = r#"
        async function main(data) {
            setTimeout(() => console.log("timer ran"), 0);
            Promise.resolve().then(() => console.log("job ran"));
            try { exit({ok: 1}); } catch (e) { console.log("caught"); } finally { console.log("finally"); }
            console.log("after exit");
            return {ok: 2};
        }"#;
    let out = run(src, Mode::App, Json::Null).await;
    assert_eq!(out.result, Ok(json!({"ok": 1})));
    assert!(out.logs.is_empty(), "{:?}", out.logs);
}

#[tokio::test]
async fn err_rejects_with_code_and_stops() {
    let out = run(
        "function main(){ try { err([604, 'Number on DNC List']) } catch(e) {} return 1 }",
        Mode::Class4,
        json!({"routing": {}}),
    )
    .await;
    assert_eq!(out.result, err(604, "Number on DNC List"));
    let out = run(
        "function main(){ err(480, 'Closed') }",
        Mode::App,
        Json::Null,
    )
    .await;
    assert_eq!(out.result, err(480, "Closed"));
}

#[tokio::test]
async fn thrown_values_map_to_script_errors() {
    let cases = [
        (
            "function main(){ throw [604, 'Number on DNC List'] }",
            604,
            "Number on DNC List",
        ),
        (
            "async function main(){ throw new Error('480 Outside hours') }",
            480,
            "Outside hours",
        ),
        (
            "function main(){ throw new TypeError('bad input') }",
            500,
            "TypeError: bad input",
        ),
        ("function main(){ throw 'plain' }", 500, "plain"),
        (
            "async function main(){ await null; return Promise.reject([503, 'Busy']) }",
            503,
            "Busy",
        ),
    ];
    for (src, code, message) in cases {
        let out = run(src, Mode::App, Json::Null).await;
        assert_eq!(out.result, err(code, message), "{src}");
    }
}

#[tokio::test]
async fn class4_results_are_normalised_to_the_whole_object() {
    let input = json!({"routing": {"cli": "100", "dest_number": "44"}, "tag": "x"});
    let out = run(
        "function main(data){ data.routing.cli = '200'; return data.routing }",
        Mode::Class4,
        input.clone(),
    )
    .await;
    assert_eq!(
        out.result,
        Ok(json!({"routing": {"cli": "200", "dest_number": "44"}, "tag": "x"}))
    );
    let out = run(
        "function main(data){ data.routing.cli = '300'; return data }",
        Mode::Class4,
        input,
    )
    .await;
    assert_eq!(out.result.unwrap()["routing"]["cli"], "300");
}

#[tokio::test]
async fn globals_console_and_env_are_there() {
    let src = r#"function main(data) {
        console.log("hello", {a: 1}, 3);
        console.warn("careful");
        return [process.env.SCRIPTFORGE_NAME, process.env.SCRIPTFORGE_ID.length > 8, typeof process.env.EXEC_HOST];
    }"#;
    let out = run(src, Mode::Script, Json::Null).await;
    assert_eq!(out.result, Ok(json!(["test", true, "string"])));
    assert_eq!(out.logs.len(), 2);
    // Objects print as Node's util.inspect prints them (issue 11), no longer as JSON.
    assert_eq!(out.logs[0].message, "hello { a: 1 } 3");
    assert_eq!(out.logs[1].level, LogLevel::Warn);
}

#[tokio::test]
async fn no_eval_no_function_constructor_no_host_access() {
    for (src, needle) in [
        ("function main(){ return eval('1+1') }", "disabled"),
        (
            "function main(){ return new Function('return 1')() }",
            "not supported",
        ),
        ("function main(){ return require('fs') }", "allowed"),
        (
            "function main(){ return typeof std + typeof os + typeof Deno }",
            "",
        ),
    ] {
        let out = run(src, Mode::App, Json::Null).await;
        match out.result {
            Err(e) => assert!(e.message.contains(needle), "{src}: {e}"),
            Ok(v) => assert_eq!(v, json!("undefinedundefinedundefined"), "{src}"),
        }
    }
}

#[tokio::test]
async fn script_mode_has_no_timers_but_promises_settle() {
    let out = run(
        "async function main(){ const v = await Promise.resolve(5); return [v, typeof setTimeout] }",
        Mode::Script,
        Json::Null,
    )
    .await;
    assert_eq!(out.result, Ok(json!([5, "undefined"])));
}

#[tokio::test]
async fn timers_run_in_order_and_clear_timeout_works() {
    let src = r#"async function main(){
        const seen = [];
        const t = setTimeout(() => seen.push('cleared'), 5);
        clearTimeout(t);
        await new Promise(r => setTimeout(() => { seen.push('b'); r() }, 20));
        setTimeout((x) => seen.push(x), 1, 'a');
        await new Promise(r => setTimeout(r, 10));
        return seen;
    }"#;
    let out = run(src, Mode::App, Json::Null).await;
    assert_eq!(out.result, Ok(json!(["b", "a"])));
}

#[tokio::test]
async fn a_promise_that_never_settles_fails_at_once() {
    let started = Instant::now();
    let out = run(
        "function main(){ return new Promise(() => {}) }",
        Mode::App,
        Json::Null,
    )
    .await;
    let e = out.result.unwrap_err();
    assert_eq!(e.code, 500);
    assert!(e.message.contains("never settled"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn limits_end_runaway_scripts_with_a_named_500() {
    let limits = Limits {
        memory_bytes: 16 * 1024 * 1024,
        script_cpu: Duration::from_millis(200),
        app_cpu: Duration::from_millis(300),
        wall: Duration::from_millis(400),
        ..Limits::default()
    };
    let engine = engine_with(limits);
    let cases = [
        (
            "function main(){ while(true){} }",
            Mode::Script,
            "CPU time limit of 200 ms",
        ),
        (
            "function main(){ try { while(true){} } catch(e) {} return 1 }",
            Mode::App,
            "CPU time limit of 300 ms",
        ),
        (
            "function main(){ const a=[]; while(true){ a.push('x'.repeat(100000) + a.length) } }",
            Mode::App,
            "memory limit of 16 MiB",
        ),
        (
            "function main(){ return 'x'.repeat(1 << 29) }",
            Mode::App,
            "memory limit of 16 MiB",
        ),
        (
            "function main(){ function f(n){ return f(n+1) + 1 } return f(0) }",
            Mode::App,
            "stack limit",
        ),
        (
            "async function main(){ await new Promise(r => setTimeout(r, 60000)) }",
            Mode::App,
            "wall time limit of 400 ms",
        ),
    ];
    for (src, mode, needle) in cases {
        let out = run_in(&engine, src, mode, Json::Null).await;
        let e = out.result.expect_err(src);
        assert_eq!(e.code, 500, "{src}: {e}");
        assert!(e.message.contains(needle), "{src}: {e}");
    }
    // The engine still serves normal runs afterwards.
    let out = run_in(
        &engine,
        "function main(){ return 7 }",
        Mode::App,
        Json::Null,
    )
    .await;
    assert_eq!(out.result, Ok(json!(7)));
}

#[tokio::test]
async fn vars_is_also_the_input_object_and_returning_it_returns_the_input() {
    let engine = engine_with(Limits::default());
    // random-cli-from-did.js: `vars.routing.cli = ...; return vars`.
    let src = "async function main() { vars.routing.cli = 'x' + vars.routing.account_id; \
               return vars; }";
    let data = json!({"routing": {"account_id": 42, "cli": "1"}, "name": "n"});
    let out = run_in(&engine, src, Mode::Class4, data.clone()).await;
    assert_eq!(
        out.result,
        Ok(json!({"routing": {"account_id": 42, "cli": "x42"}, "name": "n"}))
    );
    // One run's input never shows through `vars` in the next.
    let out = run_in(
        &engine,
        "function main() { return [typeof vars.routing, vars().other, typeof vars] }",
        Mode::App,
        json!({"other": 1}),
    )
    .await;
    assert_eq!(out.result, Ok(json!(["undefined", 1, "function"])));
}

#[tokio::test]
async fn runs_share_nothing() {
    let engine = engine_with(Limits::default());
    let src = "var counter; function main(){ globalThis.leak = (globalThis.leak || 0) + 1; Object.prototype.polluted = 1; return [globalThis.leak, typeof counter] }";
    for _ in 0..6 {
        let out = run_in(&engine, src, Mode::App, Json::Null).await;
        assert_eq!(out.result, Ok(json!([1, "undefined"])));
    }
    let out = run_in(
        &engine,
        "function main(){ return ({}).polluted }",
        Mode::App,
        Json::Null,
    )
    .await;
    assert_eq!(out.result, Ok(Json::Null));
}

#[tokio::test]
async fn a_runaway_run_does_not_slow_others() {
    let limits = Limits {
        script_cpu: Duration::from_millis(1500),
        ..Limits::default()
    };
    let engine = Arc::new(engine_with(limits));
    let spin = {
        let engine = engine.clone();
        tokio::spawn(async move {
            run_in(
                &engine,
                "function main(){ while(true){} }",
                Mode::Script,
                Json::Null,
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    for i in 0..20 {
        let out = run_in(
            &engine,
            "function main(d){ return d.i }",
            Mode::Script,
            json!({"i": i}),
        )
        .await;
        assert_eq!(out.result, Ok(json!(i)));
    }
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    let spun = spin.await.unwrap();
    assert!(spun.result.unwrap_err().message.contains("CPU time limit"));
}

/// A class5-style `ctx` whose operations are tokio timers, proving the seam for the voice layer.
struct TimerCtx;

impl HostObject for TimerCtx {
    fn methods(&self) -> &[HostMethod] {
        const M: &[HostMethod] = &[
            HostMethod::asynchronous("answer"),
            HostMethod::asynchronous("play"),
            HostMethod::sync("get"),
            HostMethod::asynchronous("hangupNow"),
        ];
        M
    }
    fn call(&self, method: &str, args: Vec<Json>) -> HostCall {
        match method {
            "answer" => HostCall::Pending(
                async {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok(json!("answered"))
                }
                .boxed_local(),
            ),
            "play" => {
                let file = args.first().cloned().unwrap_or(Json::Null);
                HostCall::Pending(
                    async move {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        Ok(json!({"played": file}))
                    }
                    .boxed_local(),
                )
            }
            "get" => HostCall::Ready(Ok(json!("caller-id"))),
            _ => HostCall::Pending(
                async {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Err(HostError::new("Hangup", "the caller hung up"))
                }
                .boxed_local(),
            ),
        }
    }
}

#[tokio::test]
async fn class5_ctx_operations_are_awaited_host_futures() {
    let engine = engine_with(Limits::default());
    let src = r#"async function main(data, ctx) {
        const a = await ctx.answer();
        const p = await ctx.play("welcome.wav");
        let caught = null;
        try { await ctx.hangupNow() } catch (e) { caught = e.name + ': ' + e.message }
        return [a, p, ctx.get("sip_from_user"), caught, data.call_id];
    }"#;
    let script = Arc::new(compile("ivr", src).unwrap());
    let started = Instant::now();
    let mut inv = Invocation::new(script, Mode::Class5, json!({"call_id": "abc"}));
    inv.ctx = Some(Box::new(TimerCtx));
    let out = engine.run(inv).await.unwrap();
    assert_eq!(
        out.result,
        Ok(
            json!(["answered", {"played": "welcome.wav"}, "caller-id", "Hangup: the caller hung up", "abc"])
        )
    );
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert!(
        out.cpu < out.duration,
        "awaiting is not CPU: {:?} vs {:?}",
        out.cpu,
        out.duration
    );
}

/// A host object with two JS methods whose code counts its own evaluations in a global.
struct JsMethodsCtx;

impl HostObject for JsMethodsCtx {
    fn methods(&self) -> &[HostMethod] {
        const M: &[HostMethod] = &[HostMethod::sync("base"), HostMethod::asynchronous("later")];
        M
    }
    fn js_methods(&self) -> Option<JsMethods> {
        let source = r#"(function (raw) {
            globalThis.evaluated = (globalThis.evaluated || 0) + 1;
            return {
                twice(n) { return raw.base() * 2 * n; },
                self() { return this; },
                fail() { throw new RangeError("from JS"); },
                async wait(x) { return (await raw.later()) + x; },
            };
        })"#;
        Some(JsMethods {
            names: &["twice", "self", "fail", "wait"],
            source: Arc::new(compile("js methods", source).unwrap()),
        })
    }
    fn call(&self, method: &str, _: Vec<Json>) -> HostCall {
        match method {
            "base" => HostCall::Ready(Ok(json!(21))),
            _ => HostCall::Pending(async { Ok(json!("later:")) }.boxed_local()),
        }
    }
}

#[tokio::test]
async fn js_methods_are_evaluated_once_on_first_call_and_behave_as_methods() {
    let engine = engine_with(Limits::default());
    let src = r#"async function main(data, ctx) {
        const before = globalThis.evaluated;
        const names = Object.keys(ctx).join(",");
        const shapes = [typeof ctx.twice, ctx.twice.name, ctx.base.name, ctx.twice === ctx.twice];
        const plain = ctx.base();
        const untouched = globalThis.evaluated;
        const twice = ctx.twice(2);
        const { twice: detached } = ctx;
        const again = detached(3);
        const self = ctx.self() === ctx;
        let failed;
        try { ctx.fail() } catch (e) { failed = e instanceof RangeError && e.message }
        const waited = await ctx.wait("x");
        return [before, names, shapes, plain, untouched, twice, again, self, failed, waited,
                globalThis.evaluated, Function.prototype.isPrototypeOf(ctx.later)];
    }"#;
    let script = Arc::new(compile("js methods", src).unwrap());
    let mut inv = Invocation::new(script, Mode::Class5, json!({}));
    inv.ctx = Some(Box::new(JsMethodsCtx));
    let out = engine.run(inv).await.unwrap();
    assert_eq!(
        out.result,
        Ok(json!([
            null,
            "base,later,twice,self,fail,wait",
            ["function", "twice", "base", true],
            21,
            null,
            84,
            126,
            true,
            "from JS",
            "later:x",
            1,
            true
        ]))
    );
}

#[tokio::test]
async fn many_waiting_calls_cost_tasks_not_threads() {
    let engine = Arc::new(engine_with(Limits::default()));
    let script = Arc::new(
        compile(
            "ivr",
            "async function main(d, ctx){ await ctx.answer(); await ctx.play('x'); return d.i }",
        )
        .unwrap(),
    );
    let started = Instant::now();
    let runs = (0..200).map(|i| {
        let engine = engine.clone();
        let script = script.clone();
        async move {
            let mut inv = Invocation::new(script, Mode::Class5, json!({"i": i}));
            inv.ctx = Some(Box::new(TimerCtx));
            engine.run(inv).await.unwrap().result
        }
    });
    let results = futures::future::join_all(runs).await;
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r, Ok(json!(i)));
    }
    // 200 runs each waiting 50 ms on 2 threads: concurrent, not serial (serial would be 10 s).
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// A host module whose method panics: the panic is that run's 500, the engine lives on.
struct Panicky;
struct PanickyObject;
impl HostObject for PanickyObject {
    fn methods(&self) -> &[HostMethod] {
        const M: &[HostMethod] = &[HostMethod::sync("boom")];
        M
    }
    fn call(&self, _: &str, _: Vec<Json>) -> HostCall {
        panic!("host bug")
    }
}
impl HostModule for Panicky {
    fn instantiate(&self) -> Box<dyn HostObject> {
        Box::new(PanickyObject)
    }
}

#[tokio::test]
async fn a_panicking_host_function_fails_only_its_run() {
    let mut modules = HostModules::new();
    modules.register(&["panicky"], Arc::new(Panicky));
    let engine = Engine::start(EngineConfig {
        workers: 1,
        modules,
        ..EngineConfig::default()
    })
    .unwrap();
    let out = run_in(
        &engine,
        "function main(){ return require('panicky').boom() }",
        Mode::App,
        Json::Null,
    )
    .await;
    let e = out.result.unwrap_err();
    assert_eq!(e.code, 500);
    assert!(e.message.contains("host bug"), "{e}");
    let out = run_in(
        &engine,
        "function main(){ return 1 }",
        Mode::App,
        Json::Null,
    )
    .await;
    assert_eq!(out.result, Ok(json!(1)));
    let out = run_in(
        &engine,
        "function main(){ return require('nope') }",
        Mode::App,
        Json::Null,
    )
    .await;
    assert!(out.result.unwrap_err().message.contains("allowed: panicky"));
}

#[tokio::test]
async fn results_that_are_not_json_are_clear_errors() {
    let out = run(
        "function main(){ const a = {}; a.a = a; return a }",
        Mode::App,
        Json::Null,
    )
    .await;
    let e = out.result.unwrap_err();
    assert!(e.message.contains("not JSON-serialisable"), "{e}");
    let out = run("function main(){ return undefined }", Mode::App, Json::Null).await;
    assert_eq!(out.result, Ok(Json::Null));
}

#[tokio::test]
async fn top_level_exit_without_main_is_a_result() {
    let out = run("exit({top: true})", Mode::App, Json::Null).await;
    assert_eq!(out.result, Ok(json!({"top": true})));
    let out = run("var x = 1;", Mode::App, Json::Null).await;
    assert!(out.result.unwrap_err().message.contains("no entry point"));
}

#[tokio::test]
async fn typed_arrays_work_although_they_are_added_on_first_use() {
    let src = r#"function main() {
        const before = Object.getOwnPropertyNames(globalThis).includes("Uint8Array");
        const a = new Uint8Array([1, 2, 300]);
        const view = new DataView(new ArrayBuffer(4));
        view.setUint16(0, 0xbeef);
        globalThis.Float64Array = 42;
        return [before, typeof Atomics, Array.from(a), view.getUint8(0), typeof Int32Array, Float64Array,
                a instanceof Uint8Array, Object.prototype.toString.call(new Int16Array(2))];
    }"#;
    let out = run(src, Mode::Script, Json::Null).await;
    assert_eq!(
        out.result,
        Ok(json!([
            true,
            "object",
            [1, 2, 44],
            0xbe,
            "function",
            42,
            true,
            "[object Int16Array]"
        ]))
    );
}

/// `Date` is part of a script-mode (or class4) context from the start, where adding it on
/// first use would cost every run that reads the clock; a class5 call, which holds its context
/// for the whole call, gets it on first use. Either way scripts see the same `Date`.
#[tokio::test]
async fn date_is_eager_outside_class5_and_added_on_first_use_in_class5_calls() {
    let src = r#"async function main(data, ctx) {
        const listed = Object.getOwnPropertyNames(globalThis).includes("Date");
        const lazy = typeof Object.getOwnPropertyDescriptor(globalThis, "Date").get;
        const now = Date.now();
        const d = new Date(Date.UTC(2026, 11, 7, 1, 2, 3));
        const real = Object.getOwnPropertyDescriptor(globalThis, "Date").writable;
        return [listed, lazy, now > 1.7e12, d.toISOString(), JSON.stringify({ d }),
                d instanceof Date, Object.prototype.toString.call(d), real, typeof Date.parse];
    }"#;
    for (mode, accessor) in [
        (Mode::Script, "undefined"),
        (Mode::Class4, "undefined"),
        (Mode::Class5, "function"),
    ] {
        let out = run(src, mode, json!({})).await;
        assert_eq!(
            out.result.map(|r| as_returned(mode, r)),
            Ok(json!([
                true,
                accessor,
                true,
                "2026-12-07T01:02:03.000Z",
                "{\"d\":\"2026-12-07T01:02:03.000Z\"}",
                true,
                "[object Date]",
                true,
                "function"
            ])),
            "{mode:?}"
        );
    }
}

#[tokio::test]
async fn maps_sets_and_weak_refs_work_although_they_are_added_on_first_use() {
    let src = r#"function main() {
        const names = Object.getOwnPropertyNames(globalThis);
        const listed = ["Map", "Set", "WeakMap", "WeakSet", "WeakRef", "FinalizationRegistry"]
            .every((n) => names.includes(n));
        const saved = Object.getOwnPropertyDescriptor(globalThis, "Set").get;
        const m = new Map([[1, "a"]]);
        const s = new Set([1, 1, 2]);
        const w = new WeakMap([[m, 3]]);
        globalThis.WeakSet = "replaced";
        const again = saved();
        return [listed, m.get(1), s.size, w.get(m), [...s.union(new Set([3]))], WeakSet,
                again === Set, typeof new WeakRef(m).deref(), typeof FinalizationRegistry,
                Object.prototype.toString.call(m), m instanceof Map,
                Object.getOwnPropertyDescriptor(globalThis, "Map").writable];
    }"#;
    let out = run(src, Mode::Script, Json::Null).await;
    assert_eq!(
        out.result,
        Ok(json!([
            true,
            "a",
            2,
            3,
            [1, 2, 3],
            "replaced",
            true,
            "object",
            "function",
            "[object Map]",
            true,
            true
        ]))
    );
    // Each run still gets its own, untouched globals.
    let out = run(
        "function main() { return typeof WeakSet }",
        Mode::Script,
        Json::Null,
    )
    .await;
    assert_eq!(out.result, Ok(json!("function")));
}

/// A module with a dotted method, an async method and a prelude that wraps the raw object.
struct Nested;
struct NestedObject;
impl HostObject for NestedObject {
    fn methods(&self) -> &[HostMethod] {
        const M: &[HostMethod] = &[
            HostMethod::asynchronous("lookup.tps"),
            HostMethod::sync("lookup.deep.echo"),
            HostMethod::sync("top"),
        ];
        M
    }
    fn call(&self, method: &str, args: Vec<Json>) -> HostCall {
        match method {
            "lookup.tps" => HostCall::Pending(Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(json!({"number": args.first().cloned().unwrap_or(Json::Null), "dnc": true}))
            })),
            "lookup.deep.echo" => HostCall::Ready(Ok(json!(args))),
            "top" => HostCall::Ready(Err(HostError::new("LookupError", "no provider"))),
            other => HostCall::Ready(Err(HostError::type_error(format!("no method {other}")))),
        }
    }
}
impl HostModule for Nested {
    fn instantiate(&self) -> Box<dyn HostObject> {
        Box::new(NestedObject)
    }
}

struct Wrapped;
impl HostModule for Wrapped {
    fn instantiate(&self) -> Box<dyn HostObject> {
        Box::new(NestedObject)
    }
    fn prelude(&self) -> Option<&'static str> {
        Some("(function (raw) { return function wrapped(n) { return raw.lookup.tps(n).then(r => ({ wrapped: r, isDnc() { return r.dnc } })) } })")
    }
}

fn engine_with_modules() -> Engine {
    let mut modules = HostModules::new();
    modules.register(&["nested", "cxNested"], Arc::new(Nested));
    modules.register(&["wrapped"], Arc::new(Wrapped));
    modules.register_global("api", Arc::new(Nested));
    modules.register_global("wrap", Arc::new(Wrapped));
    Engine::start(EngineConfig {
        workers: 1,
        modules,
        ..EngineConfig::default()
    })
    .unwrap()
}

#[tokio::test]
async fn dotted_methods_become_nested_objects() {
    let engine = engine_with_modules();
    let src = r#"async function main() {
        const m = require('cxNested');
        const r = await m.lookup.tps('4477');
        let caught = null;
        try { m.top() } catch (e) { caught = e.name + ': ' + e.message }
        return [r, m.lookup.deep.echo(1, 'a'), caught, typeof m.lookup.tps];
    }"#;
    let out = run_in(&engine, src, Mode::App, Json::Null).await;
    assert_eq!(
        out.result,
        Ok(
            json!([{"number": "4477", "dnc": true}, [1, "a"], "LookupError: no provider", "function"])
        )
    );
}

#[tokio::test]
async fn global_host_objects_exist_only_in_their_modes() {
    let engine = engine_with_modules();
    let src = r#"async function main() {
        if (typeof api === 'undefined') return 'none';
        const r = await api.lookup.tps('1');
        return [r.dnc, api === api, typeof wrap];
    }"#;
    for mode in [Mode::App, Mode::Class4, Mode::Form] {
        let data = if mode == Mode::Class4 {
            json!({"routing": {}})
        } else {
            Json::Null
        };
        let out = run_in(&engine, src, mode, data).await;
        let result = as_returned(mode, out.result.unwrap());
        assert_eq!(result, json!([true, true, "function"]), "{mode}");
    }
    let out = run_in(&engine, src, Mode::Script, Json::Null).await;
    assert_eq!(out.result, Ok(json!("none")));
    // A script may shadow the global like any other.
    let out = run_in(
        &engine,
        "function main(){ api = 5; return api }",
        Mode::App,
        Json::Null,
    )
    .await;
    assert_eq!(out.result, Ok(json!(5)));
}

#[tokio::test]
async fn a_prelude_wraps_the_raw_host_object_in_js() {
    let engine = engine_with_modules();
    let src = r#"async function main() {
        const a = await wrap('9');
        const b = await require('wrapped')('8');
        return [a.wrapped.number, a.isDnc(), b.wrapped.number];
    }"#;
    for _ in 0..3 {
        let out = run_in(&engine, src, Mode::App, Json::Null).await;
        assert_eq!(out.result, Ok(json!(["9", true, "8"])));
    }
}

struct BrokenPrelude;
impl HostModule for BrokenPrelude {
    fn instantiate(&self) -> Box<dyn HostObject> {
        Box::new(NestedObject)
    }
    fn prelude(&self) -> Option<&'static str> {
        Some("(function (raw) { return raw ")
    }
}

#[tokio::test]
async fn a_prelude_that_does_not_compile_is_a_clear_error() {
    let mut modules = HostModules::new();
    modules.register(&["broken"], Arc::new(BrokenPrelude));
    let engine = Engine::start(EngineConfig {
        workers: 1,
        modules,
        ..EngineConfig::default()
    })
    .unwrap();
    let out = run_in(
        &engine,
        "function main(){ return require('broken') }",
        Mode::App,
        Json::Null,
    )
    .await;
    let e = out.result.unwrap_err();
    assert!(e.message.contains("prelude does not compile"), "{e}");
}

/// Global host objects, preludes and pending host calls leave nothing behind: runtimes are
/// reused across runs and finally freed, which QuickJS aborts on if any object leaked.
#[test]
fn host_globals_and_preludes_leak_nothing_across_reused_runtimes() {
    let mut modules = HostModules::new();
    modules.register(&["wrapped"], Arc::new(Wrapped));
    modules.register_global("api", Arc::new(Nested));
    modules.register_global("wrap", Arc::new(Wrapped));
    let sandbox = Sandbox::new(Limits::default(), modules, "test".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let script = Arc::new(
        compile(
            "t",
            r#"async function main(d) {
                const a = await wrap(String(d.i));
                const w = require('wrapped');
                const pending = api.lookup.tps('x'); // never awaited: dropped with the run
                if (d.i % 3 == 0) exit({early: d.i});
                return [a.wrapped.number, typeof w, api.lookup.deep.echo(d.i)];
            }"#,
        )
        .unwrap(),
    );
    for i in 0..50 {
        let out = local.block_on(
            &rt,
            sandbox.run(RunRequest {
                script: script.clone(),
                mode: Mode::App,
                data: json!({"i": i}),
                function: None,
                ctx: None,
            }),
        );
        let want = if i % 3 == 0 {
            json!({"early": i})
        } else {
            json!([i.to_string(), "function", [i]])
        };
        assert_eq!(out.result, Ok(want));
    }
    drop(sandbox);
}

#[tokio::test]
async fn results_convert_as_json_stringify_would() {
    let src = r#"function main() {
        const d = new Date(0);
        class Point { constructor() { this.x = 1 } }
        return {
            n: 3e9, neg0: -0, frac: 0.5, nan: NaN, inf: -Infinity, s: "é\u0000",
            arr: [1, undefined, function () {}, null], skip: undefined, f: function () {},
            date: d, custom: { toJSON() { return "custom" } }, point: new Point(),
            nested: { deep: [{ a: [true] }] }, map: new Map([[1, 2]]),
        };
    }"#;
    let out = run(src, Mode::App, Json::Null).await;
    let v = out.result.unwrap();
    let expected = json!({
        "n": 3000000000u64, "neg0": 0, "frac": 0.5, "nan": null, "inf": null, "s": "é\u{0}",
        "arr": [1, null, null, null], "date": "1970-01-01T00:00:00.000Z", "custom": "custom",
        "point": {"x": 1}, "nested": {"deep": [{"a": [true]}]}, "map": {},
    });
    assert_eq!(v, expected);
    assert_eq!(serde_json::to_string(&v["n"]).unwrap(), "3000000000");
}

#[tokio::test]
async fn inputs_arrive_as_json_parse_would_build_them() {
    let src = r#"function main(d) {
        const own = Object.getOwnPropertyNames(d.o);
        return [own, Object.getPrototypeOf(d.o) === Object.prototype, d.o.__proto__,
                Array.isArray(d.a), d.a.length, d.a[2].k, typeof d.big, d.big, d.f, d.s,
                d.a.map((x) => typeof x)];
    }"#;
    let data = json!({
        "o": {"__proto__": {"evil": true}, "x": 1},
        "a": [1, "two", {"k": null}, [true]],
        "big": 3_000_000_000u64, "f": -0.25, "s": "é\u{0}✓",
    });
    let out = run(src, Mode::App, data).await;
    assert_eq!(
        out.result,
        Ok(json!([
            ["__proto__", "x"],
            true,
            {"evil": true},
            true,
            4,
            null,
            "number",
            3_000_000_000u64,
            -0.25,
            "é\u{0}✓",
            ["number", "string", "object", "object"]
        ]))
    );
}

/// Runs on one worker's sandbox, one after another, as the pool runs them.
struct OneWorker {
    sandbox: Sandbox,
    rt: tokio::runtime::Runtime,
    local: tokio::task::LocalSet,
}

impl OneWorker {
    fn new(limits: Limits) -> Self {
        let mut modules = HostModules::new();
        modules.register(&["wrapped"], Arc::new(Wrapped));
        modules.register(&["panicky"], Arc::new(Panicky));
        OneWorker {
            sandbox: Sandbox::new(limits, modules, "test".into()),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            local: tokio::task::LocalSet::new(),
        }
    }

    fn run(&self, source: &str, mode: Mode, data: Json) -> RunOutput {
        let script = Arc::new(compile("pristine", source).unwrap());
        self.local.block_on(
            &self.rt,
            self.sandbox.run(RunRequest {
                script,
                mode,
                data,
                function: None,
                ctx: None,
            }),
        )
    }
}

/// Every run of a pristine context sees the context exactly as built, whatever the run before
/// it did to globals, prototypes, built-ins and the engine's own host functions.
#[test]
fn pristine_runs_start_from_an_untouched_context() {
    let w = OneWorker::new(Limits::default());
    let vandal = r#"function main(d) {
        globalThis.leak = d.n;
        Object.prototype.polluted = 1;
        Array.prototype.push = null;
        String.prototype.trim = 5;
        JSON.stringify = null;
        Math.random = () => 4;
        new Map([[1, 2]]); new Set(); /x+/.test("xx");
        console.log = null; console.info = undefined;
        delete globalThis.vars; globalThis.require = 0; globalThis.err = null;
        Object.freeze(Object.prototype);
        Object.defineProperty(globalThis, "Date", { value: 3 });
        var big = []; for (let i = 0; i < 20000; i++) big[i] = { i, s: "x" + i };
        exit("vandalised " + d.n);
    }"#;
    let check = r#"function main(d) {
        console.log("still logs", d.n);
        return [typeof leak, ({}).polluted, typeof [].push, typeof "".trim,
                typeof JSON.stringify, Math.random() < 1, typeof console.info, typeof vars,
                typeof require, typeof err, Object.isFrozen(Object.prototype), typeof Date,
                new Map([[d.n, 1]]).size, vars().n];
    }"#;
    for n in 0..5 {
        let out = w.run(vandal, Mode::App, json!({"n": n}));
        assert_eq!(out.result, Ok(json!(format!("vandalised {n}"))));
        let out = w.run(check, Mode::App, json!({"n": n}));
        assert_eq!(
            out.result,
            Ok(json!([
                "undefined",
                null,
                "function",
                "function",
                "function",
                true,
                "function",
                "function",
                "function",
                "function",
                false,
                "function",
                1,
                n
            ]))
        );
        assert_eq!(out.logs.len(), 1);
        assert_eq!(out.logs[0].message, format!("still logs {n}"));
    }
    assert_eq!(
        w.sandbox.pristine_restores(),
        10,
        "every run used the image"
    );
}

/// Dropping the last reference to a host function during a run must not free its Rust
/// closure: the restored image still refers to it. Run with deletions, then use them all.
#[test]
fn host_functions_dropped_by_a_run_still_work_in_the_next() {
    let w = OneWorker::new(Limits::default());
    for n in 0..20 {
        let out = w.run(
            r#"function main() {
                for (const k of ["log", "info", "debug", "warn", "error"]) delete console[k];
                delete globalThis.console; delete globalThis.exit; delete globalThis.err;
                delete globalThis.vars; delete globalThis.require; delete globalThis.eval;
                delete globalThis.setTimeout; delete globalThis.clearTimeout;
                delete Math.random; delete globalThis.Map; delete globalThis.process;
                return 1;
            }"#,
            Mode::App,
            Json::Null,
        );
        assert_eq!(out.result, Ok(json!(1)));
        let out = w.run(
            r#"async function main() {
                console.warn("w"); console.error("e");
                await new Promise((r) => setTimeout(r, 1));
                clearTimeout(setTimeout(() => exit("timer ran"), 1));
                const m = new Map([[vars().n, Math.random()]]);
                exit([m.size, typeof require, process.env.SCRIPTFORGE_NAME]);
            }"#,
            Mode::App,
            json!({"n": n}),
        );
        assert_eq!(out.result, Ok(json!([1, "function", "pristine"])));
        assert_eq!(out.logs.len(), 2);
    }
    assert_eq!(w.sandbox.pristine_restores(), 40);
}

/// What a restore copies stays small: the routing bench's "whole cycle" depends on it.
#[test]
fn the_pristine_image_stays_small() {
    let w = OneWorker::new(Limits::default());
    assert_eq!(w.sandbox.pristine_image_bytes(), None);
    w.run("function main(){ return 1 }", Mode::Class4, json!({}));
    let bytes = w.sandbox.pristine_image_bytes().expect("an image waits");
    eprintln!("pristine image: {bytes} bytes");
    assert!(bytes < 256 * 1024, "{bytes} bytes");
}

#[test]
fn math_random_differs_between_pristine_runs() {
    let w = OneWorker::new(Limits::default());
    let draws: std::collections::HashSet<String> = (0..8)
        .map(|_| {
            let out = w.run(
                "function main(){ return Math.random() }",
                Mode::Class4,
                json!({}),
            );
            out.result.unwrap().to_string()
        })
        .collect();
    assert_eq!(
        draws.len(),
        8,
        "a restored image must not replay its generator"
    );
}

/// Runs that hit a limit are restored like any other, and the next run is unaffected; a
/// memory bomb's pages are given back.
#[test]
fn limits_hit_in_a_pristine_context_leave_it_usable() {
    let limits = Limits {
        script_cpu: Duration::from_millis(200),
        app_cpu: Duration::from_secs(20),
        memory_bytes: 16 * 1024 * 1024,
        ..Limits::default()
    };
    let w = OneWorker::new(limits);
    let runaways = [
        (
            "function main(){ while(true){} }",
            Mode::Script,
            "CPU time limit",
        ),
        (
            "function main(){ let a=[]; while(true) a.push('x'.repeat(1000)+a.length) }",
            Mode::App,
            "memory limit",
        ),
        (
            "function main(){ let a=[]; while(true) a.push(new ArrayBuffer(1<<20)) }",
            Mode::App,
            "memory limit",
        ),
        (
            "function f(n){ return f(n+1)+1 } function main(){ return f(0) }",
            Mode::App,
            "stack limit",
        ),
        (
            "async function main(){ await new Promise(()=>{}) }",
            Mode::App,
            "never settled",
        ),
    ];
    for (source, mode, wanted) in runaways {
        let out = w.run(source, mode, Json::Null);
        let e = out.result.unwrap_err();
        assert!(e.message.contains(wanted), "{source}: {e:?}");
        for i in 0..3 {
            let out = w.run(
                "function main(d){ return [d.i, new Set([1,1,2]).size, 'a b '.trim()] }",
                Mode::App,
                json!({"i": i}),
            );
            assert_eq!(out.result, Ok(json!([i, 2, "a b"])), "after {source}");
        }
    }
    assert_eq!(w.sandbox.pristine_restores(), 20);
}

/// A script that uses a host module makes objects owning Rust data: its runtime is torn down
/// properly, and it runs in ordinary fresh contexts from then on; other scripts keep the image.
#[test]
fn host_module_scripts_leave_the_image_and_others_keep_it() {
    let w = OneWorker::new(Limits::default());
    let pure = "function main(d){ return d.i * 2 }";
    let with_module =
        "async function main(d){ const w = require('wrapped'); return typeof w + d.i }";
    assert_eq!(w.run(pure, Mode::App, json!({"i": 1})).result, Ok(json!(2)));
    assert_eq!(w.sandbox.pristine_restores(), 1);
    for i in 0..5 {
        let out = w.run(with_module, Mode::App, json!({"i": i}));
        assert_eq!(out.result, Ok(json!(format!("function{i}"))));
        assert_eq!(
            w.sandbox.pristine_restores(),
            1 + i as u64,
            "module runs never restore"
        );
        let out = w.run(pure, Mode::App, json!({"i": i}));
        assert_eq!(out.result, Ok(json!(i * 2)));
        assert_eq!(w.sandbox.pristine_restores(), 2 + i as u64);
    }
}

/// A run whose future is dropped half-way (its caller went away) takes its pristine context
/// with it; the worker builds a new one for the next run instead of giving the image up.
#[test]
fn a_dropped_run_does_not_lose_the_pristine_context() {
    let w = OneWorker::new(Limits::default());
    let pure = "function main(d){ return d.i + 1 }";
    assert_eq!(w.run(pure, Mode::App, json!({"i": 1})).result, Ok(json!(2)));
    let waiting = Arc::new(
        compile(
            "waits",
            "async function main(){ await new Promise(r => setTimeout(r, 60000)); return 1 }",
        )
        .unwrap(),
    );
    let cut_short = w.local.block_on(&w.rt, async {
        let run = w.sandbox.run(RunRequest {
            script: waiting,
            mode: Mode::App,
            data: Json::Null,
            function: None,
            ctx: None,
        });
        tokio::time::timeout(Duration::from_millis(50), run).await
    });
    assert!(cut_short.is_err(), "the run was still waiting when dropped");
    for i in 0..3 {
        assert_eq!(
            w.run(pure, Mode::App, json!({"i": i})).result,
            Ok(json!(i + 1))
        );
    }
    assert_eq!(
        w.sandbox.pristine_restores(),
        4,
        "the runs after it used a new image"
    );
}

/// A panic in a host function ends its run even when the script catches what is thrown, and
/// leaves nothing for the next run on the worker (rquickjs keeps a caught panic per runtime).
#[test]
fn a_host_panic_cannot_be_swallowed_or_reach_the_next_run() {
    let w = OneWorker::new(Limits::default());
    for mode in [Mode::App, Mode::Class4] {
        let out = w.run(
            "function main(){ try { require('panicky').boom() } catch (e) { return 'swallowed' } }",
            mode,
            json!({"routing": {}}),
        );
        let e = out.result.unwrap_err();
        assert!(
            e.message
                .contains("internal error in a host function: host bug"),
            "{e:?}"
        );
        let out = w.run(
            "function main(){ throw new TypeError('plain') }",
            mode,
            json!({}),
        );
        assert!(out.result.unwrap_err().message.contains("plain"));
    }
}

/// `setTimeout` runs script code (a `bind` getter) while it works: that code may call the
/// timer functions again.
#[test]
fn set_timeout_can_be_reentered_from_the_script() {
    let w = OneWorker::new(Limits::default());
    let out = w.run(
        r#"async function main(){
            const f = (x) => x;
            Object.defineProperty(f, 'bind', { get() {
                clearTimeout(setTimeout(() => {}, 1)); return Function.prototype.bind } });
            await new Promise((r) => setTimeout((v) => r(v), 1, 'bound'));
            setTimeout(f, 1, 'arg');
            return 'ok' }"#,
        Mode::App,
        Json::Null,
    );
    assert_eq!(out.result, Ok(json!("ok")));
}

/// Memory freed in blocks of one size serves blocks of another: a run whose live memory stays
/// far below the limit passes in a pristine context as it does in an ordinary one.
#[test]
fn freed_memory_of_every_size_is_reused_within_a_pristine_run() {
    let limits = Limits {
        memory_bytes: 16 * 1024 * 1024,
        app_cpu: Duration::from_secs(60),
        ..Limits::default()
    };
    let w = OneWorker::new(limits);
    let src = r#"function main(){
        for (let k = 0; k < 40; k++) {
            let a = [];
            for (let i = 0; i < 10000; i++) a.push('y'.repeat(16 * k + 20));
            a = null;
        }
        return 'ok' }"#;
    assert_eq!(w.run(src, Mode::App, Json::Null).result, Ok(json!("ok")));
    assert_eq!(w.sandbox.pristine_restores(), 1);
}

/// Host functions have their own context's `Function.prototype`, not one shared by every
/// context of a runtime (rquickjs caches the first context's): a run or a call cannot leave
/// data there for the next.
#[test]
fn host_functions_share_no_prototype_across_runs_or_calls() {
    let w = OneWorker::new(Limits::default());
    let src = r#"function main(d){
        if (d.impure) require('wrapped');
        const p = Object.getPrototypeOf(console.log);
        const seen = p.secret === undefined ? null : p.secret;
        p.secret = 'left by ' + d.who;
        return [seen, p === Function.prototype,
                Object.getPrototypeOf(setTimeout) === Function.prototype] }"#;
    // Ordinary fresh contexts in reused runtimes (the script uses a module), and the
    // shared runtimes of class5 calls.
    for (mode, data) in [
        (Mode::App, json!({"impure": true})),
        (Mode::Class5, json!({})),
    ] {
        for who in 0..3 {
            let mut data = data.clone();
            data["who"] = json!(who);
            let out = w.run(src, mode, data);
            assert_eq!(
                out.result,
                Ok(json!([null, true, true])),
                "{mode} run {who}"
            );
        }
    }
}
