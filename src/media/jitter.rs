//! Receive-side reorder window: releases packets in sequence order, drops duplicates and
//! late arrivals, and gives up on a gap after a short wait so a lost packet costs at most that wait.
//!
//! This is deliberately a reorder buffer, not a playout-delay jitter buffer: an IVR only
//! records, detects DTMF and echoes what it receives, so packets are released as soon as they
//! are in order. A gap holds later packets until [`DEFAULT_MAX_WAIT`] has passed since the
//! first of them arrived (or the window fills up), then the gap is reported as lost.
//!
//! Sequence numbers are extended to 64 bits relative to the expected one, so 16-bit
//! wraparound is invisible; a jump of more than [`RESYNC_DISTANCE`] either way is taken as
//! the sender restarting its numbering, and the window re-anchors on it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long a gap may hold later packets back.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_millis(60);
/// How many out-of-order packets may be held.
pub const DEFAULT_CAPACITY: usize = 16;
/// A sequence jump beyond this is a restart, not loss or reordering.
pub const RESYNC_DISTANCE: i64 = 3000;

/// What `push` did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Kept for release.
    Accepted,
    /// Same sequence number as a packet already held.
    Duplicate,
    /// Older than what was already released (a late packet or a duplicate of one).
    Late,
}

/// What `pop` hands back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released<T> {
    /// The next packet in order.
    Packet(T),
    /// This many packets were given up as lost; the next pop returns the one after the gap.
    Lost(u64),
}

/// Reorders items keyed by 16-bit RTP sequence numbers.
#[derive(Debug)]
pub struct ReorderBuffer<T> {
    max_wait: Duration,
    capacity: usize,
    next: Option<u64>,
    held: BTreeMap<u64, (Instant, T)>,
}

impl<T> Default for ReorderBuffer<T> {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_WAIT, DEFAULT_CAPACITY)
    }
}

impl<T> ReorderBuffer<T> {
    /// A buffer that waits at most `max_wait` on a gap and holds at most `capacity` packets.
    pub fn new(max_wait: Duration, capacity: usize) -> Self {
        ReorderBuffer {
            max_wait,
            capacity: capacity.max(1),
            next: None,
            held: BTreeMap::new(),
        }
    }

    /// Forgets all state (e.g. when the sender's SSRC changes).
    pub fn reset(&mut self) {
        self.next = None;
        self.held.clear();
    }

    fn extend(&self, seq: u16) -> u64 {
        // Start far from zero so numbers slightly before the first one stay positive.
        let reference = self.next.unwrap_or(1 << 32 | u64::from(seq));
        let delta = i64::from(seq.wrapping_sub(reference as u16) as i16);
        (reference as i64 + delta) as u64
    }

    /// Offers a packet received at `now`.
    pub fn push(&mut self, now: Instant, seq: u16, item: T) -> Pushed {
        let mut ext = self.extend(seq);
        if let Some(next) = self.next {
            let d = ext as i64 - next as i64;
            if !(-RESYNC_DISTANCE..=RESYNC_DISTANCE).contains(&d) {
                // Re-anchor; what was held belongs to the old numbering.
                self.reset();
                ext = self.extend(seq);
            } else if d < 0 {
                return Pushed::Late;
            }
        }
        if self.held.contains_key(&ext) {
            return Pushed::Duplicate;
        }
        self.next.get_or_insert(ext);
        self.held.insert(ext, (now, item));
        Pushed::Accepted
    }

