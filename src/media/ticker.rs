//! One RTP sender for every call's outgoing stream: a thread per core wakes once per 20 ms
//! tick and sends the due frame of each of its calls in one pass, instead of one timer and one
//! task wake-up per call per frame.
//!
//! A call's [`MediaSession`] lives in a [`TickedMedia`], shared by the call's media task
//! (commands, received datagrams, events) and one ticker thread (the send side and the
//! session's timers). When a call joins, its frame clock is moved onto its thread's tick grid
//! (by less than one frame, once), so every tick finds exactly one frame due per call and the
//! intervals a caller sees are the intervals between ticks. A thread that wakes late sends
//! the frames it owes in a burst, as the session's clock always did.
//!
//! Sends cannot be batched into one `sendmmsg`: every call's frames leave from the call's own
//! socket (its SDP port), and `sendmmsg` sends on one socket. What is batched is the waking:
//! 2,000 calls cost 50 thread wake-ups a second per thread instead of 100,000 task wake-ups
//! and timer-wheel entries.
//!
//! The threads ask for real-time priority (see [`Ticker::global`]): pacing suffers from a
//! late wake-up, not from lack of CPU.
//!
//! Leaving is safe at any moment: the session and the sending socket are taken out of the
//! shared slot under its lock, so once [`TickedMedia::leave`] returns no tick touches them; the
//! thread drops the emptied member on its next pass.

use std::{
    io,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, OnceLock,
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

use crate::{
    media::{relay_threads, rtp::FRAME, session::MediaSession, RelayPriority},
    udp::ReadWatchedUdp,
};

/// What a ticker thread and the call's media task share.
struct Slot {
    session: Option<MediaSession>,
    socket: Option<Arc<ReadWatchedUdp>>,
}

/// A call's media session while it is ticked: its media task locks it to feed datagrams and
/// commands; its ticker thread locks it once per tick to send.
pub struct TickedMedia {
    slot: Mutex<Slot>,
    /// Woken by the ticker when a tick left events (a prompt finished, DTMF sent, a gap given
    /// up on) for the media task.
    wake: Notify,
}

impl std::fmt::Debug for TickedMedia {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TickedMedia")
            .field("attached", &self.lock().session.is_some())
            .finish()
    }
}

impl TickedMedia {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the session; `None` once the call has left.
    pub fn with<R>(&self, f: impl FnOnce(&mut MediaSession) -> R) -> Option<R> {
        self.lock().session.as_mut().map(f)
    }

    /// Resolves when a tick has left events for the media task (a permit is kept when
    /// nobody waits, so a wake-up between two waits is not lost).
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// Takes the session out of the ticker; no tick sends for it after this returns.
    pub fn leave(&self) -> Option<MediaSession> {
        let mut slot = self.lock();
        slot.socket = None;
        slot.session.take()
    }

    /// One tick for this call: send what is due at `now`. `false` once the call has left.
    fn tick(&self, now: Instant) -> TickOutcome {
        let mut slot = self.lock();
        let Slot {
            session: Some(session),
            socket: Some(socket),
        } = &mut *slot
        else {
            return TickOutcome::Left;
        };
        let mut sent = 0;
        while let Some(t) = session.poll_transmit(now) {
            match socket.send_to(&t.data, t.dest) {
                Ok(_) => sent += 1,
                Err(e) => tracing::debug!(dest = %t.dest, error = %e, "RTP packet dropped"),
            }
        }
        let wake = session.has_events();
        drop(slot);
        if wake {
            self.wake.notify_one();
        }
        TickOutcome::Ticked { sent }
    }
}

enum TickOutcome {
    Left,
    Ticked { sent: usize },
}

/// The calls of one ticker thread.
struct Lane {
    /// Calls that joined since the thread's last pass.
    joining: Mutex<Vec<Arc<TickedMedia>>>,
    /// Calls on this lane (joined and not yet dropped by a pass).
    members: AtomicUsize,
    /// This lane's ticks are `offset` after the grid's, so the threads' passes interleave.
    offset: Duration,
}

