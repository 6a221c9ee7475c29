//! The kv module on both backends, through the script engine: atomic `incr` under 1,000
//! concurrent runs, TTLs, prefixes, persistence across a restart, and a clear error when
//! Redis is unreachable. Redis is a real `redis-server` started by the test.

mod support;

use std::{sync::Arc, time::Duration};

use callforge::{
    config::Config,
    script::{compile, Engine, EngineConfig, Invocation, Mode},
};
use serde_json::{json, Value};

fn engine(config: &str, dir: &std::path::Path) -> Engine {
    let mut config = Config::parse(config, "test.toml").unwrap();
    config.base_dir = dir.to_path_buf();
    let built = callforge::modules::build(&config, true).unwrap();
    Engine::start(EngineConfig {
        workers: 2,
        modules: built.modules,
        ..EngineConfig::default()
    })
    .unwrap()
}

async fn run(engine: &Engine, source: &str) -> Result<Value, String> {
    let script = Arc::new(compile("t", source).unwrap());
    let out = engine
        .run(Invocation::new(script, Mode::App, json!({})))
        .await
        .unwrap();
    out.result.map_err(|e| e.message)
}

async fn thousand_parallel_increments(engine: Arc<Engine>) {
    let script = Arc::new(
        compile(
            "incr",
            "async function main(){ return await require('kv').incr('hits', 1, 600) }",
        )
        .unwrap(),
    );
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let engine = engine.clone();
        let script = script.clone();
        tasks.push(tokio::spawn(async move {
            engine
                .run(Invocation::new(script, Mode::App, json!({})))
                .await
                .unwrap()
                .result
                .unwrap()
        }));
    }
    let mut seen: Vec<i64> = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap().as_i64().unwrap());
    }
    seen.sort();
    assert_eq!(
        seen,
        (1..=1000).collect::<Vec<_>>(),
        "every increment got its own value"
    );
    let total = run(
        &engine,
        "async function main(){ return await require('kv').get('hits') }",
    )
    .await
    .unwrap();
    assert_eq!(total, json!(1000));
}

const KV_API: &str = r#"async function main() {
    const kv = require('kv');
    await kv.set('user:1', {name: 'Ada'});
    await kv.set('user:2', 'Bob', 60);
    await kv.set('user_3', 3);
    await kv.set('short', 1, 0.05);
    const a = await kv.get('user:1');
    const missing = await kv.get('nope');
    const keys = await kv.keys('user:');
    await new Promise(r => setTimeout(r, 120));
    const expired = await kv.get('short');
    const d1 = await kv.del('user:2');
    const d2 = await kv.del('user:2');
    let typeError = null;
    try { await kv.incr('user:1', 1) } catch (e) { typeError = e.name }
    let badArg = null;
    try { await kv.set() } catch (e) { badArg = e.message }
    return [a, missing, keys, expired, d1, d2, typeError, badArg];
}"#;

fn check_kv_api(out: Value) {
    assert_eq!(out[0], json!({"name": "Ada"}));
    assert_eq!(out[1], Value::Null);
    assert_eq!(out[2], json!(["user:1", "user:2"]));
    assert_eq!(out[3], Value::Null, "the TTL expired");
    assert_eq!(out[4], json!(true));
    assert_eq!(out[5], json!(false));
    assert_eq!(out[6], json!("TypeError"));
    assert!(
        out[7]
            .as_str()
            .unwrap()
            .contains("kv.set: argument 1 (key)"),
        "{out}"
    );
}

#[tokio::test]
async fn embedded_kv_incr_is_atomic_under_1000_parallel_runs() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(engine("", dir.path()));
    thousand_parallel_increments(engine.clone()).await;
    check_kv_api(run(&engine, KV_API).await.unwrap());
}

#[tokio::test]
async fn redis_kv_incr_is_atomic_under_1000_parallel_runs() {
    let redis = support::redis();
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(engine(
        &format!("[kv]\nbackend = \"{}\"\n", redis.url),
        dir.path(),
    ));
    thousand_parallel_increments(engine.clone()).await;
    check_kv_api(run(&engine, KV_API).await.unwrap());
    // The window of a new counter is set once, atomically with its creation.
    let ttl = run(
        &engine,
        "async function main(){ const kv = require('kv'); await kv.incr('w', 1, 0.1); await kv.incr('w', 1, 100); await new Promise(r => setTimeout(r, 200)); return await kv.get('w') }",
    )
    .await
    .unwrap();
    assert_eq!(ttl, Value::Null);
}

#[tokio::test]
async fn embedded_kv_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = engine("", dir.path());
        run(
            &engine,
            "async function main(){ await require('cxKV').set('k', [1, 2]) }",
        )
        .await
        .unwrap();
    }
    let engine = engine("", dir.path());
    let v = run(
        &engine,
        "async function main(){ return await require('kv').get('k') }",
    )
    .await
    .unwrap();
    assert_eq!(v, json!([1, 2]));
    assert!(dir.path().join("callforge.db").exists());
}

#[tokio::test]
async fn unreachable_redis_is_a_clear_script_error() {
    let port = support::free_port();
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(
        &format!("[kv]\nbackend = \"redis://127.0.0.1:{port}/\"\n"),
        dir.path(),
    );
    let started = std::time::Instant::now();
    let e = run(
        &engine,
        "async function main(){ return await require('kv').get('x') }",
    )
    .await
    .unwrap_err();
    assert!(e.contains("cannot connect to redis://127.0.0.1"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
}
