//! Binding a call to its media: the session configuration from the negotiated SDP, the media
//! task started at answer (or early media), and the ctx methods that use it.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use futures::FutureExt;
use serde_json::Value as Json;
use tokio::sync::{watch, Notify};

use super::{
    media_ops::{self, MediaContext},
    media_task::{self, MediaHandle},
};
use crate::{
    media::{
        relay::BlockedKeys, MediaSession, PromptCache, RtpSocket, SessionConfig, TtsCache, G711,
    },
    script::{HostCall, HostError, HostMethod},
    sip::{sdp::Codec, Negotiated},
};

/// What every call's media shares: prompt and TTS caches, the recordings folder.
#[derive(Clone)]
pub struct MediaShared {
    pub prompts: Arc<PromptCache>,
    pub tts: Arc<TtsCache>,
    pub recordings: PathBuf,
    pub default_voice: String,
    /// Listen for in-band DTMF tones even when the peer offered telephone-event.
    pub inband_always: bool,
    /// Fetches `http(s)://` prompts for every call.
    pub remote: Arc<super::remote_audio::RemoteAudio>,
    /// Where bridged calls' relays run.
    pub relays: Arc<crate::media::RelayThreads>,
}

/// The session settings for what the SDP negotiated. In-band detection is on when the peer
/// offered no telephone-event (or the route asks for it).
pub fn session_config(neg: &Negotiated, inband_always: bool) -> SessionConfig {
    let codec = match neg.codec {
        Codec::Pcmu => G711::Pcmu,
        Codec::Pcma => G711::Pcma,
    };
    let remote = neg
        .remote_rtp
        .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 9)));
    let mut cfg = SessionConfig::new(remote, codec);
    cfg.audio_pt = neg.payload_type;
    cfg.dtmf_pt = neg.dtmf_payload_type;
    cfg.inband_dtmf = inband_always || neg.dtmf_payload_type.is_none();
    cfg
}

/// Start a call's media task on its bound socket.
pub fn start(
    socket: RtpSocket,
    neg: &Negotiated,
    shared: &MediaShared,
    hangup: watch::Receiver<bool>,
) -> std::io::Result<MediaContext> {
    let session = MediaSession::new(session_config(neg, shared.inband_always), Instant::now());
    let media: MediaHandle = media_task::spawn(socket, session)?;
    if neg.remote_rtp.is_none() {
        media.set_sending(false);
    }
    Ok(MediaContext {
        media,
        prompts: shared.prompts.clone(),
        tts: shared.tts.clone(),
        recordings: shared.recordings.clone(),
        hangup,
        default_voice: shared.default_voice.clone(),
        recorded: Default::default(),
        remote: shared.remote.clone(),
    })
}

/// Where a call's ctx finds its media once the call task has started it, and the keys the
/// script blocked (kept here so a block set before answer, or before a bridge restarts the
/// media task, applies to every media task the call gets).
#[derive(Clone, Default)]
pub struct MediaSlot(Arc<SlotInner>);

#[derive(Default)]
struct SlotInner {
    media: Mutex<Option<MediaContext>>,
    blocked: Mutex<String>,
    /// The same keys, for the RTP relay while the call is bridged.
    relay_blocked: BlockedKeys,
    /// Woken when media starts, for waits that must not answer the call (`ctx.on("dtmf")`).
    started: Notify,
}

impl MediaSlot {
    pub fn set(&self, media: MediaContext) {
        media.media.digits.block(&self.blocked());
        *self.0.media.lock().unwrap_or_else(|p| p.into_inner()) = Some(media);
        self.0.started.notify_waiters();
    }

