//! Sizes as written in config: an integer number of bytes, or a number with a unit ("16KiB",
//! "10MiB"). Shared by the server's limits and by filter configs.

use std::fmt;

use schemars::gen::SchemaGenerator;
use schemars::schema::{InstanceType, Schema, SchemaObject, SingleOrVec};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

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
}
