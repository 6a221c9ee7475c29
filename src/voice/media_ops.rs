//! The media operations of the class5 `ctx` (play, tts, ivr/collect, record, echo, sendDtmf,
//! sleep), with ConnexCS's names and argument orders. Each takes the script's JSON arguments,
//! drives the call's media task and ends as a JSON value or a typed JS error: `TypeError` for
//! bad arguments, `Hangup` when the caller hangs up first, `Error` for missing files and the like.

use std::{path::PathBuf, sync::Arc, time::Duration};

use serde_json::{json, Value as Json};
use tokio::sync::watch;

use super::{
    collect::{CollectSpec, CollectStatus, Collector, Step},
    media_task::{MediaError, MediaHandle},
};
use crate::{
    media::{PathError, PlayEnd, PromptCache, PromptError, RecordOptions, Recorder, TtsCache},
    script::{host::HostResult, HostError},
};

/// What a call's media operations need: the media task, the shared caches, the recordings
/// folder, and the hang-up signal (true once the caller has gone).
#[derive(Clone)]
pub struct MediaContext {
    pub media: MediaHandle,
    pub prompts: Arc<PromptCache>,
    pub tts: Arc<TtsCache>,
    pub recordings: PathBuf,
    pub hangup: watch::Receiver<bool>,
    pub default_voice: String,
    /// Files recorded during the call, for its CDR.
    pub recorded: Arc<std::sync::Mutex<Vec<String>>>,
    /// `http(s)://` prompts.
    pub remote: Arc<super::remote_audio::RemoteAudio>,
}

impl MediaContext {
    /// How `ctx.play()` names a recording: relative to the media folder when the recordings
    /// folder is inside it (the default, `media/recordings`), so `play(rec.file)` just works;
    /// otherwise relative to the recordings folder, where `play` looks for names it does not
    /// find in the media folder.
    pub fn playable_name(&self, name: &str) -> String {
        match self.recordings.strip_prefix(self.prompts.root()) {
            Ok(sub) if !sub.as_os_str().is_empty() => format!("{}/{name}", sub.display()),
            _ => name.to_string(),
        }
    }
}

pub fn hangup_error() -> HostError {
    HostError::new("Hangup", "the caller hung up")
}

fn type_error(op: &str, what: impl std::fmt::Display) -> HostError {
    HostError::type_error(format!("ctx.{op}: {what}"))
}

fn media_error(e: MediaError) -> HostError {
    match e {
        MediaError::Gone => hangup_error(),
        MediaError::Failed(m) => HostError::error(m),
    }
}

/// Run `op` unless the caller hangs up first.
///
/// Biased toward the hang-up: the call task raises the hang-up flag before it stops the
/// media, so when a prompt ends because the media stopped, the flag is already up and wins
/// the select (an unbiased select resolved `play` with `{status: "stopped"}` about half the
/// time instead of rejecting with `Hangup`).
async fn until_hangup<T>(
    hangup: &watch::Receiver<bool>,
    op: impl std::future::Future<Output = Result<T, HostError>>,
) -> Result<T, HostError> {
    let mut hangup = hangup.clone();
    if *hangup.borrow() {
        return Err(hangup_error());
    }
    tokio::select! {
        biased;
        _ = hangup.wait_for(|gone| *gone) => Err(hangup_error()),
        r = op => r,
    }
}

/// A prompt stopped by the end of the call is a hang-up, not a `stopped` result.
fn play_result(hangup: &watch::Receiver<bool>, end: PlayEnd) -> HostResult {
    if end == PlayEnd::Stopped && *hangup.borrow() {
        return Err(hangup_error());
    }
    Ok(play_end(end))
}

fn arg_str<'a>(args: &'a [Json], i: usize, op: &str, name: &str) -> Result<&'a str, HostError> {
    args.get(i)
        .and_then(Json::as_str)
        .ok_or_else(|| type_error(op, format!("{name} must be a string")))
}

fn opt_obj(args: &[Json], i: usize) -> serde_json::Map<String, Json> {
    args.get(i)
        .and_then(Json::as_object)
        .cloned()
        .unwrap_or_default()
}

fn num(v: Option<&Json>, op: &str, name: &str, default: f64) -> Result<f64, HostError> {
    match v {
        None | Some(Json::Null) => Ok(default),
        Some(Json::Number(n)) => n
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .ok_or_else(|| type_error(op, format!("{name} must be a non-negative number"))),
        Some(Json::String(s)) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .ok_or_else(|| type_error(op, format!("{name} must be a non-negative number"))),
        Some(_) => Err(type_error(op, format!("{name} must be a number"))),
    }
}

