//! Execution modes (ScriptForge's script/app/class4/form/driver and the voice class5) and their limits.

use std::{fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

/// How a script is entered and what its result means. One interpreter core serves them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The fast synchronous path: promises settle, but no timers and no async host modules.
    Script,
    /// Async scripts with whitelisted host modules and timers.
    App,
    /// Class 4 routing: the result is the (normalised) routing object, errors are SIP codes.
    Class4,
    /// A form submission: input is the submitted fields.
    Form,
    /// A DID driver: one exported function called with a JSON argument.
    Driver,
    /// A Class 5 call: `main(data, ctx)` with `ctx` supplied by the voice layer.
    Class5,
}

impl Mode {
    pub const ALL: [Mode; 6] = [
        Mode::Script,
        Mode::App,
        Mode::Class4,
        Mode::Form,
        Mode::Driver,
        Mode::Class5,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Script => "script",
            Mode::App => "app",
            Mode::Class4 => "class4",
            Mode::Form => "form",
            Mode::Driver => "driver",
            Mode::Class5 => "class5",
        }
    }

    /// Whether `setTimeout` and async host modules exist in this mode.
    pub fn is_async(self) -> bool {
        !matches!(self, Mode::Script)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mode '{0}': expected one of script, app, class4, form, driver, class5")]
pub struct UnknownMode(pub String);

impl FromStr for Mode {
    type Err = UnknownMode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownMode(s.to_string()))
    }
}

/// Per-execution limits. Exceeding one ends the run alone with a 500 naming the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// QuickJS runtime memory limit.
    pub memory_bytes: usize,
    /// JavaScript stack limit.
    pub stack_bytes: usize,
    /// CPU budget of `script` and `class4` runs (time spent executing JavaScript).
    pub script_cpu: Duration,
    /// CPU budget of `app`, `form`, `driver` and `class5` runs.
    pub app_cpu: Duration,
    /// Wall-clock budget of a run (host awaits and timers included); not applied to class5,
    /// whose calls last as long as the caller stays.
    pub wall: Duration,
    /// Console lines per run, captured and written to the server log; past this (or
    /// `max_log_bytes`) one "truncated" line is written and the rest dropped.
    pub max_log_lines: usize,
    /// Console bytes per run (after the 8 KiB cap per line), the same way.
    pub max_log_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 * 1024 * 1024,
            stack_bytes: 512 * 1024,
            script_cpu: Duration::from_millis(2_000),
            app_cpu: Duration::from_millis(10_000),
            wall: Duration::from_millis(30_000),
            max_log_lines: 1_000,
            max_log_bytes: 256 * 1024,
        }
    }
}

impl Limits {
    pub fn cpu_for(&self, mode: Mode) -> Duration {
        match mode {
            Mode::Script | Mode::Class4 => self.script_cpu,
            _ => self.app_cpu,
        }
    }

    pub fn wall_for(&self, mode: Mode) -> Option<Duration> {
        match mode {
            Mode::Class5 => None,
            _ => Some(self.wall),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_case_insensitively_and_round_trip() {
        for m in Mode::ALL {
            assert_eq!(m.as_str().parse::<Mode>().unwrap(), m);
        }
        assert_eq!("CLASS4".parse::<Mode>().unwrap(), Mode::Class4);
        let e = "voice".parse::<Mode>().unwrap_err();
        assert!(e.to_string().contains("class4"), "{e}");
    }

    #[test]
    fn script_and_class4_get_the_short_cpu_budget() {
        let l = Limits::default();
        assert_eq!(l.cpu_for(Mode::Class4), Duration::from_secs(2));
        assert_eq!(l.cpu_for(Mode::App), Duration::from_secs(10));
        assert_eq!(l.wall_for(Mode::Class5), None);
    }
}
