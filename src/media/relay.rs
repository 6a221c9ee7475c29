//! Sans-IO RTP relay between the two legs of a bridged call (callforge as a B2BUA).
//!
//! Each direction is a [`Forwarder`]: it takes a datagram received on one leg and returns the
//! datagram to send on the other, or nothing. It
//! - rewrites SSRC, sequence number and timestamp into the outgoing leg's own stream, as an
//!   offset from the incoming stream: gaps (loss) stay visible to the far end's concealment,
//!   and when the incoming SSRC changes (a re-INVITE, a new media server) the offsets are
//!   re-anchored so the outgoing stream stays continuous;
//! - continues, at a hand-over, the stream the call's media session was sending on that leg
//!   ([`OutStream::Continue`]), and reports where its own stream stands
//!   ([`Forwarder::position`]) so the session continues it in turn: one SSRC, one sequence
//!   and one timeline per leg across answer, prompts, ringback and bridges (RFC 3550);
//! - sets the marker bit of the first packet after a hand-over itself rather than copying the
//!   incoming packet's;
//! - transcodes PCMU↔PCMA sample by sample when the legs negotiated different codecs;
//! - relays RFC 4733 telephone-events under the outgoing leg's negotiated payload number (and
//!   drops them when that leg has none, or when the key is one the script blocked);
//! - drops anything else (unknown payload types, RTCP, malformed datagrams).
//!
//! Forwarding is immediate (no pacing, no buffering), so the relay adds no latency of its own.

use std::{
    sync::{
        atomic::{AtomicU16, Ordering},
        Arc,
    },
    time::Instant,
};

use super::{
    g711::G711,
    rtp::{build_into, RtpView, StreamPosition, FRAME, FRAME_SAMPLES},
};

/// Keys a leg's RFC 4733 events must not be relayed for (`ctx.blockDtmf`): one bit per event
/// code 0–15 (`0`–`9`, `*`, `#`, `A`–`D`). Shared, so a block set during a bridge applies at
/// once.
#[derive(Debug, Clone, Default)]
pub struct BlockedKeys(Arc<AtomicU16>);

impl BlockedKeys {
    /// Block exactly the keys in `digits` (others are ignored); `""` unblocks all.
    pub fn set(&self, digits: &str) {
        let mask = digits
            .chars()
            .filter_map(event_code)
            .fold(0u16, |m, e| m | (1 << e));
        self.0.store(mask, Ordering::Relaxed);
    }

    pub fn blocks(&self, event: u8) -> bool {
        event < 16 && self.0.load(Ordering::Relaxed) & (1 << event) != 0
    }
}

/// The RFC 4733 event code of a key.
fn event_code(key: char) -> Option<u8> {
    match key.to_ascii_uppercase() {
        d @ '0'..='9' => Some(d as u8 - b'0'),
        '*' => Some(10),
        '#' => Some(11),
        l @ 'A'..='D' => Some(l as u8 - b'A' + 12),
        _ => None,
    }
}

/// What one leg negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegMedia {
    pub codec: G711,
    pub audio_pt: u8,
    pub dtmf_pt: Option<u8>,
}

/// Why a datagram was not forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dropped {
    Malformed,
    UnknownPayloadType(u8),
    NoDtmfOnOtherLeg,
    /// The outgoing leg is on hold in this direction (its SDP says it does not receive).
    Held,
    Blocked(u8),
}

/// The stream a [`Forwarder`] sends on its outgoing leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutStream {
    /// A stream of its own with this SSRC, random initial sequence number and timestamp
    /// (RFC 3550 §5.1); its first packet carries the marker bit.
    New { ssrc: u32 },
    /// The continuation of a stream another sender was sending (the call's media session,
    /// or an earlier relay): same SSRC, next sequence number, timestamps following the time
    /// that passed; the marker bit only after a pause.
    Continue(StreamPosition),
}

/// One direction of a relay: packets in from `from`, out toward `to`.
#[derive(Debug)]
pub struct Forwarder {
    from: LegMedia,
    to: LegMedia,
    out_ssrc: u32,
    /// Where the outgoing stream stands; `None` until a new stream sends its first packet.
    position: Option<StreamPosition>,
    anchor: Option<Anchor>,
    /// False while the outgoing leg is held in this direction: nothing is sent to it.
    open: bool,
    /// The next packet sent starts a talk spurt (the direction was just reopened).
    reopened: bool,
    blocked: BlockedKeys,
    pub forwarded: u64,
    pub dropped: u64,
}

