//! The test callee: the far end of a call, answering INVITEs with hand-written SIP over
//! loopback UDP (independent of callforge's SIP stack), as a carrier or a phone would.
//!
//! A background task owns the SIP socket and does what needs no decision from the test:
//! it queues new INVITEs, resends the last response to a retransmitted INVITE, retransmits
//! final responses until their ACK (T1 doubling to T2, for 32 s), answers CANCEL (200, then
//! 487 to the INVITE), BYE (200), re-INVITE (200 with our SDP, direction mirrored), OPTIONS
//! and other in-dialog requests (200), and records everything. The test decides the rest:
//! [`Callee::accept`] rings, then answers or rejects; or step by step with
//! [`Callee::wait_for_invite`], [`Callee::ring`], [`Callee::answer`], [`Callee::reject`].
//!
//! One callee takes its INVITEs one at a time; RTP from every call lands on one socket.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{net::UdpSocket, sync::watch, task::JoinHandle};

use super::{
    branch,
    codec::Codec,
    rand_u64, record_rtp,
    rtp::{decode_audio, dtmf_digits, RtpOut},
    sdp::{sdp_body, Sdp},
    Received, SipMessage,
};

const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);
/// 64 × T1: how long a final response is retransmitted waiting for its ACK (Timer H), and
/// how long a BYE waits for its answer (Timer F).
const TIMER_H: Duration = Duration::from_secs(32);
/// Used when the offer has no telephone-event (it then also goes unanswered in our SDP).
const DEFAULT_DTMF_PT: u8 = 101;

/// How [`Callee::accept`] treats the next INVITE.
#[derive(Debug, Clone)]
pub struct AcceptOpts {
    /// How long to ring (after 100 and 180/183) before answering or rejecting.
    pub ring_ms: u64,
    /// Send 183 Session Progress with the SDP answer instead of 180 Ringing, so media can
    /// flow before the answer ([`Callee::send_audio`] works from then on).
    pub early_media: bool,
    /// Answer with 200 OK once `ring_ms` is over.
    pub answer: bool,
    /// When not answering: the final response to send after `ring_ms` (486, 603...); `None`
    /// rings until the caller CANCELs (at most 32 s, then `accept` fails).
    pub code_if_reject: Option<u16>,
    /// How long to wait for the INVITE to arrive.
    pub within: Duration,
}

impl Default for AcceptOpts {
    fn default() -> Self {
        AcceptOpts {
            ring_ms: 0,
            early_media: false,
            answer: true,
            code_if_reject: None,
            within: Duration::from_secs(10),
        }
    }
}

impl AcceptOpts {
    /// Ring for `ring_ms`, then answer.
    pub fn answer_after(ring_ms: u64) -> Self {
        AcceptOpts {
            ring_ms,
            ..Self::default()
        }
    }

    /// Ring for `ring_ms`, then send `code`.
    pub fn reject(code: u16, ring_ms: u64) -> Self {
        AcceptOpts {
            ring_ms,
            answer: false,
            code_if_reject: Some(code),
            ..Self::default()
        }
    }

    /// Ring until the caller gives up with CANCEL.
    pub fn ring_until_cancel() -> Self {
        AcceptOpts {
            answer: false,
            ..Self::default()
        }
    }
}

/// What became of an INVITE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Taken, not yet answered or rejected (what [`Callee::wait_for_invite`] returns).
    Pending,
    Answered,
    Rejected(u16),
    /// The caller sent CANCEL before a final response; we answered 200 and 487.
    Cancelled,
}

/// An INVITE the callee took, parsed.
#[derive(Debug, Clone)]
pub struct Invite {
    pub request_uri: String,
    pub from: String,
    pub to: String,
    pub call_id: String,
    /// The SDP offer (`None` for an INVITE without a body).
    pub offer: Option<Sdp>,
    /// The whole request, for any header by name.
    pub message: SipMessage,
    /// Where it came from (responses go back there).
    pub source: SocketAddr,
    pub outcome: Outcome,
}

impl Invite {
    /// The first header of that name (full or compact form, any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.message.header(name)
    }

    /// Every header of that name, in order (Via, Record-Route, Diversion...).
    pub fn headers(&self, name: &str) -> Vec<&str> {
        self.message
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The user part of the request URI (the number dialled).
    pub fn user(&self) -> &str {
        let uri = self.request_uri.trim_start_matches("sip:");
        uri.split_once('@')
            .map_or("", |(user, _)| user.split(';').next().unwrap_or(user))
    }
}

