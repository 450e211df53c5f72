//! A JSON document parsed only as deep as operations reach. The whole text is validated once;
//! then only the objects and arrays on an operation's path are opened, one level at a time.
//! Everything else stays a slice of the original text and is written back byte for byte, so a
//! rewrite costs little more than a scan, and untouched members keep their exact form (numbers
//! beyond 64 bits, escapes, spacing inside them).
//!
//! Object members keep their order. Where an object repeats a name, the last occurrence is the
//! one read and replaced (as most parsers keep the last), and a removal removes every one, so a
//! removed member cannot survive as a duplicate.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// A node of the document.
pub enum Node<'a> {
    /// Not opened: written back as it came.
    Raw(&'a RawValue),
    Object(Vec<(Cow<'a, str>, Node<'a>)>),
    Array(Vec<Node<'a>>),
    /// Written by an operation.
    Value(Value),
}

impl<'a> Node<'a> {
    /// Validates `text` as one JSON value, in one pass that also opens its top level (which
    /// every operation goes through).
    pub fn parse(text: &'a [u8]) -> Result<Node<'a>, serde_json::Error> {
        match text.iter().find(|byte| !byte.is_ascii_whitespace()) {
            Some(b'{') => {
                let Members(members) = serde_json::from_slice(text)?;
                Ok(Node::Object(
                    members
                        .into_iter()
                        .map(|(name, member)| (name, Node::Raw(member)))
                        .collect(),
                ))
            }
            Some(b'[') => {
                let items: Vec<&'a RawValue> = serde_json::from_slice(text)?;
                Ok(Node::Array(items.into_iter().map(Node::Raw).collect()))
            }
            _ => Ok(Node::Raw(serde_json::from_slice(text)?)),
        }
    }

    /// Opens a raw object or array one level; other nodes stay as they are.
    fn open(&mut self) {
        let Node::Raw(raw) = self else {
            if let Node::Value(value) = self {
                let value = std::mem::take(value);
                *self = match value {
                    Value::Object(members) => Node::Object(
                        members
                            .into_iter()
                            .map(|(name, member)| (Cow::Owned(name), Node::Value(member)))
                            .collect(),
                    ),
                    Value::Array(items) => {
                        Node::Array(items.into_iter().map(Node::Value).collect())
                    }
                    other => Node::Value(other),
                };
            }
            return;
        };
        let text: &'a str = raw.get();
        // The text was validated when the document was parsed, so these cannot fail.
        match text.as_bytes().first() {
            Some(b'{') => {
                if let Ok(Members(members)) = serde_json::from_str::<Members<'a>>(text) {
                    *self = Node::Object(
                        members
                            .into_iter()
                            .map(|(name, member)| (name, Node::Raw(member)))
                            .collect(),
                    );
                }
            }
            Some(b'[') => {
                if let Ok(items) = serde_json::from_str::<Vec<&'a RawValue>>(text) {
                    *self = Node::Array(items.into_iter().map(Node::Raw).collect());
                }
            }
            _ => {}
        }
    }

    fn is_null(&self) -> bool {
        match self {
            Node::Raw(raw) => raw.get() == "null",
            Node::Value(value) => value.is_null(),
            _ => false,
        }
    }

    /// The child named by `token`, opening this node.
    pub fn child(&mut self, token: &str) -> Option<&mut Node<'a>> {
        self.open();
        match self {
            Node::Object(members) => members
                .iter_mut()
                .rev()
                .find(|(name, _)| name == token)
                .map(|(_, member)| member),
            Node::Array(items) => {
                let at = index(token, items.len())?;
                items.get_mut(at)
            }
            _ => None,
        }
    }

    /// The child named by `token`, created (as an empty array when `next_is_end`, else an
    /// empty object) when this is an object without it, or when it is `null`.
    fn child_or_create(&mut self, token: &str, next_is_end: bool) -> Option<&mut Node<'a>> {
        let empty = || {
            if next_is_end {
                Node::Value(Value::Array(Vec::new()))
            } else {
                Node::Value(Value::Object(Map::new()))
            }
        };
        self.open();
        let child = match self {
            Node::Object(members) => match members.iter().rposition(|(name, _)| name == token) {
                Some(at) => &mut members[at].1,
                None => {
                    members.push((Cow::Owned(token.to_string()), empty()));
                    &mut members.last_mut().expect("just pushed").1
                }
            },
            Node::Array(items) => {
                let at = index(token, items.len())?;
                &mut items[at]
            }
            _ => return None,
        };
        if child.is_null() {
            *child = empty();
        }
        Some(child)
    }

    /// The node at the end of `tokens`, if there is one.
    pub fn find(&mut self, tokens: &[String]) -> Option<&mut Node<'a>> {
        let mut at = self;
        for token in tokens {
            at = at.child(token)?;
        }
        Some(at)
    }

    /// Writes `node` at `tokens` (not empty); with `replace` false, only where nothing is (an
    /// array index inserts). Missing parents are created; a parent that cannot hold it (a
    /// string, an index past an array's end) leaves the document as it is.
    pub fn write(&mut self, tokens: &[String], node: Node<'a>, replace: bool) {
        let (last, parents) = tokens.split_last().expect("a pointer has a token");
        let mut at = &mut *self;
        for (position, token) in parents.iter().enumerate() {
            let next_is_end = tokens[position + 1] == "-";
            match at.child_or_create(token, next_is_end) {
                Some(child) => at = child,
                None => return,
            }
        }
        at.open();
        match at {
            Node::Object(members) => match members.iter().rposition(|(name, _)| name == last) {
                Some(found) if replace => {
                    members[found].1 = node;
                    let mut position = 0;
                    members.retain(|(name, _)| {
                        position += 1;
                        position - 1 == found || name != last
                    });
                }
                Some(_) => {}
                None => members.push((Cow::Owned(last.clone()), node)),
            },
            Node::Array(items) => {
                if last == "-" {
                    items.push(node);
                } else if let Some(position) = index(last, items.len() + 1) {
                    if position == items.len() {
                        items.push(node);
                    } else if replace {
                        items[position] = node;
                    } else {
                        items.insert(position, node);
                    }
                }
            }
            _ => {}
        }
    }

    /// Removes and returns what `tokens` (not empty) names; every member of that name.
    pub fn take(&mut self, tokens: &[String]) -> Option<Node<'a>> {
        let (last, parents) = tokens.split_last().expect("a pointer has a token");
        let parent = self.find(parents)?;
        parent.open();
        match parent {
            Node::Object(members) => {
                let mut taken = None;
                let mut kept = Vec::with_capacity(members.len());
                for (name, member) in members.drain(..) {
                    if name == last.as_str() {
                        taken = Some(member);
                    } else {
                        kept.push((name, member));
                    }
                }
                *members = kept;
                taken
            }
            Node::Array(items) => {
                let at = index(last, items.len())?;
                Some(items.remove(at))
            }
            _ => None,
        }
    }

    /// A copy of this node.
    pub fn copy(&self) -> Node<'a> {
        match self {
            Node::Raw(raw) => Node::Raw(raw),
            Node::Object(members) => Node::Object(
                members
                    .iter()
                    .map(|(name, member)| (name.clone(), member.copy()))
                    .collect(),
            ),
            Node::Array(items) => Node::Array(items.iter().map(Node::copy).collect()),
            Node::Value(value) => Node::Value(value.clone()),
        }
    }

    /// The document as JSON text.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            Node::Raw(raw) => out.extend_from_slice(raw.get().as_bytes()),
            Node::Value(value) => {
                serde_json::to_writer(&mut *out, value).expect("a value writes to memory")
            }
            Node::Object(members) => {
                out.push(b'{');
                for (position, (name, member)) in members.iter().enumerate() {
                    if position > 0 {
                        out.push(b',');
                    }
                    match name {
                        // Borrowed from the text, so it had no escapes and needs none.
                        Cow::Borrowed(name) => {
                            out.push(b'"');
                            out.extend_from_slice(name.as_bytes());
                            out.push(b'"');
                        }
                        Cow::Owned(name) => serde_json::to_writer(&mut *out, name.as_str())
                            .expect("writing to memory"),
                    }
                    out.push(b':');
                    member.write_to(out);
                }
                out.push(b'}');
            }
            Node::Array(items) => {
                out.push(b'[');
                for (position, item) in items.iter().enumerate() {
                    if position > 0 {
                        out.push(b',');
                    }
                    item.write_to(out);
                }
                out.push(b']');
            }
        }
    }
}