    pub fn get(&self) -> Option<MediaContext> {
        self.0
            .media
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn blocked(&self) -> String {
        self.0
            .blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `ctx.blockDtmf(digits)`: remembered for the call, applied to the running media now.
    pub fn block(&self, digits: &str) {
        *self.0.blocked.lock().unwrap_or_else(|p| p.into_inner()) = digits.to_string();
        self.0.relay_blocked.set(digits);
        if let Some(m) = self.get() {
            m.media.digits.block(digits);
        }
    }

    /// The blocked keys as the bridge relay reads them.
    pub fn blocked_keys(&self) -> BlockedKeys {
        self.0.relay_blocked.clone()
    }

    /// Resolves once the call has media (answer, early media, an originated call).
    pub async fn started(&self) {
        loop {
            let woken = self.0.started.notified();
            if self.get().is_some() {
                return;
            }
            woken.await;
        }
    }

    /// The call is over: stop its media task (and hand back what it knew, for the CDR).
    pub fn shutdown(&self) -> Option<MediaContext> {
        let taken = self
            .0
            .media
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(m) = &taken {
            m.media.shutdown();
        }
        taken
    }
}

/// The ctx methods served by the media layer.
pub const MEDIA_METHODS: &[HostMethod] = &[
    HostMethod::asynchronous("play"),
    HostMethod::asynchronous("tts"),
    HostMethod::asynchronous("say"),
    HostMethod::asynchronous("ivr"),
    HostMethod::asynchronous("collect"),
    HostMethod::asynchronous("record"),
    HostMethod::sync("stopRecord"),
    HostMethod::asynchronous("echo"),
    HostMethod::asynchronous("sendDtmf"),
    HostMethod::asynchronous("sleep"),
    HostMethod::sync("blockDtmf"),
    HostMethod::sync("dtmfCount"),
    HostMethod::asynchronous("digitsAfter"),
    HostMethod::asynchronous("dtmfWatch"),
];

/// The media methods that answer the call first when it has no media yet (ConnexCS answers
/// for a script that plays before `answer()`; its published ctx-echo.js relies on it).
/// `blockDtmf`, `dtmfCount`, `stopRecord`, `sleep` and `dtmfWatch` work without media.
pub const ANSWERING_METHODS: &[&str] = &[
    "play",
    "tts",
    "say",
    "ivr",
    "collect",
    "record",
    "echo",
    "sendDtmf",
    "digitsAfter",
];

/// The longest single wait of `dtmfWatch`: the `ctx.on("dtmf")` loop asks again after it, so
/// it picks up the media task a bridge restarts.
const WATCH_SLICE_MS: f64 = 1000.0;

/// Serve a media method; the arguments come back when `method` is not one.
pub fn call(
    slot: &MediaSlot,
    hangup: &watch::Receiver<bool>,
    method: &str,
    args: Vec<Json>,
) -> Result<HostCall, Vec<Json>> {
    if !MEDIA_METHODS.iter().any(|m| m.name == method) {
        return Err(args);
    }
    match method {
        "sleep" => {
            return Ok(HostCall::Pending(
                media_ops::sleep(hangup.clone(), args).boxed_local(),
            ))
        }
        "blockDtmf" => {
            return Ok(HostCall::Ready(media_ops::blocked_digits(&args).map(|d| {
                slot.block(&d);
                Json::Null
            })))
        }
        "dtmfWatch" => {
            return Ok(HostCall::Pending(
                dtmf_watch(slot.clone(), hangup.clone(), args).boxed_local(),
            ))
        }
        _ => {}
    }
    let Some(ctx) = slot.get() else {
        let answer = match method {
            // Nothing pressed and nothing recording yet.
            "dtmfCount" => Ok(Json::from(0)),
            "stopRecord" => Ok(Json::Null),
            _ if *hangup.borrow() => Err(media_ops::hangup_error()),
            _ => Err(HostError::type_error(format!(
                "ctx.{method}: the call has no media yet: call ctx.answer() first (or ctx.ring({{earlyMedia: true}}) for early media)"
            ))),
        };
        return Ok(HostCall::Ready(answer));
    };
    Ok(match method {
        "play" => HostCall::Pending(media_ops::play(ctx, args).boxed_local()),
        "tts" | "say" => HostCall::Pending(media_ops::tts(ctx, args).boxed_local()),
        "ivr" => HostCall::Pending(media_ops::ivr(ctx, args).boxed_local()),
        "collect" => HostCall::Pending(media_ops::collect(ctx, args).boxed_local()),
        "record" => HostCall::Pending(media_ops::record(ctx, args).boxed_local()),
        "stopRecord" => HostCall::Ready(media_ops::stop_record(&ctx)),
        "echo" => HostCall::Pending(media_ops::echo(ctx, args).boxed_local()),
        "sendDtmf" => HostCall::Pending(media_ops::send_dtmf(ctx, args).boxed_local()),
        "dtmfCount" => HostCall::Ready(Ok(Json::from(ctx.media.digits.count()))),
        "digitsAfter" => HostCall::Pending(media_ops::digits_after(ctx, args).boxed_local()),
        _ => return Err(args),
    })
}

/// `dtmfWatch(count, ms)`: like `digitsAfter`, but before the call has media it waits for
/// media (or `ms`) instead of answering, so `ctx.on("dtmf", fn)` may be set up before answer.
async fn dtmf_watch(
    slot: MediaSlot,
    hangup: watch::Receiver<bool>,
    mut args: Vec<Json>,
) -> crate::script::host::HostResult {
    let ms = args.get(1).and_then(Json::as_f64).unwrap_or(WATCH_SLICE_MS);
    let ms = if ms > 0.0 {
        ms.min(WATCH_SLICE_MS)
    } else {
        WATCH_SLICE_MS
    };
    let Some(ctx) = slot.get() else {
        let mut gone = hangup.clone();
        if *gone.borrow() {
            return Err(media_ops::hangup_error());
        }
        tokio::select! {
            _ = slot.started() => {}
            _ = gone.wait_for(|g| *g) => return Err(media_ops::hangup_error()),
            _ = tokio::time::sleep(std::time::Duration::from_millis(ms as u64)) => {}
        }
        return Ok(serde_json::json!({"count": 0, "digits": ""}));
    };
    args.truncate(1);
    args.push(Json::from(ms));
    media_ops::digits_after(ctx, args).await
}

/// The ctx methods written in JS (`waitFor`, `on`/`off`): they need RegExps, callbacks and
/// background loops, which do not cross into Rust as JSON. Evaluated in a call's context on
/// the first call of one of them.
pub const CTX_PRELUDE: &str = include_str!("ctx_prelude.js");
/// The methods [`CTX_PRELUDE`] returns.
pub const JS_METHODS: &[&str] = &["waitFor", "on", "off"];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::sdp::Direction;

    fn negotiated(dtmf: Option<u8>, remote: Option<&str>) -> Negotiated {
        Negotiated {
            codec: Codec::Pcma,
            payload_type: 8,
            dtmf_payload_type: dtmf,
            remote_rtp: remote.map(|r| r.parse().unwrap()),
            remote_ptime: None,
            offered_direction: Direction::SendRecv,
            local_direction: Direction::SendRecv,
            media_index: 0,
        }
    }

    #[test]
    fn inband_detection_is_on_only_without_telephone_event() {
        let cfg = session_config(&negotiated(Some(96), Some("127.0.0.1:4000")), false);
        assert_eq!(
            (cfg.codec, cfg.audio_pt, cfg.dtmf_pt, cfg.inband_dtmf),
            (G711::Pcma, 8, Some(96), false)
        );
        assert!(session_config(&negotiated(None, Some("127.0.0.1:4000")), false).inband_dtmf);
        assert!(session_config(&negotiated(Some(96), Some("127.0.0.1:4000")), true).inband_dtmf);
    }

    #[test]
    fn media_methods_before_answer_or_after_hangup_are_clear_errors() {
        let slot = MediaSlot::default();
        let (tx, rx) = watch::channel(false);
        match call(&slot, &rx, "play", vec![Json::from("ivr/menu.wav")]) {
            Ok(HostCall::Ready(Err(e))) => {
                assert_eq!(e.name, "TypeError");
                assert!(e.message.contains("ctx.answer()"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        tx.send(true).unwrap();
        match call(&slot, &rx, "ivr", vec![]) {
            Ok(HostCall::Ready(Err(e))) => assert_eq!(e.name, "Hangup"),
            other => panic!("{other:?}"),
        }
        assert!(
            call(&slot, &rx, "answer", vec![]).is_err(),
            "signalling is not media"
        );
    }
}
