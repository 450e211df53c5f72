//! Durations ("250ms", "5s", "1m") and sizes (bytes, or "16KiB", "10MiB") as written in config.

use std::fmt;

use schemars::gen::SchemaGenerator;
use schemars::schema::{InstanceType, Schema, SchemaObject, SingleOrVec};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

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

/// A size in bytes, written as an integer or with a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().map_err(|_| {
            format!("\"{text}\" is not a size; write bytes or a number with a unit, like \"16KiB\"")
        })?;
        let multiplier: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" | "k" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(format!(
                "unknown size unit \"{other}\" in \"{text}\" (use B, KiB, MiB, GiB, KB, MB or GB)"
            ))
            }
        };
        number
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| format!("\"{text}\" is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.0;
        if bytes != 0 && bytes.is_multiple_of(1 << 30) {
            write!(formatter, "{}GiB", bytes >> 30)
        } else if bytes != 0 && bytes.is_multiple_of(1 << 20) {
            write!(formatter, "{}MiB", bytes >> 20)
        } else if bytes != 0 && bytes.is_multiple_of(1 << 10) {
            write!(formatter, "{}KiB", bytes >> 10)
        } else {
            write!(formatter, "{bytes}")
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(bytes) => Ok(ByteSize(bytes)),
            Raw::Text(text) => ByteSize::parse(&text).map_err(de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl schemars::JsonSchema for ByteSize {
    fn schema_name() -> String {
        "ByteSize".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let mut schema = SchemaObject {
            instance_type: Some(SingleOrVec::Vec(vec![
                InstanceType::Integer,
                InstanceType::String,
            ])),
            ..Default::default()
        };
        schema.metadata().description =
            Some("A size in bytes, or with a unit: \"16KiB\", \"10MiB\".".into());
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
    fn sizes_parse_with_units() {
        assert_eq!(ByteSize::parse("16KiB").unwrap().0, 16 * 1024);
        assert_eq!(ByteSize::parse("10MiB").unwrap().0, 10 << 20);
        assert_eq!(ByteSize::parse("100").unwrap().0, 100);
        assert!(ByteSize::parse("10 parsecs")
            .unwrap_err()
            .contains("unknown size unit"));
        assert_eq!(ByteSize(16 * 1024).to_string(), "16KiB");
    }

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