fn flag(v: Option<&Json>, default: bool) -> bool {
    match v {
        Some(Json::Bool(b)) => *b,
        Some(Json::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        _ => default,
    }
}

/// Load a prompt by name (media folder) or `tone:` spec, off the async threads.
async fn load_prompt(ctx: &MediaContext, name: &str) -> Result<Arc<[i16]>, HostError> {
    if name.starts_with("http://") || name.starts_with("https://") {
        return ctx
            .remote
            .load(name)
            .await
            .map_err(|e| HostError::error(format!("cannot play {name:?}: {e}")));
    }
    let prompts = ctx.prompts.clone();
    let recordings = ctx.recordings.clone();
    let name_owned = name.to_string();
    tokio::task::spawn_blocking(move || {
        match prompts.load(&name_owned) {
            // `record()` names a file relative to the recordings folder when that folder is
            // outside the media folder: such a name is looked up there next.
            Err(PromptError::Path(PathError::NotFound(_))) => {
                prompts.load_from(&recordings, &name_owned)
            }
            other => other,
        }
    })
    .await
    .map_err(|e| HostError::error(e.to_string()))?
    .map_err(|e| HostError::error(format!("cannot play {name:?}: {e}")))
}

fn play_end(end: PlayEnd) -> Json {
    let how = match end {
        PlayEnd::Completed => "completed",
        PlayEnd::Stopped => "stopped",
        PlayEnd::BargeIn => "bargein",
    };
    json!({ "status": how })
}

/// `ctx.play(file, {bargeIn})` → `{status: "completed"|"bargein"|"stopped"}`.
pub async fn play(ctx: MediaContext, args: Vec<Json>) -> HostResult {
    let file = arg_str(&args, 0, "play", "the file")?.to_string();
    let barge_in = flag(opt_obj(&args, 1).get("bargeIn"), false);
    until_hangup(&ctx.hangup, async {
        let samples = load_prompt(&ctx, &file).await?;
        let end = ctx
            .media
            .play(samples, barge_in)
            .await
            .map_err(media_error)?;
        play_result(&ctx.hangup, end)
    })
    .await
}

/// `ctx.tts(text, {voice, bargeIn})` (alias `say`).
pub async fn tts(ctx: MediaContext, args: Vec<Json>) -> HostResult {
    let text = arg_str(&args, 0, "tts", "the text")?.to_string();
    let opts = opt_obj(&args, 1);
    let voice = opts
        .get("voice")
        .and_then(Json::as_str)
        .unwrap_or(&ctx.default_voice)
        .to_string();
    let barge_in = flag(opts.get("bargeIn"), false);
    until_hangup(&ctx.hangup, async {
        let samples = speak(&ctx, text, voice).await?;
        let end = ctx
            .media
            .play(samples, barge_in)
            .await
            .map_err(media_error)?;
        play_result(&ctx.hangup, end)
    })
    .await
}

/// Render (or find cached) speech, off the async threads.
async fn speak(ctx: &MediaContext, text: String, voice: String) -> Result<Arc<[i16]>, HostError> {
    let cache = ctx.tts.clone();
    tokio::task::spawn_blocking(move || cache.speak(&text, &voice))
        .await
        .map_err(|e| HostError::error(e.to_string()))?
        .map_err(|e| HostError::error(e.to_string()))
}

/// The prompt of a collection: a file (or `tone:` spec) or text to speak.
enum Prompt {
    None,
    File(String),
    Speak(String),
}

async fn render(ctx: &MediaContext, prompt: &Prompt) -> Result<Option<Arc<[i16]>>, HostError> {
    match prompt {
        Prompt::None => Ok(None),
        Prompt::File(f) => load_prompt(ctx, f).await.map(Some),
        Prompt::Speak(text) => speak(ctx, text.clone(), ctx.default_voice.clone())
            .await
            .map(Some),
    }
}

/// Drive a [`Collector`] against the call: play the prompt (digits barge in), listen, retry
/// with the invalid prompt, until it is done or the caller hangs up.
async fn run_collection(
    ctx: &MediaContext,
    spec: CollectSpec,
    prompt: Prompt,
    invalid: Prompt,
) -> HostResult {
    let prompt_samples = render(ctx, &prompt).await?;
    let invalid_samples = render(ctx, &invalid).await?;
    let mut collector = Collector::new(spec);
    let mut hangup = ctx.hangup.clone();
    let result =
        |status: CollectStatus, value: String| json!({"status": status.as_str(), "value": value});
    loop {
        // One attempt: the prompt plays while digits are gathered.
        collector.prompt_started();
        let mut playing = prompt_samples.clone().map(|s| {
            let media = ctx.media.clone();
            Box::pin(async move { media.play(s, true).await })
        });
        if playing.is_none() {
            collector.prompt_ended(std::time::Instant::now());
        }
        loop {
            let deadline = collector.poll_timeout().map(tokio::time::Instant::from_std);
            let step = tokio::select! {
                _ = hangup.wait_for(|gone| *gone) => {
                    if let Step::Done { value, .. } = collector.hangup() {
                        return Ok(result(CollectStatus::Hangup, value));
                    }
                    return Err(hangup_error());
                }
                end = async { playing.as_mut().expect("guarded").await }, if playing.is_some() => {
                    playing = None;
                    end.map_err(media_error)?;
                    collector.prompt_ended(std::time::Instant::now())
                }
                digit = ctx.media.digits.next(deadline) => match digit {
                    Some(d) => collector.digit(d, std::time::Instant::now()),
                    None => collector.handle_timeout(std::time::Instant::now()),
                },
            };
            match step {
                Step::Wait => {}
                Step::StopPrompt => ctx.media.stop_playback(),
                Step::Retry { .. } => {
                    ctx.media.stop_playback();
                    if let Some(p) = playing.take() {
                        let _ = p.await;
                    }
                    if let Some(s) = invalid_samples.clone() {
                        ctx.media.play(s, false).await.map_err(media_error)?;
                    }
                    ctx.media.digits.clear();
                    break;
                }
                Step::Done { status, value } => {
                    ctx.media.stop_playback();
                    return Ok(result(status, value));
                }
            }
        }
    }
}

/// `ctx.ivr(file, timeout, min, max, terminators, {tries, invalid_file, regexp, interDigitTimeout})`
/// → `{status, value}`. `timeout` and `interDigitTimeout` are seconds, as in ConnexCS.
pub async fn ivr(ctx: MediaContext, args: Vec<Json>) -> HostResult {
    let op = "ivr";
    let file = match args.first() {
        None | Some(Json::Null) => Prompt::None,
        Some(Json::String(s)) => Prompt::File(s.clone()),
        Some(_) => return Err(type_error(op, "the file must be a string")),
    };
    let timeout = num(args.get(1), op, "timeout", 5.0)?;
    let min = num(args.get(2), op, "min", 1.0)? as usize;
    let max = num(args.get(3), op, "max", 1.0)? as usize;
    let terminators = match args.get(4) {
        None | Some(Json::Null) => "#".to_string(),
        Some(Json::String(s)) => s.clone(),
        Some(_) => return Err(type_error(op, "terminators must be a string")),
    };
    let opts = opt_obj(&args, 5);
    let inter = num(
        opts.get("interDigitTimeout"),
        op,
        "interDigitTimeout",
        timeout.min(3.0),
    )?;
    let tries = num(opts.get("tries"), op, "tries", 1.0)? as u32;
    let pattern = opts.get("regexp").and_then(Json::as_str);
    let invalid = match opts.get("invalid_file").and_then(Json::as_str) {
        Some(f) => Prompt::File(f.to_string()),
        None => Prompt::None,
    };
    let spec = CollectSpec::new(
        min,
        max,
        &terminators,
        Duration::from_secs_f64(timeout),
        Duration::from_secs_f64(inter),
        tries,
        pattern,
    )
    .map_err(|e| type_error(op, e))?;
    run_collection(&ctx, spec, file, invalid).await
}

/// `ctx.collect({prompt | say, min, max, timeout, interDigitTimeout, terminators, tries,
/// invalidPrompt, regexp})` → `{status, value}`. Times are milliseconds.
pub async fn collect(ctx: MediaContext, args: Vec<Json>) -> HostResult {
    let op = "collect";
    let o = opt_obj(&args, 0);
    let prompt = match (o.get("prompt"), o.get("say")) {
        (Some(Json::String(f)), _) => Prompt::File(f.clone()),
        (_, Some(Json::String(t))) => Prompt::Speak(t.clone()),
        _ => Prompt::None,
    };
    let invalid = match o.get("invalidPrompt").and_then(Json::as_str) {
        Some(f) => Prompt::File(f.to_string()),
        None => Prompt::None,
    };
    let max = num(o.get("max"), op, "max", 1.0)? as usize;
    let min = num(o.get("min"), op, "min", 1.0)? as usize;
    let timeout = num(o.get("timeout"), op, "timeout", 5000.0)?;
    let inter = num(o.get("interDigitTimeout"), op, "interDigitTimeout", 3000.0)?;
    let tries = num(o.get("tries"), op, "tries", 1.0)? as u32;
    let terminators = o.get("terminators").and_then(Json::as_str).unwrap_or("#");
    let spec = CollectSpec::new(
        min,
        max,
        terminators,
        Duration::from_millis(timeout as u64),
        Duration::from_millis(inter as u64),
        tries,
        o.get("regexp").and_then(Json::as_str),
    )
    .map_err(|e| type_error(op, e))?;
    run_collection(&ctx, spec, prompt, invalid).await
}

/// `ctx.record(name, {maxSeconds, silenceSeconds, beep, terminators})` → resolves when the
/// recording ends with `{file, seconds, reason}`. With no options object (ConnexCS's
/// `record(filename)`), it resolves as soon as recording has started and records until
/// hang-up or `ctx.stopRecord()`.
pub async fn record(ctx: MediaContext, args: Vec<Json>) -> HostResult {
    let op = "record";
    let name = arg_str(&args, 0, op, "the file name")?.to_string();
    let name = if name.ends_with(".wav") {
        name
    } else {
        format!("{name}.wav")
    };
    let background = args.get(1).is_none_or(|v| !v.is_object());
    let o = opt_obj(&args, 1);
    let max = num(o.get("maxSeconds"), op, "maxSeconds", 3600.0)?;
    let silence = num(o.get("silenceSeconds"), op, "silenceSeconds", 0.0)?;
    let terminators = o
        .get("terminators")
        .and_then(Json::as_str)
        .unwrap_or(if background { "" } else { "#" })
        .to_string();
    let opts = RecordOptions {
        max_duration: Some(Duration::from_secs_f64(max.clamp(0.1, 4.0 * 3600.0))),
        silence: (silence > 0.0).then(|| Duration::from_secs_f64(silence)),
        ..RecordOptions::default()
    };
    if flag(o.get("beep"), false) {
        let beep = load_prompt(&ctx, "tone:1000,250").await?;
        until_hangup(&ctx.hangup, async {
            ctx.media.play(beep, false).await.map_err(media_error)
        })
        .await?;
    }
    let recorder = Recorder::start(&ctx.recordings, &name, opts)
        .map_err(|e| HostError::error(format!("ctx.record: {e}")))?;
    let media = ctx.media.clone();
    let file = ctx.playable_name(&name);
    let name = file.clone();
    ctx.recorded
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(name.clone());
    let finish = async move {
        let out = media
            .record(recorder, &file, &terminators)
            .await
            .map_err(media_error)?;
        Ok::<_, HostError>(
            json!({"file": out.file, "seconds": out.seconds, "reason": out.reason.as_str()}),
        )
    };
    if background {
        tokio::spawn(finish);
        return Ok(json!({"file": name, "recording": true}));
    }
    // A hang-up ends the recording in the media task with reason "hangup": wait for that.
    finish.await
}

/// `ctx.stopRecord()`.
pub fn stop_record(ctx: &MediaContext) -> HostResult {
    ctx.media.stop_record();
    Ok(Json::Null)
}

/// `ctx.echo(delayMs)`: the caller hears themselves until they press a key (resolves with
/// `{digit}`) or hang up.
pub async fn echo(ctx: MediaContext, args: Vec<Json>) -> HostResult {
    let delay = num(args.first(), "echo", "delayMs", 0.0)?;
    ctx.media
        .echo(Some(Duration::from_millis(delay.min(10_000.0) as u64)))
        .map_err(media_error)?;
    let result = until_hangup(&ctx.hangup, async {
        let digit = ctx.media.digits.next(None).await;
        Ok(json!({"digit": digit.map(String::from)}))
    })
    .await;
    let _ = ctx.media.echo(None);
    result
}

/// `ctx.sendDtmf("12#", {duration})` as RFC 4733 events; duration in ms (default 100).
pub async fn send_dtmf(ctx: MediaContext, args: Vec<Json>) -> HostResult {
    let digits = arg_str(&args, 0, "sendDtmf", "the digits")?.to_string();
    if digits.is_empty()
        || !digits
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '*' | '#' | 'A'..='D'))
    {
        return Err(type_error("sendDtmf", "digits may only be 0-9, *, #, A-D"));
    }
    let duration = num(
        opt_obj(&args, 1).get("duration"),
        "sendDtmf",
        "duration",
        100.0,
    )?;
    until_hangup(&ctx.hangup, async {
        ctx.media
            .send_dtmf(
                &digits,
                Duration::from_millis(duration.clamp(40.0, 5000.0) as u64),
            )
            .await
            .map_err(media_error)?;
        Ok(Json::Null)
    })
    .await
}

