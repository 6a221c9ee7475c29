//! The HTTP listener's connection guard: a per-source connection cap, a deadline for a
//! request's headers (slow-header clients) and one for idle keep-alive connections.
//!
//! The guard sits under hyper, on the byte stream: it sees a request begin (first byte), its
//! header end (`CRLF CRLF`) and the response go out, which is all the two deadlines need.
//! One [`ConnectionGuard`] can serve several listeners (the per-worker ones of
//! [`super::percore`]): the per-source count is shared, so the cap holds across them.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::{Instant, Sleep},
};

/// `[http]` connection limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// From a request's first byte (or the connection's start) to the end of its headers.
    pub header_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// Connections one source address may hold; more are closed on accept.
    pub max_per_source: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_per_source: 256,
        }
    }
}

type Sources = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// The limits and the per-source connection counts, shared by every listener of the API.
#[derive(Clone)]
pub struct ConnectionGuard {
    limits: HttpLimits,
    sources: Sources,
}

impl ConnectionGuard {
    pub fn new(limits: HttpLimits) -> Self {
        ConnectionGuard {
            limits,
            sources: Sources::default(),
        }
    }

    /// A place for one more connection from `ip`, or `None` at the per-source cap.
    fn admit(&self, ip: IpAddr) -> Option<SourceSlot> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let n = sources.entry(ip).or_insert(0);
        if *n >= self.limits.max_per_source {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            sources: self.sources.clone(),
            ip,
        })
    }

    /// The next connection on `listener` that the per-source cap lets in, guarded.
    pub async fn accept(&self, listener: &TcpListener) -> (GuardedStream, SocketAddr) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = self.admit(peer.ip()) else {
                tracing::debug!(%peer, "HTTP connection refused: per-source cap reached");
                continue;
            };
            let _ = stream.set_nodelay(true);
            return (GuardedStream::new(stream, self.limits, slot), peer);
        }
    }
}

/// A TCP listener for `axum::serve` that applies [`HttpLimits`].
pub struct GuardedListener {
    inner: TcpListener,
    guard: ConnectionGuard,
}

impl GuardedListener {
    pub fn new(inner: TcpListener, limits: HttpLimits) -> Self {
        GuardedListener {
            inner,
            guard: ConnectionGuard::new(limits),
        }
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = GuardedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        self.guard.accept(&self.inner).await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// One connection's count in its source's total, given back on drop.
struct SourceSlot {
    sources: Sources,
    ip: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = sources.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                sources.remove(&self.ip);
            }
        }
    }
}

/// Where the connection is in its request/response cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Between requests since `.0`: the idle deadline runs.
    Idle(Instant),
    /// A request's headers are arriving since `.0`: the header deadline runs.
    Headers(Instant),
    /// Headers complete; the body and the handler take what they take (body size and the
    /// run's own limits bound them).
    Busy,
}

/// A TCP stream that fails its reads once the current deadline has passed.
pub struct GuardedStream {
    inner: TcpStream,
    limits: HttpLimits,
    phase: Phase,
    /// Where the current request's headers end.
    header_end: HeaderEnd,
    timer: Pin<Box<Sleep>>,
    /// Who waits on a read: woken when a response starts the idle deadline, since nothing
    /// on the socket would wake it to arm that deadline.
    reader: Option<Waker>,
    _slot: SourceSlot,
}

impl GuardedStream {
    fn new(inner: TcpStream, limits: HttpLimits, slot: SourceSlot) -> Self {
        let now = Instant::now();
        GuardedStream {
            inner,
            limits,
            // A new connection owes us its first request's headers in time.
            phase: Phase::Headers(now),
            header_end: HeaderEnd::default(),
            timer: Box::pin(tokio::time::sleep_until(now + limits.header_timeout)),
            reader: None,
            _slot: slot,
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Idle(since) => Some(since + self.limits.idle_timeout),
            Phase::Headers(since) => Some(since + self.limits.header_timeout),
            Phase::Busy => None,
        }
    }

