//! The shared wire formats. One encoder per format, used by every destination: a batch of
//! changes of one table (one [`TableSchema`] version) becomes one self-describing payload.
//! This module owns the logical record layout all formats share ([`Wire`]: how a column's
//! PostgreSQL type is carried), the embedded schema descriptor and the `typeMappings`
//! vocabulary; each submodule maps that layout onto one format.
//!
//! | format  | payload                                                               |
//! |---------|-----------------------------------------------------------------------|
//! | arrow   | Arrow IPC stream: schema message + one record batch                   |
//! | parquet | a complete Parquet file (the same Arrow schema)                       |
//! | avro    | an Avro object container file, writer schema in its header            |
//! | proto   | a length-delimited `WireBatch` carrying its `FileDescriptorSet`       |
//! | json    | JSON lines: a schema header line, then one change per line            |
//!
//! Every payload carries the table, `TableSchema.version` and each column's PostgreSQL type
//! name, OID and typmod; consumers key schemas by `(table, version)`. See
//! `docs/wire-formats.md` for the full type-mapping table.

mod arrow;
mod avro;
mod json;
mod parquet;
mod proto;
mod reads;

pub use proto::WireBatch;
pub use reads::ReadEncoder;

use std::sync::Arc;

use crate::CodecError;
use crate::schema::{ColumnSchema, TableSchema, TypeInfo, TypeKind};
use crate::value::{Change, Op, Row, Value};

/// Version of the record layout described in `docs/wire-formats.md`; carried in every
/// payload so the layout itself can evolve.
pub const LAYOUT_VERSION: u32 = 1;

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
    /// Every format, for tests and option validation.
    pub const ALL: [WireFormat; 5] = [
        Self::Arrow,
        Self::Parquet,
        Self::Avro,
        Self::Proto,
        Self::Json,
    ];

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

/// Encodes changes of one table into one payload. All changes must belong to `schema`
/// (one table, one schema version): callers group a batch by `(table, version)` and emit one
/// payload per group.
pub fn encode(
    format: WireFormat,
    schema: &TableSchema,
    changes: &[Change],
) -> Result<Vec<u8>, CodecError> {
    Encoder::new(format, schema)?.encode(changes)
}

/// An encoder prepared for one table schema: the column layout (and, for JSON, the header
/// line and the escaped column keys) is built once and reused for every payload — what a
/// destination that encodes one payload per change (Kafka) needs.
#[derive(Debug)]
pub struct Encoder<'a> {
    format: WireFormat,
    layout: Layout<'a>,
    json: Option<json::Prepared>,
}

impl<'a> Encoder<'a> {
    /// Prepares `format` for `schema`; fails when a column's type has no encoding in it.
    pub fn new(format: WireFormat, schema: &'a TableSchema) -> Result<Self, CodecError> {
        let prepare = || -> Res<(Layout<'a>, Option<json::Prepared>)> {
            let layout = Layout::new(schema)?;
            let json = match format {
                WireFormat::Json => Some(json::Prepared::new(&layout)?),
                _ => None,
            };
            Ok((layout, json))
        };
        let (layout, json) = prepare().map_err(|reason| error(format, "encode", schema, reason))?;
        Ok(Self {
            format,
            layout,
            json,
        })
    }

    /// Encodes `changes` (of this schema) as one self-describing payload.
    pub fn encode(&self, changes: &[Change]) -> Result<Vec<u8>, CodecError> {
        let layout = &self.layout;
        let result = match (self.format, &self.json) {
            (WireFormat::Json, Some(prepared)) => {
                let mut out = Vec::new();
                prepared
                    .encode_into(layout, changes, &mut out)
                    .map(|()| out)
            }
            (WireFormat::Json, None) => json::encode(layout, changes),
            (WireFormat::Arrow, _) => arrow::encode(layout, changes),
            (WireFormat::Parquet, _) => parquet::encode(layout, changes),
            (WireFormat::Avro, _) => avro::encode(layout, changes),
            (WireFormat::Proto, _) => proto::encode(layout, changes),
        };
        result.map_err(|reason| error(self.format, "encode", layout.schema, reason))
    }
}

