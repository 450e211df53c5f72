//! The header maps a module reads and writes: the request and response heads (with their
//! pseudo-headers `:method`, `:path`, `:authority`, `:scheme` and `:status`) and the answer to
//! an `http_call`. Changes go through Pingora's head methods, so the names' case is kept.

use http::{HeaderName, HeaderValue};

use crate::abi::{self, MapType};
use crate::host::{Host, MAX_HEADERS};

#[derive(Clone, Copy, Debug)]
pub enum Op {
    Add,
    Replace,
    Remove,
}

const REQUEST_PSEUDO: [&str; 4] = [":authority", ":path", ":method", ":scheme"];

/// Why a plugin may not write header `name`, or `None`. As for every filter: hop-by-hop and
/// framing headers are the gateway's, and so are, on requests, the forwarding, identity and
/// request id headers the upstream must be able to trust. `Host` is the plugin's to change
/// (it is `:authority`).
pub fn refused(
    plugin: &crate::plugin::Plugin,
    name: &HeaderName,
    request: bool,
) -> Option<&'static str> {
    use gatehouse_filters::headers::{refusal, Side};
    if request && *name == http::header::HOST {
        return None;
    }
    let side = if request {
        Side::Request
    } else {
        Side::Response
    };
    refusal(name, side, &plugin.gateway_headers)
}

fn request_pseudo(host: &Host, name: &[u8]) -> Option<Vec<u8>> {
    let request = &host.request;
    Some(match name {
        b":method" => request.method.as_str().as_bytes().to_vec(),
        b":path" => request
            .uri
            .path_and_query()
            .map(|path| path.as_str())
            .unwrap_or("/")
            .as_bytes()
            .to_vec(),
        b":authority" => match request.headers.get(http::header::HOST) {
            Some(host) => host.as_bytes().to_vec(),
            None => request.uri.authority()?.as_str().as_bytes().to_vec(),
        },
        b":scheme" => {
            if host.props.https {
                b"https".to_vec()
            } else {
                b"http".to_vec()
            }
        }
        _ => return None,
    })
}

/// The serialised map, pseudo-headers first.
pub fn pairs(host: &Host, map: MapType) -> Vec<u8> {
    match map {
        MapType::RequestHeaders if host.request_live => {
            let pseudo: Vec<(&str, Vec<u8>)> = REQUEST_PSEUDO
                .iter()
                .filter_map(|name| Some((*name, request_pseudo(host, name.as_bytes())?)))
                .collect();
            let mut pairs: Vec<(&[u8], &[u8])> =
                Vec::with_capacity(pseudo.len() + host.request.headers.len());
            pairs.extend(
                pseudo
                    .iter()
                    .map(|(name, value)| (name.as_bytes(), value.as_slice())),
            );
            // `Host` is there as `:authority`, as in HTTP/2.
            pairs.extend(
                host.request
                    .headers
                    .iter()
                    .filter(|(name, _)| *name != http::header::HOST)
                    .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes())),
            );
            abi::encode_map(&pairs)
        }
        MapType::ResponseHeaders if host.response_live => {
            let status = host.response.status.as_str().as_bytes();
            let mut pairs: Vec<(&[u8], &[u8])> =
                Vec::with_capacity(1 + host.response.headers.len());
            pairs.push((b":status", status));
            pairs.extend(
                host.response
                    .headers
                    .iter()
                    .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes())),
            );
            abi::encode_map(&pairs)
        }
        MapType::HttpCallResponseHeaders => match &host.call_response {
            Some(answer) => {
                let pairs: Vec<(&[u8], &[u8])> = answer
                    .headers
                    .iter()
                    .map(|(name, value)| (name.as_bytes(), value.as_slice()))
                    .collect();
                abi::encode_map(&pairs)
            }
            None => abi::encode_map(&[]),
        },
        _ => abi::encode_map(&[]),
    }
}

/// One header's value; several lines of one name are joined with ",".
pub fn value(host: &Host, map: MapType, name: &[u8]) -> Option<Vec<u8>> {
    let name = name.to_ascii_lowercase();
    let headers = match map {
        MapType::RequestHeaders if host.request_live => {
            if name.starts_with(b":") {
                return request_pseudo(host, &name);
            }
            &host.request.headers
        }
        MapType::ResponseHeaders if host.response_live => {
            if name == b":status" {
                return Some(host.response.status.as_str().as_bytes().to_vec());
            }
            &host.response.headers
        }
        MapType::HttpCallResponseHeaders => {
            let answer = host.call_response.as_ref()?;
            let values: Vec<&[u8]> = answer
                .headers
                .iter()
                .filter(|(known, _)| known.as_bytes() == name.as_slice())
                .map(|(_, value)| value.as_slice())
                .collect();
            return (!values.is_empty()).then(|| values.join(&b","[..]));
        }
        _ => return None,
    };
    let name = HeaderName::from_bytes(&name).ok()?;
    let mut values = headers.get_all(&name).iter();
    let first = values.next()?;
    let mut joined = first.as_bytes().to_vec();
    for more in values {
        joined.push(b',');
        joined.extend_from_slice(more.as_bytes());
    }
    Some(joined)
}

