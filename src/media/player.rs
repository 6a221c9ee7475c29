//! Per-call player/mixer: turns queued prompts and echoed audio into one 160-sample frame per 20 ms tick.
//!
//! The player has no clock of its own: the session calls [`Player::next_frame`] once per frame
//! it sends, so prompts play at exactly the pace of the RTP clock. Prompts queue and play one
//! after another; echo audio (what the caller said, delayed) is mixed on top with saturation.
//! When neither produces anything, `next_frame` returns `None` and the session sends a
//! silence frame (see `session.rs` for why it keeps sending).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use crate::media::rtp::FRAME_SAMPLES;

/// One 20 ms frame of 8 kHz audio.
pub type Frame = [i16; FRAME_SAMPLES];

/// Echo buffering beyond the requested delay that is tolerated before old audio is dropped,
/// so clock skew between the peer and us cannot grow the echo delay without bound.
const ECHO_SLACK_SAMPLES: usize = 8 * 200;

/// Identifies one `play` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlayId(pub u64);

/// Why a prompt stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlayEnd {
    /// Played to the end.
    Completed,
    /// Stopped by [`Player::stop`] (or never started because the queue was cleared).
    Stopped,
    /// Interrupted by a DTMF digit (barge-in).
    BargeIn,
}

/// Something the player reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlayFinished {
    /// Which request.
    pub id: PlayId,
    /// How it ended.
    pub reason: PlayEnd,
}

#[derive(Debug)]
struct Item {
    id: PlayId,
    samples: Arc<[i16]>,
    pos: usize,
    barge_in: bool,
}

#[derive(Debug)]
struct Echo {
    delay_samples: usize,
    buf: VecDeque<i16>,
}

/// Queue of prompts plus optional echo, read one frame at a time.
#[derive(Debug, Default)]
pub struct Player {
    queue: VecDeque<Item>,
    next_id: u64,
    echo: Option<Echo>,
    finished: VecDeque<PlayFinished>,
}

impl Player {
    /// An idle player.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues 8 kHz mono samples; `barge_in` lets a DTMF digit interrupt it.
    pub fn play(&mut self, samples: Arc<[i16]>, barge_in: bool) -> PlayId {
        self.next_id += 1;
        let id = PlayId(self.next_id);
        self.queue.push_back(Item {
            id,
            samples,
            pos: 0,
            barge_in,
        });
        id
    }