/// Decodes a payload produced by [`encode`] back to its changes. The payload's embedded
/// schema (Arrow/Parquet schema metadata, Avro file metadata, Protobuf side table, JSON
/// header line) is checked against `schema` (table, version, column names, PostgreSQL type
/// names, type mappings); a mismatch is an error naming the first difference.
pub fn decode(
    format: WireFormat,
    schema: &TableSchema,
    payload: &[u8],
) -> Result<Vec<Change>, CodecError> {
    let layout = Layout::new(schema).map_err(|reason| error(format, "decode", schema, reason))?;
    let result = match format {
        WireFormat::Arrow => arrow::decode(&layout, payload),
        WireFormat::Parquet => parquet::decode(&layout, payload),
        WireFormat::Avro => avro::decode(&layout, payload),
        WireFormat::Proto => proto::decode(&layout, payload),
        WireFormat::Json => json::decode(&layout, payload),
    };
    result.map_err(|reason| error(format, "decode", schema, reason))
}

/// The schema a payload describes itself with (see `docs/wire-formats.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadSchema {
    /// Version of the record layout ([`LAYOUT_VERSION`] for payloads of this crate).
    pub layout_version: u32,
    /// Qualified table name, `schema.table`.
    pub table: String,
    /// `TableSchema.version` the payload was encoded with.
    pub schema_version: u32,
    /// Columns in table order.
    pub columns: Vec<PayloadColumn>,
}

/// A column as a payload describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadColumn {
    /// Column name.
    pub name: String,
    /// PostgreSQL type name (`int4`, `public.mood`).
    pub type_name: String,
    /// Type OID.
    pub oid: u32,
    /// Type modifier, -1 when none.
    pub typmod: i32,
    /// Part of the key.
    pub key: bool,
    /// `typeMappings` target the column was encoded with.
    pub mapped_type: Option<String>,
    /// Enum labels in sort order (empty for other types).
    pub enum_labels: Vec<String>,
}

/// Reads the schema a payload carries without knowing its table, so consumers can route
/// payloads and look the full schema up by `(table, schema_version)` before [`decode`].
pub fn payload_schema(format: WireFormat, payload: &[u8]) -> Result<PayloadSchema, CodecError> {
    let descriptor = match format {
        WireFormat::Arrow => arrow::descriptor(payload),
        WireFormat::Parquet => parquet::descriptor(payload),
        WireFormat::Avro => avro::descriptor(payload),
        WireFormat::Proto => proto::descriptor(payload),
        WireFormat::Json => json::descriptor(payload),
    };
    let table = |d: &serde_json::Value| {
        d.get("table")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("(unknown table)")
            .to_string()
    };
    let fail = |table: String, reason: String| CodecError::Format {
        format: format.as_str(),
        action: "decode",
        table,
        reason,
    };
    let descriptor = descriptor.map_err(|reason| fail("(unknown table)".into(), reason))?;
    parse_descriptor(&descriptor).map_err(|reason| fail(table(&descriptor), reason))
}

