//! Tone generator: turns a tone spec such as `tone:440,1000;0,500;440+480,2000` into 8 kHz samples.
//!
//! # Grammar
//!
//! ```text
//! spec     = [ "tone:" ] segment *( ";" segment )
//! segment  = freqs "," duration
//! freqs    = freq *( "+" freq )      ; at most 4 frequencies summed; "0" alone is silence
//! freq     = integer Hz, 0 or 20..=3999 (below the 4 kHz Nyquist limit of 8 kHz audio)
//! duration = integer milliseconds, 1..=60000
//! ```
//!
//! Whitespace around tokens is ignored. The whole tone may last at most 10 minutes. Each
//! segment starts at phase zero; segments are short enough that the click is inaudible
//! next to the on/off cadence they describe.

use thiserror::Error;

/// Samples per second of every tone this module renders.
pub const SAMPLE_RATE: u32 = 8000;

/// Peak amplitude shared by all components of a segment (about -6 dBm0 overall), loud
/// enough for a beep and below clipping when components add up in phase.
const TOTAL_AMPLITUDE: f64 = 8000.0;
const MAX_FREQS: usize = 4;
const MAX_SEGMENT_MS: u32 = 60_000;
const MAX_TOTAL_MS: u64 = 600_000;

/// Why a tone spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ToneError {
    /// The spec has no segments.
    #[error("tone spec is empty")]
    Empty,
    /// A segment is not `freqs,duration`.
    #[error("tone segment {index} ({segment:?}) is not `freq[+freq],duration_ms`")]
    Malformed { index: usize, segment: String },
    /// A frequency is not an integer in range.
    #[error("tone segment {index}: frequency {value:?} is not 0 or an integer in 20..=3999 Hz")]
    BadFrequency { index: usize, value: String },
    /// Too many summed frequencies.
    #[error("tone segment {index}: at most {MAX_FREQS} frequencies can be summed")]
    TooManyFrequencies { index: usize },
    /// A duration is not an integer in range.
    #[error("tone segment {index}: duration {value:?} is not an integer in 1..=60000 ms")]
    BadDuration { index: usize, value: String },
    /// The whole tone is too long.
    #[error("tone lasts more than {MAX_TOTAL_MS} ms")]
    TooLong,
}

/// One step of a tone: frequencies summed for a duration (no frequencies = silence).
#[derive(Debug, Clone, PartialEq)]
pub struct ToneSegment {
    /// Component frequencies in Hz; empty for silence.
    pub freqs: Vec<u32>,
    /// Duration in milliseconds.
    pub duration_ms: u32,
}

/// A parsed tone spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Tone {
    /// The segments in playing order.
    pub segments: Vec<ToneSegment>,
}

impl Tone {
    /// Parses a spec; see the module docs for the grammar.
    pub fn parse(spec: &str) -> Result<Self, ToneError> {
        let body = spec.trim();
        let body = body.strip_prefix("tone:").unwrap_or(body);
        if body.trim().is_empty() {
            return Err(ToneError::Empty);
        }
        let mut segments = Vec::new();
        let mut total: u64 = 0;
        for (index, seg) in body.split(';').enumerate() {
            let malformed = || ToneError::Malformed {
                index,
                segment: seg.to_string(),
            };
            let (freqs, dur) = seg.split_once(',').ok_or_else(malformed)?;
            let dur = dur.trim();
            let duration_ms = dur
                .parse::<u32>()
                .ok()
                .filter(|d| (1..=MAX_SEGMENT_MS).contains(d))
                .ok_or_else(|| ToneError::BadDuration {
                    index,
                    value: dur.to_string(),
                })?;
            let mut list = Vec::new();
            for f in freqs.split('+') {
                let f = f.trim();
                let hz = f
                    .parse::<u32>()
                    .ok()
                    .filter(|&hz| hz == 0 || (20..SAMPLE_RATE / 2).contains(&hz))
                    .ok_or_else(|| ToneError::BadFrequency {
                        index,
                        value: f.to_string(),
                    })?;
                if hz != 0 {
                    list.push(hz);
                }
            }
            if list.len() > MAX_FREQS {
                return Err(ToneError::TooManyFrequencies { index });
            }
            total += u64::from(duration_ms);
            if total > MAX_TOTAL_MS {
                return Err(ToneError::TooLong);
            }
            segments.push(ToneSegment {
                freqs: list,
                duration_ms,
            });
        }
        Ok(Tone { segments })
    }

