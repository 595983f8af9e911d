//! The attach channel (`cargo xtask attach`): a virtio serial port named [`ATTACH_PORT`]
//! on which the host opens a shell session with a terminal of its own in the guest. The
//! host's client connects, sends [`Frame::Open`] with its window size and `TERM`, then
//! [`Frame::Data`] (its keystrokes, raw: Ctrl-C is byte 3, which the guest's terminal
//! turns into SIGINT for its foreground program) and [`Frame::Resize`]; the guest answers
//! with [`Frame::Data`] (what the terminal shows) and, when the shell ends,
//! [`Frame::Exit`]. The host closing its end hangs the session up. One session at a time.
//!
//! Each frame is a kind byte, a big-endian 16-bit length and that many bytes of payload.
//!
//! Public for the engine only, like the rest of this crate.

/// The virtio serial port of the attach channel.
pub const ATTACH_PORT: &str = "attach";

/// The most a frame's payload holds.
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

/// The longest `TERM` an [`Frame::Open`] may carry.
pub const MAX_TERM: usize = 64;

/// One message of the attach channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Host: start a shell on a new terminal of this size, with this `TERM`.
    Open {
        /// Lines.
        rows: u16,
        /// Columns.
        cols: u16,
        /// The terminal type (at most [`MAX_TERM`] bytes of `[A-Za-z0-9._+-]`).
        term: String,
    },
    /// Bytes for the terminal (host) or from it (guest).
    Data(Vec<u8>),
    /// Host: the window's new size.
    Resize {
        /// Lines.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Guest: the shell ended with this exit status (128 + N for signal N).
    Exit(u8),
}

const OPEN: u8 = 1;
const DATA: u8 = 2;
const RESIZE: u8 = 3;
const EXIT: u8 = 4;

impl Frame {
    /// The frame's bytes. Data longer than [`MAX_PAYLOAD`] must be sent in several frames
    /// ([`Frame::data`]).
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload) = match self {
            Frame::Open { rows, cols, term } => {
                let mut p = [rows.to_be_bytes(), cols.to_be_bytes()].concat();
                p.extend_from_slice(term.as_bytes());
                (OPEN, p)
            }
            Frame::Data(bytes) => (DATA, bytes.clone()),
            Frame::Resize { rows, cols } => (RESIZE, [rows.to_be_bytes(), cols.to_be_bytes()].concat()),
            Frame::Exit(code) => (EXIT, vec![*code]),
        };
        let len = payload.len().min(MAX_PAYLOAD);
        let mut out = vec![kind];
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.extend_from_slice(&payload[..len]);
        out
    }

    /// `bytes` as data frames' bytes, split as [`MAX_PAYLOAD`] requires.
    pub fn data(bytes: &[u8]) -> Vec<u8> {
        bytes.chunks(MAX_PAYLOAD).flat_map(|chunk| Frame::Data(chunk.to_vec()).encode()).collect()
    }
}

/// Cuts a stream into frames as its bytes come.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// Takes the next bytes of the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if one has come; an error for a frame no peer sends (the
    /// stream is then unusable).
    pub fn next_frame(&mut self) -> Option<Result<Frame, String>> {
        if self.buf.len() < 3 {
            return None;
        }
        let len = u16::from_be_bytes([self.buf[1], self.buf[2]]) as usize;
        if self.buf.len() < 3 + len {
            return None;
        }
        let kind = self.buf[0];
        let payload: Vec<u8> = self.buf.drain(..3 + len).skip(3).collect();
        let size = |p: &[u8]| (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]]));
        Some(match (kind, payload.len()) {
            (OPEN, 4..) if payload.len() <= 4 + MAX_TERM => {
                let (rows, cols) = size(&payload);
                let term = String::from_utf8_lossy(&payload[4..]).into_owned();
                match term.chars().all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c)) {
                    true => Ok(Frame::Open { rows, cols, term }),
                    false => Err(format!("a terminal type that is no name: {term:?}")),
                }
            }
            (DATA, _) => Ok(Frame::Data(payload)),
            (RESIZE, 4) => {
                let (rows, cols) = size(&payload);
                Ok(Frame::Resize { rows, cols })
            }
            (EXIT, 1) => Ok(Frame::Exit(payload[0])),
            (kind, len) => Err(format!("an unknown frame (kind {kind}, {len} bytes)")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_whatever_the_cuts() {
        let frames = [
            Frame::Open { rows: 24, cols: 80, term: "xterm-256color".into() },
            Frame::Data(b"echo hi\n\x03".to_vec()),
            Frame::Data(Vec::new()),
            Frame::Resize { rows: 50, cols: 132 },
            Frame::Exit(130),
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        for cut in 1..bytes.len() {
            let mut decoder = Decoder::default();
            let mut got = Vec::new();
            for chunk in bytes.chunks(cut) {
                decoder.push(chunk);
                while let Some(frame) = decoder.next_frame() {
                    got.push(frame.unwrap());
                }
            }
            assert_eq!(got, frames, "cut {cut}");
        }
    }

    #[test]
    fn long_data_is_split_and_odd_frames_refused() {
        let long = vec![7u8; MAX_PAYLOAD * 2 + 5];
        let mut decoder = Decoder::default();
        decoder.push(&Frame::data(&long));
        let mut joined = Vec::new();
        while let Some(Ok(Frame::Data(part))) = decoder.next_frame() {
            joined.extend(part);
        }
        assert_eq!(joined, long);
        for bad in [vec![9, 0, 0], vec![RESIZE, 0, 1, 0], vec![EXIT, 0, 2, 0, 0], vec![OPEN, 0, 5, 0, 1, 0, 1, b'/']] {
            let mut decoder = Decoder::default();
            decoder.push(&bad);
            assert!(decoder.next_frame().unwrap().is_err(), "{bad:?}");
        }
    }
}