    fn on_read(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if let Phase::Idle(_) = self.phase {
            self.phase = Phase::Headers(Instant::now());
            self.header_end = HeaderEnd::default();
        }
        if let Phase::Headers(_) = self.phase {
            if self.header_end.feed(bytes) {
                self.phase = Phase::Busy;
            }
        }
    }
}

/// Finds a request's `CRLF CRLF` across reads without copying them: only the last 3 bytes
/// seen are kept, for an end split between two reads.
#[derive(Debug, Default)]
struct HeaderEnd {
    tail: [u8; 3],
    tail_len: usize,
}

impl HeaderEnd {
    const END: &'static [u8] = b"\r\n\r\n";

    /// The next bytes of the stream; true once the headers' end has been seen.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        // The seam: the kept tail and up to 3 bytes of this read.
        let mut seam = [0u8; 6];
        let old = self.tail_len;
        seam[..old].copy_from_slice(&self.tail[..old]);
        let head = &bytes[..bytes.len().min(3)];
        seam[old..old + head.len()].copy_from_slice(head);
        let seam = &seam[..old + head.len()];
        if seam.windows(4).any(|w| w == Self::END)
            || memchr::memmem::find(bytes, Self::END).is_some()
        {
            return true;
        }
        // Keep the last 3 bytes of (tail, bytes).
        let mut joined = [0u8; 6];
        joined[..old].copy_from_slice(&self.tail[..old]);
        let last = &bytes[bytes.len().saturating_sub(3)..];
        joined[old..old + last.len()].copy_from_slice(last);
        let total = old + last.len();
        let keep = total.min(3);
        self.tail[..keep].copy_from_slice(&joined[total - keep..total]);
        self.tail_len = keep;
        false
    }
}

impl GuardedStream {
    /// A response going out ends the request: the idle deadline starts (again) from now.
    fn on_write(&mut self, n: usize) {
        if n > 0 && matches!(self.phase, Phase::Busy | Phase::Idle(_)) {
            let was_busy = self.phase == Phase::Busy;
            self.phase = Phase::Idle(Instant::now());
            if was_busy {
                if let Some(reader) = self.reader.take() {
                    reader.wake();
                }
            }
        }
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.on_read(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                this.reader = Some(cx.waker().clone());
                let Some(at) = this.deadline() else {
                    return Poll::Pending;
                };
                if this.timer.deadline() != at {
                    this.timer.as_mut().reset(at);
                }
                match this.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        let what = match this.phase {
                            Phase::Idle(_) => "idle keep-alive connection timed out",
                            _ => "request headers not received in time",
                        };
                        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            // `100 Continue` is not the answer: the body is still to come.
            if !buf.starts_with(b"HTTP/1.1 1") {
                this.on_write(n);
            }
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            if !bufs.first().is_some_and(|b| b.starts_with(b"HTTP/1.1 1")) {
                this.on_write(n);
            }
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::HeaderEnd;

    /// Feeds `request` in pieces of `n` bytes, as reads would deliver it, and says at which
    /// piece the headers were seen to end.
    fn end_seen_at(request: &[u8], n: usize) -> Option<usize> {
        let mut end = HeaderEnd::default();
        request.chunks(n).position(|piece| end.feed(piece))
    }

    #[test]
    fn header_end_is_found_however_the_reads_split_it() {
        let request = b"POST /v1/run/x HTTP/1.1\r\nHost: a\r\n\r\n{}";
        let last_byte = request.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 3;
        for n in 1..=request.len() {
            assert_eq!(
                end_seen_at(request, n),
                Some(last_byte / n),
                "pieces of {n} bytes"
            );
        }
    }

    #[test]
    fn line_ends_short_of_an_empty_line_do_not_end_headers() {
        let partial = b"GET / HTTP/1.1\r\nHost: a\r\n\r";
        for n in 1..=partial.len() {
            assert_eq!(end_seen_at(partial, n), None, "pieces of {n} bytes");
        }
        let mut split = HeaderEnd::default();
        assert!(!split.feed(b"\r\n"));
        assert!(!split.feed(b"x\r\n"));
        assert!(!split.feed(b"\r"));
        assert!(split.feed(b"\n"));
    }
}
