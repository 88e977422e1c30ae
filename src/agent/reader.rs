//! Line splitting over large buffered reads. Complete lines inside a chunk are handed out
//! as slices of that chunk (no copy); only a line that spans two reads is carried over.
//! Lines longer than the limit are truncated (and counted), so one runaway line cannot
//! grow memory without bound.

use memchr::memchr;

/// Bytes read from a file per system call: large reads keep the syscall count low.
pub const READ_CHUNK: usize = 256 * 1024;

/// One line handed to the caller.
#[derive(Debug, PartialEq, Eq)]
pub struct Line<'a> {
    /// The line without its `\n` (and without a trailing `\r`).
    pub bytes: &'a [u8],
    /// File offset just past this line: where reading resumes once it is delivered.
    pub end: u64,
    /// The line was longer than the limit and was cut.
    pub truncated: bool,
}

/// Splits a byte stream into lines, carrying an incomplete last line between reads.
#[derive(Debug)]
pub struct LineSplitter {
    carry: Vec<u8>,
    max: usize,
    /// Inside an over-long line that was already emitted: skip to the next `\n`.
    discarding: bool,
}

impl LineSplitter {
    pub fn new(max_line: usize) -> Self {
        Self {
            carry: Vec::new(),
            max: max_line.max(1),
            discarding: false,
        }
    }

    /// Forgets any partial line (after a truncation the stream starts over).
    pub fn reset(&mut self) {
        self.carry.clear();
        self.discarding = false;
    }

    /// Takes an unterminated last line (the file was released without a final `\n`).
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        let discarding = std::mem::replace(&mut self.discarding, false);
        let carry = std::mem::take(&mut self.carry);
        (!discarding && !carry.is_empty()).then_some(carry)
    }

    /// Whether part of a line is waiting for its `\n`.
    pub fn has_partial(&self) -> bool {
        !self.carry.is_empty()
    }

    /// Feeds the bytes read at file offset `start`; calls `f` for every line completed.
    pub fn feed(&mut self, chunk: &[u8], start: u64, mut f: impl FnMut(Line<'_>)) {
        let mut pos = 0;
        while let Some(i) = memchr(b'\n', &chunk[pos..]) {
            let piece = &chunk[pos..pos + i];
            let end = start + (pos + i + 1) as u64;
            pos += i + 1;
            if self.discarding {
                self.discarding = false;
                self.carry.clear();
                continue;
            }
            if self.carry.is_empty() {
                let truncated = piece.len() > self.max;
                let bytes = strip_cr(&piece[..piece.len().min(self.max)]);
                f(Line {
                    bytes,
                    end,
                    truncated,
                });
            } else {
                let room = self.max - self.carry.len();
                let truncated = piece.len() > room;
                self.carry
                    .extend_from_slice(&piece[..piece.len().min(room)]);
                let carry = std::mem::take(&mut self.carry);
                f(Line {
                    bytes: strip_cr(&carry),
                    end,
                    truncated,
                });
                self.carry = carry;
                self.carry.clear();
            }
        }
        if self.discarding {
            return;
        }
        let rest = &chunk[pos..];
        let room = self.max - self.carry.len();
        if rest.len() > room {
            // The line reached the limit without ending: emit what fits now and skip the
            // rest of it, so the carry never exceeds the limit.
            self.carry.extend_from_slice(&rest[..room]);
            let carry = std::mem::take(&mut self.carry);
            f(Line {
                bytes: &carry,
                end: start + chunk.len() as u64,
                truncated: true,
            });
            self.discarding = true;
        } else {
            self.carry.extend_from_slice(rest);
        }
    }
}

fn strip_cr(b: &[u8]) -> &[u8] {
    b.strip_suffix(b"\r").unwrap_or(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &mut LineSplitter, chunk: &[u8], start: u64) -> Vec<(String, u64, bool)> {
        let mut out = Vec::new();
        s.feed(chunk, start, |l| {
            out.push((
                String::from_utf8_lossy(l.bytes).into_owned(),
                l.end,
                l.truncated,
            ))
        });
        out
    }

    #[test]
    fn lines_spanning_reads_are_joined_with_correct_offsets() {
        let mut s = LineSplitter::new(100);
        assert_eq!(
            split(&mut s, b"one\ntw", 0),
            [("one".to_string(), 4, false)]
        );
        assert!(s.has_partial());
        assert_eq!(
            split(&mut s, b"o\r\nthree\n", 6),
            [
                ("two".to_string(), 9, false),
                ("three".to_string(), 15, false)
            ]
        );
        assert!(!s.has_partial());
    }

    #[test]
    fn over_long_lines_are_truncated_and_the_rest_skipped() {
        let mut s = LineSplitter::new(4);
        assert_eq!(
            split(&mut s, b"abcdefgh\nok\n", 0),
            [("abcd".to_string(), 9, true), ("ok".to_string(), 12, false)]
        );
        // A long line arriving in pieces is cut once and never buffered beyond the limit.
        assert_eq!(
            split(&mut s, b"xyzzy", 12),
            [("xyzz".to_string(), 17, true)]
        );
        assert_eq!(split(&mut s, b"more-of-it", 17), []);
        assert_eq!(
            split(&mut s, b"tail\nnext\n", 27),
            [("next".to_string(), 37, false)]
        );
    }
}
