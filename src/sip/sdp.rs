//! SDP (RFC 4566) parsing and offer/answer (RFC 3264) for G.711 audio and telephone-event.
//!
//! Parsing is tolerant: unknown lines and attributes are kept out of the way, optional
//! lines may be missing. Only lines we rely on (m=, c=, rtpmap) are checked strictly.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use thiserror::Error;

/// Why an SDP body could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SdpError {
    #[error("SDP is not UTF-8")]
    NotUtf8,
    #[error("SDP line {line} is malformed: {detail}")]
    BadLine { line: usize, detail: String },
    #[error("SDP has no v= line")]
    NoVersion,
    #[error("SDP offers no audio stream")]
    NoAudio,
    #[error("no common codec (we accept {ours}; offer has {theirs})")]
    NoCommonCodec { ours: String, theirs: String },
    #[error("audio stream has no connection address")]
    NoConnection,
}

/// Media direction attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    #[default]
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

impl Direction {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "sendrecv" => Self::SendRecv,
            "sendonly" => Self::SendOnly,
            "recvonly" => Self::RecvOnly,
            "inactive" => Self::Inactive,
            _ => return None,
        })
    }

    /// The direction an answerer uses for this offered direction (RFC 3264 §6.1).
    pub fn answer(self) -> Self {
        match self {
            Self::SendRecv => Self::SendRecv,
            Self::SendOnly => Self::RecvOnly,
            Self::RecvOnly => Self::SendOnly,
            Self::Inactive => Self::Inactive,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SendRecv => "sendrecv",
            Self::SendOnly => "sendonly",
            Self::RecvOnly => "recvonly",
            Self::Inactive => "inactive",
        }
    }

    /// True if this side sends media.
    pub fn sends(self) -> bool {
        matches!(self, Self::SendRecv | Self::SendOnly)
    }

    /// True if this side receives media.
    pub fn receives(self) -> bool {
        matches!(self, Self::SendRecv | Self::RecvOnly)
    }
}

/// An `a=rtpmap` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtpMap {
    pub payload_type: u8,
    pub encoding: String,
    pub clock_rate: u32,
    pub channels: Option<u8>,
}

/// One `m=` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media {
    pub kind: String,
    pub port: u16,
    pub proto: String,
    pub formats: Vec<String>,
    pub connection: Option<IpAddr>,
    pub rtpmaps: Vec<RtpMap>,
    pub fmtps: Vec<(u8, String)>,
    pub ptime: Option<u32>,
    pub direction: Option<Direction>,
}

impl Media {
    fn new(kind: &str, port: u16, proto: &str, formats: Vec<String>) -> Self {
        Self {
            kind: kind.to_string(),
            port,
            proto: proto.to_string(),
            formats,
            connection: None,
            rtpmaps: Vec::new(),
            fmtps: Vec::new(),
            ptime: None,
            direction: None,
        }
    }

    fn rtpmap(&self, pt: u8) -> Option<&RtpMap> {
        self.rtpmaps.iter().find(|m| m.payload_type == pt)
    }

    fn payload_types(&self) -> impl Iterator<Item = u8> + '_ {
        self.formats.iter().filter_map(|f| f.parse().ok())
    }
}

/// A session description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDescription {
    pub origin_user: String,
    pub session_id: u64,
    pub session_version: u64,
    pub origin_addr: IpAddr,
    pub session_name: String,
    pub connection: Option<IpAddr>,
    pub direction: Option<Direction>,
    pub media: Vec<Media>,
}

