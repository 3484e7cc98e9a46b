//! The per-CPU line buffer both consoles use: `kprint!` output collects here and goes
//! out a whole line at a time (one lock acquisition), so lines from different CPUs do
//! not interleave. A line longer than the buffer is split.

use core::fmt;

/// One CPU's partial line, and where a full line goes.
pub struct LineBuf<const N: usize> {
    bytes: [u8; N],
    len: usize,
    sink: fn(&[u8]),
}

impl<const N: usize> LineBuf<N> {
    /// An empty buffer that writes finished lines with `sink`.
    pub const fn new(sink: fn(&[u8])) -> Self {
        LineBuf {
            bytes: [0; N],
            len: 0,
            sink,
        }
    }

    /// Writes out the partial line, if any.
    pub fn flush(&mut self) {
        if let Some(line) = self.bytes.get(..self.len).filter(|l| !l.is_empty()) {
            (self.sink)(line);
        }
        self.len = 0;
    }

    /// Takes the partial line out without writing it (for a fatal path that must not
    /// wait for the sink's lock); `len` never exceeds `N`, so even a buffer interrupted
    /// mid-update yields in-bounds bytes.
    pub fn take(&mut self) -> ([u8; N], usize) {
        let len = self.len.min(N);
        self.len = 0;
        (self.bytes, len)
    }
}

impl<const N: usize> fmt::Write for LineBuf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len >= N {
                self.flush();
            }
            if let Some(slot) = self.bytes.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            }
            if b == b'\n' {
                self.flush();
            }
        }
        Ok(())
    }
}
