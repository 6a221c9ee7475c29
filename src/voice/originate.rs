//! Calls callforge places on its own (`POST /v1/calls`, the app-mode `originate()` module):
//! ring the destination through a trunk and, once answered, run a class5 script on the call
//! with `data.direction = "outbound"`.

use std::{sync::Arc, time::Duration};

use serde::Deserialize;
use serde_json::{json, Map, Value as Json};
use thiserror::Error;
use tokio::sync::{mpsc, watch};

use super::{
    call::{now_ms, CallEvent, CallState, VoiceServer},
    control::{LegEvent, LiveCall},
    ctx::{CallCtx, OutHeaders},
    data,
    media_bind::MediaSlot,
    trunks::{TrunkError, TrunkSlot},
};
use crate::{
    media::RtpSocket,
    script::{CompiledScript, Invocation, Mode},
    sip::{CallHandle, TransportError},
    store::{Cdr, CdrError},
};

/// What to call and what to run once it answers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginateRequest {
    /// A number (through `trunk` or the default trunk), `trunk:number`, or a `sip:` URI.
    pub to: String,
    /// Caller ID (a number or user part).
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub trunk: Option<String>,
    /// The class5 script run when the callee answers.
    pub script: String,
    /// Merged into the script's `data`.
    #[serde(default)]
    pub data: Option<Json>,
    /// Ring timeout in seconds (default `[calls] ring_timeout_s`).
    #[serde(default)]
    pub timeout: Option<f64>,
}

#[derive(Debug, Error)]
pub enum OriginateError {
    #[error("{0}")]
    Trunk(#[from] TrunkError),
    #[error("script {name:?}: {message}")]
    Script { name: String, message: String },
    #[error("data must be a JSON object")]
    BadData,
    #[error("timeout must be seconds, 0 < t <= 3600")]
    BadTimeout,
    #[error("no RTP port available: {0}")]
    NoRtpPort(std::io::Error),
    #[error("the INVITE could not be sent: {0}")]
    Sip(#[from] TransportError),
    #[error("SIP is not running (no [[route]] configured or [sip] enabled = false)")]
    NoSip,
}

impl OriginateError {
    /// The HTTP status the API answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Trunk(TrunkError::AtLimit { .. }) | Self::NoRtpPort(_) | Self::Sip(_) => 503,
            Self::NoSip => 503,
            Self::Script { .. } => 404,
            _ => 400,
        }
    }
}

impl VoiceServer {
    /// Place the call; returns its id at once (the call rings on in the background).
    pub async fn originate(&self, req: OriginateRequest) -> Result<u64, OriginateError> {
        let script = self
            .library
            .get(&req.script)
            .map_err(|e| OriginateError::Script {
                name: req.script.clone(),
                message: e.to_string(),
            })?;
        let extra = match req.data.clone() {
            None | Some(Json::Null) => Map::new(),
            Some(Json::Object(m)) => m,
            Some(_) => return Err(OriginateError::BadData),
        };
        let timeout = match req.timeout {
            None => Duration::from_secs(self.calls.ring_timeout_s.max(1)),
            Some(t) if t > 0.0 && t <= 3600.0 => Duration::from_secs_f64(t),
            Some(_) => return Err(OriginateError::BadTimeout),
        };
        let dialed =
            self.trunks
                .current()
                .resolve(&req.to, req.trunk.as_deref(), req.from.as_deref())?;
        let slot = dialed.acquire()?;
        let rtp = RtpSocket::bind(&self.rtp_ports, self.rtp_ip)
            .await
            .map_err(OriginateError::NoRtpPort)?;
        let port = rtp.local_addr().map(|a| a.port()).unwrap_or_default();
        let oc = dialed.outbound_call(self.rtp_ip, port, None, Vec::new());
        let (from_uri, to_uri) = (oc.from.uri.clone(), oc.to.uri.clone());
        let from_user = dialed.from_user().to_string();
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = self.control.place(oc, tx.clone()).await?;
        let mut input = json!({
            "direction": "outbound",
            "call_id": format!("callforge-{}", handle.0),
            "from": from_uri,
            "to": to_uri,
            "from_user": from_user,
            "to_user": dialed.number,
            "trunk": dialed.trunk.as_ref().map(|t| t.name.clone()),
            "headers": {},
        });
        if let Some(obj) = input.as_object_mut() {
            for (k, v) in extra {
                if k != "direction" {
                    obj.insert(k, v);
                }
            }
        }
        self.control.live.insert(LiveCall {
            id: handle.0,
            direction: "outbound",
            from: input["from"].as_str().unwrap_or_default().to_string(),
            to: input["to"].as_str().unwrap_or_default().to_string(),
            script: Some(req.script.clone()),
            state: "calling",
            started_at_ms: now_ms(),
            answered_at_ms: None,
            bridged_to: None,
            duration_s: 0.0,
        });
        tracing::info!(call = handle.0, uri = %dialed.request_uri, script = %req.script, "originating");
        let server = self.clone();
        // Draining waits for originated calls too, until their CDR is written.
        let in_flight = crate::lifecycle::InFlight::begin();
        tokio::spawn(async move {
            let _in_flight = in_flight;
            server
                .run_originated(Originated {
                    handle,
                    rtp,
                    slot,
                    script,
                    script_name: req.script,
                    input,
                    timeout,
                    events_tx: tx,
                    events: rx,
                })
                .await
        });
        Ok(handle.0)
    }

