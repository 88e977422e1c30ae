//! Bounded capture of a command's output.
//!
//! A remote command can print gigabytes; what we keep must not grow with it (thousands of
//! sessions run at once, and status has to stay small). [`CappedBuffer`] keeps the first
//! `head` bytes (where errors about bad usage appear) and the last `tail` bytes (where the
//! final error usually is), and counts the rest.

/// Keeps at most `head` bytes from the start and `tail` bytes from the end of a stream.
///
/// Memory never exceeds `head + tail` bytes of capacity, and is only allocated as output
/// actually arrives, so an idle or quiet session costs almost nothing.
#[derive(Debug)]
pub struct CappedBuffer {
    head: Vec<u8>,
    head_limit: usize,
    /// Linear while filling; once full, a ring whose oldest byte is at `tail_start`.
    tail: Vec<u8>,
    tail_limit: usize,
    tail_start: usize,
    total: u64,
}

/// What a [`CappedBuffer`] kept. `head` followed by `tail` is the whole output when
/// `truncated` is false; otherwise `total - head.len() - tail.len()` bytes between them
/// were dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Captured {
    pub head: Vec<u8>,
    pub tail: Vec<u8>,
    /// Bytes seen, kept or not.
    pub total: u64,
    pub truncated: bool,
}

impl CappedBuffer {
    /// A buffer keeping up to `head` leading and `tail` trailing bytes.
    pub fn new(head: usize, tail: usize) -> Self {
        Self {
            head: Vec::new(),
            head_limit: head,
            tail: Vec::new(),
            tail_limit: tail,
            tail_start: 0,
            total: 0,
        }
    }

    /// Appends output. O(`data.len()`); never holds more than `head + tail` bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.total = self.total.saturating_add(data.len() as u64);

        let room = self.head_limit - self.head.len();
        let n = room.min(data.len());
        extend_capped(&mut self.head, &data[..n], self.head_limit);
        let rest = &data[n..];
        if rest.is_empty() || self.tail_limit == 0 {
            return;
        }

        let cap = self.tail_limit;
        if rest.len() >= cap {
            // Only the last `cap` bytes of this chunk can survive: restart the ring with them.
            self.tail.clear();
            extend_capped(&mut self.tail, &rest[rest.len() - cap..], cap);
            self.tail_start = 0;
            return;
        }

        let mut rest = rest;
        if self.tail.len() < cap {
            let k = (cap - self.tail.len()).min(rest.len());
            extend_capped(&mut self.tail, &rest[..k], cap);
            rest = &rest[k..];
        }
        // The ring is full: overwrite the oldest bytes (at most two copies, as rest < cap).
        while !rest.is_empty() {
            let k = (cap - self.tail_start).min(rest.len());
            self.tail[self.tail_start..self.tail_start + k].copy_from_slice(&rest[..k]);
            self.tail_start = (self.tail_start + k) % cap;
            rest = &rest[k..];
        }
    }

    /// Bytes pushed so far, kept or not.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Whether some pushed bytes have already been dropped.
    pub fn is_truncated(&self) -> bool {
        self.total > (self.head.len() + self.tail.len()) as u64
    }

    /// Stops capturing and returns the kept bytes in order (no copy of the data).
    pub fn finish(self) -> Captured {
        let truncated = self.is_truncated();
        let mut tail = self.tail;
        tail.rotate_left(self.tail_start);
        Captured {
            head: self.head,
            tail,
            total: self.total,
            truncated,
        }
    }
}

/// Appends `data` (which must fit under `limit`), growing by doubling like `Vec` does but
/// never past `limit`: plain `extend` could round a 1 MiB cap up to 2 MiB of capacity.
fn extend_capped(buf: &mut Vec<u8>, data: &[u8], limit: usize) {
    let needed = buf.len() + data.len();
    if buf.capacity() < needed {
        let target = buf
            .capacity()
            .saturating_mul(2)
            .max(256)
            .min(limit)
            .max(needed);
        buf.reserve_exact(target - buf.len());
    }
    buf.extend_from_slice(data);
}

impl Captured {
    /// Bytes dropped between `head` and `tail`.
    pub fn omitted(&self) -> u64 {
        self.total
            .saturating_sub((self.head.len() + self.tail.len()) as u64)
    }

