//! DTMF: RFC 4733 telephone-event decoding and encoding, SIP INFO bodies, and one merged digit stream.
//!
//! # Receiving RFC 4733
//! [`DtmfDecoder`] reports a digit on the *first* packet it sees of an event, an event being
//! identified by (SSRC, RTP timestamp). Reporting at the start rather than the end makes
//! barge-in immediate and means an event whose end packets are all lost still yields its
//! digit. Later packets of the same event (updates, the end packet sent three times,
//! reordered stragglers) are recognised by their key and count for nothing. An event is
//! over when an end packet arrives, when a packet with a new timestamp arrives, or after
//! [`EVENT_TIMEOUT`] without packets. Two presses of the same key are two events with two
//! timestamps, so they count twice. Long events that the sender splits into segments
//! (RFC 4733 §2.5.1.3, over ~8 s) would count once per segment; nobody holds a key that long.
//!
//! # Sending RFC 4733
//! [`DtmfSender`] is driven by the session clock: each 20 ms tick it yields at most one
//! telephone-event payload. A digit is a start packet (marker set), updates every 20 ms with
//! a growing duration, then the end packet three times, all carrying the event's start
//! timestamp; [`INTER_DIGIT_GAP`] of ordinary audio separates digits. Every packet,
//! including the end retransmissions, takes a new RTP sequence number (receivers key on
//! the timestamp, and jitter buffers drop reused sequence numbers).
//!
//! # Merging sources
//! [`DtmfMerger`] takes digits from RFC 4733, SIP INFO and the in-band detector. A report is
//! a duplicate when the same digit was accepted from a *different* source within
//! [`MERGE_WINDOW`] and that press has not yet been reported by this source: it then joins
//! that press instead of making a new one. So a gateway that sends both RFC 4733 and the
//! tone in the audio yields one digit per press, while "55" pressed quickly still yields two.

use std::collections::VecDeque;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Without packets for this long, an RFC 4733 event is considered over.
pub const EVENT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Silence (ordinary audio) between two digits sent by [`DtmfSender`].
pub const INTER_DIGIT_GAP: Duration = Duration::from_millis(100);
/// Reports of one digit from different sources closer than this are one press.
pub const MERGE_WINDOW: Duration = Duration::from_millis(500);
/// Volume field (attenuation in dB below 0 dBm0) of events we send.
const SEND_VOLUME: u8 = 10;
/// RTP timestamp units per 20 ms frame at 8 kHz.
const TICK_UNITS: u32 = 160;
/// How many recently finished events are remembered to ignore stragglers.
const HISTORY: usize = 16;

/// Why a DTMF input was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DtmfError {
    /// Telephone-event payload shorter than 4 bytes.
    #[error("telephone-event payload is {0} bytes, expected at least 4")]
    ShortPayload(usize),
    /// An event code that is not a keypad key (e.g. 16 = flash, or tones).
    #[error("telephone-event code {0} is not a DTMF key")]
    NotAKey(u8),
    /// A character that is not `0-9*#A-D`.
    #[error("{0:?} is not a DTMF digit (0-9, *, #, A-D)")]
    BadDigit(char),
    /// No digits given to send.
    #[error("no DTMF digits to send")]
    NothingToSend,
    /// Duration outside 40..=5000 ms.
    #[error("DTMF duration {0} ms is outside 40..=5000 ms")]
    BadDuration(u128),
    /// A SIP INFO body without a usable signal.
    #[error("SIP INFO body has no DTMF signal: {0:?}")]
    BadInfoBody(String),
}

/// Where a digit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DtmfSource {
    /// RTP telephone-event packets.
    Rfc4733,
    /// A SIP INFO request.
    SipInfo,
    /// Tones detected in the received audio.
    InBand,
}

/// The RFC 4733 event code of a key.
pub fn digit_to_event(d: char) -> Result<u8, DtmfError> {
    match d.to_ascii_uppercase() {
        c @ '0'..='9' => Ok(c as u8 - b'0'),
        '*' => Ok(10),
        '#' => Ok(11),
        c @ 'A'..='D' => Ok(c as u8 - b'A' + 12),
        _ => Err(DtmfError::BadDigit(d)),
    }
}

