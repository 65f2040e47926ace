//! `wallaby-destinations`: one module per destination type, each registered once in
//! [`registry`]: how its Secrets are found and checked (the same code in file mode and in
//! a cluster) and how it opens. Heavy SDKs sit behind the cargo features `kafka`, `s3`,
//! `http` and `grpc`, which the worker binary enables by default.

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

pub use registry::{
    CheckContext, OpenContext, OpenError, Registration, SecretData, SecretSource, check,
    no_secrets, open, secret_names, wire_format,
};
