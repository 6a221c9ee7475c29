//! Blind transfer (RFC 3515): REFERs we send and the `Event: refer` NOTIFYs reporting on
//! them, REFERs we receive (declined or accepted per `UaConfig::accept_refer`) and the
//! NOTIFYs we send about those.
//!
//! Only the implicit subscription of one REFER per dialog at a time is kept, so NOTIFYs
//! carry `Event: refer` without an `id` parameter.

use super::*;

/// The implicit subscription created by a REFER we accepted (RFC 3515 §2.4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TransferSubscription {
    /// NOTIFYs with provisional statuses may still follow.
    Active,
    /// The final NOTIFY went out (`Subscription-State: terminated`).
    Terminated,
}

/// Lifetime our NOTIFYs announce for an active subscription, in seconds.
const SUBSCRIPTION_EXPIRES: u32 = 60;

/// The `Refer-To` value for a target given by the layer above: a bare URI gets angle
/// brackets (it may carry `?` headers or `;` parameters that must stay inside the URI).
fn refer_to_value(target: &str) -> Result<String, UaError> {
    let t = target.trim();
    let bad = || UaError::InvalidUri(t.chars().take(80).collect());
    if t.is_empty() || t.chars().any(|c| c.is_control()) {
        return Err(bad());
    }
    if t.starts_with('<') || t.starts_with('"') {
        return match NameAddr::parse(t) {
            Ok(na) if has_scheme(&na.uri) => Ok(t.to_string()),
            _ => Err(bad()),
        };
    }
    if !has_scheme(t) || t.contains(['<', '>', ' ']) {
        return Err(bad());
    }
    Ok(format!("<{t}>"))
}

/// `scheme:rest` with an RFC 3986 scheme and something after the colon.
fn has_scheme(uri: &str) -> bool {
    match uri.split_once(':') {
        Some((scheme, rest)) => {
            !rest.is_empty()
                && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        }
        None => false,
    }
}

/// The status code of a `message/sipfrag` body whose first line is a status line
/// (`SIP/2.0 180 Ringing`), or `None` when it is anything else.
pub(super) fn sipfrag_status(body: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(body).ok()?;
    let line = text.lines().find(|l| !l.trim().is_empty())?.trim();
    let rest = line.strip_prefix("SIP/2.0 ")?;
    let digits = rest.get(..3)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !rest[3..].is_empty() && !rest[3..].starts_with(' ') {
        return None;
    }
    let code: u16 = digits.parse().ok()?;
    (100..=699).contains(&code).then_some(code)
}

/// True when the request's `Event` package is `refer` (parameters such as `id` ignored).
fn is_refer_event(headers: &rsip::Headers) -> bool {
    message::header(headers, "Event").is_some_and(|v| {
        v.split(';')
            .next()
            .is_some_and(|p| p.trim().eq_ignore_ascii_case("refer"))
    })
}

/// True when Content-Type is absent or `message/sipfrag` (parameters ignored).
fn is_sipfrag(headers: &rsip::Headers) -> bool {
    message::header(headers, "Content-Type").is_none_or(|v| {
        v.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("message/sipfrag"))
    })
}

impl UserAgent {
    /// Asks the peer of an established call to call `refer_to` (blind transfer): sends an
    /// in-dialog REFER with `Refer-To` and `Referred-By` (our URI in the dialog). The final
    /// response arrives as [`UaEvent::ReferResponse`], the transfer's progress as
    /// [`UaEvent::TransferNotify`]. The call itself is not ended: hang up when the
    /// notifications say the transfer succeeded.
    pub fn refer(
        &mut self,
        handle: CallHandle,
        refer_to: &str,
        now: Instant,
    ) -> Result<(), UaError> {
        self.set_now(now);
        let call = self.calls.get(&handle).ok_or(UaError::UnknownCall)?;
        if call.state != CallState::Confirmed {
            return Err(UaError::WrongState(call.state.name()));
        }
        let refer_to = refer_to_value(refer_to)?;
        let referred_by = format!("<{}>", call.dialog.local.uri);
        let (req, target) = self
            .build_in_dialog(
                handle,
                rsip::Method::Refer,
                None,
                &[("Refer-To", refer_to), ("Referred-By", referred_by)],
            )
            .ok_or(UaError::UnknownCall)?;
        let mut out = Vec::new();
        // Unlike BYE, a REFER is not sent without a transaction: its result must come back.
        let key = self.txs.send_request(req, target, now, &mut out)?;
        self.client_txs.insert(key, (handle, ClientPurpose::Refer));
        self.drain_tx(out, now);
        self.announce_timer();
        Ok(())
    }