    /// Total duration in milliseconds.
    pub fn duration_ms(&self) -> u64 {
        self.segments.iter().map(|s| u64::from(s.duration_ms)).sum()
    }

    /// Renders the tone to 8 kHz mono samples.
    pub fn render(&self) -> Vec<i16> {
        let mut out = Vec::with_capacity((self.duration_ms() * 8) as usize);
        for seg in &self.segments {
            let n = seg.duration_ms as usize * (SAMPLE_RATE as usize / 1000);
            let amp = if seg.freqs.is_empty() {
                0.0
            } else {
                TOTAL_AMPLITUDE / seg.freqs.len() as f64
            };
            let freqs: Vec<f64> = seg.freqs.iter().map(|&f| f64::from(f)).collect();
            out.extend(synth(&freqs, amp, n));
        }
        out
    }
}

/// Sum of sines at `freqs` Hz, each with peak `amplitude`, for `len` samples at 8 kHz.
///
/// Also used by tests elsewhere in `media` to make DTMF and noise-free reference signals.
pub fn synth(freqs: &[f64], amplitude: f64, len: usize) -> Vec<i16> {
    (0..len)
        .map(|i| {
            let t = i as f64 / f64::from(SAMPLE_RATE);
            let v: f64 = freqs
                .iter()
                .map(|f| amplitude * (2.0 * std::f64::consts::PI * f * t).sin())
                .sum();
            v.round().clamp(i16::MIN as f64, i16::MAX as f64) as i16
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let t = Tone::parse("tone:440,1000;0,500;440+480,2000").unwrap();
        assert_eq!(t.segments.len(), 3);
        assert_eq!(t.segments[0].freqs, vec![440]);
        assert!(t.segments[1].freqs.is_empty());
        assert_eq!(t.segments[2].freqs, vec![440, 480]);
        assert_eq!(t.duration_ms(), 3500);
        let s = t.render();
        assert_eq!(s.len(), 3500 * 8);
        // The silent segment is exactly silent, the tones are not.
        assert!(s[8000..12000].iter().all(|&x| x == 0));
        assert!(s[..8000].iter().any(|&x| x.abs() > 7000));
        assert!(s.iter().all(|&x| x.abs() <= 8001));
    }

    #[test]
    fn prefix_and_whitespace_are_optional() {
        assert_eq!(
            Tone::parse(" 1000 , 200 ").unwrap(),
            Tone::parse("tone:1000,200").unwrap()
        );
    }

    #[test]
    fn rejects_bad_specs_with_typed_errors() {
        assert_eq!(Tone::parse("tone:"), Err(ToneError::Empty));
        assert!(matches!(
            Tone::parse("440"),
            Err(ToneError::Malformed { index: 0, .. })
        ));
        assert!(matches!(
            Tone::parse("440,100;abc,100"),
            Err(ToneError::BadFrequency { index: 1, .. })
        ));
        assert!(matches!(
            Tone::parse("5000,100"),
            Err(ToneError::BadFrequency { .. })
        ));
        assert!(matches!(
            Tone::parse("440,0"),
            Err(ToneError::BadDuration { .. })
        ));
        assert!(matches!(
            Tone::parse("440,-5"),
            Err(ToneError::BadDuration { .. })
        ));
        assert!(matches!(
            Tone::parse("1+2+3+4+5,10"),
            Err(ToneError::BadFrequency { .. })
        ));
        assert!(matches!(
            Tone::parse("100+200+300+400+500,10"),
            Err(ToneError::TooManyFrequencies { .. })
        ));
        let long = ["440,60000"; 11].join(";");
        assert_eq!(Tone::parse(&long), Err(ToneError::TooLong));
        // Errors read well.
        let e = Tone::parse("440,x").unwrap_err().to_string();
        assert!(e.contains("duration"), "{e}");
    }
}
