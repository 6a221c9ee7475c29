//! A REFER from the caller while it is bridged (`[calls] accept_refer = true`): the caller
//! hands the far party (B) over to a third party (C). callforge places C; when C answers it
//! relays B↔C instead of caller↔B, reports `200 OK` to the caller by NOTIFY and hangs the
//! caller's leg up. A REFER while not bridged, or a C that fails, is reported by NOTIFY with
//! the failure status and changes nothing.

use serde_json::json;

use super::{
    bridge::{leg_media, RelayRun, RelaySide},
    call::{CallEvent, CallState},
};
use crate::{
    media::{relay::OutStream, RtpSocket},
    sip::{message, message::NameAddr, CallHandle, EndReason},
};

/// The transfer target's leg.
pub(super) struct ReferLeg {
    pub(super) handle: CallHandle,
    rtp: Option<RtpSocket>,
    /// Re-bridged: B now talks to this leg.
    pub(super) connected: bool,
}

impl CallState {
    /// Report the outcome of the caller's REFER on its subscription.
    async fn notify_caller(&self, code: u16, reason: &str) {
        if let Err(e) = self
            .server
            .sip
            .notify_transfer(self.call, code, reason.to_string())
            .await
        {
            tracing::debug!(call = ?self.call, "transfer NOTIFY not sent: {e}");
        }
    }

    /// The caller's accepted REFER (the stack already sent 202 and `100 Trying`).
    pub(super) async fn refer_from_caller(&mut self, request: &rsip::Request) {
        let target = message::header(&request.headers, "Refer-To")
            .and_then(|v| NameAddr::parse(&v).ok())
            .map(|n| n.uri);
        let bridged = self
            .bridge
            .as_ref()
            .is_some_and(|b| b.relay.is_some() && b.answered_at.is_some() && b.refer.is_none());
        let Some(target) = target.filter(|_| bridged && !self.ended) else {
            tracing::info!(call = ?self.call, "REFER from the caller while not bridged: declined");
            self.notify_caller(603, "Declined").await;
            return;
        };
        let dialed = match self.server.trunks.current().resolve(&target, None, None) {
            Ok(d) => d,
            Err(e) => {
                tracing::info!(call = ?self.call, "REFER target {target:?} not dialable: {e}");
                self.notify_caller(404, "Not Found").await;
                return;
            }
        };
        let rtp = match RtpSocket::bind(&self.server.rtp_ports, self.server.rtp_ip).await {
            Ok(s) => s,
            Err(_) => {
                self.notify_caller(503, "Service Unavailable").await;
                return;
            }
        };
        let port = rtp.local_addr().map(|a| a.port()).unwrap_or_default();
        let oc = dialed.outbound_call(self.server.rtp_ip, port, None, Vec::new());
        match self.server.control.place(oc, self.events_tx.clone()).await {
            Ok(handle) => {
                tracing::info!(call = ?self.call, leg = handle.0, %target, "caller transfers the bridged party");
                if let Some(b) = self.bridge.as_mut() {
                    b.refer = Some(ReferLeg {
                        handle,
                        rtp: Some(rtp),
                        connected: false,
                    });
                }
            }
            Err(e) => {
                tracing::info!(call = ?self.call, "transfer target INVITE not sent: {e}");
                self.notify_caller(503, "Service Unavailable").await;
            }
        }
    }

    /// An event of the transfer target's leg.
    pub(super) async fn refer_leg_event(&mut self, ev: CallEvent) {
        match ev {
            CallEvent::Progress { code, .. } if (code == 180 || code == 183) && !self.ended => {
                self.notify_caller(code, "Ringing").await;
            }
            CallEvent::Answered { media } => self.refer_leg_answered(media).await,
            CallEvent::Ended { reason, .. } => {
                let Some(b) = self.bridge.as_mut() else {
                    return;
                };
                let connected = b.refer.as_ref().is_some_and(|r| r.connected);
                let b_leg = b.leg;
                b.refer = None;
                if connected {
                    // The transfer target hung up: B's leg ends too (its end settles the bridge).
                    let _ = self.server.sip.hangup(b_leg).await;
                } else {
                    let code = match reason {
                        EndReason::Failed(c) => c,
                        _ => 480,
                    };
                    self.notify_caller(code, "Transfer Failed").await;
                }
            }
            _ => {}
        }
    }

    /// C answered: relay B↔C, tell the caller, and hang the caller up.
    async fn refer_leg_answered(&mut self, media: Option<crate::sip::Negotiated>) {
        let Some(b) = self.bridge.as_mut() else {
            return;
        };
        let (Some(c_neg), Some(b_neg), Some(r)) = (media, b.b_neg.clone(), b.refer.as_mut()) else {
            if let Some(r) = b.refer.take() {
                let _ = self.server.sip.hangup(r.handle).await;
            }
            self.notify_caller(488, "Not Acceptable Here").await;
            return;
        };
        let (Some(c_sock), Some(c_remote), Some(b_remote)) =
            (r.rtp.take(), c_neg.remote_rtp, b_neg.remote_rtp)
        else {
            return;
        };
        r.connected = true;
        let Some(old) = b.relay.take() else {
            return;
        };
        let ended = match old.finish().await {
            Ok(ended) => ended,
            Err(e) => {
                tracing::warn!(call = ?self.call, "relay not handed over: {e}");
                return;
            }
        };
        let (b_sock, stats) = (ended.b, ended.stats);
        tracing::debug!(call = ?self.call, ?stats, "caller side of the relay handed over");
        let run = RelayRun::spawn(
            &self.server.media.relays,
            RelaySide {
                socket: b_sock,
                media: leg_media(&b_neg),
                remote: b_remote,
                // B keeps hearing one stream: continue the one the first relay sent it.
                out: match stats.b_out {
                    Some(pos) => OutStream::Continue(pos),
                    None => OutStream::New {
                        ssrc: fastrand::u32(..),
                    },
                },
                blocked: Default::default(),
            },
            RelaySide {
                socket: c_sock,
                media: leg_media(&c_neg),
                remote: c_remote,
                out: OutStream::New {
                    ssrc: fastrand::u32(..),
                },
                blocked: Default::default(),
            },
            None,
        );
        let run = match run {
            Ok(run) => run,
            Err(e) => {
                tracing::warn!(call = ?self.call, "relay to the transfer target not started: {e}");
                return;
            }
        };
        let c_handle = r.handle;
        if let Some(b) = self.bridge.as_mut() {
            b.relay = Some(run);
        }
        self.cdr
            .legs
            .push(json!({"leg": c_handle.0, "transferred_by_caller": true}));
        self.notify_caller(200, "OK").await;
        // The caller is done: it handed its party over.
        self.ended = true;
        self.stop_media();
        self.ended_by("caller", "transferred".into());
        let _ = self.hangup.send(true);
        self.commit_cdr_ahead().await;
        if let Err(e) = self.server.sip.hangup(self.call).await {
            tracing::debug!(call = ?self.call, "BYE to the transferring caller not sent: {e}");
        }
    }
}
