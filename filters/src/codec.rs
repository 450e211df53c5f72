//! Content codings a body filter reads and writes: `gzip` (also `x-gzip`), `deflate` (zlib)
//! and `br`. Decoding is bounded: the decoded body may not exceed its limit, and a decoder stops
//! as soon as it would, so a small compressed body cannot expand without bound (a
//! decompression bomb stops at the limit, holding at most the limit plus one buffer).

use std::io::{self, Write};

use http::HeaderValue;

/// The content coding of a body, from its `Content-Encoding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    Deflate,
    Brotli,
}

impl Coding {
    /// The coding `value` names; `None` for one Gatehouse cannot decode (or a list of
    /// codings).
    pub fn from_header(value: Option<&HeaderValue>) -> Option<Coding> {
        let Some(value) = value else {
            return Some(Coding::Identity);
        };
        let text = value.to_str().ok()?.trim();
        match text.to_ascii_lowercase().as_str() {
            "" | "identity" => Some(Coding::Identity),
            "gzip" | "x-gzip" => Some(Coding::Gzip),
            "deflate" => Some(Coding::Deflate),
            "br" => Some(Coding::Brotli),
            _ => None,
        }
    }
}

/// Why a body could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The decoded body exceeds the limit.
    TooLarge,
    /// The body is not valid in its coding, or ends before its coding does.
    Invalid,
}