    /// Reports the progress of a transfer the peer asked for (an `InDialogRequest` of kind
    /// `Refer`): a NOTIFY whose sipfrag body is `SIP/2.0 {code} {reason}`. A final `code`
    /// (>= 200) terminates the subscription; after it, further calls are `WrongState`.
    pub fn notify_transfer(
        &mut self,
        handle: CallHandle,
        code: u16,
        reason: &str,
        now: Instant,
    ) -> Result<(), UaError> {
        self.set_now(now);
        let call = self.calls.get(&handle).ok_or(UaError::UnknownCall)?;
        match call.transfer {
            Some(TransferSubscription::Active) => {}
            Some(TransferSubscription::Terminated) => {
                return Err(UaError::WrongState("transfer already reported as finished"))
            }
            None => return Err(UaError::WrongState("no transfer accepted on this call")),
        }
        if !(100..=699).contains(&code) {
            return Err(UaError::BadStatus(code));
        }
        let reason: String = reason.chars().filter(|c| !c.is_control()).collect();
        let reason = match reason.trim() {
            "" => message::reason_phrase(code).to_string(),
            r => r.to_string(),
        };
        self.send_transfer_notify(handle, code, &reason, now);
        if code >= 200 {
            if let Some(call) = self.calls.get_mut(&handle) {
                call.transfer = Some(TransferSubscription::Terminated);
            }
        }
        self.announce_timer();
        Ok(())
    }

    fn send_transfer_notify(&mut self, handle: CallHandle, code: u16, reason: &str, now: Instant) {
        let state = if code >= 200 {
            "terminated;reason=noresource".to_string()
        } else {
            format!("active;expires={SUBSCRIPTION_EXPIRES}")
        };
        let body = format!("SIP/2.0 {code} {reason}\r\n").into_bytes();
        self.send_in_dialog_with(
            handle,
            rsip::Method::Notify,
            Some(("message/sipfrag;version=2.0", body)),
            &[
                ("Event", "refer".to_string()),
                ("Subscription-State", state),
            ],
            ClientPurpose::Notify,
            now,
        );
    }

    /// An in-dialog REFER from the peer.
    pub(super) fn on_refer(
        &mut self,
        handle: CallHandle,
        req: rsip::Request,
        key: TxKey,
        target: Target,
        now: Instant,
    ) {
        let Some(call) = self.calls.get(&handle) else {
            return;
        };
        let tag = call.dialog.id.local_tag.clone();
        let contact = call.dialog.local_contact.clone();
        let refusal = if !self.cfg.accept_refer || call.state != CallState::Confirmed {
            Some((603, "Transfer Refused".to_string()))
        } else if call.transfer == Some(TransferSubscription::Active) {
            // One transfer at a time: our NOTIFYs carry no `id` to tell two apart.
            Some((491, "Transfer Already In Progress".to_string()))
        } else {
            let targets: Vec<String> = message::headers_named(&req.headers, "Refer-To")
                .iter()
                .flat_map(|v| parse::split_list(v))
                .collect();
            match targets.as_slice() {
                // RFC 3515 §2.4.1: exactly one Refer-To, else 400.
                [_] => None,
                [] => Some((400, "Missing Refer-To".to_string())),
                _ => Some((400, "More Than One Refer-To".to_string())),
            }
        };
        if let Some((code, reason)) = refusal {
            tracing::info!(call = handle.0, code, %reason, "refusing REFER");
            let mut resp =
                ResponseBase::from_request(&req).response(code, Some(&reason), Some(&tag));
            self.push_server_header(&mut resp);
            self.respond_new(key, &req, resp, target, now);
            return;
        }
        let mut resp = self.simple_response(&req, 202, Some(&tag));
        resp.headers
            .push(message::make_header("Contact", format!("<{contact}>")));
        self.respond_new(key, &req, resp, target, now);
        if let Some(call) = self.calls.get_mut(&handle) {
            call.transfer = Some(TransferSubscription::Active);
        }
        // RFC 3515 §2.4.4: the initial NOTIFY follows the 202 at once.
        self.send_transfer_notify(handle, 100, "Trying", now);
        self.emit(UaEvent::InDialogRequest {
            call: handle,
            kind: InDialogKind::Refer,
            request: Box::new(req),
            media: None,
        });
    }

