//! Cuts a TCP byte stream into SIP messages using the header end and Content-Length.
//!
//! On a stream Content-Length is mandatory (RFC 3261 §18.3): without it the next message
//! boundary is unknowable, so any framing error means the connection must be closed.

use thiserror::Error;

/// Why a stream can no longer be framed (the connection should be closed).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FramingError {
    #[error("message header section exceeds {limit} bytes")]
    HeaderTooLarge { limit: usize },
    #[error("message of {size} bytes exceeds the {limit}-byte limit")]
    MessageTooLarge { size: usize, limit: usize },
    #[error("stream message has no Content-Length header")]
    MissingContentLength,
    #[error("Content-Length {0:?} is not a number")]
    BadContentLength(String),
}

/// Accumulates bytes from one connection and yields complete messages.
#[derive(Debug)]
pub struct StreamFramer {
    buf: Vec<u8>,
    max_message_size: usize,
}

impl StreamFramer {
    pub fn new(max_message_size: usize) -> Self {
        Self {
            buf: Vec::new(),
            max_message_size,
        }
    }

    /// Appends bytes read from the socket.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that do not yet form a message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Returns the next complete message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Vec<u8>>, FramingError> {
        // CRLF keep-alives (RFC 5626 §3.5.1) and stray blank lines between messages.
        let skip = self
            .buf
            .iter()
            .position(|b| *b != b'\r' && *b != b'\n')
            .unwrap_or(self.buf.len());
        self.buf.drain(..skip);
        if self.buf.is_empty() {
            return Ok(None);
        }
        let Some((head, body_at)) = super::parse::split_head(&self.buf) else {
            if self.buf.len() > self.max_message_size {
                return Err(FramingError::HeaderTooLarge {
                    limit: self.max_message_size,
                });
            }
            return Ok(None);
        };
        let len = content_length(head)?;
        let total = body_at.saturating_add(len);
        if total > self.max_message_size {
            return Err(FramingError::MessageTooLarge {
                size: total,
                limit: self.max_message_size,
            });
        }
        if self.buf.len() < total {
            return Ok(None);
        }
        let rest = self.buf.split_off(total);
        let msg = std::mem::replace(&mut self.buf, rest);
        Ok(Some(msg))
    }
}

fn content_length(head: &[u8]) -> Result<usize, FramingError> {
    for line in head.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = String::from_utf8_lossy(&line[..colon]);
        let name = name.trim();
        if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("l") {
            let value = String::from_utf8_lossy(&line[colon + 1..]);
            let value = value.trim();
            return value
                .parse()
                .map_err(|_| FramingError::BadContentLength(value.chars().take(20).collect()));
        }
    }
    Err(FramingError::MissingContentLength)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 5\r\n\r\nhello";

    #[test]
    fn partial_reads_byte_by_byte() {
        let mut f = StreamFramer::new(4096);
        let mut stream = b"\r\n\r\n".to_vec();
        stream.extend_from_slice(MSG);
        stream.extend_from_slice(b"\r\n");
        stream.extend_from_slice(MSG);
        let mut got = Vec::new();
        for b in &stream {
            f.push(std::slice::from_ref(b));
            while let Some(m) = f.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![MSG.to_vec(), MSG.to_vec()]);
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn two_messages_in_one_read_and_compact_length() {
        let mut f = StreamFramer::new(4096);
        let m2 = b"SIP/2.0 200 OK\r\nl: 0\r\n\r\n";
        f.push(MSG);
        f.push(m2);
        assert_eq!(f.next_message().unwrap().unwrap(), MSG);
        assert_eq!(f.next_message().unwrap().unwrap(), m2);
        assert_eq!(f.next_message().unwrap(), None);
    }

    #[test]
    fn errors_close_the_stream() {
        let mut f = StreamFramer::new(4096);
        f.push(b"OPTIONS sip:a@b SIP/2.0\r\nVia: x\r\n\r\n");
        assert_eq!(f.next_message(), Err(FramingError::MissingContentLength));
        let mut f = StreamFramer::new(4096);
        f.push(b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: -1\r\n\r\n");
        assert!(matches!(
            f.next_message(),
            Err(FramingError::BadContentLength(_))
        ));
        let mut f = StreamFramer::new(100);
        f.push(b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 1000\r\n\r\n");
        assert!(matches!(
            f.next_message(),
            Err(FramingError::MessageTooLarge { .. })
        ));
        let mut f = StreamFramer::new(100);
        f.push(&[b'x'; 101]);
        assert!(matches!(
            f.next_message(),
            Err(FramingError::HeaderTooLarge { .. })
        ));
        let mut f = StreamFramer::new(100);
        f.push(b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 99999999999999999999999\r\n\r\n");
        assert!(f.next_message().is_err());
    }
}
