//! In-band DTMF detector: Goertzel filters over the eight DTMF frequencies on 8 kHz audio.
//!
//! Audio is cut into 205-sample blocks (25.6 ms, the classic size whose bins fall close to
//! all eight frequencies). A block "holds" a digit when:
//! - the strongest row and column tones each reach [`MIN_TONE_AMPLITUDE`] (about -38 dBm0),
//! - twist is within limits (row up to 8 dB above column, column up to 4 dB above row,
//!   the ITU-T Q.24 figures),
//! - each is at least 6 dB above the other tones of its group,
//! - together they carry most (60 %) of the block's energy, which rejects speech and noise.
//!
//! A digit is reported once it holds for two consecutive blocks (≥ 40 ms of tone) and is not
//! reported again until two blocks without it have passed, so one press is one digit however
//! long it is held.

/// Row (low group) frequencies in Hz.
const ROWS: [f64; 4] = [697.0, 770.0, 852.0, 941.0];
/// Column (high group) frequencies in Hz.
const COLS: [f64; 4] = [1209.0, 1336.0, 1477.0, 1633.0];
/// Keypad layout: `KEYS[row][col]`.
const KEYS: [[char; 4]; 4] = [
    ['1', '2', '3', 'A'],
    ['4', '5', '6', 'B'],
    ['7', '8', '9', 'C'],
    ['*', '0', '#', 'D'],
];

/// Samples per analysis block.
pub const BLOCK: usize = 205;
/// Weakest tone component (peak amplitude, 16-bit scale) that counts.
pub const MIN_TONE_AMPLITUDE: f64 = 300.0;
const NORMAL_TWIST: f64 = 6.31; // 8 dB as a power ratio
const REVERSE_TWIST: f64 = 2.51; // 4 dB
const GROUP_MARGIN: f64 = 3.98; // 6 dB
const MIN_ENERGY_SHARE: f64 = 0.6;
const HITS_TO_REPORT: u8 = 2;
const MISSES_TO_REARM: u8 = 2;

/// Streaming in-band DTMF detector for one call's received audio.
#[derive(Debug, Clone)]
pub struct InbandDetector {
    coeffs: [f64; 8],
    block: Vec<f64>,
    candidate: Option<char>,
    hits: u8,
    misses: u8,
    reported: Option<char>,
}

impl Default for InbandDetector {
    fn default() -> Self {
        Self::new()
    }
}

impl InbandDetector {
    /// A detector in its idle state.
    pub fn new() -> Self {
        let mut coeffs = [0.0; 8];
        for (c, f) in coeffs.iter_mut().zip(ROWS.iter().chain(COLS.iter())) {
            *c = 2.0 * (2.0 * std::f64::consts::PI * f / 8000.0).cos();
        }
        InbandDetector {
            coeffs,
            block: Vec::with_capacity(BLOCK),
            candidate: None,
            hits: 0,
            misses: 0,
            reported: None,
        }
    }

    /// Feeds 8 kHz samples; calls `on_digit` once per detected key press.
    pub fn process(&mut self, samples: &[i16], mut on_digit: impl FnMut(char)) {
        for &s in samples {
            self.block.push(f64::from(s));
            if self.block.len() == BLOCK {
                let seen = self.analyse_block();
                self.block.clear();
                if let Some(d) = self.debounce(seen) {
                    on_digit(d);
                }
            }
        }
    }

    /// Convenience wrapper returning the digits detected in `samples`.
    pub fn detect(&mut self, samples: &[i16]) -> Vec<char> {
        let mut v = Vec::new();
        self.process(samples, |d| v.push(d));
        v
    }

    fn debounce(&mut self, seen: Option<char>) -> Option<char> {
        match seen {
            Some(d) if self.reported == Some(d) => {
                self.misses = 0;
                None
            }
            Some(d) => {
                if self.candidate == Some(d) {
                    self.hits = self.hits.saturating_add(1);
                } else {
                    self.candidate = Some(d);
                    self.hits = 1;
                }
                // A different key held long enough is a new press even without a gap.
                if self.hits >= HITS_TO_REPORT {
                    self.reported = Some(d);
                    self.misses = 0;
                    return Some(d);
                }
                None
            }
            None => {
                self.candidate = None;
                self.hits = 0;
                if self.reported.is_some() {
                    self.misses += 1;
                    if self.misses >= MISSES_TO_REARM {
                        self.reported = None;
                        self.misses = 0;
                    }
                }
                None
            }
        }
    }

