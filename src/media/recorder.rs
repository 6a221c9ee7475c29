//! Records a call's received audio to an 8 kHz 16-bit mono WAV inside the recordings root.
//!
//! A recording stops at a maximum length, after a run of silence, or when told to.
//!
//! # Surviving a call that dies mid-record
//! The file is written in place under its final name and its WAV header is rewritten every
//! [`CHECKPOINT`] of audio (hound's `flush`, which updates the RIFF and data lengths and then
//! seeks back). A process killed between checkpoints therefore leaves a valid WAV holding
//! everything up to the last checkpoint, at most one second short; a recorder that is merely
//! dropped (the call task ended) is finalised by hound's destructor. Writing in place was
//! preferred to temp-file-and-rename because it needs no cleanup of orphaned temp files and
//! the recording is readable while it grows.
//!
//! Silence is measured per 20 ms chunk as mean absolute amplitude against a threshold;
//! silence at the start counts too (a caller who says nothing is done), and trailing silence
//! is kept in the file.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::media::paths::{self, PathError};

/// How much audio is written between header updates.
pub const CHECKPOINT: Duration = Duration::from_secs(1);
/// Default silence threshold: mean |sample| below this is silence (about -50 dBFS).
pub const DEFAULT_SILENCE_THRESHOLD: u16 = 100;
const RATE: u32 = 8000;
const CHUNK: usize = 160;

/// Why recording failed.
#[derive(Debug, Error)]
pub enum RecordError {
    /// The name was refused.
    #[error(transparent)]
    Path(#[from] PathError),
    /// Creating or writing the file failed.
    #[error("recording {path:?}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: hound::Error,
    },
}

/// When to stop on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordOptions {
    /// Stop after this much audio.
    pub max_duration: Option<Duration>,
    /// Stop after this long a run of silence.
    pub silence: Option<Duration>,
    /// Mean absolute amplitude under which a 20 ms chunk is silence.
    pub silence_threshold: u16,
}

impl Default for RecordOptions {
    fn default() -> Self {
        RecordOptions {
            max_duration: Some(Duration::from_secs(3600)),
            silence: None,
            silence_threshold: DEFAULT_SILENCE_THRESHOLD,
        }
    }
}

/// Why a recording ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Reached `max_duration`.
    MaxDuration,
    /// Silence lasted `silence`.
    Silence,
    /// Stopped explicitly (by the script, a terminating digit, or hang-up).
    Stopped,
}

/// A finished recording: `{file, seconds, reason}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Recording {
    /// Absolute path of the WAV file.
    pub file: PathBuf,
    /// Length of the audio.
    pub seconds: f64,
    /// Why it ended.
    pub reason: StopReason,
}

/// An open recording.
pub struct Recorder {
    path: PathBuf,
    writer: Option<hound::WavWriter<BufWriter<File>>>,
    opts: RecordOptions,
    written: u64,
    since_checkpoint: u64,
    silent_run: u64,
    pending: Vec<i16>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("path", &self.path)
            .field("written", &self.written)
            .finish()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // Best effort for a call that ended without `stop`: keep the last partial chunk;
        // hound's own destructor then finalises the header.
        let _ = self.write_pending();
    }
}

fn samples(d: Duration) -> u64 {
    (d.as_millis() as u64).saturating_mul(u64::from(RATE) / 1000)
}

