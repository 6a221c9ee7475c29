//! `callforge serve` with SIP, driven by SIPp scenarios under `tests/sipp/`: every run checks
//! SIPp's exit code and its statistics file (successful calls == calls placed, none failed).

mod sip_support;

use sip_support::{assert_all_ok, sipp, start, start_logging};

#[test]
fn class4_redirect_302_has_the_scripts_contacts_in_order() {
    let s = start("");
    let run = sipp("redirect", s.udp, "447700900555", 50, &["-r", "100"]);
    assert_all_ok(&run, 50);
}

#[test]
fn class4_script_reject_becomes_604() {
    let s = start("");
    let run = sipp("reject_604", s.udp, "447700900123", 20, &["-r", "50"]);
    assert_all_ok(&run, 20);
}

#[test]
fn class5_script_answers_and_hangs_up_with_bye() {
    let s = start("");
    let run = sipp("class5_script_bye", s.udp, "5000", 20, &["-r", "20"]);
    assert_all_ok(&run, 20);
}

#[test]
fn class5_caller_hangs_up() {
    let s = start("");
    let run = sipp("class5_caller_bye", s.udp, "5001", 20, &["-r", "20"]);
    assert_all_ok(&run, 20);
}

#[test]
fn after_the_caller_hangs_up_ctx_promises_reject_with_hangup() {
    // answer_and_wait.js awaits waitForHangup(), then calls ctx.answer() and logs the
    // error's name: the script must see a catchable error named "Hangup".
    let log = tempfile::NamedTempFile::new().unwrap();
    let s = start_logging("", Some(log.path()));
    let run = sipp("class5_caller_bye", s.udp, "5001", 3, &["-r", "10"]);
    assert_all_ok(&run, 3);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(log.path()).unwrap();
        let seen = text
            .matches(r#"ctx.log: after hang-up: Hangup {"by":"remote"}"#)
            .count();
        // Asked again once the call is over, waitForHangup() still knows who hung up.
        let again = text
            .matches(r#"ctx.log: waitForHangup after the end: {"by":"remote"}"#)
            .count();
        if seen == 3 && again == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "saw {seen} and {again} of 3:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn class5_cancel_before_answer_gets_487() {
    let s = start("");
    let run = sipp("class5_cancel", s.udp, "5002", 20, &["-r", "20"]);
    assert_all_ok(&run, 20);
}

#[test]
fn options_is_answered() {
    let s = start("");
    let run = sipp("options", s.udp, "probe", 20, &["-r", "50"]);
    assert_all_ok(&run, 20);
}

#[test]
fn reinvite_hold_is_answered_recvonly() {
    let s = start("");
    let run = sipp("class5_hold", s.udp, "5001", 20, &["-r", "20"]);
    assert_all_ok(&run, 20);
}

#[test]
fn tcp_transport_class5_and_class4() {
    let s = start("");
    let run = sipp(
        "class5_script_bye",
        s.tcp,
        "5000",
        20,
        &["-t", "t1", "-r", "20"],
    );
    assert_all_ok(&run, 20);
    let run = sipp(
        "redirect",
        s.tcp,
        "447700900555",
        20,
        &["-t", "t1", "-r", "50"],
    );
    assert_all_ok(&run, 20);
}

#[test]
fn ten_percent_packet_loss_every_call_completes() {
    // A short T1 so the server's retransmissions (2xx, BYE, 302) recover losses quickly.
    let s = start("t1_ms = 100");
    let run = sipp(
        "class5_caller_bye",
        s.udp,
        "5001",
        30,
        &["-lost", "10", "-r", "30"],
    );
    assert_all_ok(&run, 30);
    let run = sipp(
        "redirect",
        s.udp,
        "447700900555",
        30,
        &["-lost", "10", "-r", "30"],
    );
    assert_all_ok(&run, 30);
}