    fn analyse_block(&self) -> Option<char> {
        let mut power = [0.0f64; 8];
        for (p, &coeff) in power.iter_mut().zip(self.coeffs.iter()) {
            let (mut s1, mut s2) = (0.0f64, 0.0f64);
            for &x in &self.block {
                let s0 = x + coeff * s1 - s2;
                s2 = s1;
                s1 = s0;
            }
            *p = s1 * s1 + s2 * s2 - coeff * s1 * s2;
        }
        let (r, pr) = strongest(&power[..4])?;
        let (c, pc) = strongest(&power[4..])?;
        let n = BLOCK as f64;
        // A sine of peak A gives Goertzel power (A*N/2)^2.
        let min_power = (MIN_TONE_AMPLITUDE * n / 2.0).powi(2);
        if pr < min_power || pc < min_power {
            return None;
        }
        if pr > pc * NORMAL_TWIST || pc > pr * REVERSE_TWIST {
            return None;
        }
        let others_ok = |group: &[f64], best: usize, pbest: f64| {
            group
                .iter()
                .enumerate()
                .all(|(i, &p)| i == best || p * GROUP_MARGIN <= pbest)
        };
        if !others_ok(&power[..4], r, pr) || !others_ok(&power[4..], c, pc) {
            return None;
        }
        // Energy of a sine in the block is N*A^2/2 = 2*power/N.
        let energy: f64 = self.block.iter().map(|x| x * x).sum();
        let tone_energy = 2.0 * (pr + pc) / n;
        if tone_energy < MIN_ENERGY_SHARE * energy {
            return None;
        }
        Some(KEYS[r][c])
    }
}

