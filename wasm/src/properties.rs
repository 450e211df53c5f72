//! `proxy_get_property`: the request, its source, the response code, the plugin, and
//! Gatehouse's route, upstream and consumer. A path is its segments joined by NUL. Numbers are
//! 8-byte little-endian integers, as in Envoy.

use crate::host::Host;

/// The value at `path`; `None` when there is none.
pub fn get(host: &Host, path: &[u8]) -> Option<Vec<u8>> {
    if let Some((_, value)) = host.props.custom.iter().find(|(known, _)| known == path) {
        return Some(value.clone());
    }
    let segments: Vec<&[u8]> = path.split(|byte| *byte == 0).collect();
    let props = &host.props;
    let text = |value: &str| Some(value.as_bytes().to_vec());
    match segments.as_slice() {
        [b"request", b"path"] => text(props.uri.as_ref()?.path_and_query()?.as_str()),
        [b"request", b"url_path"] => text(props.uri.as_ref()?.path()),
        [b"request", b"query"] => text(props.uri.as_ref()?.query().unwrap_or("")),
        [b"request", b"method"] => text(props.method.as_ref()?.as_str()),
        [b"request", b"host"] => Some(props.host.as_ref()?.as_bytes().to_vec()),
        [b"request", b"scheme"] => text(if props.https { "https" } else { "http" }),
        [b"request", b"id"] => Some(props.request_id.as_ref()?.as_bytes().to_vec()),
        [b"request", b"headers"] if host.request_live => Some(crate::headers::pairs(
            host,
            crate::abi::MapType::RequestHeaders,
        )),
        [b"request", b"headers", name] => {
            crate::headers::value(host, crate::abi::MapType::RequestHeaders, name)
        }
        [b"source", b"address"] => text(&props.source?.to_string()),
        [b"response", b"code"] => {
            let code = if host.response_live {
                host.response.status.as_u16()
            } else {
                props.status?
            };
            Some(i64::from(code).to_le_bytes().to_vec())
        }
        [b"response", b"headers", name] => {
            crate::headers::value(host, crate::abi::MapType::ResponseHeaders, name)
        }
        [b"plugin_name"] => text(&host.plugin.name),
        [b"plugin_root_id"] => text(""),
        [b"plugin_vm_id"] => text(&host.plugin.name),
        [b"route_name"] | [b"gatehouse", b"route"] => text(props.route.as_deref()?),
        [b"cluster_name"] | [b"gatehouse", b"upstream"] => text(props.upstream.as_deref()?),
        [b"gatehouse", b"consumer"] => text(props.consumer.as_deref()?),
        _ => None,
    }
}
