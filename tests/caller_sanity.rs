//! The test caller itself, checked against SIPp as an independent far end: SIPp's built-in
//! UAS answers and echoes RTP (`-rtp_echo`), so what we send must come back and correlate.

mod caller;

use std::{net::SocketAddr, process::Stdio, time::Duration};

use caller::{best_correlation, decode_ulaw, tone, Call};

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port")
}

#[tokio::test]
async fn caller_places_a_call_sends_audio_and_hears_the_echo() {
    let sip_port = free_udp_port();
    let media_port = free_udp_port() & !1;
    let mut sipp = tokio::process::Command::new("sipp")
        .args(["-sn", "uas", "-i", "127.0.0.1", "-p", &sip_port.to_string()])
        .args([
            "-mi",
            "127.0.0.1",
            "-mp",
            &media_port.to_string(),
            "-rtp_echo",
        ])
        .args(["-m", "1", "-bg", "-timeout", "20s", "-timeout_error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("sipp is installed (tools/ensure-deps.sh --test)");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server: SocketAddr = format!("127.0.0.1:{sip_port}").parse().unwrap();
    let mut call = Call::place(server, "echo").await.expect("SIPp answers");
    let reference = tone(&[440.0, 1200.0], 800, 8000.0);
    call.send_audio(&reference).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let heard = decode_ulaw(&call.audio_packets());
    let (score, _) = best_correlation(&heard, &reference[1600..4800]);
    assert!(score > 0.9, "echo correlates with what we sent: {score}");
    assert_eq!(call.bye().await, Ok(200));
    let _ = sipp.wait().await;
}

#[test]
fn ulaw_matches_the_g711_reference_points() {
    // Reference points of G.711 µ-law: silence, the segment edges, full scale.
    assert_eq!(caller::linear_to_ulaw(0), 0xff);
    assert_eq!(caller::linear_to_ulaw(-1), 0x7f);
    assert_eq!(caller::linear_to_ulaw(32767), 0x80);
    assert_eq!(caller::linear_to_ulaw(-32768), 0x00);
    for code in 0..=255u8 {
        let back = caller::linear_to_ulaw(caller::ulaw_to_linear(code));
        // 0x7f (negative zero) maps to 0xff; every other code round-trips.
        if code != 0x7f {
            assert_eq!(back, code, "code {code:#x}");
        }
    }
}
