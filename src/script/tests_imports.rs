//! Imports (host modules under their names, scripts of the folder), `process.env` and the
//! console's formatting, through the engine.

use std::sync::Arc;

use serde_json::{json, Value as Json};

use super::*;

/// `m.lookup.tps(n)` answers `{number, dnc: true}`; `m.top()` throws a LookupError.
struct Fake;
struct FakeObject;

impl HostObject for FakeObject {
    fn methods(&self) -> &[HostMethod] {
        const M: &[HostMethod] = &[
            HostMethod::asynchronous("lookup.tps"),
            HostMethod::sync("top"),
            HostMethod::sync("delete"),
        ];
        M
    }
    fn call(&self, method: &str, args: Vec<Json>) -> HostCall {
        match method {
            "lookup.tps" => HostCall::Ready(Ok(json!({"number": args[0], "dnc": true}))),
            "delete" => HostCall::Ready(Ok(json!("deleted"))),
            _ => HostCall::Ready(Err(HostError::new("LookupError", "no provider"))),
        }
    }
}

impl HostModule for Fake {
    fn instantiate(&self) -> Box<dyn HostObject> {
        Box::new(FakeObject)
    }
}

struct Setup {
    engine: Engine,
    dir: tempfile::TempDir,
}

fn setup(env: Vec<(String, String)>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let mut modules = HostModules::new();
    modules.register(&["cxFake", "fake"], Arc::new(Fake));
    modules.set_scripts(Arc::new(ScriptLibrary::new(
        dir.path(),
        LibraryLimits::default(),
    )));
    modules.set_env(env);
    let engine = Engine::start(EngineConfig {
        workers: 1,
        modules,
        ..EngineConfig::default()
    })
    .unwrap();
    Setup { engine, dir }
}

impl Setup {
    fn write(&self, name: &str, source: &str) {
        std::fs::write(self.dir.path().join(format!("{name}.js")), source).unwrap();
    }

    async fn run(&self, name: &str, source: &str, mode: Mode, data: Json) -> RunOutput {
        let script = Arc::new(compile(name, source).unwrap());
        self.engine
            .run(Invocation::new(script, mode, data))
            .await
            .unwrap()
    }

    async fn message(&self, source: &str, mode: Mode) -> String {
        let out = self.run("main", source, mode, json!({"routing": {}})).await;
        out.result.expect_err(source).message
    }
}

#[tokio::test]
async fn host_modules_import_by_name_with_named_and_default_exports_in_every_mode() {
    let s = setup(vec![]);
    let src = r#"import { lookup, top } from 'cxFake';
import fake from 'fake';
import * as all from 'cxFake';
export async function main(data) {
    let caught;
    try { top() } catch (e) { caught = e.name }
    const r = await lookup.tps('4477');
    data.got = [r, caught, typeof fake.lookup.tps, typeof all.default, all.delete()];
    return data;
}"#;
    for mode in [Mode::App, Mode::Class4, Mode::Form] {
        let out = s.run("main", src, mode, json!({"routing": {}})).await;
        let got = &out.result.unwrap_or_else(|e| panic!("{mode}: {e}"))["got"];
        assert_eq!(
            got,
            &json!([{"number": "4477", "dnc": true}, "LookupError", "function", "object", "deleted"]),
            "{mode}"
        );
    }
    // A driver, and a classic script's dynamic import.
    let script = Arc::new(
        compile(
            "drv",
            "import { lookup } from 'cxFake';\nexport async function search(q) { return (await lookup.tps(q.number)).dnc }",
        )
        .unwrap(),
    );
    let mut inv = Invocation::new(script, Mode::Driver, json!({"number": "1"}));
    inv.function = Some("search".into());
    assert_eq!(s.engine.run(inv).await.unwrap().result, Ok(json!(true)));
    // Class5: calls share runtimes; each context loads the module for itself.
    for _ in 0..3 {
        let script = Arc::new(
            compile(
                "c5",
                "import { lookup } from 'cxFake';\nimport * as again from 'fake';\nexport async function main(data, ctx) { return [(await lookup.tps('5')).dnc, typeof ctx.top, typeof again.lookup] }",
            )
            .unwrap(),
        );
        let mut inv = Invocation::new(script, Mode::Class5, Json::Null);
        inv.ctx = Some(Box::new(FakeObject));
        assert_eq!(
            s.engine.run(inv).await.unwrap().result,
            Ok(json!([true, "function", "object"]))
        );
    }
    let out = s
        .run(
            "dyn",
            "async function main() { const m = await import('cxFake'); return typeof m.lookup.tps }",
            Mode::App,
            Json::Null,
        )
        .await;
    assert_eq!(out.result, Ok(json!("function")));
}

