//! Class 5 voice: one task per call, holding the dialog, the RTP socket and the script's `ctx`.
//!
//! | module | job |
//! |---|---|
//! | [`data`] | `data` and the initial call variables, from the INVITE |
//! | [`ctx`] | the script's `ctx` ([`HostObject`](crate::script::HostObject)): requests to the call task |
//! | [`call`] | the call task: runs the script, turns ctx requests into SIP commands, hang-up handling |
//! | [`media_task`] | the call's media task: drives the RTP socket and session, serves media commands, buffers digits |
//! | [`media_ops`] | the ctx media operations (play, tts, ivr, collect, record, echo, sendDtmf...) |
//! | [`media_bind`] | negotiated SDP → media task at answer; the ctx's media method dispatch and JS prelude |
//! | [`collect`] | the sans-IO digit collector behind `ivr`/`collect` |
//! | [`trunks`] | `[[trunk]]` entries; destination → next hop, Request-URI, caller ID, credentials, limits |
//! | [`control`] | placing outbound legs through the SIP dispatcher; the live-call list |
//! | [`bridge`] | `ctx.bridge`: the B leg, ringback/early media, the RTP relay, ending both legs |
//! | [`destination`] | `ctx.destination(app, data)`: another class5 script run on the same call |
//! | [`transfer`] | `ctx.transfer`: 302 before answer, REFER after, bridge when REFER is refused |
//! | [`refer_in`] | a bridged caller's REFER (`accept_refer`): B is re-bridged to the target |
//! | [`originate`] | calls placed from the API (`POST /v1/calls`, `originate()`) that run a script once answered |
//!
//! The `ctx` lives on a script worker thread (its futures are `!Send`); the call task lives
//! on the main runtime. They talk through channels only: the ctx holds an
//! `mpsc::UnboundedSender<CtxRequest>` and each awaited operation a `oneshot` reply.
//!
//! **Media seam.** `answer()` (and early media) binds an [`RtpSocket`](crate::media::RtpSocket)
//! from the shared [`PortAllocator`](crate::media::PortAllocator) and keeps it in the call
//! task with the negotiated codec; nothing is sent on it yet. Media operations (play, ivr,
//! record...) are new [`ctx::CtxRequest`] variants handled by the call task, which owns
//! the socket; the `watch` hang-up flag the task raises is what they select on.

pub mod bridge;
pub mod call;
pub mod collect;
pub mod control;
pub mod ctx;
pub mod data;
pub mod destination;
mod hold;
pub mod media_bind;
pub mod media_ops;
pub mod media_task;
pub mod originate;
pub mod refer_in;
pub mod remote_audio;
pub mod transfer;
pub mod trunks;

pub use call::{CallEvent, VoiceServer};
pub use ctx::{hangup_error, CallCtx, CtxRequest};
