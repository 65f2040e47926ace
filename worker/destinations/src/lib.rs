//! `wallaby-destinations`: one module per destination type, each registered once in
//! [`REGISTRY`] (see [`registry`]): how its Secrets are found and checked (the same code
//! in file mode and in a cluster) and how it opens. Heavy SDKs sit behind the cargo
//! features `kafka`, `s3`, `http` and `grpc`, which the worker binary enables by default.

pub mod file;
#[cfg(feature = "grpc")]
pub mod grpc;
#[cfg(feature = "http")]
pub mod http;
pub mod idempotency;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod meta;
pub mod payload;
pub mod pgoutput;
pub mod registry;
#[cfg(feature = "s3")]
pub mod s3;

use wallaby_crds::destination::DestinationSpec;
use wallaby_crds::{DestinationType, Flow};
use wallaby_pipeline::destination::Destination;

use meta::{MetaDestination, MetaOptions};
pub use registry::{
    CheckContext, OpenContext, OpenError, Registration, SecretData, SecretSource, no_secrets,
    wire_format,
};

/// Every destination type this build delivers.
pub static REGISTRY: &[&Registration] = &[
    &file::REGISTRATION,
    #[cfg(feature = "kafka")]
    &kafka::REGISTRATION,
    #[cfg(feature = "s3")]
    &s3::REGISTRATION,
    #[cfg(feature = "http")]
    &http::REGISTRATION,
    #[cfg(feature = "grpc")]
    &grpc::REGISTRATION,
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
