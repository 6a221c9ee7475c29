//! Media: sans-IO RTP sessions, G.711, DTMF and prompt audio, plus a thin tokio RTP socket driver.
//!
//! # Shape
//! Everything here except [`rtp_socket`] is a state machine fed with packets and "now" and
//! polled for packets to send, the next deadline and events; nothing sleeps and nothing
//! reads a clock, so tests drive hours of call time with a fake clock in milliseconds.
//!
//! ```text
//!  RtpSocket (tokio, rtp_socket.rs) ──datagrams + Instant──▶ MediaSession (session.rs)
//!        ▲                                                   │  FrameClock + RtpSender (rtp.rs)
//!        └──────────── poll_transmit / poll_timeout ─────────┤  ReorderBuffer (jitter.rs)
//!                                                            │  Player (player.rs), G711 (g711.rs)
//!  voice/ ◀──────────── poll_event: digits, prompt ends, ────┤  DtmfDecoder/Sender/Merger (dtmf.rs)
//!                       received audio                       └  InbandDetector (goertzel.rs)
//!  PromptCache (prompt.rs) ── Arc<[i16]> ──▶ MediaSession::play
//!  MediaEvent::Audio ──▶ Recorder (recorder.rs) ── WAV in the recordings root
//! ```
//!
//! # What the voice layer uses
//! - Set-up: [`RtpSocket::bind`] with a shared [`PortAllocator`]; put `local_addr()` in the
//!   SDP answer; build a [`SessionConfig`] from the negotiated codec, payload types and
//!   remote address; [`MediaSession::new`].
//! - Sending: [`Ticker::join`] hands the session to the RTP ticker (`ticker.rs`), whose
//!   thread sends every call's due frame once per 20 ms tick. The call's media task
//!   (`voice/media_task.rs`) feeds received datagrams in, serves commands and drains
//!   [`MediaSession::poll_event`] when a tick wakes it. [`RtpSocket::drive`] remains the
//!   one-call driver (tests, tools).
//! - `ctx.play(file)`: [`PromptCache::load`] (in `spawn_blocking`; also renders `tone:` specs),
//!   then [`MediaSession::play`] → wait for [`MediaEvent::PlayFinished`] with that
//!   [`PlayId`]. `stop` is [`MediaSession::stop_playback`]. Barge-in is a flag of `play`.
//! - `ctx.ivr()/collect`: [`MediaEvent::Digit`] (already merged across RFC 4733, SIP INFO
//!   via [`MediaSession::handle_info`], and in-band tones); timeouts and terminators belong
//!   to the voice layer.
//! - `ctx.record()`: [`Recorder::start`], [`MediaSession::set_audio_tap`]`(true)`, feed each
//!   [`MediaEvent::Audio`] to [`Recorder::push`] until it returns a [`Recording`] or the
//!   script stops it ([`Recorder::stop`]).
//! - echo: [`MediaSession::start_echo`]; send DTMF: [`MediaSession::send_dtmf`]; hold:
//!   [`MediaSession::set_sending`]; re-INVITE: [`MediaSession::update_remote`].
//!
//! Design decisions (silence, RTCP, latching, recording atomicity, DTMF merging) are
//! documented at the top of `session.rs`, `recorder.rs` and `dtmf.rs`.

pub mod dtmf;
pub mod g711;
pub mod goertzel;
pub mod jitter;
pub mod paths;
pub mod player;
pub mod prompt;
pub mod recorder;
pub mod relay;
pub mod relay_driver;
pub mod relay_threads;
pub mod rtp;
pub mod rtp_socket;
pub mod session;
pub mod ticker;
pub mod tone;
pub mod tts;

#[cfg(test)]
mod testutil;

pub use dtmf::{DtmfError, DtmfSource};
pub use g711::G711;
pub use paths::PathError;
pub use player::{PlayEnd, PlayFinished, PlayId};
pub use prompt::{PromptCache, PromptError};
pub use recorder::{RecordError, RecordOptions, Recorder, Recording, StopReason};
pub use relay_threads::{RelayPriority, RelayThreads};
pub use rtp::RtpError;
pub use rtp_socket::{ParkedRtpSocket, PortAllocator, RtpSocket};
pub use session::{MediaEvent, MediaSession, RtpStats, SessionConfig, SessionError, Transmit};
pub use ticker::{TickedMedia, Ticker};
pub use tone::{Tone, ToneError};
pub use tts::{EspeakRenderer, TtsCache, TtsError, TtsRenderer};
