//! Digit collection for `ctx.ivr()` / `ctx.collect()`, as a sans-IO state machine: fed the
//! end of each prompt, each digit and "now"; it says when to time out, when to replay the
//! prompt (after `invalid_file`), and how the collection ends.
//!
//! The rules (what carriers know from play-and-get-digits):
//! - Digits pressed while the prompt plays count (the first one barges in).
//! - After the prompt: `first_digit_timeout` for the first digit, then
//!   `inter_digit_timeout` between digits.
//! - A terminator ends the input and is not part of the value; reaching `max` ends it at once.
//! - An attempt succeeds when it has at least `min` digits and, if a pattern is given, the
//!   whole value matches it. An attempt with no digit at all that timed out is a "timeout";
//!   anything else is "invalid".
//! - A failed attempt is retried while tries remain (the voice layer plays `invalid_file`,
//!   then the prompt again); the last attempt's status is the result.

use std::time::{Duration, Instant};

use regex::Regex;

/// How an `ivr`/`collect` call ended, as scripts see it in `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollectStatus {
    /// Enough digits that match the pattern.
    Success,
    /// No digit at all before the timeout.
    Timeout,
    /// Digits that were too few or did not match, after every try.
    Invalid,
    /// The caller hung up.
    Hangup,
}

impl CollectStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CollectStatus::Success => "success",
            CollectStatus::Timeout => "timeout",
            CollectStatus::Invalid => "invalid",
            CollectStatus::Hangup => "hangup",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CollectSpec {
    pub min: usize,
    pub max: usize,
    pub terminators: String,
    pub first_digit_timeout: Duration,
    pub inter_digit_timeout: Duration,
    pub tries: u32,
    /// Matched against the whole value.
    pub pattern: Option<Regex>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("min ({min}) must not exceed max ({max})")]
    MinAboveMax { min: usize, max: usize },
    #[error("max must be between 1 and 128, got {0}")]
    BadMax(usize),
    #[error("tries must be between 1 and 20, got {0}")]
    BadTries(u32),
    #[error("invalid regexp: {0}")]
    BadPattern(String),
    #[error("terminators may only contain 0-9, *, #, A-D; got {0:?}")]
    BadTerminators(String),
}

impl CollectSpec {
    /// Check and build a spec from script arguments.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        min: usize,
        max: usize,
        terminators: &str,
        first_digit_timeout: Duration,
        inter_digit_timeout: Duration,
        tries: u32,
        pattern: Option<&str>,
    ) -> Result<Self, SpecError> {
        if max == 0 || max > 128 {
            return Err(SpecError::BadMax(max));
        }
        if min > max {
            return Err(SpecError::MinAboveMax { min, max });
        }
        if tries == 0 || tries > 20 {
            return Err(SpecError::BadTries(tries));
        }
        if !terminators
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '*' | '#' | 'A'..='D'))
        {
            return Err(SpecError::BadTerminators(terminators.to_string()));
        }
        let pattern = match pattern.filter(|p| !p.is_empty()) {
            None => None,
            Some(p) => Some(
                Regex::new(&format!("^(?:{p})$"))
                    .map_err(|e| SpecError::BadPattern(e.to_string()))?,
            ),
        };
        Ok(CollectSpec {
            min,
            max,
            terminators: terminators.to_string(),
            first_digit_timeout,
            inter_digit_timeout,
            tries,
            pattern,
        })
    }
}

/// What the voice layer must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do until the next digit or deadline.
    Wait,
    /// Stop the prompt now (the first digit barged in).
    StopPrompt,
    /// The attempt failed and tries remain: play `invalid_file` (if any), then the prompt.
    Retry { status: CollectStatus },
    /// The collection is over.
    Done {
        status: CollectStatus,
        value: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Prompting,
    Listening { deadline: Instant },
    Over,
}

#[derive(Debug)]
pub struct Collector {
    spec: CollectSpec,
    digits: String,
    phase: Phase,
    attempt: u32,
}

