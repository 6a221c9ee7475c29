//! Commands from the layer above for incoming calls: ring, answer, reject, redirect, hangup.

use super::*;

/// RFC 3261 §12.1.1: a response that establishes a dialog (a 2xx, or a 1xx with our To tag)
/// carries the request's Record-Route values, in order, so the caller routes its in-dialog
/// requests (ACK, BYE) through the same proxies. Without them a record-routing proxy refuses
/// the caller's BYE.
fn copy_record_route(request: &rsip::Request, resp: &mut rsip::Response) {
    for rr in message::record_routes(&request.headers) {
        resp.headers.push(message::make_header("Record-Route", rr));
    }
}

impl UserAgent {
    pub(super) fn pending_call(&self, handle: CallHandle) -> Result<&Call, UaError> {
        let call = self.calls.get(&handle).ok_or(UaError::UnknownCall)?;
        match call.state {
            CallState::Incoming | CallState::Early => Ok(call),
            s => Err(UaError::WrongState(s.name())),
        }
    }

    /// Sends 180 Ringing, or 183 Session Progress with an SDP answer (early media) when
    /// `media` is given. Returns the negotiated media for 183.
    pub fn ring(
        &mut self,
        handle: CallHandle,
        media: Option<&MediaConfig>,
        now: Instant,
    ) -> Result<Option<Negotiated>, UaError> {
        self.set_now(now);
        let call = self.pending_call(handle)?;
        let tag = call.dialog.id.local_tag.clone();
        let contact = call.dialog.local_contact.clone();
        let mut resp = message::response_to(
            &call.invite,
            if media.is_some() { 183 } else { 180 },
            Some(&tag),
        );
        copy_record_route(&call.invite, &mut resp);
        resp.headers
            .push(message::make_header("Contact", format!("<{contact}>")));
        self.push_server_header(&mut resp);
        let mut negotiated = None;
        if let Some(media) = media {
            let (sdp, neg) = self.make_answer(handle, media)?;
            resp.headers
                .push(message::make_header("Content-Type", "application/sdp"));
            resp.body = sdp.to_bytes();
            negotiated = neg;
        }
        let call = self.calls.get_mut(&handle).ok_or(UaError::UnknownCall)?;
        call.state = CallState::Early;
        let key = call.invite_key.clone();
        let mut out = Vec::new();
        self.txs.respond(&key, &resp, now, &mut out)?;
        self.drain_tx(out, now);
        self.announce_timer();
        Ok(negotiated)
    }

    /// Negotiates (or offers, when the INVITE had no SDP) and remembers our SDP.
    pub(super) fn make_answer(
        &mut self,
        handle: CallHandle,
        media: &MediaConfig,
    ) -> Result<(SessionDescription, Option<Negotiated>), UaError> {
        let call = self.calls.get_mut(&handle).ok_or(UaError::UnknownCall)?;
        // An answer already sent in a 183 must be repeated unchanged in the 200 (RFC 3264 §8).
        if let (Some(existing), Some(offer)) = (&call.local_sdp, &call.offer) {
            let neg = sdp::negotiate(offer, media)?;
            return Ok((existing.clone(), Some(neg)));
        }
        let (sdp, neg) = match &call.offer {
            Some(offer) => {
                let neg = sdp::negotiate(offer, media)?;
                (
                    sdp::build_answer(offer, &neg, media, call.session_id, 1),
                    Some(neg),
                )
            }
            None => (
                sdp::build_offer(media, call.session_id, 1, sdp::Direction::SendRecv),
                None,
            ),
        };
        call.media = Some(media.clone());
        call.local_sdp = Some(sdp.clone());
        Ok((sdp, neg))
    }

    /// Answers with 200 OK and our SDP. Returns the negotiated media, or `None` when the
    /// INVITE had no offer (ours went in the 200; the peer's answer arrives in `CallAcked`).
    /// On [`UaError::Sdp`] the call is still pending: reject it with 488.
    pub fn answer(
        &mut self,
        handle: CallHandle,
        media: &MediaConfig,
        now: Instant,
    ) -> Result<Option<Negotiated>, UaError> {
        self.answer_with_headers(handle, media, &[], now)
    }

