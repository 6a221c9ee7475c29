//! G.711 PCMU (µ-law) and PCMA (A-law) companding of 16-bit linear samples, table-driven.
//!
//! µ-law works on 14-bit linear values and A-law on 13-bit ones, so the encoders index a
//! table by the top 14 (resp. 13) bits of the sample. All four tables are computed at compile
//! time by `const fn`s from the segment/bias description in ITU-T G.711, so the hot path is
//! a single array lookup per sample.

/// µ-law payload byte for digital silence (positive zero).
pub const ULAW_SILENCE: u8 = 0xFF;
/// A-law payload byte for digital silence (smallest positive step).
pub const ALAW_SILENCE: u8 = 0xD5;

/// A G.711 variant, as negotiated in SDP (static payload types 0 and 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum G711 {
    /// PCMU, µ-law, static RTP payload type 0.
    Pcmu,
    /// PCMA, A-law, static RTP payload type 8.
    Pcma,
}

impl G711 {
    /// The static RTP payload type of this codec.
    pub fn static_payload_type(self) -> u8 {
        match self {
            G711::Pcmu => 0,
            G711::Pcma => 8,
        }
    }

    /// The codec for a static payload type, if it is 0 or 8.
    pub fn from_payload_type(pt: u8) -> Option<Self> {
        match pt {
            0 => Some(G711::Pcmu),
            8 => Some(G711::Pcma),
            _ => None,
        }
    }

    /// The byte that encodes silence.
    pub fn silence_byte(self) -> u8 {
        match self {
            G711::Pcmu => ULAW_SILENCE,
            G711::Pcma => ALAW_SILENCE,
        }
    }

    /// Encodes one sample.
    #[inline]
    pub fn encode_sample(self, s: i16) -> u8 {
        match self {
            G711::Pcmu => ulaw_encode(s),
            G711::Pcma => alaw_encode(s),
        }
    }

    /// Decodes one byte.
    #[inline]
    pub fn decode_sample(self, b: u8) -> i16 {
        match self {
            G711::Pcmu => ulaw_decode(b),
            G711::Pcma => alaw_decode(b),
        }
    }

    /// Encodes samples, appending one byte per sample to `out`.
    pub fn encode_into(self, samples: &[i16], out: &mut Vec<u8>) {
        out.extend(samples.iter().map(|&s| self.encode_sample(s)));
    }

    /// Decodes bytes, appending one sample per byte to `out`.
    pub fn decode_into(self, bytes: &[u8], out: &mut Vec<i16>) {
        out.extend(bytes.iter().map(|&b| self.decode_sample(b)));
    }
}

/// Encodes a sample to µ-law.
#[inline]
pub fn ulaw_encode(s: i16) -> u8 {
    // The arithmetic shift keeps the sign, the cast to u16 wraps negatives into the upper
    // half of the table, which is where `build_ulaw_encode` put them.
    ULAW_ENCODE[((s >> 2) as u16 & 0x3FFF) as usize]
}

/// Decodes a µ-law byte.
#[inline]
pub fn ulaw_decode(b: u8) -> i16 {
    ULAW_DECODE[b as usize]
}

/// Encodes a sample to A-law.
#[inline]
pub fn alaw_encode(s: i16) -> u8 {
    ALAW_ENCODE[((s >> 3) as u16 & 0x1FFF) as usize]
}

/// Decodes an A-law byte.
#[inline]
pub fn alaw_decode(b: u8) -> i16 {
    ALAW_DECODE[b as usize]
}

static ULAW_ENCODE: [u8; 16384] = build_ulaw_encode();
static ULAW_DECODE: [i16; 256] = build_ulaw_decode();
static ALAW_ENCODE: [u8; 8192] = build_alaw_encode();
static ALAW_DECODE: [i16; 256] = build_alaw_decode();

