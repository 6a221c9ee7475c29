//! Resident memory of N class5 scripts all waiting inside an awaited ctx call: what the
//! script side of a live call costs. `cargo run --release --example js_call_memory 1000`

use std::{sync::Arc, time::Duration};

use callforge::script::{
    compile, Engine, EngineConfig, HostCall, HostMethod, HostObject, Invocation, Mode,
};
use futures::FutureExt;
use serde_json::{json, Value as Json};

struct WaitCtx(tokio::sync::watch::Receiver<bool>);

impl HostObject for WaitCtx {
    fn methods(&self) -> &[HostMethod] {
        const M: &[HostMethod] = &[
            HostMethod::asynchronous("answer"),
            HostMethod::asynchronous("ivr"),
        ];
        M
    }
    fn call(&self, method: &str, _: Vec<Json>) -> HostCall {
        let mut done = self.0.clone();
        match method {
            "answer" => HostCall::Ready(Ok(json!(true))),
            _ => HostCall::Pending(
                async move {
                    let _ = done.wait_for(|d| *d).await;
                    Ok(json!({"status": "success", "value": "5"}))
                }
                .boxed_local(),
            ),
        }
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let engine = Arc::new(
        Engine::start(EngineConfig {
            workers: 2,
            ..EngineConfig::default()
        })
        .unwrap(),
    );
    let script = Arc::new(compile("load_ivr", include_str!("../scripts/load_ivr.js")).unwrap());
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kib();
    let runs: Vec<_> = (0..n)
        .map(|i| {
            let (engine, script, rx) = (engine.clone(), script.clone(), rx.clone());
            tokio::spawn(async move {
                let mut inv = Invocation::new(script, Mode::Class5, json!({"call_id": i}));
                inv.ctx = Some(Box::new(WaitCtx(rx)));
                engine.run(inv).await.map(|o| o.result.is_ok())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = rss_kib();
    println!(
        "{n} waiting class5 scripts: {} KiB per script",
        (during - before) / n as u64
    );
    tx.send(true).unwrap();
    for r in runs {
        let _ = r.await;
    }
}
