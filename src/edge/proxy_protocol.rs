//! The PROXY protocol header (versions 1 and 2) an L4 load balancer puts before a connection's
//! first byte, parsed from a buffer that may hold only part of it, or more than it.
//!
//! The parser never guesses: the first bytes either start a v1 (`PROXY `) or a v2 (the 12-byte
//! signature) header, or the header is invalid. Only what the specification allows is
//! accepted, and a v2 header is at most [`MAX_V2_LENGTH`] bytes long.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes, CRLF included.
pub const V1_MAX_LENGTH: usize = 107;
/// The longest v2 header accepted, its 16 fixed bytes included. The specification allows
/// 64 KiB of addresses and TLVs; what balancers send is well under 1 KiB.
pub const MAX_V2_LENGTH: usize = 4096;

const TLV_ALPN: u8 = 0x01;
const TLV_AUTHORITY: u8 = 0x02;
const TLV_CRC32C: u8 = 0x03;
const TLV_UNIQUE_ID: u8 = 0x05;
const TLV_SSL: u8 = 0x20;
const SSL_SUB_VERSION: u8 = 0x21;
const SSL_SUB_CN: u8 = 0x22;
const SSL_SUB_CIPHER: u8 = 0x23;
/// `PP2_CLIENT_SSL`: the client connected to the balancer over TLS.
const SSL_CLIENT_SSL: u8 = 0x01;
/// `PP2_CLIENT_CERT_CONN`: the client presented a certificate on this connection.
const SSL_CLIENT_CERT_CONN: u8 = 0x02;

/// What a header said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    /// The client and the address it connected to. `None` for v2 `LOCAL` (the balancer's own
    /// health check), `UNKNOWN` (v1), and families other than TCP over IPv4/IPv6: the
    /// connection's own addresses stand.
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    /// v2 TLVs.
    pub tlvs: Tlvs,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tlvs {
    pub alpn: Option<Vec<u8>>,
    pub authority: Option<String>,
    pub unique_id: Option<Vec<u8>>,
    pub ssl: Option<SslTlv>,
    /// Whether a CRC32C was sent (and so verified).
    pub crc32c: bool,
}

/// The `PP2_TYPE_SSL` TLV: how the client reached the balancer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SslTlv {
    /// The client spoke TLS to the balancer.
    pub client_ssl: bool,
    /// The client sent a certificate, and whether the balancer verified it.
    pub client_cert: bool,
    pub verified: bool,
    pub version: Option<String>,
    pub cipher: Option<String>,
    /// The client certificate's subject common name.
    pub common_name: Option<String>,
}

// One per connection, moved once: not worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parse {
    /// A whole header, `length` bytes long; the bytes after it are the connection's own.
    Complete { header: Header, length: usize },
    /// What has arrived is a valid beginning: read more.
    Incomplete,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub &'static str);

/// Parses the header at the start of `buffer`.
pub fn parse(buffer: &[u8]) -> Result<Parse, Invalid> {
    const V1_PREFIX: &[u8] = b"PROXY ";
    let v1 = starts_like(buffer, V1_PREFIX);
    let v2 = starts_like(buffer, &V2_SIGNATURE);
    if !v1 && !v2 {
        return Err(Invalid("the connection does not start with a PROXY header"));
    }
    if v1 {
        parse_v1(buffer)
    } else {
        parse_v2(buffer)
    }
}

/// Whether `buffer` and `prefix` agree on their common length.
fn starts_like(buffer: &[u8], prefix: &[u8]) -> bool {
    let common = buffer.len().min(prefix.len());
    buffer[..common] == prefix[..common]
}

