//! Who the client is, and what the upstream is told about the caller: the forwarding headers
//! and the identity headers. A forwarded address is believed only from a peer inside
//! `server.trusted_proxies`; otherwise the TCP peer is the client and any forwarding headers it
//! sent are replaced. Identity headers are ours alone: a client-sent copy never reaches a filter
//! or the upstream.

use std::net::IpAddr;

use http::HeaderValue;
use pingora_http::RequestHeader;

use super::ctx::RequestCtx;
use crate::config::model::ForwardedHeader as Header;
use crate::config::snapshot::ForwardedSet;
use crate::config::Snapshot;

/// Works out the client: its address (the TCP peer, or what a trusted proxy says) and whether
/// it came over TLS.
pub fn identify(session: &pingora_proxy::Session, ctx: &mut RequestCtx) {
    if let Some(peer) = session
        .client_addr()
        .and_then(|address| address.as_inet())
        .map(|address| address.ip())
    {
        ctx.peer = Some(peer);
        ctx.trusted_peer = ctx.snapshot.is_trusted_proxy(peer);
        ctx.shared.client_addr = Some(if ctx.trusted_peer {
            client_address(&ctx.snapshot, peer, session.req_header())
        } else {
            peer
        });
    }
    let digest = session.digest();
    ctx.shared.client_tls = digest.is_some_and(|digest| digest.ssl_digest.is_some());
    // What the L4 balancer's PROXY header said: whether the client spoke TLS to it, and the
    // balancer's id for the connection, from which the request's id is made.
    if let Some(info) = crate::edge::connection_info(digest) {
        ctx.shared.client_tls |= info.balancer_tls;
        if let Some(id) = crate::edge::request_id(digest) {
            ctx.shared.set_request_id(id);
        }
        ctx.shared.connection = Some(info);
    }
}

/// Removes client-sent identity headers before any filter sees the request. A client rarely
/// sends one, so the request's few header names are scanned once (cheaper than a hash lookup
/// per identity header) and only a request that has one is changed.
pub fn strip_identity(request: &mut RequestHeader, snapshot: &Snapshot) {
    let identity = &snapshot.identity_headers;
    let sent = request
        .headers
        .keys()
        .any(|name| identity.names().any(|identity| identity == name));
    if sent {
        for name in identity.names() {
            request.remove_header(name);
        }
    }
}

/// Tells the upstream who called: the forwarding headers, and the identity headers of the
/// consumer an auth filter identified.
pub fn tell_upstream(upstream_request: &mut RequestHeader, ctx: &RequestCtx) {
    if let (Some(peer), Some(client)) = (ctx.peer, ctx.shared.client_addr) {
        apply(
            upstream_request,
            peer,
            ctx.trusted_peer,
            client,
            ctx.shared.client_tls,
            ctx.snapshot.forwarded_headers,
        );
    }
    let Some(consumer) = &ctx.shared.consumer else {
        return;
    };
    let headers = &ctx.snapshot.identity_headers;
    let values = [
        (&headers.consumer_id, Some(&*consumer.id)),
        (&headers.consumer_username, consumer.username.as_deref()),
        (&headers.subject, ctx.shared.subject.as_deref()),
    ];
    for (name, value) in values {
        if let (Some(name), Some(value)) = (name, value) {
            if let Ok(value) = HeaderValue::from_str(value) {
                upstream_request.insert_header(name.clone(), value).ok();
            }
        }
    }
}

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

/// An address as text. IPv4, by far the common case, is written digit by digit: the formatting
/// machinery costs several times as much, on every request.
fn address_text(address: IpAddr) -> String {
    match address {
        IpAddr::V4(v4) => {
            let mut text = String::with_capacity(15);
            for (index, octet) in v4.octets().into_iter().enumerate() {
                if index > 0 {
                    text.push('.');
                }
                if octet >= 100 {
                    text.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    text.push(char::from(b'0' + octet / 10 % 10));
                }
                text.push(char::from(b'0' + octet % 10));
            }
            text
        }
        IpAddr::V6(v6) => v6.to_string(),
    }
}

/// A `Forwarded` node: an IPv4 address as it is, an IPv6 one quoted in brackets (RFC 7239).
fn push_forwarded_node(out: &mut String, address: IpAddr, text: &str) {
    if address.is_ipv6() {
        out.push_str("\"[");
        out.push_str(text);
        out.push_str("]\"");
    } else {
        out.push_str(text);
    }
}

