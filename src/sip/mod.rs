//! SIP signalling: sans-IO message handling, transactions, dialogs and SDP, plus thin tokio transports.
//!
//! # Shape
//!
//! Everything except [`transport`] is sans-IO: state machines fed with bytes (or parsed
//! messages) and `now: Instant`, which queue messages to send, deadlines to wake up at and
//! events for the layer above. Nothing in the core reads the clock or touches a socket, so
//! every timer and every retransmission is tested with a fake clock.
//!
//! | module | job |
//! |---|---|
//! | [`parse`] | bytes → rsip message: normalises compact/folded/comma-joined headers, cuts the body at Content-Length, typed [`ParseError`] |
//! | [`message`] | reading Via/CSeq/tags/Contact…, building responses (§8.2.6), serialising |
//! | [`framing`] | TCP byte stream → messages |
//! | [`transaction`] | RFC 3261 §17 + RFC 6026 transactions and their table |
//! | [`dialog`] | dialog state, in-dialog requests, 2xx retransmission, RFC 4028 session timers |
//! | [`sdp`] | SDP parsing and G.711 + telephone-event offer/answer |
//! | [`ua`] | the user agent core tying it together: calls, events, commands |
//! | [`transport`] | tokio UDP/TCP driver around [`UserAgent`] |
//! | [`tcp_guard`] | TCP connection caps (per source, global without lockout) and idle/slow deadlines |
//!
//! # Using it from `routing/` or `voice/`
//!
//! Start the stack and consume its events:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use callforge::sip::{self, ListenSpec, MediaConfig, UaConfig, UaEvent};
//! let specs: Vec<ListenSpec> = vec!["udp:127.0.0.1:5060".parse()?, "tcp:127.0.0.1:5060".parse()?];
//! let mut sip = sip::start(&specs, UaConfig::default()).await?;
//! while let Some(event) = sip.events.recv().await {
//!     match event {
//!         UaEvent::IncomingCall(call) => {
//!             // Class 4: run the routing script, then redirect or reject.
//!             sip.handle.redirect(call.call, vec!["sip:+15551234@gw.example".into()]).await?;
//!             // Class 5: ring, then answer with our RTP address; the result says which
//!             // codec / DTMF payload / remote RTP address to use.
//!             // let media = MediaConfig::new(rtp_ip, rtp_port);
//!             // let negotiated = sip.handle.answer(call.call, media).await?;
//!         }
//!         UaEvent::CallEnded { call, by, reason } => { let _ = (call, by, reason); }
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Events ([`UaEvent`]), per call identified by a [`CallHandle`]:
//! - `IncomingCall(Box<IncomingCall>)`: the INVITE (rsip request, parsed From/To, SDP offer,
//!   source). 100 Trying is already sent.
//! - `CallAcked { call, answer }`: our 2xx was acknowledged; the call is up.
//! - `InDialogRequest { call, kind, request, media }`: INFO / re-INVITE / UPDATE / OPTIONS,
//!   already answered; `media` holds the new negotiation (e.g. hold: sendonly → recvonly).
//!   With `UaConfig::accept_refer`, also REFER (`kind: Refer`): 202 and a `100 Trying`
//!   NOTIFY are sent; report the transfer with `notify_transfer(call, code, reason)`.
//!   Without it a REFER gets 603 and nothing goes up.
//! - `ReferResponse { call, code }` (final response to our REFER, 408 on timeout) and
//!   `TransferNotify { call, code }` (each `Event: refer` NOTIFY's sipfrag status).
//! - Terminal, exactly one per call: `CallCancelled { call }` or
//!   `CallEnded { call, by: Remote|Local, reason }` with [`EndReason`]: `Bye`,
//!   `Rejected(code)` (our reject/redirect), `NoAck`, `SessionExpired`, `RefreshFailed`,
//!   `NotAnswered` (no command within `UaConfig::pending_timeout`; 408 sent), and for
//!   outbound calls `Failed(code)`, `Timeout`, `Cancelled`.
//!
//! Commands (on [`SipHandle`], or directly on [`UserAgent`] with a `now`):
//! `ring(call, None)` → 180, `ring(call, Some(media))` → 183 with SDP,
//! `answer(call, media)` → 200 + SDP (an [`SdpError`](sdp::SdpError) means: reject with 488),
//! `reject(call, code, reason, headers)` → any 3xx–6xx, `redirect(call, uris)` → 302 with
//! one Contact per URI, `hangup(call)` → BYE (480 if not yet answered, CANCEL if it is our
//! outbound call still ringing), `refer(call, uri)` → in-dialog REFER (blind transfer) on an
//! established call.
//!
//! Outbound calls (UAC): `invite(OutboundCall { target, request_uri, from, to, media, .. })`
//! returns a [`CallHandle`]; with `auth: Some(Credentials)` a 401/407 is answered once per
//! realm by re-sending the INVITE (CSeq + 1, new branch) with Digest credentials. Then
//! `CallProgress { call, code, media }` for 18x,
//! `CallAnswered { call, media }` once the 2xx is ACKed, or
//! `CallEnded { by: Remote, reason: Failed(code) }` / `Timeout` / `Cancelled`.
//!
//! The stack handles by itself: OPTIONS (in and out of dialog), CANCEL (200 + 487),
//! unknown dialogs (481), out-of-order CSeq (500), malformed requests (400 with the
//! reason, or dropped with one warning when unanswerable), unknown methods (501),
//! unsupported `Require` (420), too-small session intervals (422), limits (503 +
//! Retry-After), unsupported URI schemes (416), RFC 3581 rport, 2xx retransmission and
//! no-ACK teardown, session-timer refresh/expiry, a BYE crossing ours (200), and
//! re-INVITE/UPDATE offers (answered with the media config given at answer time).
//!
//! Bind to a concrete IP, or set `UaConfig::advertised_addr`: Via and Contact carry the
//! receiving socket's address, and `0.0.0.0` is not an address a peer can reach.

pub mod dialog;
pub mod digest;
pub mod framing;
pub mod guard;
pub mod inbound_auth;
pub mod lite;
pub mod message;
pub mod parse;
pub mod redirect_tx;
pub mod sdp;
pub mod tcp_guard;
pub(crate) mod timer;
pub mod transaction;
pub mod transport;
pub mod ua;

pub use digest::Credentials;
pub use parse::{ParseError, ParseLimits};
pub use sdp::{Codec, Direction, MediaConfig, Negotiated, SessionDescription};
pub use tcp_guard::TcpLimits;
pub use transaction::{Target, TimerConfig, TransportKind};
pub use transport::{
    start, start_fast, start_with, FastUdp, Injector, ListenSpec, SipHandle, SipTransport,
    TransportError,
};
pub use ua::{
    Action, CallHandle, EndReason, EndedBy, InDialogKind, IncomingCall, MessageHandle,
    OutboundMessage, UaConfig, UaError, UaEvent, UserAgent,
};