/// µ-law of a 14-bit value (-8192..=8191).
const fn ulaw_from_14bit(v: i32) -> u8 {
    const BIAS: i32 = 0x21;
    const CLIP: i32 = 8159;
    let (mut mag, mask) = if v < 0 { (-v, 0x7F) } else { (v, 0xFF) };
    if mag > CLIP {
        mag = CLIP;
    }
    mag += BIAS;
    // Segment = position of the leading one above bit 5; biased magnitudes fit 13 bits.
    let mut seg = 0;
    while seg < 8 && mag > (0x40 << seg) - 1 {
        seg += 1;
    }
    if seg >= 8 {
        return 0x7F ^ mask;
    }
    let code = ((seg << 4) | ((mag >> (seg + 1)) & 0x0F)) as u8;
    code ^ mask
}

const fn build_ulaw_encode() -> [u8; 16384] {
    let mut t = [0u8; 16384];
    let mut i = 0;
    while i < 16384 {
        // Index is the 14-bit two's complement value.
        let v = if i >= 8192 {
            i as i32 - 16384
        } else {
            i as i32
        };
        t[i] = ulaw_from_14bit(v);
        i += 1;
    }
    t
}

const fn build_ulaw_decode() -> [i16; 256] {
    let mut t = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        let u = !(i as u8);
        let mant = (u & 0x0F) as i32;
        let seg = ((u & 0x70) >> 4) as i32;
        let mag = (((mant << 3) + 0x84) << seg) - 0x84;
        t[i] = if u & 0x80 != 0 {
            -mag as i16
        } else {
            mag as i16
        };
        i += 1;
    }
    t
}

/// A-law of a 13-bit value (-4096..=4095).
const fn alaw_from_13bit(v: i32) -> u8 {
    // One's complement for negatives keeps the two halves symmetric (no negative zero).
    let (mag, mask) = if v < 0 { (-v - 1, 0x55) } else { (v, 0xD5) };
    let mut seg = 0;
    while seg < 8 && mag > (0x20 << seg) - 1 {
        seg += 1;
    }
    if seg >= 8 {
        return 0x7F ^ mask;
    }
    let mant = if seg < 2 {
        (mag >> 1) & 0x0F
    } else {
        (mag >> seg) & 0x0F
    };
    (((seg << 4) | mant) as u8) ^ mask
}

const fn build_alaw_encode() -> [u8; 8192] {
    let mut t = [0u8; 8192];
    let mut i = 0;
    while i < 8192 {
        let v = if i >= 4096 { i as i32 - 8192 } else { i as i32 };
        t[i] = alaw_from_13bit(v);
        i += 1;
    }
    t
}

