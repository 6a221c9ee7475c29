//! The media task of one call: feeds its RTP socket's datagrams to the sans-IO
//! `MediaSession`, serves commands (play, stop, DTMF out, echo, record) and keeps the caller's
//! digits in a buffer that ctx operations read. Outgoing frames and the session's timers are
//! the RTP ticker's (`media/ticker.rs`): the task only wakes for datagrams, commands and the
//! events a tick leaves. It runs on the main runtime; handles are `Send` and cheap.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot, Notify};

use crate::media::{
    MediaEvent, MediaSession, PlayEnd, PlayId, Recorder, RtpSocket, StopReason, TickedMedia, Ticker,
};

/// Datagrams read per wake-up before the task yields to the others.
const FEED_BATCH: usize = 32;

/// Why a recording ended, as scripts see it in `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordEnd {
    Silence,
    Max,
    Dtmf,
    Hangup,
    Stopped,
}

impl RecordEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordEnd::Silence => "silence",
            RecordEnd::Max => "max",
            RecordEnd::Dtmf => "dtmf",
            RecordEnd::Hangup => "hangup",
            RecordEnd::Stopped => "stopped",
        }
    }
}

/// A finished recording.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordOutcome {
    /// The file's name relative to the recordings folder.
    pub file: String,
    pub seconds: f64,
    pub reason: RecordEnd,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    #[error("the call's media has ended")]
    Gone,
    #[error("{0}")]
    Failed(String),
}

enum Command {
    Play {
        samples: Arc<[i16]>,
        barge_in: bool,
        done: oneshot::Sender<PlayEnd>,
    },
    StopPlayback,
    SendDtmf {
        digits: String,
        duration: Duration,
        done: oneshot::Sender<Result<(), MediaError>>,
    },
    Echo(Option<Duration>),
    Record {
        recorder: Recorder,
        name: String,
        terminators: String,
        done: oneshot::Sender<Result<RecordOutcome, MediaError>>,
    },
    StopRecord,
    Info {
        content_type: String,
        body: String,
    },
    UpdateRemote(SocketAddr),
    SetSending(bool),
    Detach(oneshot::Sender<(RtpSocket, MediaSession)>),
    Shutdown,
}

/// Digits the caller pressed that no operation has consumed yet, plus everything pressed
/// (for `waitFor`), minus blocked keys.
#[derive(Debug, Default)]
struct DigitState {
    queue: VecDeque<char>,
    history: String,
    blocked: HashSet<char>,
    /// Bumped on every digit; waiters compare it.
    count: u64,
}

/// The caller's digit stream of one call.
#[derive(Debug, Default)]
pub struct DigitBuffer {
    state: Mutex<DigitState>,
    arrived: Notify,
}

