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