const fn build_alaw_decode() -> [i16; 256] {
    let mut t = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        let a = (i as u8) ^ 0x55;
        let mant = ((a & 0x0F) as i32) << 4;
        let seg = ((a & 0x70) >> 4) as i32;
        let mag = match seg {
            0 => mant + 8,
            1 => mant + 0x108,
            _ => (mant + 0x108) << (seg - 1),
        };
        t[i] = if a & 0x80 != 0 {
            mag as i16
        } else {
            -mag as i16
        };
        i += 1;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference G.711 written from the standard's segment tables, independently of the
    // table builders above: segment endpoints are listed explicitly rather than computed.
    fn ref_ulaw(s: i16) -> u8 {
        let seg_end: [i32; 8] = [0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF];
        let mut v = (s as i32) >> 2;
        let sign = if v < 0 {
            v = -v;
            0x80
        } else {
            0x00
        };
        let v = v.min(8159) + 33;
        let seg = seg_end.iter().position(|&e| v <= e).unwrap_or(8) as i32;
        let out = if seg >= 8 {
            0x7F
        } else {
            (seg << 4) | ((v >> (seg + 1)) & 0xF)
        };
        // Transmitted code is the one's complement of sign|segment|mantissa.
        !((sign | out) as u8)
    }

    fn ref_ulaw_expand(c: u8) -> i16 {
        let c = !c;
        let sign = c & 0x80;
        let exp = ((c >> 4) & 7) as i32;
        let mant = (c & 0xF) as i32;
        let mag = ((2 * mant + 33) << exp) - 33; // 14-bit magnitude
        let v = if sign != 0 { -mag } else { mag };
        (v * 4) as i16
    }

    fn ref_alaw(s: i16) -> u8 {
        let seg_end: [i32; 8] = [0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF];
        let v = (s as i32) >> 3;
        let (mag, sign) = if v >= 0 { (v, 0x80) } else { (-v - 1, 0x00) };
        let seg = seg_end.iter().position(|&e| mag <= e).unwrap_or(8) as i32;
        let code = if seg >= 8 {
            0x7F
        } else if seg == 0 {
            mag >> 1
        } else {
            (seg << 4) | ((mag >> seg) & 0xF)
        };
        ((sign | code) ^ 0x55) as u8
    }

    fn ref_alaw_expand(c: u8) -> i16 {
        let c = c ^ 0x55;
        let exp = ((c >> 4) & 7) as i32;
        let mant = (c & 0xF) as i32;
        // 13-bit magnitude: the decision value in the middle of the step.
        let mag = if exp == 0 {
            2 * mant + 1
        } else {
            (2 * mant + 33) << (exp - 1)
        };
        let v = mag * 8;
        (if c & 0x80 != 0 { v } else { -v }) as i16
    }

    #[test]
    fn ulaw_encode_matches_reference_for_every_sample() {
        for s in i16::MIN..=i16::MAX {
            assert_eq!(ulaw_encode(s), ref_ulaw(s), "sample {s}");
        }
    }

    #[test]
    fn alaw_encode_matches_reference_for_every_sample() {
        for s in i16::MIN..=i16::MAX {
            assert_eq!(alaw_encode(s), ref_alaw(s), "sample {s}");
        }
    }

    #[test]
    fn decoders_match_reference_for_all_codes() {
        for c in 0..=255u8 {
            assert_eq!(ulaw_decode(c), ref_ulaw_expand(c), "ulaw code {c:#04x}");
            assert_eq!(alaw_decode(c), ref_alaw_expand(c), "alaw code {c:#04x}");
        }
    }

    #[test]
    fn round_trip_all_codes() {
        for c in 0..=255u8 {
            // µ-law has two zeros (0x7F negative, 0xFF positive); both decode to 0.
            let expect = if c == 0x7F { 0xFF } else { c };
            assert_eq!(ulaw_encode(ulaw_decode(c)), expect, "ulaw {c:#04x}");
            assert_eq!(alaw_encode(alaw_decode(c)), c, "alaw {c:#04x}");
        }
    }

    #[test]
    fn known_values() {
        assert_eq!(ulaw_decode(0x00), -32124);
        assert_eq!(ulaw_decode(0x80), 32124);
        assert_eq!(ulaw_decode(ULAW_SILENCE), 0);
        assert_eq!(alaw_decode(ALAW_SILENCE), 8);
        assert_eq!(alaw_decode(0xAA), 32256);
        assert_eq!(ulaw_encode(0), 0xFF);
        assert_eq!(alaw_encode(0), 0xD5);
        assert_eq!(ulaw_encode(i16::MAX), 0x80);
        assert_eq!(ulaw_encode(i16::MIN), 0x00);
    }

    #[test]
    fn quantisation_error_is_bounded() {
        // Companding error grows with the segment; 1/16 of the magnitude plus a step is a
        // generous bound that still catches a wrong segment or mantissa.
        for s in (i16::MIN + 1..=i16::MAX).step_by(7) {
            for codec in [G711::Pcmu, G711::Pcma] {
                let back = codec.decode_sample(codec.encode_sample(s)) as i32;
                let err = (back - s as i32).abs();
                assert!(
                    err <= (s as i32).abs() / 16 + 132,
                    "{codec:?} {s} -> {back}"
                );
            }
        }
    }

    #[test]
    fn slice_helpers() {
        let mut bytes = Vec::new();
        G711::Pcma.encode_into(&[0, 1000, -1000], &mut bytes);
        let mut back = Vec::new();
        G711::Pcma.decode_into(&bytes, &mut back);
        assert_eq!(back.len(), 3);
        assert_eq!(G711::from_payload_type(8), Some(G711::Pcma));
        assert_eq!(G711::from_payload_type(9), None);
    }
}
