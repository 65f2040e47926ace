//! The destination contract: a destination receives [`ChangeBatch`]es in order and says,
//! for each, whether it is merely *accepted* (buffered, lost if the process dies) or
//! already *durable*; `flush` makes everything accepted durable. The ack tracker only ever
//! confirms durable positions to the slot. Errors carry a retry class and a hint.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use wallaby_codec::{TableSchema, WireFormat};
use wallaby_crds::destination::{DestinationSpec, RetrySpec};

use crate::batch::ChangeBatch;

pub mod file;
pub mod grpc;
pub mod http;
pub mod kafka;
pub mod meta;
pub mod payload;
pub mod pgoutput;
pub mod s3;

/// What a successful write guarantees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteAck {
    /// Buffered by the destination: durable only after [`Destination::flush`].
    Accepted,
    /// Durable now (e.g. a Kafka produce with `acks=all` that completed).
    Durable,
}

/// Whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Network blips, timeouts, throttling, a full disk that may be freed: retry with
    /// backoff.
    Transient,
    /// Bad credentials, a rejected schema, a missing bucket: retrying the same batch will
    /// fail the same way until a human changes something.
    Permanent,
}

impl ErrorClass {
    /// Lower-case name for status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::Permanent => "permanent",
        }
    }
}

/// A failed write or flush.
#[derive(Debug, Clone)]
pub struct DestinationError {
    /// Retry class.
    pub class: ErrorClass,
    /// What failed.
    pub message: String,
    /// What the user can do about it.
    pub hint: Option<String>,
}

impl DestinationError {
    /// A transient error.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Transient,
            message: message.into(),
            hint: None,
        }
    }

    /// A permanent error.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Permanent,
            message: message.into(),
            hint: None,
        }
    }

    /// Adds a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Classifies an I/O error: interruptions, timeouts and a full disk are worth retrying;
    /// permission and path problems are not.
    pub fn from_io(context: &str, e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let message = format!("{context}: {e}");
        match e.kind() {
            K::PermissionDenied | K::ReadOnlyFilesystem => Self::permanent(message)
                .with_hint("give the worker write access to the destination path"),
            K::NotFound | K::NotADirectory | K::IsADirectory | K::InvalidInput => {
                Self::permanent(message).with_hint("check the destination path")
            }
            K::StorageFull | K::QuotaExceeded => {
                Self::transient(message).with_hint("free disk space on the destination volume")
            }
            _ => Self::transient(message),
        }
    }
}

impl fmt::Display for DestinationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.class.as_str())?;
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for DestinationError {}

/// A sink. Batches arrive in order; a destination never sees batch `n+1` before it
/// returned from batch `n`.
#[async_trait]
pub trait Destination: Send + fmt::Debug {
    /// Writes one batch.
    async fn write(&mut self, batch: &ChangeBatch) -> Result<WriteAck, DestinationError>;

    /// Makes every accepted batch durable.
    async fn flush(&mut self) -> Result<(), DestinationError>;

    /// How this destination encodes a table group when it writes the group's rows as
    /// whole payloads (a JSON-lines run, one file or object per group). When every
    /// destination of a flow has one, a snapshot's copy workers encode the rows they
    /// read themselves, in parallel, and batches carry the payloads
    /// ([`TableChanges::encoded`](crate::batch::TableChanges::encoded)) instead of the
    /// rows. `None` (the default): the destination needs the rows.
    fn payload_encoding(&self) -> Option<PayloadEncoding> {
        None
    }
}

/// A destination's encoding of a table group: the wire format and its `typeMappings`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadEncoding {
    /// Wire format.
    pub format: WireFormat,
    /// `typeMappings` (PostgreSQL type name → destination type).
    pub type_mappings: BTreeMap<String, String>,
}

impl PayloadEncoding {
    /// `schema` with this encoding's type mappings applied.
    pub fn schema(&self, schema: &Arc<TableSchema>) -> Arc<TableSchema> {
        TypeOverrides::new(self.type_mappings.clone()).apply(schema)
    }
}

/// The retry block the pipeline uses for a Destination. The seeds put `max_retries` and
/// the backoff next to the URL of request/response destinations (`spec.http.retry`,
/// `spec.grpc.retry`) while every Destination also has `spec.retry`; both feed the one
/// retry loop of the pipeline (a destination never retries by itself, so nothing is
/// retried twice). The typed block's `retry` wins when it differs from the defaults,
/// otherwise `spec.retry` applies.
pub fn effective_retry(spec: &DestinationSpec) -> &RetrySpec {
    let typed = spec
        .http
        .as_ref()
        .map(|h| &h.retry)
        .or(spec.grpc.as_ref().map(|g| &g.retry));
    match typed {
        Some(retry) if *retry != RetrySpec::default() => retry,
        _ => &spec.retry,
    }
}

/// A destination's `typeMappings` (PostgreSQL type name → destination type), applied to
/// each table schema once per schema version.
#[derive(Debug, Clone, Default)]
pub struct TypeOverrides {
    mappings: BTreeMap<String, String>,
    cache: HashMap<(String, u32), Arc<TableSchema>>,
}

impl TypeOverrides {
    /// Overrides from a Destination's `typeMappings`.
    pub fn new(mappings: BTreeMap<String, String>) -> Self {
        Self {
            mappings,
            cache: HashMap::new(),
        }
    }

    /// The mappings.
    pub fn mappings(&self) -> &BTreeMap<String, String> {
        &self.mappings
    }

    /// The schema with each column's `mapped_type` set from the mappings (keyed by the
    /// column's PostgreSQL type name).
    pub fn apply(&mut self, schema: &Arc<TableSchema>) -> Arc<TableSchema> {
        if self.mappings.is_empty() {
            return schema.clone();
        }
        let key = (schema.qualified_name(), schema.version);
        if let Some(s) = self.cache.get(&key) {
            return s.clone();
        }
        let mut mapped = (**schema).clone();
        for column in &mut mapped.columns {
            column.mapped_type = self.mappings.get(&column.ty.name).cloned();
        }
        let mapped = Arc::new(mapped);
        self.cache.insert(key, mapped.clone());
        mapped
    }
}
