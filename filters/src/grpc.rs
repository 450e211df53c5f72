//! What every gRPC feature shares: status codes and their HTTP counterparts (both ways), the
//! length-prefixed message framing, `grpc-message` encoding and `grpc-timeout` values.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// `grpc-status`.
pub const STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
/// `grpc-message`.
pub const MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");
/// `grpc-timeout`.
pub const TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// The gRPC status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    const ALL: [Code; 17] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    /// The code of a `grpc-status` value; anything else is `Unknown`, as the spec says.
    pub fn parse(value: &[u8]) -> Code {
        std::str::from_utf8(value)
            .ok()
            .and_then(|text| text.trim().parse::<usize>().ok())
            .and_then(|number| Code::ALL.get(number).copied())
            .unwrap_or(Code::Unknown)
    }

    pub fn number(self) -> u8 {
        self as u8
    }

    /// The `grpc-status` value (and metric label).
    pub fn as_str(self) -> &'static str {
        const NUMBERS: [&str; 17] = [
            "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15",
            "16",
        ];
        NUMBERS[self as usize]
    }

    /// The canonical name, e.g. `PERMISSION_DENIED`.
    pub fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// The HTTP status a REST client gets for this code (the mapping of `google.rpc.Code`,
    /// which Envoy's and grpc-gateway's transcoders use too).
    pub fn http_status(self) -> u16 {
        match self {
            Code::Ok => 200,
            Code::Cancelled => 499,
            Code::Unknown => 500,
            Code::InvalidArgument => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::FailedPrecondition => 400,
            Code::Aborted => 409,
            Code::OutOfRange => 400,
            Code::Unimplemented => 501,
            Code::Internal => 500,
            Code::Unavailable => 503,
            Code::DataLoss => 500,
            Code::Unauthenticated => 401,
        }
    }

    /// The code a gRPC client gets for an HTTP answer of the gateway's own (the other way round:
    /// what the status means to a caller, as in gRPC's HTTP-to-gRPC mapping, refined where the
    /// gateway knows more: a 404 of its own is a method it cannot route, `UNIMPLEMENTED`).
    pub fn for_http_status(status: u16) -> Code {
        match status {
            200..=299 => Code::Ok,
            400 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 | 405 | 501 => Code::Unimplemented,
            408 | 504 => Code::DeadlineExceeded,
            409 => Code::Aborted,
            411 | 414 | 415 | 417 | 421 | 422 | 431 => Code::InvalidArgument,
            412 => Code::FailedPrecondition,
            413 | 429 => Code::ResourceExhausted,
            416 => Code::OutOfRange,
            499 => Code::Cancelled,
            502 | 503 => Code::Unavailable,
            _ => Code::Unknown,
        }
    }
}

/// Whether a `content-type` is gRPC's: `application/grpc`, `application/grpc+proto`,
/// `application/grpc-web`, `application/grpc-web-text+proto`, ...
pub fn is_grpc_content_type(value: &[u8]) -> bool {
    const PREFIX: &[u8] = b"application/grpc";
    value.len() >= PREFIX.len()
        && value[..PREFIX.len()].eq_ignore_ascii_case(PREFIX)
        && matches!(value.get(PREFIX.len()), None | Some(b'+' | b'-' | b';'))
}

