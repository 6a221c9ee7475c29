//! Giving memory back to the system after a load peak: the allocators keep freed pages for
//! reuse, so an engine that peaked at 1.4 GB under overload still held 970 MB 30 s later.

use std::{sync::Arc, time::Duration};

use crate::script::Engine;

/// How often the load is looked at.
const PERIOD: Duration = Duration::from_secs(5);
/// Below this many runs at the peak, there is nothing worth handing back.
const MIN_PEAK: usize = 32;

/// Hands free memory back to the OS: glibc's heaps (QuickJS allocates there) and mimalloc's
/// (Rust's allocations). Takes a few milliseconds with large heaps; run it off the hot paths.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of glibc's arenas to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    // SAFETY: mi_collect frees mimalloc's unused pages; callable from any thread at any time.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}

/// Watches the engines' runs; once they fell below half of their peak, releases free memory.
pub async fn give_back_after_peaks(engines: Vec<Arc<Engine>>) {
    let mut peak = 0usize;
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        tick.tick().await;
        let load: usize = engines.iter().map(|e| e.in_flight()).sum();
        peak = peak.max(load);
        if peak >= MIN_PEAK && load <= peak / 2 {
            tracing::debug!(peak, load, "load fell: returning free memory");
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
            peak = load;
        }
    }
}