/// The key of an RFC 4733 event code.
pub fn event_to_digit(e: u8) -> Result<char, DtmfError> {
    match e {
        0..=9 => Ok((b'0' + e) as char),
        10 => Ok('*'),
        11 => Ok('#'),
        12..=15 => Ok((b'A' + e - 12) as char),
        _ => Err(DtmfError::NotAKey(e)),
    }
}

/// One RFC 4733 telephone-event payload block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelephoneEvent {
    /// Event code (0-15 are keypad keys).
    pub event: u8,
    /// The E bit: this is (a retransmission of) the final packet.
    pub end: bool,
    /// Power level, dB below 0 dBm0.
    pub volume: u8,
    /// Duration so far in RTP timestamp units.
    pub duration: u16,
}

impl TelephoneEvent {
    /// Parses the first 4-byte block of a payload; redundant blocks after it are ignored.
    pub fn parse(payload: &[u8]) -> Result<Self, DtmfError> {
        match payload {
            [event, flags, d0, d1, ..] => Ok(TelephoneEvent {
                event: *event,
                end: flags & 0x80 != 0,
                volume: flags & 0x3F,
                duration: u16::from_be_bytes([*d0, *d1]),
            }),
            _ => Err(DtmfError::ShortPayload(payload.len())),
        }
    }

    /// The 4-byte wire form.
    pub fn to_bytes(self) -> [u8; 4] {
        let d = self.duration.to_be_bytes();
        let flags = (if self.end { 0x80 } else { 0 }) | (self.volume & 0x3F);
        [self.event, flags, d[0], d[1]]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EventKey {
    ssrc: u32,
    timestamp: u32,
}

/// Turns received telephone-event packets into one digit per key press.
#[derive(Debug, Default)]
pub struct DtmfDecoder {
    active: Option<(EventKey, char, Instant)>,
    finished: VecDeque<EventKey>,
}

impl DtmfDecoder {
    /// A decoder with no event in progress.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one telephone-event packet; returns the digit if it starts a new event.
    ///
    /// Non-key events (flash, tones) are refused with [`DtmfError::NotAKey`] and change nothing.
    pub fn on_packet(
        &mut self,
        now: Instant,
        ssrc: u32,
        timestamp: u32,
        payload: &[u8],
    ) -> Result<Option<char>, DtmfError> {
        let ev = TelephoneEvent::parse(payload)?;
        let digit = event_to_digit(ev.event)?;
        let key = EventKey { ssrc, timestamp };
        self.handle_timeout(now);
        if self.finished.contains(&key) {
            return Ok(None);
        }
        let fresh = match self.active {
            Some((k, _, _)) if k == key => false,
            Some((k, _, _)) => {
                self.finish(k);
                true
            }
            None => true,
        };
        if ev.end {
            self.active = None;
            self.finish(key);
        } else {
            self.active = Some((key, digit, now));
        }
        Ok(fresh.then_some(digit))
    }

    /// The digit of the event in progress, if one has not ended yet.
    pub fn active_digit(&self) -> Option<char> {
        self.active.map(|(_, d, _)| d)
    }

    /// When the event in progress will be timed out, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.active.map(|(_, _, last)| last + EVENT_TIMEOUT)
    }

    /// Ends the event in progress if it has been silent for [`EVENT_TIMEOUT`].
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some((k, _, last)) = self.active {
            if now.saturating_duration_since(last) >= EVENT_TIMEOUT {
                self.active = None;
                self.finish(k);
            }
        }
    }

    fn finish(&mut self, key: EventKey) {
        if !self.finished.contains(&key) {
            if self.finished.len() == HISTORY {
                self.finished.pop_front();
            }
            self.finished.push_back(key);
        }
    }
}

/// One telephone-event packet for the session to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventPacket {
    /// The 4-byte payload.
    pub payload: [u8; 4],
    /// RTP marker bit (set on the first packet of an event).
    pub marker: bool,
    /// RTP timestamp: the event's start, shared by all its packets.
    pub timestamp: u32,
}

