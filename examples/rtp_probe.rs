//! Places probe calls (with the in-repo test caller) to a running callforge and reports the
//! pacing of the RTP it sends: mean and p99 of inter-packet intervals. Run it beside a SIPp
//! load to see pacing under load (`tests/load/sipp_ivr.sh` does).
//!
//! Intervals are taken from the kernel's receive stamps (`SO_TIMESTAMPNS`): on loopback they
//! are the moments callforge sent, unaffected by when the probe itself gets the CPU. The
//! intervals as the probe woke up are reported too (`as woken`).
//!
//! `rtp_probe SIP_ADDR NUMBER CALLS SECONDS`

#[path = "../tests/caller/mod.rs"]
mod caller;

use std::{net::SocketAddr, time::Duration};

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let server: SocketAddr = args
        .next()
        .and_then(|a| a.parse().ok())
        .expect("usage: rtp_probe SIP_ADDR NUMBER CALLS SECONDS");
    let number = args.next().unwrap_or_else(|| "probe".into());
    let calls: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let tasks: Vec<_> = (0..calls)
        .map(|_| {
            let number = number.clone();
            tokio::spawn(async move {
                let mut call = caller::Call::place(server, &number).await?;
                tokio::time::sleep(Duration::from_secs(seconds)).await;
                let packets = call.audio_packets();
                let _ = call.bye().await;
                Ok::<_, String>(packets)
            })
        })
        .collect();
    let mut gaps: Vec<f64> = Vec::new();
    let mut woken: Vec<f64> = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match t.await {
            Ok(Ok(packets)) => {
                woken.extend(
                    packets
                        .windows(2)
                        .map(|w| (w[1].at - w[0].at).as_secs_f64() * 1000.0),
                );
                gaps.extend(packets.windows(2).filter_map(|w| {
                    let (a, b) = (w[0].kernel_at?, w[1].kernel_at?);
                    Some(b.saturating_sub(a).as_secs_f64() * 1000.0)
                }));
            }
            Ok(Err(e)) => {
                failed += 1;
                eprintln!("probe call failed: {e}");
            }
            Err(e) => {
                failed += 1;
                eprintln!("probe task failed: {e}");
            }
        }
    }
    if woken.is_empty() {
        println!("probe: no RTP received ({failed} calls failed)");
        std::process::exit(1);
    }
    let (source, gaps) = if gaps.len() + 1 >= woken.len() {
        ("kernel receive stamps", gaps)
    } else {
        ("as woken (no kernel stamps)", woken.clone())
    };
    let (gaps, woken) = (sorted(gaps), sorted(woken));
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    println!(
        "probe: {} intervals from {} calls ({failed} failed), {source}: mean {mean:.2} ms, p1 {:.2} ms, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; as woken: p99 {:.2} ms, max {:.2} ms",
        gaps.len(),
        calls - failed,
        pct(&gaps, 0.01),
        pct(&gaps, 0.5),
        pct(&gaps, 0.99),
        gaps[gaps.len() - 1],
        pct(&woken, 0.99),
        woken[woken.len() - 1],
    );
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// The `p` quantile of sorted, non-empty `v`.
fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() - 1) as f64 * p) as usize]
}
