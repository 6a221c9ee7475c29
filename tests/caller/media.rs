//! Reference audio for correlation: the RTP inside a pcap (what SIPp's `play_pcap_audio`
//! sends) and the samples of a WAV prompt, both decoded with the peers' own G.711.

use std::path::Path;

use super::codec::Codec;

/// The A-law recording Debian's sip-tester package installs; `tests/sipp/uas_answer.xml`
/// plays it (236 packets of 30 ms, payload type 8).
pub const SIPP_G711A_PCAP: &str = "/usr/share/sip-tester/g711a.pcap";

/// One RTP packet read from a capture.
#[derive(Debug, Clone)]
pub struct CapturedRtp {
    pub pt: u8,
    pub seq: u16,
    pub ts: u32,
    pub ssrc: u32,
    pub payload: Vec<u8>,
}

/// The RTP packets (UDP over IPv4 or IPv6) in a classic libpcap file, in capture order.
/// Link types: Ethernet (with or without one 802.1Q tag), Linux cooked, BSD loopback, raw IP.
pub fn pcap_rtp(path: &Path) -> Result<Vec<CapturedRtp>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() < 24 {
        return Err(format!("{}: too short for a pcap header", path.display()));
    }
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    let little = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => return Err(format!("{}: not a libpcap file", path.display())),
    };
    let u32_at = |b: &[u8], at: usize| -> u32 {
        let w = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if little {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    let link = u32_at(&bytes, 20);
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let len = u32_at(&bytes, at + 8) as usize;
        let frame = bytes
            .get(at + 16..at + 16 + len)
            .ok_or_else(|| format!("{}: truncated packet at byte {at}", path.display()))?;
        at += 16 + len;
        if let Some(udp) = udp_payload(link, frame) {
            if let Some(rtp) = parse_rtp(udp) {
                out.push(rtp);
            }
        }
    }
    Ok(out)
}

fn udp_payload(link: u32, frame: &[u8]) -> Option<&[u8]> {
    let (ethertype, ip) = match link {
        1 => {
            let mut et = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
            let mut off = 14;
            if et == 0x8100 {
                et = u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]);
                off = 18;
            }
            (et, frame.get(off..)?)
        }
        113 => (
            u16::from_be_bytes([*frame.get(14)?, *frame.get(15)?]),
            frame.get(16..)?,
        ),
        0 | 108 => (0, frame.get(4..)?),
        101 | 228 | 229 => (0, frame),
        _ => return None,
    };
    let version = ip.first()? >> 4;
    let (proto, l4) = match (ethertype, version) {
        (0x0800, 4) | (0, 4) => {
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            (*ip.get(9)?, ip.get(ihl..)?)
        }
        (0x86dd, 6) | (0, 6) => (*ip.get(6)?, ip.get(40..)?),
        _ => return None,
    };
    if proto != 17 {
        return None;
    }
    let udp_len = u16::from_be_bytes([*l4.get(4)?, *l4.get(5)?]) as usize;
    l4.get(8..udp_len.max(8).min(l4.len()))
}

fn parse_rtp(p: &[u8]) -> Option<CapturedRtp> {
    if p.len() < 12 || p[0] >> 6 != 2 {
        return None;
    }
    let start = 12 + 4 * (p[0] & 0x0f) as usize;
    Some(CapturedRtp {
        pt: p[1] & 0x7f,
        seq: u16::from_be_bytes([p[2], p[3]]),
        ts: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
        ssrc: u32::from_be_bytes([p[8], p[9], p[10], p[11]]),
        payload: p.get(start..)?.to_vec(),
    })
}

/// The G.711 audio in a pcap (payload types 0 and 8), decoded in capture order: the
/// reference to correlate with what a peer heard when SIPp played that pcap.
pub fn pcap_audio(path: &Path) -> Result<Vec<i16>, String> {
    let audio: Vec<i16> = pcap_rtp(path)?
        .iter()
        .filter_map(|p| Codec::from_pt(p.pt).map(|c| c.decode(&p.payload)))
        .flatten()
        .collect();
    if audio.is_empty() {
        return Err(format!("{}: no PCMU or PCMA packets", path.display()));
    }
    Ok(audio)
}

/// The samples of an 8 kHz mono WAV: µ-law (the shipped prompts), A-law or 16-bit PCM.
pub fn read_wav(path: &Path) -> Result<Vec<i16>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err(format!("{}: not a RIFF/WAVE file", path.display()));
    }
    let mut format = None;
    let mut at = 12;
    while at + 8 <= bytes.len() {
        let id = &bytes[at..at + 4];
        let len = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]])
            as usize;
        let body = bytes
            .get(at + 8..(at + 8 + len).min(bytes.len()))
            .unwrap_or_default();
        if id == b"fmt " && body.len() >= 16 {
            let tag = u16::from_le_bytes([body[0], body[1]]);
            let channels = u16::from_le_bytes([body[2], body[3]]);
            let rate = u32::from_le_bytes([body[4], body[5], body[6], body[7]]);
            let bits = u16::from_le_bytes([body[14], body[15]]);
            if channels != 1 || rate != 8000 {
                return Err(format!(
                    "{}: {channels} channel(s) at {rate} Hz, want mono 8 kHz",
                    path.display()
                ));
            }
            format = Some((tag, bits));
        }
        if id == b"data" {
            return match format {
                Some((7, _)) => Ok(Codec::Pcmu.decode(body)),
                Some((6, _)) => Ok(Codec::Pcma.decode(body)),
                Some((1, 16)) => Ok(body
                    .chunks_exact(2)
                    .map(|c| i16::from_le_bytes([c[0], c[1]]))
                    .collect()),
                other => Err(format!("{}: unsupported format {other:?}", path.display())),
            };
        }
        at += 8 + len + (len & 1);
    }
    Err(format!("{}: no data chunk", path.display()))
}
