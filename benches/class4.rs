//! One class4 execution of the realistic routing script in a fresh context, and the same
//! through the engine's worker pool; then per-run percentiles (criterion reports no p99).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use callforge::script::{
    compile, Engine, EngineConfig, HostModules, Invocation, Limits, Mode, RunRequest, Sandbox,
};
use criterion::{criterion_group, Criterion};
use serde_json::Value;

fn routing_input() -> Value {
    let data: Value = serde_json::from_str(include_str!("../tests/data/five_carriers.json"))
        .expect("fixture is JSON");
    let vars = callforge::script::vars::parse(include_str!("../scripts/routing.toml"))
        .expect("vars are TOML");
    callforge::script::vars::merge(data, &vars)
}

fn routing_script() -> Arc<callforge::script::CompiledScript> {
    Arc::new(compile("routing", include_str!("../scripts/routing.js")).expect("compiles"))
}

fn local_runtime() -> (tokio::runtime::Runtime, tokio::task::LocalSet) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    (rt, tokio::task::LocalSet::new())
}

/// One run; returns the time the caller waited (the spent context is recycled afterwards,
/// as the worker pool does after answering) and the time including recycling.
fn sandbox_run(
    rt: &tokio::runtime::Runtime,
    local: &tokio::task::LocalSet,
    sandbox: &Sandbox,
    script: &Arc<callforge::script::CompiledScript>,
    data: &Value,
) -> (Duration, Duration) {
    let started = Instant::now();
    let (out, spent) = local.block_on(
        rt,
        sandbox.run_unrecycled(RunRequest {
            script: script.clone(),
            mode: Mode::Class4,
            data: data.clone(),
            function: None,
            ctx: None,
        }),
    );
    let answered = started.elapsed();
    assert!(out.result.is_ok(), "{:?}", out.result);
    sandbox.recycle(spent);
    (answered, started.elapsed())
}

fn bench_class4(c: &mut Criterion) {
    let script = routing_script();
    let data = routing_input();
    let (rt, local) = local_runtime();
    let sandbox = Sandbox::new(Limits::default(), HostModules::new(), "bench".into());
    sandbox.prewarm();
    c.bench_function("class4_fresh_context", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| sandbox_run(&rt, &local, &sandbox, &script, &data).0)
                .sum()
        })
    });
    c.bench_function("class4_fresh_context_with_recycling", |b| {
        b.iter(|| sandbox_run(&rt, &local, &sandbox, &script, &data))
    });

    let engine = Engine::start(EngineConfig {
        workers: 1,
        ..EngineConfig::default()
    })
    .expect("engine");
    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    c.bench_function("class4_via_engine_pool", |b| {
        b.iter(|| {
            let out = mt
                .block_on(engine.run(Invocation::new(script.clone(), Mode::Class4, data.clone())))
                .expect("engine runs");
            assert!(out.result.is_ok());
        })
    });
}

/// Median and p99 of single runs, measured one by one.
fn percentiles() {
    let script = routing_script();
    let data = routing_input();
    let (rt, local) = local_runtime();
    let sandbox = Sandbox::new(Limits::default(), HostModules::new(), "bench".into());
    sandbox.prewarm();
    for _ in 0..2_000 {
        sandbox_run(&rt, &local, &sandbox, &script, &data);
    }
    let (mut answered, mut total): (Vec<Duration>, Vec<Duration>) = (0..20_000)
        .map(|_| sandbox_run(&rt, &local, &sandbox, &script, &data))
        .unzip();
    for (name, samples) in [("answered", &mut answered), ("with recycling", &mut total)] {
        samples.sort();
        let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize];
        println!(
            "class4_fresh_context {name}: {} runs, p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
            samples.len(),
            pct(0.50),
            pct(0.90),
            pct(0.99),
            samples[samples.len() - 1]
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(5));
    targets = bench_class4
}

fn main() {
    benches();
    // `cargo test --all-targets` runs benches once as a smoke test; percentiles only for real.
    if std::env::args().any(|a| a == "--bench") {
        percentiles();
    }
    Criterion::default().configure_from_args().final_summary();
}
