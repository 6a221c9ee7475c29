//! The RFC 4475 torture messages (tests/data/rfc4475/, byte-exact) sent to the real server
//! over UDP while a call is up: the call is untouched (its BYE is answered, its script sees
//! the hang-up), new calls still work, nothing panics, and each message costs at most one
//! warning line. What each message gets is checked field by field at the user agent level in
//! `src/sip/ua/tests_rfc4475.rs` (answers go to the Via of each message, not to this test).

mod caller;
mod sip_support;

use std::{path::Path, time::Duration};

use caller::Call;

#[tokio::test]
async fn the_rfc4475_corpus_over_udp_leaves_a_live_call_and_the_server_untouched() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let server = sip_support::start_logging("", Some(log.path()));
    // answer_and_wait.js: up until the caller hangs up.
    let mut call = Call::place(server.udp, "5001").await.unwrap();

    let dir = Path::new(sip_support::ROOT).join("tests/data/rfc4475");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dat"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 50);
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for round in 0..3 {
        for f in &files {
            sock.send_to(&std::fs::read(f).unwrap(), server.udp)
                .unwrap_or_else(|e| panic!("round {round}, {}: {e}", f.display()));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert_eq!(call.bye().await.unwrap(), 200, "the call that was up");
    let after = Call::place(server.udp, "5000").await.unwrap();
    assert!(
        after.wait_for_bye(Duration::from_secs(5)).await.is_some(),
        "a new call is answered and hung up by its script"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert!(!text.contains("panicked"), "{text}");
    let warnings = text.lines().filter(|l| l.contains(" WARN ")).count();
    assert!(
        warnings <= 3 * files.len(),
        "{warnings} warnings for {} messages:\n{text}",
        3 * files.len()
    );
    assert!(
        text.contains("ctx.log: after hang-up: Hangup"),
        "the call's script saw the caller's hang-up:\n{text}"
    );
}