fn parse_v1(buffer: &[u8]) -> Result<Parse, Invalid> {
    let window = &buffer[..buffer.len().min(V1_MAX_LENGTH)];
    let Some(end) = window.windows(2).position(|pair| pair == b"\r\n") else {
        if buffer.len() >= V1_MAX_LENGTH {
            return Err(Invalid("PROXY v1 header longer than 107 bytes"));
        }
        if window.contains(&b'\n') {
            return Err(Invalid("PROXY v1 header does not end in CRLF"));
        }
        return Ok(Parse::Incomplete);
    };
    let line = std::str::from_utf8(&buffer[6..end])
        .map_err(|_| Invalid("PROXY v1 header is not ASCII"))?;
    let length = end + 2;
    let fields: Vec<&str> = line.split(' ').collect();
    let header = match fields.as_slice() {
        ["UNKNOWN", ..] => Header {
            version: 1,
            ..Header::default()
        },
        [family @ ("TCP4" | "TCP6"), source, destination, source_port, destination_port] => {
            let v6 = *family == "TCP6";
            let source = v1_address(source, v6)?;
            let destination = v1_address(destination, v6)?;
            Header {
                version: 1,
                source: Some(SocketAddr::new(source, v1_port(source_port)?)),
                destination: Some(SocketAddr::new(destination, v1_port(destination_port)?)),
                tlvs: Tlvs::default(),
            }
        }
        _ => return Err(Invalid("malformed PROXY v1 header")),
    };
    Ok(Parse::Complete { header, length })
}

fn v1_address(text: &str, v6: bool) -> Result<IpAddr, Invalid> {
    let address = if v6 {
        text.parse::<Ipv6Addr>().map(IpAddr::V6)
    } else {
        text.parse::<Ipv4Addr>().map(IpAddr::V4)
    };
    address.map_err(|_| Invalid("PROXY v1 header has a malformed address"))
}

fn v1_port(text: &str) -> Result<u16, Invalid> {
    // Decimal digits only, no sign and no leading zero (the specification's form).
    let valid = !text.is_empty()
        && text.len() <= 5
        && text.bytes().all(|byte| byte.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if !valid {
        return Err(Invalid("PROXY v1 header has a malformed port"));
    }
    text.parse()
        .map_err(|_| Invalid("PROXY v1 header has a malformed port"))
}

fn parse_v2(buffer: &[u8]) -> Result<Parse, Invalid> {
    if buffer.len() < 16 {
        return Ok(Parse::Incomplete);
    }
    let version_command = buffer[12];
    if version_command >> 4 != 2 {
        return Err(Invalid("PROXY v2 header has an unknown version"));
    }
    let local = match version_command & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(Invalid("PROXY v2 header has an unknown command")),
    };
    let family = buffer[13];
    let address_length = match (family >> 4, family & 0x0f) {
        // UNSPEC: no addresses to read; TCP and UDP over IPv4, IPv6 and UNIX.
        (0, 0) => 0,
        (1, 1 | 2) => 12,
        (2, 1 | 2) => 36,
        (3, 1 | 2) => 216,
        _ => return Err(Invalid("PROXY v2 header has an unknown address family")),
    };
    let declared = u16::from_be_bytes([buffer[14], buffer[15]]) as usize;
    let length = 16 + declared;
    if length > MAX_V2_LENGTH {
        return Err(Invalid("PROXY v2 header is longer than 4096 bytes"));
    }
    if declared < address_length {
        return Err(Invalid(
            "PROXY v2 header is too short for its address family",
        ));
    }
    if buffer.len() < length {
        return Ok(Parse::Incomplete);
    }
    let body = &buffer[16..length];
    let (source, destination) = match (family, local) {
        (_, true) => (None, None),
        (0x11, false) => {
            let ip = |at: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    body[at],
                    body[at + 1],
                    body[at + 2],
                    body[at + 3],
                ))
            };
            let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
            (
                Some(SocketAddr::new(ip(0), port(8))),
                Some(SocketAddr::new(ip(4), port(10))),
            )
        }
        (0x21, false) => {
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&body[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
            (
                Some(SocketAddr::new(ip(0), port(32))),
                Some(SocketAddr::new(ip(16), port(34))),
            )
        }
        // UNSPEC, UDP and UNIX sockets: the connection's own addresses stand.
        _ => (None, None),
    };
    let tlvs = parse_tlvs(&buffer[..length], 16 + address_length)?;
    Ok(Parse::Complete {
        header: Header {
            version: 2,
            source,
            destination,
            tlvs,
        },
        length,
    })
}

