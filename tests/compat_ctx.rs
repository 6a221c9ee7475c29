//! ConnexCS's class5 `ctx`, end to end: the published ScriptForge examples
//! (`tests/fixtures/scriptforge/`, our own-words equivalents; or the published scripts unchanged when `CALLFORGE_SCRIPTFORGE_DIR` names a checkout) run on real calls from the in-repo caller, which
//! checks what it hears (prompts by correlation, speech by energy, its own echo) and presses
//! keys; bridges go to the in-repo callee through a trunk. Small scripts of our own then pin
//! the stub's rules the examples do not reach: `blockDtmf()`'s default, `waitFor`, `ctx.on`,
//! `bridge`'s `continue_on` strings, `ivr`'s `transfer_on_failure` and `set(.., skipWrite)`.

mod caller;
mod scriptforge_examples;
mod sip_support;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use caller::{best_correlation, read_wav, tone, AcceptOpts, Call, Callee, Codec};
use sip_support::Server;

const SECOND: Duration = Duration::from_secs(1);

/// Each published example answers on its own name: `sip:ctx-echo@...` runs `ctx-echo.js`.
const PUBLISHED: &[&str] = &[
    "ctx-answer",
    "ctx-blockdtmf",
    "ctx-bridge",
    "ctx-echo",
    "ctx-example",
    "ctx-ivr",
    "ctx-play",
    "ctx-set-get",
    "ctx-tts",
    "simple-calling-card",
];

