//! The IVR driven by SIPp, an independent caller: it hears the welcome, presses 1 by playing
//! SIPp's own RFC 4733 pcap, and checks that the BYE ending the call carries the branch the
//! script took (`X-IVR-Choice: 1`). Several calls at once, each must succeed.

mod sip_support;

use std::path::Path;

use sip_support::{assert_all_ok, sipp_file, ROOT};

#[test]
fn sipp_presses_1_from_a_pcap_and_the_ivr_takes_the_sales_branch() {
    let media = tempfile::tempdir().unwrap();
    let extra = format!(
        "[media]\ndir = \"{ROOT}/media\"\nrecordings = \"{}\"\n[[route]]\nmatch = \"^7000$\"\nscript = \"ivr.js\"\nmode = \"class5\"\n",
        media.path().display()
    );
    let server = sip_support::start(&extra);
    // SIPp resolves pcap paths from its working folder: point the scenario at the fixture.
    let scenario = std::fs::read_to_string(Path::new(ROOT).join("tests/sipp/ivr_press_1.xml"))
        .unwrap()
        .replace(
            "tests/fixtures/dtmf_2833_1.pcap",
            &format!("{ROOT}/tests/fixtures/dtmf_2833_1.pcap"),
        );
    let path = media.path().join("ivr_press_1.xml");
    std::fs::write(&path, scenario).unwrap();
    let run = sipp_file(&path, server.udp, "7000", 3, &["-l", "3"]);
    assert_all_ok(&run, 3);
}

#[test]
fn a_prompt_the_callers_bye_cuts_short_rejects_with_hangup_every_time() {
    // The issue: about half of these resolved {status: "stopped"} instead.
    let log = tempfile::NamedTempFile::new().unwrap();
    let extra = format!(
        "[media]\ndir = \"{ROOT}/media\"\n[[route]]\nmatch = \"^5005$\"\nscript = \"play_until_hangup.js\"\nmode = \"class5\"\n"
    );
    let server = sip_support::start_logging(&extra, Some(log.path()));
    let calls = 30;
    let run = sip_support::sipp(
        "class5_caller_bye",
        server.udp,
        "5005",
        calls,
        &["-r", "30"],
    );
    assert_all_ok(&run, calls as u64);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(log.path()).unwrap();
        let rejected = text.matches("ctx.log: play rejected: Hangup").count();
        let resolved = text.matches("ctx.log: play resolved").count();
        let by_remote = text.matches("ctx.log: hung up by remote").count();
        assert_eq!(resolved, 0, "play resolved instead of rejecting:\n{text}");
        if rejected == calls as usize && by_remote == calls as usize {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{rejected} of {calls} rejected with Hangup, {by_remote} said by remote:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
