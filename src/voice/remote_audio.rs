//! Audio fetched over HTTP(S): `ctx.play("https://...")` prompts (cached by URL) and a TTS
//! service behind the `TtsRenderer` trait. Only hosts the operator allowed are fetched, with a
//! connect timeout, a total timeout and a size cap; a failure is a clear error, the call stays up.

use std::{
    num::NonZeroUsize,
    sync::{Arc, Mutex},
    time::Duration,
};

use lru::LruCache;

use crate::media::{prompt::decode_file, TtsError, TtsRenderer};

/// Largest audio file fetched (about 6 minutes of 16-bit 44.1 kHz stereo).
pub const MAX_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct RemoteAudioConfig {
    /// Hosts (`host` or `host:port`) prompts may be fetched from.
    pub allow: Vec<String>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
}

/// Downloads and decodes remote prompts, keeping the decoded samples by URL.
pub struct RemoteAudio {
    client: reqwest::Client,
    cfg: RemoteAudioConfig,
    cache: Mutex<LruCache<String, Arc<[i16]>>>,
}

fn host_allowed(allow: &[String], url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let with_port = url.port_or_known_default().map(|p| format!("{host}:{p}"));
    allow.iter().any(|a| {
        a.eq_ignore_ascii_case(host)
            || with_port
                .as_deref()
                .is_some_and(|hp| a.eq_ignore_ascii_case(hp))
    })
}

