//! Test-only helpers: a deterministic PRNG and a reader for the pcap fixtures.
//!
//! The pcap reader takes classic pcap (not pcapng) with the Ethernet link type and IPv4/UDP
//! frames, and yields each UDP payload. It panics on anything else, which in a test is the
//! right report of a broken fixture.

/// xorshift32: deterministic, seedable noise for tests (seed 0 is mapped to 1).
pub(crate) struct XorShift(u32);

impl XorShift {
    pub(crate) fn new(seed: u32) -> Self {
        XorShift(seed.max(1))
    }

    pub(crate) fn next_u32(&mut self) -> u32 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        x
    }
}

/// Directory of the binary fixtures.
pub(crate) const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// The SIPp RFC 2833 captures and the digit each one carries.
pub(crate) fn sipp_dtmf_cases() -> Vec<(String, char)> {
    (0..10u8)
        .map(|n| (format!("dtmf_2833_{n}.pcap"), char::from(b'0' + n)))
        .chain([
            ("dtmf_2833_pound.pcap".to_string(), '#'),
            ("dtmf_2833_star.pcap".to_string(), '*'),
        ])
        .collect()
}

/// Minimal pcap reader for the fixtures: yields the UDP payloads of Ethernet/IPv4 frames.
pub(crate) fn udp_payloads(bytes: &[u8]) -> Vec<Vec<u8>> {
    assert!(bytes.len() >= 24, "pcap global header");
    let le = match bytes[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] => false,
        _ => panic!("not a pcap file"),
    };
    let u32_at = |b: &[u8], o: usize| {
        let a = [b[o], b[o + 1], b[o + 2], b[o + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    assert_eq!(u32_at(bytes, 20), 1, "link type must be Ethernet");
    let mut out = Vec::new();
    let mut off = 24;
    while off + 16 <= bytes.len() {
        let incl = u32_at(bytes, off + 8) as usize;
        let frame = &bytes[off + 16..off + 16 + incl];
        off += 16 + incl;
        assert_eq!(&frame[12..14], &[0x08, 0x00], "IPv4 ethertype");
        let ip = &frame[14..];
        assert_eq!(ip[9], 17, "UDP");
        let ihl = usize::from(ip[0] & 0x0F) * 4;
        let udp = &ip[ihl..];
        let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
        out.push(udp[8..udp_len].to_vec());
    }
    out
}