impl SessionDescription {
    /// Parses an SDP body.
    pub fn parse(body: &[u8]) -> Result<Self, SdpError> {
        let text = std::str::from_utf8(body).map_err(|_| SdpError::NotUtf8)?;
        let mut sd = SessionDescription {
            origin_user: "-".into(),
            session_id: 0,
            session_version: 0,
            origin_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            session_name: "-".into(),
            connection: None,
            direction: None,
            media: Vec::new(),
        };
        let mut seen_version = false;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let bad = |detail: &str| SdpError::BadLine {
                line: n,
                detail: detail.to_string(),
            };
            let (key, value) = line.split_once('=').ok_or_else(|| bad("no '='"))?;
            if key.len() != 1 {
                return Err(bad("type is not one letter"));
            }
            match key {
                "v" => {
                    if value.trim() != "0" {
                        return Err(bad("version is not 0"));
                    }
                    seen_version = true;
                }
                "o" => {
                    let f: Vec<&str> = value.split_whitespace().collect();
                    // Tolerated if odd: the origin does not affect negotiation.
                    if f.len() == 6 {
                        sd.origin_user = f[0].to_string();
                        sd.session_id = f[1].parse().unwrap_or(0);
                        sd.session_version = f[2].parse().unwrap_or(0);
                        if let Ok(a) = f[5].parse() {
                            sd.origin_addr = a;
                        }
                    }
                }
                "s" => sd.session_name = value.to_string(),
                "c" => {
                    let addr = parse_connection(value).map_err(|d| bad(&d))?;
                    match sd.media.last_mut() {
                        Some(m) => m.connection = Some(addr),
                        None => sd.connection = Some(addr),
                    }
                }
                "m" => {
                    let f: Vec<&str> = value.split_whitespace().collect();
                    if f.len() < 3 {
                        return Err(bad("m= needs media, port and proto"));
                    }
                    // "port/count" is legal; we only use the first port.
                    let port_str = f[1].split('/').next().unwrap_or("");
                    let port: u16 = port_str.parse().map_err(|_| bad("bad port"))?;
                    let formats = f[3..].iter().map(|s| s.to_string()).collect();
                    sd.media.push(Media::new(f[0], port, f[2], formats));
                }
                "a" => {
                    let (name, val) = match value.split_once(':') {
                        Some((n, v)) => (n, Some(v)),
                        None => (value, None),
                    };
                    if let Some(dir) = Direction::parse(name) {
                        match sd.media.last_mut() {
                            Some(m) => m.direction = Some(dir),
                            None => sd.direction = Some(dir),
                        }
                        continue;
                    }
                    let Some(m) = sd.media.last_mut() else {
                        continue;
                    };
                    match (name, val) {
                        ("rtpmap", Some(v)) => match parse_rtpmap(v) {
                            Ok(map) => m.rtpmaps.push(map),
                            // Only audio is negotiated: another stream's odd rtpmap (RFC 4475
                            // sdp01: `a=rtpmap:31 LPC` on video) cannot fail the offer, since
                            // that stream is declined with port 0 anyway.
                            Err(_) if m.kind != "audio" => {}
                            Err(d) => return Err(bad(&d)),
                        },
                        ("fmtp", Some(v)) => {
                            if let Some((pt, params)) = v.split_once(' ') {
                                if let Ok(pt) = pt.parse() {
                                    m.fmtps.push((pt, params.trim().to_string()));
                                }
                            }
                        }
                        ("ptime", Some(v)) => m.ptime = v.trim().parse().ok(),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        if !seen_version {
            return Err(SdpError::NoVersion);
        }
        Ok(sd)
    }

    /// Serialised body.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }
}

fn parse_connection(value: &str) -> Result<IpAddr, String> {
    let f: Vec<&str> = value.split_whitespace().collect();
    if f.len() != 3 || f[0] != "IN" || !(f[1] == "IP4" || f[1] == "IP6") {
        return Err(format!("bad c= line {value:?}"));
    }
    // Multicast TTL suffix ("/127") is legal syntax; strip it.
    let addr = f[2].split('/').next().unwrap_or("");
    addr.parse()
        .map_err(|_| format!("c= address {addr:?} is not an IP address"))
}

fn parse_rtpmap(v: &str) -> Result<RtpMap, String> {
    let (pt, rest) = v.split_once(' ').ok_or("rtpmap without encoding")?;
    let payload_type: u8 = pt.trim().parse().map_err(|_| "bad rtpmap payload type")?;
    let mut parts = rest.trim().split('/');
    let encoding = parts.next().unwrap_or("").to_string();
    let clock_rate = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or("bad rtpmap clock rate")?;
    let channels = parts.next().and_then(|c| c.parse().ok());
    Ok(RtpMap {
        payload_type,
        encoding,
        clock_rate,
        channels,
    })
}

fn ip_kind(a: &IpAddr) -> &'static str {
    if a.is_ipv4() {
        "IP4"
    } else {
        "IP6"
    }
}

impl fmt::Display for SessionDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v=0\r\n")?;
        write!(
            f,
            "o={} {} {} IN {} {}\r\n",
            self.origin_user,
            self.session_id,
            self.session_version,
            ip_kind(&self.origin_addr),
            self.origin_addr
        )?;
        write!(f, "s={}\r\n", self.session_name)?;
        if let Some(c) = &self.connection {
            write!(f, "c=IN {} {}\r\n", ip_kind(c), c)?;
        }
        write!(f, "t=0 0\r\n")?;
        if let Some(d) = self.direction {
            write!(f, "a={}\r\n", d.as_str())?;
        }
        for m in &self.media {
            write!(f, "m={} {} {}", m.kind, m.port, m.proto)?;
            for fmt_ in &m.formats {
                write!(f, " {fmt_}")?;
            }
            write!(f, "\r\n")?;
            if let Some(c) = &m.connection {
                write!(f, "c=IN {} {}\r\n", ip_kind(c), c)?;
            }
            for r in &m.rtpmaps {
                write!(
                    f,
                    "a=rtpmap:{} {}/{}",
                    r.payload_type, r.encoding, r.clock_rate
                )?;
                if let Some(ch) = r.channels {
                    write!(f, "/{ch}")?;
                }
                write!(f, "\r\n")?;
            }
            for (pt, p) in &m.fmtps {
                write!(f, "a=fmtp:{pt} {p}\r\n")?;
            }
            if let Some(p) = m.ptime {
                write!(f, "a=ptime:{p}\r\n")?;
            }
            if let Some(d) = m.direction {
                write!(f, "a={}\r\n", d.as_str())?;
            }
        }
        Ok(())
    }
}

