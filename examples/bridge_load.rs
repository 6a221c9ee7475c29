//! Load for callforge's RTP relay from ordinary UDP sockets: CALLS bridged calls, RTP both
//! ways on every leg, no raw sockets. (SIPp's `play_pcap_audio` opens a raw socket per
//! playing call, and the kernel then checks every loopback datagram against each of them:
//! with 500 calls that tax, not the relay, dominated the measurement.)
//!
//! It runs an in-repo [`caller::Callee`] as the far end and places CALLS calls through
//! callforge (route NUMBER, `scripts/bridge_to_header.js`: answer, then bridge to the URI in
//! `X-Bridge-To`, here the callee), one after another; both legs are PCMU. For each answered
//! call it binds two plain UDP sockets, one playing the caller and one the far end, and
//! sends a 20 ms (PTIME) PCMU packet from each to callforge's port for that leg: the caller
//! side to the port in callforge's 200 OK, the far end to the port in callforge's INVITE.
//! Callforge latches each leg onto the socket its packets come from (symmetric RTP), so the
//! relayed packets come back to these sockets, which count them. Sends are spread evenly
//! over each PTIME in 1 ms steps, as independent phones would be.
//!
//! Once every call is up it prints `bridge_load: N calls up` (the harness starts its probe
//! then), keeps all calls up for SECONDS, and hangs them up at 200 calls/s. Each packet carries its send
//! time, so it also reports the one-way latency of every packet relayed during the hold,
//! sender to receiver through callforge (this includes the generator's own scheduling;
//! `examples/bridge_probe` subtracts the direct path).
//!
//! `bridge_load SIP_ADDR NUMBER CALLS SECONDS [PTIME_MS]`

#[path = "../tests/caller/mod.rs"]
mod caller;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use caller::{AcceptOpts, Call, Callee, Codec};
use tokio::net::UdpSocket;

/// Marks a load packet's payload (then the send time in ns since the start, big-endian u64).
const MAGIC: &[u8; 4] = b"CFBL";
/// Latency histogram: 10 µs buckets up to 100 ms (the last bucket holds everything later).
const BUCKET_US: u64 = 10;
const BUCKETS: usize = 10_000;

/// One generated RTP stream: a socket and where callforge expects that leg's packets.
struct Stream {
    sock: Arc<UdpSocket>,
    dest: SocketAddr,
    ssrc: u32,
    seq: u16,
    ts: u32,
}