/// `ctx.sleep(ms)`.
pub async fn sleep(hangup: watch::Receiver<bool>, args: Vec<Json>) -> HostResult {
    let ms = num(args.first(), "sleep", "ms", 0.0)?;
    until_hangup(&hangup, async {
        tokio::time::sleep(Duration::from_millis(ms.min(86_400_000.0) as u64)).await;
        Ok(Json::Null)
    })
    .await
}

/// The next digit the caller presses within `timeoutMs` (or `null`): the primitive behind
/// `ctx.waitFor`.
pub async fn next_digit(ctx: MediaContext, args: Vec<Json>) -> HostResult {
    let ms = num(args.first(), "nextDigit", "timeoutMs", 0.0)?;
    let deadline =
        (ms > 0.0).then(|| tokio::time::Instant::now() + Duration::from_millis(ms as u64));
    until_hangup(&ctx.hangup, async {
        Ok(json!(ctx
            .media
            .digits
            .next(deadline)
            .await
            .map(String::from)))
    })
    .await
}

/// The keys `ctx.blockDtmf(digits)` blocks. No argument blocks the ten digits (the ConnexCS
/// stub's default, `'0123456789'`); `""` unblocks everything.
pub fn blocked_digits(args: &[Json]) -> Result<String, HostError> {
    match args.first() {
        None | Some(Json::Null) => Ok(DEFAULT_BLOCKED.to_string()),
        Some(Json::String(s)) => Ok(s.clone()),
        Some(Json::Number(n)) => Ok(n.to_string()),
        Some(_) => Err(type_error("blockDtmf", "digits must be a string")),
    }
}

