//! Types shared by several resources: Secret references, durations, wire formats
//! and the Kubernetes condition list.

use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A key inside a Secret in the same namespace as the referencing object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    /// Name of the Secret, in the namespace of the referencing object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's `data` / `stringData`.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A whole Secret in the same namespace; the keys it must hold are documented on the field
/// that references it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Name of the Secret, in the namespace of the referencing object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A duration written the way Kubernetes users write them: `500ms`, `10s`, `1m30s`, `2h`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DurationString(pub String);

impl DurationString {
    /// Pattern accepted by the CRD schema; [`DurationString::parse`] accepts the same set.
    pub const PATTERN: &'static str = r"^([0-9]+(ms|s|m|h))+$";

    /// Parses the duration; the schema pattern guarantees this succeeds for objects that
    /// passed the API server, and standalone manifests are checked by [`crate::validate`].
    pub fn parse(&self) -> Result<Duration, String> {
        let s = self.0.trim();
        if !matches_pattern(s) {
            return Err(format!(
                "invalid duration {s:?}: write a number followed by ms, s, m or h, e.g. \"500ms\", \"10s\", \"1m30s\""
            ));
        }
        humantime::parse_duration(s).map_err(|e| {
            format!("invalid duration {s:?} ({e}): write e.g. \"500ms\", \"10s\", \"1m30s\"")
        })
    }
}

/// Whether `s` matches [`DurationString::PATTERN`]: one or more `<digits><ms|s|m|h>`.
fn matches_pattern(s: &str) -> bool {
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ms", "s", "m", "h"]
            .into_iter()
            .find(|u| rest.starts_with(u));
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return false,
        }
    }
    true
}

impl From<&str> for DurationString {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl fmt::Debug for DurationString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl JsonSchema for DurationString {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "DurationString".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": Self::PATTERN,
            "maxLength": 32,
        })
    }
}

/// Encoding of change batches on the wire (shared by every destination).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum WireFormat {
    /// Apache Arrow IPC stream.
    Arrow,
    /// Apache Parquet file per batch.
    Parquet,
    /// Avro object container with the writer schema.
    Avro,
    /// Protocol Buffers with a self-describing descriptor.
    Proto,
    /// JSON lines, one change per line (the default).
    #[default]
    Json,
}

/// Kubernetes condition list, a list-map keyed by `type` (as CloudNativePG and kube do).
pub type Conditions = Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>;

/// Schema transform marking a condition list as a `map` keyed by `type`, so server-side apply
/// merges conditions written by different managers.
pub fn conditions_list_map(schema: &mut schemars::Schema) {
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
}

/// Schema transform marking a list of named items as a `map` keyed by `name`.
pub fn named_list_map(schema: &mut schemars::Schema) {
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["name"]),
    );
}

/// Schema for a free-form `map[string]string`, bounded so CEL cost estimation stays finite.
pub fn string_map(schema: &mut schemars::Schema) {
    schema.insert("maxProperties".into(), 64.into());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_kubernetes() {
        let cases = [
            ("500ms", Some(Duration::from_millis(500))),
            ("10s", Some(Duration::from_secs(10))),
            ("1m30s", Some(Duration::from_secs(90))),
            ("2h", Some(Duration::from_secs(7200))),
            ("", None),
            ("ten seconds", None),
            ("10", None),
            ("s", None),
        ];
        for (input, want) in cases {
            assert_eq!(DurationString::from(input).parse().ok(), want, "{input:?}");
        }
    }
}