/// A `Vec` that refuses to grow past its limit.
struct Bounded {
    out: Vec<u8>,
    limit: usize,
    over: bool,
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.out.len() + buf.len() > self.limit {
            self.over = true;
            return Err(io::Error::other("decoded body over the limit"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Inner {
    Identity(Bounded),
    Gzip(flate2::write::MultiGzDecoder<Bounded>),
    Deflate(flate2::write::ZlibDecoder<Bounded>),
    Brotli(Box<brotli::DecompressorWriter<Bounded>>),
}

/// Decodes a body piece by piece into memory, up to `limit` decoded bytes.
pub struct Decoder {
    inner: Inner,
}

impl Decoder {
    pub fn new(coding: Coding, limit: usize) -> Decoder {
        let out = Bounded {
            out: Vec::new(),
            limit,
            over: false,
        };
        let inner = match coding {
            Coding::Identity => Inner::Identity(out),
            Coding::Gzip => Inner::Gzip(flate2::write::MultiGzDecoder::new(out)),
            Coding::Deflate => Inner::Deflate(flate2::write::ZlibDecoder::new(out)),
            Coding::Brotli => Inner::Brotli(Box::new(brotli::DecompressorWriter::new(out, 8192))),
        };
        Decoder { inner }
    }

    fn sink(&self) -> &Bounded {
        match &self.inner {
            Inner::Identity(out) => out,
            Inner::Gzip(decoder) => decoder.get_ref(),
            Inner::Deflate(decoder) => decoder.get_ref(),
            Inner::Brotli(decoder) => decoder.get_ref(),
        }
    }

    fn error(&self) -> DecodeError {
        if self.sink().over {
            DecodeError::TooLarge
        } else {
            DecodeError::Invalid
        }
    }

    /// Decodes the next piece.
    pub fn push(&mut self, piece: &[u8]) -> Result<(), DecodeError> {
        let written = match &mut self.inner {
            Inner::Identity(out) => out.write_all(piece),
            Inner::Gzip(decoder) => decoder.write_all(piece),
            Inner::Deflate(decoder) => decoder.write_all(piece),
            Inner::Brotli(decoder) => decoder.write_all(piece),
        };
        written.map_err(|_| self.error())
    }

    /// The whole decoded body; an error when the coded body ended early.
    pub fn finish(self) -> Result<Vec<u8>, DecodeError> {
        match self.inner {
            Inner::Identity(out) => Ok(out.out),
            Inner::Gzip(mut decoder) => match decoder.try_finish() {
                Ok(()) => finished(decoder.finish()),
                Err(_) => Err(over_or_invalid(decoder.get_ref())),
            },
            Inner::Deflate(mut decoder) => match decoder.try_finish() {
                Ok(()) => finished(decoder.finish()),
                Err(_) => Err(over_or_invalid(decoder.get_ref())),
            },
            Inner::Brotli(mut decoder) => match decoder.close() {
                Ok(()) => match decoder.into_inner() {
                    Ok(out) => Ok(out.out),
                    Err(out) => Err(over_or_invalid(&out)),
                },
                Err(_) => Err(over_or_invalid(decoder.get_ref())),
            },
        }
    }
}

fn over_or_invalid(out: &Bounded) -> DecodeError {
    if out.over {
        DecodeError::TooLarge
    } else {
        DecodeError::Invalid
    }
}

fn finished(result: io::Result<Bounded>) -> Result<Vec<u8>, DecodeError> {
    match result {
        Ok(out) if out.over => Err(DecodeError::TooLarge),
        Ok(out) => Ok(out.out),
        Err(_) => Err(DecodeError::Invalid),
    }
}

/// Encodes `body` in `coding`.
pub fn encode(coding: Coding, body: &[u8]) -> Vec<u8> {
    match coding {
        Coding::Identity => body.to_vec(),
        Coding::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(body).expect("writing to memory");
            encoder.finish().expect("writing to memory")
        }
        Coding::Deflate => {
            let mut encoder =
                flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(body).expect("writing to memory");
            encoder.finish().expect("writing to memory")
        }
        Coding::Brotli => {
            let mut out = Vec::new();
            {
                let mut encoder = brotli::CompressorWriter::new(&mut out, 8192, 5, 22);
                encoder.write_all(body).expect("writing to memory");
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(coding: Coding, coded: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
        let mut decoder = Decoder::new(coding, limit);
        for piece in coded.chunks(7) {
            decoder.push(piece)?;
        }
        decoder.finish()
    }

    #[test]
    fn every_coding_round_trips_in_pieces() {
        let body = br#"{"greeting":"hello","list":[1,2,3]}"#.repeat(50);
        for coding in [
            Coding::Identity,
            Coding::Gzip,
            Coding::Deflate,
            Coding::Brotli,
        ] {
            let coded = encode(coding, &body);
            assert_eq!(decode(coding, &coded, 1 << 20).unwrap(), body, "{coding:?}");
        }
    }

    #[test]
    fn a_truncated_body_is_invalid_in_every_coding() {
        let body = b"{\"a\":1}".repeat(500);
        for coding in [Coding::Gzip, Coding::Deflate, Coding::Brotli] {
            let coded = encode(coding, &body);
            let cut = &coded[..coded.len() - 6];
            assert_eq!(
                decode(coding, cut, 1 << 20),
                Err(DecodeError::Invalid),
                "{coding:?}"
            );
        }
        assert_eq!(
            decode(Coding::Gzip, b"not gzip at all", 1 << 20),
            Err(DecodeError::Invalid)
        );
    }

    #[test]
    fn a_decompression_bomb_stops_at_the_limit() {
        // 10 MiB of zeros compress to about 10 KiB.
        let bomb = encode(Coding::Gzip, &vec![0u8; 10 << 20]);
        assert!(bomb.len() < 20 << 10, "{}", bomb.len());
        let mut decoder = Decoder::new(Coding::Gzip, 1 << 20);
        assert_eq!(decoder.push(&bomb), Err(DecodeError::TooLarge));
        assert!(decoder.sink().out.len() <= 1 << 20);
        let brotli_bomb = encode(Coding::Brotli, &vec![0u8; 10 << 20]);
        assert_eq!(
            decode(Coding::Brotli, &brotli_bomb, 1 << 20),
            Err(DecodeError::TooLarge)
        );
    }

    #[test]
    fn codings_are_read_from_the_header() {
        let coding = |text: &str| Coding::from_header(Some(&HeaderValue::from_str(text).unwrap()));
        assert_eq!(Coding::from_header(None), Some(Coding::Identity));
        assert_eq!(coding("GZIP"), Some(Coding::Gzip));
        assert_eq!(coding("x-gzip"), Some(Coding::Gzip));
        assert_eq!(coding("br"), Some(Coding::Brotli));
        assert_eq!(coding("deflate"), Some(Coding::Deflate));
        assert_eq!(coding("gzip, br"), None);
        assert_eq!(coding("zstd"), None);
    }
}
