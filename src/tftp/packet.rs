//! TFTP wire format: RRQ, WRQ, DATA, ACK, ERROR (RFC 1350 §5) and OACK with its options
//! (RFC 2347 option extension, 2348 blksize, 2349 timeout and tsize, 7440 windowsize).
//! Pure code: decoding any byte string returns a value or an error, never panics.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

pub const OP_RRQ: u16 = 1;
pub const OP_WRQ: u16 = 2;
pub const OP_DATA: u16 = 3;
pub const OP_ACK: u16 = 4;
pub const OP_ERROR: u16 = 5;
pub const OP_OACK: u16 = 6;

/// RFC 2348: blksize between 8 and 65464 octets.
pub const BLKSIZE_MIN: u16 = 8;
pub const BLKSIZE_MAX: u16 = 65464;
/// RFC 1350 default block size.
pub const DEFAULT_BLKSIZE: u16 = 512;
/// RFC 2349: timeout between 1 and 255 seconds.
pub const TIMEOUT_MIN: u8 = 1;
pub const TIMEOUT_MAX: u8 = 255;
/// RFC 7440: windowsize between 1 and 65535 blocks.
pub const WINDOWSIZE_MIN: u16 = 1;
/// RFC 2347 §"Packet Formats": a request with its options fits in 512 octets. Longer requests
/// are refused before they are parsed, so a datagram can never cost more than this to decode.
pub const MAX_REQUEST_LEN: usize = 512;
/// More options than any client sends (tftp-hpa, curl, atftp and phones send at most 5); a
/// request with more is refused rather than parsed on.
pub const MAX_OPTIONS: usize = 16;

/// Transfer mode requested by the client (RFC 1350 §5). `mail` is obsolete and refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Octet,
    Netascii,
}

impl Mode {
    /// The mode named on the wire (case-insensitive, RFC 1350 §5); `None` for anything else.
    pub fn from_wire(mode: &str) -> Option<Mode> {
        if mode.eq_ignore_ascii_case("octet") {
            Some(Mode::Octet)
        } else if mode.eq_ignore_ascii_case("netascii") {
            Some(Mode::Netascii)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Octet => "octet",
            Mode::Netascii => "netascii",
        }
    }
}

/// An ERROR the server sends: a code and a short fixed text. Texts are `'static` on purpose:
/// nothing a client sent (and nothing about our disks or upstreams) is ever echoed back, so an
/// ERROR is never larger than the request that drew it and leaks nothing (details are logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorPacket {
    pub code: ErrorCode,
    pub text: &'static str,
}

impl ErrorPacket {
    pub const fn new(code: ErrorCode, text: &'static str) -> ErrorPacket {
        ErrorPacket { code, text }
    }

    pub fn encode(&self) -> Bytes {
        Packet::error(self.code, self.text).encode()
    }
}

/// TFTP error codes (RFC 1350 Appendix, RFC 2347 adds 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NotDefined,
    FileNotFound,
    AccessViolation,
    DiskFull,
    IllegalOperation,
    UnknownTid,
    FileExists,
    NoSuchUser,
    OptionRefused,
    Other(u16),
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            0 => ErrorCode::NotDefined,
            1 => ErrorCode::FileNotFound,
            2 => ErrorCode::AccessViolation,
            3 => ErrorCode::DiskFull,
            4 => ErrorCode::IllegalOperation,
            5 => ErrorCode::UnknownTid,
            6 => ErrorCode::FileExists,
            7 => ErrorCode::NoSuchUser,
            8 => ErrorCode::OptionRefused,
            n => ErrorCode::Other(n),
        }
    }

    pub fn as_u16(self) -> u16 {
        match self {
            ErrorCode::NotDefined => 0,
            ErrorCode::FileNotFound => 1,
            ErrorCode::AccessViolation => 2,
            ErrorCode::DiskFull => 3,
            ErrorCode::IllegalOperation => 4,
            ErrorCode::UnknownTid => 5,
            ErrorCode::FileExists => 6,
            ErrorCode::NoSuchUser => 7,
            ErrorCode::OptionRefused => 8,
            ErrorCode::Other(n) => n,
        }
    }
}