    /// The output as text: `head`, then `\n…[N bytes omitted]…\n`, then `tail` when
    /// truncated. A character cut in half at either edge of the gap is dropped (and counted
    /// in N) rather than shown as U+FFFD; other invalid UTF-8 is replaced.
    pub fn to_string_lossy(&self) -> String {
        if !self.truncated {
            let mut all = Vec::with_capacity(self.head.len() + self.tail.len());
            all.extend_from_slice(&self.head);
            all.extend_from_slice(&self.tail);
            return String::from_utf8_lossy(&all).into_owned();
        }
        let head_end = complete_prefix_len(&self.head);
        let tail_start = leading_continuation_len(&self.tail);
        let omitted = self.omitted() + (self.head.len() - head_end + tail_start) as u64;
        format!(
            "{}\n…[{omitted} bytes omitted]…\n{}",
            String::from_utf8_lossy(&self.head[..head_end]),
            String::from_utf8_lossy(&self.tail[tail_start..]),
        )
    }
}

/// Length of `bytes` without a multi-byte UTF-8 sequence cut off at its end.
fn complete_prefix_len(bytes: &[u8]) -> usize {
    let len = bytes.len();
    for back in 1..=len.min(4) {
        let b = bytes[len - back];
        if b & 0xC0 == 0x80 {
            continue; // continuation byte: keep looking for the lead byte
        }
        let needed = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if back < needed { len - back } else { len };
    }
    len
}