    async fn run_originated(self, o: Originated) {
        let Originated {
            handle,
            rtp,
            slot,
            script,
            script_name,
            input,
            timeout,
            events_tx,
            mut events,
        } = o;
        let mut cdr = Cdr {
            call_id: input["call_id"].as_str().unwrap_or_default().to_string(),
            from: input["from"].as_str().unwrap_or_default().to_string(),
            to: input["to"].as_str().unwrap_or_default().to_string(),
            script: Some(script_name),
            started_at: now_ms(),
            ..Cdr::default()
        };
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut cancelled: Option<&'static str> = None;
        let media = loop {
            tokio::select! {
                ev = events.recv() => match ev.map(|b| *b) {
                    Some((leg, CallEvent::Answered { media })) if leg == handle => break media,
                    Some((leg, CallEvent::Progress { .. })) if leg == handle => {
                        self.control.live.update(handle.0, |c| c.state = "ringing");
                    }
                    Some((leg, CallEvent::Ended { reason, .. })) if leg == handle => {
                        let why = cancelled.map_or_else(|| format!("{reason:?}"), str::to_string);
                        tracing::info!(call = handle.0, "originated call not answered: {why}");
                        self.control.live.remove(handle.0);
                        cdr.hangup_side = Some("callee".into());
                        cdr.hangup_cause = Some(why.clone());
                        cdr.error = Some(CdrError { code: match reason {
                            crate::sip::EndReason::Failed(c) => c,
                            _ => 408,
                        }, message: why });
                        self.write_originate_cdr(cdr).await;
                        return;
                    }
                    Some((leg, CallEvent::Kill { .. })) if leg == handle => {
                        cancelled = Some("cancelled by the API");
                        let _ = self.sip.hangup(handle).await;
                    }
                    Some(_) => {}
                    None => return,
                },
                _ = &mut deadline, if cancelled.is_none() => {
                    cancelled = Some("no answer");
                    let _ = self.sip.hangup(handle).await;
                }
            }
        };
        let Some(neg) = media else {
            tracing::warn!(
                call = handle.0,
                "originated call answered without usable SDP"
            );
            let _ = self.sip.hangup(handle).await;
            self.control.live.remove(handle.0);
            return;
        };
        cdr.answered_at = Some(now_ms());
        let at = cdr.answered_at;
        self.control.live.update(handle.0, |c| {
            c.state = "answered";
            c.answered_at_ms = at;
        });
        let (req_tx, req_rx) = mpsc::unbounded_channel();
        let (hangup_tx, hangup_rx) = watch::channel(false);
        let out_headers = OutHeaders::default();
        let media_slot = MediaSlot::default();
        let ctx = CallCtx::new(
            req_tx,
            hangup_rx,
            input["call_id"].as_str().unwrap_or_default().to_string(),
            data::builtin_vars(&input),
            Vec::new(),
            out_headers.clone(),
            media_slot.clone(),
        );
        let call_input = input.to_string().into_boxed_str();
        let mut inv = Invocation::new(script, Mode::Class5, input);
        let mut state = CallState::new(self, handle, hangup_tx, events_tx);
        inv.ctx = Some(Box::new(ctx.with_stop(state.stop.subscribe())));
        state.input = call_input;
        state.media = media_slot;
        state.out_headers = out_headers;
        state.cdr = cdr;
        state.set_answered_outbound(rtp, neg);
        let outcome = state.drive(inv, req_rx, events).await;
        state.finish(outcome).await;
        drop(slot);
    }

    async fn write_originate_cdr(&self, mut cdr: Cdr) {
        let Some(records) = self.records.clone() else {
            return;
        };
        cdr.ended_at = Some(now_ms());
        if let Err(e) = records.write_cdr(cdr).await {
            tracing::error!("CDR not written: {e}");
        }
    }
}

/// Everything the background task of an originated call needs.
struct Originated {
    handle: CallHandle,
    rtp: RtpSocket,
    slot: TrunkSlot,
    script: Arc<CompiledScript>,
    script_name: String,
    input: Json,
    timeout: Duration,
    events_tx: mpsc::UnboundedSender<LegEvent>,
    events: mpsc::UnboundedReceiver<LegEvent>,
}