impl Collector {
    /// A collection whose first prompt is playing now.
    pub fn new(spec: CollectSpec) -> Self {
        Collector {
            spec,
            digits: String::new(),
            phase: Phase::Prompting,
            attempt: 1,
        }
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The prompt finished (or was stopped): start listening.
    pub fn prompt_ended(&mut self, now: Instant) -> Step {
        if self.phase != Phase::Prompting {
            return Step::Wait;
        }
        let wait = if self.digits.is_empty() {
            self.spec.first_digit_timeout
        } else {
            self.spec.inter_digit_timeout
        };
        self.phase = Phase::Listening {
            deadline: now + wait,
        };
        Step::Wait
    }

    /// A new attempt's prompt starts playing (after a Retry).
    pub fn prompt_started(&mut self) {
        if self.phase != Phase::Over {
            self.phase = Phase::Prompting;
        }
    }

    pub fn digit(&mut self, digit: char, now: Instant) -> Step {
        if self.phase == Phase::Over {
            return Step::Wait;
        }
        if self.spec.terminators.contains(digit) {
            return self.finish_attempt(false);
        }
        let barge = self.phase == Phase::Prompting && self.digits.is_empty();
        self.digits.push(digit);
        if self.digits.len() >= self.spec.max {
            return self.finish_attempt(false);
        }
        if self.phase != Phase::Prompting {
            self.phase = Phase::Listening {
                deadline: now + self.spec.inter_digit_timeout,
            };
        }
        if barge {
            Step::StopPrompt
        } else {
            Step::Wait
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Listening { deadline } => Some(deadline),
            _ => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Step {
        match self.phase {
            Phase::Listening { deadline } if now >= deadline => self.finish_attempt(true),
            _ => Step::Wait,
        }
    }

    /// The caller hung up: the collection ends with what was pressed so far.
    pub fn hangup(&mut self) -> Step {
        self.phase = Phase::Over;
        Step::Done {
            status: CollectStatus::Hangup,
            value: std::mem::take(&mut self.digits),
        }
    }

    fn finish_attempt(&mut self, timed_out: bool) -> Step {
        let value = std::mem::take(&mut self.digits);
        let valid = value.len() >= self.spec.min
            && self
                .spec
                .pattern
                .as_ref()
                .is_none_or(|p| p.is_match(&value));
        let status = if valid {
            CollectStatus::Success
        } else if value.is_empty() && timed_out {
            CollectStatus::Timeout
        } else {
            CollectStatus::Invalid
        };
        if status == CollectStatus::Success || self.attempt >= self.spec.tries {
            self.phase = Phase::Over;
            return Step::Done { status, value };
        }
        self.attempt += 1;
        self.phase = Phase::Prompting;
        Step::Retry { status }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(min: usize, max: usize, tries: u32, pattern: Option<&str>) -> CollectSpec {
        CollectSpec::new(
            min,
            max,
            "#",
            Duration::from_secs(5),
            Duration::from_secs(2),
            tries,
            pattern,
        )
        .unwrap()
    }

    fn done(status: CollectStatus, value: &str) -> Step {
        Step::Done {
            status,
            value: value.into(),
        }
    }

    #[test]
    fn max_digits_end_at_once_and_the_first_digit_barges_in() {
        let t0 = Instant::now();
        let mut c = Collector::new(spec(1, 3, 1, None));
        assert_eq!(c.digit('1', t0), Step::StopPrompt);
        c.prompt_ended(t0);
        assert_eq!(c.digit('2', t0), Step::Wait);
        assert_eq!(c.digit('3', t0), done(CollectStatus::Success, "123"));
    }

    #[test]
    fn a_terminator_ends_input_and_is_not_in_the_value() {
        let t0 = Instant::now();
        let mut c = Collector::new(spec(1, 10, 1, None));
        c.prompt_ended(t0);
        c.digit('4', t0);
        c.digit('2', t0);
        assert_eq!(c.digit('#', t0), done(CollectStatus::Success, "42"));
    }

    #[test]
    fn first_digit_and_inter_digit_timeouts_are_separate() {
        let t0 = Instant::now();
        let mut c = Collector::new(spec(1, 10, 1, None));
        c.prompt_ended(t0);
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        assert_eq!(
            c.handle_timeout(t0 + Duration::from_millis(4999)),
            Step::Wait
        );
        let t1 = t0 + Duration::from_secs(4);
        c.digit('7', t1);
        assert_eq!(c.poll_timeout(), Some(t1 + Duration::from_secs(2)));
        assert_eq!(
            c.handle_timeout(t1 + Duration::from_secs(2)),
            done(CollectStatus::Success, "7")
        );
    }

    #[test]
    fn silence_is_a_timeout_and_too_few_digits_are_invalid() {
        let t0 = Instant::now();
        let mut c = Collector::new(spec(1, 4, 1, None));
        c.prompt_ended(t0);
        assert_eq!(
            c.handle_timeout(t0 + Duration::from_secs(5)),
            done(CollectStatus::Timeout, "")
        );
        let mut c = Collector::new(spec(3, 4, 1, None));
        c.prompt_ended(t0);
        c.digit('1', t0);
        assert_eq!(c.digit('#', t0), done(CollectStatus::Invalid, "1"));
    }

    #[test]
    fn failed_attempts_retry_until_tries_run_out() {
        let t0 = Instant::now();
        let mut c = Collector::new(spec(4, 4, 3, Some("[0-9]{4}")));
        c.prompt_ended(t0);
        assert_eq!(
            c.handle_timeout(t0 + Duration::from_secs(5)),
            Step::Retry {
                status: CollectStatus::Timeout
            }
        );
        assert_eq!(c.attempt(), 2);
        c.prompt_started();
        c.prompt_ended(t0);
        for d in "12*4".chars() {
            c.digit(d, t0);
        }
        // "12*4" has four digits but fails the pattern: invalid, third try follows.
        assert_eq!(c.attempt(), 3);
        c.prompt_started();
        c.prompt_ended(t0);
        for d in "987".chars() {
            assert_eq!(c.digit(d, t0), Step::Wait);
        }
        assert_eq!(c.digit('6', t0), done(CollectStatus::Success, "9876"));
    }

    #[test]
    fn the_last_attempts_status_is_the_result() {
        let t0 = Instant::now();
        let mut c = Collector::new(spec(2, 2, 2, None));
        c.prompt_ended(t0);
        c.digit('1', t0);
        assert_eq!(
            c.digit('#', t0),
            Step::Retry {
                status: CollectStatus::Invalid
            }
        );
        c.prompt_started();
        c.prompt_ended(t0);
        assert_eq!(
            c.handle_timeout(t0 + Duration::from_secs(5)),
            done(CollectStatus::Timeout, "")
        );
    }

    #[test]
    fn hangup_ends_with_the_digits_so_far() {
        let t0 = Instant::now();
        let mut c = Collector::new(spec(1, 9, 1, None));
        c.digit('5', t0);
        assert_eq!(c.hangup(), done(CollectStatus::Hangup, "5"));
        assert_eq!(c.digit('6', t0), Step::Wait);
    }

    #[test]
    fn bad_arguments_are_clear_errors() {
        let d = Duration::from_secs(1);
        assert_eq!(
            CollectSpec::new(5, 2, "#", d, d, 1, None).unwrap_err(),
            SpecError::MinAboveMax { min: 5, max: 2 }
        );
        assert!(matches!(
            CollectSpec::new(1, 2, "#", d, d, 1, Some("(")),
            Err(SpecError::BadPattern(_))
        ));
        assert!(matches!(
            CollectSpec::new(1, 2, "x", d, d, 1, None),
            Err(SpecError::BadTerminators(_))
        ));
        assert_eq!(
            CollectSpec::new(1, 0, "#", d, d, 1, None).unwrap_err(),
            SpecError::BadMax(0)
        );
    }
}
