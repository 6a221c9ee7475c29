//! Runs the class4 routing script N times in fresh contexts: a target for callgrind/perf.
//! `cargo build --release --example class4_loop && valgrind --tool=callgrind target/release/examples/class4_loop 500`

use std::sync::Arc;

use callforge::script::{compile, HostModules, Limits, Mode, RunRequest, Sandbox};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let data: serde_json::Value =
        serde_json::from_str(include_str!("../tests/data/five_carriers.json")).expect("json");
    let vars =
        callforge::script::vars::parse(include_str!("../scripts/routing.toml")).expect("toml");
    let data = callforge::script::vars::merge(data, &vars);
    let script =
        Arc::new(compile("routing", include_str!("../scripts/routing.js")).expect("compiles"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let local = tokio::task::LocalSet::new();
    let sandbox = Sandbox::new(Limits::default(), HostModules::new(), "loop".into());
    let started = std::time::Instant::now();
    for _ in 0..n {
        let out = local.block_on(
            &rt,
            sandbox.run(RunRequest {
                script: script.clone(),
                mode: Mode::Class4,
                data: data.clone(),
                function: None,
                ctx: None,
            }),
        );
        assert!(out.result.is_ok());
    }
    println!("{n} runs, {:?} per run", started.elapsed() / n as u32);
}