#[tokio::test]
async fn unknown_and_unavailable_modules_are_clear_errors() {
    let s = setup(vec![]);
    let message = s
        .message(
            "import { kv } from 'cxNope';\nexport function main() { return 1 }",
            Mode::App,
        )
        .await;
    assert!(
        message.contains("no such module 'cxNope'") && message.contains("cxFake, fake"),
        "{message}"
    );
    // The sync mode has no host modules: the import names the mode.
    let message = s
        .message(
            "import { lookup } from 'cxFake';\nexport function main() { return 1 }",
            Mode::Script,
        )
        .await;
    assert!(message.contains("none in script mode"), "{message}");
    let message = s
        .message("function main() { return require('cxNope') }", Mode::App)
        .await;
    assert!(
        message.contains("require('cxNope'): no such module; allowed: cxFake, fake"),
        "{message}"
    );
}

#[tokio::test]
async fn scripts_import_scripts_of_their_folder_es_and_commonjs() {
    let s = setup(vec![]);
    s.write(
        "lib",
        "export function double(n) { return n * 2 }\nexport const name = 'lib';",
    );
    s.write(
        "cjs",
        "var secret = 7;\nfunction triple(n) { return n * secret / 7 * 3 }\nmodule.exports = { triple, loads: (globalThis.loads = (globalThis.loads || 0) + 1) };",
    );
    s.write("both", "export function hello() { return 'es' }");
    let out = s
        .run(
            "main",
            r#"import { double, name } from './lib';
import * as again from './lib.js';
export function main(d) {
    const a = require('./cjs'), b = require('cjs'), c = require('./cjs.js');
    return [double(d.n), name, again.double === double, a.triple(d.n), a === b && b === c,
            a.loads, typeof secret, require('./both').hello()];
}"#,
            Mode::App,
            json!({"n": 2}),
        )
        .await;
    assert_eq!(
        out.result,
        Ok(json!([4, "lib", true, 6, true, 1, "undefined", "es"]))
    );
}

#[tokio::test]
async fn imports_cannot_leave_the_folder_and_missing_scripts_are_named() {
    let s = setup(vec![]);
    for spec in ["../etc/passwd", "./../x", "./a/b", "/etc/passwd"] {
        let src = format!("import x from '{spec}';\nexport function main() {{ return 1 }}");
        let message = s.message(&src, Mode::App).await;
        assert!(message.contains("scripts folder only"), "{spec}: {message}");
        let src = format!("function main() {{ return require('{spec}') }}");
        let message = s.message(&src, Mode::App).await;
        assert!(message.contains("scripts folder only"), "{spec}: {message}");
    }
    let message = s
        .message(
            "import { f } from './nolib';\nexport function main() { return 1 }",
            Mode::App,
        )
        .await;
    assert!(message.contains("script 'nolib' not found"), "{message}");
    s.write("broken", "export function f( {");
    let message = s
        .message("function main() { return require('./broken') }", Mode::App)
        .await;
    assert!(message.contains("broken.js:1"), "{message}");
}

