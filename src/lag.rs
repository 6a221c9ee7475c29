//! Event-loop lag: how late a loop runs a periodic tick, which is how long new work waits
//! there before it starts (CPU saturation and queue depth in one number). Used to shed load.

use std::sync::atomic::{AtomicU64, Ordering};

/// The period of the tick that measures a loop's lag.
const LAG_TICK: std::time::Duration = std::time::Duration::from_millis(10);

/// How late an event loop runs a 10 ms tick: the time a new run waits there before it
/// starts (CPU and queue depth in one number). A loop held by a long slice of work (JavaScript)
/// cannot tick at all, so the time since its last tick counts too.
pub struct Lag {
    epoch: std::time::Instant,
    /// When the last tick ran (µs since `epoch`) and how late it was (µs).
    last_tick_us: AtomicU64,
    late_us: AtomicU64,
}

impl Lag {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Lag {
            epoch: std::time::Instant::now(),
            last_tick_us: AtomicU64::new(0),
            late_us: AtomicU64::new(0),
        }
    }

    pub fn ticked(&self, late: std::time::Duration) {
        let now = (self.epoch.elapsed().as_micros() as u64).max(1);
        self.last_tick_us.store(now, Ordering::Relaxed);
        self.late_us
            .store(late.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn now_us(&self) -> u64 {
        let last = self.last_tick_us.load(Ordering::Relaxed);
        if last == 0 {
            return 0; // still preparing its first contexts: not counted as lag
        }
        let now = self.epoch.elapsed().as_micros() as u64;
        let silent = now
            .saturating_sub(last)
            .saturating_sub(LAG_TICK.as_micros() as u64);
        silent.max(self.late_us.load(Ordering::Relaxed))
    }
}

impl Lag {
    /// Measures the loop this future is spawned on, for as long as it runs.
    pub async fn tick_forever(self: std::sync::Arc<Self>) {
        // The loop runs now: from here on a silence counts. Without this first mark a loop
        // taken by a long run within its first tick period reported no lag at all (a
        // class4 worker spinning right after start was never relieved or shed).
        self.ticked(std::time::Duration::ZERO);
        loop {
            let asked = std::time::Instant::now();
            tokio::time::sleep(LAG_TICK).await;
            self.ticked(asked.elapsed().saturating_sub(LAG_TICK));
        }
    }

    /// The lag now, as a duration.
    pub fn now(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.now_us())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loop that is taken by long work right after its ticker started still shows its
    /// silence as lag (the ticker marks the loop's start), while a ticker not yet polled at
    /// all (a worker still preparing its first contexts) shows none.
    #[test]
    fn a_loop_held_from_its_first_tick_period_shows_lag() {
        let lag = std::sync::Arc::new(Lag::new());
        assert_eq!(lag.now_us(), 0, "not started: no lag");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.spawn_local(lag.clone().tick_forever());
        local.block_on(&rt, async {
            tokio::task::yield_now().await;
            // Held: no await for 60 ms, so the ticker cannot run.
            std::thread::sleep(std::time::Duration::from_millis(60));
            assert!(
                lag.now() >= std::time::Duration::from_millis(40),
                "{:?}",
                lag.now()
            );
        });
    }
}