/// The options this implementation understands. `None` means the option was not present.
/// Unknown options are kept in `unknown` (and ignored by the server, RFC 2347).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub blksize: Option<u16>,
    pub timeout: Option<u8>,
    pub tsize: Option<u64>,
    pub windowsize: Option<u16>,
    pub unknown: Vec<(String, String)>,
}

impl Options {
    pub fn is_empty(&self) -> bool {
        self.blksize.is_none()
            && self.timeout.is_none()
            && self.tsize.is_none()
            && self.windowsize.is_none()
    }

    /// Pairs in the order they are written on the wire.
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut v = Vec::new();
        if let Some(b) = self.blksize {
            v.push(("blksize", b.to_string()));
        }
        if let Some(t) = self.timeout {
            v.push(("timeout", t.to_string()));
        }
        if let Some(t) = self.tsize {
            v.push(("tsize", t.to_string()));
        }
        if let Some(w) = self.windowsize {
            v.push(("windowsize", w.to_string()));
        }
        v
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Rrq {
        filename: String,
        mode: String,
        options: Options,
    },
    Wrq {
        filename: String,
        mode: String,
        options: Options,
    },
    Data {
        block: u16,
        data: Bytes,
    },
    Ack {
        block: u16,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Oack {
        options: Options,
    },
}

/// Why a datagram could not be decoded; the server answers with the matching ERROR.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("packet shorter than 4 bytes")]
    TooShort,
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("missing NUL terminator")]
    Unterminated,
    #[error("file name or mode is not valid text")]
    BadString,
    #[error("option {name} has invalid value {value:?}")]
    BadOption { name: String, value: String },
    #[error("option {0} given twice")]
    DuplicateOption(String),
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
}

impl DecodeError {
    /// The ERROR code a server should answer with (RFC 1350 illegal operation; RFC 2347 option
    /// negotiation failure is code 8).
    pub fn error_code(&self) -> ErrorCode {
        match self {
            DecodeError::BadOption { .. }
            | DecodeError::DuplicateOption(_)
            | DecodeError::TooManyOptions => ErrorCode::OptionRefused,
            _ => ErrorCode::IllegalOperation,
        }
    }

    /// The fixed ERROR a server answers with: the code, and a text that echoes nothing of the
    /// request (the `Display` text, with the offending bytes, is for the log).
    pub fn reply(&self) -> ErrorPacket {
        match self.error_code() {
            ErrorCode::OptionRefused => ErrorPacket::new(ErrorCode::OptionRefused, "bad option"),
            code => ErrorPacket::new(code, "malformed request"),
        }
    }
}

impl Packet {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Packet {
        Packet::Error {
            code,
            message: message.into(),
        }
    }

