//! Digest authentication of our outbound INVITEs (RFC 3261 §22.2–22.3): a 401/407 whose
//! challenge we have not answered yet makes us re-send the INVITE with credentials.

use super::*;
use crate::sip::digest::{Challenge, Credentials};

/// At most this many realms are answered per call, so a peer inventing a new realm on
/// every challenge cannot keep us re-sending forever.
const MAX_REALMS: usize = 3;

/// Credentials of one outbound call and the challenges answered with them.
#[derive(Debug)]
pub(super) struct AuthState {
    creds: Credentials,
    answered: Vec<Answered>,
}

#[derive(Debug)]
struct Answered {
    /// From `Proxy-Authenticate` (answered in `Proxy-Authorization`), else `WWW-Authenticate`.
    proxy: bool,
    challenge: Challenge,
    /// Requests sent with this nonce so far (the `nc` of qop=auth).
    nc: u32,
}

impl Answered {
    fn header_name(&self) -> &'static str {
        if self.proxy {
            "Proxy-Authorization"
        } else {
            "Authorization"
        }
    }
}

impl AuthState {
    pub(super) fn new(creds: Credentials) -> Self {
        Self {
            creds,
            answered: Vec::new(),
        }
    }

    /// Adds the challenges of `resp` whose realm we have not answered yet. False when there
    /// is none (a repeated challenge means the credentials were refused) or too many.
    fn learn(&mut self, resp: &rsip::Response) -> bool {
        let mut added = false;
        for (proxy, name) in [(true, "Proxy-Authenticate"), (false, "WWW-Authenticate")] {
            for value in message::headers_named(&resp.headers, name) {
                let challenge = match Challenge::parse(&value) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "ignoring a challenge we cannot answer");
                        continue;
                    }
                };
                // One answer per (header, realm): the first challenge listed is the one the
                // server prefers, and a realm answered before is not retried.
                if self
                    .answered
                    .iter()
                    .any(|a| a.proxy == proxy && a.challenge.realm == challenge.realm)
                {
                    continue;
                }
                if self.answered.len() >= MAX_REALMS {
                    return false;
                }
                self.answered.push(Answered {
                    proxy,
                    challenge,
                    nc: 0,
                });
                added = true;
            }
        }
        added
    }

    /// Authorization headers for the next attempt of `method uri`: every realm answered so
    /// far, since a proxy that challenged once will challenge again without them (§22.3).
    /// `cnonces` holds a fresh client nonce per realm (at least `MAX_REALMS`).
    fn headers(
        &mut self,
        method: &str,
        uri: &str,
        cnonces: &[String],
    ) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (a, cnonce) in self.answered.iter_mut().zip(cnonces) {
            a.nc += 1;
            let value = a.challenge.answer(
                &self.creds.username,
                &self.creds.password,
                method,
                uri,
                cnonce,
                a.nc,
            );
            out.push((a.header_name(), value));
        }
        out
    }
}

impl UserAgent {
    /// Answers a 401/407 to our INVITE by sending it again with credentials: same Call-ID and
    /// From tag, CSeq + 1, a new branch. False when we cannot or must not retry (no
    /// credentials, realm already answered, hangup requested, no room for a transaction);
    /// the caller then ends the call with `Failed(code)`.
    pub(super) fn retry_with_credentials(
        &mut self,
        handle: CallHandle,
        resp: &rsip::Response,
        now: Instant,
    ) -> bool {
        let branch = self.new_token();
        // Drawn before `call` is borrowed: the token generator needs `&mut self`.
        let cnonces: Vec<String> = (0..MAX_REALMS).map(|_| self.new_token()).collect();
        let our_addr = self.cfg.advertised_addr;
        let Some(call) = self.calls.get_mut(&handle) else {
            return false;
        };
        if call.cancel_pending || call.cancel_sent {
            return false;
        }
        let Some(auth) = call.auth.as_mut() else {
            return false;
        };
        if !auth.learn(resp) {
            tracing::info!(
                call = handle.0,
                "credentials refused (or challenge unanswerable); giving up"
            );
            return false;
        }
        let mut invite = call.invite.clone();
        let seq = message::cseq(&invite.headers)
            .map(|c| c.0)
            .unwrap_or(1)
            .wrapping_add(1);
        let via = format!(
            "SIP/2.0/{} {};branch=z9hG4bK{branch};rport",
            call.source.transport.via_name(),
            our_addr.unwrap_or(call.local)
        );
        let uri = invite.uri.to_string();
        let answers = auth.headers("INVITE", &uri, &cnonces);
        let mut via_done = false;
        for h in invite.headers.iter_mut() {
            let (name, _) = message::name_value(h);
            if name.eq_ignore_ascii_case("Via") && !via_done {
                *h = message::make_header("Via", via.clone());
                via_done = true;
            } else if name.eq_ignore_ascii_case("CSeq") {
                *h = message::make_header("CSeq", format!("{seq} INVITE"));
            }
        }
        message::remove_headers(&mut invite.headers, "Authorization");
        message::remove_headers(&mut invite.headers, "Proxy-Authorization");
        for (name, value) in answers {
            invite.headers.push(message::make_header(name, value));
        }
        let target = call.source;
        let mut out = Vec::new();
        let key = match self.txs.send_request(invite.clone(), target, now, &mut out) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-send the INVITE with credentials");
                return false;
            }
        };
        let Some(call) = self.calls.get_mut(&handle) else {
            return false;
        };
        call.invite = invite;
        call.invite_key = key.clone();
        call.dialog.local_cseq = seq;
        // An early dialog a provisional to the challenged INVITE created ended with the
        // 401/407; the new INVITE may create another one.
        if !call.dialog.id.remote_tag.is_empty() {
            let old = call.dialog.id.clone();
            call.dialog.id.remote_tag.clear();
            self.dialogs.remove(&old);
        }
        // CANCEL waits for a provisional to *this* INVITE (§9.1).
        call.provisional_seen = false;
        self.client_txs.insert(key, (handle, ClientPurpose::Invite));
        self.drain_tx(out, now);
        true
    }
}
