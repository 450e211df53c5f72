//! Path templates of `google.api.http` (`/v1/{name=messages/*}/x:verb`): parsing, and matching
//! a request path with the values of its variables.
//!
//! ```text
//! Template = "/" Segments [ Verb ] ;
//! Segments = Segment { "/" Segment } ;
//! Segment  = "*" | "**" | LITERAL | Variable ;
//! Variable = "{" FieldPath [ "=" Segments ] "}" ;
//! FieldPath = IDENT { "." IDENT } ;
//! Verb     = ":" LITERAL ;
//! ```
//!
//! `*` matches one non-empty segment, `**` zero or more (only as the last segment). A variable
//! without `=` is one segment. A variable's value is its segments joined by `/`,
//! percent-decoded; in a multi-segment value `%2F` stays encoded, as the spec says.

use std::cmp::Ordering;

/// One segment of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// `*`: one segment.
    One,
    /// `**`: the rest of the path, zero or more segments.
    Rest,
}

impl Segment {
    fn rank(&self) -> u8 {
        match self {
            Segment::Literal(_) => 0,
            Segment::One => 1,
            Segment::Rest => 2,
        }
    }
}

/// A variable: the dotted field path it binds, and the segments it covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Variable {
    /// The field path as written (`name`, `book.id`).
    pub field: String,
    /// The first segment it covers.
    pub start: usize,
    /// One past the last segment it covers (a `**` covers the rest of the path).
    pub end: usize,
}

/// A parsed path template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathTemplate {
    pub segments: Vec<Segment>,
    pub variables: Vec<Variable>,
    pub verb: Option<String>,
}

struct Parser<'a> {
    text: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        if self.peek() == Some(byte) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn literal(&mut self) -> Result<String, String> {
        let start = self.at;
        while let Some(byte) = self.peek() {
            if matches!(byte, b'/' | b'{' | b'}' | b'*' | b'=' | b':') {
                break;
            }
            self.at += 1;
        }
        if self.at == start {
            return Err(match self.peek() {
                Some(byte) => format!("unexpected '{}' at offset {}", byte as char, self.at),
                None => "a segment is missing at the end".to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&self.text[start..self.at]).into_owned())
    }

    /// Segments up to the end, a `}` or a `:` (the verb), adding variables where allowed.
    fn segments(
        &mut self,
        segments: &mut Vec<Segment>,
        variables: Option<&mut Vec<Variable>>,
    ) -> Result<(), String> {
        let mut variables = variables;
        loop {
            if self.eat(b'*') {
                if self.eat(b'*') {
                    segments.push(Segment::Rest);
                } else {
                    segments.push(Segment::One);
                }
            } else if self.peek() == Some(b'{') {
                let Some(variables) = variables.as_deref_mut() else {
                    return Err("a variable cannot be nested in another".into());
                };
                self.at += 1;
                let start = self.at;
                while let Some(byte) = self.peek() {
                    if matches!(byte, b'=' | b'}') {
                        break;
                    }
                    self.at += 1;
                }
                let field = String::from_utf8_lossy(&self.text[start..self.at]).into_owned();
                if !is_field_path(&field) {
                    return Err(format!("\"{field}\" is not a field path like \"book.id\""));
                }
                let first = segments.len();
                if self.eat(b'=') {
                    self.segments(segments, None)?;
                } else {
                    segments.push(Segment::One);
                }
                if !self.eat(b'}') {
                    return Err(format!("the variable \"{field}\" is not closed with '}}'"));
                }
                variables.push(Variable {
                    field,
                    start: first,
                    end: segments.len(),
                });
            } else {
                segments.push(Segment::Literal(self.literal()?));
            }
            if !self.eat(b'/') {
                return Ok(());
            }
        }
    }
}

