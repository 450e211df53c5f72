//! Who the client is, and the forwarding headers the upstream gets. A forwarded address is
//! believed only from a peer inside `server.trusted_proxies`; otherwise the TCP peer is the
//! client and any forwarding headers it sent are replaced.

use std::net::IpAddr;

use http::HeaderValue;
use pingora_http::RequestHeader;

use crate::config::Snapshot;

fn header_text<'a>(request: &'a RequestHeader, name: &str) -> impl Iterator<Item = &'a str> {
    request
        .headers
        .get_all(name)
        .into_iter()
        .filter_map(|value| value.to_str().ok())
}

/// The `for=` addresses of `Forwarded` headers, in order.
fn forwarded_for(request: &RequestHeader) -> Vec<IpAddr> {
    let mut addresses = Vec::new();
    for value in header_text(request, "forwarded") {
        for element in value.split(',') {
            for pair in element.split(';') {
                if let Some((name, value)) = pair.trim().split_once('=') {
                    if name.trim().eq_ignore_ascii_case("for") {
                        let value = value.trim().trim_matches('"');
                        let value = value
                            .strip_prefix('[')
                            .and_then(|rest| rest.split(']').next())
                            .unwrap_or(value);
                        let value = if value.matches(':').count() == 1 {
                            value.split(':').next().unwrap_or(value)
                        } else {
                            value
                        };
                        if let Ok(address) = value.parse() {
                            addresses.push(address);
                        }
                    }
                }
            }
        }
    }
    addresses
}

/// The client address: the peer, or when the peer is a trusted proxy, the nearest untrusted
/// address in `X-Forwarded-For` (or `Forwarded`), read from the right.
pub fn client_address(snapshot: &Snapshot, peer: IpAddr, request: &RequestHeader) -> IpAddr {
    if !snapshot.is_trusted_proxy(peer) {
        return peer;
    }
    let mut chain: Vec<IpAddr> = header_text(request, "x-forwarded-for")
        .flat_map(|value| value.split(','))
        .filter_map(|item| item.trim().parse().ok())
        .collect();
    if chain.is_empty() {
        chain = forwarded_for(request);
    }
    let mut client = peer;
    for address in chain.into_iter().rev() {
        client = address;
        if !snapshot.is_trusted_proxy(address) {
            break;
        }
    }
    client
}

fn forwarded_node(address: IpAddr) -> String {
    match address {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    }
}

/// Set `X-Forwarded-For/-Proto/-Host`, `Forwarded` and `X-Real-IP` on the upstream request.
pub fn apply(
    request: &mut RequestHeader,
    peer: IpAddr,
    trusted_peer: bool,
    client: IpAddr,
    tls: bool,
    host: Option<&str>,
) {
    let proto = if tls { "https" } else { "http" };
    let peer_text = peer.to_string();

    let forwarded_for = if trusted_peer {
        let existing: Vec<&str> = header_text(request, "x-forwarded-for").collect();
        if existing.is_empty() {
            peer_text.clone()
        } else {
            format!("{}, {peer_text}", existing.join(", "))
        }
    } else {
        peer_text.clone()
    };
    let incoming_proto = trusted_peer
        .then(|| {
            header_text(request, "x-forwarded-proto")
                .next()
                .map(str::to_owned)
        })
        .flatten();
    let incoming_host = trusted_peer
        .then(|| {
            header_text(request, "x-forwarded-host")
                .next()
                .map(str::to_owned)
        })
        .flatten();
    let host_text = host.unwrap_or("").to_string();
    let mut element = format!("for={};proto={proto}", forwarded_node(peer));
    if !host_text.is_empty()
        && host_text
            .bytes()
            .all(|byte| byte.is_ascii_graphic() && byte != b'"')
    {
        element.push_str(&format!(";host=\"{host_text}\""));
    }
    let forwarded = if trusted_peer {
        let existing: Vec<&str> = header_text(request, "forwarded").collect();
        if existing.is_empty() {
            element
        } else {
            format!("{}, {element}", existing.join(", "))
        }
    } else {
        element
    };

    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            request.insert_header(name, value).ok();
        }
    };
    set("x-forwarded-for", forwarded_for);
    set(
        "x-forwarded-proto",
        incoming_proto.unwrap_or_else(|| proto.to_string()),
    );
    let forwarded_host = incoming_host.or_else(|| host.map(str::to_owned));
    set("forwarded", forwarded);
    set("x-real-ip", client.to_string());
    match forwarded_host {
        Some(host) => set("x-forwarded-host", host),
        None => {
            request.remove_header("x-forwarded-host");
        }
    }
}