/// The TLVs of the v2 header `header`, from `start`. A CRC32C is checked over the whole header.
fn parse_tlvs(header: &[u8], start: usize) -> Result<Tlvs, Invalid> {
    let mut tlvs = Tlvs::default();
    let mut at = start;
    while at < header.len() {
        if header.len() - at < 3 {
            return Err(Invalid("PROXY v2 header has a truncated TLV"));
        }
        let kind = header[at];
        let length = u16::from_be_bytes([header[at + 1], header[at + 2]]) as usize;
        let value_start = at + 3;
        let value_end = value_start + length;
        if value_end > header.len() {
            return Err(Invalid("PROXY v2 TLV runs past the header"));
        }
        let value = &header[value_start..value_end];
        match kind {
            TLV_ALPN => tlvs.alpn = Some(value.to_vec()),
            TLV_AUTHORITY => {
                tlvs.authority = Some(
                    std::str::from_utf8(value)
                        .map_err(|_| Invalid("PROXY v2 AUTHORITY is not UTF-8"))?
                        .to_string(),
                )
            }
            TLV_CRC32C => {
                if value.len() != 4 {
                    return Err(Invalid("PROXY v2 CRC32C TLV is not 4 bytes"));
                }
                let sent = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
                let mut copy = header.to_vec();
                copy[value_start..value_end].fill(0);
                if crc32c(&copy) != sent {
                    return Err(Invalid("PROXY v2 header fails its CRC32C"));
                }
                tlvs.crc32c = true;
            }
            TLV_UNIQUE_ID => {
                if value.len() > 128 {
                    return Err(Invalid("PROXY v2 UNIQUE_ID is longer than 128 bytes"));
                }
                tlvs.unique_id = Some(value.to_vec())
            }
            TLV_SSL => tlvs.ssl = Some(parse_ssl(value)?),
            // NOOP, NETNS and the custom and experimental ranges: skipped.
            _ => {}
        }
        at = value_end;
    }
    Ok(tlvs)
}

fn parse_ssl(value: &[u8]) -> Result<SslTlv, Invalid> {
    if value.len() < 5 {
        return Err(Invalid("PROXY v2 SSL TLV is shorter than 5 bytes"));
    }
    let client = value[0];
    let verify = u32::from_be_bytes([value[1], value[2], value[3], value[4]]);
    let mut ssl = SslTlv {
        client_ssl: client & SSL_CLIENT_SSL != 0,
        client_cert: client & SSL_CLIENT_CERT_CONN != 0,
        verified: client & SSL_CLIENT_CERT_CONN != 0 && verify == 0,
        ..SslTlv::default()
    };
    let mut at = 5;
    while at < value.len() {
        if value.len() - at < 3 {
            return Err(Invalid("PROXY v2 SSL TLV has a truncated sub-TLV"));
        }
        let kind = value[at];
        let length = u16::from_be_bytes([value[at + 1], value[at + 2]]) as usize;
        let end = at + 3 + length;
        if end > value.len() {
            return Err(Invalid("PROXY v2 SSL sub-TLV runs past the SSL TLV"));
        }
        let text = || String::from_utf8_lossy(&value[at + 3..end]).into_owned();
        match kind {
            SSL_SUB_VERSION => ssl.version = Some(text()),
            SSL_SUB_CN => ssl.common_name = Some(text()),
            SSL_SUB_CIPHER => ssl.cipher = Some(text()),
            _ => {}
        }
        at = end;
    }
    Ok(ssl)
}

