//! Netascii translation (RFC 1350 §1, RFC 764): a local LF travels as CR LF and a bare CR as
//! CR NUL. Both directions are streaming: chunks may split a CR from what follows it.

/// Local text to netascii. Stateless: every byte maps on its own.
pub fn encode(input: &[u8], out: &mut Vec<u8>) {
    out.reserve(input.len() + input.len() / 16);
    for &b in input {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            b => out.push(b),
        }
    }
}

/// Netascii to local text, carrying a trailing CR across chunk boundaries.
#[derive(Debug, Default)]
pub struct Decoder {
    pending_cr: bool,
}

impl Decoder {
    pub fn new() -> Self {
        Decoder::default()
    }

    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len());
        for &b in input {
            if self.pending_cr {
                self.pending_cr = false;
                match b {
                    b'\n' => {
                        out.push(b'\n');
                        continue;
                    }
                    0 => {
                        out.push(b'\r');
                        continue;
                    }
                    // A CR followed by anything else is malformed; keep both bytes.
                    _ => out.push(b'\r'),
                }
            }
            if b == b'\r' {
                self.pending_cr = true;
            } else {
                out.push(b);
            }
        }
    }

    /// End of stream: a dangling CR is kept as is.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.pending_cr) {
            out.push(b'\r');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn line_endings_and_bare_cr() {
        let mut out = Vec::new();
        encode(b"a\nb\rc", &mut out);
        assert_eq!(out, b"a\r\nb\r\0c");
    }

    proptest! {
        #[test]
        fn round_trip_with_any_chunking(data in proptest::collection::vec(any::<u8>(), 0..400), cut in 0usize..400) {
            let mut wire = Vec::new();
            encode(&data, &mut wire);
            let cut = cut.min(wire.len());
            let mut dec = Decoder::new();
            let mut back = Vec::new();
            dec.decode(&wire[..cut], &mut back);
            dec.decode(&wire[cut..], &mut back);
            dec.finish(&mut back);
            prop_assert_eq!(back, data);
        }
    }
}
