//! An in-repo test caller: places a real SIP call over loopback with hand-written messages
//! (independent of callforge's own SIP stack), records every RTP packet it receives with its
//! arrival time, and sends RFC 4733 DTMF and G.711 audio. Analysis helpers decode what was
//! heard, cross-correlate it with a reference and measure pacing.
//!
//! [`Callee`] is its counterpart, the far end of a call: it answers one INVITE the way a
//! test tells it to (ring, early media, answer in PCMU or PCMA, reject, wait for CANCEL).

#![allow(dead_code)]

mod callee;
mod codec;
mod media;
mod rtp;
mod sdp;

// Each test crate uses a different part of the peers.
#[allow(unused_imports)]
pub use callee::{AcceptOpts, Callee, Invite, Outcome};
#[allow(unused_imports)]
pub use codec::{alaw_to_linear, linear_to_alaw, Codec};
#[allow(unused_imports)]
pub use media::{pcap_audio, pcap_rtp, read_wav, CapturedRtp, SIPP_G711A_PCAP};
#[allow(unused_imports)]
pub use rtp::{decode_audio, dtmf_digits, dtmf_events, DtmfEvent};
#[allow(unused_imports)]
pub use sdp::{sdp_body, Sdp};

use rtp::RtpOut;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::net::UdpSocket;

/// One RTP packet as it arrived.
#[derive(Debug, Clone)]
pub struct Received {
    /// When the recording task woke up with it.
    pub at: Instant,
    /// When the kernel queued it on our socket (`SO_TIMESTAMPNS`, time since the Unix
    /// epoch): on loopback, the moment the sender sent it, whatever our own scheduling.
    pub kernel_at: Option<Duration>,
    pub seq: u16,
    pub ts: u32,
    pub pt: u8,
    pub marker: bool,
    pub ssrc: u32,
    pub payload: Vec<u8>,
}

/// A SIP response or request as text, with the few fields tests need.
#[derive(Debug, Clone)]
pub struct SipMessage {
    pub first_line: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl SipMessage {
    pub fn parse(bytes: &[u8]) -> Option<SipMessage> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let mut lines = head.split("\r\n");
        let first_line = lines.next()?.to_string();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Some(SipMessage {
            first_line,
            headers,
            body: body.to_string(),
        })
    }

    pub fn status(&self) -> Option<u16> {
        let mut parts = self.first_line.split(' ');
        if parts.next()? != "SIP/2.0" {
            return None;
        }
        parts.next()?.parse().ok()
    }

    pub fn method(&self) -> Option<&str> {
        (!self.first_line.starts_with("SIP/2.0")).then(|| self.first_line.split(' ').next())?
    }

    /// A header by full or compact name, case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        let compact = match name.to_ascii_lowercase().as_str() {
            "to" => "t",
            "from" => "f",
            "call-id" => "i",
            "via" => "v",
            "contact" => "m",
            "content-length" => "l",
            "content-type" => "c",
            _ => "",
        };
        self.headers
            .iter()
            .find(|(k, _)| {
                k.eq_ignore_ascii_case(name)
                    || (!compact.is_empty() && k.eq_ignore_ascii_case(compact))
            })
            .map(|(_, v)| v.as_str())
    }

    /// The RTP address an SDP body offers or answers.
    pub fn sdp_rtp_addr(&self) -> Option<SocketAddr> {
        let ip = self
            .body
            .lines()
            .find_map(|l| l.strip_prefix("c=IN IP4 "))?
            .trim();
        let port = self
            .body
            .lines()
            .find_map(|l| l.strip_prefix("m=audio "))?
            .split(' ')
            .next()?;
        format!("{ip}:{port}").parse().ok()
    }
}

