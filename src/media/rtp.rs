//! RTP packets and the send-side clock: parsing and building with `rtp-rs`, the drift-free 20 ms frame
//! clock, and the sender's sequence/timestamp/SSRC/marker state.

use rtp_rs::{RtpPacketBuilder, RtpReader, Seq};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Duration of one audio frame.
pub const FRAME: Duration = Duration::from_millis(20);
/// Samples (and RTP timestamp units) per frame at 8 kHz.
pub const FRAME_SAMPLES: usize = 160;
/// Frames a late poll may emit at once; beyond that the clock skips ahead (see [`FrameClock`]).
pub const MAX_BURST: u64 = 50;

/// Why a received datagram was not used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RtpError {
    /// Not a valid RTP v2 packet.
    #[error("malformed RTP packet: {0}")]
    Malformed(String),
    /// RTCP arriving multiplexed on the RTP port (RFC 5761); ignored by design.
    #[error("RTCP packet on the RTP port (ignored)")]
    Rtcp,
    /// A payload type that was not negotiated.
    #[error("RTP payload type {0} was not negotiated")]
    UnknownPayloadType(u8),
    /// A packet from another address after the session latched onto the peer.
    #[error("RTP from an unexpected source address (ignored after latching)")]
    ForeignSource,
}

/// An owned, parsed RTP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtpPacket {
    /// Payload type.
    pub pt: u8,
    /// Marker bit.
    pub marker: bool,
    /// Sequence number.
    pub seq: u16,
    /// Timestamp.
    pub timestamp: u32,
    /// Synchronisation source.
    pub ssrc: u32,
    /// Payload, without header extension and padding.
    pub payload: Vec<u8>,
}

/// A parsed RTP packet borrowing its payload from the datagram (no allocation): what the
/// relay reads. [`RtpPacket::parse`] is this plus a copy of the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpView<'a> {
    pub pt: u8,
    pub marker: bool,
    pub seq: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    /// Payload, without header extension and padding.
    pub payload: &'a [u8],
}

impl<'a> RtpView<'a> {
    /// Parses a datagram. RTCP multiplexed on the port is reported as [`RtpError::Rtcp`].
    pub fn parse(data: &'a [u8]) -> Result<Self, RtpError> {
        // RTCP packet types 200..=204 sit where RTP has marker+PT; RFC 5761 §4 demux rule.
        if data.len() >= 2 && (200..=204).contains(&data[1]) {
            return Err(RtpError::Rtcp);
        }
        let r = RtpReader::new(data).map_err(|e| RtpError::Malformed(format!("{e:?}")))?;
        Ok(RtpView {
            pt: r.payload_type(),
            marker: r.mark(),
            seq: r.sequence_number().into(),
            timestamp: r.timestamp(),
            ssrc: r.ssrc(),
            payload: r.payload(),
        })
    }
}

impl RtpPacket {
    /// Parses a datagram. RTCP multiplexed on the port is reported as [`RtpError::Rtcp`].
    pub fn parse(data: &[u8]) -> Result<Self, RtpError> {
        let v = RtpView::parse(data)?;
        Ok(RtpPacket {
            pt: v.pt,
            marker: v.marker,
            seq: v.seq,
            timestamp: v.timestamp,
            ssrc: v.ssrc,
            payload: v.payload.to_vec(),
        })
    }

    /// Serialises the packet (no CSRCs, extensions or padding).
    pub fn to_bytes(&self) -> Vec<u8> {
        build(
            self.pt,
            self.marker,
            self.seq,
            self.timestamp,
            self.ssrc,
            &self.payload,
        )
    }
}

/// Writes an RTP packet into `out` (cleared first, its allocation reused): the same bytes as
/// [`build`], for the relay, which sends one packet per datagram received and should not
/// allocate for each.
pub fn build_into(
    out: &mut Vec<u8>,
    pt: u8,
    marker: bool,
    seq: u16,
    timestamp: u32,
    ssrc: u32,
    payload: impl ExactSizeIterator<Item = u8>,
) {
    out.clear();
    out.reserve(12 + payload.len());
    out.push(0x80);
    out.push((pt & 0x7F) | if marker { 0x80 } else { 0 });
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&timestamp.to_be_bytes());
    out.extend_from_slice(&ssrc.to_be_bytes());
    out.extend(payload);
}