#[tokio::test]
async fn an_imported_script_is_compiled_once_and_reloaded_when_it_changes() {
    let s = setup(vec![]);
    s.write("lib", "export const v = 1;");
    let src = "import { v } from './lib';\nexport function main() { return v }";
    assert_eq!(
        s.run("m", src, Mode::App, Json::Null).await.result,
        Ok(json!(1))
    );
    let library = ScriptLibrary::new(s.dir.path(), LibraryLimits::default());
    let a = library
        .get_import("lib", "lib.js", compile::ImportAs::Module)
        .unwrap();
    let b = library
        .get_import("lib", "lib.js", compile::ImportAs::Module)
        .unwrap();
    assert!(Arc::ptr_eq(&a, &b), "the second import reuses the bytecode");
    s.write("lib", "export const v = 22222;");
    assert_eq!(
        s.run("m", src, Mode::App, Json::Null).await.result,
        Ok(json!(22222))
    );
    let c = library
        .get_import("lib", "lib.js", compile::ImportAs::Module)
        .unwrap();
    assert!(!Arc::ptr_eq(&a, &c), "an edited file is compiled again");
}

#[tokio::test]
async fn process_env_has_scriptforge_ids_operator_variables_and_set_env_var_is_per_run() {
    let s = setup(vec![
        ("REGION".into(), "eu-west".into()),
        ("LIMIT".into(), "5".into()),
    ]);
    let src = r#"function main(d) {
        const before = process.env.MINE;
        if (d.set) setEnvVar('MINE', 42);
        const e = process.env;
        return [e.SCRIPTFORGE_UUID, e.CORRELATION_ID, e.APP_ID, e.REGION, e.LIMIT, before, e.MINE, e.SCRIPTFORGE_NAME];
    }"#;
    let first = s
        .run("env_a", src, Mode::App, json!({"set": true}))
        .await
        .result
        .unwrap();
    let second = s
        .run("env_a", src, Mode::App, json!({"set": false}))
        .await
        .result
        .unwrap();
    let uuid =
        regex::Regex::new("^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
            .unwrap();
    for r in [&first, &second] {
        assert!(uuid.is_match(r[0].as_str().unwrap()), "{r}");
        assert!(uuid.is_match(r[1].as_str().unwrap()), "{r}");
        assert_eq!(r[2], "env_a");
        assert_eq!(r[3], "eu-west");
        assert_eq!(r[4], "5");
        assert_eq!(r[7], "env_a");
    }
    assert_eq!(first[0], second[0], "the script's UUID is stable");
    assert_ne!(first[1], second[1], "each run has its own correlation id");
    assert_eq!((&first[5], &first[6]), (&Json::Null, &json!("42")));
    assert_eq!(
        (&second[5], &second[6]),
        (&Json::Null, &Json::Null),
        "setEnvVar does not leak into the next run"
    );
    let other = s
        .run("env_b", src, Mode::App, json!({}))
        .await
        .result
        .unwrap();
    assert_ne!(other[0], first[0], "another script, another UUID");
    // The operator may name the app.
    let s = setup(vec![("APP_ID".into(), "billing".into())]);
    let r = s
        .run("env_c", src, Mode::App, json!({}))
        .await
        .result
        .unwrap();
    assert_eq!(r[2], "billing");
}

