//! Sans-IO media session of one call: RTP out on a 20 ms clock, RTP in through a reorder window,
//! payload-type demux, latching, DTMF from every source, and the player.
//!
//! The driver (`rtp_socket.rs`, or a test with a fake clock) does four things:
//! feed datagrams to [`MediaSession::handle_input`], sleep until
//! [`MediaSession::poll_timeout`], send everything [`MediaSession::poll_transmit`] returns,
//! and hand [`MediaSession::poll_event`]s to the voice layer.
//!
//! # Decisions
//! - **Silence**: while nothing plays we keep sending G.711 silence frames. A continuous
//!   stream keeps NAT bindings open, lets the far end latch onto us, and keeps carriers'
//!   RTP-timeout hang-up timers quiet; comfort noise is not negotiated anyway. Only
//!   [`MediaSession::set_sending`]`(false)` (hold) stops the stream; the first packet after
//!   it carries the marker bit as the start of a new talk spurt.
//! - **Latching (symmetric RTP)**: the first valid packet with a negotiated payload type
//!   fixes the peer address; from then on we send there and drop packets from any other
//!   address ([`RtpError::ForeignSource`]), which stops stray or injected streams.
//!   [`MediaSession::update_remote`] (after a re-INVITE) sets a new SDP address and re-arms
//!   latching.
//! - **RTCP**: ignored. We send no SR/RR and discard RTCP, whether it arrives on port+1 (the
//!   socket driver binds and drains it so peers get no ICMP errors) or multiplexed on the RTP
//!   port. Call quality reporting is not a goal of an IVR engine, and carriers detect dead
//!   calls by RTP timeouts, which the continuous silence stream satisfies.
//! - **DTMF while sending**: telephone-event packets replace audio frames (the prompt is
//!   paused, not skipped), and use the same SSRC and sequence space.
//! - **Received audio** is released in sequence order as soon as possible (see `jitter.rs`);
//!   packets given up as lost are replaced by silence in the audio tap so recordings keep
//!   their real length.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::media::dtmf::{self, DtmfDecoder, DtmfError, DtmfMerger, DtmfSender, DtmfSource};
use crate::media::g711::G711;
use crate::media::goertzel::InbandDetector;
use crate::media::jitter::{Pushed, Released, ReorderBuffer, DEFAULT_CAPACITY, DEFAULT_MAX_WAIT};
use crate::media::player::{PlayFinished, PlayId, Player};
use crate::media::rtp::{
    FrameClock, RtpError, RtpPacket, RtpSender, StreamPosition, FRAME_SAMPLES,
};

/// Longest run of lost packets replaced by silence in the audio tap (1 s).
const MAX_CONCEALED_PACKETS: u64 = 50;

/// What the call negotiated, and a few knobs.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Peer address from the SDP (`c=` and `m=` lines).
    pub remote: SocketAddr,
    /// The negotiated G.711 variant we send.
    pub codec: G711,
    /// Its payload type number (normally 0 or 8).
    pub audio_pt: u8,
    /// Negotiated telephone-event payload type, if any.
    pub dtmf_pt: Option<u8>,
    /// Fixed SSRC; `None` picks a random one.
    pub ssrc: Option<u32>,
    /// Run the Goertzel detector on received audio.
    pub inband_dtmf: bool,
    /// How long a sequence gap may hold later packets.
    pub reorder_wait: Duration,
}

impl SessionConfig {
    /// Defaults for a codec: its static payload type, no telephone-event, in-band detection on.
    pub fn new(remote: SocketAddr, codec: G711) -> Self {
        SessionConfig {
            remote,
            codec,
            audio_pt: codec.static_payload_type(),
            dtmf_pt: None,
            ssrc: None,
            inband_dtmf: true,
            reorder_wait: DEFAULT_MAX_WAIT,
        }
    }
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub dest: SocketAddr,
    /// The RTP packet.
    pub data: Vec<u8>,
}