#[derive(Debug, Clone)]
struct Sending {
    event: u8,
    start_ts: u32,
    /// Packets sent so far for this digit.
    sent: u32,
}

/// Produces RFC 4733 packets for queued digits, one call per 20 ms tick.
#[derive(Debug, Default)]
pub struct DtmfSender {
    queue: VecDeque<u8>,
    ticks_per_digit: u32,
    current: Option<Sending>,
    gap_left: u32,
}

impl DtmfSender {
    /// An idle sender.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues digits to send, each lasting `duration` (40..=5000 ms, rounded up to 20 ms).
    ///
    /// Validation is all-or-nothing: a bad digit queues none of them.
    pub fn queue(&mut self, digits: &str, duration: Duration) -> Result<(), DtmfError> {
        let ms = duration.as_millis();
        if !(40..=5000).contains(&ms) {
            return Err(DtmfError::BadDuration(ms));
        }
        let events = digits
            .chars()
            .filter(|c| !c.is_whitespace())
            .map(digit_to_event)
            .collect::<Result<Vec<_>, _>>()?;
        if events.is_empty() {
            return Err(DtmfError::NothingToSend);
        }
        // A new duration applies to the whole queue; mixing durations in flight is not needed.
        self.ticks_per_digit = (ms as u32).div_ceil(20);
        self.queue.extend(events);
        Ok(())
    }

    /// True when no digit is queued or in progress (gap included).
    pub fn is_idle(&self) -> bool {
        self.current.is_none() && self.queue.is_empty() && self.gap_left == 0
    }

    /// True while a digit's packets are being sent: the session sends them instead of audio.
    pub fn is_sending(&self) -> bool {
        self.current.is_some()
    }

    /// Drops queued digits; a digit in progress is finished properly so the peer sees its end.
    pub fn cancel_queued(&mut self) {
        self.queue.clear();
    }

    /// Called once per 20 ms tick with the session's current RTP timestamp; returns the
    /// telephone-event packet to send in place of audio, or `None` to send audio.
    pub fn tick(&mut self, rtp_timestamp: u32) -> Option<EventPacket> {
        if self.current.is_none() {
            if self.gap_left > 0 {
                self.gap_left -= 1;
                return None;
            }
            let event = self.queue.pop_front()?;
            self.current = Some(Sending {
                event,
                start_ts: rtp_timestamp,
                sent: 0,
            });
        }
        let ticks = self.ticks_per_digit;
        let cur = self.current.as_mut()?;
        cur.sent += 1;
        let n = cur.sent;
        // Packets 1..=ticks carry growing durations; the last of them and two more are ends.
        let end = n >= ticks;
        let duration = (ticks.min(n) * TICK_UNITS).min(u32::from(u16::MAX)) as u16;
        let pkt = EventPacket {
            payload: TelephoneEvent {
                event: cur.event,
                end,
                volume: SEND_VOLUME,
                duration,
            }
            .to_bytes(),
            marker: n == 1,
            timestamp: cur.start_ts,
        };
        if n >= ticks + 2 {
            self.current = None;
            self.gap_left = (INTER_DIGIT_GAP.as_millis() as u32).div_ceil(20);
        }
        Some(pkt)
    }
}

/// A digit parsed from a SIP INFO body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoDigit {
    /// The key.
    pub digit: char,
    /// Duration in ms, when the body gives one.
    pub duration_ms: Option<u32>,
}

fn signal_to_digit(s: &str) -> Option<char> {
    let s = s.trim();
    let mut chars = s.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => digit_to_event(c).ok().map(|_| c.to_ascii_uppercase()),
        // Some devices send the event code instead of the key (10 = *, 11 = #).
        _ => s.parse::<u8>().ok().and_then(|e| event_to_digit(e).ok()),
    }
}

/// Parses an `application/dtmf-relay` body (`Signal=5\r\nDuration=160`).
pub fn parse_dtmf_relay(body: &str) -> Result<InfoDigit, DtmfError> {
    let mut digit = None;
    let mut duration_ms = None;
    for line in body.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k.trim().to_ascii_lowercase().as_str() {
            "signal" => digit = signal_to_digit(v),
            "duration" => duration_ms = v.trim().parse().ok(),
            _ => {}
        }
    }
    digit
        .map(|digit| InfoDigit { digit, duration_ms })
        .ok_or_else(|| DtmfError::BadInfoBody(body.chars().take(64).collect()))
}