fn parse_descriptor(d: &serde_json::Value) -> Res<PayloadSchema> {
    use serde_json::Value as J;
    fn str_field(v: &J, k: &str) -> Res<String> {
        v.get(k)
            .and_then(J::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("schema descriptor lacks string {k:?}"))
    }
    fn int_field<T: TryFrom<i64>>(v: &J, k: &str) -> Res<T> {
        v.get(k)
            .and_then(J::as_i64)
            .and_then(|i| T::try_from(i).ok())
            .ok_or_else(|| format!("schema descriptor lacks integer {k:?}"))
    }
    let columns = d
        .get("columns")
        .and_then(J::as_array)
        .ok_or("schema descriptor lacks \"columns\"")?
        .iter()
        .map(|c| {
            Ok(PayloadColumn {
                name: str_field(c, "name")?,
                type_name: str_field(c, "type")?,
                oid: int_field(c, "oid")?,
                typmod: int_field(c, "typmod")?,
                key: c.get("key").and_then(J::as_bool).unwrap_or(false),
                mapped_type: c.get("mapped_type").and_then(J::as_str).map(str::to_string),
                enum_labels: c
                    .get("enum_labels")
                    .and_then(J::as_array)
                    .map(|labels| {
                        labels
                            .iter()
                            .filter_map(|l| l.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect::<Res<Vec<_>>>()?;
    Ok(PayloadSchema {
        layout_version: int_field(d, "layout_version")?,
        table: str_field(d, "table")?,
        schema_version: int_field(d, "schema_version")?,
        columns,
    })
}

fn error(
    format: WireFormat,
    action: &'static str,
    schema: &TableSchema,
    reason: String,
) -> CodecError {
    CodecError::Format {
        format: format.as_str(),
        action,
        table: schema.qualified_name(),
        reason,
    }
}

/// Internal result: the reason of a failure; the public functions add format and table.
pub(crate) type Res<T> = Result<T, String>;

// ---------------------------------------------------------------------------------------
// typeMappings vocabulary

/// A `typeMappings` target understood by the wire formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeMapping {
    /// `string` (alias `text`): the column travels as PostgreSQL's text output. Lossless.
    String,
    /// `float64` (alias `double`): numeric as a 64-bit float. Lossy.
    Float64,
    /// `decimal(p,s)` (alias `numeric(p,s)`): numeric as a fixed-point decimal, rounded half
    /// away from zero to `s` digits; NaN/±Infinity become NULL. Lossy.
    Decimal {
        /// Precision, 1..=38.
        precision: u8,
        /// Scale, 0..=precision.
        scale: i8,
    },
    /// `json`: json/jsonb as a JSON document (Arrow extension `arrow.json`, embedded JSON in
    /// the JSON format). Lossy for `json` (whitespace and key order are normalised).
    Json,
}

impl TypeMapping {
    /// Parses a target name, case-insensitively.
    pub fn parse(target: &str) -> Result<Self, CodecError> {
        let t = target.trim().to_ascii_lowercase();
        let bad = |reason: String| CodecError::TypeMapping {
            pg_type: String::new(),
            target: target.to_string(),
            reason,
        };
        match t.as_str() {
            "string" | "text" => return Ok(Self::String),
            "float64" | "double" => return Ok(Self::Float64),
            "json" => return Ok(Self::Json),
            _ => {}
        }
        let args = t
            .strip_prefix("decimal")
            .or_else(|| t.strip_prefix("numeric"))
            .map(str::trim)
            .and_then(|rest| rest.strip_prefix('('))
            .and_then(|rest| rest.strip_suffix(')'));
        let Some(args) = args else {
            return Err(bad(
                "unknown target; the wire formats understand string, float64, decimal(p,s) and json"
                    .into(),
            ));
        };
        let mut parts = args.split(',').map(str::trim);
        let precision = parts.next().and_then(|p| p.parse::<u8>().ok());
        let scale = parts.next().and_then(|s| s.parse::<i8>().ok());
        match (precision, scale, parts.next()) {
            (Some(p), Some(s), None) if (1..=38).contains(&p) && s >= 0 && s as u8 <= p => {
                Ok(Self::Decimal {
                    precision: p,
                    scale: s,
                })
            }
            _ => Err(bad(
                "decimal needs decimal(p,s) with 1 <= p <= 38 and 0 <= s <= p".into(),
            )),
        }
    }

    /// Whether the override may lose information (decode is then not exact).
    pub fn is_lossy(self) -> bool {
        !matches!(self, Self::String)
    }

    fn applies_to(self, kind: &TypeKind) -> bool {
        match self {
            Self::String => true,
            Self::Float64 | Self::Decimal { .. } => matches!(kind, TypeKind::Numeric),
            Self::Json => matches!(kind, TypeKind::Json | TypeKind::Jsonb),
        }
    }
}

/// Checks a `typeMappings` entry (`postgres type → destination type`) against the wire
/// formats' vocabulary, so configurations are validated once at the edge. `pg_type` is a
/// type name as in `pg_type.typname` (`numeric`, `jsonb`, `public.mood`). Built-in types are
/// checked here; user-defined names (domains, extension types) are accepted and checked
/// again by the encoders against the resolved type (a domain follows its base type).
pub fn check_type_mapping(pg_type: &str, target: &str) -> Result<(), CodecError> {
    let mapping = TypeMapping::parse(target).map_err(|e| with_pg_type(e, pg_type))?;
    let name = pg_type.trim().to_ascii_lowercase();
    let name = name.strip_prefix("pg_catalog.").unwrap_or(&name);
    let kind = match name {
        "numeric" | "decimal" => Some(TypeKind::Numeric),
        "json" => Some(TypeKind::Json),
        "jsonb" => Some(TypeKind::Jsonb),
        n if n.starts_with('_') || n.ends_with("[]") || BUILTIN_OTHER.contains(&n) => {
            Some(TypeKind::Unknown)
        }
        _ => None,
    };
    match kind {
        Some(kind) if !mapping.applies_to(&kind) => Err(CodecError::TypeMapping {
            pg_type: pg_type.to_string(),
            target: target.to_string(),
            reason: "float64 and decimal(p,s) apply to numeric, json to json/jsonb; string applies to any type".into(),
        }),
        _ => Ok(()),
    }
}

/// Built-in (and well-known extension) type names that are neither numeric nor json.
const BUILTIN_OTHER: &[&str] = &[
    "bool",
    "boolean",
    "int2",
    "smallint",
    "int4",
    "int",
    "integer",
    "int8",
    "bigint",
    "oid",
    "float4",
    "real",
    "float8",
    "double precision",
    "money",
    "text",
    "varchar",
    "character varying",
    "bpchar",
    "character",
    "char",
    "name",
    "citext",
    "bytea",
    "uuid",
    "xml",
    "date",
    "time",
    "timetz",
    "timestamp",
    "timestamptz",
    "interval",
    "inet",
    "cidr",
    "macaddr",
    "macaddr8",
    "bit",
    "varbit",
    "hstore",
    "ltree",
    "vector",
    "geometry",
    "geography",
    "point",
    "tsvector",
];

fn with_pg_type(e: CodecError, pg_type: &str) -> CodecError {
    match e {
        CodecError::TypeMapping { target, reason, .. } => CodecError::TypeMapping {
            pg_type: pg_type.to_string(),
            target,
            reason,
        },
        other => other,
    }
}

// ---------------------------------------------------------------------------------------
// The logical layout

/// Which [`Value`] variant a string-carried type decodes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StrKind {
    Text,
    Json,
    Xml,
    Bits,
    Enum,
    Ltree,
    Unknown,
}

impl StrKind {
    pub(crate) fn wrap(self, s: String) -> Value {
        match self {
            Self::Text => Value::Text(s),
            Self::Json => Value::Json(s),
            Self::Xml => Value::Xml(s),
            Self::Bits => Value::Bits(s),
            Self::Enum => Value::Enum(s),
            Self::Ltree => Value::Ltree(s),
            Self::Unknown => Value::Unknown(s),
        }
    }

    pub(crate) fn unwrap(self, v: &Value) -> Option<&str> {
        match (self, v) {
            (Self::Text, Value::Text(s))
            | (Self::Json, Value::Json(s))
            | (Self::Xml, Value::Xml(s))
            | (Self::Bits, Value::Bits(s))
            | (Self::Enum, Value::Enum(s))
            | (Self::Ltree, Value::Ltree(s))
            | (Self::Unknown, Value::Unknown(s)) => Some(s),
            _ => None,
        }
    }
}

/// Which [`Value`] variant a bytes-carried type decodes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinKind {
    Bytes,
    MacAddr,
    Ewkb,
}

impl BinKind {
    pub(crate) fn wrap(self, b: Vec<u8>) -> Value {
        match self {
            Self::Bytes => Value::Bytes(b),
            Self::MacAddr => Value::MacAddr(b),
            Self::Ewkb => Value::Ewkb(b),
        }
    }

    pub(crate) fn unwrap(self, v: &Value) -> Option<&[u8]> {
        match (self, v) {
            (Self::Bytes, Value::Bytes(b))
            | (Self::MacAddr, Value::MacAddr(b))
            | (Self::Ewkb, Value::Ewkb(b)) => Some(b),
            _ => None,
        }
    }
}

/// How a value travels: the PostgreSQL type with domains resolved and `typeMappings`
/// applied. Every format maps each variant to one typed representation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Wire {
    Bool,
    Int2,
    Int4,
    Int8,
    Oid,
    Float4,
    Float8,
    /// Exact decimal text.
    Numeric,
    Money,
    Str(StrKind),
    Bin(BinKind),
    Uuid,
    Date,
    Time,
    TimeTz,
    Timestamp,
    TimestampTz,
    Interval,
    Inet,
    Composite(Vec<(String, Wire)>),
    Range(Box<Wire>),
    Array(Box<Wire>),
    Hstore,
    Vector,
    /// `string` override: PostgreSQL's text output of the type.
    PgText(Arc<TypeInfo>),
    /// `float64` override of numeric.
    NumericF64,
    /// `decimal(p,s)` override of numeric.
    Decimal {
        precision: u8,
        scale: i8,
    },
    /// `json` override of json/jsonb.
    JsonDoc,
}

impl Wire {
    pub(crate) fn of_type(ty: &TypeInfo) -> Wire {
        match &ty.kind {
            TypeKind::Bool => Wire::Bool,
            TypeKind::Int2 => Wire::Int2,
            TypeKind::Int4 => Wire::Int4,
            TypeKind::Int8 => Wire::Int8,
            TypeKind::Oid => Wire::Oid,
            TypeKind::Float4 => Wire::Float4,
            TypeKind::Float8 => Wire::Float8,
            TypeKind::Numeric => Wire::Numeric,
            TypeKind::Money => Wire::Money,
            TypeKind::Text => Wire::Str(StrKind::Text),
            TypeKind::Bytea => Wire::Bin(BinKind::Bytes),
            TypeKind::Uuid => Wire::Uuid,
            TypeKind::Json | TypeKind::Jsonb => Wire::Str(StrKind::Json),
            TypeKind::Xml => Wire::Str(StrKind::Xml),
            TypeKind::Date => Wire::Date,
            TypeKind::Time => Wire::Time,
            TypeKind::TimeTz => Wire::TimeTz,
            TypeKind::Timestamp => Wire::Timestamp,
            TypeKind::TimestampTz => Wire::TimestampTz,
            TypeKind::Interval => Wire::Interval,
            TypeKind::Inet | TypeKind::Cidr => Wire::Inet,
            TypeKind::MacAddr | TypeKind::MacAddr8 => Wire::Bin(BinKind::MacAddr),
            TypeKind::Bit | TypeKind::VarBit => Wire::Str(StrKind::Bits),
            TypeKind::Enum(_) => Wire::Str(StrKind::Enum),
            TypeKind::Domain(base) => Wire::of_type(base),
            TypeKind::Composite(attrs) => Wire::Composite(
                attrs
                    .iter()
                    .map(|(name, ty)| (name.clone(), Wire::of_type(ty)))
                    .collect(),
            ),
            TypeKind::Range(elem) => Wire::Range(Box::new(Wire::of_type(elem))),
            TypeKind::Array(elem) => Wire::Array(Box::new(Wire::of_type(elem))),
            TypeKind::Hstore => Wire::Hstore,
            TypeKind::Ltree => Wire::Str(StrKind::Ltree),
            TypeKind::Vector => Wire::Vector,
            TypeKind::Geometry | TypeKind::Geography => Wire::Bin(BinKind::Ewkb),
            TypeKind::Unknown => Wire::Str(StrKind::Unknown),
        }
    }

    /// Short name for error messages.
    fn describe(&self) -> &'static str {
        match self {
            Wire::Bool => "bool",
            Wire::Int2 => "int2",
            Wire::Int4 => "int4",
            Wire::Int8 => "int8",
            Wire::Oid => "oid",
            Wire::Float4 => "float4",
            Wire::Float8 => "float8",
            Wire::Numeric => "numeric",
            Wire::Money => "money",
            Wire::Str(StrKind::Text) => "text",
            Wire::Str(StrKind::Json) => "json",
            Wire::Str(StrKind::Xml) => "xml",
            Wire::Str(StrKind::Bits) => "bit",
            Wire::Str(StrKind::Enum) => "enum",
            Wire::Str(StrKind::Ltree) => "ltree",
            Wire::Str(StrKind::Unknown) => "unknown-type (text)",
            Wire::Bin(BinKind::Bytes) => "bytea",
            Wire::Bin(BinKind::MacAddr) => "macaddr",
            Wire::Bin(BinKind::Ewkb) => "geometry (EWKB)",
            Wire::Uuid => "uuid",
            Wire::Date => "date",
            Wire::Time => "time",
            Wire::TimeTz => "timetz",
            Wire::Timestamp => "timestamp",
            Wire::TimestampTz => "timestamptz",
            Wire::Interval => "interval",
            Wire::Inet => "inet",
            Wire::Composite(_) => "composite",
            Wire::Range(_) => "range",
            Wire::Array(_) => "array",
            Wire::Hstore => "hstore",
            Wire::Vector => "vector",
            Wire::PgText(_) => "string-mapped",
            Wire::NumericF64 => "float64-mapped numeric",
            Wire::Decimal { .. } => "decimal-mapped numeric",
            Wire::JsonDoc => "json-mapped",
        }
    }

    fn of_column(col: &ColumnSchema) -> Res<Wire> {
        let Some(target) = &col.mapped_type else {
            return Ok(Wire::of_type(&col.ty));
        };
        let mapping = TypeMapping::parse(target)
            .map_err(|e| format!("column {:?}: {}", col.name, with_pg_type(e, &col.ty.name)))?;
        let base = base_type(&col.ty);
        if !mapping.applies_to(&base.kind) {
            return Err(format!(
                "column {:?}: typeMappings target {target:?} does not apply to type {}; float64 and decimal(p,s) apply to numeric, json to json/jsonb, string to any type",
                col.name, col.ty.name
            ));
        }
        Ok(match mapping {
            TypeMapping::String => Wire::PgText(col.ty.clone()),
            TypeMapping::Float64 => Wire::NumericF64,
            TypeMapping::Decimal { precision, scale } => Wire::Decimal { precision, scale },
            TypeMapping::Json => Wire::JsonDoc,
        })
    }
}

/// The type under any domains.
pub(crate) fn base_type(ty: &TypeInfo) -> &TypeInfo {
    match &ty.kind {
        TypeKind::Domain(base) => base_type(base),
        _ => ty,
    }
}

/// A table's columns with their wire representation, and its descriptor.
#[derive(Debug)]
pub(crate) struct Layout<'a> {
    pub(crate) schema: &'a TableSchema,
    pub(crate) wires: Vec<Wire>,
}

impl<'a> Layout<'a> {
    fn new(schema: &'a TableSchema) -> Res<Self> {
        let wires = schema
            .columns
            .iter()
            .map(Wire::of_column)
            .collect::<Res<Vec<_>>>()?;
        Ok(Self { schema, wires })
    }

    pub(crate) fn table(&self) -> String {
        self.schema.qualified_name()
    }

    /// The schema descriptor every payload embeds (JSON), see `docs/wire-formats.md`.
    pub(crate) fn descriptor(&self) -> serde_json::Value {
        let columns: Vec<serde_json::Value> = self
            .schema
            .columns
            .iter()
            .map(|c| {
                let mut col = serde_json::json!({
                    "name": c.name,
                    "type": c.ty.name,
                    "oid": c.ty.oid,
                    "typmod": c.ty.typmod,
                    "key": c.key,
                });
                if let Some(m) = &c.mapped_type {
                    col["mapped_type"] = m.clone().into();
                }
                if let TypeKind::Enum(labels) = &base_type(&c.ty).kind {
                    col["enum_labels"] = labels.clone().into();
                }
                col
            })
            .collect();
        serde_json::json!({
            "layout_version": LAYOUT_VERSION,
            "table": self.table(),
            "schema_version": self.schema.version,
            "columns": columns,
        })
    }

    /// Checks an embedded descriptor against the expected schema.
    pub(crate) fn check_descriptor(&self, embedded: &serde_json::Value) -> Res<()> {
        let field = |name: &str| embedded.get(name);
        let layout = field("layout_version").and_then(serde_json::Value::as_u64);
        if layout != Some(u64::from(LAYOUT_VERSION)) {
            return Err(format!(
                "payload layout version {layout:?} is not {LAYOUT_VERSION}; upgrade the consumer"
            ));
        }
        let table = field("table").and_then(serde_json::Value::as_str);
        if table != Some(self.table().as_str()) {
            return Err(format!(
                "payload is for table {table:?}, expected {:?}",
                self.table()
            ));
        }
        let version = field("schema_version").and_then(serde_json::Value::as_u64);
        if version != Some(u64::from(self.schema.version)) {
            return Err(format!(
                "payload has schema version {version:?}, expected {}; look the schema up by (table, version)",
                self.schema.version
            ));
        }
        let empty = Vec::new();
        let columns = field("columns")
            .and_then(serde_json::Value::as_array)
            .unwrap_or(&empty);
        if columns.len() != self.schema.columns.len() {
            return Err(format!(
                "payload has {} columns, schema version {} has {}",
                columns.len(),
                self.schema.version,
                self.schema.columns.len()
            ));
        }
        for (i, (got, want)) in columns.iter().zip(&self.schema.columns).enumerate() {
            let name = got.get("name").and_then(serde_json::Value::as_str);
            if name != Some(want.name.as_str()) {
                return Err(format!(
                    "column {i}: payload has {name:?}, expected {:?}",
                    want.name
                ));
            }
            let ty = got.get("type").and_then(serde_json::Value::as_str);
            if ty != Some(want.ty.name.as_str()) {
                return Err(format!(
                    "column {:?}: payload type {ty:?}, expected {:?}",
                    want.name, want.ty.name
                ));
            }
            let mapped = got.get("mapped_type").and_then(serde_json::Value::as_str);
            if mapped != want.mapped_type.as_deref() {
                return Err(format!(
                    "column {:?}: payload type mapping {mapped:?}, expected {:?}",
                    want.name, want.mapped_type
                ));
            }
        }
        Ok(())
    }

    pub(crate) fn absent_names(&self, row: &Row) -> Res<Vec<&'a str>> {
        row.absent
            .iter()
            .map(|&i| {
                self.schema
                    .columns
                    .get(i)
                    .map(|c| c.name.as_str())
                    .ok_or_else(|| {
                        format!(
                            "absent column index {i} is out of range ({} columns)",
                            self.schema.columns.len()
                        )
                    })
            })
            .collect()
    }

    pub(crate) fn absent_indexes<S: AsRef<str>>(&self, names: &[S]) -> Res<Vec<usize>> {
        names
            .iter()
            .map(|n| {
                let n = n.as_ref();
                self.schema
                    .columns
                    .iter()
                    .position(|c| c.name == n)
                    .ok_or_else(|| format!("absent column {n:?} is not a column of the table"))
            })
            .collect()
    }

    /// Checks a row has one value per column.
    pub(crate) fn check_row(&self, row: &Row, which: &str) -> Res<()> {
        if row.values.len() == self.schema.columns.len() {
            Ok(())
        } else {
            Err(format!(
                "{which} row has {} values, the table has {} columns",
                row.values.len(),
                self.schema.columns.len()
            ))
        }
    }
}