/// What the session reports to the voice layer.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaEvent {
    /// A key press, after merging all sources.
    Digit {
        /// The key.
        digit: char,
        /// The source that reported it first.
        source: DtmfSource,
    },
    /// A prompt ended.
    PlayFinished(PlayFinished),
    /// All digits queued with `send_dtmf` have been sent.
    DtmfSent,
    /// The session latched onto this peer address.
    Latched(SocketAddr),
    /// Received audio in order (only while the audio tap is on).
    Audio(Vec<i16>),
}

/// Errors of session commands.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    /// `send_dtmf` on a call without a negotiated telephone-event payload type.
    #[error("telephone-event was not negotiated for this call")]
    DtmfNotNegotiated,
    /// Bad digits or duration.
    #[error(transparent)]
    Dtmf(#[from] DtmfError),
}

/// Counters for logs and CDRs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RtpStats {
    /// Packets sent.
    pub sent: u64,
    /// Valid packets received and accepted.
    pub received: u64,
    /// Packets given up as lost.
    pub lost: u64,
    /// Duplicates and packets arriving after their turn.
    pub late_or_duplicate: u64,
    /// Datagrams that were not RTP.
    pub malformed: u64,
    /// Packets with a payload type that was not negotiated.
    pub unknown_pt: u64,
    /// RTCP datagrams ignored.
    pub rtcp_ignored: u64,
    /// Packets from other addresses after latching.
    pub foreign_source: u64,
}

/// One call's media state machine.
#[derive(Debug)]
pub struct MediaSession {
    cfg: SessionConfig,
    remote: SocketAddr,
    latched: bool,
    clock: FrameClock,
    tx: RtpSender,
    sending: bool,
    rx: ReorderBuffer<RtpPacket>,
    rx_ssrc: Option<u32>,
    last_rx_samples: usize,
    player: Player,
    dtmf_tx: DtmfSender,
    dtmf_tx_busy: bool,
    dtmf_rx: DtmfDecoder,
    inband: Option<InbandDetector>,
    merger: DtmfMerger,
    tap: bool,
    events: VecDeque<MediaEvent>,
    stats: RtpStats,
}

impl MediaSession {
    /// A session whose first frame is due at `now`.
    pub fn new(cfg: SessionConfig, now: Instant) -> Self {
        MediaSession {
            remote: cfg.remote,
            latched: false,
            clock: FrameClock::new(now),
            tx: RtpSender::new(cfg.ssrc),
            sending: true,
            rx: ReorderBuffer::new(cfg.reorder_wait, DEFAULT_CAPACITY),
            rx_ssrc: None,
            last_rx_samples: FRAME_SAMPLES,
            player: Player::new(),
            dtmf_tx: DtmfSender::new(),
            dtmf_tx_busy: false,
            dtmf_rx: DtmfDecoder::new(),
            inband: cfg.inband_dtmf.then(InbandDetector::new),
            merger: DtmfMerger::default(),
            tap: false,
            events: VecDeque::new(),
            stats: RtpStats::default(),
            cfg,
        }
    }

    // ---- commands from the voice layer ----

    /// Queues a prompt (8 kHz mono); `barge_in` lets the first digit stop it.
    pub fn play(&mut self, samples: Arc<[i16]>, barge_in: bool) -> PlayId {
        self.player.play(samples, barge_in)
    }

    /// Stops the current prompt and everything queued.
    pub fn stop_playback(&mut self) {
        self.player.stop();
    }

    /// True while a prompt is playing or queued.
    pub fn is_playing(&self) -> bool {
        self.player.is_playing()
    }

    /// Echoes received audio back after `delay`.
    pub fn start_echo(&mut self, delay: Duration) {
        self.player.start_echo(delay);
    }

    /// Stops echo.
    pub fn stop_echo(&mut self) {
        self.player.stop_echo();
    }

    /// Sends digits as RFC 4733 events, each lasting `duration`.
    pub fn send_dtmf(&mut self, digits: &str, duration: Duration) -> Result<(), SessionError> {
        if self.cfg.dtmf_pt.is_none() {
            return Err(SessionError::DtmfNotNegotiated);
        }
        self.dtmf_tx.queue(digits, duration)?;
        self.dtmf_tx_busy = true;
        Ok(())
    }