impl Recorder {
    /// Creates `name` inside `root` (folders included) and starts recording.
    pub fn start(root: &Path, name: &str, opts: RecordOptions) -> Result<Self, RecordError> {
        let path = paths::resolve_new(root, name)?;
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: RATE,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut writer =
            hound::WavWriter::create(&path, spec).map_err(|source| RecordError::Write {
                path: path.clone(),
                source,
            })?;
        // A valid (empty) WAV exists from the first moment.
        writer.flush().map_err(|source| RecordError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(Recorder {
            path,
            writer: Some(writer),
            opts,
            written: 0,
            since_checkpoint: 0,
            silent_run: 0,
            pending: Vec::with_capacity(CHUNK),
        })
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Seconds recorded so far.
    pub fn seconds(&self) -> f64 {
        self.written as f64 / f64::from(RATE)
    }

    /// Appends received audio. Returns the finished recording if a stop condition was met;
    /// audio past that point is not written.
    pub fn push(&mut self, audio: &[i16]) -> Result<Option<Recording>, RecordError> {
        if self.writer.is_none() {
            return Ok(None);
        }
        let max = self.opts.max_duration.map(samples);
        let mut rest = audio;
        while !rest.is_empty() {
            let want = CHUNK - self.pending.len();
            let (now, later) = rest.split_at(want.min(rest.len()));
            rest = later;
            let mut chunk = now;
            if let Some(max) = max {
                let room = max.saturating_sub(self.written + self.pending.len() as u64);
                chunk = &chunk[..chunk.len().min(room as usize)];
            }
            self.pending.extend_from_slice(chunk);
            let reached_max = max.is_some_and(|m| self.written + self.pending.len() as u64 >= m);
            if self.pending.len() == CHUNK || reached_max {
                let silent = self.chunk_is_silent();
                self.write_pending()?;
                if reached_max {
                    return self.finish(StopReason::MaxDuration).map(Some);
                }
                if let Some(limit) = self.opts.silence {
                    self.silent_run = if silent {
                        self.silent_run + CHUNK as u64
                    } else {
                        0
                    };
                    if self.silent_run >= samples(limit).max(1) {
                        return self.finish(StopReason::Silence).map(Some);
                    }
                }
            }
        }
        Ok(None)
    }

    /// Stops now (explicitly, or because the call ended).
    pub fn stop(mut self) -> Result<Recording, RecordError> {
        self.write_pending()?;
        self.finish(StopReason::Stopped)
    }

    fn chunk_is_silent(&self) -> bool {
        if self.pending.is_empty() {
            return true;
        }
        let sum: u64 = self
            .pending
            .iter()
            .map(|s| u64::from(s.unsigned_abs()))
            .sum();
        sum / (self.pending.len() as u64) < u64::from(self.opts.silence_threshold)
    }

    fn write_err(&self, source: hound::Error) -> RecordError {
        RecordError::Write {
            path: self.path.clone(),
            source,
        }
    }

    fn write_pending(&mut self) -> Result<(), RecordError> {
        let Some(w) = self.writer.as_mut() else {
            return Ok(());
        };
        let mut res = Ok(());
        for &s in &self.pending {
            if let Err(e) = w.write_sample(s) {
                res = Err(e);
                break;
            }
        }
        let n = self.pending.len() as u64;
        self.pending.clear();
        res.map_err(|e| self.write_err(e))?;
        self.written += n;
        self.since_checkpoint += n;
        if self.since_checkpoint >= samples(CHECKPOINT) {
            self.since_checkpoint = 0;
            if let Some(w) = self.writer.as_mut() {
                w.flush().map_err(|e| RecordError::Write {
                    path: self.path.clone(),
                    source: e,
                })?;
            }
        }
        Ok(())
    }

    fn finish(&mut self, reason: StopReason) -> Result<Recording, RecordError> {
        if let Some(w) = self.writer.take() {
            w.finalize().map_err(|e| self.write_err(e))?;
        }
        Ok(Recording {
            file: self.path.clone(),
            seconds: self.seconds(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> Vec<i16> {
        let r = hound::WavReader::open(path).unwrap();
        let spec = r.spec();
        assert_eq!(
            (spec.channels, spec.sample_rate, spec.bits_per_sample),
            (1, 8000, 16)
        );
        r.into_samples::<i16>().map(Result::unwrap).collect()
    }

    fn loud(n: usize) -> Vec<i16> {
        (0..n)
            .map(|i| if i % 2 == 0 { 3000 } else { -3000 })
            .collect()
    }

    #[test]
    fn explicit_stop_writes_everything() {
        let dir = tempfile::tempdir().unwrap();
        let mut r =
            Recorder::start(dir.path(), "user/call1.wav", RecordOptions::default()).unwrap();
        let audio = loud(8000 + 37);
        for c in audio.chunks(240) {
            assert_eq!(r.push(c).unwrap(), None);
        }
        let rec = r.stop().unwrap();
        assert_eq!(rec.reason, StopReason::Stopped);
        assert!((rec.seconds - 8037.0 / 8000.0).abs() < 1e-9);
        assert!(rec.file.ends_with("user/call1.wav"));
        assert_eq!(read(&rec.file), audio);
    }

    #[test]
    fn stops_at_max_duration_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let opts = RecordOptions {
            max_duration: Some(Duration::from_millis(500)),
            ..Default::default()
        };
        let mut r = Recorder::start(dir.path(), "m.wav", opts).unwrap();
        let mut done = None;
        for _ in 0..100 {
            if let Some(rec) = r.push(&loud(100)).unwrap() {
                done = Some(rec);
                break;
            }
        }
        let rec = done.unwrap();
        assert_eq!(rec.reason, StopReason::MaxDuration);
        assert_eq!(rec.seconds, 0.5);
        assert_eq!(read(&rec.file).len(), 4000);
        // Pushing after the end is harmless.
        assert_eq!(r.push(&loud(10)).unwrap(), None);
    }

    #[test]
    fn stops_after_silence() {
        let dir = tempfile::tempdir().unwrap();
        let opts = RecordOptions {
            silence: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        let mut r = Recorder::start(dir.path(), "s.wav", opts).unwrap();
        assert_eq!(r.push(&loud(8000)).unwrap(), None);
        // Quiet line noise below the threshold: 1.5 s, then talk again, then 2 s quiet.
        let hiss: Vec<i16> = (0..12000).map(|i| (i % 7) as i16 * 20 - 60).collect();
        assert_eq!(r.push(&hiss).unwrap(), None);
        assert_eq!(r.push(&loud(1600)).unwrap(), None);
        let rec = r.push(&vec![0; 40000]).unwrap().unwrap();
        assert_eq!(rec.reason, StopReason::Silence);
        assert!((rec.seconds - (8000.0 + 12000.0 + 1600.0 + 16000.0) / 8000.0).abs() < 0.021);
    }

    #[test]
    fn dropped_mid_record_leaves_a_valid_wav() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Recorder::start(dir.path(), "crash.wav", RecordOptions::default()).unwrap();
        let path = r.path().to_path_buf();
        // Valid as soon as it starts.
        assert_eq!(read(&path).len(), 0);
        r.push(&loud(8000 * 2 + 850)).unwrap();
        // Without finalising (as if the process died now) the file is valid up to the last
        // checkpoint: both full seconds are readable.
        let bytes = std::fs::read(&path).unwrap();
        let copy = dir.path().join("snapshot.wav");
        std::fs::write(&copy, &bytes).unwrap();
        assert_eq!(read(&copy).len(), 16000);
        // A dropped recorder (call task ended) is finalised.
        drop(r);
        assert_eq!(read(&path).len(), 16850, "partial last chunk kept");
    }

    #[test]
    fn refuses_escaping_names() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["../x.wav", "/etc/passwd", ""] {
            assert!(matches!(
                Recorder::start(dir.path(), bad, RecordOptions::default()),
                Err(RecordError::Path(_))
            ));
        }
    }
}
