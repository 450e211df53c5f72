//! Reading a config file: YAML to the typed model, with the path of any parse error, and
//! `${env:NAME}` / `${file:/path}` secret references resolved.

use std::path::Path;

use super::error::{ConfigError, ConfigErrors};
use super::model::Config;

/// A loaded config: as written (secret references intact, for display and hashing) and resolved
/// (for building).
#[derive(Clone, Debug)]
pub struct LoadedConfig {
    pub as_written: Config,
    pub resolved: Config,
}

/// Read and parse a YAML config file.
pub fn load_file(path: &Path) -> Result<LoadedConfig, ConfigErrors> {
    parse_yaml(&read_text(path)?)
}

/// The text of a config file.
pub fn read_text(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|error| {
        ConfigErrors(vec![ConfigError::new(
            "",
            format!("cannot read {}: {error}", path.display()),
        )])
    })
}

/// Read a YAML file as a document, without interpreting it.
pub fn read_yaml(path: &Path) -> Result<serde_yaml::Value, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        ConfigErrors(vec![ConfigError::new(
            "",
            format!("cannot read {}: {error}", path.display()),
        )])
    })?;
    yaml_value(&text)
}

fn yaml_value(text: &str) -> Result<serde_yaml::Value, ConfigErrors> {
    serde_yaml::from_str(text).map_err(|error| {
        ConfigErrors(vec![ConfigError::new(
            "",
            format!("not valid YAML: {error}"),
        )])
    })
}

/// Parse a YAML config text.
pub fn parse_yaml(text: &str) -> Result<LoadedConfig, ConfigErrors> {
    parse_value(yaml_value(text)?)
}

/// Interpret a config document (from a file, or from the database).
pub fn parse_value(value: serde_yaml::Value) -> Result<LoadedConfig, ConfigErrors> {
    let as_written = deserialize(value.clone())?;
    let mut resolved_value = value;
    let mut errors = Vec::new();
    resolve_secrets(&mut resolved_value, String::new(), &mut errors);
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let resolved = deserialize(resolved_value)?;
    Ok(LoadedConfig {
        as_written,
        resolved,
    })
}

fn deserialize(value: serde_yaml::Value) -> Result<Config, ConfigErrors> {
    // Through JSON: serde_yaml reads enums only from YAML tags, while the config writes them as
    // one-key maps (`{ prefix: /users }`), the same shape JSON and PostgreSQL use.
    let value = serde_json::to_value(value).map_err(|error| {
        ConfigErrors(vec![ConfigError::new(
            "",
            format!("not a valid config document: {error}"),
        )])
    })?;
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ConfigErrors(vec![ConfigError::new(path, error.into_inner().to_string())])
    })
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Replace every `${env:NAME}` and `${file:/path}` inside string values.
fn resolve_secrets(value: &mut serde_yaml::Value, path: String, errors: &mut Vec<ConfigError>) {
    match value {
        serde_yaml::Value::String(text) if text.contains("${env:") || text.contains("${file:") => {
            match resolve_text(text) {
                Ok(resolved) => *text = resolved,
                Err(message) => errors.push(ConfigError::new(path, message)),
            }
        }
        serde_yaml::Value::Sequence(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                resolve_secrets(item, format!("{path}[{index}]"), errors);
            }
        }
        serde_yaml::Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                let key = key.as_str().unwrap_or("?").to_string();
                resolve_secrets(item, join(&path, &key), errors);
            }
        }
        _ => {}
    }
}

fn resolve_text(text: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unclosed \"${\"".to_string())?;
        let reference = &after[..end];
        if let Some(name) = reference.strip_prefix("env:") {
            let value = std::env::var(name)
                .map_err(|_| format!("environment variable {name} is not set"))?;
            out.push_str(&value);
        } else if let Some(file) = reference.strip_prefix("file:") {
            let value = std::fs::read_to_string(file)
                .map_err(|error| format!("cannot read secret file {file}: {error}"))?;
            out.push_str(value.trim_end_matches(['\n', '\r']));
        } else {
            // Not a secret reference (e.g. a filter template variable): keep it.
            out.push_str(&rest[start..start + 2 + end + 1]);
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_name_the_path() {
        let errors = parse_yaml(
            "version: 1\nroutes:\n  - name: a\n    upstream: u\n    match: { pathz: [] }\n",
        )
        .unwrap_err();
        assert_eq!(errors.0[0].path, "routes[0].match.pathz");
        assert!(
            errors.0[0].message.contains("unknown field `pathz`"),
            "{}",
            errors.0[0]
        );
    }

    #[test]
    fn secrets_resolve_but_the_written_form_is_kept() {
        std::env::set_var("GATEHOUSE_TEST_SECRET_LOAD", "s3cret");
        let loaded = parse_yaml(
            "version: 1\nfilters:\n  - kind: response_headers\n    config: { set: { x-a: \"${env:GATEHOUSE_TEST_SECRET_LOAD}\", x-b: \"${route}\" } }\n",
        )
        .unwrap();
        assert_eq!(loaded.resolved.filters[0].config["set"]["x-a"], "s3cret");
        assert_eq!(loaded.resolved.filters[0].config["set"]["x-b"], "${route}");
        assert_eq!(
            loaded.as_written.filters[0].config["set"]["x-a"],
            "${env:GATEHOUSE_TEST_SECRET_LOAD}"
        );
    }

    #[test]
    fn missing_env_is_an_error_with_its_path() {
        let errors = parse_yaml(
            "version: 1\nfilters:\n  - kind: response_headers\n    config: { set: { x-a: \"${env:GATEHOUSE_SURELY_UNSET}\" } }\n",
        )
        .unwrap_err();
        assert_eq!(errors.0[0].path, "filters[0].config.set.x-a");
    }
}