/// Parses an `application/dtmf` body: the key alone (or its event code).
pub fn parse_dtmf_body(body: &str) -> Result<InfoDigit, DtmfError> {
    signal_to_digit(body)
        .map(|digit| InfoDigit {
            digit,
            duration_ms: None,
        })
        .ok_or_else(|| DtmfError::BadInfoBody(body.chars().take(64).collect()))
}

/// Parses an INFO body by its Content-Type (`application/dtmf-relay` or `application/dtmf`).
pub fn parse_info(content_type: &str, body: &str) -> Result<InfoDigit, DtmfError> {
    let ct = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match ct.as_str() {
        "application/dtmf-relay" => parse_dtmf_relay(body),
        "application/dtmf" => parse_dtmf_body(body),
        _ => Err(DtmfError::BadInfoBody(format!("content type {ct}"))),
    }
}

#[derive(Debug)]
struct Press {
    digit: char,
    at: Instant,
    sources: Vec<DtmfSource>,
}

/// Merges digits from all sources of one call into one stream; see the module docs.
#[derive(Debug)]
pub struct DtmfMerger {
    window: Duration,
    recent: VecDeque<Press>,
}

impl Default for DtmfMerger {
    fn default() -> Self {
        Self::new(MERGE_WINDOW)
    }
}

impl DtmfMerger {
    /// A merger treating reports closer than `window` as one press.
    pub fn new(window: Duration) -> Self {
        DtmfMerger {
            window,
            recent: VecDeque::new(),
        }
    }