    pub fn decode(buf: &[u8]) -> Result<Packet, DecodeError> {
        if buf.len() < 2 {
            return Err(DecodeError::TooShort);
        }
        let op = u16::from_be_bytes([buf[0], buf[1]]);
        let body = &buf[2..];
        match op {
            OP_RRQ | OP_WRQ => {
                let mut fields = NulFields::new(body);
                let filename = fields.next_str()?.ok_or(DecodeError::Unterminated)?;
                let mode = fields.next_str()?.ok_or(DecodeError::Unterminated)?;
                let options = decode_options(&mut fields, true)?;
                if op == OP_RRQ {
                    Ok(Packet::Rrq {
                        filename,
                        mode,
                        options,
                    })
                } else {
                    Ok(Packet::Wrq {
                        filename,
                        mode,
                        options,
                    })
                }
            }
            OP_DATA => {
                if body.len() < 2 {
                    return Err(DecodeError::TooShort);
                }
                Ok(Packet::Data {
                    block: u16::from_be_bytes([body[0], body[1]]),
                    data: Bytes::copy_from_slice(&body[2..]),
                })
            }
            OP_ACK => {
                if body.len() < 2 {
                    return Err(DecodeError::TooShort);
                }
                Ok(Packet::Ack {
                    block: u16::from_be_bytes([body[0], body[1]]),
                })
            }
            OP_ERROR => {
                if body.len() < 2 {
                    return Err(DecodeError::TooShort);
                }
                let code = ErrorCode::from_u16(u16::from_be_bytes([body[0], body[1]]));
                // Be lenient with a missing final NUL: the message is informational.
                let raw = &body[2..];
                let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                let message = String::from_utf8_lossy(&raw[..end]).into_owned();
                Ok(Packet::Error { code, message })
            }
            OP_OACK => {
                let mut fields = NulFields::new(body);
                let options = decode_options(&mut fields, false)?;
                Ok(Packet::Oack { options })
            }
            other => Err(DecodeError::UnknownOpcode(other)),
        }
    }

    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len_hint());
        self.encode_into(&mut out);
        out.freeze()
    }

    pub fn encode_into(&self, out: &mut BytesMut) {
        match self {
            Packet::Rrq {
                filename,
                mode,
                options,
            }
            | Packet::Wrq {
                filename,
                mode,
                options,
            } => {
                let op = if matches!(self, Packet::Rrq { .. }) {
                    OP_RRQ
                } else {
                    OP_WRQ
                };
                out.put_u16(op);
                put_str(out, filename);
                put_str(out, mode);
                put_options(out, options);
            }
            Packet::Data { block, data } => {
                out.put_u16(OP_DATA);
                out.put_u16(*block);
                out.put_slice(data);
            }
            Packet::Ack { block } => {
                out.put_u16(OP_ACK);
                out.put_u16(*block);
            }
            Packet::Error { code, message } => {
                out.put_u16(OP_ERROR);
                out.put_u16(code.as_u16());
                put_str(out, message);
            }
            Packet::Oack { options } => {
                out.put_u16(OP_OACK);
                put_options(out, options);
            }
        }
    }

    fn encoded_len_hint(&self) -> usize {
        match self {
            Packet::Data { data, .. } => 4 + data.len(),
            _ => 64,
        }
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    // A NUL inside a string would corrupt the framing; strip it.
    for b in s.bytes().filter(|&b| b != 0) {
        out.put_u8(b);
    }
    out.put_u8(0);
}

fn put_options(out: &mut BytesMut, options: &Options) {
    for (name, value) in options.pairs() {
        put_str(out, name);
        put_str(out, &value);
    }
    for (name, value) in &options.unknown {
        put_str(out, name);
        put_str(out, value);
    }
}

/// Iterates over NUL-terminated fields.
struct NulFields<'a> {
    rest: &'a [u8],
}

impl<'a> NulFields<'a> {
    fn new(rest: &'a [u8]) -> Self {
        NulFields { rest }
    }

    /// `Ok(None)` at the clean end of the packet; `Err` for bytes without a terminating NUL.
    fn next_bytes(&mut self) -> Result<Option<&'a [u8]>, DecodeError> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        match self.rest.iter().position(|&b| b == 0) {
            Some(i) => {
                let field = &self.rest[..i];
                self.rest = &self.rest[i + 1..];
                Ok(Some(field))
            }
            None => Err(DecodeError::Unterminated),
        }
    }

    fn next_str(&mut self) -> Result<Option<String>, DecodeError> {
        match self.next_bytes()? {
            Some(b) => std::str::from_utf8(b)
                .map(|s| Some(s.to_string()))
                .map_err(|_| DecodeError::BadString),
            None => Ok(None),
        }
    }
}