fn is_field_path(text: &str) -> bool {
    !text.is_empty()
        && text.split('.').all(|ident| {
            let mut chars = ident.chars();
            chars
                .next()
                .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

impl PathTemplate {
    pub fn parse(text: &str) -> Result<PathTemplate, String> {
        let fail = |why: String| format!("\"{text}\" is not a path template: {why}");
        let Some(rest) = text.strip_prefix('/') else {
            return Err(fail("it must start with '/'".into()));
        };
        let mut parser = Parser {
            text: rest.as_bytes(),
            at: 0,
        };
        let mut segments = Vec::new();
        let mut variables = Vec::new();
        parser
            .segments(&mut segments, Some(&mut variables))
            .map_err(&fail)?;
        let verb = if parser.eat(b':') {
            Some(parser.literal().map_err(&fail)?)
        } else {
            None
        };
        if parser.at != parser.text.len() {
            return Err(fail(format!(
                "unexpected '{}' at offset {}",
                parser.text[parser.at] as char,
                parser.at + 1
            )));
        }
        if let Some(at) = segments
            .iter()
            .position(|segment| *segment == Segment::Rest)
        {
            if at + 1 != segments.len() {
                return Err(fail("'**' may only be the last segment".into()));
            }
        }
        for (index, variable) in variables.iter().enumerate() {
            if variables[..index]
                .iter()
                .any(|other| other.field == variable.field)
            {
                return Err(fail(format!(
                    "the field \"{}\" is bound twice",
                    variable.field
                )));
            }
        }
        Ok(PathTemplate {
            segments,
            variables,
            verb,
        })
    }

    /// Orders templates from the most specific: literal before `*` before `**`, segment by
    /// segment; a template with a verb before one without.
    pub fn specificity(&self, other: &PathTemplate) -> Ordering {
        other
            .verb
            .is_some()
            .cmp(&self.verb.is_some())
            .then_with(|| {
                let mine = self.segments.iter().map(Segment::rank);
                let theirs = other.segments.iter().map(Segment::rank);
                mine.cmp(theirs)
            })
    }

    /// The values of the variables (in the order of [`PathTemplate::variables`]) if `path`
    /// (without its query) matches.
    pub fn matches(&self, path: &str) -> Option<Vec<String>> {
        let path = path.strip_prefix('/')?;
        let path = match &self.verb {
            Some(verb) => {
                let stripped = path.strip_suffix(verb.as_str())?.strip_suffix(':')?;
                // The verb follows the last segment, not a `/`.
                if stripped.ends_with('/') {
                    return None;
                }
                stripped
            }
            None => path,
        };
        let given: Vec<&str> = path.split('/').collect();
        let rest = self.segments.last() == Some(&Segment::Rest);
        let fixed = self.segments.len() - usize::from(rest);
        if given.len() < fixed || (!rest && given.len() != fixed) {
            return None;
        }
        for (segment, text) in self.segments.iter().zip(&given) {
            match segment {
                Segment::Literal(literal) => {
                    if *text != literal && percent_decode(text, false) != *literal {
                        return None;
                    }
                }
                Segment::One => {
                    if text.is_empty() {
                        return None;
                    }
                }
                Segment::Rest => {}
            }
        }
        Some(
            self.variables
                .iter()
                .map(|variable| {
                    let end = if variable.end == self.segments.len() && rest {
                        given.len()
                    } else {
                        variable.end
                    };
                    let start = variable.start.min(end);
                    let multi = end - start != 1 || self.segments[variable.start] == Segment::Rest;
                    percent_decode(&given[start..end].join("/"), multi)
                })
                .collect(),
        )
    }
}

/// `%XX` escapes decoded (malformed ones kept as they are); with `keep_slash`, `%2F` stays.
pub fn percent_decode(text: &str, keep_slash: bool) -> String {
    if !text.contains('%') {
        return text.to_string();
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' && index + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).ok();
            if let Some(byte) = hex.and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
                if !(keep_slash && byte == b'/') {
                    out.push(byte);
                    index += 3;
                    continue;
                }
            }
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(template: &str, path: &str) -> Option<Vec<String>> {
        PathTemplate::parse(template).unwrap().matches(path)
    }

    #[test]
    fn templates_parse() {
        let template = PathTemplate::parse("/v1/{name=messages/*}/x:get").unwrap();
        assert_eq!(
            template.segments,
            [
                Segment::Literal("v1".into()),
                Segment::Literal("messages".into()),
                Segment::One,
                Segment::Literal("x".into())
            ]
        );
        assert_eq!(
            template.variables,
            [Variable {
                field: "name".into(),
                start: 1,
                end: 3
            }]
        );
        assert_eq!(template.verb.as_deref(), Some("get"));
        for bad in [
            "v1/x",
            "/v1/{a/b",
            "/v1/**/x",
            "/v1/{a={b}}",
            "/v1/{1a}",
            "/v1//x",
            "/v1/{a}/{a}",
            "/v1/x:",
            "/v1/x}",
        ] {
            assert!(PathTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn templates_match_and_bind() {
        assert_eq!(
            vars("/v1/{name=messages/*}", "/v1/messages/42"),
            Some(vec!["messages/42".to_string()])
        );
        assert_eq!(vars("/v1/{name=messages/*}", "/v1/messages/42/x"), None);
        assert_eq!(vars("/v1/{name=messages/*}", "/v1/other/42"), None);
        assert_eq!(
            vars("/v1/{id}/items/{item.id}", "/v1/a%20b/items/7"),
            Some(vec!["a b".to_string(), "7".to_string()])
        );
        assert_eq!(vars("/v1/{id}", "/v1/"), None);
        assert_eq!(
            vars("/files/{path=**}", "/files/a/b%2Fc/d"),
            Some(vec!["a/b%2Fc/d".to_string()])
        );
        assert_eq!(
            vars("/files/{path=**}", "/files/one%2Ftwo"),
            Some(vec!["one%2Ftwo".to_string()])
        );
        assert_eq!(vars("/files/**", "/files"), Some(vec![]));
        assert_eq!(
            vars("/v1/{name=shelves/*/books/**}", "/v1/shelves/1/books/2/3"),
            Some(vec!["shelves/1/books/2/3".to_string()])
        );
        assert_eq!(vars("/v1/*/x", "/v1/a/x"), Some(vec![]));
        assert_eq!(
            vars("/v1/{id}:cancel", "/v1/9:cancel"),
            Some(vec!["9".to_string()])
        );
        assert_eq!(vars("/v1/{id}:cancel", "/v1/9"), None);
        assert_eq!(
            vars("/v1/{id}", "/v1/9:cancel"),
            Some(vec!["9:cancel".into()])
        );
    }

    #[test]
    fn literal_segments_sort_before_wildcards() {
        let mut templates = ["/v1/**", "/v1/*", "/v1/x", "/v1/*:run"]
            .map(|text| PathTemplate::parse(text).unwrap())
            .to_vec();
        templates.sort_by(PathTemplate::specificity);
        let order: Vec<_> = templates
            .iter()
            .map(|template| template.segments[1].rank() + 10 * u8::from(template.verb.is_some()))
            .collect();
        assert_eq!(order, [11, 0, 1, 2]);
    }

    #[test]
    fn percent_decoding_keeps_slashes_when_asked() {
        assert_eq!(percent_decode("a%2Fb%20c", false), "a/b c");
        assert_eq!(percent_decode("a%2fb%20c", true), "a%2fb c");
        assert_eq!(percent_decode("100%", false), "100%");
        assert_eq!(percent_decode("%zz%4", false), "%zz%4");
    }
}
