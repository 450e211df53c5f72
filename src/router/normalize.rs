//! Path normalisation, done once per request before routing: every later decision is made on
//! the exact path that is forwarded.
//!
//! - percent-encoded unreserved characters are decoded (`%7E` → `~`, `%2e` → `.`); other escapes
//!   are kept, with upper-case hex;
//! - an encoded `/`, `\` or NUL, and a raw `\` or NUL, are rejected;
//! - `//` collapses to `/`;
//! - dot segments are removed (`/a/./b/../c` → `/a/c`), never climbing above the root.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormalizeError {
    EncodedSlash,
    EncodedBackslash,
    Nul,
    Backslash,
    BadEscape,
    NotAbsolute,
}

impl fmt::Display for NormalizeError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            NormalizeError::EncodedSlash => "the path contains an encoded \"/\" (%2F)",
            NormalizeError::EncodedBackslash => "the path contains an encoded \"\\\" (%5C)",
            NormalizeError::Nul => "the path contains a NUL byte",
            NormalizeError::Backslash => "the path contains a \"\\\"",
            NormalizeError::BadEscape => "the path contains a malformed percent escape",
            NormalizeError::NotAbsolute => "the path does not start with \"/\"",
        })
    }
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// Whether `path` is already in normal form, so the common case costs one scan and no copy.
fn already_normal(path: &[u8]) -> bool {
    if path.first() != Some(&b'/') {
        return false;
    }
    let mut previous = 0u8;
    for (index, &byte) in path.iter().enumerate() {
        match byte {
            b'%' | b'\\' | 0 => return false,
            b'/' if previous == b'/' => return false,
            b'.' if previous == b'/' => {
                // A segment starting with a dot might be "." or "..".
                let rest = &path[index..];
                if rest == b"."
                    || rest == b".."
                    || rest.starts_with(b"./")
                    || rest.starts_with(b"../")
                {
                    return false;
                }
            }
            _ => {}
        }
        previous = byte;
    }
    true
}

/// Normalise a request path (without its query). Returns `None` when it is already normal.
pub fn normalize_path(path: &str) -> Result<Option<String>, NormalizeError> {
    let bytes = path.as_bytes();
    if already_normal(bytes) {
        return Ok(None);
    }
    if bytes.first() != Some(&b'/') {
        return Err(NormalizeError::NotAbsolute);
    }
    // Pass 1: decode unreserved escapes, reject the dangerous ones.
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        match byte {
            b'%' => {
                let high = bytes.get(index + 1).copied().and_then(hex_value);
                let low = bytes.get(index + 2).copied().and_then(hex_value);
                let (Some(high), Some(low)) = (high, low) else {
                    return Err(NormalizeError::BadEscape);
                };
                let value = high << 4 | low;
                match value {
                    b'/' => return Err(NormalizeError::EncodedSlash),
                    b'\\' => return Err(NormalizeError::EncodedBackslash),
                    0 => return Err(NormalizeError::Nul),
                    value if is_unreserved(value) => decoded.push(value),
                    value => {
                        decoded.push(b'%');
                        decoded.extend_from_slice(format!("{value:02X}").as_bytes());
                    }
                }
                index += 3;
            }
            b'\\' => return Err(NormalizeError::Backslash),
            0 => return Err(NormalizeError::Nul),
            byte => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    // Pass 2: split into segments, dropping empty ones (collapsing `//`) and resolving dots.
    let trailing_slash = decoded.ends_with(b"/")
        || decoded.ends_with(b"/.")
        || decoded.ends_with(b"/..")
        || decoded == b"/";
    let mut segments: Vec<&[u8]> = Vec::new();
    for segment in decoded.split(|&byte| byte == b'/') {
        match segment {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            segment => segments.push(segment),
        }
    }
    let mut out = Vec::with_capacity(decoded.len());
    for segment in &segments {
        out.push(b'/');
        out.extend_from_slice(segment);
    }
    if out.is_empty() || (trailing_slash && !out.ends_with(b"/")) {
        out.push(b'/');
    }
    // Only ASCII bytes were produced or kept from a &str, so this cannot fail; multi-byte UTF-8
    // sequences are copied whole.
    Ok(Some(
        String::from_utf8(out).map_err(|_| NormalizeError::BadEscape)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(path: &str) -> String {
        normalize_path(path)
            .unwrap()
            .unwrap_or_else(|| path.to_string())
    }

    #[test]
    fn plain_paths_are_untouched_without_copying() {
        assert_eq!(normalize_path("/users/7").unwrap(), None);
        assert_eq!(normalize_path("/").unwrap(), None);
        assert_eq!(normalize_path("/a/.hidden/b..c").unwrap(), None);
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(normal("/public/../admin"), "/admin");
        assert_eq!(normal("/a/./b/../c"), "/a/c");
        assert_eq!(normal("/../../etc/passwd"), "/etc/passwd");
        assert_eq!(normal("/a/b/.."), "/a/");
        assert_eq!(normal("/a/."), "/a/");
    }

    #[test]
    fn encoded_dots_are_decoded_then_removed() {
        assert_eq!(normal("/public/%2e%2e/admin"), "/admin");
        assert_eq!(normal("/public/%2E%2e/admin"), "/admin");
        assert_eq!(normal("/%7Euser"), "/~user");
    }

    #[test]
    fn double_encoding_is_decoded_only_once() {
        assert_eq!(
            normal("/public/%252e%252e/admin"),
            "/public/%252e%252e/admin"
        );
        assert_eq!(normal("/a%2a"), "/a%2A");
    }

    #[test]
    fn slashes_collapse() {
        assert_eq!(normal("//admin"), "/admin");
        assert_eq!(normal("/a//b///c/"), "/a/b/c/");
    }

    #[test]
    fn dangerous_encodings_are_rejected() {
        assert_eq!(
            normalize_path("/public%2Fadmin"),
            Err(NormalizeError::EncodedSlash)
        );
        assert_eq!(
            normalize_path("/public%2fadmin"),
            Err(NormalizeError::EncodedSlash)
        );
        assert_eq!(
            normalize_path("/a%5Cb"),
            Err(NormalizeError::EncodedBackslash)
        );
        assert_eq!(normalize_path("/a%00b"), Err(NormalizeError::Nul));
        assert_eq!(normalize_path("/a\\b"), Err(NormalizeError::Backslash));
        assert_eq!(normalize_path("/a%zz"), Err(NormalizeError::BadEscape));
        assert_eq!(normalize_path("/a%2"), Err(NormalizeError::BadEscape));
    }

    #[test]
    fn non_ascii_is_kept() {
        assert_eq!(normal("/caf\u{e9}/./x"), "/caf\u{e9}/x");
    }
}
