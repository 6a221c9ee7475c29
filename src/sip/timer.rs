//! A deadline queue for sans-IO state machines: arm at an instant, pop what is due.
//!
//! Entries are never cancelled here; the owner re-checks a popped entry against its own
//! state and ignores stale ones. That keeps arming O(log n) with no bookkeeping.

use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Debug)]
pub struct TimerQueue<K> {
    entries: BTreeMap<(Instant, u64), K>,
    seq: u64,
}

impl<K> Default for TimerQueue<K> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            seq: 0,
        }
    }
}

impl<K> TimerQueue<K> {
    pub fn arm(&mut self, at: Instant, key: K) {
        self.seq = self.seq.wrapping_add(1);
        self.entries.insert((at, self.seq), key);
    }

    /// Earliest deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.keys().next().map(|(at, _)| *at)
    }

    /// Removes and returns one entry whose deadline is at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, K)> {
        let first = *self.entries.keys().next()?;
        if first.0 > now {
            return None;
        }
        self.entries.remove(&first).map(|k| (first.0, k))
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pops_in_deadline_order_only_when_due() {
        let t0 = Instant::now();
        let mut q = TimerQueue::default();
        q.arm(t0 + Duration::from_millis(20), "b");
        q.arm(t0 + Duration::from_millis(10), "a");
        q.arm(t0 + Duration::from_millis(20), "c");
        assert_eq!(q.next_deadline(), Some(t0 + Duration::from_millis(10)));
        assert!(q.pop_due(t0).is_none());
        assert_eq!(q.pop_due(t0 + Duration::from_millis(25)).unwrap().1, "a");
        assert_eq!(q.pop_due(t0 + Duration::from_millis(25)).unwrap().1, "b");
        assert_eq!(q.pop_due(t0 + Duration::from_millis(25)).unwrap().1, "c");
        assert!(q.is_empty());
    }
}