/// Our side of a negotiated stream.
#[derive(Debug, Clone, Copy)]
struct Media {
    pt: u8,
    dtmf_pt: Option<u8>,
    version: u32,
}

/// One INVITE server transaction and the dialog it makes.
#[derive(Debug, Clone)]
struct Leg {
    invite: SipMessage,
    source: SocketAddr,
    call_id: String,
    cseq: u32,
    to_tag: String,
    taken: bool,
    /// Responses sent to INVITEs of this dialog, by CSeq number (resent on retransmission).
    sent: Vec<(u32, String)>,
    final_code: Option<u16>,
    /// CSeq numbers of the ACKs received.
    acks: Vec<u32>,
    cancel: Option<SipMessage>,
    bye: Option<SipMessage>,
    /// The final status the far end gave to our BYE.
    bye_reply: Option<u16>,
    /// The final response to our re-INVITE (its CSeq number, the response).
    reinvite_reply: Option<(u32, SipMessage)>,
    media: Option<Media>,
    remote_rtp: Option<SocketAddr>,
    /// In-dialog requests other than ACK and CANCEL (BYE, re-INVITE, INFO...), once each.
    requests: Vec<SipMessage>,
    branches: Vec<String>,
}

impl Leg {
    fn acked(&self) -> bool {
        self.acks.contains(&self.cseq)
    }
}

#[derive(Debug, Default)]
struct State {
    legs: Vec<Leg>,
}

impl State {
    fn leg(&self, call_id: &str) -> Option<&Leg> {
        self.legs.iter().rev().find(|l| l.call_id == call_id)
    }

    fn leg_mut(&mut self, call_id: &str) -> Option<&mut Leg> {
        self.legs.iter_mut().rev().find(|l| l.call_id == call_id)
    }
}