/// What the receiving sockets count, per direction (0: toward the far end, 1: toward the
/// caller).
struct Counters {
    sent: [AtomicU64; 2],
    received: [AtomicU64; 2],
    /// Only packets received during the hold go into the histogram.
    measuring: AtomicBool,
    latency: Vec<AtomicU64>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let server: SocketAddr = args
        .next()
        .and_then(|a| a.parse().ok())
        .expect("usage: bridge_load SIP_ADDR NUMBER CALLS SECONDS [PTIME_MS]");
    let number = args.next().unwrap_or_else(|| "load".into());
    let calls: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(30);
    let ptime: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);

    let start = Instant::now();
    let counters = Arc::new(Counters {
        sent: Default::default(),
        received: Default::default(),
        measuring: AtomicBool::new(false),
        latency: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
    });
    let (streams_tx, streams_rx) = tokio::sync::mpsc::unbounded_channel::<Stream>();
    let sender = tokio::spawn(send_loop(
        streams_rx,
        Duration::from_millis(ptime),
        start,
        counters.clone(),
    ));

    let mut callee = Callee::listen(Codec::Pcmu).await;
    let target = callee.uri("load");
    let mut placed: Vec<Call> = Vec::with_capacity(calls);
    let (mut up, mut failed) = (0usize, 0usize);
    let setup = Instant::now();
    for i in 0..calls {
        let (number, header) = (number.clone(), target.clone());
        let placing = tokio::spawn(async move {
            Call::place_with(server, &number, &[("X-Bridge-To", header.as_str())]).await
        });
        let accepted = callee.accept(AcceptOpts::default()).await;
        let (call, invite) = match (placing.await, accepted) {
            (Ok(Ok(call)), Ok(invite)) => (call, invite),
            (placed, accepted) => {
                failed += 1;
                let placed = placed
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map(|_| ()));
                eprintln!(
                    "bridge_load: call {i} failed: placing {placed:?}, far end {:?}",
                    accepted.map(|_| ())
                );
                continue;
            }
        };
        let Some(b_leg) = invite.offer.as_ref().and_then(|o| o.rtp) else {
            failed += 1;
            eprintln!("bridge_load: call {i}: callforge's INVITE had no RTP address");
            placed.push(call);
            continue;
        };
        for (dir, dest) in [(0usize, call.remote_rtp), (1, b_leg)] {
            let sock = match UdpSocket::bind("127.0.0.1:0").await {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    eprintln!("bridge_load: no socket: {e}");
                    std::process::exit(1);
                }
            };
            // A socket sending toward the far end (dir 0) receives toward the caller (1).
            tokio::spawn(receive_loop(sock.clone(), 1 - dir, start, counters.clone()));
            let _ = streams_tx.send(Stream {
                sock,
                dest,
                ssrc: fastrand::u32(..),
                seq: fastrand::u16(..),
                ts: fastrand::u32(..),
            });
        }
        placed.push(call);
        up += 1;
    }
    println!(
        "bridge_load: {up} calls up ({failed} failed) in {:.1} s",
        setup.elapsed().as_secs_f64()
    );
    // Packets already in flight when the hold starts belong to the ramp.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let snapshot = |c: &Counters| {
        [0, 1].map(|d| {
            (
                c.sent[d].load(Ordering::Relaxed),
                c.received[d].load(Ordering::Relaxed),
            )
        })
    };
    let before = snapshot(&counters);
    counters.measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    counters.measuring.store(false, Ordering::Relaxed);
    // Let the last packets of the hold arrive before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = snapshot(&counters);
    sender.abort();

    // Hang up at 200 calls/s, as calls end on a live system (the test caller sends its BYE
    // once, without retransmissions, so a burst of 500 would lose some in socket buffers).
    let mut byes = Vec::with_capacity(placed.len());
    for mut call in placed {
        byes.push(tokio::spawn(async move { call.bye().await }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut bye_failed = 0;
    for b in byes {
        let answer = b.await;
        if !matches!(answer, Ok(Ok(200))) {
            if bye_failed < 5 {
                eprintln!("bridge_load: a BYE was answered {answer:?}");
            }
            bye_failed += 1;
        }
    }

    for (d, name) in [(0, "caller->far end"), (1, "far end->caller")] {
        let sent = after[d].0 - before[d].0;
        let got = after[d].1 - before[d].1;
        println!(
            "bridge_load: {name}: {sent} packets sent during the hold, {got} relayed back ({:.3}% missing)",
            100.0 * sent.saturating_sub(got) as f64 / sent.max(1) as f64
        );
    }
    let hist: Vec<u64> = counters
        .latency
        .iter()
        .map(|b| b.load(Ordering::Relaxed))
        .collect();
    let total: u64 = hist.iter().sum();
    let pct = |p: f64| {
        let want = (total as f64 * p).ceil() as u64;
        let mut seen = 0;
        for (i, n) in hist.iter().enumerate() {
            seen += n;
            if seen >= want.max(1) {
                return (i as u64 + 1) * BUCKET_US;
            }
        }
        BUCKETS as u64 * BUCKET_US
    };
    println!(
        "bridge_load: one-way latency through callforge, all {total} packets of the hold: p50 <= {} us, p99 <= {} us, p99.9 <= {} us",
        pct(0.5),
        pct(0.99),
        pct(0.999)
    );
    println!("bridge_load: {up} calls, {failed} failed, {bye_failed} BYEs not answered 200");
    if failed > 0 || bye_failed > 0 {
        std::process::exit(1);
    }
}

/// Sends one packet per stream per `ptime`, the streams spread over it in 1 ms steps.
async fn send_loop(
    mut new: tokio::sync::mpsc::UnboundedReceiver<Stream>,
    ptime: Duration,
    start: Instant,
    counters: Arc<Counters>,
) {
    let steps = ptime.as_millis().max(1) as usize;
    let samples = (ptime.as_millis() as u32) * 8;
    let mut streams: Vec<Stream> = Vec::new();
    let mut dirs: Vec<usize> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    // A generator that was not scheduled for a while skips the packets it missed rather than
    // sending them all at once: 1,000 independent phones do not burst together, and a burst
    // of 20 ms of packets would queue the probe's packets behind it in the relay.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut pkt = vec![0xFFu8; 12 + samples as usize];
    pkt[0] = 0x80;
    pkt[12..16].copy_from_slice(MAGIC);
    for step in (0..steps).cycle() {
        tick.tick().await;
        while let Ok(s) = new.try_recv() {
            // Streams come in pairs: caller side (toward the far end), then far end.
            dirs.push(streams.len() % 2);
            streams.push(s);
        }
        for (i, s) in streams.iter_mut().enumerate().skip(step).step_by(steps) {
            pkt[1] = 0; // PCMU, no marker
            pkt[2..4].copy_from_slice(&s.seq.to_be_bytes());
            pkt[4..8].copy_from_slice(&s.ts.to_be_bytes());
            pkt[8..12].copy_from_slice(&s.ssrc.to_be_bytes());
            let at = start.elapsed().as_nanos() as u64;
            pkt[16..24].copy_from_slice(&at.to_be_bytes());
            if s.sock.try_send_to(&pkt, s.dest).is_ok() {
                counters.sent[dirs[i]].fetch_add(1, Ordering::Relaxed);
            }
            s.seq = s.seq.wrapping_add(1);
            s.ts = s.ts.wrapping_add(samples);
        }
    }
}

/// Counts the packets relayed to one socket, and their latency during the hold.
async fn receive_loop(sock: Arc<UdpSocket>, dir: usize, start: Instant, counters: Arc<Counters>) {
    let mut buf = [0u8; 2048];
    while let Ok(n) = sock.recv(&mut buf).await {
        let now = start.elapsed().as_nanos() as u64;
        let p = &buf[..n];
        if n < 24 || &p[12..16] != MAGIC {
            continue;
        }
        counters.received[dir].fetch_add(1, Ordering::Relaxed);
        if counters.measuring.load(Ordering::Relaxed) {
            let sent = u64::from_be_bytes(p[16..24].try_into().unwrap_or_default());
            let us = now.saturating_sub(sent) / 1000;
            let bucket = ((us / BUCKET_US) as usize).min(BUCKETS - 1);
            counters.latency[bucket].fetch_add(1, Ordering::Relaxed);
        }
    }
}