/// Fetch `url` (a checked http/https URL) into memory, refusing bodies over `MAX_BYTES`.
async fn fetch(client: &reqwest::Client, url: reqwest::Url) -> Result<(Vec<u8>, String), String> {
    let mut response = client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| format!("cannot fetch {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("cannot fetch {url}: HTTP {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("cannot fetch {url}: {e}"))?
    {
        if body.len() + chunk.len() > MAX_BYTES {
            return Err(format!("{url} is larger than {MAX_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    let ext = url
        .path()
        .rsplit('/')
        .next()
        .and_then(|f| f.rsplit_once('.'))
        .map(|(_, e)| e.to_ascii_lowercase())
        .filter(|e| e.len() <= 5 && e.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or_else(|| "wav".into());
    Ok((body, ext))
}

/// Decode fetched bytes (off the async threads) through a private temporary file.
async fn decode(bytes: Vec<u8>, ext: String) -> Result<Vec<i16>, String> {
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join(format!("audio.{ext}"));
        std::fs::write(&path, &bytes).map_err(|e| e.to_string())?;
        decode_file(&path).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

impl RemoteAudio {
    pub fn new(cfg: RemoteAudioConfig) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(RemoteAudio {
            client,
            cfg,
            cache: Mutex::new(LruCache::new(NonZeroUsize::new(256).expect("non-zero"))),
        })
    }

    /// The decoded samples of the audio at `url`, fetched once and then served from memory.
    pub async fn load(&self, url: &str) -> Result<Arc<[i16]>, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("bad URL {url:?}: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!("{url}: only http and https URLs can be played"));
        }
        if !host_allowed(&self.cfg.allow, &parsed) {
            return Err(format!(
                "{url}: host not allowed; add it to [media] url_hosts"
            ));
        }
        if let Some(hit) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(url)
        {
            return Ok(hit.clone());
        }
        let (bytes, ext) = fetch(&self.client, parsed).await?;
        let samples: Arc<[i16]> = decode(bytes, ext).await?.into();
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(url.to_string(), samples.clone());
        Ok(samples)
    }
}

/// A TTS service over HTTP: GET a URL template with `{text}` and `{voice}` filled in
/// (URL-encoded); the answer is an audio file.
pub struct HttpTtsRenderer {
    client: reqwest::Client,
    template: String,
    runtime: tokio::runtime::Handle,
}

impl HttpTtsRenderer {
    /// Must be created inside the tokio runtime whose threads will wait on it.
    pub fn new(template: &str, timeout: Duration) -> Result<Self, String> {
        reqwest::Url::parse(&template.replace("{text}", "x").replace("{voice}", "x"))
            .map_err(|e| format!("[media] tts URL {template:?}: {e}"))?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(timeout)
            .build()
            .map_err(|e| e.to_string())?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "the HTTP TTS renderer needs a tokio runtime".to_string())?;
        Ok(HttpTtsRenderer {
            client,
            template: template.to_string(),
            runtime,
        })
    }
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl TtsRenderer for HttpTtsRenderer {
    /// Called from `spawn_blocking`: waits on the runtime for the request.
    fn render(&self, text: &str, voice: &str) -> Result<Vec<i16>, TtsError> {
        let url = self
            .template
            .replace("{text}", &url_encode(text))
            .replace("{voice}", &url_encode(voice));
        let parsed = reqwest::Url::parse(&url).map_err(|e| TtsError::Renderer(e.to_string()))?;
        let client = self.client.clone();
        self.runtime.block_on(async move {
            let (bytes, ext) = fetch(&client, parsed).await.map_err(TtsError::Renderer)?;
            decode(bytes, ext).await.map_err(TtsError::Renderer)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{io::AsyncWriteExt, net::TcpListener};

    /// A one-file HTTP server on loopback: answers every GET with `body`, and records paths.
    async fn serve(body: Vec<u8>) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let paths = Arc::new(Mutex::new(Vec::new()));
        let seen = paths.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = vec![0u8; 8192];
                let n = tokio::io::AsyncReadExt::read(&mut sock, &mut buf)
                    .await
                    .unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = req.split(' ').nth(1).unwrap_or("").to_string();
                seen.lock().unwrap().push(path);
                let head = format!("HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
            }
        });
        (addr, paths)
    }

    fn wav(seconds: f64) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 16000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::new(&mut out, spec).unwrap();
        for i in 0..(16000.0 * seconds) as usize {
            w.write_sample(((i as f64 * 0.2).sin() * 8000.0) as i16)
                .unwrap();
        }
        w.finalize().unwrap();
        out.into_inner()
    }

    fn remote(allow: &[&str]) -> RemoteAudio {
        RemoteAudio::new(RemoteAudioConfig {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            connect_timeout: Duration::from_millis(500),
            timeout: Duration::from_secs(5),
        })
        .unwrap()
    }

    #[tokio::test]
    async fn allowed_urls_are_fetched_once_decoded_at_8khz_and_cached() {
        let (addr, paths) = serve(wav(0.5)).await;
        let r = remote(&["127.0.0.1"]);
        let url = format!("http://{addr}/prompts/hello.wav");
        let a = r.load(&url).await.unwrap();
        assert_eq!(a.len(), 4000, "0.5 s resampled to 8 kHz");
        let b = r.load(&url).await.unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(
            paths.lock().unwrap().len(),
            1,
            "the second play came from the cache"
        );
    }

    #[tokio::test]
    async fn other_hosts_schemes_and_dead_servers_are_clear_errors() {
        let r = remote(&["media.example.com"]);
        let e = r.load("http://127.0.0.1:9/x.wav").await.unwrap_err();
        assert!(e.contains("url_hosts"), "{e}");
        let e = r.load("file:///etc/passwd").await.unwrap_err();
        assert!(e.contains("only http"), "{e}");
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let r = remote(&["127.0.0.1"]);
        let started = std::time::Instant::now();
        let e = r.load(&format!("http://{free}/x.wav")).await.unwrap_err();
        assert!(e.contains("cannot fetch"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_http_tts_service_renders_through_the_renderer_trait() {
        let (addr, paths) = serve(wav(1.0)).await;
        let renderer = HttpTtsRenderer::new(
            &format!("http://{addr}/speak?text={{text}}&voice={{voice}}"),
            Duration::from_secs(5),
        )
        .unwrap();
        let samples = tokio::task::spawn_blocking(move || renderer.render("hi & bye", "en-gb"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(samples.len(), 8000);
        assert_eq!(
            paths.lock().unwrap()[0],
            "/speak?text=hi%20%26%20bye&voice=en-gb"
        );
    }
}
