//! The destination registry. Every destination module exposes one [`Registration`]: the
//! `spec.type`s it delivers, the Secrets it reads, a check that validates its block and
//! resolves those Secrets (run on a manifest file and on objects read from the API alike),
//! and its `open`. Adding a destination type is its module plus one line in [`REGISTRY`].

use std::collections::BTreeMap;
use std::fmt;

use wallaby_codec::WireFormat;
use wallaby_crds::common::WireFormat as SpecFormat;
use wallaby_crds::destination::DestinationSpec;
use wallaby_crds::{DestinationType, Flow};
use wallaby_pipeline::destination::{Destination, TypeOverrides};

use crate::meta::{MetaDestination, MetaOptions};

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

/// Every destination type this build delivers.
pub static REGISTRY: &[&Registration] = &[
    &crate::file::REGISTRATION,
    #[cfg(feature = "kafka")]
    &crate::kafka::REGISTRATION,
    #[cfg(feature = "s3")]
    &crate::s3::REGISTRATION,
    #[cfg(feature = "http")]
    &crate::http::REGISTRATION,
    #[cfg(feature = "grpc")]
    &crate::grpc::REGISTRATION,
];

/// Types delivered by a cargo feature of this crate, with the feature's name.
const FEATURES: &[(DestinationType, &str)] = &[
    (DestinationType::Kafka, "kafka"),
    (DestinationType::Bufstream, "kafka"),
    (DestinationType::S3, "s3"),
    (DestinationType::Http, "http"),
    (DestinationType::Grpc, "grpc"),
];

/// The registration delivering `kind`, if this build has one.
pub fn registration(kind: DestinationType) -> Option<&'static Registration> {
    REGISTRY.iter().copied().find(|r| r.types.contains(&kind))
}

/// Names of the Secrets a Destination reads.
pub fn secret_names(spec: &DestinationSpec) -> Vec<String> {
    registration(spec.kind)
        .map(|r| (r.secret_names)(spec))
        .unwrap_or_default()
}

/// Checks Destination `name` of `flow` and resolves its Secrets.
pub fn check(
    name: &str,
    flow: &Flow,
    spec: &DestinationSpec,
    secrets: &dyn SecretSource,
) -> Result<SecretData, Vec<String>> {
    let Some(registration) = registration(spec.kind) else {
        let problem = match FEATURES.iter().find(|(t, _)| *t == spec.kind) {
            Some((_, feature)) => format!(
                "Destination/{name} spec.type: {:?} is not built into this worker: build wallaby-worker with the cargo feature {feature:?} (on by default)",
                spec.kind.as_str()
            ),
            None => format!(
                "Destination/{name} spec.type: {:?} is declared in the CRD but not delivered by this worker version yet; use type: file, kafka, bufstream, s3, http or grpc (see docs/destinations.md)",
                spec.kind.as_str()
            ),
        };
        return Err(vec![problem]);
    };
    (registration.check)(&CheckContext {
        name,
        flow,
        spec,
        secrets,
    })
}

/// Opens Destination `name` of `flow` with what [`check`] resolved, wrapped to rewrite
/// rows when it sets `metaColumns`, `softDelete` or `appendMode`.
pub fn open(
    name: &str,
    flow: &Flow,
    spec: &DestinationSpec,
    secrets: &SecretData,
) -> Result<Box<dyn Destination>, OpenError> {
    let registration = registration(spec.kind).ok_or_else(|| {
        OpenError(format!(
            "Destination/{name}: type {:?} is not delivered by this worker",
            spec.kind.as_str()
        ))
    })?;
    let sink = (registration.open)(&OpenContext {
        name,
        flow,
        spec,
        secrets,
    })?;
    Ok(match MetaOptions::from_spec(spec) {
        Some(options) => Box::new(MetaDestination::new(sink, options)),
        None => sink,
    })
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
