//! A JSON object written field by field into a byte buffer, for the access log: keys are
//! trusted literals written as they are, values are escaped only when they need it, numbers and
//! addresses are written digit by digit, and the timestamp's date and time are formatted once
//! a second. Several times cheaper per line than a serializer.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

/// One object; call [`Line::end`] to close it.
pub struct Line<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Line<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Line<'a> {
        out.push(b'{');
        Line { out, first: true }
    }

    /// `"key":`, after a comma unless it is the first field. `key` is a literal: it is not
    /// escaped.
    fn key(&mut self, key: &'static str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    pub fn null(&mut self, key: &'static str) {
        self.key(key);
        self.out.extend_from_slice(b"null");
    }

    /// A string value, or `null`.
    pub fn str(&mut self, key: &'static str, value: Option<&str>) {
        self.key(key);
        match value {
            Some(value) => string(self.out, value),
            None => self.out.extend_from_slice(b"null"),
        }
    }

    /// An IP address as a string, or `null`.
    pub fn ip(&mut self, key: &'static str, value: Option<IpAddr>) {
        self.key(key);
        match value {
            Some(address) => {
                self.out.push(b'"');
                write_ip(self.out, address);
                self.out.push(b'"');
            }
            None => self.out.extend_from_slice(b"null"),
        }
    }

    /// A socket address as a string (`1.2.3.4:80`, `[::1]:80`), or `null`.
    pub fn socket(&mut self, key: &'static str, value: Option<SocketAddr>) {
        self.key(key);
        match value {
            Some(address) => {
                self.out.push(b'"');
                if address.is_ipv6() {
                    self.out.push(b'[');
                    write_ip(self.out, address.ip());
                    self.out.push(b']');
                } else {
                    write_ip(self.out, address.ip());
                }
                self.out.push(b':');
                self.out
                    .extend_from_slice(itoa::Buffer::new().format(address.port()).as_bytes());
                self.out.push(b'"');
            }
            None => self.out.extend_from_slice(b"null"),
        }
    }

    pub fn number(&mut self, key: &'static str, value: Option<u64>) {
        self.key(key);
        match value {
            Some(value) => self
                .out
                .extend_from_slice(itoa::Buffer::new().format(value).as_bytes()),
            None => self.out.extend_from_slice(b"null"),
        }
    }

    /// Milliseconds with three decimals (to the microsecond), or `null`.
    pub fn millis(&mut self, key: &'static str, value: Option<Duration>) {
        self.key(key);
        match value {
            Some(value) => {
                let micros = value.as_micros().min(u128::from(u64::MAX)) as u64;
                self.out
                    .extend_from_slice(itoa::Buffer::new().format(micros / 1000).as_bytes());
                let fraction = micros % 1000;
                self.out.extend_from_slice(&[
                    b'.',
                    b'0' + (fraction / 100) as u8,
                    b'0' + (fraction / 10 % 10) as u8,
                    b'0' + (fraction % 10) as u8,
                ]);
            }
            None => self.out.extend_from_slice(b"null"),
        }
    }

    /// Bytes as a lower-case hex string (trace and span ids).
    pub fn hex(&mut self, key: &'static str, bytes: &[u8]) {
        self.key(key);
        self.out.push(b'"');
        let at = self.out.len();
        self.out.resize(at + bytes.len() * 2, 0);
        let _ = hex::encode_to_slice(bytes, &mut self.out[at..]);
        self.out.push(b'"');
    }

    /// RFC 3339 in UTC with milliseconds, `2026-12-05T18:13:09.481Z`. The date and time to
    /// the second are formatted once a second per thread.
    pub fn timestamp(&mut self, key: &'static str, at: SystemTime) {
        thread_local! {
            static SECOND: std::cell::RefCell<(u64, Vec<u8>)> = const {
                std::cell::RefCell::new((u64::MAX, Vec::new()))
            };
        }
        self.key(key);
        self.out.push(b'"');
        let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let second = since.as_secs();
        SECOND.with(|cached| {
            let mut cached = cached.borrow_mut();
            if cached.0 != second {
                // `2026-12-05T18:13:09Z` without its `Z`.
                let mut text = Vec::with_capacity(20);
                let whole = std::time::UNIX_EPOCH + Duration::from_secs(second);
                let _ = write!(text, "{}", humantime::format_rfc3339_seconds(whole));
                text.pop();
                *cached = (second, text);
            }
            self.out.extend_from_slice(&cached.1);
        });
        let millis = since.subsec_millis();
        self.out.extend_from_slice(&[
            b'.',
            b'0' + (millis / 100) as u8,
            b'0' + (millis / 10 % 10) as u8,
            b'0' + (millis % 10) as u8,
            b'Z',
            b'"',
        ]);
    }

    /// A nested object under `key`; close it with [`Line::end`].
    pub fn object(&mut self, key: &'static str) -> Line<'_> {
        self.key(key);
        Line::new(self.out)
    }

    pub fn end(self) {
        self.out.push(b'}');
    }
}

