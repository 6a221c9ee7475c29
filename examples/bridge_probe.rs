//! Measures the latency callforge's RTP relay adds to each packet of a bridged call, from
//! outside the relay. It runs an in-repo [`caller::Callee`] and places CALLS probe calls
//! through callforge (route NUMBER, `scripts/bridge_to_header.js`: answer, then bridge to the
//! URI in `X-Bridge-To`, here the callee) and CALLS calls straight to the callee over
//! loopback, the baseline. Both legs are PCMU, so the relay copies the payload and only
//! rewrites the header.
//!
//! The calls are paired (one bridged, one direct). For SECONDS every pair sends a 20 ms packet
//! on both calls back to back, the pairs spread evenly over each 20 ms. Each payload carries
//! a packet number; the send time is taken just before the send. The arrival time is the
//! kernel's receive stamp on the callee's socket (`SO_TIMESTAMPNS`, same clock): the moment the
//! packet was queued there, whenever the probe itself next ran. The report gives p50/p99/max
//! of (arrival - send) for both paths, "added" = bridged - direct (of each percentile), the
//! same difference pair by pair, and in how many 100 ms windows the slowest 1% of bridged
//! packets were sent (a few windows: stalls; many: scheduling noise). It also gives "added"
//! with the arrival taken when the probe's task woke up with the packet, as earlier versions
//! measured it: that figure includes the probe's own scheduling delay on a busy machine.
//!
//! `bridge_probe SIP_ADDR NUMBER CALLS SECONDS`

#[path = "../tests/caller/mod.rs"]
mod caller;

use std::{
    net::SocketAddr,
    time::{Duration, Instant, SystemTime},
};

use caller::{AcceptOpts, Call, Callee, Codec};

