//! Per-route path changes before forwarding: `strip_prefix`, or `rewrite` templated from the
//! named captures of a regex path.

use crate::config::error::ConfigError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Literal(String),
    Capture(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRewrite {
    StripPrefix(String),
    Template(Vec<Part>),
}

impl PathRewrite {
    /// Compile a route's `strip_prefix` / `rewrite`; `capture_names` are the named groups its
    /// regex paths define.
    pub fn build(
        route_path: &str,
        strip_prefix: Option<&str>,
        rewrite: Option<&str>,
        capture_names: &[String],
    ) -> Result<Option<PathRewrite>, Vec<ConfigError>> {
        match (strip_prefix, rewrite) {
            (None, None) => Ok(None),
            (Some(_), Some(_)) => Err(vec![ConfigError::new(
                route_path,
                "give `strip_prefix` or `rewrite`, not both",
            )]),
            (Some(prefix), None) => {
                if !prefix.starts_with('/') || prefix.len() < 2 {
                    return Err(vec![ConfigError::new(
                        format!("{route_path}.strip_prefix"),
                        "must start with \"/\" and name at least one character",
                    )]);
                }
                Ok(Some(PathRewrite::StripPrefix(
                    prefix.trim_end_matches('/').to_string(),
                )))
            }
            (None, Some(template)) => {
                let path = format!("{route_path}.rewrite");
                if !template.starts_with('/') {
                    return Err(vec![ConfigError::new(path, "must start with \"/\"")]);
                }
                let mut parts = Vec::new();
                let mut rest = template;
                while let Some(start) = rest.find("${") {
                    if start > 0 {
                        parts.push(Part::Literal(rest[..start].to_string()));
                    }
                    let after = &rest[start + 2..];
                    let Some(end) = after.find('}') else {
                        return Err(vec![ConfigError::new(path, "unclosed \"${\"")]);
                    };
                    let name = &after[..end];
                    if !capture_names.iter().any(|known| known == name) {
                        return Err(vec![ConfigError::new(
                            path,
                            format!(
                                "\"${{{name}}}\" is not a named capture of this route's regex paths"
                            ),
                        )]);
                    }
                    parts.push(Part::Capture(name.to_string()));
                    rest = &after[end + 1..];
                }
                if !rest.is_empty() {
                    parts.push(Part::Literal(rest.to_string()));
                }
                Ok(Some(PathRewrite::Template(parts)))
            }
        }
    }

    /// The forwarded path for a matched request path.
    pub fn apply(&self, path: &str, captures: &[(String, String)]) -> String {
        match self {
            PathRewrite::StripPrefix(prefix) => match path.strip_prefix(prefix.as_str()) {
                Some("") => "/".to_string(),
                Some(rest) if rest.starts_with('/') => rest.to_string(),
                _ => path.to_string(),
            },
            PathRewrite::Template(parts) => {
                let mut out = String::new();
                for part in parts {
                    match part {
                        Part::Literal(text) => out.push_str(text),
                        Part::Capture(name) => {
                            if let Some((_, value)) =
                                captures.iter().find(|(known, _)| known == name)
                            {
                                out.push_str(value);
                            }
                        }
                    }
                }
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_prefix_keeps_a_leading_slash() {
        let rewrite = PathRewrite::build("routes[0]", Some("/users"), None, &[])
            .unwrap()
            .unwrap();
        assert_eq!(rewrite.apply("/users/7", &[]), "/7");
        assert_eq!(rewrite.apply("/users", &[]), "/");
        assert_eq!(rewrite.apply("/other", &[]), "/other");
    }

    #[test]
    fn template_uses_captures() {
        let names = vec!["version".to_string(), "id".to_string()];
        let rewrite = PathRewrite::build("routes[0]", None, Some("/v${version}/u/${id}"), &names)
            .unwrap()
            .unwrap();
        let captures = vec![
            ("version".to_string(), "2".to_string()),
            ("id".to_string(), "42".to_string()),
        ];
        assert_eq!(rewrite.apply("/ignored", &captures), "/v2/u/42");
    }

    #[test]
    fn unknown_capture_is_an_error() {
        let error = PathRewrite::build("routes[1]", None, Some("/x/${nope}"), &[]).unwrap_err();
        assert_eq!(error[0].path, "routes[1].rewrite");
    }
}