/// Builds an RTP packet. Payload types above 127 are masked to 7 bits rather than failing.
pub fn build(pt: u8, marker: bool, seq: u16, timestamp: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
    let b = RtpPacketBuilder::new()
        .payload_type(pt & 0x7F)
        .marked(marker)
        .sequence(Seq::from(seq))
        .timestamp(timestamp)
        .ssrc(ssrc)
        .payload(payload);
    // With a valid PT and no extension, building cannot fail; fall back to a manual header anyway.
    b.build().unwrap_or_else(|_| {
        let mut v = Vec::with_capacity(12 + payload.len());
        v.push(0x80);
        v.push((pt & 0x7F) | if marker { 0x80 } else { 0 });
        v.extend_from_slice(&seq.to_be_bytes());
        v.extend_from_slice(&timestamp.to_be_bytes());
        v.extend_from_slice(&ssrc.to_be_bytes());
        v.extend_from_slice(payload);
        v
    })
}

/// Where an outgoing RTP stream stands, so that another sender can continue it: RFC 3550 asks
/// for one SSRC with one continuous sequence and timeline, and receivers such as baresip drop
/// every packet after a jump. Passed between the call's media session and a bridge's relay at
/// each hand-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPosition {
    /// The stream's SSRC.
    pub ssrc: u32,
    /// Sequence number of the next packet.
    pub next_seq: u16,
    /// Timestamp of the next frame, which is due at `due`.
    pub next_ts: u32,
    /// When the next frame is due.
    pub due: Instant,
}

/// A pause longer than this before a stream continues starts a new talk spurt (marker bit).
pub const TALKSPURT_GAP: Duration = Duration::from_millis(60);

impl StreamPosition {
    /// The timestamp of a packet sent at `now`: the next frame's, advanced by the whole frames
    /// that elapsed since it was due, so the timeline keeps following the wall clock.
    pub fn timestamp_at(&self, now: Instant) -> u32 {
        let frames = now.saturating_duration_since(self.due).as_millis() / FRAME.as_millis();
        self.next_ts
            .wrapping_add((frames as u32).wrapping_mul(FRAME_SAMPLES as u32))
    }

    /// True when a packet sent at `now` follows a pause (it then carries the marker bit).
    pub fn paused_at(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.due) >= TALKSPURT_GAP
    }
}

/// Frame clock anchored at a start instant: frame `n` is due at `start + n * 20 ms`.
///
/// Deadlines are computed from the anchor, never from the previous send, so lateness in one
/// poll does not push later frames back. A poll that is late by several frames gets all of
/// them (the peer's jitter buffer absorbs the burst). After a stall longer than
/// [`MAX_BURST`] frames (a suspended process, say), the overdue frames beyond the burst are
/// skipped rather than flooded; they still advance the frame index, so the RTP timestamp
/// keeps tracking wall time.
#[derive(Debug, Clone)]
pub struct FrameClock {
    /// When frame `base` is due.
    start: Instant,
    base: u64,
    next: u64,
}

impl FrameClock {
    /// A clock whose frame 0 is due at `start`.
    pub fn new(start: Instant) -> Self {
        FrameClock {
            start,
            base: 0,
            next: 0,
        }
    }

    /// Moves the clock so its next frame is due at `at`; later frames follow 20 ms apart.
    /// Frame indices (and so RTP timestamps) continue unchanged.
    pub fn realign(&mut self, at: Instant) {
        self.start = at;
        self.base = self.next;
    }

    /// When the next frame is due.
    pub fn next_due(&self) -> Instant {
        self.due(self.next)
    }

    /// When frame `n` is due.
    pub fn due(&self, n: u64) -> Instant {
        // u32 frames of 20 ms is 2.7 years; saturate rather than overflow beyond.
        let k = n.saturating_sub(self.base);
        self.start + FRAME * u32::try_from(k).unwrap_or(u32::MAX)
    }

    /// Index of the next frame.
    pub fn next_index(&self) -> u64 {
        self.next
    }

    /// If a frame is due at `now`, returns its index and advances.
    pub fn poll(&mut self, now: Instant) -> Option<u64> {
        if now < self.next_due() {
            return None;
        }
        let behind = now.saturating_duration_since(self.next_due()).as_millis() as u64 / 20 + 1;
        if behind > MAX_BURST {
            self.next += behind - MAX_BURST;
        }
        let n = self.next;
        self.next += 1;
        Some(n)
    }
}

/// Send-side RTP header state: one random SSRC, sequence +1 per packet, timestamp +160 per frame.
#[derive(Debug, Clone)]
pub struct RtpSender {
    ssrc: u32,
    seq: u16,
    ts_base: u32,
    talkspurt_start: bool,
}

