//! Prompt audio: decodes WAV (PCM, µ-law, A-law), MP3, Ogg/Vorbis and FLAC files to 8 kHz mono
//! i16 with symphonia, resamples with rubato, and caches decoded prompts shared by all calls.
//!
//! [`PromptCache`] is keyed by (canonical path, modification time), so editing a prompt on
//! disk is picked up on the next play, and bounded by the total bytes of decoded audio,
//! evicting least recently used prompts. Concurrent first plays of one prompt decode it once:
//! later callers wait for the first decoder instead of decoding again. Decoding is blocking
//! work; the voice layer should call [`PromptCache::load`] from `spawn_blocking`.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use lru::LruCache;
use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};
use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use thiserror::Error;

use crate::media::paths::{self, PathError};
use crate::media::tone::{Tone, ToneError};

/// Output sample rate of every prompt.
pub const RATE: u32 = 8000;
/// Default cache budget: 64 MiB is about 70 minutes of 8 kHz audio.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;
/// Longest prompt accepted, in seconds at 8 kHz, so one file cannot exhaust memory.
const MAX_SECONDS: usize = 3600;

/// Why a prompt could not be loaded.
#[derive(Debug, Error)]
pub enum PromptError {
    /// The name was refused or the file is missing.
    #[error(transparent)]
    Path(#[from] PathError),
    /// A `tone:` spec was bad.
    #[error(transparent)]
    Tone(#[from] ToneError),
    /// The file could not be read.
    #[error("cannot read {path:?}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a supported format, or corrupt.
    #[error("cannot decode {path:?}: {reason}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// What symphonia or rubato said.
        reason: String,
    },
    /// Decoded to nothing.
    #[error("{0:?} contains no audio")]
    Empty(PathBuf),
    /// Longer than the limit.
    #[error("{0:?} is longer than {MAX_SECONDS} s")]
    TooLong(PathBuf),
}

/// Decodes a whole file to 8 kHz mono samples.
pub fn decode_file(path: &Path) -> Result<Vec<i16>, PromptError> {
    let decode_err = |reason: String| PromptError::Decode {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|source| PromptError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mss = MediaSourceStream::new(Box::new(file), Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(ext);
    }
    let mut format = symphonia::default::get_probe()
        .probe(
            &hint,
            mss,
            FormatOptions::default(),
            MetadataOptions::default(),
        )
        .map_err(|e| decode_err(e.to_string()))?;
    let track = format
        .default_track(TrackType::Audio)
        .ok_or_else(|| decode_err("no audio track".into()))?;
    let track_id = track.id;
    let params = track
        .codec_params
        .as_ref()
        .and_then(|p| p.audio())
        .ok_or_else(|| decode_err("no audio codec parameters".into()))?;
    let mut decoder = symphonia::default::get_codecs()
        .make_audio_decoder(params, &AudioDecoderOptions::default())
        .map_err(|e| decode_err(e.to_string()))?;

    let mut mono: Vec<f32> = Vec::new();
    let mut rate: Option<u32> = None;
    let mut planes: Vec<Vec<f32>> = Vec::new();
    loop {
        let packet = match format.next_packet() {
            Ok(Some(p)) => p,
            Ok(None) => break,
            // Truncated files end with an I/O error: keep what decoded so far.
            Err(SymError::IoError(_)) => break,
            Err(e) => return Err(decode_err(e.to_string())),
        };
        if packet.track_id != track_id {
            continue;
        }
        let buf = match decoder.decode(&packet) {
            Ok(b) => b,
            // One corrupt packet is skipped, as players do.
            Err(SymError::DecodeError(_)) | Err(SymError::IoError(_)) => continue,
            Err(e) => return Err(decode_err(e.to_string())),
        };
        let r = buf.spec().rate();
        if *rate.get_or_insert(r) != r {
            return Err(decode_err("sample rate changes mid-stream".into()));
        }
        buf.copy_to_vecs_planar::<f32>(&mut planes);
        let n = planes.first().map_or(0, Vec::len);
        let scale = 1.0 / planes.len().max(1) as f32;
        mono.extend((0..n).map(|i| planes.iter().map(|p| p[i]).sum::<f32>() * scale));
        let max_in = MAX_SECONDS * r as usize;
        if mono.len() > max_in {
            return Err(PromptError::TooLong(path.to_path_buf()));
        }
    }
    let rate = rate.unwrap_or(RATE);
    if mono.is_empty() {
        return Err(PromptError::Empty(path.to_path_buf()));
    }
    let mono = if rate == RATE {
        mono
    } else {
        resample(&mono, rate).map_err(decode_err)?
    };
    Ok(mono.into_iter().map(to_i16).collect())
}

fn to_i16(x: f32) -> i16 {
    // Symphonia maps i16 to f32 by dividing by 32768, so this inverts it exactly.
    (x * 32768.0).round().clamp(-32768.0, 32767.0) as i16
}

fn resample(input: &[f32], from: u32) -> Result<Vec<f32>, String> {
    let mut r = Fft::<f32>::new(from as usize, RATE as usize, 1024, 1, FixedSync::Both)
        .map_err(|e| e.to_string())?;
    let adapter = InterleavedSlice::new(input, 1, input.len()).map_err(|e| e.to_string())?;
    let out = r
        .process_all(&adapter, input.len(), None)
        .map_err(|e| e.to_string())?;
    Ok(out.take_data())
}

/// What a cached prompt was made from: a file as it was on disk, or a `tone:` spec.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    File {
        path: PathBuf,
        mtime: Option<SystemTime>,
        len: u64,
    },
    Tone(String),
}