/// What `ctx.blockDtmf()` blocks when given nothing.
pub const DEFAULT_BLOCKED: &str = "0123456789";

/// The primitive behind `ctx.waitFor`: wait (up to `timeoutMs`) until a key arrives after
/// press number `count`, then answer `{count, digits}` with every key pressed since `count`.
/// Several waits may run at once; none consumes digits from the buffer `ivr` reads.
pub async fn digits_after(ctx: MediaContext, args: Vec<Json>) -> HostResult {
    let seen = num(args.first(), "waitFor", "count", 0.0)? as u64;
    let ms = num(args.get(1), "waitFor", "timeoutMs", 0.0)?;
    let digits = ctx.media.digits.clone();
    until_hangup(&ctx.hangup, async move {
        let changed = digits.changed_since(seen);
        if ms > 0.0 {
            let _ = tokio::time::timeout(Duration::from_millis(ms as u64), changed).await;
        } else {
            changed.await;
        }
        let count = digits.count();
        let history = digits.history();
        let new = (count.saturating_sub(seen) as usize).min(history.len());
        Ok(json!({"count": count, "digits": &history[history.len() - new..]}))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{
        g711::G711, rtp::build, EspeakRenderer, MediaSession, PortAllocator, RtpSocket,
        SessionConfig,
    };
    use tokio::net::UdpSocket;

    struct Rig {
        ctx: MediaContext,
        peer: UdpSocket,
        hangup: watch::Sender<bool>,
        _dir: tempfile::TempDir,
    }

    async fn rig() -> Rig {
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let ports = Arc::new(PortAllocator::new(44000..=44999));
        let socket = RtpSocket::bind(&ports, "127.0.0.1".parse().unwrap())
            .await
            .unwrap();
        let mut cfg = SessionConfig::new(peer.local_addr().unwrap(), G711::Pcmu);
        cfg.dtmf_pt = Some(101);
        let media = crate::voice::media_task::spawn(
            socket,
            MediaSession::new(cfg, std::time::Instant::now()),
        )
        .unwrap();
        let (hangup, rx) = watch::channel(false);
        let dir = tempfile::tempdir().unwrap();
        let ctx = MediaContext {
            media,
            prompts: Arc::new(PromptCache::new(
                concat!(env!("CARGO_MANIFEST_DIR"), "/media"),
                1 << 24,
            )),
            tts: Arc::new(TtsCache::new(Box::new(EspeakRenderer::default()), 1 << 24)),
            recordings: dir.path().to_path_buf(),
            hangup: rx,
            default_voice: "en".into(),
            recorded: Default::default(),
            remote: Arc::new(
                crate::voice::remote_audio::RemoteAudio::new(
                    crate::voice::remote_audio::RemoteAudioConfig {
                        allow: vec![],
                        connect_timeout: Duration::from_secs(1),
                        timeout: Duration::from_secs(5),
                    },
                )
                .unwrap(),
            ),
        };
        Rig {
            ctx,
            peer,
            hangup,
            _dir: dir,
        }
    }

    async fn press(rig: &Rig, digits: &str, seq: &mut u16) {
        for (n, d) in digits.chars().enumerate() {
            let event = match d {
                '*' => 10,
                '#' => 11,
                d => d.to_digit(10).unwrap() as u8,
            };
            let ts = 1000 + (*seq as u32) * 160 + n as u32;
            for i in 0..5u16 {
                let end = i >= 2;
                let p = build(
                    101,
                    i == 0,
                    *seq,
                    ts,
                    9,
                    &[event, if end { 0x8a } else { 0x0a }, 1, 64],
                );
                *seq = seq.wrapping_add(1);
                rig.peer
                    .send_to(&p, rig.ctx.media.local_addr)
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    }

    #[tokio::test]
    async fn ivr_collects_digits_during_the_prompt_until_the_terminator() {
        let rig = rig().await;
        let op = tokio::spawn(ivr(
            rig.ctx.clone(),
            vec![
                json!("ivr/menu.wav"),
                json!(3),
                json!(1),
                json!(4),
                json!("#"),
            ],
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut seq = 10;
        press(&rig, "42#", &mut seq).await;
        let out = tokio::time::timeout(Duration::from_secs(5), op)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out, Ok(json!({"status": "success", "value": "42"})));
    }

    #[tokio::test]
    async fn ivr_retries_with_the_invalid_prompt_then_reports_the_last_status() {
        let rig = rig().await;
        let args = vec![
            Json::Null,
            json!(0.4),
            json!(2),
            json!(2),
            json!("#"),
            json!({"tries": 2, "invalid_file": "tone:400,100", "regexp": "1[0-9]"}),
        ];
        let op = tokio::spawn(ivr(rig.ctx.clone(), args));
        let mut seq = 10;
        press(&rig, "99", &mut seq).await;
        // First try "99" fails the pattern; the second try times out in silence.
        let out = tokio::time::timeout(Duration::from_secs(5), op)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out, Ok(json!({"status": "timeout", "value": ""})));
    }

    #[tokio::test]
    async fn hangup_rejects_pending_operations_and_collect_reports_it() {
        let rig = rig().await;
        let long = tokio::spawn(play(rig.ctx.clone(), vec![json!("ivr/menu.wav")]));
        let wait = tokio::spawn(collect(
            rig.ctx.clone(),
            vec![json!({"max": 4, "timeout": 10000})],
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        rig.hangup.send(true).unwrap();
        let e = tokio::time::timeout(Duration::from_secs(2), long)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(e.name, "Hangup");
        let out = tokio::time::timeout(Duration::from_secs(2), wait)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out, Ok(json!({"status": "hangup", "value": ""})));
        let e = sleep(rig.ctx.hangup.clone(), vec![json!(10)])
            .await
            .unwrap_err();
        assert_eq!(e.name, "Hangup");
    }

    #[tokio::test]
    async fn a_prompt_stopped_by_the_callers_hangup_rejects_with_hangup_every_time() {
        // The call task raises the hang-up flag, then stops the media; by the time the script
        // side polls again both the flag and the prompt's `stopped` end are ready.
        for round in 0..24 {
            let rig = rig().await;
            let op = play(rig.ctx.clone(), vec![json!("tone:400,20000")]);
            tokio::pin!(op);
            assert!(
                tokio::time::timeout(Duration::from_millis(150), &mut op)
                    .await
                    .is_err(),
                "the prompt is playing"
            );
            rig.hangup.send(true).unwrap();
            rig.ctx.media.shutdown();
            // Let the media task end the prompt before the play future is polled again.
            tokio::time::sleep(Duration::from_millis(30)).await;
            let e = op.await.expect_err("a hang-up, not a result");
            assert_eq!(e.name, "Hangup", "round {round}");
        }
    }

    #[tokio::test]
    async fn bad_arguments_and_missing_files_are_clear_errors() {
        let rig = rig().await;
        let e = play(rig.ctx.clone(), vec![json!(42)]).await.unwrap_err();
        assert_eq!(e.name, "TypeError");
        let e = play(rig.ctx.clone(), vec![json!("ivr/nope.wav")])
            .await
            .unwrap_err();
        assert_eq!(e.name, "Error");
        assert!(e.message.contains("nope.wav"), "{e}");
        let e = play(rig.ctx.clone(), vec![json!("../Cargo.toml")])
            .await
            .unwrap_err();
        assert_eq!(e.name, "Error");
        let e = play(
            rig.ctx.clone(),
            vec![json!("https://prompts.example.net/x.wav")],
        )
        .await
        .unwrap_err();
        assert!(
            e.message.contains("url_hosts"),
            "remote prompts go through the allowlist: {e}"
        );
        let e = ivr(
            rig.ctx.clone(),
            vec![Json::Null, json!(1), json!(5), json!(2)],
        )
        .await
        .unwrap_err();
        assert_eq!(e.name, "TypeError");
        assert!(e.message.contains("min"), "{e}");
        let e = send_dtmf(rig.ctx.clone(), vec![json!("12x")])
            .await
            .unwrap_err();
        assert_eq!(e.name, "TypeError");
        let e = record(rig.ctx.clone(), vec![json!("../escape")])
            .await
            .unwrap_err();
        assert!(e.message.contains("record"), "{e}");
    }

    #[tokio::test]
    async fn record_with_options_ends_on_the_terminator_and_writes_a_wav() {
        let rig = rig().await;
        let op = tokio::spawn(record(
            rig.ctx.clone(),
            vec![json!("msg"), json!({"maxSeconds": 10, "terminators": "#"})],
        ));
        let local = rig.ctx.media.local_addr;
        for i in 0..25u16 {
            let p = build(
                0,
                i == 0,
                3000 + i,
                50_000 + i as u32 * 160,
                9,
                &[0x10; 160],
            );
            rig.peer.send_to(&p, local).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // DTMF continues the audio's sequence numbers (one RTP stream).
        let mut seq = 3025;
        press(&rig, "#", &mut seq).await;
        let out = tokio::time::timeout(Duration::from_secs(3), op)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(out["reason"], "dtmf");
        assert_eq!(
            out["file"], "msg.wav",
            "the recordings folder is outside the media folder here"
        );
        assert!(out["seconds"].as_f64().unwrap() > 0.3, "{out}");
        assert!(rig.ctx.recordings.join("msg.wav").exists());
        // The media folder is elsewhere, and the name record() gave plays all the same.
        assert_ne!(rig.ctx.prompts.root(), rig.ctx.recordings.as_path());
        let played = play(rig.ctx.clone(), vec![out["file"].clone()])
            .await
            .unwrap();
        assert_eq!(played["status"], "completed");
    }

    #[tokio::test]
    async fn a_recording_can_be_played_back_by_the_name_record_returned() {
        let mut rig = rig().await;
        let media_root = rig._dir.path().join("media");
        std::fs::create_dir_all(media_root.join("recordings")).unwrap();
        rig.ctx.prompts = Arc::new(PromptCache::new(&media_root, 1 << 20));
        rig.ctx.recordings = media_root.join("recordings");
        let op = tokio::spawn(record(
            rig.ctx.clone(),
            vec![json!("back"), json!({"maxSeconds": 0.3})],
        ));
        let local = rig.ctx.media.local_addr;
        for i in 0..30u16 {
            let p = build(0, i == 0, 700 + i, i as u32 * 160, 5, &[0x30; 160]);
            rig.peer.send_to(&p, local).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let out = op.await.unwrap().unwrap();
        assert_eq!(out["file"], "recordings/back.wav");
        assert_eq!(out["reason"], "max");
        let played = play(rig.ctx.clone(), vec![out["file"].clone()])
            .await
            .unwrap();
        assert_eq!(played["status"], "completed");
    }
}