#[derive(Debug, Clone, Copy)]
struct Anchor {
    in_ssrc: u32,
    seq_offset: u16,
    ts_offset: u32,
}

impl Forwarder {
    pub fn new(from: LegMedia, to: LegMedia, out: OutStream) -> Self {
        let (out_ssrc, position) = match out {
            OutStream::New { ssrc } => (ssrc, None),
            OutStream::Continue(p) => (p.ssrc, Some(p)),
        };
        Forwarder {
            from,
            to,
            out_ssrc,
            position,
            anchor: None,
            open: true,
            reopened: false,
            blocked: BlockedKeys::default(),
            forwarded: 0,
            dropped: 0,
        }
    }

    /// Opens or closes this direction (hold, RFC 3264 §8.4). While closed, packets are
    /// dropped and the outgoing stream pauses; it resumes with the next sequence number, a
    /// timestamp that kept following the incoming stream, and the marker bit.
    pub fn set_open(&mut self, open: bool) {
        if open && !self.open {
            self.reopened = true;
        }
        self.open = open;
    }

    /// Where the outgoing stream stands, for whoever sends on that leg next; `None` when a
    /// new stream never sent a packet.
    pub fn position(&self) -> Option<StreamPosition> {
        self.position
    }

    /// Drop the telephone-events of `keys` instead of relaying them.
    pub fn blocking(mut self, keys: BlockedKeys) -> Self {
        self.blocked = keys;
        self
    }

    /// The datagram to send on the other leg for one received on this one at `now`.
    pub fn forward(&mut self, now: Instant, datagram: &[u8]) -> Result<Vec<u8>, Dropped> {
        let mut out = Vec::new();
        self.forward_into(now, datagram, &mut out).map(|()| out)
    }

