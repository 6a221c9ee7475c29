//! G.711 for the test peers: the two codecs a call can negotiate, and A-law written here from
//! the G.711 recommendation (µ-law lives beside the caller in `mod.rs`), so a test never trusts
//! callforge's own codec to check callforge.

use super::{linear_to_ulaw, ulaw_to_linear};

/// An audio codec the test peers can offer, answer and send: G.711 at 8 kHz, 20 ms frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// G.711 µ-law, static payload type 0.
    Pcmu,
    /// G.711 A-law, static payload type 8.
    Pcma,
}

impl Codec {
    /// The static RTP payload type (RFC 3551).
    pub fn pt(self) -> u8 {
        match self {
            Codec::Pcmu => 0,
            Codec::Pcma => 8,
        }
    }

    /// The encoding name used in `a=rtpmap`.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Pcmu => "PCMU",
            Codec::Pcma => "PCMA",
        }
    }

    /// The codec with this static payload type, if it is one of ours.
    pub fn from_pt(pt: u8) -> Option<Codec> {
        match pt {
            0 => Some(Codec::Pcmu),
            8 => Some(Codec::Pcma),
            _ => None,
        }
    }

    /// The codec with this `a=rtpmap` encoding name (case-insensitive), if it is one of ours.
    pub fn from_name(name: &str) -> Option<Codec> {
        if name.eq_ignore_ascii_case("PCMU") {
            Some(Codec::Pcmu)
        } else if name.eq_ignore_ascii_case("PCMA") {
            Some(Codec::Pcma)
        } else {
            None
        }
    }

    pub fn encode_sample(self, sample: i16) -> u8 {
        match self {
            Codec::Pcmu => linear_to_ulaw(sample),
            Codec::Pcma => linear_to_alaw(sample),
        }
    }

    pub fn decode_sample(self, code: u8) -> i16 {
        match self {
            Codec::Pcmu => ulaw_to_linear(code),
            Codec::Pcma => alaw_to_linear(code),
        }
    }

    pub fn encode(self, samples: &[i16]) -> Vec<u8> {
        samples.iter().map(|&s| self.encode_sample(s)).collect()
    }

    pub fn decode(self, codes: &[u8]) -> Vec<i16> {
        codes.iter().map(|&c| self.decode_sample(c)).collect()
    }
}

/// G.711 A-law encoding of one 16-bit sample.
///
/// A-law works on 13-bit linear samples (the top 13 bits of ours). The magnitude falls in one
/// of eight segments: segment 0 covers 0..32 in steps of 2, and segment `s` (1..=7) covers
/// `16 << s .. 32 << s` in steps of `1 << s`. The code is sign (1 = positive), three segment
/// bits and four step bits, with the even bits inverted for transmission (XOR 0x55).
/// Negative samples use the one's complement magnitude, so -1 sits next to 0 like +0 does.
pub fn linear_to_alaw(sample: i16) -> u8 {
    let thirteen = (sample as i32) >> 3; // -4096..=4095
    let (sign, magnitude) = if thirteen >= 0 {
        (0x80, thirteen)
    } else {
        (0x00, -thirteen - 1)
    };
    let magnitude = magnitude.min(0x0fff);
    let code = if magnitude < 32 {
        magnitude >> 1
    } else {
        // Segment = position of the highest set bit above bit 4.
        let segment = 31 - (magnitude as u32).leading_zeros() as i32 - 4;
        (segment << 4) | ((magnitude >> segment) & 0x0f)
    };
    ((sign | code) ^ 0x55) as u8
}

/// G.711 A-law decoding: the middle of the code's quantisation interval, scaled to 16 bits.
pub fn alaw_to_linear(code: u8) -> i16 {
    let a = (code ^ 0x55) as i32;
    let segment = (a >> 4) & 0x07;
    let step = a & 0x0f;
    let magnitude = if segment == 0 {
        (step << 1) + 1
    } else {
        ((step | 0x10) << segment) + (1 << (segment - 1))
    };
    let linear = (magnitude << 3) as i16;
    if a & 0x80 != 0 {
        linear
    } else {
        -linear
    }
}