pub(crate) fn parse_op(s: &str) -> Res<Op> {
    match s {
        "insert" => Ok(Op::Insert),
        "update" => Ok(Op::Update),
        "delete" => Ok(Op::Delete),
        "truncate" => Ok(Op::Truncate),
        "read" => Ok(Op::Read),
        other => Err(format!(
            "unknown op {other:?}; expected insert, update, delete, truncate or read"
        )),
    }
}

/// Short description of a value's variant for error messages (never the value itself, which
/// may be large or sensitive).
pub(crate) fn variant_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "Null",
        Value::Bool(_) => "Bool",
        Value::Int2(_) => "Int2",
        Value::Int4(_) => "Int4",
        Value::Int8(_) => "Int8",
        Value::Oid(_) => "Oid",
        Value::Float4(_) => "Float4",
        Value::Float8(_) => "Float8",
        Value::Numeric(_) => "Numeric",
        Value::Money(_) => "Money",
        Value::Text(_) => "Text",
        Value::Bytes(_) => "Bytes",
        Value::Uuid(_) => "Uuid",
        Value::Json(_) => "Json",
        Value::Xml(_) => "Xml",
        Value::Date(_) => "Date",
        Value::Time(_) => "Time",
        Value::TimeTz { .. } => "TimeTz",
        Value::Timestamp(_) => "Timestamp",
        Value::TimestampTz(_) => "TimestampTz",
        Value::Interval { .. } => "Interval",
        Value::Inet { .. } => "Inet",
        Value::MacAddr(_) => "MacAddr",
        Value::Bits(_) => "Bits",
        Value::Enum(_) => "Enum",
        Value::Composite(_) => "Composite",
        Value::Range(_) => "Range",
        Value::Array { .. } => "Array",
        Value::Hstore(_) => "Hstore",
        Value::Ltree(_) => "Ltree",
        Value::Vector(_) => "Vector",
        Value::Ewkb(_) => "Ewkb",
        Value::Unknown(_) => "Unknown",
    }
}