    /// Turns the [`MediaEvent::Audio`] tap on or off (for recording).
    pub fn set_audio_tap(&mut self, on: bool) {
        self.tap = on;
    }

    /// Stops (hold) or resumes sending RTP. The clock keeps running either way.
    pub fn set_sending(&mut self, on: bool) {
        if on && !self.sending {
            self.tx.begin_talkspurt();
        }
        self.sending = on;
    }

    /// A new SDP address for the peer (re-INVITE): send there and latch again.
    pub fn update_remote(&mut self, remote: SocketAddr) {
        self.remote = remote;
        self.latched = false;
    }

    /// A digit from a SIP INFO request with this Content-Type and body.
    pub fn handle_info(
        &mut self,
        now: Instant,
        content_type: &str,
        body: &str,
    ) -> Result<(), DtmfError> {
        let d = dtmf::parse_info(content_type, body)?;
        self.digit(now, DtmfSource::SipInfo, d.digit);
        Ok(())
    }

    // ---- sans-IO interface for the driver ----

    /// Where we currently send.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// Our SSRC.
    pub fn ssrc(&self) -> u32 {
        self.tx.ssrc()
    }

    /// Where our outgoing stream stands: a bridge's relay continues it from here.
    pub fn stream_position(&self) -> StreamPosition {
        StreamPosition {
            ssrc: self.tx.ssrc(),
            next_seq: self.tx.next_seq(),
            next_ts: self.tx.timestamp_of(self.clock.next_index()),
            due: self.clock.next_due(),
        }
    }

    /// Continues an outgoing stream someone else sent meanwhile (a bridge's relay): same
    /// SSRC, next sequence number, timestamps following the time that passed, first frame
    /// due at `now`. The receive side starts afresh, since the peer's stream moved on while
    /// the relay carried it.
    pub fn continue_stream(&mut self, pos: StreamPosition, now: Instant) {
        self.tx = RtpSender::continuing(&pos, now);
        self.clock = FrameClock::new(now);
        self.rx.reset();
    }

    /// When the next outgoing frame is due.
    pub fn next_frame_due(&self) -> Instant {
        self.clock.next_due()
    }

    /// Moves the send clock so the next frame is due at `at` (a ticker's grid); sequence
    /// numbers and timestamps continue unchanged.
    pub fn align_clock(&mut self, at: Instant) {
        self.clock.realign(at);
    }