/// CRC-32C (Castagnoli), as the PROXY v2 `CRC32C` TLV carries it.
pub fn crc32c(bytes: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = [0u32; 256];
        for (index, entry) in table.iter_mut().enumerate() {
            let mut crc = index as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0x82f6_3b78
                } else {
                    crc >> 1
                };
            }
            *entry = crc;
        }
        table
    });
    let mut crc = !0u32;
    for &byte in bytes {
        crc = table[((crc ^ byte as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Builds a v2 header: for tests, and for the benchmark's client.
pub fn encode_v2(
    source: Option<SocketAddr>,
    destination: Option<SocketAddr>,
    tlvs: &[(u8, &[u8])],
    with_crc: bool,
) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    match (source, destination) {
        (Some(SocketAddr::V4(source)), Some(SocketAddr::V4(destination))) => {
            out.extend_from_slice(&[0x21, 0x11, 0, 0]);
            out.extend_from_slice(&source.ip().octets());
            out.extend_from_slice(&destination.ip().octets());
            out.extend_from_slice(&source.port().to_be_bytes());
            out.extend_from_slice(&destination.port().to_be_bytes());
        }
        (Some(SocketAddr::V6(source)), Some(SocketAddr::V6(destination))) => {
            out.extend_from_slice(&[0x21, 0x21, 0, 0]);
            out.extend_from_slice(&source.ip().octets());
            out.extend_from_slice(&destination.ip().octets());
            out.extend_from_slice(&source.port().to_be_bytes());
            out.extend_from_slice(&destination.port().to_be_bytes());
        }
        _ => out.extend_from_slice(&[0x20, 0x00, 0, 0]),
    }
    for (kind, value) in tlvs {
        out.push(*kind);
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
        out.extend_from_slice(value);
    }
    let crc_at = out.len() + 3;
    if with_crc {
        out.extend_from_slice(&[TLV_CRC32C, 0, 4, 0, 0, 0, 0]);
    }
    let length = (out.len() - 16) as u16;
    out[14..16].copy_from_slice(&length.to_be_bytes());
    if with_crc {
        let crc = crc32c(&out);
        out[crc_at..crc_at + 4].copy_from_slice(&crc.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buffer: &[u8]) -> (Header, usize) {
        match parse(buffer) {
            Ok(Parse::Complete { header, length }) => (header, length),
            other => panic!("{other:?} for {buffer:?}"),
        }
    }

    #[test]
    fn v1_tcp4_and_tcp6_and_unknown() {
        let text = b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\nGET / HTTP/1.1\r\n";
        let (header, length) = complete(text);
        assert_eq!(length, 41);
        assert_eq!(header.source, Some("192.0.2.7:56324".parse().unwrap()));
        assert_eq!(header.destination, Some("10.0.0.1:443".parse().unwrap()));
        let (header, _) = complete(b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n");
        assert_eq!(header.source, Some("[2001:db8::1]:1".parse().unwrap()));
        let (header, length) = complete(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\nrest");
        assert_eq!((header.source, length), (None, 31));
        assert_eq!(
            complete(b"PROXY UNKNOWN\r\n").0.source,
            None,
            "UNKNOWN alone is valid"
        );
    }

    #[test]
    fn v1_prefixes_are_incomplete_and_anything_else_is_invalid() {
        let text = b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\n";
        for end in 0..text.len() {
            assert_eq!(parse(&text[..end]), Ok(Parse::Incomplete), "{end}");
        }
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 056324 443\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 +5 443\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 443\r\n",
            b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.7 ::1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1\r\n",
            b"PROXY TCP4  192.0.2.7 10.0.0.1 1 2\r\n",
            b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n",
            b"\x16\x03\x01",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 100]].concat();
        assert!(parse(&long).is_err(), "107 bytes without CRLF");
    }

    #[test]
    fn v2_addresses_tlvs_and_crc() {
        let source: SocketAddr = "198.51.100.9:40000".parse().unwrap();
        let destination: SocketAddr = "10.0.0.1:8443".parse().unwrap();
        let ssl = [
            &[SSL_CLIENT_SSL | SSL_CLIENT_CERT_CONN, 0, 0, 0, 0][..],
            &[SSL_SUB_VERSION, 0, 7],
            b"TLSv1.3",
            &[SSL_SUB_CN, 0, 6],
            b"client",
        ]
        .concat();
        let bytes = encode_v2(
            Some(source),
            Some(destination),
            &[
                (TLV_UNIQUE_ID, b"abc-123"),
                (TLV_AUTHORITY, b"api.example.com"),
                (TLV_SSL, &ssl),
                (0x04, b"noop"),
            ],
            true,
        );
        let mut stream = bytes.clone();
        stream.extend_from_slice(b"\x16\x03\x01");
        let (header, length) = complete(&stream);
        assert_eq!(length, bytes.len());
        assert_eq!(header.source, Some(source));
        assert_eq!(header.destination, Some(destination));
        assert_eq!(header.tlvs.unique_id.as_deref(), Some(&b"abc-123"[..]));
        assert_eq!(header.tlvs.authority.as_deref(), Some("api.example.com"));
        assert!(header.tlvs.crc32c);
        let ssl = header.tlvs.ssl.unwrap();
        assert!(ssl.client_ssl && ssl.client_cert && ssl.verified);
        assert_eq!(ssl.common_name.as_deref(), Some("client"));
        assert_eq!(ssl.version.as_deref(), Some("TLSv1.3"));
        for end in 0..bytes.len() {
            assert_eq!(parse(&bytes[..end]), Ok(Parse::Incomplete), "{end}");
        }
        // Any flipped bit in the addresses or TLVs fails the CRC (or the TLV layout); only
        // the CRC TLV's own type byte, changed, leaves a valid header without a CRC.
        let crc_type_at = bytes.len() - 7;
        for at in (16..bytes.len()).filter(|at| *at != crc_type_at) {
            let mut broken = bytes.clone();
            broken[at] ^= 0x40;
            assert!(parse(&broken).is_err(), "byte {at}");
        }
        let v6 = encode_v2(
            Some("[2001:db8::7]:1".parse().unwrap()),
            Some("[::1]:2".parse().unwrap()),
            &[],
            false,
        );
        assert_eq!(
            complete(&v6).0.source,
            Some("[2001:db8::7]:1".parse().unwrap())
        );
    }

    #[test]
    fn v2_local_keeps_the_socket_address_and_bad_headers_are_invalid() {
        let local = encode_v2(None, None, &[], false);
        let (header, length) = complete(&local);
        assert_eq!((header.source, length), (None, 16));
        let proxied = encode_v2(
            Some("192.0.2.1:1".parse().unwrap()),
            Some("192.0.2.2:2".parse().unwrap()),
            &[],
            false,
        );
        let mut bad_family = proxied.clone();
        bad_family[13] = 0x41;
        let mut bad_version = proxied.clone();
        bad_version[12] = 0x11;
        let mut bad_command = proxied.clone();
        bad_command[12] = 0x22;
        let mut too_long = proxied.clone();
        too_long[14..16].copy_from_slice(&5000u16.to_be_bytes());
        let mut too_short = proxied.clone();
        too_short[14..16].copy_from_slice(&4u16.to_be_bytes());
        let mut truncated_tlv = proxied.clone();
        truncated_tlv.extend_from_slice(&[TLV_AUTHORITY, 0, 9, b'x']);
        let declared = (truncated_tlv.len() - 16) as u16;
        truncated_tlv[14..16].copy_from_slice(&declared.to_be_bytes());
        for bad in [
            bad_family,
            bad_version,
            bad_command,
            too_long,
            too_short,
            truncated_tlv,
        ] {
            assert!(parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    /// One million inputs: valid headers of every kind with random bytes changed, cut short
    /// or extended, and random bytes. The parser never panics, never claims more bytes than it
    /// was given, and a header it accepts parses the same with any bytes after it.
    #[test]
    fn a_million_mutated_inputs() {
        let ssl = [&[0x03u8, 0, 0, 0, 0][..], &[SSL_SUB_CN, 0, 3], b"abc"].concat();
        let seeds: Vec<Vec<u8>> = vec![
            b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\n".to_vec(),
            b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            encode_v2(None, None, &[], false),
            encode_v2(
                Some("192.0.2.1:1".parse().unwrap()),
                Some("192.0.2.2:2".parse().unwrap()),
                &[(TLV_UNIQUE_ID, b"id"), (TLV_SSL, &ssl)],
                true,
            ),
            encode_v2(
                Some("[2001:db8::1]:1".parse().unwrap()),
                Some("[::1]:2".parse().unwrap()),
                &[(TLV_AUTHORITY, b"example.com"), (TLV_ALPN, b"h2")],
                false,
            ),
        ];
        let mut random = fastrand::Rng::with_seed(0x5eed);
        for round in 0..1_000_000u32 {
            let mut input = seeds[round as usize % seeds.len()].clone();
            match random.u8(0..5) {
                0 => {
                    for _ in 0..random.usize(1..4) {
                        let at = random.usize(..input.len());
                        input[at] = random.u8(..);
                    }
                }
                1 => input.truncate(random.usize(..input.len())),
                2 => input.extend((0..random.usize(..64)).map(|_| random.u8(..))),
                3 => {
                    let at = random.usize(..input.len());
                    input.insert(at, random.u8(..));
                }
                _ => {
                    input = (0..random.usize(..128)).map(|_| random.u8(..)).collect();
                    if random.bool() {
                        input.splice(0..0, V2_SIGNATURE);
                    }
                }
            }
            if let Ok(Parse::Complete { header, length }) = parse(&input) {
                assert!(length <= input.len());
                let mut longer = input.clone();
                longer.extend_from_slice(b"GET / HTTP/1.1\r\n");
                assert_eq!(parse(&longer), Ok(Parse::Complete { header, length }));
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        #[test]
        fn v2_headers_read_back_what_was_written(
            v6 in proptest::bool::ANY,
            source in proptest::prelude::any::<[u8; 16]>(),
            ports in proptest::prelude::any::<(u16, u16)>(),
            authority in "[a-z0-9.-]{1,60}",
            unique_id in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..128),
            crc in proptest::bool::ANY,
        ) {
            let (source, destination): (SocketAddr, SocketAddr) = if v6 {
                (
                    SocketAddr::new(IpAddr::V6(Ipv6Addr::from(source)), ports.0),
                    SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), ports.1),
                )
            } else {
                let octets = [source[0], source[1], source[2], source[3]];
                (
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(octets)), ports.0),
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ports.1),
                )
            };
            let bytes = encode_v2(
                Some(source),
                Some(destination),
                &[(TLV_AUTHORITY, authority.as_bytes()), (TLV_UNIQUE_ID, &unique_id)],
                crc,
            );
            let (header, length) = complete(&bytes);
            proptest::prop_assert_eq!(length, bytes.len());
            proptest::prop_assert_eq!(header.source, Some(source));
            proptest::prop_assert_eq!(header.destination, Some(destination));
            proptest::prop_assert_eq!(header.tlvs.authority, Some(authority));
            proptest::prop_assert_eq!(header.tlvs.unique_id, Some(unique_id));
            proptest::prop_assert_eq!(header.tlvs.crc32c, crc);
        }

        #[test]
        fn v1_headers_read_back_what_was_written(
            source in proptest::prelude::any::<[u8; 4]>(),
            v6 in proptest::prelude::any::<[u8; 16]>(),
            ports in proptest::prelude::any::<(u16, u16)>(),
        ) {
            let v4 = Ipv4Addr::from(source);
            let text = format!("PROXY TCP4 {v4} 10.0.0.1 {} {}\r\n", ports.0, ports.1);
            let (header, length) = complete(text.as_bytes());
            proptest::prop_assert_eq!(length, text.len());
            proptest::prop_assert_eq!(header.source, Some(SocketAddr::new(IpAddr::V4(v4), ports.0)));
            let v6 = Ipv6Addr::from(v6);
            let text = format!("PROXY TCP6 {v6} ::1 {} {}\r\n", ports.0, ports.1);
            if text.len() <= V1_MAX_LENGTH {
                let (header, _) = complete(text.as_bytes());
                proptest::prop_assert_eq!(header.source, Some(SocketAddr::new(IpAddr::V6(v6), ports.0)));
            }
        }

        #[test]
        fn any_bytes_are_parsed_without_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = parse(&bytes);
        }
    }
}
