//! What a destination module registers: every module exposes one [`Registration`] (the
//! `spec.type`s it delivers, the Secrets it reads, a check that validates its block and
//! resolves those Secrets, run on a manifest file and on objects read from the API alike,
//! and its `open`), listed once in [`crate::REGISTRY`].

use std::collections::BTreeMap;
use std::fmt;

use wallaby_codec::WireFormat;
use wallaby_crds::common::WireFormat as SpecFormat;
use wallaby_crds::destination::DestinationSpec;
use wallaby_crds::{DestinationType, Flow};
use wallaby_pipeline::destination::{Destination, TypeOverrides};

/// String data resolved from the Secrets one Destination references, under the keys its
/// module chooses (e.g. `username`, `tls.ca`); what its `open` receives.
pub type SecretData = BTreeMap<String, String>;

/// Where the Secrets a flow references come from: the documents of a manifest file and
/// the environment (standalone), or the Kubernetes API (in a cluster).
pub trait SecretSource {
    /// The string data of Secret `name`, `None` when it does not exist. `keys` are the keys
    /// the caller reads (a source that cannot list keys, like the environment, reads those).
    fn secret(&self, name: &str, keys: &[&str]) -> Option<BTreeMap<String, String>>;
    /// How the user provides `key` of Secret `name`; ends a "not found" message.
    fn how_to_provide(&self, name: &str, key: &str) -> String;
    /// How the user provides several `keys` of Secret `name` at once.
    fn how_to_provide_keys(&self, name: &str, keys: &[&str]) -> String {
        keys.iter()
            .map(|k| self.how_to_provide(name, k))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// What a destination's check sees.
pub struct CheckContext<'a> {
    /// Destination name.
    pub name: &'a str,
    /// The Flow it belongs to.
    pub flow: &'a Flow,
    /// Its spec.
    pub spec: &'a DestinationSpec,
    /// Where its Secrets come from.
    pub secrets: &'a dyn SecretSource,
}

impl fmt::Debug for CheckContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckContext")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl CheckContext<'_> {
    /// The wire format the Destination writes (its `format`, else the Flow's).
    pub fn format(&self) -> WireFormat {
        wire_format(self.spec.format.unwrap_or(self.flow.spec.wire_format))
    }
}

/// What a destination's `open` sees.
#[derive(Debug)]
pub struct OpenContext<'a> {
    /// Destination name.
    pub name: &'a str,
    /// The Flow it belongs to.
    pub flow: &'a Flow,
    /// Its spec.
    pub spec: &'a DestinationSpec,
    /// What its check resolved from its Secrets.
    pub secrets: &'a SecretData,
}

impl OpenContext<'_> {
    /// The wire format the Destination writes (its `format`, else the Flow's).
    pub fn format(&self) -> WireFormat {
        wire_format(self.spec.format.unwrap_or(self.flow.spec.wire_format))
    }

    /// Its `typeMappings`.
    pub fn overrides(&self) -> TypeOverrides {
        TypeOverrides::new(self.spec.type_mappings.clone())
    }

    /// `namespace/name` of the Flow.
    pub fn flow_id(&self) -> String {
        format!(
            "{}/{}",
            self.flow.metadata.namespace.as_deref().unwrap_or("default"),
            self.flow.metadata.name.as_deref().unwrap_or_default()
        )
    }
}

/// A destination that could not be opened; the message names the Destination and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(pub String);

/// One destination module's entry points.
#[derive(Debug)]
pub struct Registration {
    /// The `spec.type`s it delivers.
    pub types: &'static [DestinationType],
    /// Names of the Secrets a Destination of this type reads (in a cluster, the worker
    /// reads and watches exactly these).
    pub secret_names: fn(&DestinationSpec) -> Vec<String>,
    /// Validates the type's block and resolves its Secrets; problems name the field.
    pub check: fn(&CheckContext<'_>) -> Result<SecretData, Vec<String>>,
    /// Opens the destination.
    pub open: fn(&OpenContext<'_>) -> Result<Box<dyn Destination>, OpenError>,
}

/// The codec format of a spec format.
pub fn wire_format(f: SpecFormat) -> WireFormat {
    match f {
        SpecFormat::Arrow => WireFormat::Arrow,
        SpecFormat::Parquet => WireFormat::Parquet,
        SpecFormat::Avro => WireFormat::Avro,
        SpecFormat::Proto => WireFormat::Proto,
        SpecFormat::Json => WireFormat::Json,
    }
}

/// Reads key `key` of Secret `secret` for `field`, or says how to provide it.
pub fn secret_key(
    secrets: &dyn SecretSource,
    field: &str,
    secret: &str,
    key: &str,
) -> Result<String, String> {
    secrets
        .secret(secret, &[key])
        .and_then(|mut d| d.remove(key))
        .ok_or_else(|| {
            format!(
                "{field}: key {key:?} of Secret {secret:?} not found: {}",
                secrets.how_to_provide(secret, key)
            )
        })
}

/// [`Registration::secret_names`] of a type that reads no Secret.
pub fn no_secrets(_: &DestinationSpec) -> Vec<String> {
    Vec::new()
}