/// The G.711 codecs we can send and receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Pcmu,
    Pcma,
}

impl Codec {
    /// A preference list from configuration (`["PCMU", "PCMA"]`, any case); the error names
    /// the unknown codec or says the list is empty.
    pub fn parse_list(names: &[String]) -> Result<Vec<Codec>, String> {
        let list = names
            .iter()
            .map(|c| match c.to_ascii_uppercase().as_str() {
                "PCMU" => Ok(Codec::Pcmu),
                "PCMA" => Ok(Codec::Pcma),
                other => Err(format!("unknown codec {other:?} (PCMU, PCMA)")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if list.is_empty() {
            return Err("codecs is empty".into());
        }
        Ok(list)
    }

    pub fn static_payload_type(self) -> u8 {
        match self {
            Self::Pcmu => 0,
            Self::Pcma => 8,
        }
    }

    pub fn encoding_name(self) -> &'static str {
        match self {
            Self::Pcmu => "PCMU",
            Self::Pcma => "PCMA",
        }
    }
}

/// What we can do, for answering and offering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaConfig {
    /// Codec preference, best first.
    pub codecs: Vec<Codec>,
    /// Whether to negotiate RFC 4733 telephone-event.
    pub telephone_event: bool,
    /// Our RTP address and port, written in c= and m=.
    pub rtp_addr: IpAddr,
    pub rtp_port: u16,
    pub ptime: u32,
}

impl MediaConfig {
    pub fn new(rtp_addr: IpAddr, rtp_port: u16) -> Self {
        Self {
            codecs: vec![Codec::Pcmu, Codec::Pcma],
            telephone_event: true,
            rtp_addr,
            rtp_port,
            ptime: 20,
        }
    }
}

/// The outcome of negotiating an offer: what the media layer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub codec: Codec,
    /// Payload type used on the wire (the offerer's number when it is dynamic).
    pub payload_type: u8,
    /// telephone-event payload type, the peer's number.
    pub dtmf_payload_type: Option<u8>,
    /// Where to send RTP; `None` when the peer is on hold (0.0.0.0) or the port is 0.
    pub remote_rtp: Option<SocketAddr>,
    pub remote_ptime: Option<u32>,
    /// Direction of the offer as the peer wrote it.
    pub offered_direction: Direction,
    /// Our direction in the answer.
    pub local_direction: Direction,
    /// Index of the accepted audio m= line in the offer.
    pub media_index: usize,
}