/// The test callee. See the module documentation.
pub struct Callee {
    sip: Arc<UdpSocket>,
    rtp: Arc<UdpSocket>,
    /// The codec it answers with (and fails the call when the offer lacks it).
    pub codec: Codec,
    state: Arc<watch::Sender<State>>,
    /// Every RTP packet received, in arrival order.
    pub received: Arc<Mutex<Vec<Received>>>,
    current: Option<String>,
    out: RtpOut,
    local_cseq: u32,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Callee {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Callee {
    /// Bind a SIP and an RTP socket on 127.0.0.1 (ephemeral ports) and start listening.
    /// The callee answers in `codec`.
    pub async fn listen(codec: Codec) -> Callee {
        let sip = Arc::new(
            UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind the callee's SIP socket"),
        );
        let rtp = Arc::new(
            UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind the callee's RTP socket"),
        );
        let state = Arc::new(watch::Sender::new(State::default()));
        let received = Arc::new(Mutex::new(Vec::new()));
        let tasks = vec![
            tokio::spawn(record_rtp(rtp.clone(), received.clone())),
            tokio::spawn(sip_loop(sip.clone(), state.clone(), codec, rtp_addr(&rtp))),
        ];
        Callee {
            out: RtpOut::new(rtp.clone()),
            sip,
            rtp,
            codec,
            state,
            received,
            current: None,
            local_cseq: 0,
            tasks,
        }
    }

    /// Where to send SIP: route callforge's outbound calls here.
    pub fn sip_addr(&self) -> SocketAddr {
        self.sip.local_addr().expect("a bound socket")
    }

    pub fn rtp_addr(&self) -> SocketAddr {
        rtp_addr(&self.rtp)
    }

    /// A SIP URI for `user` at this callee, e.g. for a gateway or a bridge target.
    pub fn uri(&self, user: &str) -> String {
        format!("sip:{user}@{}", self.sip_addr())
    }

    /// Take the next INVITE and handle it as `opts` says: 100, 180 (or 183 with SDP), ring
    /// for `ring_ms`, then 200 with an SDP answer (waiting for the ACK), or the reject code,
    /// or ring until CANCEL. A CANCEL at any point ends it with [`Outcome::Cancelled`].
    /// Fails when no INVITE comes within `opts.within`, when the offer lacks the callee's
    /// codec (answered 488), or when the 200 or the reject gets no ACK in 32 s.
    pub async fn accept(&mut self, opts: AcceptOpts) -> Result<Invite, String> {
        let mut invite = self.wait_for_invite(opts.within).await?;
        if invite.outcome == Outcome::Cancelled {
            return Ok(invite);
        }
        if let Err(e) = self.ring(opts.early_media).await {
            return self.cancelled_or(invite, e);
        }
        if self
            .wait_for_cancel(Duration::from_millis(opts.ring_ms))
            .await
            .is_some()
        {
            invite.outcome = Outcome::Cancelled;
            return Ok(invite);
        }
        if opts.answer {
            if let Err(e) = self.answer().await {
                return self.cancelled_or(invite, e);
            }
            invite.outcome = Outcome::Answered;
        } else if let Some(code) = opts.code_if_reject {
            if let Err(e) = self.reject(code).await {
                return self.cancelled_or(invite, e);
            }
            invite.outcome = Outcome::Rejected(code);
        } else {
            self.wait_for_cancel(TIMER_H)
                .await
                .ok_or("rang for 32 s and no CANCEL came")?;
            invite.outcome = Outcome::Cancelled;
        }
        Ok(invite)
    }

    fn cancelled_or(&self, mut invite: Invite, e: String) -> Result<Invite, String> {
        if self.current_leg().is_some_and(|l| l.cancel.is_some()) {
            invite.outcome = Outcome::Cancelled;
            Ok(invite)
        } else {
            Err(e)
        }
    }

    /// Take the next INVITE (waiting up to `within`) and send 100 Trying. When the offer
    /// lacks the callee's codec (or there is no offer) it answers 488 and fails, saying why.
    /// An INVITE already cancelled comes back with [`Outcome::Cancelled`].
    pub async fn wait_for_invite(&mut self, within: Duration) -> Result<Invite, String> {
        let addr = self.sip_addr();
        let mut rx = self.state.subscribe();
        let waited = tokio::time::timeout(within, rx.wait_for(|s| s.legs.iter().any(|l| !l.taken)))
            .await
            .map(|r| r.is_ok());
        if waited != Ok(true) {
            return Err(format!(
                "no INVITE reached the callee at {addr} within {within:?}"
            ));
        }
        let mut taken = None;
        self.state.send_modify(|s| {
            if let Some(l) = s.legs.iter_mut().find(|l| !l.taken) {
                l.taken = true;
                taken = Some(l.clone());
            }
        });
        let leg = taken.ok_or("the INVITE vanished")?;
        self.current = Some(leg.call_id.clone());
        let offer = Sdp::parse(&leg.invite.body);
        let mut invite = Invite {
            request_uri: leg
                .invite
                .first_line
                .split(' ')
                .nth(1)
                .unwrap_or_default()
                .to_string(),
            from: leg.invite.header("From").unwrap_or_default().to_string(),
            to: leg.invite.header("To").unwrap_or_default().to_string(),
            call_id: leg.call_id.clone(),
            offer: offer.clone(),
            message: leg.invite.clone(),
            source: leg.source,
            outcome: Outcome::Pending,
        };
        if leg.cancel.is_some() {
            invite.outcome = Outcome::Cancelled;
            return Ok(invite);
        }
        self.respond(100, false).await?;
        let Some(offer) = offer else {
            self.reject(488).await?;
            return Err(
                "INVITE without an SDP offer (the callee does not do delayed offer): answered 488"
                    .into(),
            );
        };
        let Some(pt) = offer.pt_for(self.codec) else {
            self.reject(488).await?;
            return Err(format!(
                "the offer lacks {} (answered 488): {}",
                self.codec.name(),
                offer.m_line()
            ));
        };
        let media = Media {
            pt,
            dtmf_pt: offer.telephone_event(),
            version: 1,
        };
        let remote = offer.rtp;
        self.with_leg(|l| {
            l.media = Some(media);
            l.remote_rtp = remote;
        });
        Ok(invite)
    }

    /// 180 Ringing, or with `early_media` 183 Session Progress carrying the SDP answer.
    pub async fn ring(&mut self, early_media: bool) -> Result<(), String> {
        if early_media {
            self.respond(183, true).await
        } else {
            self.respond(180, false).await
        }
    }

    /// 200 OK with the SDP answer (retransmitted until the ACK); returns once ACKed.
    pub async fn answer(&mut self) -> Result<(), String> {
        self.respond(200, true).await?;
        self.wait_for_ack("200 OK").await
    }

    /// A final error response (486, 603...), retransmitted until the ACK; returns once ACKed.
    pub async fn reject(&mut self, code: u16) -> Result<(), String> {
        assert!(code >= 300, "reject with a final error code, not {code}");
        self.respond(code, false).await?;
        self.wait_for_ack(&code.to_string()).await
    }

    async fn wait_for_ack(&self, what: &str) -> Result<(), String> {
        let call_id = self.current.clone().ok_or("no INVITE taken")?;
        let mut rx = self.state.subscribe();
        let acked = tokio::time::timeout(
            TIMER_H,
            rx.wait_for(|s| s.leg(&call_id).is_some_and(Leg::acked)),
        )
        .await
        .map(|r| r.is_ok());
        if acked == Ok(true) {
            Ok(())
        } else {
            Err(format!("no ACK for the {what} within 32 s"))
        }
    }

    /// Send a response to the current INVITE; a final one only if none was sent yet (a
    /// CANCEL may have got there first), retransmitted until ACKed.
    async fn respond(&mut self, code: u16, with_sdp: bool) -> Result<(), String> {
        let local = self.sip_addr();
        let rtp = self.rtp_addr();
        let codec = self.codec;
        let mut out = Err("no INVITE taken".to_string());
        let call_id = self.current.clone().unwrap_or_default();
        self.state.send_modify(|s| {
            let Some(l) = s.leg_mut(&call_id) else {
                return;
            };
            if code >= 200 {
                if let Some(done) = l.final_code {
                    out = Err(format!(
                        "cannot send {code}: the INVITE already got {done}{}",
                        if l.cancel.is_some() {
                            " (cancelled)"
                        } else {
                            ""
                        }
                    ));
                    return;
                }
                l.final_code = Some(code);
            }
            let body = match (with_sdp, l.media) {
                (true, Some(m)) => Some(sdp_body(
                    "callee",
                    m.version,
                    rtp,
                    &[(m.pt, codec)],
                    m.dtmf_pt,
                    "sendrecv",
                )),
                _ => None,
            };
            let tag = (code > 100).then_some(l.to_tag.as_str());
            let text = reply(&l.invite, code, tag, local, body.as_deref());
            l.sent.push((l.cseq, text.clone()));
            out = Ok((text, l.source, l.cseq));
        });
        let (text, to, cseq) = out?;
        self.sip
            .send_to(text.as_bytes(), to)
            .await
            .map_err(|e| e.to_string())?;
        if code >= 200 {
            let call_id = call_id.clone();
            spawn_retransmit(
                self.sip.clone(),
                self.state.subscribe(),
                text,
                to,
                move |s| s.leg(&call_id).is_none_or(|l| l.acks.contains(&cseq)),
            );
        }
        Ok(())
    }

    /// Wait up to `within` for a CANCEL of the current INVITE (already answered 200 + 487).
    pub async fn wait_for_cancel(&self, within: Duration) -> Option<SipMessage> {
        self.wait_leg(within, |l| l.cancel.clone()).await
    }

    /// Wait up to `within` for the far end's BYE (already answered 200).
    pub async fn wait_for_bye(&self, within: Duration) -> Option<SipMessage> {
        self.wait_leg(within, |l| l.bye.clone()).await
    }

    async fn wait_leg<T>(&self, within: Duration, get: impl Fn(&Leg) -> Option<T>) -> Option<T> {
        let call_id = self.current.clone()?;
        let mut rx = self.state.subscribe();
        let found = tokio::time::timeout(
            within,
            rx.wait_for(|s| s.leg(&call_id).and_then(&get).is_some()),
        )
        .await
        .ok()?
        .ok()?;
        found.leg(&call_id).and_then(get)
    }

    /// Hang up with BYE (retransmitted until answered) and return the far end's final status.
    pub async fn bye(&mut self) -> Result<u16, String> {
        let leg = self.current_leg().ok_or("no call to hang up")?;
        let local = self.sip_addr();
        self.local_cseq += 1;
        let routes: Vec<&str> = leg
            .invite
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("Record-Route"))
            .map(|(_, v)| v.as_str())
            .collect();
        let contact = leg
            .invite
            .header("Contact")
            .map(uri_of)
            .unwrap_or_default()
            .to_string();
        let target = routes
            .first()
            .and_then(|r| host_port(uri_of(r)))
            .or_else(|| host_port(&contact))
            .unwrap_or(leg.source);
        let route_headers: String = routes.iter().map(|r| format!("Route: {r}\r\n")).collect();
        let request_uri = if contact.is_empty() {
            format!("sip:{}", leg.source)
        } else {
            contact
        };
        let bye = format!(
            "BYE {request_uri} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch={};rport\r\nMax-Forwards: 70\r\nFrom: {};tag={}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {} BYE\r\n{route_headers}Content-Length: 0\r\n\r\n",
            branch(),
            leg.invite.header("To").unwrap_or_default(),
            leg.to_tag,
            leg.invite.header("From").unwrap_or_default(),
            leg.call_id,
            self.local_cseq,
        );
        let call_id = leg.call_id.clone();
        self.with_leg(|l| l.bye_reply = None);
        let mut rx = self.state.subscribe();
        let deadline = tokio::time::Instant::now() + TIMER_H;
        let mut interval = T1;
        loop {
            self.sip
                .send_to(bye.as_bytes(), target)
                .await
                .map_err(|e| e.to_string())?;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let got = tokio::time::timeout(
                interval.min(left),
                rx.wait_for(|s| s.leg(&call_id).is_some_and(|l| l.bye_reply.is_some())),
            )
            .await;
            if let Ok(Ok(state)) = got {
                return state
                    .leg(&call_id)
                    .and_then(|l| l.bye_reply)
                    .ok_or_else(|| "BYE answer lost".into());
            }
            if left <= interval {
                return Err(format!("no answer to BYE (sent to {target}) within 32 s"));
            }
            interval = (interval * 2).min(T2);
        }
    }

    /// re-INVITE offering our media with `direction` ("sendonly"/"inactive" to hold,
    /// "sendrecv" to resume), retransmitted until answered; ACKs a 2xx and returns the final
    /// response.
    pub async fn reinvite(&mut self, direction: &str) -> Result<SipMessage, String> {
        let leg = self.current_leg().ok_or("no call to re-INVITE")?;
        let m = leg.media.ok_or("no media negotiated")?;
        let local = self.sip_addr();
        self.local_cseq += 1;
        let cseq = self.local_cseq;
        let routes: Vec<&str> = leg
            .invite
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("Record-Route"))
            .map(|(_, v)| v.as_str())
            .collect();
        let contact = leg
            .invite
            .header("Contact")
            .map(uri_of)
            .unwrap_or_default()
            .to_string();
        let target = routes
            .first()
            .and_then(|r| host_port(uri_of(r)))
            .or_else(|| host_port(&contact))
            .unwrap_or(leg.source);
        let route_headers: String = routes.iter().map(|r| format!("Route: {r}\r\n")).collect();
        let request_uri = if contact.is_empty() {
            format!("sip:{}", leg.source)
        } else {
            contact
        };
        let body = sdp_body(
            "callee",
            m.version + cseq,
            self.rtp_addr(),
            &[(m.pt, self.codec)],
            m.dtmf_pt,
            direction,
        );
        let head = |method: &str, branch: &str, body: &str| {
            let ctype = if body.is_empty() {
                ""
            } else {
                "Content-Type: application/sdp\r\n"
            };
            format!(
                "{method} {request_uri} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch={branch};rport\r\nMax-Forwards: 70\r\nFrom: {};tag={}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {cseq} {method}\r\nContact: <sip:callee@{local}>\r\n{route_headers}{ctype}Content-Length: {}\r\n\r\n{body}",
                leg.invite.header("To").unwrap_or_default(),
                leg.to_tag,
                leg.invite.header("From").unwrap_or_default(),
                leg.call_id,
                body.len()
            )
        };
        let invite = head("INVITE", &branch(), &body);
        let call_id = leg.call_id.clone();
        let mut rx = self.state.subscribe();
        let deadline = tokio::time::Instant::now() + TIMER_H;
        let mut interval = T1;
        let answer = loop {
            self.sip
                .send_to(invite.as_bytes(), target)
                .await
                .map_err(|e| e.to_string())?;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let got = tokio::time::timeout(
                interval.min(left),
                rx.wait_for(|s| {
                    s.leg(&call_id)
                        .is_some_and(|l| l.reinvite_reply.as_ref().is_some_and(|r| r.0 == cseq))
                }),
            )
            .await;
            if let Ok(Ok(state)) = got {
                break state
                    .leg(&call_id)
                    .and_then(|l| l.reinvite_reply.clone())
                    .map(|r| r.1)
                    .ok_or("re-INVITE answer lost")?;
            }
            if left <= interval {
                return Err(format!(
                    "no answer to re-INVITE (sent to {target}) within 32 s"
                ));
            }
            interval = (interval * 2).min(T2);
        };
        if answer.status().is_some_and(|c| (200..300).contains(&c)) {
            let ack = head("ACK", &branch(), "");
            self.sip
                .send_to(ack.as_bytes(), target)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(answer)
    }

    fn current_leg(&self) -> Option<Leg> {
        let call_id = self.current.as_deref()?;
        self.state.borrow().leg(call_id).cloned()
    }

    fn with_leg(&self, f: impl FnOnce(&mut Leg)) {
        if let Some(call_id) = self.current.as_deref() {
            self.state.send_modify(|s| {
                if let Some(l) = s.leg_mut(call_id) {
                    f(l)
                }
            });
        }
    }

    fn media(&self) -> Option<(SocketAddr, Media)> {
        let leg = self.current_leg()?;
        Some((leg.remote_rtp?, leg.media?))
    }

    /// Send audio in 20 ms packets paced by the clock, in the negotiated codec, to the RTP
    /// address of the (latest) offer. Works once an INVITE with an acceptable offer was taken.
    pub async fn send_audio(&mut self, samples: &[i16]) {
        let (to, media) = self
            .media()
            .expect("send_audio before an INVITE with a usable offer was taken");
        self.out.send_audio(to, self.codec, media.pt, samples).await;
    }

    /// One RFC 4733 event on the offer's telephone-event payload type (101 if it had none).
    pub async fn send_dtmf(&mut self, digit: char, duration_ms: u32) {
        let (to, media) = self
            .media()
            .expect("send_dtmf before an INVITE with a usable offer was taken");
        let pt = media.dtmf_pt.unwrap_or(DEFAULT_DTMF_PT);
        self.out.send_dtmf(to, pt, digit, duration_ms).await;
    }

    /// Digits one after another, 100 ms each with an 80 ms gap.
    pub async fn send_digits(&mut self, digits: &str) {
        let (to, media) = self
            .media()
            .expect("send_digits before an INVITE with a usable offer was taken");
        let pt = media.dtmf_pt.unwrap_or(DEFAULT_DTMF_PT);
        self.out.send_digits(to, pt, digits).await;
    }

    fn audio_pt(&self) -> u8 {
        self.media().map_or(self.codec.pt(), |(_, m)| m.pt)
    }

    /// Audio packets received so far (the negotiated payload type), in arrival order.
    pub fn audio_packets(&self) -> Vec<Received> {
        let pt = self.audio_pt();
        self.received
            .lock()
            .map(|r| r.iter().filter(|p| p.pt == pt).cloned().collect())
            .unwrap_or_default()
    }

    /// The audio received so far, decoded to 8 kHz samples.
    pub fn received_audio(&self) -> Vec<i16> {
        decode_audio(&self.audio_packets(), self.codec, self.audio_pt())
    }

    /// RFC 4733 digits received so far, once per event.
    pub fn received_digits(&self) -> String {
        let pt = self
            .media()
            .and_then(|(_, m)| m.dtmf_pt)
            .unwrap_or(DEFAULT_DTMF_PT);
        self.received
            .lock()
            .map(|r| dtmf_digits(&r, pt))
            .unwrap_or_default()
    }

    /// In-dialog requests received for the current call (BYE, re-INVITE, INFO...), once each.
    pub fn requests(&self) -> Vec<SipMessage> {
        self.current_leg().map(|l| l.requests).unwrap_or_default()
    }

    /// Whether the current INVITE's 200 or error response was ACKed.
    pub fn acked(&self) -> bool {
        self.current_leg().is_some_and(|l| l.acked())
    }
}

fn rtp_addr(rtp: &UdpSocket) -> SocketAddr {
    rtp.local_addr().expect("a bound socket")
}

/// Resend `text` to `to` at T1, 2·T1... (capped at T2) until `done` holds, for at most 32 s.
fn spawn_retransmit(
    sock: Arc<UdpSocket>,
    mut rx: watch::Receiver<State>,
    text: String,
    to: SocketAddr,
    done: impl Fn(&State) -> bool + Send + Sync + 'static,
) {
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + TIMER_H;
        let mut interval = T1;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            if let Ok(r) = tokio::time::timeout(interval.min(left), rx.wait_for(&done)).await {
                // Done, or the callee is gone.
                drop(r);
                return;
            }
            let _ = sock.send_to(text.as_bytes(), to).await;
            interval = (interval * 2).min(T2);
        }
    });
}