impl Lane {
    fn new(offset: Duration) -> Self {
        Lane {
            joining: Mutex::new(Vec::new()),
            members: AtomicUsize::new(0),
            offset,
        }
    }

    /// The instant of tick `k` on a grid starting at `epoch`.
    fn tick_at(&self, epoch: Instant, k: u64) -> Instant {
        epoch + self.offset + FRAME * u32::try_from(k).unwrap_or(u32::MAX)
    }

    /// The index of the first tick at or after `t`.
    fn first_tick_from(&self, epoch: Instant, t: Instant) -> u64 {
        let since = t.saturating_duration_since(epoch + self.offset);
        let frame = FRAME.as_nanos();
        since.as_nanos().div_ceil(frame) as u64
    }

    /// Sends every member's due frames at `now`, after taking in the calls that joined;
    /// members that left are dropped. Returns the packets sent.
    fn pass(&self, members: &mut Vec<Arc<TickedMedia>>, now: Instant) -> usize {
        {
            let mut joining = self.joining.lock().unwrap_or_else(|p| p.into_inner());
            members.append(&mut joining);
        }
        let mut sent = 0;
        members.retain(|m| match m.tick(now) {
            TickOutcome::Ticked { sent: n } => {
                sent += n;
                true
            }
            TickOutcome::Left => {
                self.members.fetch_sub(1, Ordering::Relaxed);
                false
            }
        });
        sent
    }
}

/// The ticker threads. Calls join the thread with the fewest calls.
pub struct Ticker {
    lanes: Vec<Arc<Lane>>,
    epoch: Instant,
}

impl std::fmt::Debug for Ticker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticker")
            .field("threads", &self.lanes.len())
            .field("calls", &self.calls())
            .finish()
    }
}

impl Ticker {
    /// Starts `threads` ticker threads (at least one) asking for `priority`.
    pub fn start(threads: usize, priority: RelayPriority) -> io::Result<Self> {
        let ticker = Self::unstarted(threads);
        for (i, lane) in ticker.lanes.iter().enumerate() {
            let lane = lane.clone();
            let epoch = ticker.epoch;
            std::thread::Builder::new()
                .name(format!("cf-rtp-tick-{i}"))
                .spawn(move || {
                    relay_threads::raise_priority(priority, "RTP ticker threads");
                    run_lane(&lane, epoch)
                })?;
        }
        Ok(ticker)
    }

    /// The lanes without their threads (tests drive passes by hand).
    fn unstarted(threads: usize) -> Self {
        let n = threads.max(1);
        let lanes = (0..n)
            .map(|i| Arc::new(Lane::new(FRAME * i as u32 / n as u32)))
            .collect();
        Ticker {
            lanes,
            epoch: Instant::now(),
        }
    }

    /// The process's ticker: one thread per core (at most 4), started on first use, at
    /// SCHED_FIFO priority 10 where permitted (else nice -10, else normal). A pass is bounded
    /// work (a few microseconds per call every 20 ms), and under CPU contention it is the
    /// wake-up delay that costs pacing: with 1,000 IVR calls and SIPp on the same 2 cores the
    /// largest interval a probe saw was 23.3 ms with FIFO and 38.9 ms at nice -10. The
    /// kernel's real-time throttling still leaves other threads their share.
    pub fn global() -> &'static Ticker {
        static GLOBAL: OnceLock<Ticker> = OnceLock::new();
        GLOBAL.get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            Ticker::start(cores.min(4), RelayPriority::Realtime).unwrap_or_else(|e| {
                // Without threads nothing would send; this is as fatal as a failed spawn.
                panic!("the RTP ticker threads could not be started: {e}")
            })
        })
    }

    /// Calls currently ticked.
    pub fn calls(&self) -> usize {
        self.lanes
            .iter()
            .map(|l| l.members.load(Ordering::Relaxed))
            .sum()
    }

    /// Hands a call's session to the ticker; `socket` is the call's RTP socket, which frames
    /// leave from. The session's next frame moves onto the lane's next tick.
    pub fn join(&self, socket: Arc<ReadWatchedUdp>, mut session: MediaSession) -> Arc<TickedMedia> {
        let lane = self
            .lanes
            .iter()
            .min_by_key(|l| l.members.load(Ordering::Relaxed))
            .expect("a ticker has at least one lane");
        let from = session.next_frame_due().max(Instant::now());
        session.align_clock(lane.tick_at(self.epoch, lane.first_tick_from(self.epoch, from)));
        let member = Arc::new(TickedMedia {
            slot: Mutex::new(Slot {
                session: Some(session),
                socket: Some(socket),
            }),
            wake: Notify::new(),
        });
        lane.members.fetch_add(1, Ordering::Relaxed);
        lane.joining
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(member.clone());
        member
    }
}