fn codec_of(m: &Media, pt: u8) -> Option<Codec> {
    if let Some(map) = m.rtpmap(pt) {
        if map.clock_rate != 8000 {
            return None;
        }
        if map.encoding.eq_ignore_ascii_case("PCMU") {
            return Some(Codec::Pcmu);
        }
        if map.encoding.eq_ignore_ascii_case("PCMA") {
            return Some(Codec::Pcma);
        }
        return None;
    }
    match pt {
        0 => Some(Codec::Pcmu),
        8 => Some(Codec::Pcma),
        _ => None,
    }
}

/// Chooses codec, DTMF payload and direction for an offer.
pub fn negotiate(offer: &SessionDescription, cfg: &MediaConfig) -> Result<Negotiated, SdpError> {
    let mut saw_audio = false;
    let mut theirs = Vec::new();
    for (index, m) in offer.media.iter().enumerate() {
        if m.kind != "audio" || m.port == 0 || !m.proto.starts_with("RTP/") {
            continue;
        }
        saw_audio = true;
        let pick = cfg.codecs.iter().find_map(|want| {
            m.payload_types()
                .find(|pt| codec_of(m, *pt) == Some(*want))
                .map(|pt| (*want, pt))
        });
        let Some((codec, payload_type)) = pick else {
            theirs.extend(m.formats.iter().map(|f| {
                m.rtpmap(f.parse().unwrap_or(255))
                    .map(|r| r.encoding.clone())
                    .unwrap_or_else(|| f.clone())
            }));
            continue;
        };
        let dtmf_payload_type = if cfg.telephone_event {
            m.payload_types().find(|pt| {
                m.rtpmap(*pt).is_some_and(|r| {
                    r.encoding.eq_ignore_ascii_case("telephone-event") && r.clock_rate == 8000
                })
            })
        } else {
            None
        };
        let addr = m
            .connection
            .or(offer.connection)
            .ok_or(SdpError::NoConnection)?;
        let offered_direction = m.direction.or(offer.direction).unwrap_or_default();
        let remote_rtp = (!addr.is_unspecified()).then_some(SocketAddr::new(addr, m.port));
        return Ok(Negotiated {
            codec,
            payload_type,
            dtmf_payload_type,
            remote_rtp,
            remote_ptime: m.ptime,
            offered_direction,
            local_direction: offered_direction.answer(),
            media_index: index,
        });
    }
    if !saw_audio {
        return Err(SdpError::NoAudio);
    }
    Err(SdpError::NoCommonCodec {
        ours: cfg
            .codecs
            .iter()
            .map(|c| c.encoding_name())
            .collect::<Vec<_>>()
            .join(","),
        theirs: theirs.join(","),
    })
}

/// The telephone-events we send and receive: the DTMF keys 0-15 and flash (16).
const OUR_EVENTS: &str = "0-16";

