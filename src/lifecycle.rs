//! Work the engine must finish before it may exit: a count of call and routing tasks still
//! running (each holds an [`InFlight`] until its CDR or execution record is committed), which
//! draining waits on.

use std::sync::atomic::{AtomicUsize, Ordering};

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Held by a task whose end draining must wait for; counts down when dropped.
#[derive(Debug)]
pub struct InFlight(());

impl InFlight {
    pub fn begin() -> Self {
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Tasks still running (class5 calls until their CDR is written, class4 runs until answered).
pub fn in_flight() -> usize {
    IN_FLIGHT.load(Ordering::SeqCst)
}
