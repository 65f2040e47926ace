//! What the request/response destinations (`http`, `grpc`) put in a request, from their
//! `payloadMode`: the group in the destination's wire format, its JSON lines, or pgoutput
//! protocol messages; and the same choice for a batch's logical messages.

use wallaby_codec::{Change, TableSchema, WireFormat};
use wallaby_crds::destination::PayloadMode;

use wallaby_pipeline::batch::LogicalMessage;
use wallaby_pipeline::destination::DestinationError;

/// The body shape actually sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    /// The group's payload in the destination's format.
    Wire,
    /// The group's JSON-lines payload, whatever the format (`recordJson`, alias `raw`).
    RecordJson,
    /// The group as pgoutput protocol messages ([`super::pgoutput`]).
    Wal,
}

/// An encoded request body with the names it is announced by.
#[derive(Debug)]
pub struct Encoded {
    /// The bytes.
    pub body: Vec<u8>,
    /// Format name (`json`, `arrow`, …, or `pgoutput`).
    pub format: &'static str,
    /// MIME type.
    pub content_type: &'static str,
}

impl BodyMode {
    /// The mode a Destination's `payloadMode` asks for.
    pub fn of(mode: PayloadMode) -> Self {
        match mode {
            PayloadMode::Wire => Self::Wire,
            PayloadMode::RecordJson | PayloadMode::Raw => Self::RecordJson,
            PayloadMode::Wal => Self::Wal,
        }
    }

    /// Name sent as `x-wallaby-payload-mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Wire => "wire",
            Self::RecordJson => "recordJson",
            Self::Wal => "wal",
        }
    }

    /// The body of a table group; `format` is the destination's wire format.
    pub fn encode_group(
        self,
        format: WireFormat,
        schema: &TableSchema,
        changes: &[Change],
    ) -> Result<Encoded, DestinationError> {
        let format = match self {
            Self::Wal => {
                return Ok(Encoded {
                    body: crate::pgoutput::encode(schema, changes),
                    format: "pgoutput",
                    content_type: crate::pgoutput::CONTENT_TYPE,
                });
            }
            Self::Wire => format,
            Self::RecordJson => WireFormat::Json,
        };
        let body = wallaby_codec::encode(format, schema, changes).map_err(|e| {
            DestinationError::permanent(format!(
                "encoding {} as {}: {e}",
                schema.qualified_name(),
                format.as_str()
            ))
            .with_hint("map the offending type with spec.typeMappings (e.g. to string)")
        })?;
        Ok(Encoded {
            body,
            format: format.as_str(),
            content_type: format.content_type(),
        })
    }

    /// The body of a batch's logical messages: `json` (their JSON lines) unless the mode is
    /// `wal`, which sends them as pgoutput `M` messages.
    pub fn encode_messages(self, json: Vec<u8>, messages: &[LogicalMessage]) -> Encoded {
        match self {
            Self::Wal => Encoded {
                body: crate::pgoutput::encode_messages(messages),
                format: "pgoutput",
                content_type: crate::pgoutput::CONTENT_TYPE,
            },
            Self::Wire | Self::RecordJson => Encoded {
                body: json,
                format: WireFormat::Json.as_str(),
                content_type: WireFormat::Json.content_type(),
            },
        }
    }
}