    /// Offers a digit; returns it if it is a new press, `None` if it duplicates one.
    pub fn offer(&mut self, now: Instant, source: DtmfSource, digit: char) -> Option<char> {
        let window = self.window;
        self.recent
            .retain(|p| now.saturating_duration_since(p.at) <= window);
        if let Some(p) = self
            .recent
            .iter_mut()
            .find(|p| p.digit == digit && !p.sources.contains(&source))
        {
            p.sources.push(source);
            return None;
        }
        self.recent.push_back(Press {
            digit,
            at: now,
            sources: vec![source],
        });
        Some(digit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: u8, end: bool, duration: u16) -> [u8; 4] {
        TelephoneEvent {
            event,
            end,
            volume: 10,
            duration,
        }
        .to_bytes()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn end_sent_three_times_counts_once() {
        let t0 = Instant::now();
        let mut d = DtmfDecoder::new();
        let mut out = Vec::new();
        for i in 0..5u16 {
            out.extend(
                d.on_packet(
                    t0 + ms(20 * i as u64),
                    1,
                    1000,
                    &ev(5, false, 160 * (i + 1)),
                )
                .unwrap(),
            );
        }
        for i in 0..3 {
            out.extend(
                d.on_packet(t0 + ms(100 + 20 * i), 1, 1000, &ev(5, true, 800))
                    .unwrap(),
            );
        }
        assert_eq!(out, vec!['5']);
        assert_eq!(d.active_digit(), None);
    }

    #[test]
    fn lost_end_packets_end_on_new_event_or_timeout() {
        let t0 = Instant::now();
        let mut d = DtmfDecoder::new();
        assert_eq!(
            d.on_packet(t0, 1, 1000, &ev(1, false, 160)).unwrap(),
            Some('1')
        );
        assert_eq!(d.active_digit(), Some('1'));
        // New timestamp: the first event is over, the new one counts.
        assert_eq!(
            d.on_packet(t0 + ms(200), 1, 3000, &ev(2, false, 160))
                .unwrap(),
            Some('2')
        );
        // A straggler of the first event does not bring it back.
        assert_eq!(
            d.on_packet(t0 + ms(210), 1, 1000, &ev(1, false, 320))
                .unwrap(),
            None
        );
        // The second event's ends are lost too: it times out.
        assert_eq!(d.poll_timeout(), Some(t0 + ms(200) + EVENT_TIMEOUT));
        d.handle_timeout(t0 + ms(200) + EVENT_TIMEOUT);
        assert_eq!(d.active_digit(), None);
        assert_eq!(d.poll_timeout(), None);
    }

    #[test]
    fn repeated_digit_counts_twice_and_start_loss_still_counts() {
        let t0 = Instant::now();
        let mut d = DtmfDecoder::new();
        let mut out = Vec::new();
        for (i, ts) in [(0u64, 8000u32), (300, 12000)] {
            // Start packet lost: first seen packet is an update, then the ends.
            out.extend(d.on_packet(t0 + ms(i), 7, ts, &ev(9, false, 320)).unwrap());
            for k in 0..3 {
                out.extend(
                    d.on_packet(t0 + ms(i + 40 + k), 7, ts, &ev(9, true, 640))
                        .unwrap(),
                );
            }
        }
        assert_eq!(out, vec!['9', '9']);
    }

    #[test]
    fn only_end_packets_still_count_once_and_ssrc_is_part_of_the_key() {
        let t0 = Instant::now();
        let mut d = DtmfDecoder::new();
        let mut out = Vec::new();
        for k in 0..3 {
            out.extend(d.on_packet(t0 + ms(k), 1, 500, &ev(11, true, 800)).unwrap());
        }
        // Same timestamp from another SSRC (e.g. after a re-INVITE) is another event.
        out.extend(
            d.on_packet(t0 + ms(50), 2, 500, &ev(10, false, 160))
                .unwrap(),
        );
        assert_eq!(out, vec!['#', '*']);
    }

    #[test]
    fn bad_payloads_are_typed_errors() {
        let mut d = DtmfDecoder::new();
        let t0 = Instant::now();
        assert_eq!(
            d.on_packet(t0, 1, 1, &[1, 2]),
            Err(DtmfError::ShortPayload(2))
        );
        assert_eq!(
            d.on_packet(t0, 1, 1, &ev(16, false, 1)),
            Err(DtmfError::NotAKey(16))
        );
        assert_eq!(d.on_packet(t0, 1, 1, &[]), Err(DtmfError::ShortPayload(0)));
    }

    #[test]
    fn sender_packet_sequence() {
        let mut s = DtmfSender::new();
        s.queue("1#", ms(100)).unwrap();
        let mut ts = 5000u32;
        let mut pkts = Vec::new();
        for _ in 0..40 {
            pkts.push((ts, s.tick(ts)));
            ts = ts.wrapping_add(160);
        }
        // Digit 1: 5 packets with growing duration, the 5th an end, then two more ends.
        let first: Vec<_> = pkts[..7].iter().map(|(_, p)| p.unwrap()).collect();
        assert!(first[0].marker);
        assert!(first[1..].iter().all(|p| !p.marker));
        assert!(first.iter().all(|p| p.timestamp == 5000));
        let parsed: Vec<_> = first
            .iter()
            .map(|p| TelephoneEvent::parse(&p.payload).unwrap())
            .collect();
        assert_eq!(
            parsed.iter().map(|e| e.duration).collect::<Vec<_>>(),
            vec![160, 320, 480, 640, 800, 800, 800]
        );
        assert_eq!(parsed.iter().filter(|e| e.end).count(), 3);
        assert!(parsed.iter().all(|e| e.event == 1 && e.volume == 10));
        // Gap of 100 ms (5 ticks) of audio, then '#' starting at that tick's timestamp.
        assert!(pkts[7..12].iter().all(|(_, p)| p.is_none()));
        let (ts_hash, p) = pkts[12];
        let p = p.unwrap();
        assert!(p.marker);
        assert_eq!(p.timestamp, ts_hash);
        assert_eq!(TelephoneEvent::parse(&p.payload).unwrap().event, 11);
        assert!(pkts[19..].iter().all(|(_, p)| p.is_none()));
        assert!(s.is_idle());
    }

    #[test]
    fn sender_output_decodes_to_the_same_digits() {
        let mut s = DtmfSender::new();
        s.queue("0123456789*#ABCD", ms(60)).unwrap();
        let mut d = DtmfDecoder::new();
        let t0 = Instant::now();
        let mut got = String::new();
        for i in 0..400u32 {
            if let Some(p) = s.tick(i * 160) {
                if let Some(c) = d
                    .on_packet(t0 + ms(20 * i as u64), 42, p.timestamp, &p.payload)
                    .unwrap()
                {
                    got.push(c);
                }
            }
        }
        assert_eq!(got, "0123456789*#ABCD");
    }

    #[test]
    fn sender_validates() {
        let mut s = DtmfSender::new();
        assert_eq!(s.queue("12x", ms(100)), Err(DtmfError::BadDigit('x')));
        assert!(s.is_idle());
        assert_eq!(s.queue("", ms(100)), Err(DtmfError::NothingToSend));
        assert_eq!(s.queue("1", ms(10)), Err(DtmfError::BadDuration(10)));
    }

    #[test]
    fn info_bodies() {
        assert_eq!(
            parse_info("application/dtmf-relay", "Signal=5\r\nDuration=160\r\n").unwrap(),
            InfoDigit {
                digit: '5',
                duration_ms: Some(160)
            }
        );
        assert_eq!(
            parse_dtmf_relay("signal= #\nduration=250").unwrap().digit,
            '#'
        );
        assert_eq!(parse_dtmf_relay("Signal=11\r\n").unwrap().digit, '#');
        assert_eq!(parse_dtmf_relay("Signal=10").unwrap().digit, '*');
        assert_eq!(
            parse_info("Application/DTMF; charset=x", "7\r\n")
                .unwrap()
                .digit,
            '7'
        );
        assert_eq!(parse_dtmf_body("d").unwrap().digit, 'D');
        assert!(parse_dtmf_relay("Duration=160").is_err());
        assert!(parse_dtmf_relay("Signal=x").is_err());
        assert!(parse_dtmf_body("").is_err());
        assert!(parse_info("text/plain", "5").is_err());
    }

    #[test]
    fn merger_dedupes_across_sources_but_not_repeats() {
        let t0 = Instant::now();
        let mut m = DtmfMerger::default();
        let mut out = String::new();
        let mut offer = |t: u64, s, d| {
            if let Some(c) = m.offer(t0 + ms(t), s, d) {
                out.push(c);
            }
        };
        // "55" pressed quickly, reported by RFC 4733 and leaked in-band.
        offer(0, DtmfSource::Rfc4733, '5');
        offer(45, DtmfSource::InBand, '5');
        offer(250, DtmfSource::Rfc4733, '5');
        offer(290, DtmfSource::InBand, '5');
        // A different digit from INFO close by is its own press.
        offer(300, DtmfSource::SipInfo, '6');
        // The same digit from another source long after the window is a new press.
        offer(2000, DtmfSource::SipInfo, '5');
        offer(2100, DtmfSource::Rfc4733, '5');
        offer(2700, DtmfSource::Rfc4733, '5');
        assert_eq!(out, "55655");
    }

    #[test]
    fn sipp_pcaps_each_yield_their_one_digit() {
        use crate::media::testutil::{sipp_dtmf_cases, FIXTURES};
        for (file, want) in sipp_dtmf_cases() {
            let bytes = std::fs::read(format!("{FIXTURES}/{file}")).unwrap();
            let packets = crate::media::testutil::udp_payloads(&bytes);
            assert_eq!(packets.len(), 10, "{file}");
            let mut d = DtmfDecoder::new();
            let t0 = Instant::now();
            let mut got = Vec::new();
            for (i, p) in packets.iter().enumerate() {
                let rtp = rtp_rs::RtpReader::new(p).unwrap();
                assert_eq!(rtp.payload_type(), 101);
                let r = d.on_packet(
                    t0 + ms(20 * i as u64),
                    rtp.ssrc(),
                    rtp.timestamp(),
                    rtp.payload(),
                );
                got.extend(r.unwrap());
            }
            assert_eq!(got, vec![want], "{file}");
            assert_eq!(d.active_digit(), None, "{file}: end packet seen");
        }
    }
}