/// Continuation bytes at the start of `bytes` (the rest of a character cut off before it).
fn leading_continuation_len(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .take(3)
        .take_while(|b| **b & 0xC0 == 0x80)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(head: usize, tail: usize, chunks: &[&[u8]]) -> Captured {
        let mut buf = CappedBuffer::new(head, tail);
        for c in chunks {
            buf.push(c);
        }
        buf.finish()
    }

    /// What any correct implementation must keep, computed the obvious way.
    fn expected(head: usize, tail: usize, all: &[u8]) -> Captured {
        let h = head.min(all.len());
        let t = tail.min(all.len() - h);
        Captured {
            head: all[..h].to_vec(),
            tail: all[all.len() - t..].to_vec(),
            total: all.len() as u64,
            truncated: all.len() > h + t,
        }
    }

    #[test]
    fn small_output_is_kept_whole() {
        let c = capture(10, 10, &[b"hello ", b"world"]);
        assert_eq!(c.head, b"hello worl");
        assert_eq!(c.tail, b"d");
        assert_eq!(c.total, 11);
        assert!(!c.truncated);
        assert_eq!(c.omitted(), 0);
        assert_eq!(c.to_string_lossy(), "hello world");
    }

    #[test]
    fn nothing_pushed() {
        let c = capture(4, 4, &[]);
        assert_eq!(c, Captured::default());
        assert_eq!(c.to_string_lossy(), "");
        let c = capture(4, 4, &[b"", b""]);
        assert_eq!(c, Captured::default());
    }

    #[test]
    fn exactly_at_cap_is_not_truncated() {
        let c = capture(4, 4, &[b"abcdefgh"]);
        assert_eq!(
            (c.head.as_slice(), c.tail.as_slice()),
            (&b"abcd"[..], &b"efgh"[..])
        );
        assert!(!c.truncated);
        assert_eq!(c.to_string_lossy(), "abcdefgh");
    }

    #[test]
    fn one_past_cap_is_truncated() {
        let c = capture(4, 4, &[b"abcdefghi"]);
        assert_eq!(
            (c.head.as_slice(), c.tail.as_slice()),
            (&b"abcd"[..], &b"fghi"[..])
        );
        assert!(c.truncated);
        assert_eq!(c.omitted(), 1);
        assert_eq!(c.to_string_lossy(), "abcd\n…[1 bytes omitted]…\nfghi");
    }

    #[test]
    fn tail_ring_wraps_across_many_small_pushes() {
        let all: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let mut buf = CappedBuffer::new(3, 7);
        for b in &all {
            buf.push(std::slice::from_ref(b));
            assert_eq!(buf.total() > 10, buf.is_truncated());
        }
        assert_eq!(buf.finish(), expected(3, 7, &all));
    }

    #[test]
    fn zero_sized_parts() {
        let data = b"0123456789";
        assert_eq!(capture(0, 0, &[data]), expected(0, 0, data));
        assert_eq!(capture(0, 3, &[data]), expected(0, 3, data));
        assert_eq!(capture(3, 0, &[data]), expected(3, 0, data));
        let c = capture(0, 0, &[data, data]);
        assert_eq!(c.total, 20);
        assert!(c.truncated);
        assert_eq!(c.to_string_lossy(), "\n…[20 bytes omitted]…\n");
    }

    #[test]
    fn any_chunking_gives_the_same_result() {
        let all: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut seed = 0x1234_5678_9abc_def0_u64;
        for (head, tail) in [
            (0, 0),
            (1, 1),
            (10, 0),
            (0, 10),
            (100, 37),
            (4999, 1),
            (3000, 3000),
        ] {
            for _ in 0..20 {
                let mut buf = CappedBuffer::new(head, tail);
                let mut pos = 0;
                while pos < all.len() {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let len = (seed % 300) as usize;
                    let end = (pos + len).min(all.len());
                    buf.push(&all[pos..end]);
                    pos = end;
                }
                assert_eq!(buf.finish(), expected(head, tail, &all), "{head}/{tail}");
            }
        }
    }

    #[test]
    fn fifty_megabytes_stay_bounded() {
        const HEAD: usize = 64 * 1024;
        const TAIL: usize = 100_000; // not a multiple of the chunk: the ring really wraps
        const CHUNK: usize = 64 * 1024;
        const TOTAL: usize = 50 * 1024 * 1024;
        let byte_at = |i: usize| (i % 251) as u8;

        let mut buf = CappedBuffer::new(HEAD, TAIL);
        let mut chunk = vec![0u8; CHUNK];
        let mut pos = 0;
        while pos < TOTAL {
            let len = CHUNK.min(TOTAL - pos);
            for (j, b) in chunk[..len].iter_mut().enumerate() {
                *b = byte_at(pos + j);
            }
            buf.push(&chunk[..len]);
            pos += len;
            assert!(buf.head.capacity() <= HEAD);
            assert!(buf.tail.capacity() <= TAIL);
        }
        let c = buf.finish();
        assert_eq!(c.total, TOTAL as u64);
        assert!(c.truncated);
        assert_eq!(c.omitted(), (TOTAL - HEAD - TAIL) as u64);
        assert!(c.head.capacity() <= HEAD && c.tail.capacity() <= TAIL);
        assert!(c.head.iter().enumerate().all(|(i, b)| *b == byte_at(i)));
        let tail_from = TOTAL - TAIL;
        assert!(
            c.tail
                .iter()
                .enumerate()
                .all(|(i, b)| *b == byte_at(tail_from + i))
        );
    }

    #[test]
    fn capacity_grows_with_output_not_with_limits() {
        let mut buf = CappedBuffer::new(1 << 20, 1 << 20);
        buf.push(b"ok\n");
        assert!(buf.head.capacity() < 4096);
        assert_eq!(buf.tail.capacity(), 0);
    }

    #[test]
    fn one_huge_push_keeps_only_its_end() {
        let all: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        let mut buf = CappedBuffer::new(10, 1000);
        buf.push(&all);
        assert!(buf.tail.capacity() <= 1000);
        assert_eq!(buf.finish(), expected(10, 1000, &all));
    }

    #[test]
    fn split_characters_at_the_gap_are_dropped_and_counted() {
        // "é" is 2 bytes, "日" 3, "🦀" 4: cut each in half at the head/tail edges.
        let text = "abé日🦀xyz🦀日é";
        let bytes = text.as_bytes();
        let c = capture(3, 3, &[bytes]); // head "ab" + first byte of é; tail = last 3 bytes
        assert_eq!(c.head, b"ab\xC3");
        let s = c.to_string_lossy();
        assert!(!s.contains('\u{FFFD}'), "{s:?}");
        assert!(s.starts_with("ab\n…["), "{s:?}");
        assert!(s.ends_with("]…\né"), "{s:?}");
        let shown = 2 + "é".len();
        assert!(
            s.contains(&format!("[{} bytes omitted]", bytes.len() - shown)),
            "{s:?}"
        );

        // Complete characters at the edges are kept as they are.
        let c = capture(2, 2, &["é-----é".as_bytes()]);
        assert_eq!(c.to_string_lossy(), "é\n…[5 bytes omitted]…\né");
        // A 4-byte character cut after 3 bytes.
        let c = capture(4, 0, &["a🦀b".as_bytes(), b"more"]);
        assert_eq!(c.to_string_lossy(), "a\n…[9 bytes omitted]…\n");
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        let c = capture(4, 4, &[b"\xFF\xFEab", b"----", b"cd\xFF\xFF"]);
        assert_eq!(
            c.to_string_lossy(),
            "\u{FFFD}\u{FFFD}ab\n…[4 bytes omitted]…\ncd\u{FFFD}\u{FFFD}"
        );
        let c = capture(4, 4, &[b"\xFFok"]);
        assert_eq!(c.to_string_lossy(), "\u{FFFD}ok");
    }

    #[test]
    fn whole_output_is_decoded_as_one_when_not_truncated() {
        // A character straddling head and tail is intact when nothing was dropped.
        let c = capture(1, 10, &["é".as_bytes()]);
        assert_eq!(c.to_string_lossy(), "é");
    }
}