fn reason(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        180 => "Ringing",
        183 => "Session Progress",
        200 => "OK",
        404 => "Not Found",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        500 => "Server Internal Error",
        503 => "Service Unavailable",
        603 => "Decline",
        _ => "Response",
    }
}

/// A response to `req`: its Via (all), From, To (with our tag when given and none is there),
/// Call-ID, CSeq and Record-Route, our Contact, and an SDP body when given.
fn reply(
    req: &SipMessage,
    code: u16,
    to_tag: Option<&str>,
    local: SocketAddr,
    sdp: Option<&str>,
) -> String {
    let mut r = format!("SIP/2.0 {code} {}\r\n", reason(code));
    for (k, v) in &req.headers {
        let lk = k.to_ascii_lowercase();
        match lk.as_str() {
            "via" | "v" | "from" | "f" | "call-id" | "i" | "cseq" | "record-route" => {
                r.push_str(&format!("{k}: {v}\r\n"))
            }
            "to" | "t" => match to_tag {
                Some(tag) if tag_of(v).is_none() => r.push_str(&format!("{k}: {v};tag={tag}\r\n")),
                _ => r.push_str(&format!("{k}: {v}\r\n")),
            },
            _ => {}
        }
    }
    if code == 488 {
        r.push_str("Warning: 305 callee \"Incompatible media format\"\r\n");
    }
    if code > 100 && code < 300 {
        r.push_str(&format!("Contact: <sip:callee@{local}>\r\n"));
    }
    match sdp {
        Some(body) => r.push_str(&format!(
            "Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )),
        None => r.push_str("Content-Length: 0\r\n\r\n"),
    }
    r
}

fn tag_of(header: &str) -> Option<&str> {
    let after = header.rsplit_once('>').map_or(header, |(_, params)| params);
    after
        .split(';')
        .find_map(|p| p.trim().strip_prefix("tag="))
        .map(str::trim)
}

fn cseq_of(msg: &SipMessage) -> Option<(u32, String)> {
    let (n, method) = msg.header("CSeq")?.trim().split_once(' ')?;
    Some((n.trim().parse().ok()?, method.trim().to_string()))
}

fn top_branch(msg: &SipMessage) -> String {
    msg.header("Via")
        .and_then(|v| v.split(';').find_map(|p| p.trim().strip_prefix("branch=")))
        .unwrap_or_default()
        .to_string()
}

/// The URI inside a name-addr (`"x" <sip:a@b>;tag=1`) or a bare addr-spec.
fn uri_of(value: &str) -> &str {
    match (value.find('<'), value.find('>')) {
        (Some(a), Some(b)) if a < b => &value[a + 1..b],
        _ => value.split(';').next().unwrap_or(value).trim(),
    }
}

/// The host:port of a SIP URI with a numeric host and an explicit port.
fn host_port(uri: &str) -> Option<SocketAddr> {
    let rest = uri.strip_prefix("sip:")?;
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    host.split([';', '?']).next()?.parse().ok()
}

/// Everything on the SIP socket that needs no decision from the test.
async fn sip_loop(
    sock: Arc<UdpSocket>,
    state: Arc<watch::Sender<State>>,
    codec: Codec,
    rtp: SocketAddr,
) {
    let local = sock.local_addr().expect("a bound socket");
    let mut buf = vec![0u8; 65536];
    while let Ok((n, from)) = sock.recv_from(&mut buf).await {
        let Some(msg) = SipMessage::parse(&buf[..n]) else {
            continue;
        };
        let call_id = msg.header("Call-ID").unwrap_or_default().to_string();
        let Some((cseq, cseq_method)) = cseq_of(&msg) else {
            continue;
        };
        // (text, destination) to send once the state is updated, and a final response to
        // retransmit until the ACK with that CSeq number.
        let mut send: Vec<(String, SocketAddr)> = Vec::new();
        let mut retransmit: Option<(String, SocketAddr, u32)> = None;
        let method = msg.method().map(str::to_string);
        state.send_modify(|s| match method.as_deref() {
            None => {
                if cseq_method == "BYE" && msg.status().is_some_and(|c| c >= 200) {
                    if let Some(l) = s.leg_mut(&call_id) {
                        l.bye_reply.get_or_insert(msg.status().unwrap_or(0));
                    }
                }
                if cseq_method == "INVITE" && msg.status().is_some_and(|c| c >= 200) {
                    if let Some(l) = s.leg_mut(&call_id) {
                        l.reinvite_reply = Some((cseq, msg.clone()));
                    }
                }
            }
            Some("INVITE") => {
                let in_dialog = msg.header("To").and_then(tag_of).is_some();
                match s.leg_mut(&call_id) {
                    Some(l) if l.sent.iter().any(|(c, _)| *c == cseq) || l.cseq == cseq => {
                        // A retransmission: repeat the last response to it, if any yet.
                        if let Some((_, last)) = l.sent.iter().rev().find(|(c, _)| *c == cseq) {
                            send.push((last.clone(), from));
                        }
                    }
                    Some(l) if in_dialog && l.final_code == Some(200) => {
                        let offer = Sdp::parse(&msg.body);
                        let response = match (l.media.as_mut(), &offer) {
                            (Some(m), Some(o)) if o.pt_for(codec) == Some(m.pt) => {
                                m.version += 1;
                                if let Some(addr) = o.rtp.filter(|a| !a.ip().is_unspecified()) {
                                    l.remote_rtp = Some(addr);
                                }
                                let direction = match o.direction.as_str() {
                                    "sendonly" => "recvonly",
                                    "recvonly" => "sendonly",
                                    "inactive" => "inactive",
                                    _ => "sendrecv",
                                };
                                let body = sdp_body(
                                    "callee",
                                    m.version,
                                    rtp,
                                    &[(m.pt, codec)],
                                    m.dtmf_pt,
                                    direction,
                                );
                                reply(&msg, 200, None, local, Some(&body))
                            }
                            (Some(m), None) => {
                                let body = sdp_body(
                                    "callee",
                                    m.version,
                                    rtp,
                                    &[(m.pt, codec)],
                                    m.dtmf_pt,
                                    "sendrecv",
                                );
                                reply(&msg, 200, None, local, Some(&body))
                            }
                            _ => reply(&msg, 488, None, local, None),
                        };
                        l.sent.push((cseq, response.clone()));
                        l.requests.push(msg.clone());
                        send.push((response.clone(), from));
                        retransmit = Some((response, from, cseq));
                    }
                    _ => s.legs.push(Leg {
                        invite: msg.clone(),
                        source: from,
                        call_id: call_id.clone(),
                        cseq,
                        to_tag: format!("{:x}", rand_u64() as u32),
                        taken: false,
                        sent: Vec::new(),
                        final_code: None,
                        acks: Vec::new(),
                        cancel: None,
                        bye: None,
                        bye_reply: None,
                        reinvite_reply: None,
                        media: None,
                        remote_rtp: None,
                        requests: Vec::new(),
                        branches: Vec::new(),
                    }),
                }
            }
            Some("ACK") => {
                if let Some(l) = s.leg_mut(&call_id) {
                    if !l.acks.contains(&cseq) {
                        l.acks.push(cseq);
                    }
                }
            }
            Some("CANCEL") => match s.leg_mut(&call_id).filter(|l| l.cseq == cseq) {
                None => send.push((reply(&msg, 481, None, local, None), from)),
                Some(l) => {
                    send.push((reply(&msg, 200, Some(&l.to_tag), local, None), from));
                    l.cancel.get_or_insert_with(|| msg.clone());
                    if l.final_code.is_none() {
                        let terminated = reply(&l.invite, 487, Some(&l.to_tag), local, None);
                        l.final_code = Some(487);
                        l.sent.push((l.cseq, terminated.clone()));
                        send.push((terminated.clone(), l.source));
                        retransmit = Some((terminated, l.source, l.cseq));
                    }
                }
            },
            Some("OPTIONS") => {
                let mut ok = reply(&msg, 200, None, local, None);
                ok.insert_str(
                    ok.len() - "Content-Length: 0\r\n\r\n".len(),
                    "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, INFO\r\nAccept: application/sdp\r\n",
                );
                send.push((ok, from));
            }
            Some(other) => match s.leg_mut(&call_id) {
                None => send.push((reply(&msg, 481, None, local, None), from)),
                Some(l) => {
                    send.push((reply(&msg, 200, None, local, None), from));
                    let branch = top_branch(&msg);
                    if !l.branches.contains(&branch) {
                        l.branches.push(branch);
                        if other == "BYE" {
                            l.bye.get_or_insert_with(|| msg.clone());
                        }
                        l.requests.push(msg.clone());
                    }
                }
            },
        });
        for (text, to) in send {
            let _ = sock.send_to(text.as_bytes(), to).await;
        }
        if let Some((text, to, cseq)) = retransmit {
            let call_id = call_id.clone();
            spawn_retransmit(sock.clone(), state.subscribe(), text, to, move |s| {
                s.leg(&call_id).is_none_or(|l| l.acks.contains(&cseq))
            });
        }
    }
}