/// The events to answer for an offer's `a=fmtp` list: those it offered that we support, in
/// its own notation (`0-15` to a `0-15` offer). RFC 4733 §7.1.1: no fmtp means 0-15.
fn answer_events(offered: Option<&str>) -> String {
    let offered = offered.unwrap_or("0-15");
    let mut kept = Vec::new();
    for part in offered.split(',').map(str::trim) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u32>(), b.trim().parse::<u32>()),
            None => (part.parse::<u32>(), part.parse::<u32>()),
        };
        let (Ok(lo), Ok(hi)) = (lo, hi) else { continue };
        let (lo, hi) = (lo, hi.min(16));
        if lo > hi {
            continue;
        }
        kept.push(if lo == hi {
            lo.to_string()
        } else {
            format!("{lo}-{hi}")
        });
    }
    if kept.is_empty() {
        "0-15".to_string()
    } else {
        kept.join(",")
    }
}

fn audio_media(
    cfg: &MediaConfig,
    codecs: &[(Codec, u8)],
    dtmf: Option<(u8, String)>,
    dir: Direction,
) -> Media {
    let mut formats: Vec<String> = codecs.iter().map(|(_, pt)| pt.to_string()).collect();
    let mut rtpmaps: Vec<RtpMap> = codecs
        .iter()
        .map(|(c, pt)| RtpMap {
            payload_type: *pt,
            encoding: c.encoding_name().into(),
            clock_rate: 8000,
            channels: None,
        })
        .collect();
    let mut fmtps = Vec::new();
    if let Some((pt, events)) = dtmf {
        formats.push(pt.to_string());
        rtpmaps.push(RtpMap {
            payload_type: pt,
            encoding: "telephone-event".into(),
            clock_rate: 8000,
            channels: None,
        });
        fmtps.push((pt, events));
    }
    let mut m = Media::new("audio", cfg.rtp_port, "RTP/AVP", formats);
    m.rtpmaps = rtpmaps;
    m.fmtps = fmtps;
    m.ptime = Some(cfg.ptime);
    m.direction = Some(dir);
    m
}

/// Builds the answer for an offer we negotiated. Non-chosen m= lines are rejected with port 0
/// because RFC 3264 §6 requires one answer m= line per offered one.
pub fn build_answer(
    offer: &SessionDescription,
    neg: &Negotiated,
    cfg: &MediaConfig,
    session_id: u64,
    session_version: u64,
) -> SessionDescription {
    let media = offer
        .media
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if i == neg.media_index {
                let dtmf = neg.dtmf_payload_type.map(|pt| {
                    let offered = m.fmtps.iter().find(|(p, _)| *p == pt);
                    (pt, answer_events(offered.map(|(_, v)| v.as_str())))
                });
                audio_media(
                    cfg,
                    &[(neg.codec, neg.payload_type)],
                    dtmf,
                    neg.local_direction,
                )
            } else {
                let mut rejected = Media::new(
                    &m.kind,
                    0,
                    &m.proto,
                    m.formats.iter().take(1).cloned().collect(),
                );
                rejected.direction = None;
                rejected
            }
        })
        .collect();
    SessionDescription {
        origin_user: "callforge".into(),
        session_id,
        session_version,
        origin_addr: cfg.rtp_addr,
        session_name: "callforge".into(),
        connection: Some(cfg.rtp_addr),
        direction: None,
        media,
    }
}