pub(crate) fn mismatch(wire: &Wire, v: &Value) -> String {
    format!(
        "a {} value cannot be carried as {}",
        variant_name(v),
        wire.describe()
    )
}

// ---------------------------------------------------------------------------------------
// Overrides shared by the formats

/// `string` override: PostgreSQL's text of the value.
pub(crate) fn pg_text(ty: &TypeInfo, v: &Value) -> String {
    crate::text::render(ty, v)
}

/// `string` override, decode side.
pub(crate) fn from_pg_text(ty: &TypeInfo, s: &str) -> Res<Value> {
    crate::text::decode(ty, s).map_err(|e| e.to_string())
}

/// `float64` override: the numeric text as the nearest f64 (`NaN`, `Infinity` included).
pub(crate) fn numeric_to_f64(s: &str) -> Res<f64> {
    match s {
        "NaN" => Ok(f64::NAN),
        "Infinity" => Ok(f64::INFINITY),
        "-Infinity" => Ok(f64::NEG_INFINITY),
        _ => s
            .parse::<f64>()
            .map_err(|e| format!("numeric {s:?} is not a number: {e}")),
    }
}

/// `float64` override, decode side: the shortest text that reads back as the same f64.
pub(crate) fn f64_to_numeric(f: f64) -> Value {
    if f.is_nan() {
        Value::Numeric("NaN".into())
    } else if f == f64::INFINITY {
        Value::Numeric("Infinity".into())
    } else if f == f64::NEG_INFINITY {
        Value::Numeric("-Infinity".into())
    } else {
        Value::Numeric(format!("{f}"))
    }
}

