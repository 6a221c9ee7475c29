//! A real softphone on the caller's side: Debian's baresip 1.0 dials a class5 route that plays
//! a prompt, bridges to the in-repo callee (which answers, sends a 700 Hz tone and hangs up),
//! then plays a closing prompt. baresip's `sndfile` module writes what it decoded: the tone and
//! the closing prompt must both be in it. A receiver that sees the sequence numbers or the
//! timeline jump at a hand-over drops what follows (the issue saw baresip go silent).

mod caller;
mod sip_support;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use caller::{read_wav, AcceptOpts, Callee, Codec};
use sip_support::free_port;

/// Power of `hz` relative to the frame's total power (1.0 for a pure tone).
fn tone_share(frame: &[i16], hz: f64) -> f64 {
    let k = 2.0 * (std::f64::consts::TAU * hz / 8000.0).cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &x in frame {
        let s0 = x as f64 + k * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    let power = (s1 * s1 + s2 * s2 - k * s1 * s2) / frame.len() as f64;
    let total: f64 = frame.iter().map(|&x| (x as f64).powi(2)).sum();
    if total == 0.0 {
        0.0
    } else {
        2.0 * power / total
    }
}

fn rms(frame: &[i16]) -> f64 {
    (frame.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / frame.len() as f64).sqrt()
}

fn tone(ms: usize, hz: f64) -> Vec<i16> {
    (0..ms * 8)
        .map(|i| ((i as f64 * hz * std::f64::consts::TAU / 8000.0).sin() * 8000.0) as i16)
        .collect()
}

/// A baresip configuration in `dir`: no sound card (a sine source, a null player), G.711,
/// and `sndfile` dumping the decoded audio into `dir`.
fn baresip_config(dir: &Path) -> u16 {
    let sip_port = free_port();
    let rtp_base = free_port() & !1;
    let config = format!(
        "poll_method epoll\nsip_listen 127.0.0.1:{sip_port}\nrtp_ports {rtp_base}-{}\n\
audio_player aubridge,nil\naudio_source ausine,440\naudio_alert aubridge,nil\n\
ausrc_srate 48000\nausrc_channels 2\nauplay_srate 48000\n\
module_path /usr/lib/baresip/modules\nmodule g711.so\nmodule ausine.so\nmodule aubridge.so\n\
module sndfile.so\nmodule_app account.so\nmodule_app menu.so\nsnd_path {}\n",
        rtp_base + 40,
        dir.display()
    );
    std::fs::write(dir.join("config"), config).unwrap();
    std::fs::write(
        dir.join("accounts"),
        "<sip:baresip@127.0.0.1>;regint=0;audio_codecs=PCMU\n",
    )
    .unwrap();
    sip_port
}

fn decoded_dump(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("-dec.wav"))
        .expect("baresip's sndfile dump of the decoded audio")
}

#[tokio::test]
async fn baresip_hears_the_prompt_the_bridged_party_and_the_closing_prompt() {
    let mut callee = Callee::listen(Codec::Pcmu).await;
    let work = tempfile::tempdir().unwrap();
    let vars = work.path().join("relay.toml");
    std::fs::write(&vars, format!("bridge_to = \"{}\"\n", callee.uri("4004"))).unwrap();
    let media = Path::new(sip_support::ROOT).join("media");
    let server = sip_support::start_logging(
        &format!(
            "[media]\ndir = \"{}\"\n[[route]]\nmatch = \"^relay$\"\nscript = \"prompt_bridge_prompt.js\"\nmode = \"class5\"\nvars = \"{}\"\n",
            media.display(),
            vars.display()
        ),
        std::env::var("BARESIP_CF_LOG").ok().as_deref().map(Path::new),
    );
    let phone = work.path().join("baresip");
    std::fs::create_dir_all(&phone).unwrap();
    baresip_config(&phone);
    let log = std::fs::File::create(work.path().join("baresip.log")).unwrap();
    // -t: quit (cleanly, so the dump's header is final) once the call is long over.
    let mut baresip = Command::new("baresip")
        .arg("-f")
        .arg(&phone)
        .args(["-t", "14", "-e"])
        .arg(format!("/dial sip:relay@{}", server.udp))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("baresip is installed (Debian package baresip)");

    callee.accept(AcceptOpts::answer_after(300)).await.unwrap();
    callee.send_audio(&tone(3000, 700.0)).await;
    assert_eq!(callee.bye().await.unwrap(), 200);

    let status = tokio::task::spawn_blocking(move || baresip.wait())
        .await
        .unwrap()
        .unwrap();
    let baresip_log = std::fs::read_to_string(work.path().join("baresip.log")).unwrap();
    assert!(status.success(), "baresip: {status}\n{baresip_log}");
    let heard = read_wav(&decoded_dump(&phone)).unwrap();
    let frames: Vec<&[i16]> = heard.chunks_exact(160).collect();
    let toned: Vec<usize> = (0..frames.len())
        .filter(|&i| tone_share(frames[i], 700.0) > 0.8 && rms(frames[i]) > 1000.0)
        .collect();
    assert!(
        toned.len() >= 100,
        "baresip decoded {} frames of the callee's tone (of 150 sent)\n{baresip_log}",
        toned.len()
    );
    let (first_tone, last_tone) = (toned[0], toned[toned.len() - 1]);
    let speech = |range: &[&[i16]]| range.iter().filter(|f| rms(f) > 300.0).count();
    assert!(
        speech(&frames[..first_tone]) >= 50,
        "the welcome prompt before the bridge"
    );
    assert!(
        speech(&frames[last_tone + 1..]) >= 75,
        "baresip decoded only {} frames of the closing prompt after the bridge\n{baresip_log}",
        speech(&frames[last_tone + 1..])
    );
}