    /// Whether [`poll_event`](Self::poll_event) has something.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty() || self.player.has_finished()
    }

    /// Counters so far.
    pub fn stats(&self) -> RtpStats {
        self.stats
    }

    /// Feeds one received datagram from `from`.
    pub fn handle_input(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
    ) -> Result<(), RtpError> {
        self.handle_timeout(now);
        let pkt = match RtpPacket::parse(data) {
            Ok(p) => p,
            Err(RtpError::Rtcp) => {
                self.stats.rtcp_ignored += 1;
                return Err(RtpError::Rtcp);
            }
            Err(e) => {
                self.stats.malformed += 1;
                return Err(e);
            }
        };
        if self.latched && from != self.remote {
            self.stats.foreign_source += 1;
            return Err(RtpError::ForeignSource);
        }
        if !self.is_known_pt(pkt.pt) {
            self.stats.unknown_pt += 1;
            return Err(RtpError::UnknownPayloadType(pkt.pt));
        }
        if !self.latched {
            self.latched = true;
            if from != self.remote {
                self.remote = from;
                self.events.push_back(MediaEvent::Latched(from));
            }
        }
        if self.rx_ssrc.is_some_and(|s| s != pkt.ssrc) {
            self.rx.reset();
        }
        self.rx_ssrc = Some(pkt.ssrc);
        match self.rx.push(now, pkt.seq, pkt) {
            Pushed::Accepted => {
                self.stats.received += 1;
                crate::metrics::metrics().rtp_packets_received.inc();
            }
            Pushed::Duplicate | Pushed::Late => self.stats.late_or_duplicate += 1,
        }
        self.drain_received(now);
        Ok(())
    }

    /// The next instant at which the session needs [`poll_transmit`](Self::poll_transmit).
    pub fn poll_timeout(&self) -> Instant {
        let mut t = self.clock.next_due();
        for other in [self.rx.poll_timeout(), self.dtmf_rx.poll_timeout()]
            .into_iter()
            .flatten()
        {
            t = t.min(other);
        }
        t
    }

    /// Runs timers due at `now` and returns the next packet to send, if any is due.
    /// Call until it returns `None`.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        self.handle_timeout(now);
        while let Some(n) = self.clock.poll(now) {
            if let Some(data) = self.frame(n) {
                self.stats.sent += 1;
                let m = crate::metrics::metrics();
                m.rtp_packets_sent.inc();
                m.rtp_paced(now.saturating_duration_since(self.clock.due(n)));
                return Some(Transmit {
                    dest: self.remote,
                    data,
                });
            }
        }
        None
    }

    /// Next event for the voice layer.
    pub fn poll_event(&mut self) -> Option<MediaEvent> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        self.player.poll_finished().map(MediaEvent::PlayFinished)
    }

    // ---- internals ----

    fn handle_timeout(&mut self, now: Instant) {
        self.dtmf_rx.handle_timeout(now);
        self.drain_received(now);
    }

    fn is_known_pt(&self, pt: u8) -> bool {
        pt == self.cfg.audio_pt
            || Some(pt) == self.cfg.dtmf_pt
            || G711::from_payload_type(pt).is_some()
    }

    fn frame(&mut self, n: u64) -> Option<Vec<u8>> {
        if !self.sending {
            return None;
        }
        let ts = self.tx.timestamp_of(n);
        if let Some(pt) = self.cfg.dtmf_pt {
            if let Some(ev) = self.dtmf_tx.tick(ts) {
                return Some(self.tx.packet(pt, ev.timestamp, ev.marker, &ev.payload));
            }
            if self.dtmf_tx_busy && self.dtmf_tx.is_idle() {
                self.dtmf_tx_busy = false;
                self.events.push_back(MediaEvent::DtmfSent);
            }
        }
        let codec = self.cfg.codec;
        let mut payload = Vec::with_capacity(FRAME_SAMPLES);
        match self.player.next_frame() {
            Some(f) => codec.encode_into(&f, &mut payload),
            None => payload.resize(FRAME_SAMPLES, codec.silence_byte()),
        }
        Some(self.tx.packet(self.cfg.audio_pt, ts, false, &payload))
    }

    fn drain_received(&mut self, now: Instant) {
        while let Some(r) = self.rx.pop(now) {
            match r {
                Released::Lost(n) => {
                    self.stats.lost += n;
                    crate::metrics::metrics().rtp_packets_lost.inc_by(n);
                    if self.tap {
                        let len = n.min(MAX_CONCEALED_PACKETS) as usize * self.last_rx_samples;
                        self.events.push_back(MediaEvent::Audio(vec![0; len]));
                    }
                }
                Released::Packet(p) => self.dispatch(now, p),
            }
        }
    }

    fn dispatch(&mut self, now: Instant, p: RtpPacket) {
        if Some(p.pt) == self.cfg.dtmf_pt {
            // Non-key events (flash, tones) are not digits; nothing to do with them.
            if let Ok(Some(d)) = self.dtmf_rx.on_packet(now, p.ssrc, p.timestamp, &p.payload) {
                self.digit(now, DtmfSource::Rfc4733, d);
            }
            return;
        }
        let codec = if p.pt == self.cfg.audio_pt {
            self.cfg.codec
        } else {
            match G711::from_payload_type(p.pt) {
                Some(c) => c,
                None => return,
            }
        };
        if p.payload.is_empty() {
            return;
        }
        let mut samples = Vec::with_capacity(p.payload.len());
        codec.decode_into(&p.payload, &mut samples);
        self.last_rx_samples = samples.len();
        self.player.push_received(&samples);
        if let Some(det) = &mut self.inband {
            let mut found = Vec::new();
            det.process(&samples, |d| found.push(d));
            for d in found {
                self.digit(now, DtmfSource::InBand, d);
            }
        }
        if self.tap {
            self.events.push_back(MediaEvent::Audio(samples));
        }
    }

    fn digit(&mut self, now: Instant, source: DtmfSource, digit: char) {
        if let Some(digit) = self.merger.offer(now, source, digit) {
            self.events.push_back(MediaEvent::Digit { digit, source });
            self.player.barge_in();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::dtmf::TelephoneEvent;
    use crate::media::goertzel::dtmf_frequencies;
    use crate::media::tone::synth;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn cfg() -> SessionConfig {
        let mut c = SessionConfig::new(addr("192.0.2.10:4000"), G711::Pcmu);
        c.dtmf_pt = Some(101);
        c.ssrc = Some(0xCAFE);
        c
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn drain_tx(s: &mut MediaSession, now: Instant) -> Vec<(SocketAddr, RtpPacket)> {
        std::iter::from_fn(|| s.poll_transmit(now))
            .map(|t| (t.dest, RtpPacket::parse(&t.data).unwrap()))
            .collect()
    }

    fn events(s: &mut MediaSession) -> Vec<MediaEvent> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    fn digit_events(s: &mut MediaSession) -> Vec<MediaEvent> {
        events(s)
            .into_iter()
            .filter(|e| matches!(e, MediaEvent::Digit { .. }))
            .collect()
    }

    fn audio_pkt(seq: u16, ts: u32, byte: u8) -> Vec<u8> {
        crate::media::rtp::build(0, false, seq, ts, 77, &[byte; 160])
    }

    #[test]
    fn paced_stream_of_10000_frames() {
        let t0 = Instant::now();
        let mut s = MediaSession::new(cfg(), t0);
        let mut all = Vec::new();
        let mut now = t0;
        while all.len() < 10_000 {
            // Wake when told, sometimes late by up to 3 frames.
            now = s.poll_timeout().max(now) + ms((all.len() as u64 * 13) % 61);
            let got = drain_tx(&mut s, now);
            assert!(!got.is_empty());
            all.extend(got);
        }
        let first = &all[0].1;
        assert!(first.marker);
        for (i, (dest, p)) in all.iter().enumerate() {
            assert_eq!(*dest, addr("192.0.2.10:4000"));
            assert_eq!(p.ssrc, 0xCAFE);
            assert_eq!(p.pt, 0);
            assert_eq!(p.seq, first.seq.wrapping_add(i as u16));
            assert_eq!(p.timestamp, first.timestamp.wrapping_add(160 * i as u32));
            assert_eq!(p.marker, i == 0);
            assert_eq!(p.payload, vec![0xFF; 160], "µ-law silence");
        }
        // The clock is still exactly on the grid.
        assert_eq!(s.poll_timeout(), t0 + ms(20) * all.len() as u32);
    }

    #[test]
    fn plays_prompt_then_reports_finished() {
        let t0 = Instant::now();
        let mut s = MediaSession::new(cfg(), t0);
        let id = s.play(vec![1000i16; 400].into(), false);
        let pkts = drain_tx(&mut s, t0 + ms(80));
        assert_eq!(pkts.len(), 5);
        let enc = G711::Pcmu.encode_sample(1000);
        assert_eq!(pkts[0].1.payload, vec![enc; 160]);
        assert_eq!(&pkts[2].1.payload[..80], &[enc; 80][..]);
        assert_eq!(&pkts[2].1.payload[80..], &[0xFF; 80][..]);
        assert_eq!(pkts[3].1.payload, vec![0xFF; 160]);
        assert_eq!(
            events(&mut s),
            vec![MediaEvent::PlayFinished(PlayFinished {
                id,
                reason: crate::media::player::PlayEnd::Completed
            })]
        );
    }

    #[test]
    fn latching_follows_first_packet_then_ignores_others() {
        let t0 = Instant::now();
        let mut s = MediaSession::new(cfg(), t0);
        assert_eq!(drain_tx(&mut s, t0)[0].0, addr("192.0.2.10:4000"));
        // Garbage or an unknown PT from elsewhere does not latch.
        assert!(s.handle_input(t0, addr("198.51.100.9:1"), b"junk").is_err());
        assert_eq!(
            s.handle_input(
                t0,
                addr("198.51.100.9:1"),
                &crate::media::rtp::build(96, false, 1, 1, 1, &[0])
            ),
            Err(RtpError::UnknownPayloadType(96))
        );
        let nat = addr("203.0.113.5:31000");
        s.handle_input(t0 + ms(5), nat, &audio_pkt(1, 0, 0xFF))
            .unwrap();
        assert_eq!(events(&mut s), vec![MediaEvent::Latched(nat)]);
        assert!(drain_tx(&mut s, t0 + ms(20)).iter().all(|(d, _)| *d == nat));
        assert_eq!(
            s.handle_input(
                t0 + ms(21),
                addr("203.0.113.6:31000"),
                &audio_pkt(2, 160, 0xFF)
            ),
            Err(RtpError::ForeignSource)
        );
        assert_eq!(s.remote(), nat);
        // Re-INVITE: new SDP address, latch again.
        s.update_remote(addr("192.0.2.20:5000"));
        assert_eq!(drain_tx(&mut s, t0 + ms(40))[0].0, addr("192.0.2.20:5000"));
        let st = s.stats();
        assert_eq!((st.malformed, st.unknown_pt, st.foreign_source), (1, 1, 1));
    }

    #[test]
    fn receive_reorders_drops_duplicates_and_conceals_loss() {
        let t0 = Instant::now();
        let mut s = MediaSession::new(cfg(), t0);
        s.set_audio_tap(true);
        let from = addr("192.0.2.10:4000");
        // seq 65534..=3 with 1 lost, 0 and 65535 swapped, 2 duplicated.
        let order: [(u16, u8); 6] = [(65534, 1), (0, 3), (65535, 2), (2, 5), (2, 5), (3, 6)];
        for (i, (seq, b)) in order.iter().enumerate() {
            let ts = 160u32.wrapping_mul(seq.wrapping_sub(65534) as u32);
            s.handle_input(t0 + ms(20 * i as u64), from, &audio_pkt(*seq, ts, *b))
                .unwrap();
        }
        s.poll_transmit(t0 + ms(500));
        let audio: Vec<Vec<i16>> = events(&mut s)
            .into_iter()
            .filter_map(|e| match e {
                MediaEvent::Audio(a) => Some(a),
                _ => None,
            })
            .collect();
        let firsts: Vec<i16> = audio.iter().map(|a| a[0]).collect();
        let dec = |b: u8| G711::Pcmu.decode_sample(b);
        assert_eq!(firsts, vec![dec(1), dec(2), dec(3), 0, dec(5), dec(6)]);
        assert!(audio.iter().all(|a| a.len() == 160));
        let st = s.stats();
        assert_eq!((st.received, st.lost, st.late_or_duplicate), (5, 1, 1));
    }

    fn event_pkt(seq: u16, ts: u32, marker: bool, ev: TelephoneEvent) -> Vec<u8> {
        crate::media::rtp::build(101, marker, seq, ts, 77, &ev.to_bytes())
    }

    #[test]
    fn rfc4733_digit_barges_in_within_one_frame() {
        let t0 = Instant::now();
        let mut s = MediaSession::new(cfg(), t0);
        let from = addr("192.0.2.10:4000");
        s.play(vec![5000i16; 80_000].into(), true);
        assert_ne!(drain_tx(&mut s, t0)[0].1.payload, vec![0xFF; 160]);
        let mut seq = 10;
        for k in 0..3u16 {
            let ev = TelephoneEvent {
                event: 4,
                end: false,
                volume: 10,
                duration: 160 * (k + 1),
            };
            s.handle_input(
                t0 + ms(5 + 20 * k as u64),
                from,
                &event_pkt(seq, 8000, k == 0, ev),
            )
            .unwrap();
            seq += 1;
        }
        for _ in 0..3 {
            let ev = TelephoneEvent {
                event: 4,
                end: true,
                volume: 10,
                duration: 640,
            };
            s.handle_input(t0 + ms(70), from, &event_pkt(seq, 8000, false, ev))
                .unwrap();
            seq += 1;
        }
        let ev = events(&mut s);
        assert_eq!(
            ev[0],
            MediaEvent::Digit {
                digit: '4',
                source: DtmfSource::Rfc4733
            }
        );
        assert!(matches!(
            ev[1],
            MediaEvent::PlayFinished(PlayFinished {
                reason: crate::media::player::PlayEnd::BargeIn,
                ..
            })
        ));
        assert_eq!(ev.len(), 2);
        // Every frame after the digit is silence.
        assert!(drain_tx(&mut s, t0 + ms(200))
            .iter()
            .all(|(_, p)| p.payload == vec![0xFF; 160]));
    }

    #[test]
    fn sends_dtmf_in_the_audio_sequence_space() {
        let t0 = Instant::now();
        let mut s = MediaSession::new(cfg(), t0);
        let first = drain_tx(&mut s, t0);
        s.send_dtmf("7", ms(60)).unwrap();
        let pkts = drain_tx(&mut s, t0 + ms(300));
        let ev: Vec<_> = pkts
            .iter()
            .filter(|(_, p)| p.pt == 101)
            .map(|(_, p)| p.clone())
            .collect();
        assert_eq!(ev.len(), 5, "3 updates (last is an end) + 2 more ends");
        assert!(ev[0].marker);
        assert!(ev
            .iter()
            .all(|p| p.timestamp == first[0].1.timestamp.wrapping_add(160)));
        assert_eq!(TelephoneEvent::parse(&ev[4].payload).unwrap().event, 7);
        for (i, (_, p)) in pkts.iter().enumerate() {
            assert_eq!(p.seq, first[0].1.seq.wrapping_add(1 + i as u16));
        }
        assert!(events(&mut s).contains(&MediaEvent::DtmfSent));
        let mut no_te = cfg();
        no_te.dtmf_pt = None;
        let mut s2 = MediaSession::new(no_te, t0);
        assert_eq!(
            s2.send_dtmf("1", ms(100)),
            Err(SessionError::DtmfNotNegotiated)
        );
        assert_eq!(
            s.send_dtmf("x", ms(100)),
            Err(SessionError::Dtmf(DtmfError::BadDigit('x')))
        );
    }

    #[test]
    fn two_sessions_talk_inband_dtmf_and_rfc4733_merge() {
        // A plays a DTMF tone in the audio AND sends the same key as RFC 4733; B hears one digit.
        let t0 = Instant::now();
        let a_addr = addr("127.0.0.1:10000");
        let b_addr = addr("127.0.0.1:10002");
        let mut ca = cfg();
        ca.remote = b_addr;
        let mut cb = cfg();
        cb.remote = a_addr;
        let mut a = MediaSession::new(ca, t0);
        let mut b = MediaSession::new(cb, t0);
        b.set_audio_tap(true);
        let (r, c) = dtmf_frequencies('9').unwrap();
        let mut tone = synth(&[r, c], 5000.0, 800);
        tone.extend(vec![0; 1600]);
        a.play(tone.into(), false);
        a.send_dtmf("9", ms(100)).unwrap();
        let mut now = t0;
        for _ in 0..40 {
            for t in std::iter::from_fn(|| a.poll_transmit(now)) {
                b.handle_input(now, a_addr, &t.data).unwrap();
            }
            now += ms(20);
        }
        let digits: Vec<_> = digit_events(&mut b);
        assert_eq!(digits.len(), 1, "{digits:?}");
        // INFO for the same press is merged too; a different key is not.
        let info_at = t0 + ms(150);
        b.handle_info(
            info_at,
            "application/dtmf-relay",
            "Signal=9\r\nDuration=100",
        )
        .unwrap();
        b.handle_info(
            info_at,
            "application/dtmf-relay",
            "Signal=3\r\nDuration=100",
        )
        .unwrap();
        let digits: Vec<_> = digit_events(&mut b);
        assert_eq!(
            digits,
            vec![MediaEvent::Digit {
                digit: '3',
                source: DtmfSource::SipInfo
            }]
        );
    }

    #[test]
    fn hold_stops_sending_and_resume_marks_talkspurt() {
        let t0 = Instant::now();
        let mut s = MediaSession::new(cfg(), t0);
        let p0 = drain_tx(&mut s, t0).remove(0).1;
        s.set_sending(false);
        assert!(drain_tx(&mut s, t0 + ms(100)).is_empty());
        s.set_sending(true);
        let p = drain_tx(&mut s, t0 + ms(120)).remove(0).1;
        assert!(p.marker);
        assert_eq!(p.seq, p0.seq.wrapping_add(1));
        // Timestamp reflects the 6 frames of elapsed time, not the packet count.
        assert_eq!(p.timestamp, p0.timestamp.wrapping_add(6 * 160));
    }

    #[test]
    fn rtcp_and_garbage_are_counted_not_fatal() {
        let t0 = Instant::now();
        let mut s = MediaSession::new(cfg(), t0);
        let from = addr("192.0.2.10:4000");
        assert_eq!(
            s.handle_input(t0, from, &[0x80, 201, 0, 1, 0, 0, 0, 1]),
            Err(RtpError::Rtcp)
        );
        for len in 0..40 {
            let _ = s.handle_input(t0, from, &vec![0x90; len]);
        }
        assert_eq!(s.stats().rtcp_ignored, 1);
        assert!(s.stats().malformed > 0);
        assert_eq!(drain_tx(&mut s, t0).len(), 1);
    }

    #[test]
    fn inband_tone_in_received_audio_is_a_digit() {
        let t0 = Instant::now();
        let from = addr("192.0.2.10:4000");
        let mut s = MediaSession::new(cfg(), t0);
        let (r, c) = dtmf_frequencies('#').unwrap();
        let mut tone = synth(&[r, c], 4000.0, 960);
        tone.extend(vec![0; 960]);
        for (i, chunk) in tone.chunks(160).enumerate() {
            let mut payload = Vec::new();
            G711::Pcmu.encode_into(chunk, &mut payload);
            let pkt = crate::media::rtp::build(0, false, i as u16, 160 * i as u32, 5, &payload);
            s.handle_input(t0 + ms(20 * i as u64), from, &pkt).unwrap();
        }
        assert_eq!(
            events(&mut s),
            vec![MediaEvent::Digit {
                digit: '#',
                source: DtmfSource::InBand
            }]
        );
    }

    #[test]
    fn sipp_pcaps_through_the_whole_receive_path() {
        // Same-sequence end retransmissions pass the reorder window; one digit per capture.
        use crate::media::testutil::{sipp_dtmf_cases, udp_payloads, FIXTURES};
        for (file, want) in sipp_dtmf_cases() {
            let bytes = std::fs::read(format!("{FIXTURES}/{file}")).unwrap();
            let t0 = Instant::now();
            let mut s = MediaSession::new(cfg(), t0);
            let from = addr("10.0.0.1:6000");
            for (i, p) in udp_payloads(&bytes).iter().enumerate() {
                s.handle_input(t0 + ms(20 * i as u64), from, p).unwrap();
            }
            s.poll_transmit(t0 + ms(2000));
            let digits: Vec<_> = digit_events(&mut s);
            assert_eq!(
                digits,
                vec![MediaEvent::Digit {
                    digit: want,
                    source: DtmfSource::Rfc4733
                }],
                "{file}"
            );
        }
    }

    #[test]
    fn random_datagrams_never_panic() {
        let t0 = Instant::now();
        let mut s = MediaSession::new(cfg(), t0);
        s.set_audio_tap(true);
        s.start_echo(ms(0));
        let from = addr("192.0.2.10:4000");
        let mut rng = crate::media::testutil::XorShift::new(0x9E37_79B9);
        let mut rnd = move || rng.next_u32();
        for i in 0..20_000u64 {
            let len = (rnd() % 300) as usize;
            let mut d: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            if len >= 12 && i % 2 == 0 {
                // Valid-looking header with a negotiated PT, so payload handling is exercised.
                d[0] = 0x80 | (d[0] & 0x30);
                d[1] = [0u8, 8, 101, 0x80 | 101][(rnd() % 4) as usize];
            }
            let _ = s.handle_input(t0 + ms(i), from, &d);
            while s.poll_transmit(t0 + ms(i)).is_some() {}
            while s.poll_event().is_some() {}
        }
        assert!(s.stats().received > 0);
    }
}
