//! Relation schemas: a table's columns with their resolved PostgreSQL types. Schemas are
//! versioned: the version changes whenever the relation's columns or types change.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A PostgreSQL type, resolved through `pg_type` (or the built-in table when `resolveTypes`
/// is off).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypeInfo {
    /// Type OID.
    pub oid: u32,
    /// Schema-qualified name for non-`pg_catalog` types (`public.mood`), bare otherwise
    /// (`int4`, `_int4` for arrays as in `pg_type.typname`).
    pub name: String,
    /// Type modifier from the relation (`atttypmod`, -1 when none): numeric precision and
    /// scale, varchar length, timestamp precision, bit length.
    pub typmod: i32,
    /// What the type is.
    pub kind: TypeKind,
}

/// The kinds of types the codec understands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TypeKind {
    /// `bool`.
    Bool,
    /// `int2`.
    Int2,
    /// `int4`.
    Int4,
    /// `int8`.
    Int8,
    /// `oid` (and the other unsigned 32-bit identifier types: xid, cid, regclass …).
    Oid,
    /// `float4`.
    Float4,
    /// `float8`.
    Float8,
    /// `numeric`: arbitrary precision, NaN and ±Infinity.
    Numeric,
    /// `money`.
    Money,
    /// `text`, `varchar`, `bpchar`, `name`, `char`, `citext` and other text-like types.
    Text,
    /// `bytea`.
    Bytea,
    /// `uuid`.
    Uuid,
    /// `json` (text kept verbatim).
    Json,
    /// `jsonb`.
    Jsonb,
    /// `xml`.
    Xml,
    /// `date` (±infinity included).
    Date,
    /// `time`.
    Time,
    /// `timetz`.
    TimeTz,
    /// `timestamp` (±infinity included).
    Timestamp,
    /// `timestamptz` (±infinity included).
    TimestampTz,
    /// `interval`.
    Interval,
    /// `inet`.
    Inet,
    /// `cidr`.
    Cidr,
    /// `macaddr`.
    MacAddr,
    /// `macaddr8`.
    MacAddr8,
    /// `bit(n)`.
    Bit,
    /// `varbit`.
    VarBit,
    /// An enum type with its labels in sort order.
    Enum(Vec<String>),
    /// A domain over a base type.
    Domain(Arc<TypeInfo>),
    /// A composite type with its attributes in order.
    Composite(Vec<(String, Arc<TypeInfo>)>),
    /// A range over an element type.
    Range(Arc<TypeInfo>),
    /// An array of an element type (any number of dimensions).
    Array(Arc<TypeInfo>),
    /// `hstore` (extension).
    Hstore,
    /// `ltree` (extension).
    Ltree,
    /// pgvector `vector` (extension).
    Vector,
    /// PostGIS `geometry` (extension), carried as EWKB.
    Geometry,
    /// PostGIS `geography` (extension), carried as EWKB.
    Geography,
    /// Any other type: kept as PostgreSQL's text.
    Unknown,
}

/// A column of a table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnSchema {
    /// Column name.
    pub name: String,
    /// Resolved type.
    pub ty: Arc<TypeInfo>,
    /// Part of the key (primary key, or replica identity when there is none).
    pub key: bool,
    /// Destination type override from the destination's `typeMappings`
    /// (`postgres type → destination type`), applied by the encoders that have a choice.
    pub mapped_type: Option<String>,
}

/// A table as the destinations see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableSchema {
    /// Schema (namespace) name.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// Columns in table order.
    pub columns: Vec<ColumnSchema>,
    /// Version: starts at 1 and increases each time the relation's shape changes during
    /// the life of the worker.
    pub version: u32,
}

impl TableSchema {
    /// `schema.table`.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// A column of a built-in type for tests (`id` is the key).
#[cfg(test)]
pub(crate) fn test_column(
    name: &str,
    oid: u32,
    ty: &str,
    kind: TypeKind,
    mapped: Option<&str>,
) -> ColumnSchema {
    ColumnSchema {
        name: name.into(),
        ty: Arc::new(TypeInfo {
            oid,
            name: ty.into(),
            typmod: -1,
            kind,
        }),
        key: name == "id",
        mapped_type: mapped.map(str::to_owned),
    }
}
