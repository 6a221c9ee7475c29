//! The tokio driver of a bridge: moves datagrams between two legs' RTP sockets through the
//! sans-IO [`Forwarder`]s, immediately, until told to stop. Each leg latches onto the source
//! of its first packet (symmetric RTP), as the sessions do. It runs on a relay thread (see
//! [`super::relay_threads`]), and one buffer holds every datagram it sends, so a packet costs
//! no allocation.

use std::net::SocketAddr;

use std::time::Instant;

use super::{
    relay::{BlockedKeys, Forwarder, LegMedia, OutStream},
    rtp::StreamPosition,
    rtp_socket::RtpSocket,
};

/// One side of a bridge: its socket, what it negotiated and where its SDP said to send.
pub struct BridgeLeg<'a> {
    pub socket: &'a mut RtpSocket,
    pub media: LegMedia,
    pub remote: SocketAddr,
    /// The stream sent toward this leg: a new one, or the continuation of the leg's session.
    pub out: OutStream,
    /// Keys whose events from this leg are not relayed to the other.
    pub blocked: BlockedKeys,
}

/// Which directions of a relay are open: a leg on hold (its SDP says it does not receive)
/// gets nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayGates {
    pub to_a: bool,
    pub to_b: bool,
}

impl Default for RelayGates {
    fn default() -> Self {
        RelayGates {
            to_a: true,
            to_b: true,
        }
    }
}

/// Counters of a finished relay, per direction (a→b, b→a).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    pub a_to_b: u64,
    pub b_to_a: u64,
    pub dropped: u64,
    /// Where the stream sent toward each leg stands, for whoever sends there next.
    pub a_out: Option<StreamPosition>,
    pub b_out: Option<StreamPosition>,
}

/// Relay until `stop` completes. The sockets are borrowed, so each leg's session can take
/// them back afterwards (a failed or ended bridge returns the call to its script).
pub async fn relay(
    a: BridgeLeg<'_>,
    b: BridgeLeg<'_>,
    mut gates: tokio::sync::watch::Receiver<RelayGates>,
    stop: impl std::future::Future<Output = ()>,
) -> RelayStats {
    let mut ab = Forwarder::new(a.media, b.media, b.out).blocking(a.blocked);
    let mut ba = Forwarder::new(b.media, a.media, a.out).blocking(b.blocked);
    let (mut a_dest, mut b_dest) = (a.remote, b.remote);
    let (mut a_latched, mut b_latched) = (false, false);
    let (a_sock, b_sock) = (a.socket, b.socket);
    // One buffer for every datagram sent: nothing is allocated per packet.
    let mut out = Vec::with_capacity(2048);
    tokio::pin!(stop);
    let apply = |g: RelayGates, ab: &mut Forwarder, ba: &mut Forwarder| {
        ab.set_open(g.to_b);
        ba.set_open(g.to_a);
    };
    apply(*gates.borrow_and_update(), &mut ab, &mut ba);
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            Ok(()) = gates.changed() => {
                apply(*gates.borrow_and_update(), &mut ab, &mut ba);
            }
            r = a_sock.recv_raw() => {
                let Ok((data, from)) = r else { continue };
                if !a_latched { a_dest = from; a_latched = true; }
                if from != a_dest { continue; }
                if ab.forward_into(Instant::now(), data, &mut out).is_ok() {
                    let _ = b_sock.send_raw(&out, b_dest);
                }
            }
            r = b_sock.recv_raw() => {
                let Ok((data, from)) = r else { continue };
                if !b_latched { b_dest = from; b_latched = true; }
                if from != b_dest { continue; }
                if ba.forward_into(Instant::now(), data, &mut out).is_ok() {
                    let _ = a_sock.send_raw(&out, a_dest);
                }
            }
        }
    }
    RelayStats {
        a_to_b: ab.forwarded,
        b_to_a: ba.forwarded,
        dropped: ab.dropped + ba.dropped,
        a_out: ba.position(),
        b_out: ab.position(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{g711::G711, rtp::build, rtp::RtpPacket, PortAllocator};
    use std::{sync::Arc, time::Duration};
    use tokio::net::UdpSocket;

    #[tokio::test]
    async fn packets_cross_both_ways_transcoded_with_little_delay() {
        let ports = Arc::new(PortAllocator::new(45000..=45999));
        let ip = "127.0.0.1".parse().unwrap();
        let mut sa = RtpSocket::bind(&ports, ip).await.unwrap();
        let mut sb = RtpSocket::bind(&ports, ip).await.unwrap();
        let (caller, callee) = (
            UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        );
        let (a_addr, b_addr) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
        let pcmu = LegMedia {
            codec: G711::Pcmu,
            audio_pt: 0,
            dtmf_pt: Some(101),
        };
        let pcma = LegMedia {
            codec: G711::Pcma,
            audio_pt: 8,
            dtmf_pt: Some(96),
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let caller_addr = caller.local_addr().unwrap();
        let callee_addr = callee.local_addr().unwrap();
        let relay_task = tokio::spawn(async move {
            relay(
                BridgeLeg {
                    socket: &mut sa,
                    media: pcmu,
                    remote: caller_addr,
                    out: OutStream::New { ssrc: 11 },
                    blocked: Default::default(),
                },
                BridgeLeg {
                    socket: &mut sb,
                    media: pcma,
                    remote: callee_addr,
                    out: OutStream::New { ssrc: 22 },
                    blocked: Default::default(),
                },
                tokio::sync::watch::channel(RelayGates::default()).1,
                async {
                    let _ = stop_rx.await;
                },
            )
            .await
        });
        let mut worst = Duration::ZERO;
        let mut buf = [0u8; 512];
        for i in 0..50u16 {
            let sent = Instant::now();
            caller
                .send_to(
                    &build(0, i == 0, i, i as u32 * 160, 5, &[0xF0; 160]),
                    a_addr,
                )
                .await
                .unwrap();
            let (n, _) = tokio::time::timeout(Duration::from_secs(1), callee.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            worst = worst.max(sent.elapsed());
            let p = RtpPacket::parse(&buf[..n]).unwrap();
            assert_eq!((p.pt, p.ssrc, p.payload.len()), (8, 22, 160));
            callee
                .send_to(&build(96, false, 900 + i, 0, 6, &[1, 10, 0, 160]), b_addr)
                .await
                .unwrap();
            let (n, _) = tokio::time::timeout(Duration::from_secs(1), caller.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            let p = RtpPacket::parse(&buf[..n]).unwrap();
            assert_eq!((p.pt, p.ssrc), (101, 11));
        }
        // Loopback plus one hop through the relay: well under a frame.
        assert!(worst < Duration::from_millis(20), "{worst:?}");
        stop_tx.send(()).unwrap();
        let stats = relay_task.await.unwrap();
        assert_eq!((stats.a_to_b, stats.b_to_a), (50, 50));
    }
}
