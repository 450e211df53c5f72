//! The numbers and encodings of the proxy-wasm ABI 0.2.1 that the host and a module agree on:
//! statuses, map and buffer types, actions, and the header map serialisation.

/// What a host call answers. The SDKs accept only some statuses from each call and panic on
/// others, so each call answers with one its callers expect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
}

impl Status {
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// Which header map a call is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapType {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
    HttpCallResponseHeaders,
    HttpCallResponseTrailers,
}

impl MapType {
    pub fn from_code(code: u32) -> Option<MapType> {
        Some(match code {
            0 => MapType::RequestHeaders,
            1 => MapType::RequestTrailers,
            2 => MapType::ResponseHeaders,
            3 => MapType::ResponseTrailers,
            6 => MapType::HttpCallResponseHeaders,
            7 => MapType::HttpCallResponseTrailers,
            _ => return None,
        })
    }
}

/// Which buffer a call is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufferType {
    RequestBody,
    ResponseBody,
    HttpCallResponseBody,
    VmConfiguration,
    PluginConfiguration,
}

impl BufferType {
    pub fn from_code(code: u32) -> Option<BufferType> {
        Some(match code {
            0 => BufferType::RequestBody,
            1 => BufferType::ResponseBody,
            4 => BufferType::HttpCallResponseBody,
            6 => BufferType::VmConfiguration,
            7 => BufferType::PluginConfiguration,
            _ => return None,
        })
    }
}

/// What a module's stream callback asks of the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

impl Action {
    pub fn from_code(code: u32) -> Action {
        if code == 1 {
            Action::Pause
        } else {
            Action::Continue
        }
    }
}

/// The header map serialisation: the pair count, each pair's key and value lengths (all u32
/// little-endian), then each key and value with a NUL after it.
pub fn encode_map(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let size = pairs
        .iter()
        .map(|(key, value)| 8 + key.len() + value.len() + 2)
        .sum::<usize>()
        + 4;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (key, value) in pairs {
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (key, value) in pairs {
        out.extend_from_slice(key);
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    out
}

/// The pairs of a serialised header map; `None` when the bytes are not one.
pub fn decode_map(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let count = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let sizes_end = 4usize.checked_add(count.checked_mul(8)?)?;
    let sizes = bytes.get(4..sizes_end)?;
    let mut at = sizes_end;
    let mut pairs = Vec::with_capacity(count);
    for size in sizes.chunks_exact(8) {
        let key_len = u32::from_le_bytes(size[..4].try_into().ok()?) as usize;
        let value_len = u32::from_le_bytes(size[4..].try_into().ok()?) as usize;
        let key = bytes.get(at..at.checked_add(key_len)?)?;
        at += key_len;
        if bytes.get(at) != Some(&0) {
            return None;
        }
        at += 1;
        let value = bytes.get(at..at.checked_add(value_len)?)?;
        at += value_len;
        if bytes.get(at) != Some(&0) {
            return None;
        }
        at += 1;
        pairs.push((key, value));
    }
    Some(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_maps_round_trip_and_the_empty_map_is_four_zero_bytes() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b":path", b"/a?b"), (b"x-empty", b""), (b"k", b"v")];
        let encoded = encode_map(&pairs);
        assert_eq!(&encoded[..4], &3u32.to_le_bytes());
        assert_eq!(&encoded[4..8], &5u32.to_le_bytes());
        assert_eq!(&encoded[8..12], &4u32.to_le_bytes());
        assert_eq!(&encoded[28..34], b":path\0");
        assert_eq!(decode_map(&encoded).unwrap(), pairs);
        assert_eq!(encode_map(&[]), vec![0, 0, 0, 0]);
        assert_eq!(decode_map(&[0, 0, 0, 0]).unwrap(), vec![]);
    }

    #[test]
    fn malformed_maps_are_refused() {
        let encoded = encode_map(&[(&b"k"[..], &b"v"[..])]);
        assert!(decode_map(&encoded[..encoded.len() - 1]).is_none());
        let mut no_nul = encoded.clone();
        no_nul[13] = b'x';
        assert!(decode_map(&no_nul).is_none());
        assert!(decode_map(&[0xff, 0xff, 0xff, 0xff]).is_none());
        assert!(decode_map(&[1, 0]).is_none());
    }
}