    /// True while a prompt is playing or queued.
    pub fn is_playing(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Stops the current prompt and clears the queue; each reports [`PlayEnd::Stopped`].
    pub fn stop(&mut self) {
        self.end_all(PlayEnd::Stopped, |_| true);
    }

    /// A DTMF digit arrived: stops the current prompt and the queue if it allows barge-in.
    /// Returns true if something was stopped. The next frame is already silence.
    pub fn barge_in(&mut self) -> bool {
        if self.queue.front().is_some_and(|i| i.barge_in) {
            self.end_all(PlayEnd::BargeIn, |i| i.barge_in);
            true
        } else {
            false
        }
    }

    fn end_all(&mut self, reason: PlayEnd, pred: impl Fn(&Item) -> bool) {
        // Stop from the front while items match, so a non-interruptible prompt queued later
        // (e.g. "goodbye") still plays.
        while let Some(item) = self.queue.front() {
            if !pred(item) {
                break;
            }
            let id = item.id;
            self.queue.pop_front();
            self.finished.push_back(PlayFinished { id, reason });
        }
    }

    /// Starts echoing received audio back after `delay` (0 is allowed).
    pub fn start_echo(&mut self, delay: Duration) {
        let delay_samples = (delay.as_millis() as usize).saturating_mul(8);
        let mut buf = VecDeque::with_capacity(delay_samples + ECHO_SLACK_SAMPLES);
        buf.extend(std::iter::repeat_n(0, delay_samples));
        self.echo = Some(Echo { delay_samples, buf });
    }

    /// Stops echoing.
    pub fn stop_echo(&mut self) {
        self.echo = None;
    }

    /// True while echo is on.
    pub fn is_echoing(&self) -> bool {
        self.echo.is_some()
    }

    /// Feeds received audio (any length) for echo; ignored when echo is off.
    pub fn push_received(&mut self, samples: &[i16]) {
        if let Some(e) = &mut self.echo {
            e.buf.extend(samples.iter().copied());
            let limit = e.delay_samples + ECHO_SLACK_SAMPLES;
            if e.buf.len() > limit {
                let excess = e.buf.len() - limit;
                e.buf.drain(..excess);
            }
        }
    }

    /// The next 20 ms of output, or `None` when there is nothing to play.
    pub fn next_frame(&mut self) -> Option<Frame> {
        let mut frame = [0i16; FRAME_SAMPLES];
        let mut any = false;
        if let Some(e) = &mut self.echo {
            if e.buf.len() >= FRAME_SAMPLES {
                for (o, s) in frame.iter_mut().zip(e.buf.drain(..FRAME_SAMPLES)) {
                    *o = s;
                }
                any = true;
            }
        }
        let mut filled = 0;
        while filled < FRAME_SAMPLES {
            let Some(item) = self.queue.front_mut() else {
                break;
            };
            let take = (FRAME_SAMPLES - filled).min(item.samples.len() - item.pos);
            for (o, &s) in frame[filled..filled + take]
                .iter_mut()
                .zip(&item.samples[item.pos..item.pos + take])
            {
                *o = o.saturating_add(s);
            }
            item.pos += take;
            filled += take;
            any |= take > 0;
            if item.pos >= item.samples.len() {
                let id = item.id;
                self.queue.pop_front();
                self.finished.push_back(PlayFinished {
                    id,
                    reason: PlayEnd::Completed,
                });
            }
        }
        any.then_some(frame)
    }

    /// Whether a finished-prompt report is waiting.
    pub fn has_finished(&self) -> bool {
        !self.finished.is_empty()
    }

    /// Next finished-prompt report, oldest first.
    pub fn poll_finished(&mut self) -> Option<PlayFinished> {
        self.finished.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Arc<[i16]> {
        (0..n).map(|i| i as i16 + 1).collect::<Vec<_>>().into()
    }

    #[test]
    fn plays_prompts_back_to_back_in_frames() {
        let mut p = Player::new();
        let a = p.play(ramp(200), false);
        let b = p.play(ramp(100), false);
        let f1 = p.next_frame().unwrap();
        assert_eq!(f1[0], 1);
        assert_eq!(f1[159], 160);
        assert_eq!(p.poll_finished(), None);
        let f2 = p.next_frame().unwrap();
        // Rest of A (40 samples) then B starts in the same frame: no gap between prompts.
        assert_eq!(f2[39], 200);
        assert_eq!(f2[40], 1);
        assert_eq!(f2[139], 100);
        assert_eq!(f2[140], 0);
        assert_eq!(
            p.poll_finished(),
            Some(PlayFinished {
                id: a,
                reason: PlayEnd::Completed
            })
        );
        assert_eq!(
            p.poll_finished(),
            Some(PlayFinished {
                id: b,
                reason: PlayEnd::Completed
            })
        );
        assert_eq!(p.next_frame(), None);
        assert!(!p.is_playing());
    }

    #[test]
    fn stop_and_barge_in() {
        let mut p = Player::new();
        let a = p.play(ramp(8000), true);
        let b = p.play(ramp(8000), true);
        let c = p.play(ramp(160), false);
        p.next_frame();
        assert!(p.barge_in());
        // Within one frame: the very next frame is the non-interruptible prompt.
        assert_eq!(p.next_frame().unwrap()[0], 1);
        let ends: Vec<_> = std::iter::from_fn(|| p.poll_finished()).collect();
        assert_eq!(
            ends,
            vec![
                PlayFinished {
                    id: a,
                    reason: PlayEnd::BargeIn
                },
                PlayFinished {
                    id: b,
                    reason: PlayEnd::BargeIn
                },
                PlayFinished {
                    id: c,
                    reason: PlayEnd::Completed
                },
            ]
        );
        let d = p.play(ramp(8000), false);
        assert!(!p.barge_in());
        p.stop();
        assert_eq!(p.next_frame(), None);
        assert_eq!(
            p.poll_finished(),
            Some(PlayFinished {
                id: d,
                reason: PlayEnd::Stopped
            })
        );
    }

    #[test]
    fn echo_delays_and_mixes() {
        let mut p = Player::new();
        p.start_echo(Duration::from_millis(40));
        let spoken = [1000i16; 160];
        for _ in 0..2 {
            p.push_received(&spoken);
            assert_eq!(p.next_frame().unwrap(), [0; 160], "delay prefix");
        }
        p.push_received(&spoken);
        assert_eq!(p.next_frame().unwrap(), [1000; 160]);
        // Mixed with a prompt, saturating.
        p.play(vec![i16::MAX; 160].into(), false);
        p.push_received(&spoken);
        assert_eq!(p.next_frame().unwrap(), [i16::MAX; 160]);
        // Nothing received for a while: echo runs dry and the player goes quiet.
        p.next_frame();
        p.next_frame();
        assert_eq!(p.next_frame(), None);
        p.stop_echo();
        p.push_received(&spoken);
        assert_eq!(p.next_frame(), None);
    }

    #[test]
    fn echo_buffer_is_bounded() {
        let mut p = Player::new();
        p.start_echo(Duration::ZERO);
        for _ in 0..1000 {
            p.push_received(&[7; 160]);
        }
        let mut frames = 0;
        while p.next_frame().is_some() {
            frames += 1;
        }
        assert_eq!(frames, ECHO_SLACK_SAMPLES / 160);
    }
}