    /// Like [`Forwarder::forward`], writing the datagram into `out` (its allocation reused):
    /// the relay's hot path allocates nothing per packet.
    pub fn forward_into(
        &mut self,
        now: Instant,
        datagram: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Dropped> {
        let result = self.rewrite(now, datagram, out);
        match result {
            Ok(_) => self.forwarded += 1,
            Err(_) => self.dropped += 1,
        }
        result
    }

    fn rewrite(&mut self, now: Instant, datagram: &[u8], out: &mut Vec<u8>) -> Result<(), Dropped> {
        let packet = RtpView::parse(datagram).map_err(|_| Dropped::Malformed)?;
        if !self.open {
            return Err(Dropped::Held);
        }
        let is_audio = packet.pt == self.from.audio_pt;
        let (from_codec, to_codec) = (self.from.codec, self.to.codec);
        let transcode = is_audio && from_codec != to_codec;
        let pt = if is_audio {
            self.to.audio_pt
        } else if Some(packet.pt) == self.from.dtmf_pt {
            if let Some(&event) = packet.payload.first().filter(|e| self.blocked.blocks(**e)) {
                return Err(Dropped::Blocked(event));
            }
            self.to.dtmf_pt.ok_or(Dropped::NoDtmfOnOtherLeg)?
        } else {
            return Err(Dropped::UnknownPayloadType(packet.pt));
        };
        let payload = packet.payload;
        let mut marker = packet.marker;
        let mut anchor = match self.anchor {
            Some(a) if a.in_ssrc == packet.ssrc => a,
            _ => {
                // First packet, or a new incoming stream: the marker bit is ours, not the
                // incoming one's (a new stream starts a talk spurt; a continued one only after
                // a pause), and the outgoing stream goes on where it stands.
                let (next_seq, next_ts) = match self.position {
                    Some(p) => {
                        marker = p.paused_at(now);
                        (p.next_seq, p.timestamp_at(now))
                    }
                    None => {
                        marker = true;
                        (random_u16(), random_u32())
                    }
                };
                let a = Anchor {
                    in_ssrc: packet.ssrc,
                    seq_offset: next_seq.wrapping_sub(packet.seq),
                    ts_offset: next_ts.wrapping_sub(packet.timestamp),
                };
                self.anchor = Some(a);
                a
            }
        };
        if std::mem::take(&mut self.reopened) {
            // After a hold the sequence goes on from the last packet sent (the packets held
            // back were not lost); the timestamps kept following the incoming stream's clock.
            if let Some(p) = self.position {
                anchor.seq_offset = p.next_seq.wrapping_sub(packet.seq);
                self.anchor = Some(anchor);
            }
            marker = true;
        }
        let seq = packet.seq.wrapping_add(anchor.seq_offset);
        let ts = packet.timestamp.wrapping_add(anchor.ts_offset);
        // Track the newest packet sent (sequence order with wraparound), for whoever continues.
        let newer = match self.position {
            None => true,
            Some(p) => seq.wrapping_sub(p.next_seq) < 0x8000,
        };
        if newer {
            // G.711 carries one sample per byte (at least a frame is assumed); an event's
            // timestamp is its start, so count one frame.
            let samples = if is_audio {
                payload.len().max(FRAME_SAMPLES)
            } else {
                FRAME_SAMPLES
            };
            self.position = Some(StreamPosition {
                ssrc: self.out_ssrc,
                next_seq: seq.wrapping_add(1),
                next_ts: ts.wrapping_add(samples as u32),
                due: now + FRAME * (samples / FRAME_SAMPLES).max(1) as u32,
            });
        }
        let bytes = payload.iter().map(|&b| {
            if transcode {
                to_codec.encode_sample(from_codec.decode_sample(b))
            } else {
                b
            }
        });
        build_into(out, pt, marker, seq, ts, self.out_ssrc, bytes);
        Ok(())
    }
}

fn random_u32() -> u32 {
    fastrand::u32(..)
}

fn random_u16() -> u16 {
    fastrand::u16(..)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::g711::{alaw_decode, ulaw_encode};
    use crate::media::rtp::{build, RtpPacket};

    const PCMU: LegMedia = LegMedia {
        codec: G711::Pcmu,
        audio_pt: 0,
        dtmf_pt: Some(101),
    };
    const PCMA: LegMedia = LegMedia {
        codec: G711::Pcma,
        audio_pt: 8,
        dtmf_pt: Some(96),
    };

    fn t0() -> Instant {
        thread_local!(static T0: Instant = Instant::now());
        T0.with(|t| *t)
    }

    fn parse(d: &[u8]) -> RtpPacket {
        RtpPacket::parse(d).unwrap()
    }

    #[test]
    fn same_codec_keeps_payload_and_rewrites_the_stream() {
        let mut f = Forwarder::new(PCMU, PCMU, OutStream::New { ssrc: 0xABCD });
        let a = parse(
            &f.forward(t0(), &build(0, true, 100, 1000, 7, &[1, 2, 3]))
                .unwrap(),
        );
        let b = parse(
            &f.forward(t0(), &build(0, false, 101, 1160, 7, &[4, 5, 6]))
                .unwrap(),
        );
        assert_eq!(a.ssrc, 0xABCD);
        assert_eq!(a.payload, [1, 2, 3]);
        assert!(a.marker && !b.marker);
        assert_eq!(b.seq, a.seq.wrapping_add(1));
        assert_eq!(b.timestamp, a.timestamp.wrapping_add(160));
        // A gap stays a gap: loss remains visible to the far end.
        let c = parse(
            &f.forward(t0(), &build(0, false, 104, 1640, 7, &[7]))
                .unwrap(),
        );
        assert_eq!(c.seq, a.seq.wrapping_add(4));
    }

    #[test]
    fn a_new_incoming_ssrc_continues_the_outgoing_stream() {
        let mut f = Forwarder::new(PCMU, PCMU, OutStream::New { ssrc: 1 });
        let a = parse(
            &f.forward(t0(), &build(0, false, 65535, 4_294_967_200, 7, &[0]))
                .unwrap(),
        );
        let b = parse(&f.forward(t0(), &build(0, false, 9, 50, 8, &[0])).unwrap());
        assert_eq!(b.seq, a.seq.wrapping_add(1));
        assert_eq!(b.timestamp, a.timestamp.wrapping_add(160));
        let c = parse(&f.forward(t0(), &build(0, false, 10, 210, 8, &[0])).unwrap());
        assert_eq!(c.seq, b.seq.wrapping_add(1));
    }

    #[test]
    fn pcmu_to_pcma_transcodes_every_sample() {
        let mut f = Forwarder::new(PCMU, PCMA, OutStream::New { ssrc: 1 });
        let samples: Vec<i16> = (-40..40).map(|i| i * 800).collect();
        let ulaw: Vec<u8> = samples.iter().map(|&s| ulaw_encode(s)).collect();
        let out = parse(&f.forward(t0(), &build(0, false, 1, 0, 2, &ulaw)).unwrap());
        assert_eq!(out.pt, 8);
        for (&s, &a) in samples.iter().zip(&out.payload) {
            let back = alaw_decode(a) as i32;
            // Two quantisations: within A-law's step at that level (plus µ-law's).
            let tolerance = (s as i32).abs() / 16 + 64;
            assert!((back - s as i32).abs() <= tolerance, "{s} -> {back}");
        }
    }

    #[test]
    fn dtmf_takes_the_other_legs_payload_number_or_is_dropped() {
        let mut f = Forwarder::new(PCMU, PCMA, OutStream::New { ssrc: 1 });
        let out = parse(
            &f.forward(t0(), &build(101, true, 1, 0, 2, &[5, 10, 0, 160]))
                .unwrap(),
        );
        assert_eq!(out.pt, 96);
        assert_eq!(out.payload, [5, 10, 0, 160]);
        let no_dtmf = LegMedia {
            dtmf_pt: None,
            ..PCMA
        };
        let mut f = Forwarder::new(PCMU, no_dtmf, OutStream::New { ssrc: 1 });
        assert_eq!(
            f.forward(t0(), &build(101, true, 1, 0, 2, &[5, 10, 0, 160])),
            Err(Dropped::NoDtmfOnOtherLeg)
        );
        assert_eq!(
            f.forward(t0(), &build(13, false, 1, 0, 2, &[0])),
            Err(Dropped::UnknownPayloadType(13))
        );
        assert_eq!(f.forward(t0(), b"garbage"), Err(Dropped::Malformed));
        assert_eq!(f.dropped, 3);
    }

    // ---- hand-overs: one SSRC, one sequence, one timeline per leg (RFC 3550) ----

    use crate::media::rtp::FRAME;
    use crate::media::session::{MediaSession, SessionConfig};
    use std::time::Duration;

    fn session_frames(s: &mut MediaSession, until: Instant) -> Vec<RtpPacket> {
        std::iter::from_fn(|| s.poll_transmit(until))
            .map(|t| parse(&t.data))
            .collect()
    }

    /// Every packet continues the one before: same SSRC, next sequence number, timestamp one
    /// frame on; the marker bit only on the very first.
    fn assert_one_stream(pkts: &[RtpPacket]) {
        for (i, w) in pkts.windows(2).enumerate() {
            let (a, b) = (&w[0], &w[1]);
            assert_eq!(b.ssrc, a.ssrc, "SSRC changed at packet {}", i + 1);
            assert_eq!(
                b.seq,
                a.seq.wrapping_add(1),
                "sequence jump at packet {}",
                i + 1
            );
            assert_eq!(
                b.timestamp,
                a.timestamp.wrapping_add(160),
                "timestamp jump at packet {}",
                i + 1
            );
            assert!(!b.marker, "marker bit at packet {} mid-stream", i + 1);
        }
    }

    fn a_session(t0: Instant) -> MediaSession {
        let mut c = SessionConfig::new("192.0.2.10:4000".parse().unwrap(), G711::Pcmu);
        c.dtmf_pt = Some(101);
        c.ssrc = Some(0xCAFE);
        MediaSession::new(c, t0)
    }

    #[test]
    fn answer_prompt_bridge_and_back_to_script_media_is_one_stream_toward_the_caller() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut session = a_session(t0);
        // Answer: silence, then a prompt (and ringback would be the same: a session prompt).
        let mut heard = session_frames(&mut session, ms(60));
        session.play(vec![3000i16; 800].into(), false);
        heard.extend(session_frames(&mut session, ms(200)));
        // Bridge: the relay takes over between two frames.
        let mut to_a = Forwarder::new(PCMU, PCMU, OutStream::Continue(session.stream_position()));
        // The far phone's stream: its own SSRC, sequence and timestamps, marker on its first.
        for i in 0..30u16 {
            let datagram = build(
                0,
                i == 0,
                40_000 + i,
                9_000_000 + 160 * i as u32,
                0xB,
                &[0x55; 160],
            );
            heard.push(parse(
                &to_a.forward(ms(205 + 20 * i as u64), &datagram).unwrap(),
            ));
        }
        // Back to the script (hangupAfterBridge: false): the session continues the relay's.
        session.continue_stream(to_a.position().unwrap(), ms(800));
        session.play(vec![-3000i16; 800].into(), false);
        heard.extend(session_frames(&mut session, ms(1000)));
        assert_eq!(heard.len(), 4 + 7 + 30 + 11);
        assert!(heard[0].marker, "the stream starts with the marker bit");
        assert_one_stream(&heard);
        assert!(heard.iter().all(|p| p.ssrc == 0xCAFE));
        // The relayed part is the far phone's audio, the later part the second prompt.
        assert_eq!(heard[11].payload, vec![0x55; 160]);
        assert_eq!(heard[45].payload[0], G711::Pcmu.encode_sample(-3000));
    }

