//! RTP both peers share: a paced sender of G.711 audio and RFC 4733 events, and the analysis
//! of what was received (audio in sequence, digits once per event).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::UdpSocket;

use super::{codec::Codec, rand_u64, Received};

/// The sending half of an RTP stream: sequence number, timestamp and SSRC carried across
/// audio and DTMF so the far end sees one continuous stream.
pub struct RtpOut {
    sock: Arc<UdpSocket>,
    seq: u16,
    ts: u32,
    ssrc: u32,
}

impl RtpOut {
    pub fn new(sock: Arc<UdpSocket>) -> RtpOut {
        RtpOut {
            sock,
            seq: 1000,
            ts: 16000,
            ssrc: rand_u64() as u32,
        }
    }

    fn header(&mut self, pt: u8, marker: bool, ts: u32) -> Vec<u8> {
        let mut h = vec![0x80, pt | if marker { 0x80 } else { 0 }];
        h.extend_from_slice(&self.seq.to_be_bytes());
        h.extend_from_slice(&ts.to_be_bytes());
        h.extend_from_slice(&self.ssrc.to_be_bytes());
        self.seq = self.seq.wrapping_add(1);
        h
    }

    /// Send audio in 20 ms packets paced by the clock (not by per-packet sleeps that drift),
    /// the first with the marker bit.
    pub async fn send_audio(&mut self, to: SocketAddr, codec: Codec, pt: u8, samples: &[i16]) {
        let start = tokio::time::Instant::now();
        for (i, frame) in samples.chunks(160).enumerate() {
            tokio::time::sleep_until(start + Duration::from_millis(20 * i as u64)).await;
            let ts = self.ts;
            let mut pkt = self.header(pt, i == 0, ts);
            pkt.extend(codec.encode(frame));
            self.ts = self.ts.wrapping_add(160);
            let _ = self.sock.send_to(&pkt, to).await;
        }
    }

    /// One RFC 4733 event: start with marker, updates every 20 ms, three end packets.
    pub async fn send_dtmf(&mut self, to: SocketAddr, pt: u8, digit: char, duration_ms: u32) {
        let Some(event) = dtmf_event(digit) else {
            return;
        };
        let ts = self.ts;
        let steps = (duration_ms / 20).max(1);
        let start = tokio::time::Instant::now();
        for i in 0..steps + 3 {
            let end = i >= steps;
            let duration = ((i.min(steps) + 1) * 160).min(steps * 160) as u16;
            let mut pkt = self.header(pt, i == 0, ts);
            pkt.push(event);
            pkt.push(if end { 0x80 | 10 } else { 10 });
            pkt.extend_from_slice(&duration.to_be_bytes());
            let _ = self.sock.send_to(&pkt, to).await;
            tokio::time::sleep_until(start + Duration::from_millis(20 * (i as u64 + 1))).await;
        }
        self.ts = self.ts.wrapping_add(steps * 160 + 160);
    }

    /// Digits one after another, 100 ms each with an 80 ms gap.
    pub async fn send_digits(&mut self, to: SocketAddr, pt: u8, digits: &str) {
        for d in digits.chars() {
            self.send_dtmf(to, pt, d, 100).await;
            tokio::time::sleep(Duration::from_millis(80)).await;
        }
    }
}

/// The RFC 4733 event code of a DTMF digit.
pub fn dtmf_event(digit: char) -> Option<u8> {
    match digit {
        '0'..='9' => Some(digit as u8 - b'0'),
        '*' => Some(10),
        '#' => Some(11),
        'A'..='D' => Some(12 + (digit as u8 - b'A')),
        _ => None,
    }
}

/// The DTMF digit of an RFC 4733 event code (16, flash, and above are not digits).
pub fn dtmf_digit(event: u8) -> Option<char> {
    match event {
        0..=9 => Some((b'0' + event) as char),
        10 => Some('*'),
        11 => Some('#'),
        12..=15 => Some((b'A' + event - 12) as char),
        _ => None,
    }
}

/// One telephone-event as received: all its packets (start, updates, the repeated end)
/// share an SSRC and an RTP timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DtmfEvent {
    pub digit: char,
    pub ts: u32,
    /// The longest duration reported, in timestamp units (8 per ms).
    pub duration: u16,
    /// Whether an end packet arrived.
    pub ended: bool,
}

/// The telephone-events among `packets` (payload type `pt`), one per event, in arrival order.
pub fn dtmf_events(packets: &[Received], pt: u8) -> Vec<DtmfEvent> {
    let mut events: Vec<(u32, DtmfEvent)> = Vec::new();
    for p in packets
        .iter()
        .filter(|p| p.pt == pt && p.payload.len() >= 4)
    {
        let Some(digit) = dtmf_digit(p.payload[0]) else {
            continue;
        };
        let ended = p.payload[1] & 0x80 != 0;
        let duration = u16::from_be_bytes([p.payload[2], p.payload[3]]);
        match events
            .iter_mut()
            .find(|(ssrc, e)| *ssrc == p.ssrc && e.ts == p.ts && e.digit == digit)
        {
            Some((_, e)) => {
                e.duration = e.duration.max(duration);
                e.ended |= ended;
            }
            None => events.push((
                p.ssrc,
                DtmfEvent {
                    digit,
                    ts: p.ts,
                    duration,
                    ended,
                },
            )),
        }
    }
    events.into_iter().map(|(_, e)| e).collect()
}

/// The digits among `packets`, once per event.
pub fn dtmf_digits(packets: &[Received], pt: u8) -> String {
    dtmf_events(packets, pt).iter().map(|e| e.digit).collect()
}

/// Decode the audio packets of payload type `pt` as `codec`, in sequence order.
///
/// Packets are taken in runs of one SSRC (a relay may switch source mid-call); inside a run
/// sequence numbers are unwrapped past 65535, sorted, and duplicates dropped.
pub fn decode_audio(packets: &[Received], codec: Codec, pt: u8) -> Vec<i16> {
    let mut out = Vec::new();
    let audio: Vec<&Received> = packets.iter().filter(|p| p.pt == pt).collect();
    let mut start = 0;
    while start < audio.len() {
        let ssrc = audio[start].ssrc;
        let end = audio[start..]
            .iter()
            .position(|p| p.ssrc != ssrc)
            .map_or(audio.len(), |n| start + n);
        let first = audio[start].seq;
        let mut run: Vec<(i64, &Received)> = audio[start..end]
            .iter()
            .map(|p| (p.seq.wrapping_sub(first) as i16 as i64, *p))
            .collect();
        run.sort_by_key(|(ext, _)| *ext);
        run.dedup_by_key(|(ext, _)| *ext);
        for (_, p) in run {
            out.extend(codec.decode(&p.payload));
        }
        start = end;
    }
    out
}
