//! Server-sent events, cut out of the bytes as they come: events end at a blank
//! line, lines end at `\n`, `\r\n` or `\r`, and a chunk may end anywhere (inside
//! a line end, or a UTF-8 character).

/// The bytes received and not yet a whole event.
#[derive(Default)]
pub(crate) struct Events {
    /// Text so far, line ends made `\n`.
    text: String,
    /// Where in `text` to look for an event's end next.
    scanned: usize,
    /// A `\r` ended the last chunk: a `\n` starting the next belongs to it.
    pending_cr: bool,
    /// The start of a UTF-8 character the last chunk cut.
    partial: Vec<u8>,
}

impl Events {
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        let whole = match std::str::from_utf8(&self.partial) {
            Ok(_) => self.partial.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.partial.len(),
        };
        let chunk: Vec<u8> = self.partial.drain(..whole).collect();
        let mut chars = String::from_utf8_lossy(&chunk)
            .into_owned()
            .into_bytes()
            .into_iter()
            .peekable();
        // Bytes of valid UTF-8: `\r` and `\n` are never inside a character.
        let mut out = Vec::with_capacity(chunk.len());
        if self.pending_cr && chars.peek() == Some(&b'\n') {
            chars.next();
        }
        self.pending_cr = false;
        while let Some(byte) = chars.next() {
            if byte != b'\r' {
                out.push(byte);
                continue;
            }
            out.push(b'\n');
            match chars.peek() {
                Some(b'\n') => {
                    chars.next();
                }
                None => self.pending_cr = true,
                Some(_) => {}
            }
        }
        self.text.push_str(&String::from_utf8_lossy(&out));
    }

    /// The data of the next whole event that has any (keep-alives have none).
    pub(crate) fn next(&mut self) -> Option<String> {
        loop {
            let Some(end) = self.text[self.scanned..].find("\n\n").map(|at| self.scanned + at) else {
                // An end may straddle what came and what comes next: look again
                // from the last line end.
                self.scanned = self.text.rfind('\n').unwrap_or(0);
                return None;
            };
            let block: String = self.text.drain(..end + 2).collect();
            self.scanned = 0;
            let data: Vec<&str> = block
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|data| data.strip_prefix(' ').unwrap_or(data))
                .collect();
            if !data.is_empty() {
                return Some(data.join("\n"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all(events: &mut Events) -> Vec<String> {
        std::iter::from_fn(|| events.next()).collect()
    }

    #[test]
    fn events_end_at_blank_lines_of_any_line_end() {
        for stream in [
            "event: message\ndata: {\"a\":1}\n\n:keep-alive\n\ndata: 2\n\n",
            "event: message\r\ndata: {\"a\":1}\r\n\r\n:keep-alive\r\n\r\ndata: 2\r\n\r\n",
            "event: message\rdata: {\"a\":1}\r\r:keep-alive\r\rdata: 2\r\r",
        ] {
            let mut events = Events::default();
            events.push(stream.as_bytes());
            assert_eq!(all(&mut events), ["{\"a\":1}", "2"], "{stream:?}");
        }
        let mut events = Events::default();
        events.push(b"data: a\ndata: b\n\n");
        assert_eq!(all(&mut events), ["a\nb"], "data lines join");
    }

    proptest! {
        #[test]
        fn any_cut_of_the_bytes_gives_the_same_events(cuts in proptest::collection::vec(0usize..60, 0..8), crlf in any::<bool>()) {
            let end = if crlf { "\r\n" } else { "\n" };
            let stream = format!("data: \"é€😀\"{end}{end}:ping{end}{end}data: {{\"n\":2}}{end}{end}");
            let bytes = stream.as_bytes();
            let mut at: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            at.sort_unstable();
            let mut events = Events::default();
            let mut got = Vec::new();
            let mut from = 0;
            for cut in at.into_iter().chain([bytes.len()]) {
                events.push(&bytes[from..cut]);
                got.extend(all(&mut events));
                from = cut;
            }
            prop_assert_eq!(got, vec!["\"é€😀\"".to_owned(), "{\"n\":2}".to_owned()]);
        }
    }
}
