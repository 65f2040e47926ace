//! The shared wire formats. One encoder per format, used by every destination: a batch of
//! changes of one table (one [`TableSchema`] version) becomes one self-describing payload.
//!
//! | format  | payload                                                               |
//! |---------|-----------------------------------------------------------------------|
//! | arrow   | Arrow IPC stream: schema message + one record batch                   |
//! | parquet | a complete Parquet file                                               |
//! | avro    | an Avro object container file, writer schema in its header            |
//! | proto   | a length-delimited `WireBatch` carrying its `FileDescriptorSet`       |
//! | json    | JSON lines, one change per line                                       |

use crate::CodecError;
use crate::schema::TableSchema;
use crate::value::Change;

/// The wire formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireFormat {
    /// Arrow IPC stream.
    Arrow,
    /// Parquet file.
    Parquet,
    /// Avro object container.
    Avro,
    /// Protocol Buffers with descriptor.
    Proto,
    /// JSON lines.
    Json,
}

impl WireFormat {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Arrow => "arrow",
            Self::Parquet => "parquet",
            Self::Avro => "avro",
            Self::Proto => "proto",
            Self::Json => "json",
        }
    }

    /// File extension for objects and files of this format.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Arrow => "arrows",
            Self::Parquet => "parquet",
            Self::Avro => "avro",
            Self::Proto => "binpb",
            Self::Json => "jsonl",
        }
    }

    /// MIME type for HTTP and object metadata.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Arrow => "application/vnd.apache.arrow.stream",
            Self::Parquet => "application/vnd.apache.parquet",
            Self::Avro => "application/avro",
            Self::Proto => "application/x-protobuf",
            Self::Json => "application/x-ndjson",
        }
    }
}

/// Encodes changes of one table into one payload.
pub fn encode(
    format: WireFormat,
    schema: &TableSchema,
    changes: &[Change],
) -> Result<Vec<u8>, CodecError> {
    let _ = (schema, changes);
    Err(CodecError::Format {
        format: format.as_str(),
        action: "encode",
        table: schema.qualified_name(),
        reason: "not implemented yet".into(),
    })
}

/// Decodes a payload produced by [`encode`] back to its changes. The payload's embedded
/// schema (Arrow/Parquet schema, Avro writer schema, Protobuf descriptor, JSON column
/// types) is checked against `schema` (column names, PostgreSQL type names, version); a
/// mismatch is an error.
pub fn decode(
    format: WireFormat,
    schema: &TableSchema,
    payload: &[u8],
) -> Result<Vec<Change>, CodecError> {
    let _ = payload;
    Err(CodecError::Format {
        format: format.as_str(),
        action: "decode",
        table: schema.qualified_name(),
        reason: "not implemented yet".into(),
    })
}
