//! Multiline joining: a line matching `startPattern` begins a record; other lines are
//! continuations. A pending record is emitted when the next record starts, when no line
//! came for `flushTimeout`, or when it reaches the size limit.

use std::time::{Duration, Instant};

use chrono::{DateTime, FixedOffset};
use regex::bytes::Regex;

/// A piece of log text with its end offset and what the CRI decoder learnt about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    pub bytes: Vec<u8>,
    pub end: u64,
    pub time: Option<DateTime<FixedOffset>>,
    pub stream: Option<String>,
}

/// Joins continuation lines onto the line that starts a record.
#[derive(Debug)]
pub struct Multiline {
    start: Regex,
    timeout: Duration,
    max: usize,
    pending: Option<(Piece, Instant)>,
}

impl Multiline {
    /// `start` is the configured pattern (already validated as a string regex).
    pub fn new(start: &regex::Regex, timeout: Duration, max: usize) -> Result<Self, regex::Error> {
        Ok(Self {
            start: regex::bytes::RegexBuilder::new(start.as_str())
                .size_limit(crate::agent::config::REGEX_SIZE_LIMIT)
                .dfa_size_limit(crate::agent::config::REGEX_DFA_SIZE_LIMIT)
                .build()?,
            timeout,
            max,
            pending: None,
        })
    }

    /// Feeds one piece; returns the record it completed, if any.
    pub fn push(&mut self, piece: Piece, now: Instant) -> Option<Piece> {
        if self.start.is_match(&piece.bytes) {
            return self.pending.replace((piece, now)).map(|(p, _)| p);
        }
        match self.pending.as_mut() {
            Some((p, since)) => {
                let room = self.max.saturating_sub(p.bytes.len());
                if room > 1 {
                    p.bytes.push(b'\n');
                    let take = piece.bytes.len().min(room - 1);
                    p.bytes.extend_from_slice(&piece.bytes[..take]);
                }
                p.end = piece.end;
                *since = now;
                None
            }
            // A continuation with nothing before it (start of file): it begins a record.
            None => {
                self.pending = Some((piece, now));
                None
            }
        }
    }

    /// Emits the pending record if no line arrived for the flush timeout.
    pub fn flush_stale(&mut self, now: Instant) -> Option<Piece> {
        match &self.pending {
            Some((_, since)) if now.duration_since(*since) >= self.timeout => {
                self.pending.take().map(|(p, _)| p)
            }
            _ => None,
        }
    }

    /// Emits the pending record unconditionally (the file was released).
    pub fn flush(&mut self) -> Option<Piece> {
        self.pending.take().map(|(p, _)| p)
    }

    /// Whether a record is pending (its bytes are not checkpointed yet).
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Drops the pending record (the file was truncated: it starts over).
    pub fn reset(&mut self) {
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(s: &str, end: u64) -> Piece {
        Piece {
            bytes: s.as_bytes().to_vec(),
            end,
            time: None,
            stream: None,
        }
    }

    fn ml(max: usize) -> Multiline {
        let re = regex::Regex::new(r"^\d{4}-").unwrap();
        Multiline::new(&re, Duration::from_millis(100), max).unwrap()
    }

    #[test]
    fn continuation_lines_join_the_record_they_follow() {
        let mut m = ml(1024);
        let t = Instant::now();
        assert_eq!(m.push(piece("2026-01 boom", 10), t), None);
        assert_eq!(m.push(piece("  at a()", 20), t), None);
        assert_eq!(m.push(piece("  at b()", 30), t), None);
        let done = m.push(piece("2026-02 next", 40), t).unwrap();
        assert_eq!(done.bytes, b"2026-01 boom\n  at a()\n  at b()");
        assert_eq!(done.end, 30);
        assert!(m.has_pending());
        assert_eq!(m.flush().unwrap().bytes, b"2026-02 next");
    }

    #[test]
    fn pending_record_is_flushed_after_the_timeout() {
        let mut m = ml(1024);
        let t = Instant::now();
        m.push(piece("2026-01 boom", 10), t);
        assert_eq!(m.flush_stale(t + Duration::from_millis(50)), None);
        let p = m.flush_stale(t + Duration::from_millis(100)).unwrap();
        assert_eq!(p.bytes, b"2026-01 boom");
        assert!(!m.has_pending());
    }

    #[test]
    fn joined_record_is_capped_at_the_size_limit() {
        let mut m = ml(16);
        let t = Instant::now();
        m.push(piece("2026-01 abcdef", 1), t);
        m.push(piece("continuation that is long", 2), t);
        let p = m.flush().unwrap();
        assert_eq!(p.bytes.len(), 16);
        assert_eq!(p.end, 2);
    }
}
