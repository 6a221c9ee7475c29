//! INVITE server transactions of one fast-path worker (RFC 3261 §17.2.1 over UDP), sans-IO.
//!
//! A class4 INVITE the worker answers itself lives here from its arrival to timer I: a
//! retransmitted INVITE gets the stored final response again (or a 100 Trying while the
//! script still runs), the ACK of the 3xx-6xx is absorbed and stops timer G's
//! retransmissions, timer H gives up on a caller that never ACKs, timer I forgets the
//! transaction. A CANCEL of an answered INVITE gets 200 and changes nothing (§9.2); one of an
//! INVITE still running gets 200, and the INVITE a 487 instead of the script's answer.
//!
//! Transactions are named by the top Via's branch and sent-by (§17.2.3; the ACK of a non-2xx
//! and the CANCEL carry the INVITE's branch). Entries still at work (running, or answered and
//! waiting for the ACK) are capped, like `[sip] max_transactions`; confirmed ones only linger
//! to absorb retransmissions, and past four times the cap the oldest are forgotten.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant},
};

use super::transaction::TimerConfig;

/// Where an entry is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The script runs; no final response yet.
    Running,
    /// The running INVITE was cancelled: 487 sent, the script's answer will be dropped.
    Cancelled,
    /// Final response sent, retransmitted until the ACK (timers G and H).
    Completed,
    /// ACK received; only absorbs retransmissions until timer I.
    Confirmed,
}

/// What to do with a request that names an entry.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<'t> {
    /// No entry: a new INVITE (or a stray ACK/CANCEL for the general path).
    Unknown,
    /// Send these bytes to this address on the entry's socket (a retransmitted final).
    Resend {
        socket: usize,
        to: SocketAddr,
        bytes: &'t [u8],
    },
    /// A retransmitted INVITE whose script still runs: answer 100 Trying.
    Trying,
    /// Nothing to send (ACK absorbed, late retransmission absorbed).
    Absorbed,
    /// A CANCEL of an answered INVITE: answer it 200, nothing else.
    CancelAnswered,
    /// A CANCEL of a running INVITE: answer it 200 and the INVITE 487 ([`Table::complete`]).
    CancelRunning,
}

/// Why a new transaction was not created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("the worker's transaction table is full ({0} at work)")]
    Full(usize),
    #[error("a transaction with this branch and sent-by exists")]
    Exists,
}

/// One entry's slot, with a generation so stale timers are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot {
    index: u32,
    generation: u32,
}

#[derive(Debug)]
struct Entry {
    key: Box<str>,
    generation: u32,
    phase: Phase,
    socket: usize,
    to: SocketAddr,
    /// The final response (empty while running).
    response: Vec<u8>,
    /// The INVITE, kept while its answer is being worked out (the answer is built from it).
    request: Vec<u8>,
    /// Timer G's next interval.
    interval: Duration,
    give_up: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// Retransmit the final response (G) or give up (H, when past `give_up`).
    Retransmit,
    /// Forget the entry (I).
    Forget,
}

/// The per-worker table.
#[derive(Debug)]
pub struct Table {
    timers: TimerConfig,
    slots: Vec<Option<Entry>>,
    free: Vec<u32>,
    by_key: HashMap<Box<str>, u32>,
    queue: BinaryHeap<Reverse<(Instant, Slot, Timer)>>,
    /// Confirmed entries in the order they were confirmed.
    lingering: VecDeque<Slot>,
    at_work: usize,
    cap: usize,
    next_generation: u32,
}

impl Table {
    /// A table for at most `cap` transactions at work (running or awaiting their ACK).
    pub fn new(timers: TimerConfig, cap: usize) -> Self {
        Table {
            timers,
            slots: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            queue: BinaryHeap::new(),
            lingering: VecDeque::new(),
            at_work: 0,
            cap: cap.max(1),
            next_generation: 0,
        }
    }

    /// Entries held, lingering ones included.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Entries at work (what the cap counts).
    pub fn at_work(&self) -> usize {
        self.at_work
    }

    fn entry(&self, slot: Slot) -> Option<&Entry> {
        self.slots
            .get(slot.index as usize)?
            .as_ref()
            .filter(|e| e.generation == slot.generation)
    }

    fn entry_mut(&mut self, slot: Slot) -> Option<&mut Entry> {
        self.slots
            .get_mut(slot.index as usize)?
            .as_mut()
            .filter(|e| e.generation == slot.generation)
    }