/// Marks a probe packet's payload (then the packet number, big-endian u32).
const MAGIC: &[u8; 4] = b"CFBP";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let server: SocketAddr = args
        .next()
        .and_then(|a| a.parse().ok())
        .expect("usage: bridge_probe SIP_ADDR NUMBER CALLS SECONDS");
    let number = args.next().unwrap_or_else(|| "probe".into());
    let per_path: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);

    let mut callee = Callee::listen(Codec::Pcmu).await;
    let target = callee.uri("probe");
    // (bridged, direct) pairs: their packets are sent back to back.
    let mut pairs: Vec<(Call, Call)> = Vec::new();
    let mut failed = 0;
    for _ in 0..per_path {
        let mut pair = Vec::new();
        for bridged in [true, false] {
            let (dest, number, header) = if bridged {
                (server, number.clone(), target.clone())
            } else {
                (callee.sip_addr(), "direct".to_string(), String::new())
            };
            let placing = tokio::spawn(async move {
                let headers: Vec<(&str, &str)> = if header.is_empty() {
                    Vec::new()
                } else {
                    vec![("X-Bridge-To", header.as_str())]
                };
                Call::place_with(dest, &number, &headers).await
            });
            let accepted = callee.accept(AcceptOpts::default()).await;
            match (placing.await, accepted) {
                (Ok(Ok(call)), Ok(_)) => pair.push(call),
                (placed, accepted) => {
                    failed += 1;
                    let placed = placed
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map(|_| ()));
                    eprintln!(
                        "{} probe call failed: placing {placed:?}, callee {:?}",
                        if bridged { "bridged" } else { "direct" },
                        accepted.map(|_| ())
                    );
                }
            }
        }
        if let (Some(direct), Some(bridged)) = (pair.pop(), pair.pop()) {
            pairs.push((bridged, direct));
        }
    }
    if pairs.is_empty() {
        println!("bridge_probe: no pair of calls set up ({failed} failed)");
        std::process::exit(1);
    }
    // Let every relay start (callforge moves the caller's media to it after the B leg's ACK):
    // warm-up packets on each bridged call until the callee has one from every call, so a
    // relay still starting under load does not count as relay latency.
    let warmed = warm_up(&pairs, &callee).await;
    if warmed < pairs.len() {
        eprintln!(
            "bridge_probe: only {warmed} of {} bridged calls relayed a warm-up packet within 5 s",
            pairs.len()
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Packet 2j goes through callforge, 2j + 1 straight to the callee, right after it.
    let n = pairs.len();
    let slot = Duration::from_micros(20_000 / n as u64);
    let slots = seconds as usize * 50 * n;
    let mut sent: Vec<Instant> = Vec::with_capacity(2 * slots);
    // The same moments on the clock of the kernel's receive stamps.
    let mut sent_wall: Vec<Duration> = Vec::with_capacity(2 * slots);
    let start = tokio::time::Instant::now();
    for j in 0..slots {
        tokio::time::sleep_until(start + slot * j as u32).await;
        let (k, frame) = (j % n, j / n);
        let (bridged, direct) = &pairs[k];
        for (which, call) in [bridged, direct].into_iter().enumerate() {
            let number = (2 * j + which) as u32;
            let mut pkt = Vec::with_capacity(12 + 160);
            pkt.extend_from_slice(&[0x80, if frame == 0 { 0x80 } else { 0 }]);
            pkt.extend_from_slice(&(frame as u16).to_be_bytes());
            pkt.extend_from_slice(&((frame as u32) * 160).to_be_bytes());
            pkt.extend_from_slice(&(0x5eed_0000 + 2 * k as u32 + which as u32).to_be_bytes());
            pkt.extend_from_slice(MAGIC);
            pkt.extend_from_slice(&number.to_be_bytes());
            pkt.resize(12 + 160, 0xFF); // µ-law silence
            let at = Instant::now();
            let wall = since_epoch();
            let _ = call.rtp_socket().try_send_to(&pkt, call.remote_rtp);
            sent.push(at);
            sent_wall.push(wall);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Latency of each packet in µs (None: lost), from the kernel's stamp and as woken.
    let mut stamped: Vec<Option<f64>> = vec![None; sent.len()];
    let mut woken: Vec<Option<f64>> = vec![None; sent.len()];
    let mut unstamped = 0;
    let mut stepped = 0;
    for p in callee.received.lock().expect("received").iter() {
        if p.payload.len() < 8 || &p.payload[..4] != MAGIC {
            continue;
        }
        let i = u32::from_be_bytes([p.payload[4], p.payload[5], p.payload[6], p.payload[7]]);
        let i = i as usize;
        let (Some(&at), Some(&wall)) = (sent.get(i), sent_wall.get(i)) else {
            continue;
        };
        woken[i] = Some(p.at.saturating_duration_since(at).as_secs_f64() * 1e6);
        match p.kernel_at {
            // A stamp before the send means the wall clock was stepped: not a latency.
            Some(k) if k < wall => stepped += 1,
            Some(k) => stamped[i] = Some((k - wall).as_secs_f64() * 1e6),
            None => unstamped += 1,
        }
    }
    if stepped > 0 {
        eprintln!("bridge_probe: {stepped} packets stamped before their send (the wall clock was stepped?): not counted");
    }
    // Without kernel stamps (an old kernel), fall back to the wake-up times.
    let latency = if unstamped == 0 { &stamped } else { &woken };
    let path = |latency: &[Option<f64>], which: usize| -> Vec<f64> {
        latency
            .iter()
            .skip(which)
            .step_by(2)
            .flatten()
            .copied()
            .collect()
    };
    let paired: Vec<f64> = latency
        .chunks(2)
        .filter_map(|c| Some(c[0]? - c[1]?))
        .collect();
    // Where the slowest 1% of bridged packets were sent: a few 100 ms windows means stalls.
    let mut slow: Vec<(f64, usize)> = latency
        .iter()
        .enumerate()
        .step_by(2)
        .map(|(i, l)| (l.unwrap_or(f64::INFINITY), i))
        .collect();
    slow.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut windows: Vec<u128> = slow
        .iter()
        .take(slow.len().div_ceil(100))
        .map(|&(_, i)| (sent[i] - sent[0]).as_millis() / 100)
        .collect();
    windows.sort_unstable();
    windows.dedup();
    let first_windows: Vec<String> = windows.iter().take(12).map(|w| w.to_string()).collect();

    let byes: Vec<_> = pairs
        .into_iter()
        .flat_map(|(b, d)| [b, d])
        .map(|mut call| tokio::spawn(async move { call.bye().await }))
        .collect();
    for b in byes {
        if !matches!(b.await, Ok(Ok(200))) {
            eprintln!("a probe call's BYE was not answered 200");
        }
    }

    let bridged = Stats::of(path(latency, 0), slots);
    let direct = Stats::of(path(latency, 1), slots);
    let paired = Stats::of(paired, slots);
    let clock = if unstamped == 0 {
        "kernel receive stamps"
    } else {
        "as woken (no kernel stamps)"
    };
    println!("bridge_probe: direct  {direct} ({clock})");
    println!("bridge_probe: bridged {bridged} ({clock})");
    println!("bridge_probe: bridged - direct, pair by pair: {paired}; the slowest 1% of bridged packets were sent in {} of {} 100-ms windows ({}{})",
        windows.len(), seconds * 10, first_windows.join(" "), if windows.len() > 12 { " ..." } else { "" });
    let woken_added = match (
        Stats::of(path(&woken, 0), slots).pct,
        Stats::of(path(&woken, 1), slots).pct,
    ) {
        (Some(b), Some(d)) => format!("p50 {:.0} us, p99 {:.0} us", b.0 - d.0, b.1 - d.1),
        _ => "no packets".into(),
    };
    match (bridged.pct, direct.pct) {
        (Some(b), Some(d)) => println!(
            "bridge_probe: added by callforge: p50 {:.0} us, p99 {:.0} us from {clock}; as the probe woke: {woken_added} ({n} bridged + {n} direct calls, {failed} failed, {seconds} s)",
            b.0 - d.0,
            b.1 - d.1,
        ),
        _ => {
            println!("bridge_probe: no packets arrived on a path ({failed} calls failed)");
            std::process::exit(1);
        }
    }
    if failed > 0 {
        std::process::exit(1);
    }
}

/// Now on the clock of `SO_TIMESTAMPNS` (time since the Unix epoch).
fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

/// Number of the warm-up packet of bridged call `k` (beyond any measured packet's number).
fn warm_up_number(k: usize) -> u32 {
    0xFFFF_0000 + k as u32
}

/// Sends a warm-up packet every 20 ms on each bridged call whose relay has not yet passed
/// one to the callee, for up to 5 s; returns how many calls passed one.
async fn warm_up(pairs: &[(Call, Call)], callee: &Callee) -> usize {
    let mut done = vec![false; pairs.len()];
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until && done.iter().any(|d| !d) {
        for (k, (bridged, _)) in pairs.iter().enumerate().filter(|(k, _)| !done[*k]) {
            let mut pkt = vec![0x80, 0, 0, 0, 0, 0, 0, 0];
            pkt.extend_from_slice(&(0x5eed_0000 + 2 * k as u32).to_be_bytes());
            pkt.extend_from_slice(MAGIC);
            pkt.extend_from_slice(&warm_up_number(k).to_be_bytes());
            pkt.resize(12 + 160, 0xFF);
            let _ = bridged.rtp_socket().try_send_to(&pkt, bridged.remote_rtp);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        for p in callee.received.lock().expect("received").iter() {
            if p.payload.len() >= 8 && &p.payload[..4] == MAGIC {
                let i =
                    u32::from_be_bytes([p.payload[4], p.payload[5], p.payload[6], p.payload[7]]);
                if let Some(k) = i.checked_sub(warm_up_number(0)) {
                    if let Some(d) = done.get_mut(k as usize) {
                        *d = true;
                    }
                }
            }
        }
    }
    done.iter().filter(|d| **d).count()
}

struct Stats {
    received: usize,
    sent: usize,
    /// p50, p99, max in µs.
    pct: Option<(f64, f64, f64)>,
}

impl Stats {
    fn of(mut us: Vec<f64>, sent: usize) -> Stats {
        us.sort_by(|a, b| a.total_cmp(b));
        let pct = (!us.is_empty()).then(|| {
            let at = |p: f64| us[((us.len() - 1) as f64 * p).round() as usize];
            (at(0.5), at(0.99), us[us.len() - 1])
        });
        Stats {
            received: us.len(),
            sent,
            pct,
        }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of {} packets", self.received, self.sent)?;
        if let Some((p50, p99, max)) = self.pct {
            write!(f, ": p50 {p50:.0} us, p99 {p99:.0} us, max {max:.0} us")?;
        }
        Ok(())
    }
}