impl RtpSender {
    /// A sender with random SSRC, initial sequence and timestamp (RFC 3550 §5.1).
    pub fn new(ssrc: Option<u32>) -> Self {
        Self::with_initial(
            ssrc.unwrap_or_else(|| fastrand::u32(..)),
            fastrand::u16(..),
            fastrand::u32(..),
        )
    }

    /// A sender with fixed initial values (tests, or resuming after a re-INVITE).
    pub fn with_initial(ssrc: u32, seq: u16, ts_base: u32) -> Self {
        RtpSender {
            ssrc,
            seq,
            ts_base,
            talkspurt_start: true,
        }
    }

    /// A sender continuing a stream another sender started: same SSRC, the next sequence
    /// number, frame 0 at `ts_base`; the marker bit only after a pause.
    pub fn continuing(pos: &StreamPosition, now: Instant) -> Self {
        RtpSender {
            ssrc: pos.ssrc,
            seq: pos.next_seq,
            ts_base: pos.timestamp_at(now),
            talkspurt_start: pos.paused_at(now),
        }
    }

    /// Our SSRC.
    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// Sequence number of the next packet.
    pub fn next_seq(&self) -> u16 {
        self.seq
    }

    /// The RTP timestamp of frame `n` of the frame clock.
    pub fn timestamp_of(&self, frame: u64) -> u32 {
        self.ts_base
            .wrapping_add((frame as u32).wrapping_mul(FRAME_SAMPLES as u32))
    }

    /// Marks the next packet as the start of a talk spurt (after a pause in sending).
    pub fn begin_talkspurt(&mut self) {
        self.talkspurt_start = true;
    }

