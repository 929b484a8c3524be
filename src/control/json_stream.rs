//! Splitting a QMP byte stream into JSON texts. QMP clients send objects
//! back to back, with or without newlines, so we track brackets (outside
//! strings) rather than lines. Bytes that cannot start a JSON object or
//! array are reported as one error per run of them, and the stream goes on.

/// Longest single message we accept.
pub(crate) const MAX_MESSAGE: usize = 1 << 20;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    /// A complete bracketed text (not yet parsed).
    Text(Vec<u8>),
    /// Bytes outside any object, e.g. a bare word.
    Garbage(String),
    /// A message longer than `MAX_MESSAGE`; the connection should close.
    TooLong,
}

#[derive(Default)]
pub(crate) struct Splitter {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escaped: bool,
    garbage: Vec<u8>,
}

impl Splitter {
    /// Feed bytes; complete pieces are appended to `out`.
    pub(crate) fn feed(&mut self, bytes: &[u8], out: &mut Vec<Piece>) {
        for &b in bytes {
            if self.depth == 0 {
                self.between_texts(b, out);
                continue;
            }
            if self.buf.len() >= MAX_MESSAGE {
                out.push(Piece::TooLong);
                *self = Splitter::default();
                return;
            }
            self.buf.push(b);
            if self.in_string {
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        out.push(Piece::Text(std::mem::take(&mut self.buf)));
                    }
                }
                _ => {}
            }
        }
    }

    fn between_texts(&mut self, b: u8, out: &mut Vec<Piece>) {
        let ends_garbage = b.is_ascii_whitespace() || b == b'{' || b == b'[';
        if ends_garbage && !self.garbage.is_empty() {
            let g = String::from_utf8_lossy(&std::mem::take(&mut self.garbage)).into_owned();
            out.push(Piece::Garbage(g));
        }
        match b {
            b'{' | b'[' => {
                self.depth = 1;
                self.buf.push(b);
            }
            _ if b.is_ascii_whitespace() => {}
            _ if self.garbage.len() < 64 => self.garbage.push(b),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<Piece> {
        let mut s = Splitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out);
        }
        out
    }

    #[test]
    fn objects_back_to_back_and_across_reads() {
        let out = split(&[b"{\"a\": \"}{\\\"\"}{\"b\"", b": [1, {}]}\n"]);
        assert_eq!(
            out,
            vec![
                Piece::Text(b"{\"a\": \"}{\\\"\"}".to_vec()),
                Piece::Text(b"{\"b\": [1, {}]}".to_vec()),
            ]
        );
    }

    #[test]
    fn garbage_is_reported_and_the_stream_recovers() {
        let out = split(&[b"foo bar{\"x\":1}"]);
        assert_eq!(
            out,
            vec![
                Piece::Garbage("foo".into()),
                Piece::Garbage("bar".into()),
                Piece::Text(b"{\"x\":1}".to_vec()),
            ]
        );
    }

    #[test]
    fn endless_message_is_cut_off() {
        let mut s = Splitter::default();
        let mut out = Vec::new();
        s.feed(b"[", &mut out);
        s.feed(&vec![b'1'; MAX_MESSAGE + 1], &mut out);
        assert_eq!(out, vec![Piece::TooLong]);
    }
}
