//! Text to speech for `ctx.tts()`/`ctx.say()`: a renderer trait, espeak-ng as the local
//! default, and a bounded cache keyed by (voice, text) so a repeated phrase renders once.

use std::{
    io::Write,
    num::NonZeroUsize,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lru::LruCache;

use super::prompt::{decode_file, PromptError};

/// Longest text one call may render.
pub const MAX_TEXT_CHARS: usize = 4_000;

#[derive(Debug, thiserror::Error)]
pub enum TtsError {
    #[error("tts: empty text")]
    Empty,
    #[error("tts: text longer than {MAX_TEXT_CHARS} characters")]
    TooLong,
    #[error("tts: invalid voice name {0:?} (letters, digits, '-', '_', '+' only)")]
    BadVoice(String),
    #[error(
        "tts: cannot run {program}: {source} (install espeak-ng, or configure another renderer)"
    )]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tts: the renderer failed: {0}")]
    Renderer(String),
    #[error("tts: the renderer took longer than {0:?}")]
    Timeout(Duration),
    #[error("tts: cannot decode the rendered audio: {0}")]
    Decode(#[from] PromptError),
}

/// Turns text into 8 kHz mono samples. Blocking: call it from `spawn_blocking`.
pub trait TtsRenderer: Send + Sync {
    fn render(&self, text: &str, voice: &str) -> Result<Vec<i16>, TtsError>;
}

/// Voice names go to the renderer's command line: keep them to a plain alphabet.
pub fn valid_voice(voice: &str) -> bool {
    !voice.is_empty()
        && voice.len() <= 64
        && voice
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'+'))
}

fn check_input(text: &str, voice: &str) -> Result<(), TtsError> {
    if text.trim().is_empty() {
        return Err(TtsError::Empty);
    }
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err(TtsError::TooLong);
    }
    if !valid_voice(voice) {
        return Err(TtsError::BadVoice(voice.to_string()));
    }
    Ok(())
}

/// The local espeak-ng process. Text goes in on stdin (never as an argument, so a text that
/// starts with '-' is just text) and the WAV comes back in a private temporary file.
#[derive(Debug, Clone)]
pub struct EspeakRenderer {
    pub program: PathBuf,
    pub timeout: Duration,
}

impl Default for EspeakRenderer {
    fn default() -> Self {
        EspeakRenderer {
            program: PathBuf::from("espeak-ng"),
            timeout: Duration::from_secs(15),
        }
    }
}

impl TtsRenderer for EspeakRenderer {
    fn render(&self, text: &str, voice: &str) -> Result<Vec<i16>, TtsError> {
        check_input(text, voice)?;
        let dir = tempfile::tempdir().map_err(|e| TtsError::Renderer(e.to_string()))?;
        let wav = dir.path().join("tts.wav");
        let spawn_err = |source| TtsError::Spawn {
            program: self.program.display().to_string(),
            source,
        };
        let mut child = Command::new(&self.program)
            .arg("-v")
            .arg(voice)
            .arg("-w")
            .arg(&wav)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(text.as_bytes())
                .map_err(|e| TtsError::Renderer(e.to_string()))?;
        }
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(TtsError::Timeout(self.timeout));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(TtsError::Renderer(e.to_string())),
            }
        };
        if !status.success() {
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                use std::io::Read;
                let _ = stderr.read_to_string(&mut err);
            }
            return Err(TtsError::Renderer(format!(
                "{} exited with {status}: {}",
                self.program.display(),
                err.trim()
            )));
        }
        Ok(decode_file(&wav)?)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    voice: String,
    text: String,
}

/// Cached phrases and the total samples they hold.
type Phrases = (LruCache<Key, Arc<[i16]>>, usize);

/// Rendered phrases, bounded by total samples, shared by every call.
pub struct TtsCache {
    renderer: Box<dyn TtsRenderer>,
    inner: Mutex<Phrases>,
    max_samples: usize,
}

impl TtsCache {
    pub fn new(renderer: Box<dyn TtsRenderer>, max_bytes: usize) -> Self {
        TtsCache {
            renderer,
            inner: Mutex::new((LruCache::new(NonZeroUsize::new(4096).expect("non-zero")), 0)),
            max_samples: (max_bytes / 2).max(1),
        }
    }

    /// The phrase's samples, rendered on the first request and cached after.
    pub fn speak(&self, text: &str, voice: &str) -> Result<Arc<[i16]>, TtsError> {
        check_input(text, voice)?;
        let key = Key {
            voice: voice.to_string(),
            text: text.to_string(),
        };
        if let Some(hit) = self.lock().0.get(&key) {
            return Ok(hit.clone());
        }
        let samples: Arc<[i16]> = self.renderer.render(text, voice)?.into();
        let mut inner = self.lock();
        let (lru, total) = &mut *inner;
        *total += samples.len();
        if let Some((_, old)) = lru.push(key, samples.clone()) {
            *total -= old.len();
        }
        while *total > self.max_samples {
            match lru.pop_lru() {
                Some((_, old)) => *total -= old.len(),
                None => break,
            }
        }
        Ok(samples)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Phrases> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(Arc<AtomicUsize>);
    impl TtsRenderer for Counting {
        fn render(&self, text: &str, _: &str) -> Result<Vec<i16>, TtsError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(vec![1; text.len() * 100])
        }
    }

    #[test]
    fn a_phrase_renders_once_and_the_cache_stays_bounded() {
        let count = Arc::new(AtomicUsize::new(0));
        let cache = TtsCache::new(Box::new(Counting(count.clone())), 2 * 1_000);
        let a = cache.speak("hello", "en").unwrap();
        let b = cache.speak("hello", "en").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(count.load(Ordering::SeqCst), 1);
        cache.speak("hello", "fr").unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 2);
        // 1,000 samples at most: "hello" is 500, so a third phrase evicts the oldest.
        cache.speak("world", "en").unwrap();
        assert!(cache.lock().1 <= 1_000);
        cache.speak("hello", "en").unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn bad_input_is_refused_before_anything_runs() {
        let r = EspeakRenderer::default();
        assert!(matches!(r.render("  ", "en"), Err(TtsError::Empty)));
        assert!(matches!(
            r.render("hi", "en; rm -rf /"),
            Err(TtsError::BadVoice(_))
        ));
        let long = "a".repeat(MAX_TEXT_CHARS + 1);
        assert!(matches!(r.render(&long, "en"), Err(TtsError::TooLong)));
        let missing = EspeakRenderer {
            program: "/nonexistent/espeak-ng".into(),
            ..Default::default()
        };
        let e = missing.render("hi", "en").unwrap_err();
        assert!(e.to_string().contains("install espeak-ng"), "{e}");
    }

    /// espeak-ng is installed by `tools/ensure-deps.sh --test`; this runs the real process.
    #[test]
    fn espeak_renders_speech_at_8khz() {
        let r = EspeakRenderer::default();
        let samples = r.render("-hello from callforge", "en").unwrap();
        let seconds = samples.len() as f64 / 8000.0;
        assert!((0.5..5.0).contains(&seconds), "{seconds} s");
        let energy =
            samples.iter().map(|&s| (s as f64).powi(2)).sum::<f64>() / samples.len() as f64;
        assert!(
            energy.sqrt() > 300.0,
            "speech, not silence: rms {}",
            energy.sqrt()
        );
    }
}