/// Scripts of our own, for the stub's rules no published example exercises.
const OURS: &[(&str, &str)] = &[
    (
        "block-default",
        r##"async function main(data, ctx) {
  ctx.blockDtmf();
  await ctx.answer();
  const r = await ctx.collect({ max: 4, timeout: 4000, interDigitTimeout: 1500, terminators: "" });
  ctx.header("X-Collected", r.status + ":" + r.value);
  await ctx.hangup();
}"##,
    ),
    (
        "wait-for",
        r##"async function main(data, ctx) {
  await ctx.answer();
  const out = [];
  out.push(await ctx.waitFor("\\d{3}#", "*", 10));
  out.push(await ctx.waitFor((keys) => keys.length >= 2 && "got " + keys, "*"));
  const started = Date.now();
  try { await ctx.waitFor("9", "*", 1); } catch (e) { out.push(e.name + (Date.now() - started >= 900 ? " after 1 s" : " too soon")); }
  try { await ctx.waitFor("9", "*"); } catch (e) { out.push(e.name + " " + e.digits); }
  ctx.header("X-Wait", out.join("|"));
  await ctx.hangup();
}"##,
    ),
    (
        "on-events",
        r##"async function main(data, ctx) {
  const keys = [];
  let three;
  const done = new Promise((r) => { three = r; });
  ctx.on("dtmf", (k) => { keys.push(k); if (keys.length === 3) three(); });
  const removed = () => console.log("a removed handler ran");
  ctx.on("dtmf", removed).off("dtmf", removed);
  ctx.on("hangup", (how) => console.log("hangup event by " + how.by));
  // Handlers set before answer do not answer the call.
  await ctx.sleep(1000);
  await ctx.answer();
  await done;
  console.log("keys by ctx.on: " + keys.join(""));
  await ctx.waitForHangup();
}"##,
    ),
    (
        "continue-on",
        r##"async function main(data, ctx) {
  ctx.set("sip_h_X-Account", "42");
  ctx.set("sip_h_X-Local", "kept", true);
  await ctx.answer();
  const r = await ctx.bridge(ctx.header("X-To"), ctx.header("X-Continue-On"));
  ctx.header("X-After", r.status + " " + r.sipCode + " " + ctx.get("sip_h_X-Local"));
  await ctx.play("ivr/goodbye.wav");
  await ctx.hangup();
}"##,
    ),
    (
        "to-menu",
        r##"async function main(data, ctx) {
  await ctx.answer();
  ctx.set("lang", "en");
  const r = await ctx.destination("menu-app", { greeting: "ivr/welcome.wav" });
  ctx.header("X-Dest", r.choice + " " + r.lang + " " + r.to);
  await ctx.hangup();
}"##,
    ),
    (
        "menu-app",
        r##"async function main(data, ctx) {
  await ctx.play(data.greeting);
  const { value } = await ctx.ivr(null, 5, 1, 1);
  return { choice: value, lang: ctx.get("lang"), to: data.to_user };
}"##,
    ),
    (
        "bad-input",
        r##"async function main(data, ctx) {
  await ctx.answer();
  const seen = [];
  const attempt = async (what, f) => {
    try { await f(); seen.push(what + ":ok"); } catch (e) { seen.push(what + ":" + e.name); }
  };
  await attempt("waitFor-regexp", () => ctx.waitFor("(", "*", 1));
  await attempt("waitFor-none", () => ctx.waitFor());
  await attempt("on-event", () => ctx.on("transcription", () => {}));
  await attempt("on-fn", () => ctx.on("dtmf", 42));
  await attempt("continue_on", () => ctx.bridge("1001", "sometimes"));
  await attempt("transfer_on_failure", () => ctx.ivr(null, 1, 1, 1, "#", { transfer_on_failure: {} }));
  await attempt("destination", () => ctx.destination("no-such-script"));
  await attempt("blockDtmf", () => ctx.blockDtmf({}));
  ctx.header("X-Errors", seen.join(" "));
  await ctx.hangup();
}"##,
    ),
    (
        "implicit-twice",
        r##"async function main(data, ctx) {
  const [said, keys] = await Promise.all([ctx.play("ivr/welcome.wav"), ctx.waitFor("42", "*", 10)]);
  ctx.header("X-Both", said.status + " " + keys);
  await ctx.hangup();
}"##,
    ),
    (
        "block-bridge",
        r##"async function main(data, ctx) {
  ctx.blockDtmf("12");
  await ctx.bridge(ctx.header("X-To"));
}"##,
    ),
    (
        "ivr-transfer",
        r##"async function main(data, ctx) {
  await ctx.answer();
  const r = await ctx.ivr("tone:400,300", 1, 1, 1, "#", { transfer_on_failure: "1009" });
  console.log("ivr ended " + r.status + ", transfer " + r.transfer.status);
}"##,
    ),
];

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A running server, its media folder and its log.
struct Rig {
    server: Server,
    _media: tempfile::TempDir,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Rig {
    /// The server's log so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has `needle` (the script's console output arrives after the BYE).
    async fn log_has(&self, needle: &str) -> bool {
        let until = Instant::now() + 5 * SECOND;
        while Instant::now() < until {
            if self.log().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

/// A server with a route per script above, the shipped prompts plus the ConnexCS file names
/// the examples play (`user/welcome.wav`, `ivr/ivr-aint_nobody_got_time_for_that.wav`,
/// `user/calling_card_ivr.wav`, copies of shipped prompts), and `extra` config (trunks).
fn rig(extra: &str) -> Rig {
    let root = Path::new(sip_support::ROOT);
    let media = tempfile::tempdir().unwrap();
    copy_dir(&root.join("media/ivr"), &media.path().join("ivr"));
    std::fs::create_dir_all(media.path().join("user")).unwrap();
    for (from, to) in [
        ("ivr/welcome.wav", "user/welcome.wav"),
        ("ivr/menu.wav", "ivr/ivr-aint_nobody_got_time_for_that.wav"),
        ("ivr/enter_number.wav", "user/calling_card_ivr.wav"),
    ] {
        std::fs::copy(root.join("media").join(from), media.path().join(to)).unwrap();
    }
    let routes: String = PUBLISHED
        .iter()
        .copied()
        .chain(OURS.iter().map(|(n, _)| *n))
        .map(|n| {
            format!("[[route]]\nmatch = \"^{n}$\"\nscript = \"{n}.js\"\nmode = \"class5\"\n\n")
        })
        .collect();
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("callforge.log");
    let server = sip_support::start_logging(
        &format!(
            "[media]\ndir = \"{}\"\n{extra}\n{routes}",
            media.path().display()
        ),
        Some(&log),
    );
    // Scripts are loaded when a call first needs them.
    let scripts = server.dir.path().join("scripts");
    for name in PUBLISHED {
        std::fs::copy(
            scriptforge_examples::dir().join(format!("{name}.js")),
            scripts.join(format!("{name}.js")),
        )
        .unwrap();
    }
    for (name, source) in OURS {
        std::fs::write(scripts.join(format!("{name}.js")), source).unwrap();
    }
    Rig {
        server,
        _media: media,
        log,
        _log_dir: log_dir,
    }
}

/// A rig whose default trunk leads to an in-repo callee.
async fn rig_with_callee() -> (Rig, Callee) {
    let callee = Callee::listen(Codec::Pcmu).await;
    let rig = rig(&format!(
        "[[trunk]]\nname = \"pstn\"\nuri = \"{}\"\n",
        callee.sip_addr()
    ));
    (rig, callee)
}

fn prompt(name: &str) -> Vec<i16> {
    read_wav(&Path::new(sip_support::ROOT).join("media/ivr").join(name)).unwrap()
}

/// The middle of `reference` is in `heard` with a normalised correlation above 0.9.
fn assert_heard(heard: &[i16], reference: &[i16], what: &str) {
    let mid = reference.len() / 2;
    let window = &reference[mid.saturating_sub(4000)..(mid + 4000).min(reference.len())];
    let (score, _) = best_correlation(heard, window);
    assert!(score > 0.9, "{what}: correlation {score:.3}");
}

/// 20 ms frames whose peak passes speech level.
fn loud_frames(heard: &[i16]) -> usize {
    heard
        .chunks(160)
        .filter(|c| c.iter().map(|&s| (s as i32).abs()).max().unwrap_or(0) > 2000)
        .count()
}

#[tokio::test]
async fn ctx_answer_answers_and_the_call_ends_when_the_script_does() {
    let rig = rig("");
    let call = Call::place(rig.server.udp, "ctx-answer")
        .await
        .expect("the script answers");
    assert!(
        call.wait_for_bye(5 * SECOND).await.is_some(),
        "the script ends, so does the call"
    );
    assert!(!rig.log().contains("class5 script ended with an error"));
}

/// ctx-example, ctx-tts and ctx-set-get answer, speak, and the call ends.
async fn speaks_then_ends(user: &str, min_loud: usize) -> Rig {
    let rig = rig("");
    let call = Call::place(rig.server.udp, user).await.expect("answered");
    call.wait_for_bye(30 * SECOND)
        .await
        .unwrap_or_else(|| panic!("{user}: BYE after speaking"));
    let loud = loud_frames(&call.received_audio());
    assert!(
        loud > min_loud,
        "{user}: the caller hears speech ({loud} loud frames)"
    );
    assert!(
        !rig.log().contains("class5 script ended with an error"),
        "{user}: {}",
        rig.log()
    );
    rig
}

#[tokio::test]
async fn ctx_example_says_hello_world_and_hangs_up() {
    speaks_then_ends("ctx-example", 25).await;
}

#[tokio::test]
async fn ctx_tts_speaks_its_message() {
    speaks_then_ends("ctx-tts", 25).await;
}

#[tokio::test]
async fn ctx_set_get_reads_back_what_it_set_and_speaks_it_twice() {
    let rig = speaks_then_ends("ctx-set-get", 40).await;
    // The value the script stores, read from the script itself (fixture or published one).
    let source = scriptforge_examples::source("ctx-set-get");
    let stored = regex::Regex::new(r"ctx\.set\('greeting',\s*'([^']+)'\)")
        .unwrap()
        .captures(&source)
        .expect("the script sets 'greeting'")[1]
        .to_string();
    assert!(
        rig.log_has(&stored).await,
        "get returns what set stored: {}",
        rig.log()
    );
}

#[tokio::test]
async fn ctx_play_plays_both_files_from_the_user_and_ivr_folders() {
    let rig = rig("");
    let call = Call::place(rig.server.udp, "ctx-play")
        .await
        .expect("answered");
    call.wait_for_bye(40 * SECOND)
        .await
        .expect("BYE after both files");
    let heard = call.received_audio();
    assert_heard(&heard, &prompt("welcome.wav"), "user/welcome.wav");
    assert_heard(
        &heard,
        &prompt("menu.wav"),
        "ivr/ivr-aint_nobody_got_time_for_that.wav",
    );
}

#[tokio::test]
async fn ctx_echo_answers_implicitly_and_the_caller_hears_themselves() {
    let rig = rig("");
    let mut call = Call::place(rig.server.udp, "ctx-echo")
        .await
        .expect("echo before answer() answers the call instead of failing");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let said = tone(&[660.0, 990.0], 1000, 9000.0);
    call.send_audio(&said).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (score, _) = best_correlation(&call.received_audio(), &said[2000..6000]);
    assert!(score > 0.9, "the caller heard themselves: {score:.3}");
    // callforge's echo ends on a key; the script then ends and so does the call.
    call.send_digits("5").await;
    assert!(call.wait_for_bye(5 * SECOND).await.is_some());
    let log = rig.log();
    assert_eq!(
        log.matches("answering the call implicitly").count(),
        1,
        "the implicit answer is logged once: {log}"
    );
}

#[tokio::test]
async fn ctx_blockdtmf_before_answer_neither_fails_nor_answers() {
    let rig = rig("");
    let refused = match Call::place(rig.server.udp, "ctx-blockdtmf").await {
        Ok(_) => panic!("the script never answers"),
        Err(e) => e,
    };
    assert!(
        refused.contains("480"),
        "a script that ends without answering gets 480, not a 500: {refused}"
    );
    assert!(!rig.log().contains("class5 script ended with an error"));
}

#[tokio::test]
async fn block_dtmf_without_digits_blocks_the_ten_digits_before_and_after_answer() {
    let rig = rig("");
    let mut call = Call::place(rig.server.udp, "block-default")
        .await
        .expect("answered");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The stub's default is '0123456789': * and # still reach the script.
    call.send_digits("12*3#4").await;
    let bye = call.wait_for_bye(10 * SECOND).await.expect("BYE");
    assert_eq!(bye.header("X-Collected"), Some("success:*#"));
}

#[tokio::test]
async fn ctx_bridge_connects_the_caller_through_the_default_trunk() {
    let (rig, mut callee) = rig_with_callee().await;
    let (call, invite) = tokio::join!(
        Call::place(rig.server.udp, "ctx-bridge"),
        callee.accept(AcceptOpts::answer_after(200))
    );
    let mut call = call.expect("the callee's answer answers the caller");
    let invite = invite.unwrap();
    assert_eq!(invite.user(), "441234567890");
    let (welcome, support) = (prompt("welcome.wav"), prompt("support.wav"));
    tokio::join!(call.send_audio(&welcome), callee.send_audio(&support));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_heard(
        &callee.received_audio(),
        &welcome,
        "the callee hears the caller",
    );
    assert_heard(
        &call.received_audio(),
        &support,
        "the caller hears the callee",
    );
    assert_eq!(callee.bye().await.unwrap(), 200);
    assert!(call.wait_for_bye(5 * SECOND).await.is_some());
}

#[tokio::test]
async fn ctx_ivr_pressing_1_routes_to_1002() {
    let (rig, mut callee) = rig_with_callee().await;
    let mut call = Call::place(rig.server.udp, "ctx-ivr")
        .await
        .expect("answered");
    // After welcome.wav (1.8 s): the key counts within ivr's 15 s timeout.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    call.send_digits("1").await;
    let invite = callee
        .accept(AcceptOpts::answer_after(100))
        .await
        .expect("the script bridges after its message");
    assert_eq!(invite.user(), "1002");
    let heard = call.received_audio();
    assert_heard(&heard, &prompt("welcome.wav"), "user/welcome.wav");
    assert!(
        loud_frames(&heard[16000..]) > 25,
        "'You pressed 1. Routing your call.' is spoken"
    );
    assert_eq!(callee.bye().await.unwrap(), 200);
    assert!(call.wait_for_bye(5 * SECOND).await.is_some());
}

#[tokio::test]
async fn ctx_ivr_another_key_is_read_back_and_the_call_ends() {
    let (rig, mut callee) = rig_with_callee().await;
    let mut call = Call::place(rig.server.udp, "ctx-ivr")
        .await
        .expect("answered");
    tokio::time::sleep(Duration::from_millis(2300)).await;
    call.send_digits("7").await;
    assert!(
        call.wait_for_bye(20 * SECOND).await.is_some(),
        "hangup after the message"
    );
    assert!(
        loud_frames(&call.received_audio()[16000..]) > 15,
        "'You pressed 7.' is spoken"
    );
    assert!(
        callee
            .wait_for_invite(Duration::from_millis(200))
            .await
            .is_err(),
        "no bridge"
    );
    assert!(!rig.log().contains("class5 script ended with an error"));
}

#[tokio::test]
async fn ctx_ivr_no_input_falls_back_to_1001() {
    let (rig, mut callee) = rig_with_callee().await;
    let call = Call::place(rig.server.udp, "ctx-ivr")
        .await
        .expect("answered");
    // welcome.wav, then 15 s of silence, then the message: well within 40 s.
    let invite = callee
        .accept(AcceptOpts {
            within: 40 * SECOND,
            ..AcceptOpts::answer_after(100)
        })
        .await
        .expect("the fallback bridge");
    assert_eq!(invite.user(), "1001");
    assert_eq!(callee.bye().await.unwrap(), 200);
    assert!(call.wait_for_bye(5 * SECOND).await.is_some());
    drop(rig);
}

#[tokio::test]
async fn simple_calling_card_collects_a_number_and_bridges_to_it() {
    let (rig, mut callee) = rig_with_callee().await;
    let mut call = Call::place(rig.server.udp, "simple-calling-card")
        .await
        .expect("answered");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    call.send_digits("4420123456#").await;
    let invite = callee
        .accept(AcceptOpts::answer_after(100))
        .await
        .expect("the card bridges to the number");
    assert_eq!(invite.user(), "4420123456");
    assert_heard(
        &call.received_audio(),
        &prompt("enter_number.wav")[..6000],
        "user/calling_card_ivr.wav",
    );
    let support = prompt("support.wav");
    callee.send_audio(&support).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_heard(
        &call.received_audio(),
        &support,
        "the caller hears the callee",
    );
    // bridge(value, false, true): the callee's BYE ends the caller's call.
    assert_eq!(callee.bye().await.unwrap(), 200);
    assert!(call.wait_for_bye(5 * SECOND).await.is_some());
    drop(rig);
}

#[tokio::test]
async fn wait_for_follows_the_stub_string_regexp_function_result_seconds_and_quit() {
    let rig = rig("");
    let mut call = Call::place(rig.server.udp, "wait-for")
        .await
        .expect("answered");
    tokio::time::sleep(Duration::from_millis(400)).await;
    call.send_digits("123#").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    call.send_digits("45").await;
    // The third wait times out after 1 s (seconds, the stub's unit); the fourth quits on *.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    call.send_digits("*").await;
    let bye = call.wait_for_bye(10 * SECOND).await.expect("BYE");
    assert_eq!(
        bye.header("X-Wait"),
        Some("123#|got 45|Timeout after 1 s|Quit *")
    );
}

#[tokio::test]
async fn ctx_on_reports_keys_and_the_callers_hangup() {
    let rig = rig("");
    let placed = Instant::now();
    let mut call = Call::place(rig.server.udp, "on-events")
        .await
        .expect("answered");
    assert!(
        placed.elapsed() >= Duration::from_millis(900),
        "ctx.on() did not answer the call; answer() after a 1 s sleep did"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    call.send_digits("3*8").await;
    assert!(
        rig.log_has("keys by ctx.on: 3*8").await,
        "the dtmf handler saw each key: {}",
        rig.log()
    );
    assert_eq!(call.bye().await.unwrap(), 200);
    assert!(rig.log_has("hangup event by remote").await, "{}", rig.log());
    assert!(
        !rig.log().contains("a removed handler ran"),
        "ctx.off removes a handler"
    );
}

#[tokio::test]
async fn continue_on_fail_goes_on_after_a_busy_callee() {
    let (rig, mut callee) = rig_with_callee().await;
    let to = callee.uri("2001");
    let headers = [("X-To", to.as_str()), ("X-Continue-On", "fail")];
    let (call, invite) = tokio::join!(
        Call::place_with(rig.server.udp, "continue-on", &headers),
        callee.accept(AcceptOpts::reject(486, 100))
    );
    let call = call.expect("answered");
    let invite = invite.unwrap();
    assert_eq!(
        invite.header("X-Account"),
        Some("42"),
        "a written sip_h_ variable"
    );
    assert_eq!(
        invite.header("X-Local"),
        None,
        "skipWrite keeps it off the INVITE"
    );
    let bye = call.wait_for_bye(15 * SECOND).await.unwrap_or_else(|| {
        panic!(
            "the script goes on, plays goodbye and hangs up: {}",
            rig.log()
        )
    });
    assert_eq!(bye.header("X-After"), Some("busy 486 kept"));
    assert_heard(&call.received_audio(), &prompt("goodbye.wav"), "goodbye");
}

#[tokio::test]
async fn continue_on_completed_goes_on_after_the_callee_hangs_up() {
    let (rig, mut callee) = rig_with_callee().await;
    let to = callee.uri("2002");
    let headers = [("X-To", to.as_str()), ("X-Continue-On", "completed")];
    let (call, invite) = tokio::join!(
        Call::place_with(rig.server.udp, "continue-on", &headers),
        callee.accept(AcceptOpts::answer_after(100))
    );
    let call = call.expect("answered");
    invite.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(callee.bye().await.unwrap(), 200);
    let bye = call
        .wait_for_bye(15 * SECOND)
        .await
        .expect("the script goes on after the bridge");
    assert_eq!(bye.header("X-After"), Some("completed 200 kept"));
    assert_heard(&call.received_audio(), &prompt("goodbye.wav"), "goodbye");
}

#[tokio::test]
async fn continue_on_completed_still_ends_the_call_when_the_bridge_fails() {
    let (rig, mut callee) = rig_with_callee().await;
    let to = callee.uri("2003");
    let headers = [("X-To", to.as_str()), ("X-Continue-On", "completed")];
    let (call, invite) = tokio::join!(
        Call::place_with(rig.server.udp, "continue-on", &headers),
        callee.accept(AcceptOpts::reject(486, 100))
    );
    let call = call.expect("answered");
    invite.unwrap();
    let bye = call.wait_for_bye(5 * SECOND).await.expect("BYE");
    assert_eq!(
        bye.header("X-After"),
        None,
        "the script did not go on after the failure"
    );
    drop(rig);
}

#[tokio::test]
async fn ivr_transfer_on_failure_bridges_when_no_key_is_pressed() {
    let (rig, mut callee) = rig_with_callee().await;
    let call = Call::place(rig.server.udp, "ivr-transfer")
        .await
        .expect("answered");
    let invite = callee
        .accept(AcceptOpts {
            within: 10 * SECOND,
            ..AcceptOpts::answer_after(100)
        })
        .await
        .expect("the failed ivr transfers");
    assert_eq!(invite.user(), "1009");
    let support = prompt("support.wav");
    callee.send_audio(&support).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_heard(
        &call.received_audio(),
        &support,
        "the caller hears the transfer target",
    );
    assert_eq!(callee.bye().await.unwrap(), 200);
    assert!(call.wait_for_bye(5 * SECOND).await.is_some());
    assert!(
        rig.log_has("ivr ended timeout, transfer completed").await,
        "{}",
        rig.log()
    );
}

#[tokio::test]
async fn destination_runs_another_script_on_the_call_and_returns_its_result() {
    let rig = rig("");
    let mut call = Call::place(rig.server.udp, "to-menu")
        .await
        .expect("answered");
    tokio::time::sleep(Duration::from_millis(2300)).await;
    call.send_digits("4").await;
    let bye = call.wait_for_bye(10 * SECOND).await.expect("BYE");
    assert_eq!(
        bye.header("X-Dest"),
        Some("4 en to-menu"),
        "the second script saw the key, the first one's variable and the call's data"
    );
    assert_heard(
        &call.received_audio(),
        &prompt("welcome.wav"),
        "the second script's prompt",
    );
}

#[tokio::test]
async fn bad_arguments_to_the_stub_apis_are_named_errors_and_the_call_goes_on() {
    let rig = rig("");
    let call = Call::place(rig.server.udp, "bad-input")
        .await
        .expect("answered");
    let bye = call.wait_for_bye(10 * SECOND).await.expect("BYE");
    assert_eq!(
        bye.header("X-Errors"),
        Some(
            "waitFor-regexp:TypeError waitFor-none:TypeError on-event:TypeError on-fn:TypeError \
             continue_on:TypeError transfer_on_failure:TypeError destination:Error blockDtmf:TypeError"
        )
    );
}

#[tokio::test]
async fn blocked_keys_do_not_cross_a_bridge_and_the_others_do() {
    let (rig, mut callee) = rig_with_callee().await;
    let to = callee.uri("2004");
    let headers = [("X-To", to.as_str())];
    let (call, invite) = tokio::join!(
        Call::place_with(rig.server.udp, "block-bridge", &headers),
        callee.accept(AcceptOpts::answer_after(100))
    );
    let mut call = call.expect("the callee's answer answers the caller");
    invite.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    call.send_digits("1#23").await;
    callee.send_digits("1").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(callee.received_digits(), "#3", "1 and 2 are blocked");
    assert_eq!(call.received_digits(), "1", "the callee's keys are not");
    assert_eq!(call.bye().await.unwrap(), 200);
    drop(rig);
}

/// Both operations start before the call has media, so both ask for the answer; one 200 OK
/// serves both. (Whether the second request reaches the call task before or after the ACK is
/// up to timing, so this does not pin the not-yet-acknowledged case on every run.)
#[tokio::test]
async fn two_media_operations_before_answer_share_one_implicit_answer() {
    let rig = rig("");
    let mut call = Call::place(rig.server.udp, "implicit-twice")
        .await
        .expect("answered once for both");
    tokio::time::sleep(Duration::from_millis(2300)).await;
    call.send_digits("42").await;
    let bye = call.wait_for_bye(10 * SECOND).await.expect("BYE");
    assert_eq!(bye.header("X-Both"), Some("completed 42"));
    assert_heard(&call.received_audio(), &prompt("welcome.wav"), "welcome");
    assert_eq!(
        rig.log().matches("answering the call implicitly").count(),
        1,
        "{}",
        rig.log()
    );
}