/// An address's usual text: IPv4 digit by digit, IPv6 through its `Display`.
fn write_ip(out: &mut Vec<u8>, address: IpAddr) {
    match address {
        IpAddr::V4(v4) => {
            for (index, octet) in v4.octets().iter().enumerate() {
                if index > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(itoa::Buffer::new().format(*octet).as_bytes());
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// `value` as a JSON string: as it is when nothing in it needs escaping, which is the usual
/// case, else through `serde_json`.
fn string(out: &mut Vec<u8>, value: &str) {
    if value
        .bytes()
        .all(|byte| byte >= 0x20 && byte != b'"' && byte != b'\\' && byte != 0x7f)
    {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(out, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_json_that_parses_back_with_every_kind_of_value() {
        let mut out = Vec::new();
        let mut line = Line::new(&mut out);
        line.str("plain", Some("GET"));
        line.str("quoted", Some("a \"b\" \\ c\n\u{1}"));
        line.str("unicode", Some("é ✓"));
        line.str("missing", None);
        line.number("count", Some(u64::MAX));
        line.millis("ms", Some(Duration::from_micros(1_234_567)));
        line.millis("small", Some(Duration::from_micros(45)));
        line.hex("id", &[0x00, 0xab, 0xff]);
        line.socket("addr", Some("127.0.0.1:80".parse().unwrap()));
        line.socket("addr6", Some("[2001:db8::1]:443".parse().unwrap()));
        line.ip("client", Some("10.0.0.255".parse().unwrap()));
        line.timestamp("ts", SystemTime::UNIX_EPOCH + Duration::from_millis(1_500));
        line.timestamp(
            "later",
            SystemTime::UNIX_EPOCH + Duration::from_millis(86_400_007),
        );
        let mut inner = line.object("inner");
        inner.str("k", Some("v"));
        inner.end();
        line.null("nothing");
        line.end();
        let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed["plain"], "GET");
        assert_eq!(parsed["quoted"], "a \"b\" \\ c\n\u{1}");
        assert_eq!(parsed["unicode"], "é ✓");
        assert!(parsed["missing"].is_null());
        assert_eq!(parsed["count"], u64::MAX);
        assert_eq!(parsed["ms"], 1234.567);
        assert_eq!(parsed["small"], 0.045);
        assert_eq!(parsed["id"], "00abff");
        assert_eq!(parsed["addr"], "127.0.0.1:80");
        assert_eq!(parsed["addr6"], "[2001:db8::1]:443");
        assert_eq!(parsed["client"], "10.0.0.255");
        assert_eq!(parsed["ts"], "1970-01-01T00:00:01.500Z");
        assert_eq!(parsed["later"], "1970-01-02T00:00:00.007Z");
        assert_eq!(parsed["inner"]["k"], "v");
        assert!(parsed["nothing"].is_null());
    }
}
