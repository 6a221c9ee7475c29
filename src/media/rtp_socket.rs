//! Thin tokio driver for a [`MediaSession`]: an even UDP port for RTP (and port+1 drained for
//! RTCP), received datagrams fed in with the current time, and one timer armed at the
//! session's next deadline.
//!
//! All timing lives in the session: the driver never sleeps "20 ms", it sleeps until
//! `poll_timeout()` with `sleep_until`, so a late wake-up does not shift later frames.
//! Sends never wait: a UDP send only fails to complete immediately when the socket buffer is
//! full, and then dropping the packet is the right thing for real-time audio. This also makes
//! [`RtpSocket::drive`] safe to cancel in a `select!`, and lets the sockets be registered for
//! read readiness only ([`ReadWatchedUdp`]).

use std::collections::{BTreeSet, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::{media::session::MediaSession, udp::ReadWatchedUdp};

/// Default RTP port range, as in most SIP media servers.
pub const DEFAULT_PORT_RANGE: RangeInclusive<u16> = 16384..=32767;
/// Largest datagram we read; bigger ones are truncated and then fail to parse.
const MAX_DATAGRAM: usize = 2048;

#[derive(Debug)]
struct Ports {
    free: VecDeque<u16>,
    used: BTreeSet<u16>,
}

/// Hands out even RTP ports (the odd port above each is left for RTCP) and takes them back.
///
/// Freed ports go to the back of the queue, so a port is reused as late as possible and
/// stray packets for a finished call are unlikely to reach the next one.
#[derive(Debug)]
pub struct PortAllocator {
    ports: Mutex<Ports>,
}

impl Default for PortAllocator {
    fn default() -> Self {
        Self::new(DEFAULT_PORT_RANGE)
    }
}

impl PortAllocator {
    /// An allocator over the even ports in `range` whose odd neighbour is also in range.
    pub fn new(range: RangeInclusive<u16>) -> Self {
        let (lo, hi) = (*range.start(), *range.end());
        let first = lo.saturating_add(lo % 2);
        let free = (u32::from(first)..u32::from(hi))
            .step_by(2)
            .map(|p| p as u16)
            .collect();
        PortAllocator {
            ports: Mutex::new(Ports {
                free,
                used: BTreeSet::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ports> {
        self.ports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a free even port, or `None` when all are in use.
    pub fn allocate(&self) -> Option<u16> {
        let mut p = self.lock();
        let port = p.free.pop_front()?;
        p.used.insert(port);
        Some(port)
    }

    /// Returns a port; unknown or already returned ports are ignored.
    pub fn release(&self, port: u16) {
        let mut p = self.lock();
        if p.used.remove(&port) {
            p.free.push_back(port);
        }
    }

    /// Ports currently free.
    pub fn available(&self) -> usize {
        self.lock().free.len()
    }
}

/// A port pair held for one call, released when dropped.
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    alloc: Arc<PortAllocator>,
}

impl PortLease {
    /// The even RTP port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        self.alloc.release(self.port);
    }
}

/// The sockets of one call. The RTP socket is shared with the RTP ticker while a media task
/// runs (frames leave from it); receive buffers are allocated only by the methods that keep
/// one across an await ([`RtpSocket::recv_raw`], [`RtpSocket::drive`]): a media task reads
/// into a buffer on its stack.
#[derive(Debug)]
pub struct RtpSocket {
    rtp: Arc<ReadWatchedUdp>,
    rtcp: ReadWatchedUdp,
    _lease: PortLease,
    buf: Vec<u8>,
    rtcp_buf: Vec<u8>,
}

/// An [`RtpSocket`] registered with no reactor: how a call's sockets travel between the
/// runtime of the call and a relay thread. The port lease travels with them.
#[derive(Debug)]
pub struct ParkedRtpSocket {
    rtp: std::net::UdpSocket,
    rtcp: std::net::UdpSocket,
    lease: PortLease,
    buf: Vec<u8>,
    rtcp_buf: Vec<u8>,
}

impl ParkedRtpSocket {
    /// Registers the sockets with the reactor of the runtime this is called on. Must be
    /// called from inside a tokio runtime.
    pub fn attach(self) -> io::Result<RtpSocket> {
        Ok(RtpSocket {
            rtp: Arc::new(ReadWatchedUdp::from_std(self.rtp)?),
            rtcp: ReadWatchedUdp::from_std(self.rtcp)?,
            _lease: self.lease,
            buf: self.buf,
            rtcp_buf: self.rtcp_buf,
        })
    }
}

/// Whether a bind error says only that this port cannot be had (another program holds it, or
/// it is reserved), so the next port may do. Any other error (an address the host lacks, no
/// descriptors left) would fail on every port: it is returned at once rather than after
/// trying the whole range, and named as it is rather than as "no free port".
fn port_unusable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::AddrInUse | io::ErrorKind::PermissionDenied
    )
}

impl RtpSocket {
    /// Binds RTP on an even port from `alloc` and RTCP on the port above it, on `ip`.
    /// Ports that some other program holds are skipped (and given back to the pool); other
    /// errors end the attempt (see [`port_unusable`]).
    pub async fn bind(alloc: &Arc<PortAllocator>, ip: IpAddr) -> io::Result<Self> {
        let mut skipped = Vec::new();
        let result = loop {
            let Some(port) = alloc.allocate() else {
                break Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "no free RTP port in the configured range",
                ));
            };
            let lease = PortLease {
                port,
                alloc: alloc.clone(),
            };
            let rtp = match ReadWatchedUdp::bind(SocketAddr::new(ip, port)) {
                Ok(s) => s,
                Err(e) if port_unusable(&e) => {
                    skipped.push(lease);
                    continue;
                }
                Err(e) => break Err(e),
            };
            match ReadWatchedUdp::bind(SocketAddr::new(ip, port + 1)) {
                Ok(rtcp) => {
                    break Ok(RtpSocket {
                        rtp: Arc::new(rtp),
                        rtcp,
                        _lease: lease,
                        buf: Vec::new(),
                        rtcp_buf: Vec::new(),
                    })
                }
                Err(e) if port_unusable(&e) => skipped.push(lease),
                Err(e) => break Err(e),
            }
        };
        // Dropping the skipped leases returns those ports to the back of the queue.
        drop(skipped);
        result
    }

    /// The local RTP address (for our SDP).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.rtp.local_addr()
    }

    /// Takes the sockets off the tokio reactor that drives them, so another runtime (a relay
    /// thread, or back to the call's runtime) can adopt them with [`ParkedRtpSocket::attach`].
    /// Fails if the RTP socket is still shared (a media task that has not handed it back).
    pub fn park(self) -> io::Result<ParkedRtpSocket> {
        let rtp = Arc::try_unwrap(self.rtp)
            .map_err(|_| io::Error::other("the RTP socket is still shared with a media task"))?;
        Ok(ParkedRtpSocket {
            rtp: rtp.into_std(),
            rtcp: self.rtcp.into_std(),
            lease: self._lease,
            buf: self.buf,
            rtcp_buf: self.rtcp_buf,
        })
    }

    /// Receive one datagram on the RTP port, bypassing any session (the bridge relay).
    pub async fn recv_raw(&mut self) -> io::Result<(&[u8], SocketAddr)> {
        self.buf.resize(MAX_DATAGRAM, 0);
        let (n, from) = self.rtp.recv_from(&mut self.buf).await?;
        Ok((&self.buf[..n], from))
    }

    /// Send one datagram from the RTP port without waiting (a full buffer drops it, as UDP would).
    pub fn send_raw(&self, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.rtp.send_to(data, to)
    }

    /// The RTP socket, for a sender that shares it (the RTP ticker).
    pub fn sender(&self) -> Arc<ReadWatchedUdp> {
        self.rtp.clone()
    }

    /// Resolves when a datagram may be waiting on the RTP port (see [`RtpSocket::feed`]).
    pub async fn rtp_readable(&self) -> io::Result<()> {
        self.rtp.readable().await
    }

    /// Resolves when a datagram may be waiting on the RTCP port (see [`RtpSocket::drain_rtcp`]).
    pub async fn rtcp_readable(&self) -> io::Result<()> {
        self.rtcp.readable().await
    }

    /// Feeds the datagrams waiting on the RTP port (at most `max`) to `handle`, read into a
    /// buffer on the stack. Returns how many were read.
    pub fn feed(&self, max: usize, mut handle: impl FnMut(SocketAddr, &[u8])) -> usize {
        let mut buf = [0u8; MAX_DATAGRAM];
        let mut n = 0;
        while n < max {
            match self.rtp.try_recv_from(&mut buf) {
                Ok((len, from)) => {
                    n += 1;
                    handle(from, &buf[..len]);
                }
                // WouldBlock (readiness cleared) or a receive error such as an ICMP
                // port-unreachable report: neither is fatal to the call.
                Err(_) => break,
            }
        }
        n
    }

    /// Discards what waits on the RTCP port (RTCP is not used; see session.rs).
    pub fn drain_rtcp(&self) {
        let mut buf = [0u8; 512];
        for _ in 0..64 {
            if self.rtcp.try_recv_from(&mut buf).is_err() {
                break;
            }
        }
    }

    /// Waits for one datagram or the session's next deadline, then sends all that is due.
    ///
    /// Call in a loop (typically inside the call task's `select!`, then drain
    /// `session.poll_event()`). Cancel-safe. Receive errors such as ICMP port-unreachable
    /// reports are not fatal to the call and are ignored, so this cannot fail.
    pub async fn drive(&mut self, session: &mut MediaSession) {
        self.buf.resize(MAX_DATAGRAM, 0);
        self.rtcp_buf.resize(MAX_DATAGRAM, 0);
        let deadline = tokio::time::Instant::from_std(session.poll_timeout());
        tokio::select! {
            r = self.rtp.recv_from(&mut self.buf) => {
                if let Ok((n, from)) = r {
                    if let Err(e) = session.handle_input(Instant::now(), from, &self.buf[..n]) {
                        tracing::trace!(%from, error = %e, "RTP datagram ignored");
                    }
                }
            }
            // RTCP is not used (see session.rs); reading keeps the socket buffer empty.
            _ = self.rtcp.recv_from(&mut self.rtcp_buf) => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
        let now = Instant::now();
        while let Some(t) = session.poll_transmit(now) {
            if let Err(e) = self.rtp.send_to(&t.data, t.dest) {
                tracing::debug!(dest = %t.dest, error = %e, "RTP packet dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::g711::G711;
    use crate::media::session::{MediaEvent, SessionConfig};
    use std::time::Duration;
    use tokio::net::UdpSocket;

    #[tokio::test]
    async fn an_address_the_host_lacks_fails_at_once_and_by_name() {
        // 192.0.2.0/24 is TEST-NET-1: never an address of this host.
        let alloc = Arc::new(PortAllocator::new(41000..=41021));
        let free = alloc.available();
        let e = RtpSocket::bind(&alloc, "192.0.2.1".parse().unwrap())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrNotAvailable, "{e}");
        assert_eq!(alloc.available(), free, "every port given back");
    }

    #[tokio::test]
    async fn ports_held_by_another_program_are_skipped() {
        // A random range of three pairs where we can hold the first pair's RTP port and the
        // second pair's RTCP port, and the third pair is free.
        let hold = |port: u16| std::net::UdpSocket::bind(("127.0.0.1", port)).ok();
        let (alloc, base, _held) = (0..50)
            .find_map(|_| {
                let base = 2 * fastrand::u16(21_000..30_000);
                let held = (hold(base)?, hold(base + 3)?);
                drop((hold(base + 4)?, hold(base + 5)?));
                Some((Arc::new(PortAllocator::new(base..=base + 5)), base, held))
            })
            .expect("no free range of six ports found");
        let sock = RtpSocket::bind(&alloc, "127.0.0.1".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(sock.local_addr().unwrap().port(), base + 4);
    }

    #[test]
    fn allocator_hands_out_even_ports_and_reuses_freed_ones() {
        let a = PortAllocator::new(101..=111);
        let got: Vec<u16> = std::iter::from_fn(|| a.allocate()).collect();
        assert_eq!(got, vec![102, 104, 106, 108, 110]);
        assert_eq!(a.available(), 0);
        a.release(106);
        a.release(106);
        a.release(107);
        assert_eq!(a.allocate(), Some(106));
        assert_eq!(a.allocate(), None);
        let d = PortAllocator::default();
        assert_eq!(d.allocate(), Some(16384));
        assert_eq!(d.available(), 8191);
    }

    #[tokio::test]
    async fn a_parked_socket_serves_another_runtime_and_comes_back() {
        let alloc = Arc::new(PortAllocator::new(43000..=43099));
        let sock = RtpSocket::bind(&alloc, "127.0.0.1".parse().unwrap())
            .await
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        peer.send_to(b"one", addr).await.unwrap();
        let parked = sock.park().unwrap();
        // Another thread with its own runtime (a relay thread) receives on it...
        let (parked, got) = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut s = parked.attach().unwrap();
                let (data, _) = tokio::time::timeout(Duration::from_secs(2), s.recv_raw())
                    .await
                    .unwrap()
                    .unwrap();
                let got = data.to_vec();
                (s.park().unwrap(), got)
            })
        })
        .join()
        .unwrap_or_else(|_| panic!("relay thread panicked"));
        assert_eq!(got, b"one");
        // ...and the first runtime takes it back, with the same port still leased.
        let mut back = parked.attach().unwrap();
        assert_eq!(back.local_addr().unwrap(), addr);
        assert_eq!(alloc.available(), 49);
        peer.send_to(b"two", addr).await.unwrap();
        let (data, from) = tokio::time::timeout(Duration::from_secs(2), back.recv_raw())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((data, from), (&b"two"[..], peer.local_addr().unwrap()));
        drop(back);
        assert_eq!(alloc.available(), 50, "the lease is released once");
    }

    #[tokio::test]
    async fn two_sockets_exchange_50_frames_in_sequence() {
        let alloc = Arc::new(PortAllocator::new(41000..=41999));
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let mut sa = RtpSocket::bind(&alloc, lo).await.unwrap();
        let mut sb = RtpSocket::bind(&alloc, lo).await.unwrap();
        assert_eq!(sa.local_addr().unwrap().port() % 2, 0);
        assert_ne!(sa.local_addr().unwrap(), sb.local_addr().unwrap());
        let now = Instant::now();
        let mut a = MediaSession::new(
            SessionConfig::new(sb.local_addr().unwrap(), G711::Pcmu),
            now,
        );
        let mut b = MediaSession::new(
            SessionConfig::new(sa.local_addr().unwrap(), G711::Pcmu),
            now,
        );
        b.set_audio_tap(true);
        // Frame k carries a constant value that identifies it.
        let prompt: Vec<i16> = (0..50).flat_map(|k| [k as i16 * 200 + 100; 160]).collect();
        a.play(prompt.into(), false);
        let started = Instant::now();

        let task_a = tokio::spawn(async move {
            let end = tokio::time::Instant::now() + Duration::from_millis(1300);
            while tokio::time::Instant::now() < end {
                sa.drive(&mut a).await;
            }
            a.stats()
        });
        let mut frames: Vec<i16> = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while frames.len() < 50 && tokio::time::Instant::now() < deadline {
            tokio::time::timeout(Duration::from_millis(100), sb.drive(&mut b))
                .await
                .ok();
            while let Some(e) = b.poll_event() {
                if let MediaEvent::Audio(s) = e {
                    if s.iter().any(|&x| x != 0) || !frames.is_empty() {
                        frames.push(s[0]);
                    }
                }
            }
        }
        let elapsed = started.elapsed();
        let want: Vec<i16> = (0..50)
            .map(|k| G711::Pcmu.decode_sample(G711::Pcmu.encode_sample(k * 200 + 100)))
            .collect();
        assert_eq!(
            &frames[..50.min(frames.len())],
            &want[..],
            "in order, none missing"
        );
        let st = b.stats();
        assert_eq!((st.lost, st.late_or_duplicate, st.malformed), (0, 0, 0));
        // 50 frames are paced over ~1 s, not sent in a burst.
        assert!(elapsed >= Duration::from_millis(950), "{elapsed:?}");
        let sa_stats = task_a.await.unwrap();
        assert!(sa_stats.sent >= 50);
    }
}