fn joined(values: http::header::GetAll<'_, HeaderValue>, last: &str) -> String {
    let mut out = String::new();
    for value in values {
        if let Ok(text) = value.to_str() {
            out.push_str(text);
            out.push_str(", ");
        }
    }
    out.push_str(last);
    out
}

fn value(text: String) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(text)).ok()
}

/// Set `X-Forwarded-For/-Proto/-Host`, `Forwarded` and `X-Real-IP` on the upstream request,
/// those of them in `set`. From an untrusted peer, client-sent copies are replaced (or removed,
/// for a header not in `set`); from a trusted proxy, the `X-Forwarded-For` and `Forwarded`
/// chains are extended, its proto and host are kept, and a header not in `set` passes as it
/// came.
pub fn apply(
    request: &mut RequestHeader,
    peer: IpAddr,
    trusted_peer: bool,
    client: IpAddr,
    tls: bool,
    set: ForwardedSet,
) {
    if !trusted_peer && !set.is_all() {
        remove_unselected(request, set);
    }
    let proto = if tls { "https" } else { "http" };
    let peer_text = address_text(peer);
    let host = if set.has(Header::XForwardedHost) || set.has(Header::Forwarded) {
        request
            .headers
            .get(http::header::HOST)
            .cloned()
            .or_else(|| {
                request
                    .uri
                    .authority()
                    .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok())
            })
    } else {
        None
    };

    // The peer's address as a header value, made once and shared (a clone is a reference count).
    let peer_value = value(peer_text.clone());
    if set.has(Header::XForwardedFor) {
        let forwarded_for = if trusted_peer && request.headers.contains_key("x-forwarded-for") {
            value(joined(
                request.headers.get_all("x-forwarded-for"),
                &peer_text,
            ))
        } else {
            peer_value.clone()
        };
        if let Some(forwarded_for) = forwarded_for {
            request.insert_header("x-forwarded-for", forwarded_for).ok();
        }
    }
    if set.has(Header::XForwardedProto) {
        let incoming = from_trusted(request, trusted_peer, "x-forwarded-proto");
        let forwarded_proto = incoming.unwrap_or(HeaderValue::from_static(proto));
        request
            .insert_header("x-forwarded-proto", forwarded_proto)
            .ok();
    }
    if set.has(Header::Forwarded) {
        let mut element = String::with_capacity(48);
        element.push_str("for=");
        push_forwarded_node(&mut element, peer, &peer_text);
        element.push_str(";proto=");
        element.push_str(proto);
        if let Some(host_text) = host.as_ref().and_then(|host| host.to_str().ok()) {
            if !host_text.is_empty()
                && host_text
                    .bytes()
                    .all(|byte| byte.is_ascii_graphic() && byte != b'"')
            {
                element.push_str(";host=\"");
                element.push_str(host_text);
                element.push('"');
            }
        }
        let forwarded = if trusted_peer && request.headers.contains_key(http::header::FORWARDED) {
            joined(request.headers.get_all(http::header::FORWARDED), &element)
        } else {
            element
        };
        if let Some(forwarded) = value(forwarded) {
            request.insert_header("forwarded", forwarded).ok();
        }
    }
    if set.has(Header::XRealIp) {
        let client_value = if client == peer {
            peer_value
        } else {
            value(address_text(client))
        };
        if let Some(client) = client_value {
            request.insert_header("x-real-ip", client).ok();
        }
    }
    if set.has(Header::XForwardedHost) {
        let incoming = from_trusted(request, trusted_peer, "x-forwarded-host");
        match incoming.or(host) {
            Some(host) => {
                request.insert_header("x-forwarded-host", host).ok();
            }
            None => {
                request.remove_header("x-forwarded-host");
            }
        }
    }
}

/// A header a trusted proxy sent, kept as it is; nothing from an untrusted peer.
fn from_trusted(request: &RequestHeader, trusted_peer: bool, name: &str) -> Option<HeaderValue> {
    if trusted_peer {
        request.headers.get(name).cloned()
    } else {
        None
    }
}

