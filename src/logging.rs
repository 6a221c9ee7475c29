//! The server log: text or JSON lines on stderr, colours only on a terminal, and no control
//! byte from the network or a script reaching the log raw (no forged lines, no terminal tricks).

use std::io::{self, IsTerminal, Write};

use tracing_subscriber::{fmt::MakeWriter, EnvFilter};

/// `serve --log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (coloured when stderr is a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber: `RUST_LOG` filters (default `info`), output on stderr.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // JSON escapes control characters itself (serde_json writes them as \u00XX).
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(ansi)
            .with_writer(EscapedStderr { ansi })
            .try_init(),
        LogFormat::Json => builder.json().with_writer(io::stderr).try_init(),
    };
}

/// Makes writers that escape control bytes before they reach stderr.
#[derive(Debug, Clone, Copy)]
pub struct EscapedStderr {
    /// Our own colour codes (`ESC [ digits ; m`) pass; other escapes do not.
    pub ansi: bool,
}

impl<'a> MakeWriter<'a> for EscapedStderr {
    type Writer = EscapedWriter<io::Stderr>;
    fn make_writer(&'a self) -> Self::Writer {
        EscapedWriter {
            inner: io::stderr(),
            ansi: self.ansi,
        }
    }
}

/// Writes one formatted event per `write` call (as tracing-subscriber does), escaped.
pub struct EscapedWriter<W: Write> {
    pub inner: W,
    pub ansi: bool,
}

impl<W: Write> Write for EscapedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write_all(&escape_event(buf, self.ansi))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `event` with every control byte written as a visible escape (`\r`, `\n`, `\x1b`, `\u{9b}`),
/// except the line's own final newline, tabs and, with `ansi`, SGR colour sequences.
pub fn escape_event(event: &[u8], ansi: bool) -> Vec<u8> {
    let (body, newline) = match event.strip_suffix(b"\n") {
        Some(body) => (body, true),
        None => (event, false),
    };
    let mut out = Vec::with_capacity(event.len() + 16);
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        match b {
            0x1b if ansi && sgr_len(&body[i..]) > 0 => {
                let n = sgr_len(&body[i..]);
                out.extend_from_slice(&body[i..i + n]);
                i += n;
                continue;
            }
            b'\t' => out.push(b),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\n' => out.extend_from_slice(b"\\n"),
            0x00..=0x1f | 0x7f => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            // C1 controls (U+0080..U+009F, UTF-8 C2 80..C2 9F): some terminals obey them.
            0xc2 if body.get(i + 1).is_some_and(|c| (0x80..=0x9f).contains(c)) => {
                out.extend_from_slice(format!("\\u{{{:x}}}", body[i + 1]).as_bytes());
                i += 2;
                continue;
            }
            _ => out.push(b),
        }
        i += 1;
    }
    if newline {
        out.push(b'\n');
    }
    out
}

/// Length of an SGR sequence (`ESC [ 0-9;* m`) at the start of `s`, or 0.
fn sgr_len(s: &[u8]) -> usize {
    if s.len() < 3 || s[0] != 0x1b || s[1] != b'[' {
        return 0;
    }
    for (i, &c) in s.iter().enumerate().skip(2) {
        match c {
            b'0'..=b'9' | b';' => {}
            b'm' => return i + 1,
            _ => return 0,
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_bytes_are_escaped_and_the_final_newline_kept() {
        let line = b"INFO from net: a\r\nFAKE ERROR\x1b[2J\x07\x00\x7f \xc2\x9b end\n";
        let out = String::from_utf8(escape_event(line, false)).unwrap();
        assert_eq!(
            out,
            "INFO from net: a\\r\\nFAKE ERROR\\x1b[2J\\x07\\x00\\x7f \\u{9b} end\n"
        );
        assert_eq!(out.matches('\n').count(), 1);
    }

    #[test]
    fn colour_codes_pass_only_on_a_terminal() {
        let line = b"\x1b[32m INFO\x1b[0m msg \x1b]0;title\x07\n";
        let tty = String::from_utf8(escape_event(line, true)).unwrap();
        assert_eq!(tty, "\x1b[32m INFO\x1b[0m msg \\x1b]0;title\\x07\n");
        let file = String::from_utf8(escape_event(line, false)).unwrap();
        assert!(!file.contains('\x1b'), "{file}");
    }
}
