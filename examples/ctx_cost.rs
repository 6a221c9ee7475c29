//! Measures what creating and collecting a QuickJS context costs, per intrinsic set.
//! `valgrind --tool=callgrind target/release/examples/ctx_cost full 1000` gives instructions.
use rquickjs::{context::intrinsic::*, Context, Runtime};
use std::time::Instant;

fn measure<I: rquickjs::context::Intrinsic>(name: &str, n: u32) {
    let rt = Runtime::new().unwrap();
    let t = Instant::now();
    for _ in 0..n {
        let ctx = Context::custom::<I>(&rt).unwrap();
        drop(ctx);
        rt.run_gc();
    }
    println!("{name:20}: {:?}/ctx", t.elapsed() / n);
}

fn main() {
    let set = std::env::args().nth(1).unwrap_or_else(|| "full".into());
    let n = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5000);
    match set.as_str() {
        "base" => measure::<()>("base objects only", n),
        "anchored" => {
            let rt = Runtime::new().unwrap();
            let _anchor = Context::custom::<()>(&rt).unwrap();
            let t = Instant::now();
            for _ in 0..n {
                let ctx = Context::custom::<()>(&rt).unwrap();
                drop(ctx);
                rt.run_gc();
            }
            println!("anchored base       : {:?}/ctx", t.elapsed() / n);
        }
        "full" => measure::<(
            Date,
            RegExpCompiler,
            RegExp,
            Json,
            Proxy,
            MapSet,
            TypedArrays,
            Promise,
            WeakRef,
        )>("run intrinsics", n),
        "no-typed" => measure::<(
            Date,
            RegExpCompiler,
            RegExp,
            Json,
            Proxy,
            MapSet,
            Promise,
            WeakRef,
        )>("no TypedArrays", n),
        "fresh-runtime" => {
            let t = Instant::now();
            for _ in 0..n {
                let rt = Runtime::new().unwrap();
                let ctx = Context::custom::<(
                    Date,
                    RegExpCompiler,
                    RegExp,
                    Json,
                    Proxy,
                    MapSet,
                    Promise,
                    WeakRef,
                )>(&rt)
                .unwrap();
                drop(ctx);
                drop(rt);
            }
            println!("fresh runtime each  : {:?}/ctx", t.elapsed() / n);
        }
        "memory" => {
            let rt = Runtime::new().unwrap();
            let base = rt.memory_usage().malloc_size;
            let ctx = Context::custom::<(
                Date,
                RegExpCompiler,
                RegExp,
                Json,
                Proxy,
                MapSet,
                Promise,
                WeakRef,
            )>(&rt)
            .unwrap();
            let with_ctx = rt.memory_usage().malloc_size;
            println!("runtime alone: {base} B, with a context: {with_ctx} B");
            drop(ctx);
        }
        "lean" => measure::<(Date, RegExpCompiler, RegExp, Json, MapSet, Promise)>("lean", n),
        _ => eprintln!("sets: base full no-typed lean"),
    }
}