/// An array index token: digits without a leading zero, below `len`.
pub fn index(token: &str, len: usize) -> Option<usize> {
    if token.is_empty() || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    if !token.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    token.parse::<usize>().ok().filter(|at| *at < len)
}

/// The members of one object, in order, their values unopened.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

/// A member name, borrowed from the text when it has no escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = Name<'de>;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(text)))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(text.to_string())))
            }
            fn visit_string<E: de::Error>(self, text: String) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(text)))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Members<'de>, M::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(Name(name)) = map.next_key::<Name<'de>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    members.push((name, value));
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(pointer: &str) -> Vec<String> {
        pointer[1..].split('/').map(str::to_string).collect()
    }

    fn text(node: &Node<'_>) -> String {
        let mut out = Vec::new();
        node.write_to(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn untouched_members_are_written_back_as_they_came() {
        let body = br#"{ "big": 123456789012345678901234567890, "esc": "a\u00e9\n", "deep": {"x" : [1, 2.50]}, "n": 1e3 }"#;
        let mut document = Node::parse(body).unwrap();
        document.write(&tokens("/added"), Node::Value(Value::Bool(true)), true);
        assert_eq!(
            text(&document),
            r#"{"big":123456789012345678901234567890,"esc":"a\u00e9\n","deep":{"x" : [1, 2.50]},"n":1e3,"added":true}"#
        );
    }

    #[test]
    fn a_repeated_name_is_read_last_and_removed_everywhere() {
        let mut document = Node::parse(br#"{"a":1,"b":2,"a":3}"#).unwrap();
        let found = document.find(&tokens("/a")).map(|node| text(node));
        assert_eq!(found.as_deref(), Some("3"));
        document.write(&tokens("/a"), Node::Value(Value::from(9)), true);
        assert_eq!(text(&document), r#"{"b":2,"a":9}"#);
        let mut document = Node::parse(br#"{"a":1,"b":2,"a":3}"#).unwrap();
        assert_eq!(text(&document.take(&tokens("/a")).unwrap()), "3");
        assert_eq!(text(&document), r#"{"b":2}"#);
    }

    #[test]
    fn names_keep_their_escapes_and_scalars_stay_as_they_are() {
        let body = br#"{"a\"b":1,"tab\t":{"x":1}}"#;
        let mut document = Node::parse(body).unwrap();
        document.write(&tokens("/tab\t/y"), Node::Value(Value::from(2)), true);
        assert_eq!(text(&document), r#"{"a\"b":1,"tab\t":{"x":1,"y":2}}"#);
        assert_eq!(text(&Node::parse(b" 12.50 ").unwrap()), "12.50");
        assert_eq!(
            text(&Node::parse(b"[1, {\"a\" : 2}]").unwrap()),
            r#"[1,{"a" : 2}]"#
        );
    }

    #[test]
    fn invalid_text_is_refused_whole() {
        assert!(Node::parse(br#"{"a":1,"#).is_err());
        assert!(Node::parse(br#"{"a":1} trailing"#).is_err());
        assert!(Node::parse(b"").is_err());
    }
}