/// `grpc-message` is percent-encoded: every byte outside printable ASCII, and `%` itself.
pub fn encode_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &byte in message.as_bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A `grpc-message` as the text it encodes (malformed escapes are kept as they are).
pub fn decode_message(value: &[u8]) -> String {
    let mut out = Vec::with_capacity(value.len());
    let mut index = 0;
    while index < value.len() {
        if value[index] == b'%' && index + 2 < value.len() {
            let hex = std::str::from_utf8(&value[index + 1..index + 3]).ok();
            if let Some(byte) = hex.and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
                out.push(byte);
                index += 3;
                continue;
            }
        }
        out.push(value[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `grpc-timeout` value: 1 to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// A duration as a `grpc-timeout` value, in the finest unit that fits 8 digits (rounded up to
/// that unit).
pub fn format_timeout(timeout: Duration) -> String {
    const LIMIT: u128 = 99_999_999;
    let nanos = timeout.as_nanos();
    for (unit, per) in [
        ('n', 1u128),
        ('u', 1_000),
        ('m', 1_000_000),
        ('S', 1_000_000_000),
        ('M', 60_000_000_000),
    ] {
        let amount = nanos.div_ceil(per);
        if amount <= LIMIT {
            return format!("{amount}{unit}");
        }
    }
    format!("{}H", nanos.div_ceil(3_600_000_000_000).min(LIMIT))
}

/// The flag byte of a frame that carries trailers (gRPC-Web) rather than a message.
pub const TRAILER_FLAG: u8 = 0x80;
/// The flag bit of a compressed message.
pub const COMPRESSED_FLAG: u8 = 0x01;

/// One length-prefixed frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub flags: u8,
    pub data: Bytes,
}

/// Writes one frame: the flags byte, the length (big-endian u32), the data.
pub fn encode_frame(flags: u8, data: &[u8], out: &mut BytesMut) {
    out.reserve(5 + data.len());
    out.put_u8(flags);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// Why a stream of frames cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a gRPC message of {0} bytes is over the limit of {1} bytes")]
    TooLarge(usize, usize),
    #[error("the stream ends inside a gRPC frame")]
    Truncated,
}

/// Reads frames from pieces of a body, however the pieces cut them. Holds at most one frame.
#[derive(Debug)]
pub struct FrameDecoder {
    buffer: BytesMut,
    max_message: usize,
}

impl FrameDecoder {
    pub fn new(max_message: usize) -> FrameDecoder {
        FrameDecoder {
            buffer: BytesMut::new(),
            max_message,
        }
    }

    /// Adds a piece of the body.
    pub fn push(&mut self, piece: &[u8]) {
        self.buffer.extend_from_slice(piece);
    }

    /// The next whole frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buffer.len() < 5 {
            return Ok(None);
        }
        let length = u32::from_be_bytes([
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
        ]) as usize;
        if length > self.max_message {
            return Err(FrameError::TooLarge(length, self.max_message));
        }
        if self.buffer.len() < 5 + length {
            return Ok(None);
        }
        let flags = self.buffer.get_u8();
        self.buffer.advance(4);
        let data = self.buffer.split_to(length).freeze();
        Ok(Some(Frame { flags, data }))
    }

    /// At the end of the stream: an error if a frame was cut off.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buffer.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated)
        }
    }

    /// Bytes held that are not yet a whole frame.
    pub fn pending(&self) -> usize {
        self.buffer.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_http_and_back() {
        assert_eq!(Code::parse(b"7"), Code::PermissionDenied);
        assert_eq!(Code::parse(b"99"), Code::Unknown);
        assert_eq!(Code::parse(b"x"), Code::Unknown);
        for code in Code::ALL {
            assert_eq!(Code::parse(code.as_str().as_bytes()), code);
        }
        assert_eq!(Code::InvalidArgument.http_status(), 400);
        assert_eq!(Code::Unauthenticated.http_status(), 401);
        assert_eq!(Code::PermissionDenied.http_status(), 403);
        assert_eq!(Code::NotFound.http_status(), 404);
        assert_eq!(Code::ResourceExhausted.http_status(), 429);
        assert_eq!(Code::Unavailable.http_status(), 503);
        assert_eq!(Code::DeadlineExceeded.http_status(), 504);
        for (status, code) in [
            (401, Code::Unauthenticated),
            (403, Code::PermissionDenied),
            (429, Code::ResourceExhausted),
            (413, Code::ResourceExhausted),
            (404, Code::Unimplemented),
            (502, Code::Unavailable),
            (503, Code::Unavailable),
            (504, Code::DeadlineExceeded),
            (500, Code::Unknown),
        ] {
            assert_eq!(Code::for_http_status(status), code, "{status}");
        }
    }

    #[test]
    fn grpc_content_types_are_told_apart() {
        for yes in [
            &b"application/grpc"[..],
            b"application/grpc+proto",
            b"application/grpc-web",
            b"application/grpc-web-text+proto",
            b"Application/GRPC",
        ] {
            assert!(is_grpc_content_type(yes), "{yes:?}");
        }
        for no in [
            &b"application/json"[..],
            b"application/grpcx",
            b"text/plain",
        ] {
            assert!(!is_grpc_content_type(no), "{no:?}");
        }
    }

    #[test]
    fn messages_are_percent_encoded() {
        let text = "no route for /a%b, naïve\n";
        let encoded = encode_message(text);
        assert_eq!(encoded, "no route for /a%25b, na%C3%AFve%0A");
        assert_eq!(decode_message(encoded.as_bytes()), text);
        assert_eq!(decode_message(b"50%"), "50%");
        assert_eq!(decode_message(b"%zz"), "%zz");
    }

    #[test]
    fn timeouts_parse_and_format() {
        assert_eq!(parse_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout(b"5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_timeout(b"123456789m"), None);
        assert_eq!(parse_timeout(b"m"), None);
        assert_eq!(parse_timeout(b"10x"), None);
        assert_eq!(parse_timeout(b"-1S"), None);
        assert_eq!(format_timeout(Duration::from_millis(100)), "100000u");
        assert_eq!(format_timeout(Duration::from_secs(1)), "1000000u");
        assert_eq!(format_timeout(Duration::from_secs(300)), "300000m");
        for value in [
            Duration::from_millis(7),
            Duration::from_secs(86_400 * 3),
            Duration::from_nanos(1),
        ] {
            let parsed = parse_timeout(format_timeout(value).as_bytes()).unwrap();
            assert!(parsed >= value, "{value:?} {parsed:?}");
        }
    }

    #[test]
    fn frames_are_read_however_the_pieces_cut_them() {
        let mut body = BytesMut::new();
        encode_frame(0, b"hello", &mut body);
        encode_frame(TRAILER_FLAG, b"grpc-status: 0\r\n", &mut body);
        for cut in 0..body.len() {
            let mut decoder = FrameDecoder::new(1024);
            let mut frames = Vec::new();
            for piece in [&body[..cut], &body[cut..]] {
                decoder.push(piece);
                while let Some(frame) = decoder.next_frame().unwrap() {
                    frames.push(frame);
                }
            }
            decoder.finish().unwrap();
            assert_eq!(frames.len(), 2, "cut at {cut}");
            assert_eq!(&frames[0].data[..], b"hello");
            assert_eq!(frames[1].flags, TRAILER_FLAG);
        }
        let mut decoder = FrameDecoder::new(4);
        decoder.push(&body);
        assert_eq!(decoder.next_frame(), Err(FrameError::TooLarge(5, 4)));
        let mut decoder = FrameDecoder::new(1024);
        decoder.push(&body[..3]);
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(decoder.finish(), Err(FrameError::Truncated));
    }
}
