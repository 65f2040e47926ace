//! Typed PostgreSQL values, relation schemas and the wire formats every destination shares.
//!
//! ```text
//! pgoutput text ──text::decode──▶ Value ──format::encode(WireFormat)──▶ bytes
//!                                   ▲                                     │
//!                                   └────────format::decode──────────────┘ (consumers, tests)
//! Value ──text::render──▶ PostgreSQL's own text output (the fidelity contract)
//! ```

pub mod binary;
pub mod builtin;
pub mod format;
pub mod schema;
pub mod text;
pub mod value;

pub use builtin::builtin_type;
pub use format::{
    Encoder, PayloadColumn, PayloadSchema, ReadEncoder, TypeMapping, WireBatch, WireFormat,
    check_type_mapping, decode, encode, payload_schema,
};
pub use schema::{ColumnSchema, TableSchema, TypeInfo, TypeKind};
pub use value::{Change, Op, Row, Value};

/// Errors of decoding and encoding.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// PostgreSQL's text for a value did not parse as its type.
    #[error("cannot decode {type_name} value {text:?}: {reason}")]
    Text {
        /// Type name.
        type_name: String,
        /// The offending text (truncated to 200 characters).
        text: String,
        /// Why.
        reason: String,
    },
    /// A wire format could not encode or decode a batch.
    #[error("{format} {action} failed for {table}: {reason}")]
    Format {
        /// Format name.
        format: &'static str,
        /// `encode` or `decode`.
        action: &'static str,
        /// Qualified table name.
        table: String,
        /// Why.
        reason: String,
    },
    /// A `typeMappings` entry the wire formats do not understand or cannot apply.
    #[error("typeMappings entry {pg_type:?} → {target:?} is not supported: {reason}")]
    TypeMapping {
        /// PostgreSQL type name (the mapping's key).
        pg_type: String,
        /// Destination type (the mapping's value).
        target: String,
        /// Why, and what is supported.
        reason: String,
    },
}