#[tokio::test]
async fn console_formats_errors_and_objects_like_node() {
    let s = setup(vec![]);
    let src = r#"function main() {
        function fails() { throw new Error('boom') }
        try { fails() } catch (e) { console.error('Script error:', e) }
        const o = { a: 1, b: 'x', c: [1, 2], d: { e: { f: { g: 1 } } }, 'x-y': null, u: undefined };
        console.log(o);
        const loop = { name: 'loop' }; loop.self = loop;
        console.log(loop);
        console.log('%s has %d items (%i%%)', 'cart', 3.5, 42.9, 'extra');
        console.log([], {}, [ 'a' ], new Map([['k', 1]]), new Set([1]));
        console.log(function named() {}, () => 1, Symbol('s'), -0, 10n);
        const te = new TypeError('bad'); te.code = 'E_BAD';
        console.warn({ err: te });
        console.log({ long: 'a'.repeat(40), longer: 'b'.repeat(40) });
        class Point { constructor() { this.x = 1 } }
        console.log(new Point(), new Date(0), /a+b/g);
        return null;
    }"#;
    let out = s.run("cons", src, Mode::App, Json::Null).await;
    assert_eq!(out.result, Ok(Json::Null));
    let lines: Vec<&str> = out.logs.iter().map(|l| l.message.as_str()).collect();
    assert!(
        lines[0].starts_with("Script error: Error: boom\n    at fails (cons"),
        "{}",
        lines[0]
    );
    assert_eq!(
        lines[1],
        "{\n  a: 1,\n  b: 'x',\n  c: [ 1, 2 ],\n  d: { e: { f: [Object] } },\n  'x-y': null,\n  u: undefined\n}"
    );
    assert_eq!(lines[2], "{ name: 'loop', self: [Circular] }");
    assert_eq!(lines[3], "cart has 3.5 items (42%) extra");
    assert_eq!(lines[4], "[] {} [ 'a' ] Map(1) { 'k' => 1 } Set(1) { 1 }");
    assert_eq!(
        lines[5],
        "[Function: named] [Function (anonymous)] Symbol(s) -0 10n"
    );
    assert_eq!(lines[6], "{ err: [TypeError: bad] }");
    assert_eq!(
        lines[7],
        format!(
            "{{\n  long: '{}',\n  longer: '{}'\n}}",
            "a".repeat(40),
            "b".repeat(40)
        )
    );
    assert_eq!(lines[8], "Point { x: 1 } 1970-01-01T00:00:00.000Z /a+b/g");
}

/// `process.env` is made on a run's first read: in class4 (a pristine image restored between
/// runs) and app mode alike, a run that never reads it is followed by one that does, the
/// object is complete, a script may replace it, and the replacement does not outlive its run.
#[tokio::test]
async fn process_env_made_on_first_read_is_complete_replaceable_and_per_run() {
    let s = setup(vec![("REGION".into(), "eu-west".into())]);
    let src = r#"function main(d) {
        if (!d.read) return 'untouched';
        const keys = Object.keys(process);
        const first = process.env;
        const same = first === process.env;
        const text = JSON.stringify(process.env);
        if (d.replace) process.env = { ONLY: 'mine' };
        return [keys.includes('env'), same, JSON.parse(text).SCRIPTFORGE_NAME,
                JSON.parse(text).REGION, typeof JSON.parse(text).CORRELATION_ID,
                process.env.ONLY || null, process.env.REGION || null];
    }"#;
    for mode in [Mode::Class4, Mode::App] {
        // A class4 answer comes back inside the routing object.
        let s = &s;
        let run = |data: Json| async move {
            let out = s.run("env_lazy", src, mode, data).await.result.unwrap();
            super::tests::as_returned(mode, out)
        };
        assert_eq!(run(json!({})).await, json!("untouched"), "{mode:?}");
        assert_eq!(
            run(json!({"read": true, "replace": true})).await,
            json!([true, true, "env_lazy", "eu-west", "string", "mine", null]),
            "{mode:?}"
        );
        assert_eq!(
            run(json!({"read": true})).await,
            json!([true, true, "env_lazy", "eu-west", "string", null, "eu-west"]),
            "{mode:?}: the replacement ended with its run"
        );
    }
}

#[tokio::test]
async fn process_env_does_not_go_through_a_replaced_object_define_property() {
    let s = setup(vec![("REGION".into(), "eu-west".into())]);
    let src = r#"function main(d) {
        let calls = 0;
        Object.defineProperty = () => { calls++; throw new Error("hijacked"); };
        const env = process.env;
        const same = env === process.env;
        process.env = { ONLY: 'mine' };
        return [env.REGION, env.SCRIPTFORGE_NAME, same, process.env.ONLY, calls];
    }"#;
    for mode in [Mode::Class4, Mode::App] {
        let out = s.run("env_guarded", src, mode, json!({})).await.result;
        assert_eq!(
            out.map(|o| super::tests::as_returned(mode, o)),
            Ok(json!(["eu-west", "env_guarded", true, "mine", 0])),
            "{mode:?}"
        );
    }
}
