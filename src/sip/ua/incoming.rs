//! Incoming requests and responses: new calls, CANCEL, ACK, in-dialog requests, re-INVITE/UPDATE.

use super::*;

/// The option tags a request's `Require` names that we do not support.
fn unsupported_requires(headers: &rsip::Headers) -> Vec<String> {
    message::headers_named(headers, "Require")
        .iter()
        .flat_map(|v| {
            v.split(',')
                .map(|t| t.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|t| {
            !t.is_empty()
                && !SUPPORTED
                    .split(',')
                    .any(|ours| ours.trim().eq_ignore_ascii_case(t))
        })
        .collect()
}

/// False when an `Accept` header lists media types and SDP is not among them.
fn accepts_sdp(headers: &rsip::Headers) -> bool {
    let accept = message::headers_named(headers, "Accept");
    if accept.is_empty() {
        return true;
    }
    let ranges: Vec<String> = accept
        .iter()
        .flat_map(|v| v.split(','))
        .map(|r| {
            r.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|r| !r.is_empty())
        .collect();
    // An empty Accept means "no body at all"; tolerated, as our answer must carry SDP anyway.
    ranges.is_empty()
        || ranges
            .iter()
            .any(|r| r == "application/sdp" || r == "application/*" || r == "*/*")
}

impl UserAgent {
    pub(super) fn on_malformed(&mut self, bytes: &[u8], source: Target, err: ParseError) {
        let Some((method, base)) = salvage(bytes) else {
            tracing::warn!(%source.addr, error = %err, "dropping unparseable SIP message");
            return;
        };
        let (code, reason) = match &err {
            ParseError::UnknownMethod(_) => (501, None),
            ParseError::TooLarge { .. } => (513, None),
            ParseError::BadVersion(_) => (505, None),
            _ => (400, Some(err.reason_phrase())),
        };
        tracing::warn!(%source.addr, %method, error = %err, code, "rejecting malformed request");
        let mut base = base;
        let via = base
            .vias
            .first()
            .and_then(|v| Via::parse(v).ok())
            .map(|mut v| {
                stamp_via(&mut v, source);
                v
            });
        if let (Some(v), Some(first)) = (&via, base.vias.first_mut()) {
            *first = v.to_string();
        }
        let target = response_target(via.as_ref(), source);
        let tag = self.auto_tag(base.call_id.as_deref().unwrap_or(""));
        let mut resp = base.response(code, reason.as_deref(), Some(&tag));
        if code == 501 {
            resp.headers.push(message::make_header("Allow", ALLOW));
        }
        self.push_server_header(&mut resp);
        self.send_raw(target, message::to_bytes(&resp.into()));
    }

    pub(super) fn push_server_header(&self, resp: &mut rsip::Response) {
        resp.headers
            .push(message::make_header("Server", self.cfg.user_agent.clone()));
    }

    pub(super) fn on_request(
        &mut self,
        mut req: rsip::Request,
        source: Target,
        local: SocketAddr,
        now: Instant,
    ) {
        let mut via = match message::top_via(&req.headers) {
            Some(v) => v,
            None => return,
        };
        stamp_via(&mut via, source);
        if let Some(h) = req
            .headers
            .iter_mut()
            .find(|h| matches!(h, rsip::Header::Via(_)))
        {
            *h = message::make_header("Via", via.to_string());
        }
        let target = response_target(Some(&via), source);

        let mut out = Vec::new();
        let matched = self.txs.match_request(&req, now, &mut out);
        self.drain_tx(out, now);
        let key = match matched {
            Some(ServerMatch::Absorbed) => return,
            Some(ServerMatch::New(key)) => key,
            None => return,
        };

        let uri = req.uri.to_string().to_ascii_lowercase();
        let scheme_ok = ["sip:", "sips:", "tel:"].iter().any(|p| uri.starts_with(p));
        if !scheme_ok && req.method != rsip::Method::Ack {
            let resp = self.simple_response(&req, 416, None);
            self.respond_new(key, &req, resp, target, now);
            return;
        }

        let out_of_dialog = message::to_tag(&req.headers).is_none()
            && !matches!(req.method, rsip::Method::Ack | rsip::Method::Cancel);
        if out_of_dialog {
            let verdict = self.guard.lock().check(source, local, &req.method, now);
            match verdict {
                super::super::guard::Verdict::Pass => {}
                super::super::guard::Verdict::Drop(_) => return,
                super::super::guard::Verdict::Reject {
                    code, retry_after, ..
                } => {
                    // Stateless: a flood must not fill the transaction table.
                    let mut resp = self.simple_response(&req, code, None);
                    if let Some(s) = retry_after {
                        resp.headers
                            .push(message::make_header("Retry-After", s.to_string()));
                    }
                    self.send_raw(target, message::to_bytes(&resp.into()));
                    return;
                }
            }
        }

        if !matches!(req.method, rsip::Method::Ack | rsip::Method::Cancel) {
            // RFC 3261 §8.2.2.3, for every request but ACK and CANCEL (OPTIONS included).
            let unsupported = unsupported_requires(&req.headers);
            if !unsupported.is_empty() {
                let mut resp = self.simple_response(&req, 420, None);
                resp.headers
                    .push(message::make_header("Unsupported", unsupported.join(", ")));
                self.respond_new(key, &req, resp, target, now);
                return;
            }
        }

        match req.method {
            rsip::Method::Ack => self.on_ack(&req, now),
            rsip::Method::Cancel => self.on_cancel(&req, key, target, now),
            _ if message::to_tag(&req.headers).is_some() => {
                self.on_in_dialog(req, key, target, now)
            }
            rsip::Method::Invite => self.on_invite(req, key, source, target, local, now),
            rsip::Method::Options => {
                let resp = self.options_response(&req, None);
                self.respond_new(key, &req, resp, target, now);
            }
            rsip::Method::Bye
            | rsip::Method::Info
            | rsip::Method::Update
            | rsip::Method::PRack
            | rsip::Method::Notify => {
                let resp = self.simple_response(&req, 481, None);
                self.respond_new(key, &req, resp, target, now);
            }
            rsip::Method::Refer => {
                // A REFER outside a dialog (RFC 3515 allows it) would have us place a call
                // for a stranger: refused with a reason rather than 481, which would claim
                // the request names a dialog that is gone.
                let tag = self.auto_tag(&message::call_id(&req.headers).unwrap_or_default());
                let mut resp = ResponseBase::from_request(&req).response(
                    403,
                    Some("Out-Of-Dialog REFER Not Accepted"),
                    Some(&tag),
                );
                self.push_server_header(&mut resp);
                self.respond_new(key, &req, resp, target, now);
            }
            _ => {
                // Known to rsip but not something this UA does (REGISTER, SUBSCRIBE, ...).
                let mut resp = self.simple_response(&req, 405, None);
                resp.headers.push(message::make_header("Allow", ALLOW));
                self.respond_new(key, &req, resp, target, now);
            }
        }
    }

    pub(super) fn simple_response(
        &self,
        req: &rsip::Request,
        code: u16,
        to_tag: Option<&str>,
    ) -> rsip::Response {
        let auto;
        let to_tag = match to_tag {
            // §8.2.6.2: every response but 100 carries a To tag.
            None if code > 100 => {
                auto = self.auto_tag(&message::call_id(&req.headers).unwrap_or_default());
                Some(auto.as_str())
            }
            t => t,
        };
        let mut resp = message::response_to(req, code, to_tag);
        self.push_server_header(&mut resp);
        resp
    }

    /// A To tag for responses outside any call, derived from the Call-ID so that a
    /// retransmitted request gets the same tag.
    pub(super) fn auto_tag(&self, call_id: &str) -> String {
        super::auto_tag(self.cfg.seed, call_id)
    }

    pub(super) fn options_response(
        &self,
        req: &rsip::Request,
        to_tag: Option<&str>,
    ) -> rsip::Response {
        let mut resp = self.simple_response(req, 200, to_tag);
        resp.headers.push(message::make_header("Allow", ALLOW));
        resp.headers
            .push(message::make_header("Accept", "application/sdp"));
        resp.headers
            .push(message::make_header("Supported", SUPPORTED));
        resp
    }

    /// Answers a request that has no transaction yet: statefully if there is room, so that
    /// retransmissions get the same answer, otherwise statelessly.
    pub(super) fn respond_new(
        &mut self,
        key: TxKey,
        req: &rsip::Request,
        resp: rsip::Response,
        target: Target,
        now: Instant,
    ) {
        let is_invite = req.method == rsip::Method::Invite;
        let mut out = Vec::new();
        if self
            .txs
            .create_server(key.clone(), is_invite, target, None, &mut out)
            .is_ok()
            && self.txs.respond(&key, &resp, now, &mut out).is_ok()
        {
            self.drain_tx(out, now);
        } else {
            self.send_raw(target, message::to_bytes(&resp.into()));
        }
    }

    pub(super) fn overloaded(&self, req: &rsip::Request) -> rsip::Response {
        let mut resp = self.simple_response(req, 503, None);
        resp.headers.push(message::make_header(
            "Retry-After",
            self.cfg.retry_after.to_string(),
        ));
        resp
    }

    pub(super) fn on_invite(
        &mut self,
        req: rsip::Request,
        key: TxKey,
        source: Target,
        target: Target,
        local: SocketAddr,
        now: Instant,
    ) {
        if self.calls.len() >= self.cfg.max_calls {
            crate::metrics::Metrics::inc(
                &crate::metrics::metrics().limit_hits,
                "kind",
                "sip_max_calls",
            );
            let resp = self.overloaded(&req);
            self.respond_new(key, &req, resp, target, now);
            return;
        }
        if !accepts_sdp(&req.headers) {
            // RFC 4475 sdp01: our answer would be SDP, which the caller says it cannot take.
            let mut resp = self.simple_response(&req, 406, None);
            resp.headers
                .push(message::make_header("Accept", "application/sdp"));
            self.respond_new(key, &req, resp, target, now);
            return;
        }
        let session_timer = match SessionTimer::negotiate(&req.headers, self.cfg.min_se) {
            Ok(st) => st,
            Err(too_small) => {
                let mut resp = self.simple_response(&req, 422, None);
                resp.headers
                    .push(message::make_header("Min-SE", too_small.min_se.to_string()));
                self.respond_new(key, &req, resp, target, now);
                return;
            }
        };
        let offer = match self.read_offer(&req) {
            Ok(o) => o,
            Err(resp) => {
                self.respond_new(key, &req, *resp, target, now);
                return;
            }
        };
        let local_tag = self.new_token();
        let contact = self.contact_uri(local, source.transport);
        let Ok(dialog) = Dialog::uas(&req, &local_tag, &contact) else {
            let resp = self.simple_response(&req, 400, None);
            self.respond_new(key, &req, resp, target, now);
            return;
        };
        let trying = message::to_bytes(&self.simple_response(&req, 100, None).into());
        let mut out = Vec::new();
        if self
            .txs
            .create_server(key.clone(), true, target, Some(trying), &mut out)
            .is_err()
        {
            let resp = self.overloaded(&req);
            self.send_raw(target, message::to_bytes(&resp.into()));
            return;
        }
        self.drain_tx(out, now);
        self.next_call += 1;
        let handle = CallHandle(self.next_call);
        let session_id = splitmix(self.cfg.seed ^ self.next_call) >> 1;
        self.dialogs.insert(dialog.id.clone(), handle);
        self.invites.insert(key.clone(), handle);
        let peer_allows_update = message::has_option_tag(&req.headers, "Allow", "UPDATE");
        self.calls.insert(
            handle,
            Box::new(Call {
                state: CallState::Incoming,
                invite: req.clone(),
                invite_key: key,
                source: target,
                local,
                dialog,
                offer: offer.clone(),
                media: None,
                local_sdp: None,
                session_id,
                awaiting_ack: None,
                retransmit: None,
                session_timer,
                refreshed_at: now,
                bye_pending: false,
                bye_headers: Vec::new(),
                peer_allows_update,
                outbound: false,
                provisional_seen: false,
                cancel_pending: false,
                cancel_sent: false,
                ack: None,
                auth: None,
                transfer: None,
                admitted_from: Some(source.addr.ip()),
            }),
        );
        self.guard.lock().call_started(source.addr.ip());
        self.timers
            .arm(now + self.cfg.pending_timeout, (handle, CallTimer::Pending));
        let (from, to) = match self.calls.get(&handle) {
            Some(c) => (c.dialog.remote.clone(), {
                let mut to = c.dialog.local.clone();
                to.params.retain(|(k, _)| !k.eq_ignore_ascii_case("tag"));
                to
            }),
            None => return,
        };
        self.emit(UaEvent::IncomingCall(Box::new(IncomingCall {
            call: handle,
            request: req,
            from,
            to,
            offer,
            source,
        })));
    }

    /// Reads an SDP body; the error is the response to send (400 or 415).
    pub(super) fn read_offer(
        &self,
        req: &rsip::Request,
    ) -> Result<Option<SessionDescription>, Box<rsip::Response>> {
        if req.body.is_empty() {
            return Ok(None);
        }
        let ctype = message::header(&req.headers, "Content-Type").unwrap_or_default();
        let ctype = ctype
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if !ctype.is_empty() && ctype != "application/sdp" {
            let mut resp = self.simple_response(req, 415, None);
            resp.headers
                .push(message::make_header("Accept", "application/sdp"));
            return Err(Box::new(resp));
        }
        SessionDescription::parse(&req.body).map(Some).map_err(|e| {
            let tag = self.auto_tag(&message::call_id(&req.headers).unwrap_or_default());
            let mut resp = message::ResponseBase::from_request(req).response(
                400,
                Some(&format!("Malformed SDP: {e}")),
                Some(&tag),
            );
            self.push_server_header(&mut resp);
            Box::new(resp)
        })
    }

    pub(super) fn on_cancel(
        &mut self,
        req: &rsip::Request,
        key: TxKey,
        target: Target,
        now: Instant,
    ) {
        let invite_key = TxKey::invite_for_cancel(req);
        let call = invite_key
            .as_ref()
            .and_then(|k| self.invites.get(k).copied());
        let invite_tx = invite_key.as_ref().and_then(|k| self.txs.get(k));
        let pending = invite_tx.is_some_and(|tx| tx.awaiting_final());
        let Some(call) = call.filter(|_| pending) else {
            // §9.2: a CANCEL for an already-answered INVITE gets 200 and changes nothing;
            // only a CANCEL matching no transaction gets 481.
            let code = if invite_tx.is_some() { 200 } else { 481 };
            let resp = self.simple_response(req, code, None);
            self.respond_new(key, req, resp, target, now);
            return;
        };
        let resp = self.simple_response(req, 200, None);
        self.respond_new(key, req, resp, target, now);
        if let Some(c) = self.calls.get(&call) {
            let tag = c.dialog.id.local_tag.clone();
            let ik = c.invite_key.clone();
            let resp = self.simple_response(&c.invite, 487, Some(&tag));
            let mut out = Vec::new();
            let _ = self.txs.respond(&ik, &resp, now, &mut out);
            self.drain_tx(out, now);
        }
        self.remove_call(call);
        self.emit(UaEvent::CallCancelled { call });
    }

    pub(super) fn on_ack(&mut self, req: &rsip::Request, now: Instant) {
        let Some(id) = DialogId::of_incoming(req) else {
            return;
        };
        let Some(&handle) = self.dialogs.get(&id) else {
            return;
        };
        let seq = message::cseq(&req.headers).map(|c| c.0).ok();
        let Some(call) = self.calls.get_mut(&handle) else {
            return;
        };
        if call.awaiting_ack.is_none() || call.awaiting_ack != seq {
            return;
        }
        call.awaiting_ack = None;
        call.retransmit = None;
        let initial = call.state == CallState::Answered;
        call.state = CallState::Confirmed;
        if initial && !call.outbound {
            forget_answered_invite(&mut call.invite);
        }
        let answer = if req.body.is_empty() {
            None
        } else {
            SessionDescription::parse(&req.body).ok()
        };
        let bye_pending = call.bye_pending;
        if initial {
            self.emit(UaEvent::CallAcked {
                call: handle,
                answer,
            });
        }
        if bye_pending {
            self.end_with_bye(handle, EndReason::Bye, now);
        }
    }

    pub(super) fn on_in_dialog(
        &mut self,
        req: rsip::Request,
        key: TxKey,
        target: Target,
        now: Instant,
    ) {
        let handle = DialogId::of_incoming(&req).and_then(|id| self.dialogs.get(&id).copied());
        let Some(handle) = handle else {
            let crossed_bye = req.method == rsip::Method::Bye
                && DialogId::of_incoming(&req).is_some_and(|id| self.recently_ended(&id));
            let code = if crossed_bye { 200 } else { 481 };
            let resp = self.simple_response(&req, code, None);
            self.respond_new(key, &req, resp, target, now);
            return;
        };
        let seq = message::cseq(&req.headers).map(|c| c.0).unwrap_or(0);
        let Some(call) = self.calls.get_mut(&handle) else {
            return;
        };
        if let Err(e) = call.dialog.check_remote_cseq(seq) {
            let mut resp =
                message::ResponseBase::from_request(&req).response(500, Some(&e.to_string()), None);
            self.push_server_header(&mut resp);
            self.respond_new(key, &req, resp, target, now);
            return;
        }
        match req.method {
            rsip::Method::Bye => {
                let resp = self.simple_response(&req, 200, None);
                self.respond_new(key, &req, resp, target, now);
                if let Some(c) = self.calls.get(&handle) {
                    if !c.outbound && matches!(c.state, CallState::Incoming | CallState::Early) {
                        // BYE in an early dialog: the INVITE still needs a final answer.
                        let (ik, tag) = (c.invite_key.clone(), c.dialog.id.local_tag.clone());
                        let resp = self.simple_response(&c.invite, 487, Some(&tag));
                        let mut out = Vec::new();
                        let _ = self.txs.respond(&ik, &resp, now, &mut out);
                        self.drain_tx(out, now);
                    }
                }
                self.remove_call(handle);
                self.emit(UaEvent::CallEnded {
                    call: handle,
                    by: EndedBy::Remote,
                    reason: EndReason::Bye,
                });
            }
            rsip::Method::Options => {
                let resp = self.options_response(&req, None);
                self.respond_new(key, &req, resp, target, now);
                self.emit(UaEvent::InDialogRequest {
                    call: handle,
                    kind: InDialogKind::Options,
                    request: Box::new(req),
                    media: None,
                });
            }
            rsip::Method::Info => {
                let resp = self.simple_response(&req, 200, None);
                self.respond_new(key, &req, resp, target, now);
                self.emit(UaEvent::InDialogRequest {
                    call: handle,
                    kind: InDialogKind::Info,
                    request: Box::new(req),
                    media: None,
                });
            }
            rsip::Method::Invite | rsip::Method::Update => {
                self.on_offer_in_dialog(handle, req, key, target, now)
            }
            rsip::Method::Refer => self.on_refer(handle, req, key, target, now),
            rsip::Method::Notify => self.on_notify(handle, req, key, target, now),
            _ => {
                let mut resp = self.simple_response(&req, 501, None);
                resp.headers.push(message::make_header("Allow", ALLOW));
                self.respond_new(key, &req, resp, target, now);
            }
        }
    }

    /// re-INVITE or UPDATE: session refresh and/or new offer, answered automatically with the
    /// media configuration given at answer time.
    pub(super) fn on_offer_in_dialog(
        &mut self,
        handle: CallHandle,
        req: rsip::Request,
        key: TxKey,
        target: Target,
        now: Instant,
    ) {
        let is_invite = req.method == rsip::Method::Invite;
        let kind = if is_invite {
            InDialogKind::ReInvite
        } else {
            InDialogKind::Update
        };
        let Some(call) = self.calls.get(&handle) else {
            return;
        };
        if call.state != CallState::Confirmed || call.awaiting_ack.is_some() {
            // §14.2: an INVITE while ours is unfinished gets 491; before answer, 500 would do
            // too, but 491 makes the peer retry later, which is what we want.
            let resp = self.simple_response(&req, 491, None);
            self.respond_new(key, &req, resp, target, now);
            return;
        }
        let st = match SessionTimer::negotiate(&req.headers, self.cfg.min_se) {
            Ok(st) => st,
            Err(too_small) => {
                let mut resp = self.simple_response(&req, 422, None);
                resp.headers
                    .push(message::make_header("Min-SE", too_small.min_se.to_string()));
                self.respond_new(key, &req, resp, target, now);
                return;
            }
        };
        let offer = match self.read_offer(&req) {
            Ok(o) => o,
            Err(resp) => {
                self.respond_new(key, &req, *resp, target, now);
                return;
            }
        };
        let Some(call) = self.calls.get_mut(&handle) else {
            return;
        };
        let mut negotiated = None;
        let body = match (&offer, &call.media) {
            (Some(o), Some(media)) => match sdp::negotiate(o, media) {
                Ok(neg) => {
                    let version = call
                        .local_sdp
                        .as_ref()
                        .map(|s| s.session_version + 1)
                        .unwrap_or(1);
                    let ans = sdp::build_answer(o, &neg, media, call.session_id, version);
                    call.local_sdp = Some(ans.clone());
                    negotiated = Some(neg);
                    Some(ans.to_bytes())
                }
                Err(e) => {
                    let tag = call.dialog.id.local_tag.clone();
                    let mut resp = ResponseBase::from_request(&req).response(
                        488,
                        Some(&format!("Not Acceptable Here ({e})")),
                        Some(&tag),
                    );
                    self.push_server_header(&mut resp);
                    self.respond_new(key, &req, resp, target, now);
                    return;
                }
            },
            // No offer in a re-INVITE: our current SDP becomes the offer (§14.2).
            (None, _) if is_invite => call.local_sdp.as_ref().map(SessionDescription::to_bytes),
            _ => None,
        };
        call.dialog.refresh_target(&req.headers);
        if st.is_some() {
            call.session_timer = st;
        }
        call.refreshed_at = now;
        let seq = message::cseq(&req.headers).map(|c| c.0).unwrap_or(0);
        let tag = call.dialog.id.local_tag.clone();
        let contact = call.dialog.local_contact.clone();
        let timer_headers = call
            .session_timer
            .map(|s| s.response_headers())
            .unwrap_or_default();
        let mut resp = message::response_to(&req, 200, Some(&tag));
        resp.headers
            .push(message::make_header("Contact", format!("<{contact}>")));
        for (n, v) in timer_headers {
            resp.headers.push(message::make_header(&n, v));
        }
        resp.headers.push(message::make_header("Allow", ALLOW));
        resp.headers
            .push(message::make_header("Supported", SUPPORTED));
        self.push_server_header(&mut resp);
        if let Some(b) = body {
            resp.headers
                .push(message::make_header("Content-Type", "application/sdp"));
            resp.body = b;
        }
        let bytes = message::to_bytes(&resp.clone().into());
        self.respond_new(key, &req, resp, target, now);
        if is_invite {
            let t = self.cfg.timers;
            if let Some(call) = self.calls.get_mut(&handle) {
                let retx =
                    AnswerRetransmit::new(bytes, t.t1, t.t2, target.transport.is_reliable(), now);
                call.awaiting_ack = Some(seq);
                self.arm_retransmit(handle, &retx);
                if let Some(call) = self.calls.get_mut(&handle) {
                    call.retransmit = Some(retx);
                }
            }
        }
        self.arm_session_timer(handle);
        self.emit(UaEvent::InDialogRequest {
            call: handle,
            kind,
            request: Box::new(req),
            media: negotiated,
        });
    }

    pub(super) fn on_client_response(&mut self, key: TxKey, resp: rsip::Response, now: Instant) {
        let Some(&(handle, purpose)) = self.client_txs.get(&key) else {
            return;
        };
        let code = resp.status_code.code();
        if purpose == ClientPurpose::Message {
            if code >= 200 {
                self.message_result(&key, code);
            }
            return;
        }
        if purpose == ClientPurpose::Invite {
            self.on_invite_response(handle, resp, now);
            return;
        }
        if purpose == ClientPurpose::Refer {
            if code >= 200 {
                self.refer_result(handle, code);
            }
            return;
        }
        if purpose == ClientPurpose::Notify {
            if code == 481 {
                // The peer forgot the subscription (or the dialog): nothing left to tell it.
                tracing::info!(call = handle.0, "transfer NOTIFY answered 481");
            }
            return;
        }
        if purpose != ClientPurpose::Refresh || code < 200 {
            return;
        }
        if (200..300).contains(&code) {
            let is_invite = matches!(&key, TxKey::Client { method, .. } if method == "INVITE");
            let Some(call) = self.calls.get_mut(&handle) else {
                return;
            };
            call.refreshed_at = now;
            if is_invite {
                // The ACK for a 2xx is end-to-end, outside the transaction (§13.2.2.4).
                let seq = message::cseq(&resp.headers).map(|c| c.0).unwrap_or(1);
                let branch = self.new_token();
                if let Some(call) = self.calls.get_mut(&handle) {
                    let via = format!(
                        "SIP/2.0/{} {};branch=z9hG4bK{branch};rport",
                        call.source.transport.via_name(),
                        self.cfg.advertised_addr.unwrap_or(call.local)
                    );
                    let ack = call
                        .dialog
                        .build_request(rsip::Method::Ack, &via, Some(seq), None);
                    let target = Self::next_hop(call);
                    self.send_raw(target, message::to_bytes(&ack.into()));
                }
            }
            self.arm_session_timer(handle);
        } else if code == 408 || code == 481 {
            self.end_with_bye(handle, EndReason::RefreshFailed, now);
        }
    }
}

/// Once an inbound call's 2xx is acknowledged nothing answers its INVITE any more: keep only
/// the headers that name it, not the whole request and its SDP for the length of the call.
fn forget_answered_invite(invite: &mut rsip::Request) {
    let kept: Vec<rsip::Header> = std::mem::take(&mut invite.headers)
        .into_iter()
        .filter(|h| {
            matches!(
                h,
                rsip::Header::Via(_)
                    | rsip::Header::From(_)
                    | rsip::Header::To(_)
                    | rsip::Header::CallId(_)
                    | rsip::Header::CSeq(_)
            )
        })
        .collect();
    invite.headers = kept.into();
    invite.body = Vec::new();
}
