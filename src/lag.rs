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