    fn slot_of(&self, key: &str) -> Option<Slot> {
        let index = *self.by_key.get(key)?;
        let e = self.slots.get(index as usize)?.as_ref()?;
        Some(Slot {
            index,
            generation: e.generation,
        })
    }

    pub fn phase(&self, key: &str) -> Option<Phase> {
        self.slot_of(key)
            .and_then(|s| self.entry(s))
            .map(|e| e.phase)
    }

    /// A retransmitted INVITE.
    pub fn on_invite(&self, key: &str) -> Verdict<'_> {
        let Some(e) = self.slot_of(key).and_then(|s| self.entry(s)) else {
            return Verdict::Unknown;
        };
        match e.phase {
            Phase::Running => Verdict::Trying,
            Phase::Cancelled | Phase::Completed => Verdict::Resend {
                socket: e.socket,
                to: e.to,
                bytes: &e.response,
            },
            Phase::Confirmed => Verdict::Absorbed,
        }
    }

    /// An ACK: the one of our final response confirms the transaction.
    pub fn on_ack(&mut self, key: &str, now: Instant) -> Verdict<'static> {
        let Some(slot) = self.slot_of(key) else {
            return Verdict::Unknown;
        };
        let wait = self.timers.t4;
        let Some(e) = self.entry_mut(slot) else {
            return Verdict::Unknown;
        };
        match e.phase {
            Phase::Completed | Phase::Cancelled => {
                e.phase = Phase::Confirmed;
                e.response = Vec::new();
                self.at_work -= 1;
                self.queue.push(Reverse((now + wait, slot, Timer::Forget)));
                self.lingering.push_back(slot);
                self.trim_lingering();
                Verdict::Absorbed
            }
            // An ACK before any final response is not ours to absorb: RFC 3261 has none.
            Phase::Running => Verdict::Unknown,
            Phase::Confirmed => Verdict::Absorbed,
        }
    }

    /// A CANCEL naming this INVITE transaction.
    pub fn on_cancel(&mut self, key: &str) -> Verdict<'static> {
        let Some(slot) = self.slot_of(key) else {
            return Verdict::Unknown;
        };
        let Some(e) = self.entry_mut(slot) else {
            return Verdict::Unknown;
        };
        match e.phase {
            Phase::Running => {
                e.phase = Phase::Cancelled;
                Verdict::CancelRunning
            }
            _ => Verdict::CancelAnswered,
        }
    }

    /// A new INVITE (`request`, kept until it is answered) whose script is about to run; its
    /// answer goes to `to` on `socket`.
    pub fn begin(
        &mut self,
        key: &str,
        socket: usize,
        to: SocketAddr,
        request: Vec<u8>,
    ) -> Result<Slot, TableError> {
        if self.by_key.contains_key(key) {
            return Err(TableError::Exists);
        }
        if self.at_work >= self.cap {
            return Err(TableError::Full(self.at_work));
        }
        self.next_generation = self.next_generation.wrapping_add(1);
        let entry = Entry {
            key: key.into(),
            generation: self.next_generation,
            phase: Phase::Running,
            socket,
            to,
            response: Vec::new(),
            request,
            interval: self.timers.t1,
            give_up: far_future(),
        };
        let index = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(entry);
                i
            }
            None => {
                self.slots.push(Some(entry));
                (self.slots.len() - 1) as u32
            }
        };
        self.by_key.insert(key.into(), index);
        self.at_work += 1;
        Ok(Slot {
            index,
            generation: self.next_generation,
        })
    }

    /// The script's final response (or, for a cancelled INVITE, the 487): stored and to be
    /// sent now. Returns false when it must not be sent: the INVITE was cancelled and this
    /// is the script's late answer, or the entry is gone.
    pub fn complete(
        &mut self,
        slot: Slot,
        response: Vec<u8>,
        cancelled: bool,
        now: Instant,
    ) -> bool {
        let (t1, h) = (self.timers.t1, self.timers.t1x64());
        let Some(e) = self.entry_mut(slot) else {
            return false;
        };
        let send = match e.phase {
            Phase::Running => !cancelled,
            Phase::Cancelled => cancelled && e.response.is_empty(),
            _ => false,
        };
        if !send {
            return false;
        }
        if e.phase == Phase::Running {
            e.phase = Phase::Completed;
        }
        e.response = response;
        e.request = Vec::new();
        e.interval = t1;
        e.give_up = now + h;
        self.queue
            .push(Reverse((now + t1, slot, Timer::Retransmit)));
        true
    }

    /// The INVITE of a transaction still running (not answered, not cancelled).
    pub fn request(&self, slot: Slot) -> Option<&[u8]> {
        self.entry(slot)
            .filter(|e| e.phase == Phase::Running)
            .map(|e| e.request.as_slice())
    }

    /// A cancelled transaction whose 487 is yet to be sent: its slot, socket, address and
    /// INVITE (taken out: the script's late answer finds none).
    pub fn cancelled(&mut self, key: &str) -> Option<(Slot, usize, SocketAddr, Vec<u8>)> {
        let slot = self.slot_of(key)?;
        let e = self.entry_mut(slot)?;
        if e.phase != Phase::Cancelled || !e.response.is_empty() || e.request.is_empty() {
            return None;
        }
        Some((slot, e.socket, e.to, std::mem::take(&mut e.request)))
    }

    /// The final response of an entry (what [`complete`](Self::complete) stored).
    pub fn response(&self, slot: Slot) -> Option<&[u8]> {
        self.entry(slot).map(|e| e.response.as_slice())
    }

    /// Drops an entry whose answer could not be produced at all.
    pub fn abandon(&mut self, slot: Slot) {
        self.remove(slot);
    }

    /// When [`handle_timeout`](Self::handle_timeout) next has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Runs the timers due at `now`; `send(socket, to, bytes)` for each retransmission.
    pub fn handle_timeout(&mut self, now: Instant, mut send: impl FnMut(usize, SocketAddr, &[u8])) {
        let t2 = self.timers.t2;
        while let Some(Reverse((at, slot, timer))) = self.queue.peek().copied() {
            if at > now {
                break;
            }
            self.queue.pop();
            let Some(e) = self.entry_mut(slot) else {
                continue;
            };
            match (timer, e.phase) {
                (Timer::Retransmit, Phase::Completed | Phase::Cancelled) => {
                    if now >= e.give_up {
                        // Timer H: the caller never ACKed.
                        tracing::debug!(key = %e.key, "no ACK for the final response (timer H)");
                        self.remove(slot);
                        continue;
                    }
                    send(e.socket, e.to, &e.response);
                    e.interval = (e.interval * 2).min(t2);
                    let next = (now + e.interval).min(e.give_up);
                    self.queue.push(Reverse((next, slot, Timer::Retransmit)));
                }
                (Timer::Forget, Phase::Confirmed) => self.remove(slot),
                _ => {}
            }
        }
    }

    fn remove(&mut self, slot: Slot) {
        let Some(entry) = self
            .slots
            .get_mut(slot.index as usize)
            .and_then(|s| s.take_if(|e| e.generation == slot.generation))
        else {
            return;
        };
        if entry.phase != Phase::Confirmed {
            self.at_work -= 1;
        }
        self.by_key.remove(&entry.key);
        self.free.push(slot.index);
    }

    fn trim_lingering(&mut self) {
        while self.lingering.len() > self.cap.saturating_mul(4) {
            if let Some(old) = self.lingering.pop_front() {
                if self.entry(old).is_some_and(|e| e.phase == Phase::Confirmed) {
                    self.remove(old);
                }
            }
        }
        // Entries forgotten by timer I leave stale slots at the front: drop them.
        while let Some(front) = self.lingering.front() {
            if self
                .entry(*front)
                .is_some_and(|e| e.phase == Phase::Confirmed)
            {
                break;
            }
            self.lingering.pop_front();
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timers() -> TimerConfig {
        TimerConfig {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:5999".parse().unwrap()
    }

    fn sends(table: &mut Table, at: Instant) -> usize {
        let mut n = 0;
        table.handle_timeout(at, |_, _, _| n += 1);
        n
    }

    #[test]
    fn retransmissions_get_the_stored_answer_and_the_ack_stops_timer_g() {
        let mut t = Table::new(timers(), 10);
        let now = Instant::now();
        let slot = t.begin("b1 h:1", 0, peer(), Vec::new()).unwrap();
        assert_eq!(t.on_invite("b1 h:1"), Verdict::Trying);
        assert!(t.complete(slot, b"302".to_vec(), false, now));
        assert_eq!(
            t.on_invite("b1 h:1"),
            Verdict::Resend {
                socket: 0,
                to: peer(),
                bytes: b"302"
            }
        );
        // Timer G: 500 ms, then 1 s, ...
        assert_eq!(sends(&mut t, now + Duration::from_millis(499)), 0);
        assert_eq!(sends(&mut t, now + Duration::from_millis(500)), 1);
        assert_eq!(sends(&mut t, now + Duration::from_millis(1499)), 0);
        assert_eq!(sends(&mut t, now + Duration::from_millis(1500)), 1);
        let acked = now + Duration::from_millis(1600);
        assert_eq!(t.on_ack("b1 h:1", acked), Verdict::Absorbed);
        assert_eq!(t.at_work(), 0);
        assert_eq!(t.on_invite("b1 h:1"), Verdict::Absorbed);
        assert_eq!(sends(&mut t, acked + Duration::from_secs(4)), 0);
        assert_eq!(t.len(), 1);
        // Timer I forgets it.
        assert_eq!(sends(&mut t, acked + Duration::from_secs(5)), 0);
        assert!(t.is_empty());
        assert_eq!(t.on_invite("b1 h:1"), Verdict::Unknown);
    }

    #[test]
    fn timer_h_gives_up_on_a_caller_that_never_acks() {
        let mut t = Table::new(timers(), 10);
        let now = Instant::now();
        let slot = t.begin("k", 0, peer(), Vec::new()).unwrap();
        assert!(t.complete(slot, b"486".to_vec(), false, now));
        let mut total = 0;
        let mut at = now;
        while at < now + Duration::from_secs(40) {
            at += Duration::from_millis(100);
            total += sends(&mut t, at);
        }
        // 0.5, 1.5, 3.5, 7.5, 11.5, ... 31.5 s: retransmitted, then forgotten at 32 s.
        assert_eq!(total, 10);
        assert!(t.is_empty());
        assert_eq!(t.at_work(), 0);
    }

    #[test]
    fn cancel_of_a_running_invite_drops_the_scripts_answer() {
        let mut t = Table::new(timers(), 10);
        let now = Instant::now();
        let slot = t.begin("k", 0, peer(), Vec::new()).unwrap();
        assert_eq!(t.on_cancel("k"), Verdict::CancelRunning);
        assert!(t.complete(slot, b"487".to_vec(), true, now));
        assert!(!t.complete(slot, b"302".to_vec(), false, now));
        assert_eq!(t.response(slot), Some(&b"487"[..]));
        assert_eq!(t.on_cancel("k"), Verdict::CancelAnswered);
        assert_eq!(t.on_ack("k", now), Verdict::Absorbed);
        assert_eq!(t.on_cancel("nope"), Verdict::Unknown);
        assert_eq!(t.on_ack("nope", now), Verdict::Unknown);
    }

    #[test]
    fn the_cap_counts_work_and_lingering_entries_are_bounded() {
        let mut t = Table::new(timers(), 2);
        let now = Instant::now();
        let a = t.begin("a", 0, peer(), Vec::new()).unwrap();
        let _b = t.begin("b", 0, peer(), Vec::new()).unwrap();
        assert_eq!(
            t.begin("c", 0, peer(), Vec::new()),
            Err(TableError::Full(2))
        );
        assert_eq!(t.begin("a", 0, peer(), Vec::new()), Err(TableError::Exists));
        assert!(t.complete(a, b"302".to_vec(), false, now));
        t.on_ack("a", now);
        assert!(t.begin("c", 0, peer(), Vec::new()).is_ok());
        // Lingering entries: at most 4 x cap.
        let mut t = Table::new(timers(), 1);
        for i in 0..20 {
            let key = format!("k{i}");
            let s = t.begin(&key, 0, peer(), Vec::new()).unwrap();
            assert!(t.complete(s, b"302".to_vec(), false, now));
            t.on_ack(&key, now);
        }
        assert_eq!(t.len(), 4);
        assert_eq!(t.on_invite("k19"), Verdict::Absorbed);
        assert_eq!(t.on_invite("k0"), Verdict::Unknown);
    }

    #[test]
    fn abandoned_and_reused_slots_ignore_stale_timers() {
        let mut t = Table::new(timers(), 4);
        let now = Instant::now();
        let s = t.begin("x", 0, peer(), Vec::new()).unwrap();
        assert!(t.complete(s, b"302".to_vec(), false, now));
        t.abandon(s);
        let s2 = t.begin("y", 0, peer(), Vec::new()).unwrap();
        assert_ne!(s, s2);
        assert!(!t.complete(s, b"302".to_vec(), false, now));
        assert_eq!(sends(&mut t, now + Duration::from_secs(1)), 0);
        assert_eq!(t.phase("y"), Some(Phase::Running));
    }
}