fn strongest(group: &[f64]) -> Option<(usize, f64)> {
    group
        .iter()
        .copied()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

/// The (row, column) frequencies of a DTMF key, if it is one of `0-9*#A-D`.
pub fn dtmf_frequencies(digit: char) -> Option<(f64, f64)> {
    let d = digit.to_ascii_uppercase();
    for (r, row) in KEYS.iter().enumerate() {
        for (c, &k) in row.iter().enumerate() {
            if k == d {
                return Some((ROWS[r], COLS[c]));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::tone::synth;

    /// Peak amplitude of a sine at `dbm0` on the 16-bit G.711 scale (+3.17 dBm0 = full scale).
    fn amplitude(dbm0: f64) -> f64 {
        32767.0 * 10f64.powf((dbm0 - 3.17) / 20.0)
    }

    /// Deterministic white noise (xorshift32, uniform) with the given RMS.
    fn noise(len: usize, rms: f64, seed: u32) -> Vec<f64> {
        let mut rng = crate::media::testutil::XorShift::new(seed);
        let scale = rms * 3f64.sqrt(); // uniform on [-a, a] has RMS a/sqrt(3)
        (0..len)
            .map(|_| (f64::from(rng.next_u32()) / f64::from(u32::MAX) * 2.0 - 1.0) * scale)
            .collect()
    }

    fn mix(a: &[i16], n: &[f64]) -> Vec<i16> {
        a.iter()
            .zip(n)
            .map(|(&s, &v)| (f64::from(s) + v).round().clamp(-32768.0, 32767.0) as i16)
            .collect()
    }

    fn press(digit: char, dbm0: f64, ms: usize) -> Vec<i16> {
        let (r, c) = dtmf_frequencies(digit).unwrap();
        synth(&[r, c], amplitude(dbm0), ms * 8)
    }

    const ALL: &str = "0123456789*#ABCD";

    #[test]
    fn each_digit_detected_once_at_realistic_levels() {
        for level in [-10.0, -20.0, -30.0] {
            let mut det = InbandDetector::new();
            let mut audio = vec![0i16; 400];
            for d in ALL.chars() {
                audio.extend(press(d, level, 100));
                audio.extend(vec![0i16; 800]);
            }
            assert_eq!(
                det.detect(&audio).iter().collect::<String>(),
                ALL,
                "{level}"
            );
        }
    }

    #[test]
    fn digits_survive_white_noise() {
        let mut audio = vec![0i16; 333];
        for d in ALL.chars() {
            audio.extend(press(d, -25.0, 80));
            audio.extend(vec![0i16; 640]);
        }
        // Noise about 20 dB below each tone component.
        let n = noise(audio.len(), amplitude(-25.0) / 2f64.sqrt() / 10.0, 7);
        let mut det = InbandDetector::new();
        assert_eq!(det.detect(&mix(&audio, &n)).iter().collect::<String>(), ALL);
    }

    #[test]
    fn long_press_is_one_digit_and_repeated_presses_count() {
        let mut audio = press('5', -15.0, 1500);
        audio.extend(vec![0i16; 800]);
        audio.extend(press('5', -15.0, 100));
        // Frame by frame, as the session feeds it.
        let mut det = InbandDetector::new();
        let mut got = Vec::new();
        for frame in audio.chunks(160) {
            det.process(frame, |d| got.push(d));
        }
        assert_eq!(got, vec!['5', '5']);
    }

    #[test]
    fn short_blip_is_ignored() {
        let mut det = InbandDetector::new();
        let mut audio = press('1', -10.0, 20);
        audio.extend(vec![0i16; 1600]);
        assert!(det.detect(&audio).is_empty());
    }

    #[test]
    fn non_dtmf_signals_do_not_trigger() {
        let mut det = InbandDetector::new();
        // Ringback (440+480), dial tone (350+440), single tones on DTMF frequencies, noise.
        let mut audio = synth(&[440.0, 480.0], 8000.0, 16000);
        audio.extend(synth(&[350.0, 440.0], 8000.0, 8000));
        for f in ROWS.iter().chain(COLS.iter()) {
            audio.extend(synth(&[*f], 8000.0, 2000));
        }
        audio.extend(mix(&vec![0; 8000], &noise(8000, 3000.0, 3)));
        // Speech-like: a 140 Hz voiced source with decaying harmonics and a moving formant.
        let speech: Vec<i16> = (0..16000)
            .map(|i| {
                let t = i as f64 / 8000.0;
                let env = 0.5 + 0.5 * (2.0 * std::f64::consts::PI * 3.0 * t).sin();
                let v: f64 = (1..25)
                    .map(|h| {
                        let f = 140.0 * h as f64;
                        let formant = 700.0 + 400.0 * (2.0 * std::f64::consts::PI * t).sin();
                        let gain = 1.0 / (1.0 + ((f - formant) / 200.0).powi(2));
                        gain * (2.0 * std::f64::consts::PI * f * t).sin()
                    })
                    .sum();
                (v * 3000.0 * env) as i16
            })
            .collect();
        audio.extend(speech);
        assert!(det.detect(&audio).is_empty());
    }

    #[test]
    fn too_quiet_or_twisted_is_rejected() {
        let mut det = InbandDetector::new();
        assert!(det.detect(&press('8', -45.0, 200)).is_empty());
        let (r, c) = dtmf_frequencies('8').unwrap();
        // Column 12 dB above row: beyond the 4 dB reverse-twist limit.
        let mut twisted = synth(&[r], 1000.0, 1600);
        for (s, t) in twisted.iter_mut().zip(synth(&[c], 4000.0, 1600)) {
            *s += t;
        }
        assert!(det.detect(&twisted).is_empty());
    }

    #[test]
    fn frequencies_lookup() {
        assert_eq!(dtmf_frequencies('#'), Some((941.0, 1477.0)));
        assert_eq!(dtmf_frequencies('d'), Some((941.0, 1633.0)));
        assert_eq!(dtmf_frequencies('x'), None);
    }
}