/// Builds an offer with all our codecs (telephone-event on payload 101).
pub fn build_offer(
    cfg: &MediaConfig,
    session_id: u64,
    session_version: u64,
    dir: Direction,
) -> SessionDescription {
    let codecs: Vec<(Codec, u8)> = cfg
        .codecs
        .iter()
        .map(|c| (*c, c.static_payload_type()))
        .collect();
    SessionDescription {
        origin_user: "callforge".into(),
        session_id,
        session_version,
        origin_addr: cfg.rtp_addr,
        session_name: "callforge".into(),
        connection: Some(cfg.rtp_addr),
        direction: None,
        media: vec![audio_media(
            cfg,
            &codecs,
            cfg.telephone_event.then(|| (101, OUR_EVENTS.to_string())),
            dir,
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\n\
o=carrier 123 456 IN IP4 198.51.100.1\r\n\
s=call\r\n\
c=IN IP4 198.51.100.7\r\n\
t=0 0\r\n\
m=audio 40000 RTP/AVP 18 8 0 96\r\n\
a=rtpmap:18 G729/8000\r\n\
a=rtpmap:96 telephone-event/8000\r\n\
a=fmtp:96 0-15\r\n\
a=ptime:30\r\n\
a=x-unknown:whatever\r\n\
a=sendrecv\r\n\
m=video 0 RTP/AVP 99\r\n";

    fn cfg() -> MediaConfig {
        MediaConfig::new("203.0.113.5".parse().unwrap(), 10000)
    }

    #[test]
    fn negotiates_preferred_codec_and_peer_dtmf_number() {
        let offer = SessionDescription::parse(OFFER.as_bytes()).unwrap();
        let neg = negotiate(&offer, &cfg()).unwrap();
        assert_eq!(neg.codec, Codec::Pcmu);
        assert_eq!(neg.payload_type, 0);
        assert_eq!(neg.dtmf_payload_type, Some(96));
        assert_eq!(neg.remote_rtp, Some("198.51.100.7:40000".parse().unwrap()));
        assert_eq!(neg.remote_ptime, Some(30));
        let mut c = cfg();
        c.codecs = vec![Codec::Pcma, Codec::Pcmu];
        assert_eq!(negotiate(&offer, &c).unwrap().codec, Codec::Pcma);

        let answer = build_answer(&offer, &neg, &cfg(), 1, 1);
        let text = answer.to_string();
        assert!(text.contains("m=audio 10000 RTP/AVP 0 96\r\n"), "{text}");
        assert!(text.contains("a=rtpmap:96 telephone-event/8000\r\n"));
        assert!(text.contains("c=IN IP4 203.0.113.5\r\n"));
        assert!(text.contains("m=video 0 RTP/AVP 99\r\n"));
        let reparsed = SessionDescription::parse(text.as_bytes()).unwrap();
        assert_eq!(reparsed.media.len(), 2);
    }

    #[test]
    fn telephone_events_are_answered_with_the_offers_range() {
        let offer = SessionDescription::parse(OFFER.as_bytes()).unwrap();
        let neg = negotiate(&offer, &cfg()).unwrap();
        let text = build_answer(&offer, &neg, &cfg(), 1, 1).to_string();
        assert!(text.contains("a=fmtp:96 0-15\r\n"), "{text}");
        assert!(!text.contains("0-16"), "{text}");
        // Beyond what we support is cut; a list keeps its notation; none means 0-15.
        assert_eq!(answer_events(Some("0-255")), "0-16");
        assert_eq!(answer_events(Some("0-11,16,32-40")), "0-11,16");
        assert_eq!(answer_events(None), "0-15");
        assert_eq!(answer_events(Some("junk")), "0-15");
        // Our own offers name what we support.
        let ours = build_offer(&cfg(), 1, 1, Direction::SendRecv).to_string();
        assert!(ours.contains("a=fmtp:101 0-16\r\n"), "{ours}");
    }

    #[test]
    fn an_unused_video_stream_with_an_odd_rtpmap_is_declined_not_fatal() {
        // RFC 4475 sdp01: video's `a=rtpmap:31 LPC` has no clock rate.
        let offer = "v=0\r\no=m 29739 7272939 IN IP4 192.0.2.5\r\ns=-\r\nc=IN IP4 192.0.2.5\r\nt=0 0\r\nm=audio 49217 RTP/AVP 0 12\r\nm=video 3227 RTP/AVP 31\r\na=rtpmap:31 LPC\r\n";
        let offer = SessionDescription::parse(offer.as_bytes()).unwrap();
        let neg = negotiate(&offer, &cfg()).unwrap();
        assert_eq!(neg.codec, Codec::Pcmu);
        let text = build_answer(&offer, &neg, &cfg(), 1, 1).to_string();
        assert!(text.contains("m=video 0 RTP/AVP 31\r\n"), "{text}");
        // The audio stream's own rtpmap is still checked.
        let bad_audio =
            "v=0\r\nc=IN IP4 192.0.2.5\r\nm=audio 49217 RTP/AVP 0\r\na=rtpmap:0 PCMU\r\n";
        assert!(matches!(
            SessionDescription::parse(bad_audio.as_bytes()),
            Err(SdpError::BadLine { .. })
        ));
    }

    #[test]
    fn hold_directions() {
        for (offered, expected) in [
            ("sendonly", Direction::RecvOnly),
            ("inactive", Direction::Inactive),
            ("recvonly", Direction::SendOnly),
        ] {
            let o = OFFER.replace("a=sendrecv", &format!("a={offered}"));
            let offer = SessionDescription::parse(o.as_bytes()).unwrap();
            let neg = negotiate(&offer, &cfg()).unwrap();
            assert_eq!(neg.local_direction, expected);
            let text = build_answer(&offer, &neg, &cfg(), 1, 2).to_string();
            assert!(text.contains(&format!("a={}\r\n", expected.as_str())));
        }
        let o = OFFER.replace("198.51.100.7", "0.0.0.0");
        let neg = negotiate(&SessionDescription::parse(o.as_bytes()).unwrap(), &cfg()).unwrap();
        assert_eq!(neg.remote_rtp, None);
    }

    #[test]
    fn no_common_codec_is_an_error() {
        let o = OFFER.replace("18 8 0 96", "18 96");
        let offer = SessionDescription::parse(o.as_bytes()).unwrap();
        assert!(matches!(
            negotiate(&offer, &cfg()),
            Err(SdpError::NoCommonCodec { .. })
        ));
    }

    #[test]
    fn dynamic_pcmu_and_missing_optional_lines() {
        let o = "v=0\nc=IN IP4 10.0.0.1\nm=audio 5004 RTP/AVP 110\na=rtpmap:110 pcmu/8000\n";
        let neg = negotiate(&SessionDescription::parse(o.as_bytes()).unwrap(), &cfg()).unwrap();
        assert_eq!((neg.codec, neg.payload_type), (Codec::Pcmu, 110));
        assert_eq!(neg.dtmf_payload_type, None);
    }

    #[test]
    fn malformed_sdp_is_typed() {
        assert_eq!(
            SessionDescription::parse(b"m=audio 1 RTP/AVP 0"),
            Err(SdpError::NoVersion)
        );
        assert!(matches!(
            SessionDescription::parse(b"v=0\r\nm=audio notaport RTP/AVP 0\r\n"),
            Err(SdpError::BadLine { line: 2, .. })
        ));
        assert!(matches!(
            SessionDescription::parse(b"v=0\r\nc=IN IP4 banana\r\n"),
            Err(SdpError::BadLine { .. })
        ));
        assert_eq!(
            SessionDescription::parse(&[0xff, 0xfe]),
            Err(SdpError::NotUtf8)
        );
        let no_c = "v=0\r\nm=audio 4000 RTP/AVP 0\r\n";
        assert_eq!(
            negotiate(&SessionDescription::parse(no_c.as_bytes()).unwrap(), &cfg()),
            Err(SdpError::NoConnection)
        );
        assert_eq!(
            negotiate(&SessionDescription::parse(b"v=0\r\n").unwrap(), &cfg()),
            Err(SdpError::NoAudio)
        );
    }

    #[test]
    fn offer_round_trips() {
        let offer = build_offer(&cfg(), 7, 1, Direction::SendRecv);
        let parsed = SessionDescription::parse(&offer.to_bytes()).unwrap();
        let neg = negotiate(&parsed, &cfg()).unwrap();
        assert_eq!(neg.codec, Codec::Pcmu);
        assert_eq!(neg.dtmf_payload_type, Some(101));
    }
}