/// A call placed by the test caller.
pub struct Call {
    sip: Arc<UdpSocket>,
    pub server: SocketAddr,
    pub call_id: String,
    from_tag: String,
    pub to_header: String,
    cseq: u32,
    rtp: Arc<UdpSocket>,
    pub remote_rtp: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    /// Requests the server sent us in the dialog (BYE, INFO...), already answered with 200.
    pub requests: Arc<Mutex<Vec<SipMessage>>>,
    pub answer: SipMessage,
    /// The codec the answer chose among those offered, and its payload type.
    pub codec: Codec,
    pub audio_pt: u8,
    out: RtpOut,
    dtmf_pt: u8,
}

const DTMF_PT: u8 = 101;

pub(crate) fn branch() -> String {
    format!("z9hG4bK{:016x}", rand_u64())
}

pub(crate) fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

impl Call {
    /// INVITE `to_user` at `server` offering PCMU + telephone-event/101; returns once the
    /// call is answered (200 received, ACK sent). Provisional responses are recorded.
    pub async fn place(server: SocketAddr, to_user: &str) -> Result<Call, String> {
        Self::place_with(server, to_user, &[]).await
    }

    pub async fn place_with(
        server: SocketAddr,
        to_user: &str,
        extra_headers: &[(&str, &str)],
    ) -> Result<Call, String> {
        Self::place_offering(server, to_user, &[Codec::Pcmu], extra_headers).await
    }

