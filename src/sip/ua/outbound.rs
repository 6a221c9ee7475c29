//! Outbound calls (UAC): INVITE with our offer, provisional/final handling, ACK, CANCEL.

use super::*;
use crate::sip::digest::Credentials;

/// An outbound call to place with [`UserAgent::invite`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundCall {
    /// Next hop (gateway, proxy or the callee) and transport.
    pub target: Target,
    /// Request-URI, e.g. `sip:+15551234@gw.example`.
    pub request_uri: String,
    /// Our identity (a tag is added).
    pub from: NameAddr,
    /// The callee.
    pub to: NameAddr,
    /// Our RTP side; the INVITE carries an offer built from it.
    pub media: MediaConfig,
    /// Our socket address for Via/Contact (the transport driver fills it when `None`).
    pub local: Option<SocketAddr>,
    /// Extra headers (names must be tokens; CR/LF in values are removed).
    pub headers: Vec<(String, String)>,
    /// Answer 401/407 Digest challenges with these (one retry per realm); `None` reports
    /// a challenge as `Failed(401/407)`.
    pub auth: Option<Credentials>,
}

fn valid_header_name(n: &str) -> bool {
    !n.is_empty()
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.!%*_+`'~".contains(c))
}

impl UserAgent {
    /// Sends an INVITE with an SDP offer. Progress arrives as `CallProgress`, success as
    /// `CallAnswered`, failure as `CallEnded { by: Remote, reason: Failed(code) }`.
    pub fn invite(&mut self, oc: OutboundCall, now: Instant) -> Result<CallHandle, UaError> {
        self.set_now(now);
        if self.calls.len() >= self.cfg.max_calls {
            return Err(UaError::Overloaded);
        }
        let local = oc
            .local
            .or(self.cfg.advertised_addr)
            .ok_or(UaError::WrongState("missing a local address"))?;
        let our = self.our_addr(local);
        let tag = self.new_token();
        let call_id = format!("{}@{}", self.new_token(), our.ip());
        let branch = self.new_token();
        let via = format!(
            "SIP/2.0/{} {our};branch=z9hG4bK{branch};rport",
            oc.target.transport.via_name()
        );
        let contact = self.contact_uri(local, oc.target.transport);
        self.next_call += 1;
        let handle = CallHandle(self.next_call);
        let session_id = splitmix(self.cfg.seed ^ self.next_call) >> 1;
        let offer = sdp::build_offer(&oc.media, session_id, 1, sdp::Direction::SendRecv);

        let mut from = oc.from.clone();
        from.set_param("tag", Some(tag.clone()));
        let mut to = oc.to.clone();
        to.params.retain(|(k, _)| !k.eq_ignore_ascii_case("tag"));
        let mut headers = rsip::Headers::default();
        for (n, v) in [
            ("Via", via),
            ("Max-Forwards", "70".to_string()),
            ("From", from.to_string()),
            ("To", to.to_string()),
            ("Call-ID", call_id.clone()),
            ("CSeq", "1 INVITE".to_string()),
            ("Contact", format!("<{contact}>")),
            ("Allow", ALLOW.to_string()),
            ("Supported", SUPPORTED.to_string()),
            ("User-Agent", self.cfg.user_agent.clone()),
        ] {
            headers.push(message::make_header(n, v));
        }
        for (n, v) in &oc.headers {
            if valid_header_name(n) {
                let clean: String = v.chars().filter(|c| *c != '\r' && *c != '\n').collect();
                headers.push(message::make_header(n, clean));
            }
        }
        headers.push(message::make_header("Content-Type", "application/sdp"));
        let invite = rsip::Request {
            method: rsip::Method::Invite,
            uri: message::parse_uri(&oc.request_uri),
            version: rsip::Version::V2,
            headers,
            body: offer.to_bytes(),
        };

        let mut out = Vec::new();
        let key = self
            .txs
            .send_request(invite.clone(), oc.target, now, &mut out)?;
        self.client_txs
            .insert(key.clone(), (handle, ClientPurpose::Invite));
        // Until a To tag arrives the dialog is a half-filled placeholder, not in `dialogs`.
        let dialog = Dialog {
            id: DialogId {
                call_id,
                local_tag: tag,
                remote_tag: String::new(),
            },
            role: super::super::dialog::Role::Uac,
            local: from,
            remote: to,
            remote_target: oc.request_uri.clone(),
            route_set: Vec::new(),
            local_cseq: 1,
            remote_cseq: None,
            local_contact: contact,
        };
        self.calls.insert(
            handle,
            Box::new(Call {
                state: CallState::Calling,
                invite,
                invite_key: key,
                source: oc.target,
                local,
                dialog,
                offer: None,
                media: Some(oc.media),
                local_sdp: Some(offer),
                session_id,
                awaiting_ack: None,
                retransmit: None,
                session_timer: None,
                refreshed_at: now,
                bye_pending: false,
                bye_headers: Vec::new(),
                peer_allows_update: false,
                outbound: true,
                provisional_seen: false,
                cancel_pending: false,
                cancel_sent: false,
                ack: None,
                auth: oc.auth.map(auth::AuthState::new),
                transfer: None,
                admitted_from: None,
            }),
        );
        self.timers
            .arm(now + self.cfg.pending_timeout, (handle, CallTimer::Pending));
        self.drain_tx(out, now);
        self.announce_timer();
        Ok(handle)
    }

    /// Adopts the dialog a tagged response creates (first one wins; later forks are ignored).
    fn adopt_dialog(&mut self, handle: CallHandle, resp: &rsip::Response) {
        let Some(call) = self.calls.get_mut(&handle) else {
            return;
        };
        let Ok(dialog) = Dialog::uac(&call.invite, resp, &call.dialog.local_contact) else {
            return;
        };
        if !call.dialog.id.remote_tag.is_empty() && call.dialog.id != dialog.id {
            return;
        }
        let id = dialog.id.clone();
        call.dialog = dialog;
        self.dialogs.insert(id, handle);
    }

    fn negotiate_answer(&self, handle: CallHandle, resp: &rsip::Response) -> Option<Negotiated> {
        let call = self.calls.get(&handle)?;
        let media = call.media.as_ref()?;
        let sdp = SessionDescription::parse(&resp.body).ok()?;
        sdp::negotiate(&sdp, media).ok()
    }

    pub(super) fn on_invite_response(
        &mut self,
        handle: CallHandle,
        resp: rsip::Response,
        now: Instant,
    ) {
        let code = resp.status_code.code();
        let Some(call) = self.calls.get(&handle) else {
            return;
        };
        let state = call.state;
        match code {
            100 => {}
            101..=199 => {
                if state != CallState::Calling {
                    return;
                }
                if message::to_tag(&resp.headers).is_some() {
                    self.adopt_dialog(handle, &resp);
                }
                let media = self.negotiate_answer(handle, &resp);
                let cancel_now = match self.calls.get_mut(&handle) {
                    Some(c) => {
                        c.provisional_seen = true;
                        c.cancel_pending
                    }
                    None => false,
                };
                if cancel_now {
                    self.cancel_outbound(handle, now);
                    return;
                }
                self.emit(UaEvent::CallProgress {
                    call: handle,
                    code,
                    media,
                });
            }
            200..=299 => {
                if state == CallState::Confirmed {
                    // Retransmitted 2xx: our ACK got lost (§13.2.2.4).
                    if let Some((target, bytes)) =
                        self.calls.get(&handle).and_then(|c| c.ack.clone())
                    {
                        self.send_raw(target, bytes);
                    }
                    return;
                }
                self.adopt_dialog(handle, &resp);
                let media = self.negotiate_answer(handle, &resp);
                let Some(via) = self.our_via(handle) else {
                    return;
                };
                let Some(call) = self.calls.get_mut(&handle) else {
                    return;
                };
                call.dialog.refresh_target(&resp.headers);
                // The ACK repeats the INVITE's CSeq number (2 after an authenticated retry)
                // and its credentials (§13.2.2.4).
                let seq = message::cseq(&call.invite.headers)
                    .map(|c| c.0)
                    .unwrap_or(1);
                let mut ack = call
                    .dialog
                    .build_request(rsip::Method::Ack, &via, Some(seq), None);
                for name in ["Authorization", "Proxy-Authorization"] {
                    for v in message::headers_named(&call.invite.headers, name) {
                        ack.headers.push(message::make_header(name, v));
                    }
                }
                let target = Self::next_hop(call);
                let bytes = message::to_bytes(&ack.into());
                call.ack = Some((target, bytes.clone()));
                call.state = CallState::Confirmed;
                call.peer_allows_update = message::has_option_tag(&resp.headers, "Allow", "UPDATE");
                let hang_up = call.cancel_sent || call.cancel_pending;
                self.send_raw(target, bytes);
                if hang_up {
                    // The callee answered while we were cancelling: the call must still end.
                    self.end_with_bye(handle, EndReason::Cancelled, now);
                    return;
                }
                self.emit(UaEvent::CallAnswered {
                    call: handle,
                    media,
                });
            }
            _ => {
                if state != CallState::Calling {
                    return;
                }
                if matches!(code, 401 | 407) && self.retry_with_credentials(handle, &resp, now) {
                    return;
                }
                let cancelled = self.calls.get(&handle).is_some_and(|c| c.cancel_sent);
                self.remove_call(handle);
                let (by, reason) = if cancelled && code == 487 {
                    (EndedBy::Local, EndReason::Cancelled)
                } else {
                    (EndedBy::Remote, EndReason::Failed(code))
                };
                self.emit(UaEvent::CallEnded {
                    call: handle,
                    by,
                    reason,
                });
            }
        }
    }

    /// CANCEL for our pending INVITE (§9.1), or remember to send it after a provisional.
    pub(super) fn cancel_outbound(&mut self, handle: CallHandle, now: Instant) {
        let Some(call) = self.calls.get_mut(&handle) else {
            return;
        };
        if call.cancel_sent {
            return;
        }
        if !call.provisional_seen {
            call.cancel_pending = true;
            return;
        }
        call.cancel_sent = true;
        let inv = &call.invite;
        let mut headers = rsip::Headers::default();
        if let Some(v) = message::header(&inv.headers, "Via") {
            headers.push(message::make_header("Via", v));
        }
        for r in message::headers_named(&inv.headers, "Route") {
            headers.push(message::make_header("Route", r));
        }
        headers.push(message::make_header("Max-Forwards", "70"));
        for n in ["From", "To", "Call-ID"] {
            if let Some(v) = message::header(&inv.headers, n) {
                headers.push(message::make_header(n, v));
            }
        }
        // Same CSeq number as the INVITE it cancels (§9.1), which is 2 or more after an
        // authenticated retry.
        let seq = message::cseq(&inv.headers).map(|c| c.0).unwrap_or(1);
        headers.push(message::make_header("CSeq", format!("{seq} CANCEL")));
        let cancel = rsip::Request {
            method: rsip::Method::Cancel,
            uri: inv.uri.clone(),
            version: rsip::Version::V2,
            headers,
            body: Vec::new(),
        };
        let target = call.source;
        let mut out = Vec::new();
        match self.txs.send_request(cancel.clone(), target, now, &mut out) {
            Ok(key) => {
                self.client_txs.insert(key, (handle, ClientPurpose::Cancel));
            }
            Err(_) => self.send_raw(target, message::to_bytes(&cancel.into())),
        }
        self.drain_tx(out, now);
    }
}
