//! Durations ("250ms", "5s", "1m"), sizes (bytes, or "16KiB", "10MiB") and percentages as
//! written in config. Sizes are the filters crate's, so filter configs read them the same way.

use std::fmt;

use schemars::gen::SchemaGenerator;
use schemars::schema::{InstanceType, Schema, SchemaObject, SingleOrVec};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

pub use gatehouse_filters::units::ByteSize;

/// A duration written with a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Duration(std::time::Duration::from_secs(secs))
    }
    pub const fn from_millis(millis: u64) -> Self {
        Duration(std::time::Duration::from_millis(millis))
    }
    pub fn get(self) -> std::time::Duration {
        self.0
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(text.trim())
            .map(Duration)
            .map_err(|_| {
                de::Error::custom(format!(
                    "\"{text}\" is not a duration; write a number with a unit, like \"250ms\", \"5s\" or \"1m\""
                ))
            })
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl schemars::JsonSchema for Duration {
    fn schema_name() -> String {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let mut schema = SchemaObject {
            instance_type: Some(SingleOrVec::Single(Box::new(InstanceType::String))),
            ..Default::default()
        };
        schema.string().pattern =
            Some(r"^\s*[0-9]+\s*(ns|us|ms|s|m|h|d)(\s*[0-9]+\s*(ns|us|ms|s|m|h|d))*\s*$".into());
        schema.metadata().description =
            Some("A duration with a unit: \"250ms\", \"5s\", \"1m\".".into());
        Schema::Object(schema)
    }
}

/// A share written as `"50%"` or as the number 50; held as a fraction (0.5).
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Percent(pub f64);

impl Percent {
    pub fn fraction(self) -> f64 {
        self.0
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}%", (self.0 * 100.0 * 1e6).round() / 1e6)
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        let (number, text) = match Raw::deserialize(deserializer)? {
            Raw::Number(number) => (Some(number), number.to_string()),
            Raw::Text(text) => (
                text.trim()
                    .strip_suffix('%')
                    .unwrap_or(text.trim())
                    .trim()
                    .parse::<f64>()
                    .ok(),
                text,
            ),
        };
        match number {
            Some(number) if (0.0..=100.0).contains(&number) => Ok(Percent(number / 100.0)),
            _ => Err(de::Error::custom(format!(
                "\"{text}\" is not a percentage between 0% and 100%, like \"50%\""
            ))),
        }
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl schemars::JsonSchema for Percent {
    fn schema_name() -> String {
        "Percent".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let mut schema = SchemaObject {
            instance_type: Some(SingleOrVec::Vec(vec![
                InstanceType::Number,
                InstanceType::String,
            ])),
            ..Default::default()
        };
        schema.metadata().description = Some("A percentage: \"50%\" or 50.".into());
        Schema::Object(schema)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_read_with_or_without_the_sign() {
        let half: Percent = serde_yaml::from_str("\"50%\"").unwrap();
        assert_eq!(half.fraction(), 0.5);
        let fifth: Percent = serde_yaml::from_str("20").unwrap();
        assert_eq!(fifth.fraction(), 0.2);
        assert_eq!(fifth.to_string(), "20%");
        assert!(serde_yaml::from_str::<Percent>("\"150%\"").is_err());
    }

    #[test]
    fn durations_need_a_unit() {
        let parsed: Duration = serde_yaml::from_str("\"250ms\"").unwrap();
        assert_eq!(parsed.get(), std::time::Duration::from_millis(250));
        let error = serde_yaml::from_str::<Duration>("\"5\"").unwrap_err();
        assert!(error.to_string().contains("not a duration"));
    }
}