    /// An in-dialog NOTIFY: `Event: refer` ones report a transfer we asked for.
    pub(super) fn on_notify(
        &mut self,
        handle: CallHandle,
        req: rsip::Request,
        key: TxKey,
        target: Target,
        now: Instant,
    ) {
        if !is_refer_event(&req.headers) {
            // RFC 6665 §8.2.1: an event package we do not subscribe to.
            let mut resp = self.simple_response(&req, 489, None);
            resp.headers
                .push(message::make_header("Allow-Events", "refer"));
            self.respond_new(key, &req, resp, target, now);
            return;
        }
        let resp = self.simple_response(&req, 200, None);
        self.respond_new(key, &req, resp, target, now);
        let status = if is_sipfrag(&req.headers) {
            sipfrag_status(&req.body)
        } else {
            None
        };
        match status {
            Some(code) => self.emit(UaEvent::TransferNotify { call: handle, code }),
            None => tracing::debug!(
                call = handle.0,
                "refer NOTIFY without a sipfrag status line"
            ),
        }
    }

    /// Final response (or 408 on timeout) to a REFER we sent, unless the call is gone.
    pub(super) fn refer_result(&mut self, handle: CallHandle, code: u16) {
        if self.calls.contains_key(&handle) {
            self.emit(UaEvent::ReferResponse { call: handle, code });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sipfrag_status_lines() {
        assert_eq!(sipfrag_status(b"SIP/2.0 180 Ringing\r\n"), Some(180));
        assert_eq!(sipfrag_status(b"\r\nSIP/2.0 200 OK"), Some(200));
        assert_eq!(sipfrag_status(b"SIP/2.0 503"), Some(503));
        for bad in [
            &b""[..],
            b"SIP/2.0 18 Ringing",
            b"SIP/2.0 1800 Ringing",
            b"SIP/2.0 099 X",
            b"SIP/1.0 200 OK",
            b"INVITE sip:a@b SIP/2.0",
            b"SIP/2.0 2\xff0 OK",
            b"\xff\xfe",
            b"SIP/2.0 \xe2\x82\xac00",
        ] {
            assert_eq!(sipfrag_status(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn refer_to_values() {
        assert_eq!(
            refer_to_value(" sip:bob@example.com ").unwrap(),
            "<sip:bob@example.com>"
        );
        assert_eq!(
            refer_to_value("<sip:bob@example.com?Replaces=x>").unwrap(),
            "<sip:bob@example.com?Replaces=x>"
        );
        assert_eq!(refer_to_value("tel:+15551234").unwrap(), "<tel:+15551234>");
        for bad in [
            "",
            "bob",
            "sip:",
            "sip:a\r\nVia: x",
            "<bob>",
            "sip:a b",
            ":x",
        ] {
            assert!(
                matches!(refer_to_value(bad), Err(UaError::InvalidUri(_))),
                "{bad:?}"
            );
        }
    }
}
