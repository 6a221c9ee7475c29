//! Who may hold a TCP connection, and for how long: a per-source cap, a global cap that makes
//! room by closing the longest-idle connection (so a full table never locks new clients out),
//! and the idle and slow-message deadlines each connection's reader applies.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

/// Connection limits of one listener kind (SIP TCP here; the HTTP listener has its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpLimits {
    /// A connection with no traffic either way for this long is closed.
    pub idle_timeout: Duration,
    /// A message that has begun (or, on a new inbound connection, the first one) must be
    /// complete within this time, or the connection is closed (slow senders).
    pub message_timeout: Duration,
    /// Connections held at once; at the cap the longest-idle one is closed for a new one.
    pub max_connections: usize,
    /// Connections one source address may hold; more are refused.
    pub max_per_source: usize,
}

impl Default for TcpLimits {
    fn default() -> Self {
        TcpLimits {
            idle_timeout: Duration::from_secs(300),
            message_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_per_source: 64,
        }
    }
}

/// When a connection last moved a byte, shared by its reader and writer.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    /// Activity of a connection outside any table (one we opened).
    pub fn starting_now() -> Self {
        Self::new(Instant::now())
    }

    fn new(epoch: Instant) -> Self {
        let a = Activity {
            epoch,
            last_ms: AtomicU64::new(0),
        };
        a.touch();
        a
    }

    pub fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    pub fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

struct Entry {
    ip: IpAddr,
    activity: Arc<Activity>,
    close: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    conns: HashMap<u64, Entry>,
    per_source: HashMap<IpAddr, usize>,
}

impl Inner {
    fn forget(&mut self, id: u64) -> Option<Entry> {
        let entry = self.conns.remove(&id)?;
        if let Some(n) = self.per_source.get_mut(&entry.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&entry.ip);
            }
        }
        Some(entry)
    }
}

/// Why a new connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("source already holds {0} connections")]
    PerSource(usize),
}

/// The connections of one listener.
pub struct ConnTable {
    limits: TcpLimits,
    epoch: Instant,
    inner: Mutex<Inner>,
}

/// A connection's place in the table; dropping it frees the place.
pub struct ConnGuard {
    table: Arc<ConnTable>,
    id: u64,
    pub activity: Arc<Activity>,
    /// Notified when the table closes this connection to make room.
    pub close: Arc<Notify>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.table.lock().forget(self.id);
    }
}

impl ConnTable {
    pub fn new(limits: TcpLimits) -> Arc<Self> {
        Arc::new(ConnTable {
            limits,
            epoch: Instant::now(),
            inner: Mutex::new(Inner::default()),
        })
    }

    pub fn limits(&self) -> TcpLimits {
        self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections held now.
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A place for a new connection from `ip`: refused past the per-source cap; at the global
    /// cap the longest-idle connection is told to close and its place given to this one.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, Refused> {
        let mut inner = self.lock();
        let from_source = inner.per_source.get(&ip).copied().unwrap_or(0);
        if from_source >= self.limits.max_per_source {
            return Err(Refused::PerSource(from_source));
        }
        while inner.conns.len() >= self.limits.max_connections.max(1) {
            let Some(oldest) = inner
                .conns
                .iter()
                // Ties (same millisecond) go to the connection admitted first, so the
                // choice does not depend on the map's iteration order.
                .min_by_key(|(id, e)| (e.activity.last_ms.load(Ordering::Relaxed), **id))
                .map(|(id, _)| *id)
            else {
                break;
            };
            if let Some(evicted) = inner.forget(oldest) {
                tracing::info!(source = %evicted.ip, "connection table full: closing the longest-idle connection");
                evicted.close.notify_one();
            }
        }
        inner.next_id += 1;
        let id = inner.next_id;
        let activity = Arc::new(Activity::new(self.epoch));
        let close = Arc::new(Notify::new());
        inner.conns.insert(
            id,
            Entry {
                ip,
                activity: activity.clone(),
                close: close.clone(),
            },
        );
        *inner.per_source.entry(ip).or_insert(0) += 1;
        Ok(ConnGuard {
            table: self.clone(),
            id,
            activity,
            close,
        })
    }
}

/// The reader's deadline: the idle one, or sooner the slow-message one while a message is
/// incomplete (`partial_since`).
pub fn read_deadline(
    limits: &TcpLimits,
    last_activity: Instant,
    partial_since: Option<Instant>,
) -> Instant {
    let idle = last_activity + limits.idle_timeout;
    match partial_since {
        Some(since) => idle.min(since + limits.message_timeout),
        None => idle,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per: usize) -> TcpLimits {
        TcpLimits {
            max_connections: max,
            max_per_source: per,
            ..TcpLimits::default()
        }
    }

    #[test]
    fn per_source_cap_refuses_and_frees_on_drop() {
        let t = ConnTable::new(limits(10, 2));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let g1 = t.admit(a).unwrap();
        let _g2 = t.admit(a).unwrap();
        assert_eq!(t.admit(a).err(), Some(Refused::PerSource(2)));
        assert!(t.admit(b).is_ok(), "another source is not affected");
        drop(g1);
        assert!(t.admit(a).is_ok(), "a closed connection frees its place");
    }

    #[test]
    fn global_cap_closes_the_longest_idle_instead_of_refusing() {
        let t = ConnTable::new(limits(2, 10));
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let old = t.admit(ip).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let busy = t.admit(ip).unwrap();
        busy.activity.touch();
        let new = t.admit(ip).expect("no lockout at the cap");
        assert_eq!(t.len(), 2);
        // The idle one was told to close (its permit is stored), the busy one was not.
        let notified = old.close.notified();
        tokio_test_ready(notified);
        drop((busy, new));
    }

    /// Connections idle since the same millisecond: the one admitted first makes room,
    /// whatever order the map iterates in (a CI failure came from this tie).
    #[test]
    fn a_tie_in_idle_time_closes_the_first_admitted() {
        for _ in 0..50 {
            let t = ConnTable::new(limits(3, 10));
            let ip: IpAddr = "127.0.0.2".parse().unwrap();
            let held: Vec<ConnGuard> = (0..3).map(|_| t.admit(ip).unwrap()).collect();
            let same = held[0].activity.last_ms.load(Ordering::Relaxed);
            for g in &held {
                g.activity.last_ms.store(same, Ordering::Relaxed);
            }
            let _new = t.admit(ip).unwrap();
            tokio_test_ready(held[0].close.notified());
        }
    }

    /// A `Notified` future that must already be ready (a permit was stored).
    fn tokio_test_ready(f: tokio::sync::futures::Notified<'_>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(50), f)
                .await
                .expect("the longest-idle connection was told to close");
        });
    }

    #[test]
    fn deadline_is_the_sooner_of_idle_and_slow_message() {
        let l = TcpLimits::default();
        let t0 = Instant::now();
        assert_eq!(read_deadline(&l, t0, None), t0 + l.idle_timeout);
        assert_eq!(read_deadline(&l, t0, Some(t0)), t0 + l.message_timeout);
    }
}