    /// Builds the next packet. `marker` is OR-ed with the talk-spurt marker.
    pub fn packet(&mut self, pt: u8, timestamp: u32, marker: bool, payload: &[u8]) -> Vec<u8> {
        let m = marker || self.talkspurt_start;
        self.talkspurt_start = false;
        let p = build(pt, m, self.seq, timestamp, self.ssrc, payload);
        self.seq = self.seq.wrapping_add(1);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_into_writes_what_build_does_and_reuses_its_buffer() {
        let mut out = Vec::new();
        for (pt, marker, seq, ts, ssrc, payload) in [
            (0u8, true, 1u16, 160u32, 0xDEAD_BEEFu32, vec![1u8, 2, 3]),
            (101, false, 65535, u32::MAX, 7, vec![5, 10, 0, 160]),
            (200, false, 0, 0, 0, vec![]),
        ] {
            build_into(&mut out, pt, marker, seq, ts, ssrc, payload.iter().copied());
            assert_eq!(out, build(pt, marker, seq, ts, ssrc, &payload));
        }
        let cap = out.capacity();
        build_into(&mut out, 0, false, 2, 2, 2, [0u8; 4].into_iter());
        assert_eq!((out.len(), out.capacity()), (16, cap));
    }

    #[test]
    fn parse_build_round_trip() {
        let p = RtpPacket {
            pt: 0,
            marker: true,
            seq: 65535,
            timestamp: 0xDEADBEEF,
            ssrc: 0x01020304,
            payload: vec![0xFF; 160],
        };
        let bytes = p.to_bytes();
        assert_eq!(bytes.len(), 172);
        assert_eq!(RtpPacket::parse(&bytes).unwrap(), p);
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = crate::media::testutil::XorShift::new(0x1234_5678);
        for len in 0..200 {
            for _ in 0..50 {
                let buf: Vec<u8> = (0..len).map(|_| rng.next_u32() as u8).collect();
                let _ = RtpPacket::parse(&buf);
                // Force the v2 bit pattern too, with padding/extension flags set at random.
                if len > 0 {
                    let mut b = buf.clone();
                    b[0] = 0x80 | (b[0] & 0x3F);
                    let _ = RtpPacket::parse(&b);
                }
            }
        }
        assert!(matches!(
            RtpPacket::parse(&[0x80]),
            Err(RtpError::Malformed(_))
        ));
        assert_eq!(RtpPacket::parse(&[0x80, 200, 0, 1]), Err(RtpError::Rtcp));
        // Padding length larger than the packet.
        let mut p = build(0, false, 1, 1, 1, &[1, 2, 3]);
        p[0] |= 0x20;
        *p.last_mut().unwrap() = 200;
        assert!(matches!(RtpPacket::parse(&p), Err(RtpError::Malformed(_))));
    }

    #[test]
    fn clock_has_no_drift_over_10000_frames_even_when_polled_late() {
        let t0 = Instant::now();
        let mut c = FrameClock::new(t0);
        let mut emitted = 0u64;
        // Poll at irregular late moments: 0..7 ms after each deadline, sometimes 3 frames late.
        let mut now = t0;
        let mut k = 0u64;
        while emitted < 10_000 {
            k += 1;
            let lateness = Duration::from_micros((k * 7919) % 7000);
            let skip = if k % 97 == 0 { 3 } else { 1 };
            now = (c.next_due() + FRAME * (skip - 1)).max(now) + lateness;
            while let Some(n) = c.poll(now) {
                assert_eq!(n, emitted, "no frame skipped or repeated");
                assert!(now >= t0 + FRAME * n as u32);
                emitted += 1;
            }
            assert!(c.next_due() > now);
        }
        // Every deadline sits exactly on the 20 ms grid: no accumulated error.
        assert!(emitted >= 10_000);
        assert_eq!(c.next_due(), t0 + FRAME * emitted as u32);
        assert_eq!(c.due(10_000), t0 + Duration::from_secs(200));
    }

    #[test]
    fn late_poll_emits_overdue_frames_and_long_stall_is_capped() {
        let t0 = Instant::now();
        let mut c = FrameClock::new(t0);
        assert_eq!(c.poll(t0), Some(0));
        assert_eq!(c.poll(t0 + Duration::from_millis(19)), None);
        let mut n = Vec::new();
        while let Some(i) = c.poll(t0 + Duration::from_millis(101)) {
            n.push(i);
        }
        assert_eq!(n, vec![1, 2, 3, 4, 5]);
        // A 10 s stall: at most MAX_BURST frames, the last being the currently due one.
        let late = t0 + Duration::from_secs(10) + Duration::from_millis(5);
        let mut burst = Vec::new();
        while let Some(i) = c.poll(late) {
            burst.push(i);
        }
        assert_eq!(burst.len() as u64, MAX_BURST);
        assert_eq!(*burst.last().unwrap(), 500);
        assert_eq!(c.next_due(), t0 + Duration::from_millis(501 * 20));
    }

    #[test]
    fn sender_sequence_timestamp_wrap_and_marker() {
        let mut s = RtpSender::with_initial(7, 65534, u32::MAX - 200);
        let pkts: Vec<_> = (0..4u64)
            .map(|n| {
                RtpPacket::parse(&s.packet(0, s.timestamp_of(n), false, &[0xFF; 160])).unwrap()
            })
            .collect();
        assert_eq!(
            pkts.iter().map(|p| p.seq).collect::<Vec<_>>(),
            vec![65534, 65535, 0, 1]
        );
        assert_eq!(
            pkts.iter().map(|p| p.timestamp).collect::<Vec<_>>(),
            vec![u32::MAX - 200, u32::MAX - 40, 119, 279]
        );
        assert_eq!(
            pkts.iter().map(|p| p.marker).collect::<Vec<_>>(),
            vec![true, false, false, false]
        );
        assert!(pkts.iter().all(|p| p.ssrc == 7));
        s.begin_talkspurt();
        assert!(
            RtpPacket::parse(&s.packet(0, 0, false, &[]))
                .unwrap()
                .marker
        );
    }

    #[test]
    fn random_ssrc_differs() {
        let a = RtpSender::new(None).ssrc();
        let b = RtpSender::new(None).ssrc();
        let c = RtpSender::new(None).ssrc();
        assert!(a != b || b != c);
        assert_eq!(RtpSender::new(Some(5)).ssrc(), 5);
    }

    #[test]
    fn a_realigned_clock_keeps_its_frame_numbers_and_20_ms_spacing() {
        let t0 = Instant::now();
        let mut c = FrameClock::new(t0);
        assert_eq!(c.poll(t0), Some(0));
        assert_eq!(c.poll(t0 + FRAME), Some(1));
        // Moved 7 ms later (a ticker's grid): frame 2 is due there, frame 3 20 ms after.
        let at = t0 + FRAME * 2 + Duration::from_millis(7);
        c.realign(at);
        assert_eq!(c.next_due(), at);
        assert_eq!(c.poll(at - Duration::from_millis(1)), None);
        assert_eq!(c.poll(at), Some(2));
        assert_eq!(c.next_due(), at + FRAME);
        assert_eq!(c.poll(at + FRAME), Some(3));
    }
}