/// Applies one change; `false` when it would take the map past its cap.
pub fn change(host: &mut Host, map: MapType, op: Op, name: &[u8], value: Option<&[u8]>) -> bool {
    let lower = name.to_ascii_lowercase();
    match map {
        MapType::RequestHeaders if host.request_live => {
            if lower.starts_with(b":") {
                if let (Op::Add | Op::Replace, Some(value)) = (op, value) {
                    set_request_pseudo(host, &lower, value);
                }
                return true;
            }
            let Some((name, value)) = header(host, &lower, value) else {
                return true;
            };
            if refused(&host.plugin, &name, true).is_some() {
                host.plugin
                    .unsupported("changing a request header the gateway keeps to itself");
                return true;
            }
            let grows = matches!(op, Op::Add)
                || (matches!(op, Op::Replace) && !host.request.headers.contains_key(&name));
            if grows && host.request.headers.len() >= MAX_HEADERS {
                return false;
            }
            let request = &mut host.request;
            match (op, value) {
                (Op::Add, Some(value)) => {
                    let _ = request.append_header(name, value);
                }
                (Op::Replace, Some(value)) => {
                    let _ = request.insert_header(name, value);
                }
                _ => {
                    request.remove_header(&name);
                }
            }
            true
        }
        MapType::ResponseHeaders if host.response_live => {
            if lower == b":status" {
                match value
                    .and_then(|value| std::str::from_utf8(value).ok())
                    .and_then(|value| value.parse::<u16>().ok())
                {
                    Some(status) if (200..=599).contains(&status) => {
                        let _ = host.response.set_status(status);
                    }
                    _ => host.plugin.unsupported("a :status outside 200-599"),
                }
                return true;
            }
            let Some((name, value)) = header(host, &lower, value) else {
                return true;
            };
            // Dropping `content-length` is how a plugin that changes the body says so.
            let dropping_length = matches!(op, Op::Remove) && name == http::header::CONTENT_LENGTH;
            if !dropping_length && refused(&host.plugin, &name, false).is_some() {
                host.plugin
                    .unsupported("changing a response header the gateway keeps to itself");
                return true;
            }
            let grows = matches!(op, Op::Add)
                || (matches!(op, Op::Replace) && !host.response.headers.contains_key(&name));
            if grows && host.response.headers.len() >= MAX_HEADERS {
                return false;
            }
            let response = &mut host.response;
            match (op, value) {
                (Op::Add, Some(value)) => {
                    let _ = response.append_header(name, value);
                }
                (Op::Replace, Some(value)) => {
                    let _ = response.insert_header(name, value);
                }
                _ => {
                    response.remove_header(&name);
                }
            }
            true
        }
        _ => {
            host.plugin.unsupported("changing this header map");
            true
        }
    }
}

/// The name and value as header types; `None` (logged once) when the module's bytes are not
/// a valid header.
fn header(
    host: &Host,
    name: &[u8],
    value: Option<&[u8]>,
) -> Option<(HeaderName, Option<HeaderValue>)> {
    let Ok(name) = HeaderName::from_bytes(name) else {
        host.plugin.unsupported("an invalid header name");
        return None;
    };
    let value = match value {
        Some(value) => match HeaderValue::from_bytes(value) {
            Ok(value) => Some(value),
            Err(_) => {
                host.plugin.unsupported("an invalid header value");
                return None;
            }
        },
        None => None,
    };
    Some((name, value))
}

fn set_request_pseudo(host: &mut Host, name: &[u8], value: &[u8]) {
    let request = &mut host.request;
    match name {
        b":method" => match http::Method::from_bytes(value) {
            Ok(method) => request.set_method(method),
            Err(_) => host.plugin.unsupported("an invalid :method"),
        },
        b":path" => match http::Uri::try_from(value) {
            Ok(uri) if value.starts_with(b"/") => request.set_uri(uri),
            _ => host.plugin.unsupported("an invalid :path"),
        },
        b":authority" => match HeaderValue::from_bytes(value) {
            Ok(authority) => {
                let _ = request.insert_header(http::header::HOST, authority);
            }
            Err(_) => host.plugin.unsupported("an invalid :authority"),
        },
        _ => host.plugin.unsupported("changing :scheme"),
    }
}

/// Replaces every header of the map with `pairs` (pseudo-headers are applied as changes).
pub fn set_pairs(host: &mut Host, map: MapType, pairs: &[(&[u8], &[u8])]) {
    let names: Vec<HeaderName> = match map {
        // `Host` goes only if the new map has no `:authority` for it.
        MapType::RequestHeaders if host.request_live => host
            .request
            .headers
            .keys()
            .filter(|name| {
                **name != http::header::HOST || !pairs.iter().any(|(key, _)| *key == b":authority")
            })
            .cloned()
            .collect(),
        MapType::ResponseHeaders if host.response_live => {
            host.response.headers.keys().cloned().collect()
        }
        _ => {
            host.plugin.unsupported("changing this header map");
            return;
        }
    };
    // Headers the gateway keeps to itself stay (their removal is refused in `change`).
    for name in names {
        change(host, map, Op::Remove, name.as_str().as_bytes(), None);
    }
    for (name, value) in pairs {
        change(host, map, Op::Add, name, Some(value));
    }
}