    /// When a held packet will stop waiting for a gap to fill, if one is waiting.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let next = self.next?;
        let (&first, (arrived, _)) = self.held.iter().next()?;
        (first != next).then(|| *arrived + self.max_wait)
    }

    /// Releases the next packet in order, or reports a gap given up on, or `None` to wait.
    pub fn pop(&mut self, now: Instant) -> Option<Released<T>> {
        let next = self.next?;
        let (&first, &(arrived, _)) = self.held.iter().next()?;
        if first == next {
            let (_, item) = self.held.remove(&first)?;
            self.next = Some(next + 1);
            return Some(Released::Packet(item));
        }
        // Earliest held packet arrived first in practice; a later-arriving lower seq only
        // shortens the wait, which is harmless.
        let oldest = self.held.values().map(|(t, _)| *t).min().unwrap_or(arrived);
        if self.held.len() >= self.capacity || now >= oldest + self.max_wait {
            self.next = Some(first);
            return Some(Released::Lost(first - next));
        }
        None
    }

    /// Number of packets currently held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(b: &mut ReorderBuffer<u16>, now: Instant) -> Vec<Released<u16>> {
        std::iter::from_fn(|| b.pop(now)).collect()
    }

    use Released::{Lost, Packet};

    #[test]
    fn in_order_is_released_immediately_across_wraparound() {
        let t = Instant::now();
        let mut b = ReorderBuffer::default();
        let mut got = Vec::new();
        for i in 0..10u16 {
            let seq = 65530u16.wrapping_add(i);
            assert_eq!(b.push(t, seq, seq), Pushed::Accepted);
            got.extend(drain(&mut b, t));
        }
        let want: Vec<_> = (0..10u16)
            .map(|i| Packet(65530u16.wrapping_add(i)))
            .collect();
        assert_eq!(got, want);
        assert_eq!(b.poll_timeout(), None);
    }

    #[test]
    fn reordering_is_fixed_and_duplicates_dropped() {
        let t = Instant::now();
        let mut b = ReorderBuffer::default();
        let mut got = Vec::new();
        let mut pushed = Vec::new();
        for seq in [65534u16, 0, 65535, 65535, 2, 2, 1, 1, 65534] {
            pushed.push(b.push(t, seq, seq));
            got.extend(drain(&mut b, t));
        }
        use Pushed::{Accepted as A, Duplicate as D, Late as L};
        assert_eq!(pushed, vec![A, A, A, L, A, D, A, L, L]);
        assert_eq!(
            got,
            vec![
                Packet(65534),
                Packet(65535),
                Packet(0),
                Packet(1),
                Packet(2)
            ]
        );
    }

    #[test]
    fn gap_waits_then_reports_loss() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut b = ReorderBuffer::default();
        b.push(t, 100, 100);
        assert_eq!(drain(&mut b, t), vec![Packet(100)]);
        b.push(t + ms(40), 103, 103);
        b.push(t + ms(60), 104, 104);
        assert_eq!(drain(&mut b, t + ms(60)), vec![]);
        assert_eq!(b.poll_timeout(), Some(t + ms(40) + DEFAULT_MAX_WAIT));
        // A late arrival of 101 is still used; 102 never comes.
        b.push(t + ms(70), 101, 101);
        assert_eq!(drain(&mut b, t + ms(70)), vec![Packet(101)]);
        assert_eq!(drain(&mut b, t + ms(99)), vec![]);
        assert_eq!(
            drain(&mut b, t + ms(100)),
            vec![Lost(1), Packet(103), Packet(104)]
        );
        // 102 arriving now is late.
        assert_eq!(b.push(t + ms(120), 102, 102), Pushed::Late);
    }

    #[test]
    fn full_window_skips_without_waiting() {
        let t = Instant::now();
        let mut b = ReorderBuffer::new(Duration::from_secs(10), 4);
        b.push(t, 0, 0);
        drain(&mut b, t);
        for s in 5..9 {
            b.push(t, s, s);
        }
        assert_eq!(
            drain(&mut b, t),
            vec![Lost(4), Packet(5), Packet(6), Packet(7), Packet(8)]
        );
    }

    #[test]
    fn big_jump_resyncs() {
        let t = Instant::now();
        let mut b = ReorderBuffer::default();
        b.push(t, 10, 10);
        drain(&mut b, t);
        assert_eq!(b.push(t, 40000, 40000), Pushed::Accepted);
        assert_eq!(drain(&mut b, t), vec![Packet(40000)]);
        b.push(t, 40001, 40001);
        assert_eq!(drain(&mut b, t), vec![Packet(40001)]);
    }
}