/// A ticker thread: sleep to the next tick of the lane's grid, send, repeat.
fn run_lane(lane: &Lane, epoch: Instant) -> ! {
    let mut members = Vec::new();
    let mut k = lane.first_tick_from(epoch, Instant::now());
    loop {
        let at = lane.tick_at(epoch, k);
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        let now = Instant::now();
        lane.pass(&mut members, now);
        // The next tick after this pass; ticks missed while late are not replayed one by
        // one: the sessions' clocks already sent what they owed.
        k = (k + 1).max(lane.first_tick_from(epoch, now + Duration::from_nanos(1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UdpSocket;

    use crate::media::{
        g711::G711,
        rtp::RtpPacket,
        session::{MediaEvent, SessionConfig},
    };

    async fn socket_pair() -> (Arc<ReadWatchedUdp>, UdpSocket) {
        let ours = ReadWatchedUdp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        (Arc::new(ours), peer)
    }

    fn session_to(peer: &UdpSocket, now: Instant) -> MediaSession {
        MediaSession::new(
            SessionConfig::new(peer.local_addr().unwrap(), G711::Pcmu),
            now,
        )
    }

    /// Every packet waiting on `peer`.
    fn received(peer: &UdpSocket) -> Vec<RtpPacket> {
        let mut buf = [0u8; 2048];
        let mut got = Vec::new();
        while let Ok((n, _)) = peer.try_recv_from(&mut buf) {
            got.push(RtpPacket::parse(&buf[..n]).unwrap());
        }
        got
    }

    /// Lets loopback datagrams land.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    #[test]
    fn ticks_lie_on_the_lane_grid() {
        let lane = Lane::new(Duration::from_millis(10));
        let epoch = Instant::now();
        assert_eq!(lane.tick_at(epoch, 0), epoch + Duration::from_millis(10));
        assert_eq!(lane.tick_at(epoch, 3), epoch + Duration::from_millis(70));
        assert_eq!(lane.first_tick_from(epoch, epoch), 0);
        assert_eq!(
            lane.first_tick_from(epoch, epoch + Duration::from_millis(10)),
            0
        );
        assert_eq!(
            lane.first_tick_from(epoch, epoch + Duration::from_millis(11)),
            1
        );
        assert_eq!(
            lane.first_tick_from(epoch, epoch + Duration::from_millis(70)),
            3
        );
    }

    #[tokio::test]
    async fn each_tick_sends_one_frame_per_call_in_sequence() {
        let ticker = Ticker::unstarted(1);
        let lane = ticker.lanes[0].clone();
        let mut calls = Vec::new();
        for _ in 0..3 {
            let (ours, peer) = socket_pair().await;
            // Sessions start off the grid; joining moves them onto it.
            let started = Instant::now() + Duration::from_millis(7);
            let member = ticker.join(ours, session_to(&peer, started));
            calls.push((member, peer));
        }
        assert_eq!(ticker.calls(), 3);
        let first = lane.first_tick_from(ticker.epoch, Instant::now() + FRAME);
        let mut members = Vec::new();
        // The first pass also sends what the sessions owe since they started.
        assert!(lane.pass(&mut members, lane.tick_at(ticker.epoch, first)) >= 3);
        for k in first + 1..first + 50 {
            let at = lane.tick_at(ticker.epoch, k);
            // One tick, even when the pass runs a little after the tick's instant.
            let sent = lane.pass(&mut members, at + Duration::from_micros(k % 7 * 900));
            assert_eq!(sent, 3, "tick {k}: one frame per call");
        }
        settle().await;
        for (_, peer) in &calls {
            let got = received(peer);
            // Frames owed from the session's start up to the first pass come in one burst.
            assert!(got.len() >= 50, "{}", got.len());
            let p0 = &got[0];
            for (i, p) in got.iter().enumerate() {
                assert_eq!(p.seq, p0.seq.wrapping_add(i as u16), "sequence continuity");
                assert_eq!(
                    p.timestamp,
                    p0.timestamp.wrapping_add(160 * i as u32),
                    "timestamp continuity"
                );
                assert_eq!(p.ssrc, p0.ssrc);
            }
        }
    }

    #[tokio::test]
    async fn a_call_that_leaves_between_ticks_is_dropped_and_not_sent_for() {
        let ticker = Ticker::unstarted(1);
        let lane = ticker.lanes[0].clone();
        let (a_sock, a_peer) = socket_pair().await;
        let (b_sock, b_peer) = socket_pair().await;
        let now = Instant::now();
        let a = ticker.join(a_sock, session_to(&a_peer, now));
        let b = ticker.join(b_sock, session_to(&b_peer, now));
        let k = lane.first_tick_from(ticker.epoch, Instant::now() + FRAME);
        let mut members = Vec::new();
        lane.pass(&mut members, lane.tick_at(ticker.epoch, k));
        settle().await;
        let a_before = received(&a_peer).len();
        assert!(a_before >= 1);
        // The call ends mid-tick: its task takes the session back.
        let session = a.leave().expect("the session comes back");
        assert!(a.leave().is_none(), "only once");
        assert!(a.with(|s| s.ssrc()).is_none());
        let sent = lane.pass(&mut members, lane.tick_at(ticker.epoch, k + 1));
        assert_eq!(sent, 1, "only the call still there");
        assert_eq!(members.len(), 1, "the emptied member is dropped");
        assert_eq!(ticker.calls(), 1);
        settle().await;
        assert!(received(&a_peer).is_empty(), "nothing after leaving");
        assert!(!received(&b_peer).is_empty());
        // The session it got back continues where the ticker left it.
        assert!(session.stats().sent as usize >= a_before);
        drop(b);
    }

    #[tokio::test]
    async fn a_finished_prompt_wakes_the_media_task() {
        let ticker = Ticker::unstarted(1);
        let lane = ticker.lanes[0].clone();
        let (sock, peer) = socket_pair().await;
        let member = ticker.join(sock, session_to(&peer, Instant::now()));
        let id = member
            .with(|s| s.play(vec![500i16; 160].into(), false))
            .unwrap();
        let k = lane.first_tick_from(ticker.epoch, Instant::now() + FRAME);
        let mut members = Vec::new();
        lane.pass(&mut members, lane.tick_at(ticker.epoch, k));
        lane.pass(&mut members, lane.tick_at(ticker.epoch, k + 1));
        tokio::time::timeout(Duration::from_secs(1), member.woken())
            .await
            .expect("woken by the tick that finished the prompt");
        let ev = member.with(|s| s.poll_event()).flatten();
        assert!(
            matches!(ev, Some(MediaEvent::PlayFinished(f)) if f.id == id),
            "{ev:?}"
        );
    }

    #[tokio::test]
    async fn started_threads_pace_frames_20_ms_apart() {
        let ticker = Ticker::start(2, RelayPriority::Normal).unwrap();
        let (sock, peer) = socket_pair().await;
        let member = ticker.join(sock, session_to(&peer, Instant::now()));
        let mut buf = [0u8; 2048];
        let mut arrivals = Vec::new();
        while arrivals.len() < 30 {
            tokio::time::timeout(Duration::from_secs(1), peer.recv_from(&mut buf))
                .await
                .expect("frames keep coming")
                .unwrap();
            arrivals.push(Instant::now());
        }
        member.leave();
        // Skip the first few (the burst owed since the session started); the rest average
        // 20 ms apart.
        let span = arrivals[29] - arrivals[5];
        let mean = span / 24;
        assert!(
            mean > Duration::from_millis(18) && mean < Duration::from_millis(22),
            "{mean:?}"
        );
    }
}