    /// [`answer`](Self::answer) with extra headers on the 200 (names checked like `reject`'s).
    pub fn answer_with_headers(
        &mut self,
        handle: CallHandle,
        media: &MediaConfig,
        extra_headers: &[(String, String)],
        now: Instant,
    ) -> Result<Option<Negotiated>, UaError> {
        self.set_now(now);
        self.pending_call(handle)?;
        let (sdp, neg) = self.make_answer(handle, media)?;
        let call = self.calls.get(&handle).ok_or(UaError::UnknownCall)?;
        let tag = call.dialog.id.local_tag.clone();
        let contact = call.dialog.local_contact.clone();
        let mut resp = message::response_to(&call.invite, 200, Some(&tag));
        copy_record_route(&call.invite, &mut resp);
        resp.headers
            .push(message::make_header("Contact", format!("<{contact}>")));
        if let Some(st) = call.session_timer {
            for (n, v) in st.response_headers() {
                resp.headers.push(message::make_header(&n, v));
            }
        }
        resp.headers.push(message::make_header("Allow", ALLOW));
        resp.headers
            .push(message::make_header("Supported", SUPPORTED));
        self.push_server_header(&mut resp);
        for (n, v) in extra_headers {
            if valid_extra_header(n) {
                resp.headers.push(message::make_header(n, v.clone()));
            } else {
                tracing::warn!(header = %n, "dropping extra header with an invalid or reserved name");
            }
        }
        resp.headers
            .push(message::make_header("Content-Type", "application/sdp"));
        resp.body = sdp.to_bytes();
        let key = call.invite_key.clone();
        let reliable = call.source.transport.is_reliable();
        let seq = message::cseq(&call.invite.headers)
            .map(|c| c.0)
            .unwrap_or(0);
        let bytes = message::to_bytes(&resp.clone().into());
        let mut out = Vec::new();
        self.txs.respond(&key, &resp, now, &mut out)?;
        self.drain_tx(out, now);
        let t = self.cfg.timers;
        let retx = AnswerRetransmit::new(bytes, t.t1, t.t2, reliable, now);
        self.arm_retransmit(handle, &retx);
        if let Some(call) = self.calls.get_mut(&handle) {
            call.state = CallState::Answered;
            call.awaiting_ack = Some(seq);
            call.retransmit = Some(retx);
            call.refreshed_at = now;
        }
        self.arm_session_timer(handle);
        self.announce_timer();
        Ok(neg)
    }

    /// Rejects a pending call with a 3xx–6xx final response and extra headers.
    pub fn reject(
        &mut self,
        handle: CallHandle,
        code: u16,
        reason: Option<&str>,
        extra_headers: &[(String, String)],
        now: Instant,
    ) -> Result<(), UaError> {
        self.set_now(now);
        if !(300..=699).contains(&code) {
            return Err(UaError::BadStatus(code));
        }
        self.final_response(handle, code, reason, extra_headers, now)?;
        self.emit(UaEvent::CallEnded {
            call: handle,
            by: EndedBy::Local,
            reason: EndReason::Rejected(code),
        });
        self.announce_timer();
        Ok(())
    }

    pub(super) fn final_response(
        &mut self,
        handle: CallHandle,
        code: u16,
        reason: Option<&str>,
        extra_headers: &[(String, String)],
        now: Instant,
    ) -> Result<(), UaError> {
        let call = self.pending_call(handle)?;
        let tag = call.dialog.id.local_tag.clone();
        let mut resp = ResponseBase::from_request(&call.invite).response(code, reason, Some(&tag));
        for (n, v) in extra_headers {
            let valid = !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.!%*_+`'~".contains(c));
            if !valid {
                tracing::warn!(header = %n, "dropping extra header with an invalid name");
                continue;
            }
            let clean: String = v.chars().filter(|c| *c != '\r' && *c != '\n').collect();
            resp.headers.push(message::make_header(n, clean));
        }
        self.push_server_header(&mut resp);
        let key = call.invite_key.clone();
        let mut out = Vec::new();
        self.txs.respond(&key, &resp, now, &mut out)?;
        self.drain_tx(out, now);
        self.remove_call(handle);
        Ok(())
    }

    /// Redirects a pending call: 302 with one Contact per target URI, in order.
    pub fn redirect(
        &mut self,
        handle: CallHandle,
        contacts: &[String],
        now: Instant,
    ) -> Result<(), UaError> {
        let headers: Vec<(String, String)> = contacts
            .iter()
            .map(|c| {
                let v = if c.trim_start().starts_with('<') || c.contains('"') {
                    c.clone()
                } else {
                    format!("<{}>", c.trim())
                };
                ("Contact".to_string(), v)
            })
            .collect();
        self.reject(handle, 302, None, &headers, now)
    }

    /// Ends a call: BYE once established (after the ACK, per §15), 480 while still pending.
    /// Hang up, putting `headers` on the BYE (they are ignored when the call ends another way).
    pub fn hangup_with_headers(
        &mut self,
        handle: CallHandle,
        headers: Vec<(String, String)>,
        now: Instant,
    ) -> Result<(), UaError> {
        let call = self.calls.get_mut(&handle).ok_or(UaError::UnknownCall)?;
        call.bye_headers = headers;
        self.hangup(handle, now)
    }

    pub fn hangup(&mut self, handle: CallHandle, now: Instant) -> Result<(), UaError> {
        self.set_now(now);
        let call = self.calls.get_mut(&handle).ok_or(UaError::UnknownCall)?;
        match call.state {
            CallState::Calling => self.cancel_outbound(handle, now),
            CallState::Incoming | CallState::Early => {
                return self.reject(handle, 480, None, &[], now)
            }
            CallState::Answered => call.bye_pending = true,
            CallState::Confirmed => self.end_with_bye(handle, EndReason::Bye, now),
        }
        self.announce_timer();
        Ok(())
    }
}

/// Whether the layer above may add this header to a 200: a token, and not one the core writes.
fn valid_extra_header(name: &str) -> bool {
    const RESERVED: &[&str] = &[
        "via",
        "from",
        "to",
        "call-id",
        "cseq",
        "contact",
        "content-length",
        "content-type",
        "allow",
        "supported",
        "server",
        "session-expires",
        "require",
    ];
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.!%*_+`'~".contains(c))
        && !RESERVED.contains(&name.to_ascii_lowercase().as_str())
}
