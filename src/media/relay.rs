//! Sans-IO RTP relay between the two legs of a bridged call (callforge as a B2BUA).
//!
//! Each direction is a [`Forwarder`]: it takes a datagram received on one leg and returns the
//! datagram to send on the other, or nothing. It
//! - rewrites SSRC, sequence number and timestamp into the outgoing leg's own stream, as an
//!   offset from the incoming stream: gaps (loss) stay visible to the far end's concealment,
//!   and when the incoming SSRC changes (a re-INVITE, a new media server) the offsets are
//!   re-anchored so the outgoing stream stays continuous;
//! - transcodes PCMU↔PCMA sample by sample when the legs negotiated different codecs;
//! - relays RFC 4733 telephone-events under the outgoing leg's negotiated payload number (and
//!   drops them when that leg has none, or when the key is one the script blocked);
//! - drops anything else (unknown payload types, RTCP, malformed datagrams).
//!
//! Forwarding is immediate (no pacing, no buffering), so the relay adds no latency of its own.

use std::sync::{
    atomic::{AtomicU16, Ordering},
    Arc,
};

use super::{
    g711::G711,
    rtp::{build, RtpPacket, FRAME_SAMPLES},
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
    Blocked(u8),
}

/// One direction of a relay: packets in from `from`, out toward `to`.
#[derive(Debug)]
pub struct Forwarder {
    from: LegMedia,
    to: LegMedia,
    out_ssrc: u32,
    anchor: Option<Anchor>,
    last_out: Option<(u16, u32)>,
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
    pub fn new(from: LegMedia, to: LegMedia, out_ssrc: u32) -> Self {
        Forwarder {
            from,
            to,
            out_ssrc,
            anchor: None,
            last_out: None,
            blocked: BlockedKeys::default(),
            forwarded: 0,
            dropped: 0,
        }
    }

    /// Drop the telephone-events of `keys` instead of relaying them.
    pub fn blocking(mut self, keys: BlockedKeys) -> Self {
        self.blocked = keys;
        self
    }

    /// The datagram to send on the other leg for one received on this one.
    pub fn forward(&mut self, datagram: &[u8]) -> Result<Vec<u8>, Dropped> {
        let result = self.rewrite(datagram);
        match result {
            Ok(_) => self.forwarded += 1,
            Err(_) => self.dropped += 1,
        }
        result
    }

