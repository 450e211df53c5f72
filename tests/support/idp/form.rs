//! The encodings OAuth speaks: `application/x-www-form-urlencoded` bodies and queries, and
//! percent-encoded URL components.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Everything but the RFC 3986 unreserved characters, so an encoded value is safe in any part
/// of a URL.
const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Name and value pairs of a form body or a query, decoded, in order.
pub(super) struct Form(Vec<(String, String)>);

impl Form {
    pub(super) fn parse(input: &[u8]) -> Form {
        Form(form_urlencoded::parse(input).into_owned().collect())
    }

    /// The first value of `name`.
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Decodes one form-encoded value on its own, where `&` and `=` are not separators.
pub(super) fn decode(value: &str) -> String {
    // `+` first: a `%2B` must come out as a plus, not a space.
    percent_decode_str(&value.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

pub(super) fn percent_encode(input: &str) -> String {
    utf8_percent_encode(input, NOT_UNRESERVED).to_string()
}

#[cfg(test)]
mod tests {
    use super::{decode, percent_encode, Form};

    #[test]
    fn form_values_decode_once_and_encode_all_but_unreserved() {
        assert_eq!(decode("a+b%2Bc%3Ad%zz"), "a b+c:d%zz");
        let form = Form::parse(b"state=s%201&code=a+b&state=second&flag");
        assert_eq!(form.get("state"), Some("s 1"));
        assert_eq!(form.get("code"), Some("a b"));
        assert_eq!(form.get("flag"), Some(""));
        assert_eq!(form.get("missing"), None);
        assert_eq!(
            percent_encode("http://h/p?q=a b&c~-._"),
            "http%3A%2F%2Fh%2Fp%3Fq%3Da%20b%26c~-._"
        );
    }
}