impl Key {
    fn path(&self) -> Option<&Path> {
        match self {
            Key::File { path, .. } => Some(path),
            Key::Tone(_) => None,
        }
    }
}

#[derive(Debug)]
struct Inner {
    lru: LruCache<Key, Arc<[i16]>>,
    bytes: usize,
}

/// Counters of a [`PromptCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Loads served from the cache.
    pub hits: u64,
    /// Files decoded.
    pub decodes: u64,
    /// Prompts held.
    pub entries: usize,
    /// Bytes of samples held.
    pub bytes: usize,
}

/// Thread-safe, byte-bounded LRU cache of decoded prompts under one media root.
#[derive(Debug)]
pub struct PromptCache {
    root: PathBuf,
    max_bytes: usize,
    inner: Mutex<Inner>,
    in_flight: Mutex<HashMap<Key, Arc<Mutex<()>>>>,
    hits: AtomicU64,
    decodes: AtomicU64,
}

impl PromptCache {
    /// A cache for files under `root`, holding at most `max_bytes` of decoded samples.
    pub fn new(root: impl Into<PathBuf>, max_bytes: usize) -> Self {
        PromptCache {
            root: root.into(),
            max_bytes,
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            in_flight: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            decodes: AtomicU64::new(0),
        }
    }

    /// The media root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Loads a prompt by name relative to the root, or renders a `tone:` spec.
    ///
    /// Rendered tones are cached like files: every call playing the same tone shares one
    /// copy of its samples (a 3 s tone is 47 KiB, which would otherwise be per call).
    pub fn load(&self, name: &str) -> Result<Arc<[i16]>, PromptError> {
        if name.trim_start().starts_with("tone:") {
            let key = Key::Tone(name.trim().to_string());
            if let Some(v) = self.lookup(&key) {
                return Ok(v);
            }
            let v: Arc<[i16]> = Tone::parse(name)?.render().into();
            self.insert(key, v.clone());
            return Ok(v);
        }
        self.load_file(&self.root, name)
    }

    /// Loads a file by name relative to another root (the recordings folder), confined to it
    /// like prompts are to the media root, and cached alongside them.
    pub fn load_from(&self, root: &Path, name: &str) -> Result<Arc<[i16]>, PromptError> {
        self.load_file(root, name)
    }