impl DigitBuffer {
    fn lock(&self) -> std::sync::MutexGuard<'_, DigitState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, digit: char) -> bool {
        let mut s = self.lock();
        if s.blocked.contains(&digit) {
            return false;
        }
        s.queue.push_back(digit);
        s.history.push(digit);
        if s.history.len() > 256 {
            let cut = s.history.len() - 256;
            s.history.drain(..cut);
        }
        s.count += 1;
        drop(s);
        self.arrived.notify_waiters();
        true
    }

    /// Take the oldest unconsumed digit.
    pub fn pop(&self) -> Option<char> {
        self.lock().queue.pop_front()
    }

    /// Drop unconsumed digits (type-ahead).
    pub fn clear(&self) {
        self.lock().queue.clear();
    }

    /// Everything pressed in this call (the last 256 keys), blocked keys excluded.
    pub fn history(&self) -> String {
        self.lock().history.clone()
    }

    pub fn count(&self) -> u64 {
        self.lock().count
    }

    /// Keys in `digits` stop reaching the script (`ctx.blockDtmf`); an empty string unblocks.
    pub fn block(&self, digits: &str) {
        let mut s = self.lock();
        s.blocked = digits.chars().collect();
    }

    /// Wait for the next digit, or until `deadline`.
    pub async fn next(&self, deadline: Option<tokio::time::Instant>) -> Option<char> {
        loop {
            let notified = self.arrived.notified();
            if let Some(d) = self.pop() {
                return Some(d);
            }
            match deadline {
                Some(at) => {
                    if tokio::time::timeout_at(at, notified).await.is_err() {
                        return self.pop();
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Wait until a digit arrives after `seen` (a value of [`DigitBuffer::count`]).
    pub async fn changed_since(&self, seen: u64) {
        loop {
            let notified = self.arrived.notified();
            if self.count() != seen {
                return;
            }
            notified.await;
        }
    }
}

/// A handle to a call's media task. Commands travel boxed: a channel allocates its slots 32
/// at a time, and a boxed slot is 8 bytes where a `Command` is about 200.
#[derive(Clone)]
pub struct MediaHandle {
    commands: mpsc::UnboundedSender<Box<Command>>,
    pub digits: Arc<DigitBuffer>,
    pub local_addr: SocketAddr,
}

impl MediaHandle {
    fn send(&self, c: Command) -> Result<(), MediaError> {
        self.commands
            .send(Box::new(c))
            .map_err(|_| MediaError::Gone)
    }

    /// Play samples; resolves when they finished, were stopped, or a digit barged in.
    pub async fn play(&self, samples: Arc<[i16]>, barge_in: bool) -> Result<PlayEnd, MediaError> {
        let (done, rx) = oneshot::channel();
        self.send(Command::Play {
            samples,
            barge_in,
            done,
        })?;
        rx.await.map_err(|_| MediaError::Gone)
    }

    pub fn stop_playback(&self) {
        let _ = self.send(Command::StopPlayback);
    }

    pub async fn send_dtmf(&self, digits: &str, duration: Duration) -> Result<(), MediaError> {
        let (done, rx) = oneshot::channel();
        self.send(Command::SendDtmf {
            digits: digits.to_string(),
            duration,
            done,
        })?;
        rx.await.map_err(|_| MediaError::Gone)?
    }

    /// Loop the caller's audio back with `delay` (`None` stops).
    pub fn echo(&self, delay: Option<Duration>) -> Result<(), MediaError> {
        self.send(Command::Echo(delay))
    }

    /// Record until the recorder's own limits, a terminator digit, `stop_record`, or hang-up.
    pub async fn record(
        &self,
        recorder: Recorder,
        name: &str,
        terminators: &str,
    ) -> Result<RecordOutcome, MediaError> {
        let (done, rx) = oneshot::channel();
        self.send(Command::Record {
            recorder,
            name: name.to_string(),
            terminators: terminators.to_string(),
            done,
        })?;
        rx.await.map_err(|_| MediaError::Gone)?
    }

    pub fn stop_record(&self) {
        let _ = self.send(Command::StopRecord);
    }

    /// DTMF carried in a SIP INFO request.
    pub fn info(&self, content_type: &str, body: &str) {
        let _ = self.send(Command::Info {
            content_type: content_type.to_string(),
            body: body.to_string(),
        });
    }

    pub fn update_remote(&self, remote: SocketAddr) {
        let _ = self.send(Command::UpdateRemote(remote));
    }

    /// Hold (`false`) and resume (`true`).
    pub fn set_sending(&self, on: bool) {
        let _ = self.send(Command::SetSending(on));
    }

    /// Stop the task and hand its socket and session back (a bridge relays the raw RTP
    /// meanwhile; `spawn` them again to resume). A recording in progress ends as `stopped`.
    pub async fn detach(&self) -> Result<(RtpSocket, MediaSession), MediaError> {
        let (done, rx) = oneshot::channel();
        self.send(Command::Detach(done))?;
        rx.await.map_err(|_| MediaError::Gone)
    }

    /// End the media task: a recording in progress ends with reason `hangup`.
    pub fn shutdown(&self) {
        let _ = self.send(Command::Shutdown);
    }
}

struct ActiveRecording {
    recorder: Recorder,
    name: String,
    terminators: String,
    done: oneshot::Sender<Result<RecordOutcome, MediaError>>,
}

impl ActiveRecording {
    fn finish(self, reason: RecordEnd) {
        let ActiveRecording {
            recorder,
            name,
            done,
            ..
        } = self;
        let result = recorder
            .stop()
            .map(|r| RecordOutcome {
                file: name,
                seconds: r.seconds,
                reason,
            })
            .map_err(|e| MediaError::Failed(e.to_string()));
        let _ = done.send(result);
    }
}

/// Start the media task of a call; its frames are sent by the process's RTP ticker.
pub fn spawn(socket: RtpSocket, session: MediaSession) -> std::io::Result<MediaHandle> {
    spawn_on(Ticker::global(), socket, session)
}

/// Start the media task of a call with its frames sent by `ticker`.
pub fn spawn_on(
    ticker: &Ticker,
    socket: RtpSocket,
    session: MediaSession,
) -> std::io::Result<MediaHandle> {
    let local_addr = socket.local_addr()?;
    let (tx, rx) = mpsc::unbounded_channel();
    let digits = Arc::new(DigitBuffer::default());
    let media = Attached {
        ticked: ticker.join(socket.sender(), session),
        socket: Some(socket),
    };
    tokio::spawn(run(media, rx, digits.clone()));
    Ok(MediaHandle {
        commands: tx,
        digits,
        local_addr,
    })
}

/// The call's socket and its ticked session. Dropping it (the task ended or was cancelled)
/// takes the session off the ticker before the socket closes.
struct Attached {
    ticked: Arc<TickedMedia>,
    socket: Option<RtpSocket>,
}

impl Attached {
    /// The socket and the session, off the ticker.
    fn detach(mut self) -> Option<(RtpSocket, MediaSession)> {
        let session = self.ticked.leave()?;
        let socket = self.socket.take()?;
        Some((socket, session))
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.ticked.leave();
    }
}

/// Runs `f` on the session (a no-op if it has left the ticker, which only the task does).
fn with<R: Default>(m: &TickedMedia, f: impl FnOnce(&mut MediaSession) -> R) -> R {
    m.with(f).unwrap_or_default()
}

async fn run(
    media: Attached,
    mut commands: mpsc::UnboundedReceiver<Box<Command>>,
    digits: Arc<DigitBuffer>,
) {
    let ticked = media.ticked.clone();
    let Some(socket) = media.socket.as_ref() else {
        return;
    };
    let mut plays: HashMap<PlayId, oneshot::Sender<PlayEnd>> = HashMap::new();
    let mut dtmf_waiters: Vec<oneshot::Sender<Result<(), MediaError>>> = Vec::new();
    let mut recording: Option<ActiveRecording> = None;
    let mut detach_to = None;
    loop {
        tokio::select! {
            biased;
            command = commands.recv() => {
                let Some(command) = command else { break };
                match *command {
                    Command::Shutdown => break,
                    Command::Detach(done) => {
                        detach_to = Some(done);
                        break;
                    }
                    Command::Play { samples, barge_in, done } => {
                        if let Some(id) = ticked.with(|s| s.play(samples, barge_in)) {
                            plays.insert(id, done);
                        }
                    }
                    Command::StopPlayback => with(&ticked, |s| s.stop_playback()),
                    Command::SendDtmf { digits, duration, done } => {
                        match with(&ticked, |s| Some(s.send_dtmf(&digits, duration))) {
                            Some(Ok(())) => dtmf_waiters.push(done),
                            Some(Err(e)) => { let _ = done.send(Err(MediaError::Failed(e.to_string()))); }
                            None => { let _ = done.send(Err(MediaError::Gone)); }
                        }
                    }
                    Command::Echo(Some(delay)) => with(&ticked, |s| s.start_echo(delay)),
                    Command::Echo(None) => with(&ticked, |s| s.stop_echo()),
                    Command::Record { recorder, name, terminators, done } => {
                        if let Some(previous) = recording.take() {
                            previous.finish(RecordEnd::Stopped);
                        }
                        with(&ticked, |s| s.set_audio_tap(true));
                        recording = Some(ActiveRecording { recorder, name, terminators, done });
                    }
                    Command::StopRecord => {
                        if let Some(active) = recording.take() {
                            with(&ticked, |s| s.set_audio_tap(false));
                            active.finish(RecordEnd::Stopped);
                        }
                    }
                    Command::Info { content_type, body } => {
                        let r = with(&ticked, |s| Some(s.handle_info(Instant::now(), &content_type, &body)));
                        if let Some(Err(e)) = r {
                            tracing::debug!("INFO without a usable digit: {e}");
                        }
                    }
                    Command::UpdateRemote(addr) => with(&ticked, |s| s.update_remote(addr)),
                    Command::SetSending(on) => with(&ticked, |s| s.set_sending(on)),
                }
            }
            _ = ticked.woken() => {}
            r = socket.rtp_readable() => {
                if r.is_ok() {
                    with(&ticked, |s| {
                        socket.feed(FEED_BATCH, |from, data| {
                            if let Err(e) = s.handle_input(Instant::now(), from, data) {
                                tracing::trace!(%from, error = %e, "RTP datagram ignored");
                            }
                        });
                    });
                }
            }
            // RTCP is not used (see session.rs); reading keeps the socket buffer empty.
            r = socket.rtcp_readable() => {
                if r.is_ok() {
                    socket.drain_rtcp();
                }
            }
        }
        while let Some(event) = ticked.with(|s| s.poll_event()).flatten() {
            match event {
                MediaEvent::Digit { digit, .. } => {
                    let ends_recording = recording
                        .as_ref()
                        .is_some_and(|r| r.terminators.contains(digit));
                    if ends_recording {
                        if let Some(active) = recording.take() {
                            with(&ticked, |s| s.set_audio_tap(false));
                            active.finish(RecordEnd::Dtmf);
                        }
                    }
                    digits.push(digit);
                }
                MediaEvent::PlayFinished(f) => {
                    if let Some(done) = plays.remove(&f.id) {
                        let _ = done.send(f.reason);
                    }
                }
                MediaEvent::DtmfSent => {
                    for done in dtmf_waiters.drain(..) {
                        let _ = done.send(Ok(()));
                    }
                }
                MediaEvent::Audio(samples) => {
                    let Some(active) = recording.as_mut() else {
                        continue;
                    };
                    match active.recorder.push(&samples) {
                        Ok(None) => {}
                        Ok(Some(done)) => {
                            let reason = match done.reason {
                                StopReason::MaxDuration => RecordEnd::Max,
                                StopReason::Silence => RecordEnd::Silence,
                                StopReason::Stopped => RecordEnd::Stopped,
                            };
                            if let Some(active) = recording.take() {
                                with(&ticked, |s| s.set_audio_tap(false));
                                let _ = active.done.send(Ok(RecordOutcome {
                                    file: active.name,
                                    seconds: done.seconds,
                                    reason,
                                }));
                            }
                        }
                        Err(e) => {
                            if let Some(active) = recording.take() {
                                with(&ticked, |s| s.set_audio_tap(false));
                                let _ = active.done.send(Err(MediaError::Failed(e.to_string())));
                            }
                        }
                    }
                }
                MediaEvent::Latched(addr) => tracing::debug!(%addr, "RTP latched"),
            }
        }
    }
    // A recording keeps what was heard; prompts and DTMF end unfinished.
    let end = if detach_to.is_some() {
        RecordEnd::Stopped
    } else {
        RecordEnd::Hangup
    };
    if let Some(active) = recording.take() {
        with(&ticked, |s| s.set_audio_tap(false));
        active.finish(end);
    }
    with(&ticked, |s| s.stop_playback());
    for (_, done) in plays.drain() {
        let _ = done.send(PlayEnd::Stopped);
    }
    if let Some(done) = detach_to {
        if let Some(parts) = media.detach() {
            let _ = done.send(parts);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{g711::G711, rtp::build, PortAllocator, RecordOptions, SessionConfig};
    use tokio::net::UdpSocket;

    /// A media task on loopback and the raw socket of a far end talking to it.
    async fn pair() -> (MediaHandle, UdpSocket, tempfile::TempDir) {
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let ports = Arc::new(PortAllocator::new(43000..=43999));
        let socket = RtpSocket::bind(&ports, "127.0.0.1".parse().unwrap())
            .await
            .unwrap();
        let mut cfg = SessionConfig::new(peer.local_addr().unwrap(), G711::Pcmu);
        cfg.dtmf_pt = Some(101);
        let session = MediaSession::new(cfg, Instant::now());
        let handle = spawn(socket, session).unwrap();
        (handle, peer, tempfile::tempdir().unwrap())
    }

    fn dtmf_packets(event: u8, seq: u16, ts: u32) -> Vec<Vec<u8>> {
        (0..6u16)
            .map(|i| {
                let end = i >= 3;
                let payload = [
                    event,
                    if end { 0x80 | 10 } else { 10 },
                    0,
                    (160 * (i.min(3) + 1)) as u8,
                ];
                build(101, i == 0, seq + i, ts, 0x1234, &payload)
            })
            .collect()
    }

    #[tokio::test]
    async fn plays_reach_the_peer_and_report_their_end() {
        let (media, peer, _dir) = pair().await;
        let samples: Arc<[i16]> = vec![8000i16; 8 * 300].into();
        let started = Instant::now();
        let end = media.play(samples, false).await.unwrap();
        assert_eq!(end, PlayEnd::Completed);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(280), "paced: {took:?}");
        let mut buf = [0u8; 512];
        let (n, _) = peer.recv_from(&mut buf).await.unwrap();
        assert_eq!(n, 12 + 160, "PCMU 20 ms frames");
        media.shutdown();
    }

    #[tokio::test]
    async fn digits_barge_in_and_land_in_the_buffer() {
        let (media, peer, _dir) = pair().await;
        let local = media.local_addr;
        let long: Arc<[i16]> = vec![4000i16; 8 * 5000].into();
        let play = {
            let media = media.clone();
            tokio::spawn(async move { media.play(long, true).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        for p in dtmf_packets(5, 100, 8000) {
            peer.send_to(&p, local).await.unwrap();
        }
        let end = tokio::time::timeout(Duration::from_secs(2), play)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(end.unwrap(), PlayEnd::BargeIn);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        assert_eq!(media.digits.next(Some(deadline)).await, Some('5'));
        assert_eq!(media.digits.history(), "5");
        // A blocked key never reaches the buffer.
        media.digits.block("9");
        for p in dtmf_packets(9, 200, 16000) {
            peer.send_to(&p, local).await.unwrap();
        }
        let soon = tokio::time::Instant::now() + Duration::from_millis(300);
        assert_eq!(media.digits.next(Some(soon)).await, None);
        media.info("application/dtmf-relay", "Signal=7\r\nDuration=160\r\n");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        assert_eq!(media.digits.next(Some(deadline)).await, Some('7'));
    }

    #[tokio::test]
    async fn recordings_stop_on_max_terminator_and_hangup() {
        let (media, peer, dir) = pair().await;
        let local = media.local_addr;
        let talker = tokio::spawn(async move {
            let payload = [0x20u8; 160];
            for i in 0..150u16 {
                let p = build(0, i == 0, i, i as u32 * 160, 0x77, &payload);
                let _ = peer.send_to(&p, local).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peer
        });
        let opts = RecordOptions {
            max_duration: Some(Duration::from_millis(500)),
            ..RecordOptions::default()
        };
        let rec = Recorder::start(dir.path(), "max.wav", opts).unwrap();
        let out = media.record(rec, "max.wav", "#").await.unwrap();
        assert_eq!(out.reason, RecordEnd::Max);
        assert!((out.seconds - 0.5).abs() < 0.03, "{}", out.seconds);
        let wav = hound::WavReader::open(dir.path().join("max.wav")).unwrap();
        assert_eq!(wav.spec().sample_rate, 8000);
        assert_eq!(wav.len(), 4000);

        let rec = Recorder::start(dir.path(), "hangup.wav", RecordOptions::default()).unwrap();
        let pending = {
            let media = media.clone();
            tokio::spawn(async move { media.record(rec, "hangup.wav", "").await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        media.shutdown();
        let out = pending.await.unwrap().unwrap();
        assert_eq!(out.reason, RecordEnd::Hangup);
        assert!(out.seconds > 0.1, "kept what was heard: {}", out.seconds);
        assert!(hound::WavReader::open(dir.path().join("hangup.wav")).is_ok());
        drop(talker);
    }

    #[tokio::test]
    async fn a_terminator_digit_ends_a_recording() {
        let (media, peer, dir) = pair().await;
        let local = media.local_addr;
        let rec = Recorder::start(dir.path(), "t.wav", RecordOptions::default()).unwrap();
        let pending = {
            let media = media.clone();
            tokio::spawn(async move { media.record(rec, "t.wav", "#").await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        for p in dtmf_packets(11, 500, 40000) {
            peer.send_to(&p, local).await.unwrap();
        }
        let out = tokio::time::timeout(Duration::from_secs(2), pending)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(out.reason, RecordEnd::Dtmf);
        assert_eq!(out.file, "t.wav");
    }

    #[tokio::test]
    async fn detaching_hands_the_socket_back_and_a_new_task_resumes() {
        let (media, peer, _dir) = pair().await;
        let addr = media.local_addr;
        let (socket, session) = media.detach().await.unwrap();
        assert_eq!(socket.local_addr().unwrap(), addr);
        assert!(matches!(
            media.play(vec![0i16; 160].into(), false).await,
            Err(MediaError::Gone)
        ));
        let resumed = spawn(socket, session).unwrap();
        let end = resumed
            .play(vec![100i16; 1600].into(), false)
            .await
            .unwrap();
        assert_eq!(end, PlayEnd::Completed);
        let mut buf = [0u8; 512];
        assert!(peer.recv_from(&mut buf).await.is_ok());
    }
}
