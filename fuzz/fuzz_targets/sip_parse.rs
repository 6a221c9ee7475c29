//! Fuzzes the SIP entry points: the parser, the TCP framer, and the user agent core that
//! every received datagram goes through. None may panic on any input.
#![no_main]

use std::time::Instant;

use callforge::sip::{
    framing::StreamFramer, parse, ParseLimits, Target, TransportKind, UaConfig, UserAgent,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = ParseLimits::default();
    let _ = parse::parse(data, &limits);

    // The same bytes as a TCP stream arriving in two pieces.
    let mut framer = StreamFramer::new(limits.max_message_size);
    let mid = data.len() / 2;
    framer.push(&data[..mid]);
    framer.push(&data[mid..]);
    while let Ok(Some(msg)) = framer.next_message() {
        let _ = parse::parse(&msg, &limits);
    }

    // Through the user agent core, twice (the second copy is a retransmission).
    let mut ua = UserAgent::new(UaConfig::default());
    let source = Target {
        addr: "127.0.0.1:5070".parse().unwrap(),
        transport: TransportKind::Udp,
    };
    let local = "127.0.0.1:5060".parse().unwrap();
    let now = Instant::now();
    ua.handle_input(data, source, local, now);
    ua.handle_input(data, source, local, now);
    while ua.poll_action().is_some() {}
    ua.handle_timeout(now + std::time::Duration::from_secs(64));
    while ua.poll_action().is_some() {}
});