    fn load_file(&self, root: &Path, name: &str) -> Result<Arc<[i16]>, PromptError> {
        let path = paths::resolve_existing(root, name)?;
        let meta = std::fs::metadata(&path).map_err(|source| PromptError::Io {
            path: path.clone(),
            source,
        })?;
        let key = Key::File {
            path: path.clone(),
            mtime: meta.modified().ok(),
            len: meta.len(),
        };
        if let Some(v) = self.lookup(&key) {
            return Ok(v);
        }
        // One decoder per key; others wait on its lock and then find the result cached.
        let gate = {
            let mut f = lock(&self.in_flight);
            f.entry(key.clone()).or_default().clone()
        };
        let result = {
            let _g = lock(&gate);
            match self.lookup(&key) {
                Some(v) => Ok(v),
                None => {
                    self.decodes.fetch_add(1, Ordering::Relaxed);
                    decode_file(&path).map(|s| {
                        let v: Arc<[i16]> = s.into();
                        self.insert(key.clone(), v.clone());
                        v
                    })
                }
            }
        };
        lock(&self.in_flight).remove(&key);
        result
    }

    fn lookup(&self, key: &Key) -> Option<Arc<[i16]>> {
        let v = lock(&self.inner).lru.get(key).cloned();
        if v.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        v
    }

    fn insert(&self, key: Key, v: Arc<[i16]>) {
        let size = std::mem::size_of_val(&*v);
        if size > self.max_bytes {
            return;
        }
        let mut inner = lock(&self.inner);
        // An older version of the same file (different mtime) is dead weight now.
        let stale: Vec<Key> = inner
            .lru
            .iter()
            .filter(|(k, _)| k.path().is_some() && k.path() == key.path() && **k != key)
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            if let Some(old) = inner.lru.pop(&k) {
                inner.bytes -= std::mem::size_of_val(&*old);
            }
        }
        while inner.bytes + size > self.max_bytes {
            match inner.lru.pop_lru() {
                Some((_, old)) => inner.bytes -= std::mem::size_of_val(&*old),
                None => break,
            }
        }
        if let Some(old) = inner.lru.put(key, v) {
            inner.bytes -= std::mem::size_of_val(&*old);
        }
        inner.bytes += size;
    }

    /// Current counters.
    pub fn stats(&self) -> CacheStats {
        let inner = lock(&self.inner);
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            decodes: self.decodes.load(Ordering::Relaxed),
            entries: inner.lru.len(),
            bytes: inner.bytes,
        }
    }
}

