//! The rate-limit response headers: the IETF `RateLimit-Policy` and `RateLimit`, and optionally
//! the legacy `X-RateLimit-Limit/-Remaining/-Reset`. What never changes is built once per
//! config.

use std::time::Duration;

use http::HeaderValue;

pub(super) struct PolicyHeaders {
    name: String,
    /// `RateLimit-Policy` and `X-RateLimit-Limit`, the same on every response.
    policy: HeaderValue,
    limit: HeaderValue,
    legacy: bool,
}

/// Whether `name` can be the quoted name of the `RateLimit` headers.
pub(super) fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_graphic() && byte != b'"' && byte != b'\\')
}

/// Header values built from checked parts (a valid policy name and numbers).
fn header_value(text: String) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
        .expect("rate-limit header values are ASCII")
}

impl PolicyHeaders {
    /// `window` is the time an empty bucket takes to fill.
    pub(super) fn new(name: &str, capacity: u64, window: Duration, legacy: bool) -> PolicyHeaders {
        PolicyHeaders {
            name: name.to_string(),
            policy: header_value(format!(
                "\"{name}\";q={capacity};w={}",
                window.as_secs().max(1)
            )),
            limit: HeaderValue::from(capacity),
            legacy,
        }
    }

    /// The headers for `remaining` tokens and `reset_seconds` until the bucket is full (or, for
    /// a refusal, until the cost is there), given to `emit` one by one, by their lowercase
    /// names. On every limited answer: the value is written without the formatting machinery,
    /// and a static name costs Pingora no copy.
    pub(super) fn emit(
        &self,
        remaining: u64,
        reset_seconds: u64,
        mut emit: impl FnMut(&'static str, HeaderValue),
    ) {
        emit("ratelimit-policy", self.policy.clone());
        let mut numbers = itoa::Buffer::new();
        let mut value = String::with_capacity(self.name.len() + 32);
        value.push('"');
        value.push_str(&self.name);
        value.push_str("\";r=");
        value.push_str(numbers.format(remaining));
        value.push_str(";t=");
        value.push_str(numbers.format(reset_seconds));
        emit("ratelimit", header_value(value));
        if self.legacy {
            emit("x-ratelimit-limit", self.limit.clone());
            emit("x-ratelimit-remaining", HeaderValue::from(remaining));
            emit("x-ratelimit-reset", HeaderValue::from(reset_seconds));
        }
    }
}
