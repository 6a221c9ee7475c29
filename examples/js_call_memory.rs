//! Resident memory of N class5 scripts all waiting inside an awaited ctx call: what the
//! script side of a live call costs. `cargo run --release --example js_call_memory 1000 [ctx]`:
//! with `ctx`, the host object has every method of a call's ctx and its prelude, as a real call.

use std::{sync::Arc, time::Duration};

use callforge::script::{
    compile, CompiledScript, Engine, EngineConfig, HostCall, HostMethod, HostObject, Invocation,
    JsMethods, Mode,
};
use futures::FutureExt;
use serde_json::{json, Value as Json};

struct WaitCtx {
    done: tokio::sync::watch::Receiver<bool>,
    real: bool,
}

impl HostObject for WaitCtx {
    fn methods(&self) -> &[HostMethod] {
        const M: &[HostMethod] = &[
            HostMethod::asynchronous("answer"),
            HostMethod::asynchronous("ivr"),
        ];
        if self.real {
            callforge::voice::ctx::all_methods()
        } else {
            M
        }
    }
    fn js_methods(&self) -> Option<JsMethods> {
        static PRELUDE: std::sync::OnceLock<Arc<CompiledScript>> = std::sync::OnceLock::new();
        self.real.then(|| JsMethods {
            names: callforge::voice::media_bind::JS_METHODS,
            source: PRELUDE
                .get_or_init(|| {
                    Arc::new(compile("prelude", callforge::voice::media_bind::CTX_PRELUDE).unwrap())
                })
                .clone(),
        })
    }
    fn call(&self, method: &str, _: Vec<Json>) -> HostCall {
        let mut done = self.done.clone();
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
    let real = std::env::args().nth(2).as_deref() == Some("ctx");
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
                inv.ctx = Some(Box::new(WaitCtx { done: rx, real }));
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