/// Locks, recovering from poisoning: the cache holds plain data that stays consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::g711::G711;
    use crate::media::goertzel::InbandDetector;

    fn write_wav(path: &Path, rate: u32, channels: u16, frames: &[Vec<i16>]) {
        let spec = hound::WavSpec {
            channels,
            sample_rate: rate,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(path, spec).unwrap();
        for f in frames {
            for &s in f {
                w.write_sample(s).unwrap();
            }
        }
        w.finalize().unwrap();
    }

    fn sine(rate: u32, hz: f64, secs: f64, amp: f64) -> Vec<i16> {
        let n = (f64::from(rate) * secs) as usize;
        (0..n)
            .map(|i| {
                (amp * (2.0 * std::f64::consts::PI * hz * i as f64 / f64::from(rate)).sin()) as i16
            })
            .collect()
    }

    /// Frequency estimate by zero crossings, good enough to tell a wrong rate.
    fn freq(s: &[i16]) -> f64 {
        let z = s.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count();
        z as f64 / 2.0 / (s.len() as f64 / 8000.0)
    }

    #[test]
    fn decodes_8k_mono_pcm_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let s = sine(8000, 440.0, 0.5, 10000.0);
        let frames: Vec<Vec<i16>> = s.iter().map(|&x| vec![x]).collect();
        write_wav(&dir.path().join("a.wav"), 8000, 1, &frames);
        assert_eq!(decode_file(&dir.path().join("a.wav")).unwrap(), s);
    }

    #[test]
    fn resamples_and_mixes_to_mono() {
        let dir = tempfile::tempdir().unwrap();
        for (rate, ch) in [(16000u32, 1u16), (44100, 2), (8000, 2), (44100, 1)] {
            let s = sine(rate, 1000.0, 1.0, 12000.0);
            // Stereo: the right channel is silent, so the mono mix is half the amplitude.
            let frames: Vec<Vec<i16>> = s
                .iter()
                .map(|&x| if ch == 2 { vec![x, 0] } else { vec![x] })
                .collect();
            let p = dir.path().join(format!("t{rate}_{ch}.wav"));
            write_wav(&p, rate, ch, &frames);
            let out = decode_file(&p).unwrap();
            assert!(
                (out.len() as i64 - 8000).abs() <= 8,
                "{rate}/{ch}: {}",
                out.len()
            );
            let f = freq(&out[400..7600]);
            assert!((f - 1000.0).abs() < 10.0, "{rate}/{ch}: {f} Hz");
            let peak = out[400..7600]
                .iter()
                .map(|x| x.unsigned_abs())
                .max()
                .unwrap();
            let want = if ch == 2 { 6000 } else { 12000 };
            assert!(
                (i32::from(peak) - want).abs() < 400,
                "{rate}/{ch}: peak {peak}"
            );
        }
    }

    /// A WAV with G.711 samples (format tag 7 = µ-law, 6 = A-law), written by hand since
    /// hound only writes PCM.
    fn write_g711_wav(path: &Path, codec: G711, samples: &[i16]) {
        let mut data = Vec::new();
        codec.encode_into(samples, &mut data);
        let tag: u16 = if codec == G711::Pcmu { 7 } else { 6 };
        let mut f = Vec::new();
        f.extend_from_slice(b"RIFF");
        f.extend_from_slice(&(4 + 26 + 12 + 8 + data.len() as u32).to_le_bytes());
        f.extend_from_slice(b"WAVEfmt ");
        f.extend_from_slice(&18u32.to_le_bytes());
        for v in [tag, 1] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(&8000u32.to_le_bytes()); // sample rate
        f.extend_from_slice(&8000u32.to_le_bytes()); // byte rate
        for v in [1u16, 8, 0] {
            f.extend_from_slice(&v.to_le_bytes()); // block align, bits, cbSize
        }
        f.extend_from_slice(b"fact");
        f.extend_from_slice(&4u32.to_le_bytes());
        f.extend_from_slice(&(data.len() as u32).to_le_bytes());
        f.extend_from_slice(b"data");
        f.extend_from_slice(&(data.len() as u32).to_le_bytes());
        f.extend_from_slice(&data);
        std::fs::write(path, f).unwrap();
    }

    #[test]
    fn decodes_g711_wav_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = sine(8000, 700.0, 0.25, 9000.0);
        for codec in [G711::Pcmu, G711::Pcma] {
            let p = dir.path().join(format!("{codec:?}.wav"));
            write_g711_wav(&p, codec, &s);
            let out = decode_file(&p).unwrap_or_else(|e| panic!("{codec:?}: {e}"));
            assert_eq!(out.len(), s.len(), "{codec:?}");
            // Same expansion as ours, give or take symphonia's rounding.
            for (i, (&o, &x)) in out.iter().zip(&s).enumerate() {
                let want = codec.decode_sample(codec.encode_sample(x));
                assert!(
                    (i32::from(o) - i32::from(want)).abs() <= 8,
                    "{codec:?} @{i}: {o} vs {want}"
                );
            }
        }
    }

    #[test]
    fn sox_made_formats_decode() {
        // µ-law/A-law WAV, FLAC, Ogg/Vorbis and MP3 made at test time from a DTMF tone, then
        // checked by detecting that digit in the decoded audio.
        let sox = Path::new("/usr/bin/sox");
        assert!(
            sox.exists(),
            "sox is needed to make the test files: run tools/ensure-deps.sh --test"
        );
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.wav");
        let (r, c) = crate::media::goertzel::dtmf_frequencies('6').unwrap();
        let mut tone = crate::media::tone::synth(&[r, c], 6000.0, 2400);
        tone.extend(vec![0; 2400]);
        write_wav(
            &src,
            8000,
            1,
            &tone.iter().map(|&x| vec![x]).collect::<Vec<_>>(),
        );
        let mut tried = 0;
        for (name, args) in [
            ("u.wav", vec!["-e", "u-law"]),
            ("a.wav", vec!["-e", "a-law"]),
            ("f.flac", vec!["-r", "16000"]),
            ("v.ogg", vec!["-r", "22050", "-c", "2"]),
            ("m.mp3", vec!["-r", "16000"]),
        ] {
            let out = dir.path().join(name);
            let ok = std::process::Command::new(sox)
                .arg(&src)
                .args(&args)
                .arg(&out)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(
                ok,
                "sox cannot write {name} (libsox-fmt-mp3 for MP3): run tools/ensure-deps.sh --test"
            );
            tried += 1;
            let pcm = decode_file(&out).unwrap_or_else(|e| panic!("{name}: {e}"));
            let secs = pcm.len() as f64 / 8000.0;
            assert!((0.55..0.75).contains(&secs), "{name}: {secs} s");
            let digits = InbandDetector::new().detect(&pcm);
            assert_eq!(digits, vec!['6'], "{name}");
        }
        assert_eq!(tried, 5, "every format was made and decoded");
    }

    #[test]
    fn missing_bad_and_escaping_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("junk.wav"), b"RIFF....not really").unwrap();
        std::fs::write(dir.path().join("empty.mp3"), b"").unwrap();
        let cache = PromptCache::new(dir.path(), DEFAULT_CACHE_BYTES);
        assert!(matches!(
            cache.load("missing.wav"),
            Err(PromptError::Path(PathError::NotFound(_)))
        ));
        assert!(matches!(
            cache.load("junk.wav"),
            Err(PromptError::Decode { .. })
        ));
        assert!(cache.load("empty.mp3").is_err());
        assert!(matches!(
            cache.load("../etc/passwd"),
            Err(PromptError::Path(PathError::ParentDir(_)))
        ));
        assert!(matches!(
            cache.load("/etc/passwd"),
            Err(PromptError::Path(PathError::Absolute(_)))
        ));
        assert!(matches!(cache.load("tone:1,1"), Err(PromptError::Tone(_))));
        assert_eq!(cache.load("tone:440,100").unwrap().len(), 800);
        // A tone is rendered once and then shared.
        let again = cache.load(" tone:440,100").unwrap();
        assert!(Arc::ptr_eq(&again, &cache.load("tone:440,100").unwrap()));
        assert_eq!(cache.stats().entries, 1);
    }

    #[test]
    fn cache_decodes_once_for_many_concurrent_calls_and_evicts_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("ivr")).unwrap();
        for name in ["ivr/a.wav", "ivr/b.wav", "ivr/c.wav"] {
            let s = sine(8000, 500.0, 1.0, 5000.0);
            write_wav(
                &dir.path().join(name),
                8000,
                1,
                &s.iter().map(|&x| vec![x]).collect::<Vec<_>>(),
            );
        }
        // Room for two one-second prompts (16000 bytes each), not three.
        let cache = Arc::new(PromptCache::new(dir.path(), 40_000));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let c = cache.clone();
                std::thread::spawn(move || c.load("ivr/a.wav").unwrap())
            })
            .collect();
        let loaded: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(
            loaded.iter().all(|a| Arc::ptr_eq(a, &loaded[0])),
            "one shared buffer"
        );
        assert_eq!(cache.stats().decodes, 1);
        cache.load("ivr/b.wav").unwrap();
        cache.load("ivr/a.wav").unwrap(); // a is now most recent
        cache.load("ivr/c.wav").unwrap(); // evicts b
        let st = cache.stats();
        assert_eq!((st.decodes, st.entries, st.bytes), (3, 2, 32_000));
        cache.load("ivr/a.wav").unwrap();
        assert_eq!(cache.stats().decodes, 3);
        cache.load("ivr/b.wav").unwrap();
        assert_eq!(cache.stats().decodes, 4);
        // A changed file (new mtime) is decoded again and replaces the old entry.
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        let f = File::options()
            .write(true)
            .open(dir.path().join("ivr/b.wav"))
            .unwrap();
        f.set_modified(later).unwrap();
        drop(f);
        cache.load("ivr/b.wav").unwrap();
        let st = cache.stats();
        assert_eq!((st.decodes, st.entries), (5, 2));
    }
}