/// `decimal(p,s)` override: the numeric as an unscaled i128 at `scale`, rounded half away
/// from zero; `None` for NaN/±Infinity (NULL on the wire). Errors when the value needs more
/// than `precision` digits.
pub(crate) fn numeric_to_decimal(s: &str, precision: u8, scale: i8) -> Res<Option<i128>> {
    if matches!(s, "NaN" | "Infinity" | "-Infinity") {
        return Ok(None);
    }
    let bad = || format!("numeric {s:?} is not a decimal number");
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    if int_part.is_empty() && frac_part.is_empty()
        || !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let scale = usize::try_from(scale).map_err(|_| bad())?;
    let limit = 10i128.pow(u32::from(precision));
    let overflow = || format!("numeric {s:?} does not fit decimal({precision},{scale})");
    let mut unscaled: i128 = 0;
    let frac: Vec<u8> = frac_part.bytes().collect();
    for b in int_part
        .bytes()
        .chain((0..scale).map(|i| frac.get(i).copied().unwrap_or(b'0')))
    {
        unscaled = unscaled
            .checked_mul(10)
            .and_then(|u| u.checked_add(i128::from(b - b'0')))
            .ok_or_else(overflow)?;
        if unscaled >= limit {
            return Err(overflow());
        }
    }
    if frac.get(scale).is_some_and(|&d| d >= b'5') {
        unscaled += 1;
        if unscaled >= limit {
            return Err(overflow());
        }
    }
    Ok(Some(if negative { -unscaled } else { unscaled }))
}