    #[test]
    fn a_second_bridge_and_a_new_far_stream_continue_the_same_stream() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut session = a_session(t0);
        let mut heard = session_frames(&mut session, ms(40));
        let mut relay = Forwarder::new(PCMU, PCMU, OutStream::Continue(session.stream_position()));
        for i in 0..5u16 {
            let d = build(0, false, 7 + i, 160 * i as u32, 1, &[1; 160]);
            heard.push(parse(&relay.forward(ms(45 + 20 * i as u64), &d).unwrap()));
        }
        // The far end changes SSRC mid-bridge (a re-INVITE to a media server).
        for i in 0..5u16 {
            // Its first packet is marked; the continued stream does not copy that.
            let d = build(0, i == 0, 60_000 + i, 77 + 160 * i as u32, 2, &[2; 160]);
            heard.push(parse(&relay.forward(ms(145 + 20 * i as u64), &d).unwrap()));
        }
        session.continue_stream(relay.position().unwrap(), ms(245));
        heard.extend(session_frames(&mut session, ms(300)));
        // A second bridge (the next ctx.bridge of the script) continues it again.
        let mut second = Forwarder::new(PCMU, PCMA, OutStream::Continue(session.stream_position()));
        for i in 0..5u16 {
            let d = build(0, false, 3 + i, 5 + 160 * i as u32, 3, &[3; 160]);
            heard.push(parse(&second.forward(ms(305 + 20 * i as u64), &d).unwrap()));
        }
        assert_one_stream(&heard);
    }

    #[test]
    fn the_b_leg_gets_a_new_stream_whose_first_marker_is_ours() {
        let t0 = Instant::now();
        let mut to_b = Forwarder::new(PCMU, PCMU, OutStream::New { ssrc: 0xB0B });
        // The caller is mid-talk-spurt (M=0): the B leg's stream still starts with M=1.
        let first = parse(
            &to_b
                .forward(t0, &build(0, false, 500, 8000, 0xA, &[0; 160]))
                .unwrap(),
        );
        assert!(first.marker);
        // Later talk-spurt starts of the caller are passed on; plain packets are not marked.
        let second = parse(
            &to_b
                .forward(t0 + FRAME, &build(0, false, 501, 8160, 0xA, &[0; 160]))
                .unwrap(),
        );
        let spurt = parse(
            &to_b
                .forward(t0 + FRAME * 5, &build(0, true, 502, 8800, 0xA, &[0; 160]))
                .unwrap(),
        );
        assert!(!second.marker && spurt.marker);
        // And the continuing stream toward the caller does not copy the far end's first M=1.
        let pos = to_b.position().unwrap();
        let mut to_a = Forwarder::new(PCMU, PCMU, OutStream::Continue(pos));
        let cont = parse(
            &to_a
                .forward(t0 + FRAME * 6, &build(0, true, 1, 1, 0xC, &[0; 160]))
                .unwrap(),
        );
        assert!(!cont.marker);
        assert_eq!((cont.ssrc, cont.seq), (0xB0B, spurt.seq.wrapping_add(1)));
        assert_eq!(cont.timestamp, spurt.timestamp.wrapping_add(160));
    }

    #[test]
    fn a_pause_at_a_hand_over_advances_the_timeline_and_marks_the_talk_spurt() {
        let t0 = Instant::now();
        let mut session = a_session(t0);
        let before = session_frames(&mut session, t0 + FRAME * 2);
        let last = before.last().unwrap().clone();
        let pos = session.stream_position();
        // Nothing is sent for 10 frames (the far end is slow to send its first packet).
        let mut relay = Forwarder::new(PCMU, PCMU, OutStream::Continue(pos));
        let p = parse(
            &relay
                .forward(t0 + FRAME * 13, &build(0, false, 1, 1, 9, &[0; 160]))
                .unwrap(),
        );
        assert!(p.marker);
        assert_eq!(p.seq, last.seq.wrapping_add(1));
        assert_eq!(p.timestamp, last.timestamp.wrapping_add(160 * 11));
        // Same when the session takes the stream back after a silent relay.
        let pos = relay.position().unwrap();
        session.continue_stream(pos, t0 + FRAME * 30);
        let back = session_frames(&mut session, t0 + FRAME * 30);
        assert_eq!(back.len(), 1);
        assert!(back[0].marker);
        assert_eq!(back[0].seq, p.seq.wrapping_add(1));
        assert_eq!(back[0].timestamp, p.timestamp.wrapping_add(160 * 17));
    }

    #[test]
    fn a_held_direction_sends_nothing_then_resumes_the_same_stream_with_a_marker() {
        let t0 = Instant::now();
        let mut f = Forwarder::new(PCMU, PCMU, OutStream::New { ssrc: 5 });
        let pkt = |i: u16| build(0, false, 100 + i, 160 * i as u32, 9, &[0; 160]);
        let before = parse(&f.forward(t0, &pkt(0)).unwrap());
        f.set_open(false);
        for i in 1..=10u16 {
            assert_eq!(
                f.forward(t0 + FRAME * i as u32, &pkt(i)),
                Err(Dropped::Held)
            );
        }
        f.set_open(true);
        let after = parse(&f.forward(t0 + FRAME * 11, &pkt(11)).unwrap());
        let next = parse(&f.forward(t0 + FRAME * 12, &pkt(12)).unwrap());
        assert_eq!(
            after.seq,
            before.seq.wrapping_add(1),
            "no gap: nothing was lost"
        );
        assert_eq!(after.timestamp, before.timestamp.wrapping_add(160 * 11));
        assert!(after.marker, "a new talk spurt after the hold");
        assert_eq!(next.seq, after.seq.wrapping_add(1));
        assert!(!next.marker);
    }

    #[test]
    fn blocked_keys_are_not_relayed_and_a_change_applies_at_once() {
        let keys = BlockedKeys::default();
        keys.set("1*d");
        let mut f = Forwarder::new(PCMU, PCMA, OutStream::New { ssrc: 1 }).blocking(keys.clone());
        let event = |e: u8, seq: u16| build(101, true, seq, 0, 2, &[e, 10, 0, 160]);
        assert_eq!(f.forward(t0(), &event(1, 1)), Err(Dropped::Blocked(1)));
        assert_eq!(f.forward(t0(), &event(10, 2)), Err(Dropped::Blocked(10)));
        assert_eq!(
            f.forward(t0(), &event(15, 3)),
            Err(Dropped::Blocked(15)),
            "d is D"
        );
        assert_eq!(parse(&f.forward(t0(), &event(2, 4)).unwrap()).payload[0], 2);
        // Audio is never blocked.
        assert!(f
            .forward(t0(), &build(0, false, 5, 160, 2, &[0xff; 160]))
            .is_ok());
        keys.set("");
        assert_eq!(parse(&f.forward(t0(), &event(1, 6)).unwrap()).payload[0], 1);
    }
}