    fn rewrite(&mut self, datagram: &[u8]) -> Result<Vec<u8>, Dropped> {
        let packet = RtpPacket::parse(datagram).map_err(|_| Dropped::Malformed)?;
        let (pt, payload) = if packet.pt == self.from.audio_pt {
            let payload = if self.from.codec == self.to.codec {
                packet.payload.clone()
            } else {
                packet
                    .payload
                    .iter()
                    .map(|&b| {
                        self.to
                            .codec
                            .encode_sample(self.from.codec.decode_sample(b))
                    })
                    .collect()
            };
            (self.to.audio_pt, payload)
        } else if Some(packet.pt) == self.from.dtmf_pt {
            if let Some(&event) = packet.payload.first().filter(|e| self.blocked.blocks(**e)) {
                return Err(Dropped::Blocked(event));
            }
            let pt = self.to.dtmf_pt.ok_or(Dropped::NoDtmfOnOtherLeg)?;
            (pt, packet.payload.clone())
        } else {
            return Err(Dropped::UnknownPayloadType(packet.pt));
        };
        let anchor = match self.anchor {
            Some(a) if a.in_ssrc == packet.ssrc => a,
            _ => {
                // First packet, or a new incoming stream: continue our outgoing one.
                let (next_seq, next_ts) = match self.last_out {
                    Some((seq, ts)) => (seq.wrapping_add(1), ts.wrapping_add(FRAME_SAMPLES as u32)),
                    None => (random_u16(), random_u32()),
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
        let seq = packet.seq.wrapping_add(anchor.seq_offset);
        let ts = packet.timestamp.wrapping_add(anchor.ts_offset);
        // Track the newest packet sent (sequence order with wraparound), for re-anchoring.
        let newer = match self.last_out {
            None => true,
            Some((last, _)) => seq.wrapping_sub(last) < 0x8000 && seq != last,
        };
        if newer {
            self.last_out = Some((seq, ts));
        }
        Ok(build(pt, packet.marker, seq, ts, self.out_ssrc, &payload))
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

    fn parse(d: &[u8]) -> RtpPacket {
        RtpPacket::parse(d).unwrap()
    }

    #[test]
    fn same_codec_keeps_payload_and_rewrites_the_stream() {
        let mut f = Forwarder::new(PCMU, PCMU, 0xABCD);
        let a = parse(
            &f.forward(&build(0, true, 100, 1000, 7, &[1, 2, 3]))
                .unwrap(),
        );
        let b = parse(
            &f.forward(&build(0, false, 101, 1160, 7, &[4, 5, 6]))
                .unwrap(),
        );
        assert_eq!(a.ssrc, 0xABCD);
        assert_eq!(a.payload, [1, 2, 3]);
        assert!(a.marker && !b.marker);
        assert_eq!(b.seq, a.seq.wrapping_add(1));
        assert_eq!(b.timestamp, a.timestamp.wrapping_add(160));
        // A gap stays a gap: loss remains visible to the far end.
        let c = parse(&f.forward(&build(0, false, 104, 1640, 7, &[7])).unwrap());
        assert_eq!(c.seq, a.seq.wrapping_add(4));
    }

    #[test]
    fn a_new_incoming_ssrc_continues_the_outgoing_stream() {
        let mut f = Forwarder::new(PCMU, PCMU, 1);
        let a = parse(
            &f.forward(&build(0, false, 65535, 4_294_967_200, 7, &[0]))
                .unwrap(),
        );
        let b = parse(&f.forward(&build(0, false, 9, 50, 8, &[0])).unwrap());
        assert_eq!(b.seq, a.seq.wrapping_add(1));
        assert_eq!(b.timestamp, a.timestamp.wrapping_add(160));
        let c = parse(&f.forward(&build(0, false, 10, 210, 8, &[0])).unwrap());
        assert_eq!(c.seq, b.seq.wrapping_add(1));
    }

    #[test]
    fn pcmu_to_pcma_transcodes_every_sample() {
        let mut f = Forwarder::new(PCMU, PCMA, 1);
        let samples: Vec<i16> = (-40..40).map(|i| i * 800).collect();
        let ulaw: Vec<u8> = samples.iter().map(|&s| ulaw_encode(s)).collect();
        let out = parse(&f.forward(&build(0, false, 1, 0, 2, &ulaw)).unwrap());
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
        let mut f = Forwarder::new(PCMU, PCMA, 1);
        let out = parse(
            &f.forward(&build(101, true, 1, 0, 2, &[5, 10, 0, 160]))
                .unwrap(),
        );
        assert_eq!(out.pt, 96);
        assert_eq!(out.payload, [5, 10, 0, 160]);
        let no_dtmf = LegMedia {
            dtmf_pt: None,
            ..PCMA
        };
        let mut f = Forwarder::new(PCMU, no_dtmf, 1);
        assert_eq!(
            f.forward(&build(101, true, 1, 0, 2, &[5, 10, 0, 160])),
            Err(Dropped::NoDtmfOnOtherLeg)
        );
        assert_eq!(
            f.forward(&build(13, false, 1, 0, 2, &[0])),
            Err(Dropped::UnknownPayloadType(13))
        );
        assert_eq!(f.forward(b"garbage"), Err(Dropped::Malformed));
        assert_eq!(f.dropped, 3);
    }

    #[test]
    fn blocked_keys_are_not_relayed_and_a_change_applies_at_once() {
        let keys = BlockedKeys::default();
        keys.set("1*d");
        let mut f = Forwarder::new(PCMU, PCMA, 1).blocking(keys.clone());
        let event = |e: u8, seq: u16| build(101, true, seq, 0, 2, &[e, 10, 0, 160]);
        assert_eq!(f.forward(&event(1, 1)), Err(Dropped::Blocked(1)));
        assert_eq!(f.forward(&event(10, 2)), Err(Dropped::Blocked(10)));
        assert_eq!(
            f.forward(&event(15, 3)),
            Err(Dropped::Blocked(15)),
            "d is D"
        );
        assert_eq!(parse(&f.forward(&event(2, 4)).unwrap()).payload[0], 2);
        // Audio is never blocked.
        assert!(f.forward(&build(0, false, 5, 160, 2, &[0xff; 160])).is_ok());
        keys.set("");
        assert_eq!(parse(&f.forward(&event(1, 6)).unwrap()).payload[0], 1);
    }
}