/// Removes client-sent copies of the forwarding headers Gatehouse does not write, so an
/// untrusted client cannot make the upstream believe them. The request's header names are
/// scanned once; only a request that has one is changed.
fn remove_unselected(request: &mut RequestHeader, set: ForwardedSet) {
    let unselected = || {
        Header::ALL
            .into_iter()
            .filter(move |header| !set.has(*header))
            .map(Header::name)
    };
    let sent = request
        .headers
        .keys()
        .any(|name| unselected().any(|unselected| unselected == name.as_str()));
    if sent {
        for name in unselected() {
            request.remove_header(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_yaml;

    fn snapshot(trusted: &str) -> Snapshot {
        let yaml = format!(
            "version: 1\nserver: {{ listeners: [{{ name: p, address: \"127.0.0.1:0\" }}], trusted_proxies: {trusted} }}\n"
        );
        crate::config::compile(
            parse_yaml(&yaml).unwrap(),
            "test",
            1,
            &crate::config::CompileEnv::default(),
        )
        .unwrap()
    }

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut request = RequestHeader::build("GET", b"/", None).unwrap();
        for (name, value) in headers {
            request.append_header(name.to_string(), *value).unwrap();
        }
        request
    }

    #[test]
    fn untrusted_peers_cannot_choose_the_client_address() {
        let snapshot = snapshot("[10.0.0.0/8]");
        let peer: IpAddr = "203.0.113.7".parse().unwrap();
        let spoofed = request(&[("x-forwarded-for", "1.2.3.4"), ("forwarded", "for=1.2.3.4")]);
        assert_eq!(client_address(&snapshot, peer, &spoofed), peer);
    }

    #[test]
    fn trusted_chain_is_read_from_the_right() {
        let snapshot = snapshot("[10.0.0.0/8]");
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let chain = request(&[("x-forwarded-for", "6.6.6.6, 198.51.100.2, 10.0.0.9")]);
        assert_eq!(
            client_address(&snapshot, peer, &chain),
            "198.51.100.2".parse::<IpAddr>().unwrap()
        );
        let forwarded = request(&[("forwarded", "for=\"[2001:db8::1]:4711\";proto=https")]);
        assert_eq!(
            client_address(&snapshot, peer, &forwarded),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn apply_replaces_spoofed_headers_from_untrusted_peers() {
        let peer: IpAddr = "203.0.113.7".parse().unwrap();
        let mut upstream = request(&[
            ("host", "api.example.com"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-host", "evil"),
            ("x-forwarded-proto", "https"),
        ]);
        apply(&mut upstream, peer, false, peer, false, ForwardedSet::all());
        assert_eq!(upstream.headers["x-forwarded-for"], "203.0.113.7");
        assert_eq!(upstream.headers["x-forwarded-host"], "api.example.com");
        assert_eq!(upstream.headers["x-forwarded-proto"], "http");
        assert_eq!(
            upstream.headers["forwarded"],
            "for=203.0.113.7;proto=http;host=\"api.example.com\""
        );
        assert_eq!(upstream.headers["x-real-ip"], "203.0.113.7");
    }

    #[test]
    fn only_the_chosen_headers_are_written_and_spoofed_others_are_removed() {
        let peer: IpAddr = "203.0.113.7".parse().unwrap();
        let only_for = ForwardedSet::new(&[Header::XForwardedFor]);
        let mut upstream = request(&[
            ("host", "api.example.com"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4"),
        ]);
        apply(&mut upstream, peer, false, peer, false, only_for);
        assert_eq!(upstream.headers["x-forwarded-for"], "203.0.113.7");
        for gone in [
            "x-real-ip",
            "forwarded",
            "x-forwarded-proto",
            "x-forwarded-host",
        ] {
            assert!(upstream.headers.get(gone).is_none(), "{gone}");
        }

        // A trusted proxy's own copies of the headers left out pass as they came.
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let mut upstream = request(&[
            ("x-forwarded-for", "198.51.100.2"),
            ("x-forwarded-proto", "https"),
        ]);
        apply(
            &mut upstream,
            proxy,
            true,
            "198.51.100.2".parse().unwrap(),
            false,
            only_for,
        );
        assert_eq!(
            upstream.headers["x-forwarded-for"],
            "198.51.100.2, 10.0.0.1"
        );
        assert_eq!(upstream.headers["x-forwarded-proto"], "https");
        assert!(upstream.headers.get("x-real-ip").is_none());

        let none = ForwardedSet::new(&[]);
        let mut upstream = request(&[("x-forwarded-for", "1.2.3.4")]);
        apply(&mut upstream, peer, false, peer, false, none);
        assert!(upstream.headers.get("x-forwarded-for").is_none());
    }

    #[test]
    fn addresses_are_written_as_std_writes_them() {
        for text in [
            "0.0.0.0",
            "9.10.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "203.0.113.7",
            "2001:db8::1",
            "::ffff:1.2.3.4",
        ] {
            let address: IpAddr = text.parse().unwrap();
            assert_eq!(address_text(address), address.to_string());
        }
        let mut node = String::new();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        push_forwarded_node(&mut node, v6, &address_text(v6));
        assert_eq!(node, "\"[2001:db8::1]\"");
    }
}
