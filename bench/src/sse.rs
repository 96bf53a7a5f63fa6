//! Splitting a byte stream into lines, as aiohttp's `async for line in response.content` does.
//!
//! Server-sent events arrive in arbitrary network chunks: one chunk may hold several `data:`
//! lines, and a line may span chunks. The splitter keeps the unfinished tail between pushes and
//! hands out complete lines without copying them.

/// Accumulates bytes and yields complete `\n`-terminated lines (without the `\n`).
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    pos: usize,
}

impl LineSplitter {
    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 4096 && self.pos * 2 > self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete line, or `None` until more bytes arrive.
    pub fn next_line(&mut self) -> Option<&[u8]> {
        let rest = &self.buf[self.pos..];
        let nl = rest.iter().position(|&b| b == b'\n')?;
        let start = self.pos;
        self.pos += nl + 1;
        Some(&self.buf[start..start + nl])
    }

    /// Bytes received after the last complete line.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(s: &mut LineSplitter) -> Vec<String> {
        let mut v = Vec::new();
        while let Some(l) = s.next_line() {
            v.push(String::from_utf8_lossy(l).into_owned());
        }
        v
    }

    #[test]
    fn lines_spanning_chunks_are_joined() {
        let mut s = LineSplitter::default();
        s.push(b"data: {\"a\"");
        assert!(drain(&mut s).is_empty());
        s.push(b":1}\n\ndata: [DONE]\n");
        assert_eq!(drain(&mut s), vec!["data: {\"a\":1}", "", "data: [DONE]"]);
        assert!(s.pending().is_empty());
    }

    #[test]
    fn many_lines_in_one_chunk_come_out_in_order() {
        let mut s = LineSplitter::default();
        for i in 0..10_000 {
            s.push(format!("line {i}\n").as_bytes());
            assert_eq!(drain(&mut s), vec![format!("line {i}")]);
        }
        s.push(b"tail");
        assert_eq!(s.pending(), b"tail");
    }
}