    /// Like [`Call::place_with`], offering `codecs` in that order (plus telephone-event/101):
    /// `&[Codec::Pcma]` makes callforge's two legs of a bridge negotiate different codecs.
    /// Audio is then sent, and [`Call::received_audio`] decoded, in the codec the answer chose.
    pub async fn place_offering(
        server: SocketAddr,
        to_user: &str,
        codecs: &[Codec],
        extra_headers: &[(&str, &str)],
    ) -> Result<Call, String> {
        let sip = Arc::new(
            UdpSocket::bind("127.0.0.1:0")
                .await
                .map_err(|e| e.to_string())?,
        );
        let rtp = Arc::new(
            UdpSocket::bind("127.0.0.1:0")
                .await
                .map_err(|e| e.to_string())?,
        );
        let local = sip.local_addr().map_err(|e| e.to_string())?;
        let rtp_addr = rtp.local_addr().map_err(|e| e.to_string())?;
        // Record from the start: early media (after a 183) arrives before the answer.
        let received = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(record_rtp(rtp.clone(), received.clone()));
        let call_id = format!("{:x}@test-caller", rand_u64());
        let from_tag = format!("{:x}", rand_u64() as u32);
        let offered: Vec<(u8, Codec)> = codecs.iter().map(|&c| (c.pt(), c)).collect();
        let sdp = sdp_body("caller", 1, rtp_addr, &offered, Some(DTMF_PT), "sendrecv");
        let extra: String = extra_headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        let invite = format!(
            "INVITE sip:{to_user}@{server} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch={};rport\r\nMax-Forwards: 70\r\nFrom: <sip:caller@{local}>;tag={from_tag}\r\nTo: <sip:{to_user}@{server}>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:caller@{local}>\r\n{extra}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
            branch(),
            sdp.len()
        );
        let mut buf = vec![0u8; 65536];
        let mut answer = None;
        // Retransmit the INVITE like a UAC would (T1 = 500 ms) until something answers.
        'send: for attempt in 0..7 {
            sip.send_to(invite.as_bytes(), server)
                .await
                .map_err(|e| e.to_string())?;
            let wait = Duration::from_millis(500 << attempt.min(3));
            let until = Instant::now() + wait;
            loop {
                let left = until.saturating_duration_since(Instant::now());
                let Ok(r) = tokio::time::timeout(left, sip.recv_from(&mut buf)).await else {
                    continue 'send;
                };
                let (n, _) = r.map_err(|e| e.to_string())?;
                let Some(msg) = SipMessage::parse(&buf[..n]) else {
                    continue;
                };
                match msg.status() {
                    Some(s) if s < 200 => {
                        // Provisional: stop retransmitting, wait longer for the final answer.
                        let final_msg = Self::await_final(&sip, &mut buf).await?;
                        answer = Some(final_msg);
                        break 'send;
                    }
                    Some(_) => {
                        answer = Some(msg);
                        break 'send;
                    }
                    None => continue,
                }
            }
        }
        let answer = answer.ok_or("no answer to INVITE")?;
        let status = answer.status().unwrap_or(0);
        let to_header = answer.header("To").unwrap_or_default().to_string();
        // ACK (for a non-2xx too, so the server's transaction ends).
        let ack = format!(
            "ACK sip:{to_user}@{server} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch={};rport\r\nMax-Forwards: 70\r\nFrom: <sip:caller@{local}>;tag={from_tag}\r\nTo: {to_header}\r\nCall-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
            branch()
        );
        sip.send_to(ack.as_bytes(), server)
            .await
            .map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("call not answered: {}", answer.first_line));
        }
        let remote_rtp = answer
            .sdp_rtp_addr()
            .ok_or("200 OK without an SDP answer")?;
        let answer_sdp = Sdp::parse(&answer.body).ok_or("200 OK without an SDP answer")?;
        let (codec, audio_pt) = answer_sdp
            .first_codec()
            .filter(|(c, _)| codecs.contains(c))
            .ok_or_else(|| {
                format!(
                    "the answer chose none of the offered codecs: {}",
                    answer_sdp.m_line()
                )
            })?;
        let dtmf_pt = answer_sdp.telephone_event().unwrap_or(DTMF_PT);
        let requests = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(answer_requests(sip.clone(), requests.clone()));
        Ok(Call {
            sip,
            server,
            call_id,
            from_tag,
            to_header,
            cseq: 1,
            out: RtpOut::new(rtp.clone()),
            rtp,
            remote_rtp,
            received,
            requests,
            answer,
            codec,
            audio_pt,
            dtmf_pt,
        })
    }

    async fn await_final(sip: &UdpSocket, buf: &mut [u8]) -> Result<SipMessage, String> {
        let until = Instant::now() + Duration::from_secs(32);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let (n, _) = tokio::time::timeout(left, sip.recv_from(buf))
                .await
                .map_err(|_| "no final response within 32 s".to_string())?
                .map_err(|e| e.to_string())?;
            if let Some(msg) = SipMessage::parse(&buf[..n]) {
                if msg.status().is_some_and(|s| s >= 200) {
                    return Ok(msg);
                }
            }
        }
    }

    /// Send audio in 20 ms packets, paced by the clock, in the negotiated codec.
    pub async fn send_audio(&mut self, samples: &[i16]) {
        self.out
            .send_audio(self.remote_rtp, self.codec, self.audio_pt, samples)
            .await;
    }

    /// One RFC 4733 event: start with marker, updates every 20 ms, three end packets.
    pub async fn send_dtmf(&mut self, digit: char, duration_ms: u32) {
        self.out
            .send_dtmf(self.remote_rtp, self.dtmf_pt, digit, duration_ms)
            .await;
    }

    /// Send digits one after another with a gap between presses.
    pub async fn send_digits(&mut self, digits: &str) {
        for d in digits.chars() {
            self.send_dtmf(d, 100).await;
            tokio::time::sleep(Duration::from_millis(80)).await;
        }
    }

    /// Hang up with BYE and wait for its 200.
    pub async fn bye(&mut self) -> Result<u16, String> {
        self.cseq += 1;
        let local = self.sip.local_addr().map_err(|e| e.to_string())?;
        let bye = format!(
            "BYE sip:{}@{} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch={};rport\r\nMax-Forwards: 70\r\nFrom: <sip:caller@{local}>;tag={}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {} BYE\r\nContent-Length: 0\r\n\r\n",
            "callforge", self.server, branch(), self.from_tag, self.to_header, self.call_id, self.cseq
        );
        self.sip
            .send_to(bye.as_bytes(), self.server)
            .await
            .map_err(|e| e.to_string())?;
        // The background task answers requests; responses land in `requests` too.
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Some(code) = self
                .requests
                .lock()
                .map_err(|e| e.to_string())?
                .iter()
                .find(|m| {
                    m.status().is_some() && m.header("CSeq").is_some_and(|c| c.ends_with("BYE"))
                })
                .and_then(SipMessage::status)
            {
                return Ok(code);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err("no answer to BYE".into())
    }

    /// re-INVITE offering our media with `direction` ("sendonly" or "inactive" to hold,
    /// "sendrecv" to resume); returns the final response, ACKed if it is a 2xx.
    pub async fn reinvite(&mut self, direction: &str) -> Result<SipMessage, String> {
        self.cseq += 1;
        let cseq = self.cseq;
        let local = self.sip.local_addr().map_err(|e| e.to_string())?;
        let rtp_addr = self.rtp.local_addr().map_err(|e| e.to_string())?;
        let sdp = sdp_body(
            "caller",
            cseq,
            rtp_addr,
            &[(self.audio_pt, self.codec)],
            Some(self.dtmf_pt),
            direction,
        );
        let invite = format!(
            "INVITE sip:callforge@{} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch={};rport\r\nMax-Forwards: 70\r\nFrom: <sip:caller@{local}>;tag={}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {cseq} INVITE\r\nContact: <sip:caller@{local}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
            self.server,
            branch(),
            self.from_tag,
            self.to_header,
            self.call_id,
            sdp.len()
        );
        self.sip
            .send_to(invite.as_bytes(), self.server)
            .await
            .map_err(|e| e.to_string())?;
        let until = Instant::now() + Duration::from_secs(5);
        let want = format!("{cseq} INVITE");
        while Instant::now() < until {
            let done = self
                .requests
                .lock()
                .map_err(|e| e.to_string())?
                .iter()
                .find(|m| {
                    m.status().is_some_and(|s| s >= 200)
                        && m.header("CSeq").is_some_and(|c| c.trim() == want)
                })
                .cloned();
            if let Some(resp) = done {
                if resp.status().is_some_and(|s| s < 300) {
                    let ack = format!(
                        "ACK sip:callforge@{} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch={};rport\r\nMax-Forwards: 70\r\nFrom: <sip:caller@{local}>;tag={}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {cseq} ACK\r\nContent-Length: 0\r\n\r\n",
                        self.server,
                        branch(),
                        self.from_tag,
                        self.to_header,
                        self.call_id
                    );
                    self.sip
                        .send_to(ack.as_bytes(), self.server)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                return Ok(resp);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err("no final answer to the re-INVITE".into())
    }

    /// Wait until the server sends BYE (answered 200 by the background task).
    pub async fn wait_for_bye(&self, within: Duration) -> Option<SipMessage> {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if let Some(bye) = self
                .requests
                .lock()
                .ok()?
                .iter()
                .find(|m| m.method() == Some("BYE"))
                .cloned()
            {
                return Some(bye);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// The caller's RTP socket, for a test that builds and times its own packets (sent to
    /// [`Call::remote_rtp`]); what arrives on it is still recorded in [`Call::received`].
    pub fn rtp_socket(&self) -> &Arc<UdpSocket> {
        &self.rtp
    }

    /// Audio packets received so far (the negotiated payload type: 0 unless the call was
    /// placed offering another codec), in arrival order.
    pub fn audio_packets(&self) -> Vec<Received> {
        self.received
            .lock()
            .map(|r| {
                r.iter()
                    .filter(|p| p.pt == self.audio_pt)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The audio received so far, decoded from the negotiated codec to 8 kHz samples.
    pub fn received_audio(&self) -> Vec<i16> {
        decode_audio(&self.audio_packets(), self.codec, self.audio_pt)
    }

    /// The RFC 4733 digits received so far (on the answer's telephone-event payload type),
    /// once per event.
    pub fn received_digits(&self) -> String {
        self.received
            .lock()
            .map(|r| dtmf_digits(&r, self.dtmf_pt))
            .unwrap_or_default()
    }
}

pub(crate) async fn record_rtp(sock: Arc<UdpSocket>, into: Arc<Mutex<Vec<Received>>>) {
    enable_kernel_timestamps(&sock);
    let mut buf = vec![0u8; 2048];
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        let (n, kernel_at) = match sock.try_io(tokio::io::Interest::READABLE, || {
            recv_stamped(&sock, &mut buf)
        }) {
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        };
        let at = Instant::now();
        let p = &buf[..n];
        if n < 12 || p[0] >> 6 != 2 {
            continue;
        }
        let cc = (p[0] & 0x0f) as usize;
        let start = 12 + 4 * cc;
        if n < start {
            continue;
        }
        let packet = Received {
            at,
            kernel_at,
            marker: p[1] & 0x80 != 0,
            pt: p[1] & 0x7f,
            seq: u16::from_be_bytes([p[2], p[3]]),
            ts: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
            ssrc: u32::from_be_bytes([p[8], p[9], p[10], p[11]]),
            payload: p[start..].to_vec(),
        };
        if let Ok(mut r) = into.lock() {
            r.push(packet);
        }
    }
}

/// Asks the kernel to stamp every datagram the socket receives (best effort).
fn enable_kernel_timestamps(sock: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and an int option of the right size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// One datagram into `buf`, with the kernel's receive stamp when there is one.
fn recv_stamped(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, Option<Duration>)> {
    use std::os::fd::AsRawFd;
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: the socket is valid and `msg` describes live buffers.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: the CMSG macros walk the control buffer the kernel filled, within its length.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                stamp = Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, stamp))
}

/// Answer in-dialog requests from the server with 200 and keep every message received.
async fn answer_requests(sock: Arc<UdpSocket>, into: Arc<Mutex<Vec<SipMessage>>>) {
    let mut buf = vec![0u8; 65536];
    while let Ok((n, from)) = sock.recv_from(&mut buf).await {
        let Some(msg) = SipMessage::parse(&buf[..n]) else {
            continue;
        };
        if msg.method().is_some() && msg.method() != Some("ACK") {
            let mut reply = String::from("SIP/2.0 200 OK\r\n");
            for (k, v) in &msg.headers {
                let lk = k.to_ascii_lowercase();
                if matches!(
                    lk.as_str(),
                    "via" | "v" | "from" | "f" | "to" | "t" | "call-id" | "i" | "cseq"
                ) {
                    reply.push_str(&format!("{k}: {v}\r\n"));
                }
            }
            reply.push_str("Content-Length: 0\r\n\r\n");
            let _ = sock.send_to(reply.as_bytes(), from).await;
        }
        if let Ok(mut r) = into.lock() {
            r.push(msg);
        }
    }
}

/// G.711 µ-law, written here from the standard so the caller does not trust callforge's codec.
pub fn linear_to_ulaw(sample: i16) -> u8 {
    const BIAS: i32 = 0x84;
    const CLIP: i32 = 32635;
    let mut s = sample as i32;
    let sign = if s < 0 { 0x80 } else { 0 };
    if s < 0 {
        s = -s;
    }
    s = s.min(CLIP) + BIAS;
    let mut exponent = 7;
    let mut mask = 0x4000;
    while exponent > 0 && s & mask == 0 {
        exponent -= 1;
        mask >>= 1;
    }
    let mantissa = (s >> (exponent + 3)) & 0x0f;
    !(sign | (exponent << 4) | mantissa) as u8
}

pub fn ulaw_to_linear(code: u8) -> i16 {
    let u = !code;
    let sign = u & 0x80;
    let exponent = ((u >> 4) & 0x07) as i32;
    let mantissa = (u & 0x0f) as i32;
    let magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
    if sign != 0 {
        -magnitude as i16
    } else {
        magnitude as i16
    }
}

/// Decode µ-law packets in sequence order (duplicates dropped).
pub fn decode_ulaw(packets: &[Received]) -> Vec<i16> {
    let mut sorted: Vec<&Received> = packets.iter().collect();
    sorted.sort_by_key(|p| p.seq);
    sorted.dedup_by_key(|p| p.seq);
    sorted
        .iter()
        .flat_map(|p| p.payload.iter().map(|&c| ulaw_to_linear(c)))
        .collect()
}

/// The best normalised cross-correlation of `reference` inside `heard`, and its offset.
///
/// Speech correlates in a peak a few samples wide, so a coarse sample-step search would miss
/// it: candidates come from correlating 5 ms energy envelopes, then each is searched sample
/// by sample.
pub fn best_correlation(heard: &[i16], reference: &[i16]) -> (f64, usize) {
    const BLOCK: usize = 40;
    if reference.len() < BLOCK || heard.len() < reference.len() {
        return (0.0, 0);
    }
    let envelope = |x: &[i16]| -> Vec<f64> {
        x.chunks(BLOCK)
            .map(|c| c.iter().map(|&s| (s as f64).abs()).sum::<f64>() / c.len() as f64)
            .collect()
    };
    let normalised = |a: &[f64], b: &[f64]| {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let (ea, eb) = (
            a.iter().map(|x| x * x).sum::<f64>().sqrt(),
            b.iter().map(|x| x * x).sum::<f64>().sqrt(),
        );
        if ea == 0.0 || eb == 0.0 {
            0.0
        } else {
            dot / (ea * eb)
        }
    };
    let (h_env, r_env) = (
        envelope(heard),
        envelope(&reference[..reference.len() / BLOCK * BLOCK]),
    );
    let mut candidates: Vec<(f64, usize)> = (0..=h_env.len().saturating_sub(r_env.len()))
        .map(|b| {
            // Envelopes are all positive: centre them so silence does not correlate with speech.
            let h = &h_env[b..b + r_env.len()];
            let (mh, mr) = (
                h.iter().sum::<f64>() / h.len() as f64,
                r_env.iter().sum::<f64>() / r_env.len() as f64,
            );
            let hc: Vec<f64> = h.iter().map(|x| x - mh).collect();
            let rc: Vec<f64> = r_env.iter().map(|x| x - mr).collect();
            (normalised(&hc, &rc), b)
        })
        .collect();
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
    let r: Vec<f64> = reference.iter().map(|&x| x as f64).collect();
    let last = heard.len() - reference.len();
    let mut best = (0.0, 0);
    for &(_, b) in candidates.iter().take(8) {
        let lo = (b * BLOCK).saturating_sub(2 * BLOCK);
        let hi = (b * BLOCK + 2 * BLOCK).min(last);
        for off in lo..=hi {
            let h: Vec<f64> = heard[off..off + r.len()]
                .iter()
                .map(|&x| x as f64)
                .collect();
            let score = normalised(&h, &r);
            if score > best.0 {
                best = (score, off);
            }
        }
    }
    best
}

/// Mean and p99 of the intervals between consecutive arrivals, in milliseconds.
pub fn pacing_ms(packets: &[Received]) -> (f64, f64) {
    let mut gaps: Vec<f64> = packets
        .windows(2)
        .map(|w| (w[1].at - w[0].at).as_secs_f64() * 1000.0)
        .collect();
    if gaps.is_empty() {
        return (0.0, 0.0);
    }
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    gaps.sort_by(|a, b| a.total_cmp(b));
    let p99 = gaps[((gaps.len() - 1) as f64 * 0.99) as usize];
    (mean, p99)
}

/// A test tone: a sum of sines at 8 kHz (a recognisable reference for correlation).
pub fn tone(freqs: &[f64], ms: usize, amplitude: f64) -> Vec<i16> {
    (0..ms * 8)
        .map(|i| {
            let t = i as f64 / 8000.0;
            let v: f64 = freqs
                .iter()
                .map(|f| (2.0 * std::f64::consts::PI * f * t).sin())
                .sum();
            (v / freqs.len() as f64 * amplitude) as i16
        })
        .collect()
}
