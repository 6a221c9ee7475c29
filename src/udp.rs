//! A UDP socket registered with the tokio reactor for read readiness only: RTP, and the class4
//! fast path's SIP sockets.
//!
//! Their sends never wait: a datagram that cannot leave at once is dropped (real-time audio
//! has no use for it late; a SIP answer is retransmitted by its transaction). So nothing needs
//! to hear when the socket becomes writable, and hearing it is expensive: the kernel signals
//! write space each time a sent datagram is released, so a socket registered for writing (as
//! `tokio::net::UdpSocket` always is) puts one epoll event in front of the reactor for every
//! datagram sent. At 2,000 IVR calls that was 100,000 events a second and about a sixth of
//! the server's CPU (README, issue 15 goal 3, third pass).

use std::io;
use std::net::{SocketAddr, UdpSocket};

use tokio::io::{unix::AsyncFd, Interest};

/// A nonblocking UDP socket whose reads wait on the reactor and whose sends do not.
#[derive(Debug)]
pub struct ReadWatchedUdp {
    fd: AsyncFd<UdpSocket>,
}

impl ReadWatchedUdp {
    /// Binds `addr`. Must be called inside a tokio runtime.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        Self::from_std(UdpSocket::bind(addr)?)
    }

    /// Registers `socket` with the reactor of the runtime this is called on.
    pub fn from_std(socket: UdpSocket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        // SAFETY: the AsyncFd owns the socket, so its descriptor stays open and refers to the
        // same socket until the AsyncFd deregisters it (on drop or `into_std`).
        let fd = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(ReadWatchedUdp { fd })
    }

    /// Deregisters the socket and hands it back (still nonblocking).
    pub fn into_std(self) -> UdpSocket {
        self.fd.into_inner()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.fd.get_ref().local_addr()
    }

    /// Sends one datagram now; `WouldBlock` means the socket buffer is full and it was dropped.
    pub fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.fd.get_ref().send_to(data, to)
    }

    /// Waits for a datagram and reads it.
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.try_io(|s| s.get_ref().recv_from(buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads a datagram if one is waiting; `WouldBlock` (which clears the read readiness)
    /// if none is.
    pub fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.fd
            .try_io(Interest::READABLE, |s| s.recv_from(&mut *buf))
    }

    /// Resolves when a datagram may be waiting. The readiness stays set until a read finds
    /// nothing ([`ReadWatchedUdp::try_recv_from`] returning `WouldBlock`).
    pub async fn readable(&self) -> io::Result<()> {
        self.fd.readable().await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    /// The epoll event masks under which `fd`'s socket is registered in this process's epoll
    /// instances, read from /proc/self/fdinfo. Entries are matched by descriptor and inode,
    /// so a socket another test closed a moment ago under the same number does not count.
    fn epoll_masks(fd: i32) -> Vec<u32> {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .ino();
        let (fd, ino) = (fd.to_string(), format!("ino:{ino:x}"));
        let mut masks = Vec::new();
        for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let is_epoll = std::fs::read_link(entry.path())
                .map(|l| l.to_string_lossy().contains("eventpoll"))
                .unwrap_or(false);
            if !is_epoll {
                continue;
            }
            let info = format!("/proc/self/fdinfo/{}", entry.file_name().to_string_lossy());
            let Ok(text) = std::fs::read_to_string(info) else {
                continue;
            };
            for line in text.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                if words.first() == Some(&"tfd:")
                    && words.get(1) == Some(&fd.as_str())
                    && words.contains(&ino.as_str())
                {
                    let at = words.iter().position(|w| *w == "events:").unwrap();
                    masks.push(u32::from_str_radix(words[at + 1], 16).unwrap());
                }
            }
        }
        masks
    }

    #[tokio::test]
    async fn the_reactor_watches_these_sockets_for_reading_only() {
        // The runtime's epoll instance may be open under two descriptors (mio duplicates it),
        // so a socket can be listed more than once: every listing must agree.
        let port = ReadWatchedUdp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let masks = epoll_masks(port.fd.get_ref().as_raw_fd());
        assert!(!masks.is_empty(), "not registered");
        for mask in masks {
            assert_ne!(mask & libc::EPOLLIN as u32, 0, "{mask:x}");
            assert_eq!(mask & libc::EPOLLOUT as u32, 0, "{mask:x}");
        }
        // The reading above sees write interest where there is some: tokio's own socket.
        let tokio_socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let masks = epoll_masks(tokio_socket.as_raw_fd());
        assert!(!masks.is_empty(), "not registered");
        for mask in masks {
            assert_ne!(mask & libc::EPOLLOUT as u32, 0, "{mask:x}");
        }
    }

    #[tokio::test]
    async fn sends_receives_and_reports_an_empty_socket() {
        let a = ReadWatchedUdp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = ReadWatchedUdp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut buf = [0u8; 64];
        let empty = b.try_recv_from(&mut buf).unwrap_err();
        assert_eq!(empty.kind(), io::ErrorKind::WouldBlock);

        a.send_to(b"first", b.local_addr().unwrap()).unwrap();
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), b.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((&buf[..n], from), (&b"first"[..], a.local_addr().unwrap()));

        // After a read found the socket empty, `readable` waits for the next datagram.
        assert!(b.try_recv_from(&mut buf).is_err());
        let pending = tokio::time::timeout(Duration::from_millis(50), b.readable()).await;
        assert!(pending.is_err(), "readable with nothing waiting");
        a.send_to(b"second", b.local_addr().unwrap()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), b.readable())
            .await
            .unwrap()
            .unwrap();
        let (n, _) = b.try_recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"second");

        // Handed back to std and registered again, it still works.
        let again = ReadWatchedUdp::from_std(b.into_std()).unwrap();
        a.send_to(b"third", again.local_addr().unwrap()).unwrap();
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), again.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"third");
    }
}