/// `decimal(p,s)` override, decode side: the canonical text with exactly `scale` digits.
pub(crate) fn decimal_to_numeric(unscaled: i128, scale: i8) -> Value {
    Value::Numeric(decimal_text(unscaled, scale))
}

/// An unscaled decimal as text with exactly `scale` fraction digits.
pub(crate) fn decimal_text(unscaled: i128, scale: i8) -> String {
    let scale = usize::try_from(scale).unwrap_or(0);
    let digits = unscaled.unsigned_abs().to_string();
    let sign = if unscaled < 0 { "-" } else { "" };
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{sign}{int}.{frac}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_rounding_and_range() {
        assert_eq!(numeric_to_decimal("12.345", 5, 2), Ok(Some(1235)));
        assert_eq!(numeric_to_decimal("-12.344", 5, 2), Ok(Some(-1234)));
        assert_eq!(numeric_to_decimal("7", 5, 2), Ok(Some(700)));
        assert_eq!(numeric_to_decimal(".5", 3, 1), Ok(Some(5)));
        assert_eq!(numeric_to_decimal("NaN", 5, 2), Ok(None));
        assert!(numeric_to_decimal("1000", 5, 2).is_err());
        assert!(numeric_to_decimal("1e5", 5, 2).is_err());
        assert_eq!(decimal_to_numeric(-5, 2), Value::Numeric("-0.05".into()));
        assert_eq!(decimal_to_numeric(1235, 2), Value::Numeric("12.35".into()));
        assert_eq!(decimal_to_numeric(7, 0), Value::Numeric("7".into()));
    }

    #[test]
    fn type_mapping_vocabulary() {
        assert!(check_type_mapping("numeric", "decimal(10, 2)").is_ok());
        assert!(check_type_mapping("numeric", "FLOAT64").is_ok());
        assert!(check_type_mapping("jsonb", "json").is_ok());
        assert!(check_type_mapping("public.geometry", "string").is_ok());
        // A user-defined name may be a domain over numeric: the encoder checks it.
        assert!(check_type_mapping("public.price", "float64").is_ok());
        assert!(check_type_mapping("_numeric", "float64").is_err());
        assert!(check_type_mapping("int4", "float64").is_err());
        assert!(check_type_mapping("text", "json").is_err());
        assert!(check_type_mapping("numeric", "decimal(40,2)").is_err());
        assert!(check_type_mapping("numeric", "decimal(4,5)").is_err());
        let err = check_type_mapping("jsonb", "VARIANT")
            .map(|()| "")
            .unwrap_err();
        assert!(err.to_string().contains("jsonb"), "{err}");
        assert!(err.to_string().contains("VARIANT"), "{err}");
    }
}
