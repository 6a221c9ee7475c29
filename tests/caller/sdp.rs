//! Just enough SDP for the test peers: read an offer or answer's audio line, write our own.

use std::net::SocketAddr;

use super::codec::Codec;

/// The audio part of an SDP body.
#[derive(Debug, Clone, PartialEq)]
pub struct Sdp {
    /// Where RTP goes: the (media- or session-level) `c=` address and the `m=audio` port.
    pub rtp: Option<SocketAddr>,
    /// The `m=audio` payload types, in order of preference.
    pub payloads: Vec<u8>,
    /// `a=rtpmap` lines as (payload type, encoding name, clock rate).
    pub rtpmap: Vec<(u8, String, u32)>,
    /// `sendrecv`, `sendonly`, `recvonly` or `inactive` (`sendrecv` when absent).
    pub direction: String,
    /// The whole body as received.
    pub raw: String,
}

impl Sdp {
    /// Parses the first `m=audio` section; `None` when the body has none.
    pub fn parse(body: &str) -> Option<Sdp> {
        let mut session_ip = None;
        let mut media_ip = None;
        let mut port = None;
        let mut payloads = Vec::new();
        let mut rtpmap = Vec::new();
        let mut direction = None;
        let mut in_audio = false;
        let mut seen_audio = false;
        for line in body.lines().map(str::trim) {
            if let Some(m) = line.strip_prefix("m=") {
                if seen_audio {
                    break; // only the first audio section
                }
                in_audio = m.starts_with("audio ");
                if in_audio {
                    seen_audio = true;
                    let mut parts = m.split_whitespace().skip(1);
                    port = parts
                        .next()
                        .and_then(|p| p.split('/').next()?.parse::<u16>().ok());
                    payloads = parts.skip(1).filter_map(|p| p.parse().ok()).collect();
                }
                continue;
            }
            if let Some(c) = line.strip_prefix("c=") {
                let ip = c
                    .split_whitespace()
                    .nth(2)
                    .map(|a| a.split('/').next().unwrap_or(a));
                if in_audio {
                    media_ip = ip.map(str::to_string);
                } else if !seen_audio {
                    session_ip = ip.map(str::to_string);
                }
                continue;
            }
            if !in_audio && seen_audio {
                continue;
            }
            if let Some(map) = line.strip_prefix("a=rtpmap:") {
                let mut it = map.splitn(2, ' ');
                let (Some(pt), Some(enc)) = (it.next(), it.next()) else {
                    continue;
                };
                let mut enc = enc.split('/');
                if let (Ok(pt), Some(name)) = (pt.parse(), enc.next()) {
                    let rate = enc.next().and_then(|r| r.parse().ok()).unwrap_or(8000);
                    rtpmap.push((pt, name.to_string(), rate));
                }
            } else if let Some(d) = line.strip_prefix("a=") {
                if matches!(d, "sendrecv" | "sendonly" | "recvonly" | "inactive")
                    && (in_audio || direction.is_none())
                {
                    direction = Some(d.to_string());
                }
            }
        }
        if !seen_audio {
            return None;
        }
        let ip = media_ip.or(session_ip);
        let rtp = match (ip, port) {
            (Some(ip), Some(port)) => format!("{ip}:{port}")
                .parse()
                .ok()
                .or_else(|| format!("[{ip}]:{port}").parse().ok()),
            _ => None,
        };
        Some(Sdp {
            rtp,
            payloads,
            rtpmap,
            direction: direction.unwrap_or_else(|| "sendrecv".into()),
            raw: body.to_string(),
        })
    }

    /// The encoding name of a payload type: its rtpmap, or the static assignment.
    pub fn encoding(&self, pt: u8) -> Option<String> {
        self.rtpmap
            .iter()
            .find(|(p, _, _)| *p == pt)
            .map(|(_, name, _)| name.clone())
            .or_else(|| Codec::from_pt(pt).map(|c| c.name().to_string()))
    }

    /// The payload type this SDP uses for `codec`, if it lists it.
    pub fn pt_for(&self, codec: Codec) -> Option<u8> {
        self.payloads.iter().copied().find(|&pt| {
            self.encoding(pt)
                .is_some_and(|name| name.eq_ignore_ascii_case(codec.name()))
        })
    }

    /// The first listed payload type that is one of ours, with its codec.
    pub fn first_codec(&self) -> Option<(Codec, u8)> {
        self.payloads.iter().find_map(|&pt| {
            self.encoding(pt)
                .and_then(|n| Codec::from_name(&n))
                .map(|c| (c, pt))
        })
    }

    /// The payload type of `telephone-event/8000`, if listed.
    pub fn telephone_event(&self) -> Option<u8> {
        self.payloads.iter().copied().find(|&pt| {
            self.rtpmap.iter().any(|(p, name, rate)| {
                *p == pt && name.eq_ignore_ascii_case("telephone-event") && *rate == 8000
            })
        })
    }

    /// The `m=audio` line as received, for error messages.
    pub fn m_line(&self) -> &str {
        self.raw
            .lines()
            .find(|l| l.starts_with("m=audio"))
            .unwrap_or("(no m=audio line)")
    }
}

/// An SDP body for one audio stream: `codecs` as (payload type, codec) in order, then
/// telephone-event on `dtmf_pt` when given.
pub fn sdp_body(
    user: &str,
    version: u32,
    rtp: SocketAddr,
    codecs: &[(u8, Codec)],
    dtmf_pt: Option<u8>,
    direction: &str,
) -> String {
    let ip = rtp.ip();
    let family = if ip.is_ipv4() { "IP4" } else { "IP6" };
    let mut pts: Vec<String> = codecs.iter().map(|(pt, _)| pt.to_string()).collect();
    if let Some(te) = dtmf_pt {
        pts.push(te.to_string());
    }
    let mut body = format!(
        "v=0\r\no={user} 1 {version} IN {family} {ip}\r\ns=-\r\nc=IN {family} {ip}\r\nt=0 0\r\nm=audio {} RTP/AVP {}\r\n",
        rtp.port(),
        pts.join(" ")
    );
    for (pt, codec) in codecs {
        body.push_str(&format!("a=rtpmap:{pt} {}/8000\r\n", codec.name()));
    }
    if let Some(te) = dtmf_pt {
        body.push_str(&format!(
            "a=rtpmap:{te} telephone-event/8000\r\na=fmtp:{te} 0-16\r\n"
        ));
    }
    body.push_str(&format!("a=ptime:20\r\na={direction}\r\n"));
    body
}
