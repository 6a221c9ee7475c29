//! `ctx.transfer(target)`: a blind transfer. Before answer it is a 302 redirect; after, a
//! REFER whose NOTIFYs say how the transferee's call went. A peer that refuses REFER (405,
//! 420, 501, 603, a timeout...) gets a bridge to the target instead.

use serde_json::json;

use super::{
    bridge::BridgeOpts,
    call::{CallState, PendingTransfer},
    ctx::{hangup_error, Reply},
};
use crate::script::HostError;

impl CallState {
    pub(super) async fn start_transfer(&mut self, target: String, opts: BridgeOpts, reply: Reply) {
        if self.ended {
            let _ = reply.send(Err(hangup_error()));
            return;
        }
        if self.transfer.is_some() || self.bridge.is_some() {
            let _ = reply.send(Err(HostError::error(
                "ctx.transfer: a transfer or bridge is already in progress",
            )));
            return;
        }
        let caller_id = opts
            .caller_id
            .clone()
            .or_else(|| self.caller_number.clone());
        let uri = match self.server.trunks.current().resolve(
            &target,
            opts.trunk.as_deref(),
            caller_id.as_deref(),
        ) {
            Ok(d) => d.request_uri,
            Err(e) => {
                let _ = reply.send(Err(HostError::error(format!("ctx.transfer: {e}"))));
                return;
            }
        };
        if !self.answered {
            let r = self.server.sip.redirect(self.call, vec![uri.clone()]).await;
            match r {
                Ok(()) => {
                    self.ended = true;
                    self.ended_by("script", "transferred".into());
                    let _ = self.hangup.send(true);
                    let _ = reply.send(Ok(json!({"status": "transferred", "sipCode": 302,
                        "method": "redirect", "target": uri})));
                }
                Err(e) => {
                    let _ = reply.send(Err(HostError::error(format!("ctx.transfer: {e}"))));
                }
            }
            return;
        }
        tracing::info!(call = ?self.call, %uri, "transferring with REFER");
        match self.server.sip.refer(self.call, uri.clone()).await {
            Ok(()) => {
                self.transfer = Some(Box::new(PendingTransfer {
                    target,
                    opts,
                    reply,
                    accepted: false,
                    uri,
                }))
            }
            Err(e) => {
                tracing::info!(call = ?self.call, "REFER not sent ({e}); bridging instead");
                self.start_bridge(target, opts, reply, true).await;
            }
        }
    }

    /// The final response to our REFER: accepted, or fall back to a bridge.
    pub(super) async fn refer_response(&mut self, code: u16) {
        let Some(t) = self.transfer.as_mut() else {
            return;
        };
        if (200..300).contains(&code) {
            t.accepted = true;
            return;
        }
        let Some(t) = self.transfer.take() else {
            return;
        };
        tracing::info!(call = ?self.call, code, "REFER refused; bridging to the target instead");
        self.start_bridge(t.target, t.opts, t.reply, true).await;
    }

    /// A NOTIFY about the transferee's call: a final status settles the transfer.
    pub(super) async fn transfer_notify(&mut self, code: u16) {
        if code < 200 || self.transfer.is_none() {
            return;
        }
        let Some(t) = self.transfer.take() else {
            return;
        };
        if (200..300).contains(&code) {
            let _ = t
                .reply
                .send(Ok(json!({"status": "transferred", "sipCode": code,
                "method": "refer", "target": t.uri})));
            // The caller now talks to the target; our leg is done.
            self.ended = true;
            self.stop_media();
            self.ended_by("script", "transferred".into());
            let _ = self.hangup.send(true);
            self.commit_cdr_ahead().await;
            if let Err(e) = self.server.sip.hangup(self.call).await {
                tracing::debug!(call = ?self.call, "BYE after transfer not sent: {e}");
            }
        } else {
            let status = if code == 486 || code == 600 {
                "busy"
            } else {
                "failed"
            };
            let _ = t.reply.send(Ok(json!({"status": status, "sipCode": code,
                "method": "refer", "target": t.uri})));
        }
    }

    /// The caller left during a transfer: after an accepted REFER that is the usual end.
    pub(super) fn transfer_caller_gone(&mut self) {
        if let Some(t) = self.transfer.take() {
            let r = if t.accepted {
                Ok(
                    json!({"status": "transferred", "sipCode": 202, "method": "refer",
                    "target": t.uri}),
                )
            } else {
                Err(hangup_error())
            };
            let _ = t.reply.send(r);
        }
    }
}