fn decode_options(fields: &mut NulFields<'_>, request: bool) -> Result<Options, DecodeError> {
    let mut options = Options::default();
    // Linear in the packet: names are checked against a hash set, and their number is capped.
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    while let Some(name) = fields.next_bytes()? {
        let value = match fields.next_bytes()? {
            Some(v) => v,
            // Some clients pad requests with trailing NULs; a name without a value ends the list.
            None if request => break,
            None => return Err(DecodeError::Unterminated),
        };
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        let value = String::from_utf8_lossy(value).into_owned();
        if name.is_empty() {
            continue;
        }
        if seen.len() == MAX_OPTIONS {
            return Err(DecodeError::TooManyOptions);
        }
        if !seen.insert(name.clone()) {
            return Err(DecodeError::DuplicateOption(name));
        }
        let bad = || DecodeError::BadOption {
            name: name.clone(),
            value: value.clone(),
        };
        // RFC 2347: option names are case-insensitive.
        match name.as_str() {
            "blksize" => {
                let v: u32 = value.trim().parse().map_err(|_| bad())?;
                // RFC 2348: values outside 8..=65464 are invalid. In a request, a larger value
                // may be answered with a smaller one, so clamp it there; reject below 8.
                if v < BLKSIZE_MIN as u32 || (!request && v > BLKSIZE_MAX as u32) {
                    return Err(bad());
                }
                options.blksize = Some(v.min(BLKSIZE_MAX as u32) as u16);
            }
            "timeout" => {
                let v: u32 = value.trim().parse().map_err(|_| bad())?;
                if !(TIMEOUT_MIN as u32..=TIMEOUT_MAX as u32).contains(&v) {
                    return Err(bad());
                }
                options.timeout = Some(v as u8);
            }
            "tsize" => {
                let v: u64 = value.trim().parse().map_err(|_| bad())?;
                options.tsize = Some(v);
            }
            "windowsize" => {
                let v: u32 = value.trim().parse().map_err(|_| bad())?;
                if v < WINDOWSIZE_MIN as u32 || v > u16::MAX as u32 {
                    return Err(bad());
                }
                options.windowsize = Some(v as u16);
            }
            _ => options.unknown.push((name, value)),
        }
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rrq_with_options_decodes_case_insensitively() {
        let raw = b"\x00\x01SEP001122AABBCC.cnf.xml\x00octet\x00BLKSIZE\x001428\x00TSize\x000\x00windowsize\x0016\x00";
        let p = Packet::decode(raw).unwrap();
        match p {
            Packet::Rrq {
                filename,
                mode,
                options,
            } => {
                assert_eq!(filename, "SEP001122AABBCC.cnf.xml");
                assert_eq!(mode, "octet");
                assert_eq!(options.blksize, Some(1428));
                assert_eq!(options.tsize, Some(0));
                assert_eq!(options.windowsize, Some(16));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn out_of_range_options_are_refused() {
        for raw in [
            &b"\x00\x01f\x00octet\x00blksize\x007\x00"[..],
            b"\x00\x01f\x00octet\x00timeout\x000\x00",
            b"\x00\x01f\x00octet\x00timeout\x00256\x00",
            b"\x00\x01f\x00octet\x00windowsize\x000\x00",
            b"\x00\x01f\x00octet\x00windowsize\x0065536\x00",
            b"\x00\x01f\x00octet\x00tsize\x00-1\x00",
        ] {
            let err = Packet::decode(raw).unwrap_err();
            assert_eq!(err.error_code(), ErrorCode::OptionRefused, "{raw:?}");
        }
        // An oversized blksize request is answered with the maximum (RFC 2348).
        let p = Packet::decode(b"\x00\x01f\x00octet\x00blksize\x0070000\x00").unwrap();
        assert!(matches!(p, Packet::Rrq { options, .. } if options.blksize == Some(BLKSIZE_MAX)));
    }

    #[test]
    fn malformed_requests_are_illegal_operations() {
        let e = Packet::decode(b"\x00\x01file\x00octet").unwrap_err();
        assert_eq!(e, DecodeError::Unterminated);
        assert_eq!(e.error_code(), ErrorCode::IllegalOperation);
        assert_eq!(
            Packet::decode(b"\x00\x09xx").unwrap_err(),
            DecodeError::UnknownOpcode(9)
        );
        assert_eq!(Packet::decode(b"\x00").unwrap_err(), DecodeError::TooShort);
        assert_eq!(
            Packet::decode(b"\x00\x04\x00").unwrap_err(),
            DecodeError::TooShort
        );
    }

    #[test]
    fn option_floods_are_refused_after_the_cap_and_duplicates_found_in_linear_time() {
        let mut raw = b"\x00\x01f\x00octet\x00".to_vec();
        for i in 0..=MAX_OPTIONS {
            raw.extend_from_slice(format!("o{i}\x00v\x00").as_bytes());
        }
        assert_eq!(
            Packet::decode(&raw).unwrap_err(),
            DecodeError::TooManyOptions
        );
        let e = Packet::decode(b"\x00\x01f\x00octet\x00tsize\x000\x00TSIZE\x000\x00").unwrap_err();
        assert_eq!(e, DecodeError::DuplicateOption("tsize".into()));
        // The reply is fixed: nothing of the request is echoed.
        assert_eq!(e.reply().text, "bad option");
        assert_eq!(DecodeError::Unterminated.reply().text, "malformed request");
    }

    #[test]
    fn modes_are_case_insensitive_and_mail_is_refused() {
        assert_eq!(Mode::from_wire("NetASCII"), Some(Mode::Netascii));
        assert_eq!(Mode::from_wire("OCTET"), Some(Mode::Octet));
        assert_eq!(Mode::from_wire("mail"), None);
    }

    #[test]
    fn error_packet_encoding() {
        let p = Packet::error(ErrorCode::FileNotFound, "File not found");
        assert_eq!(&p.encode()[..], b"\x00\x05\x00\x01File not found\x00");
    }

    fn arb_options() -> impl Strategy<Value = Options> {
        (
            proptest::option::of(BLKSIZE_MIN..=BLKSIZE_MAX),
            proptest::option::of(TIMEOUT_MIN..=TIMEOUT_MAX),
            proptest::option::of(any::<u64>()),
            proptest::option::of(WINDOWSIZE_MIN..=u16::MAX),
        )
            .prop_map(|(blksize, timeout, tsize, windowsize)| Options {
                blksize,
                timeout,
                tsize,
                windowsize,
                unknown: Vec::new(),
            })
    }

    fn arb_text() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_./-]{1,40}"
    }

    fn arb_packet() -> impl Strategy<Value = Packet> {
        prop_oneof![
            (
                arb_text(),
                prop_oneof![Just("octet"), Just("netascii")],
                arb_options()
            )
                .prop_map(|(filename, mode, options)| Packet::Rrq {
                    filename,
                    mode: mode.to_string(),
                    options
                }),
            (arb_text(), arb_options()).prop_map(|(filename, options)| Packet::Wrq {
                filename,
                mode: "octet".into(),
                options
            }),
            (
                any::<u16>(),
                proptest::collection::vec(any::<u8>(), 0..1500)
            )
                .prop_map(|(block, data)| Packet::Data {
                    block,
                    data: Bytes::from(data)
                }),
            any::<u16>().prop_map(|block| Packet::Ack { block }),
            (0u16..9, "[ -~]{0,60}").prop_map(|(c, message)| Packet::Error {
                code: ErrorCode::from_u16(c),
                message
            }),
            arb_options().prop_map(|options| Packet::Oack { options }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(p in arb_packet()) {
            let bytes = p.encode();
            prop_assert_eq!(Packet::decode(&bytes).unwrap(), p);
        }

        #[test]
        fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Packet::decode(&raw);
        }

        /// Any datagram up to the largest UDP payload decodes (or fails) quickly: the work is
        /// linear in its length and the option count is capped. The bytes come from a cheap
        /// generator (seeded by proptest), mostly short NUL-separated fields.
        #[test]
        fn arbitrary_datagrams_decode_in_bounded_time(
            op in 1u16..7,
            seed in any::<u64>(),
            len in 0usize..65_000,
        ) {
            let mut x = seed | 1;
            let mut raw = op.to_be_bytes().to_vec();
            raw.extend((0..len).map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if x % 4 == 0 { 0 } else { b'a' + (x % 26) as u8 }
            }));
            let t = std::time::Instant::now();
            let _ = Packet::decode(&raw);
            prop_assert!(t.elapsed() < std::time::Duration::from_millis(50));
        }

        #[test]
        fn arbitrary_requests_never_panic(
            fields in proptest::collection::vec("[a-zA-Z0-9]{0,12}", 0..10),
            op in 1u16..7,
        ) {
            let mut raw = op.to_be_bytes().to_vec();
            for f in fields {
                raw.extend_from_slice(f.as_bytes());
                raw.push(0);
            }
            let _ = Packet::decode(&raw);
        }
    }
}
