//! Typed values and the change records the wire formats carry.

/// A typed PostgreSQL value. Every variant renders back to exactly PostgreSQL's text
/// output (see [`crate::text::render`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// `bool`.
    Bool(bool),
    /// `int2`.
    Int2(i16),
    /// `int4`.
    Int4(i32),
    /// `int8`.
    Int8(i64),
    /// `oid` and friends.
    Oid(u32),
    /// `float4` (NaN, ±Infinity included).
    Float4(f32),
    /// `float8` (NaN, ±Infinity included).
    Float8(f64),
    /// `numeric`: the canonical decimal text (`-12.340`, `NaN`, `Infinity`, `-Infinity`);
    /// arbitrary precision is why it is not a binary number.
    Numeric(String),
    /// `money` in minor units (cents); PostgreSQL's `lc_monetary` decides the text.
    Money(i64),
    /// Text-like types, enums' labels are [`Value::Enum`].
    Text(String),
    /// `bytea`.
    Bytes(Vec<u8>),
    /// `uuid`.
    Uuid([u8; 16]),
    /// `json` / `jsonb` text (json verbatim; jsonb as PostgreSQL normalises it).
    Json(String),
    /// `xml` text.
    Xml(String),
    /// `date`: days since 1970-01-01; `i32::MIN` / `i32::MAX` are -infinity / infinity.
    Date(i32),
    /// `time`: microseconds since midnight (24:00:00 allowed).
    Time(i64),
    /// `timetz`: microseconds since midnight and the zone offset in seconds east of UTC.
    TimeTz {
        /// Microseconds since midnight.
        micros: i64,
        /// Offset east of UTC, seconds.
        offset_seconds: i32,
    },
    /// `timestamp`: microseconds since 1970-01-01 00:00:00; `i64::MIN` / `i64::MAX` are
    /// -infinity / infinity.
    Timestamp(i64),
    /// `timestamptz`: microseconds since the Unix epoch in UTC; `i64::MIN` / `i64::MAX` are
    /// -infinity / infinity.
    TimestampTz(i64),
    /// `interval`: months, days and microseconds kept apart as PostgreSQL does.
    Interval {
        /// Months.
        months: i32,
        /// Days.
        days: i32,
        /// Microseconds.
        micros: i64,
    },
    /// `inet` / `cidr`: address bytes (4 or 16) and prefix length.
    Inet {
        /// 4 bytes for IPv4, 16 for IPv6.
        addr: Vec<u8>,
        /// Prefix length.
        prefix: u8,
    },
    /// `macaddr` (6 bytes) / `macaddr8` (8 bytes).
    MacAddr(Vec<u8>),
    /// `bit` / `varbit`: the bits as `'0'`/`'1'` characters.
    Bits(String),
    /// An enum label.
    Enum(String),
    /// A composite value, one field per attribute.
    Composite(Vec<Value>),
    /// A range value.
    Range(Box<RangeValue>),
    /// An array: dimensions (length, lower bound) and the elements in row-major order.
    Array {
        /// One `(length, lower bound)` per dimension; empty for an empty array.
        dims: Vec<(i32, i32)>,
        /// Elements, row-major; `Value::Null` for NULL elements.
        elements: Vec<Value>,
    },
    /// `hstore`: pairs in PostgreSQL's storage order; `None` is a NULL value.
    Hstore(Vec<(String, Option<String>)>),
    /// `ltree` text.
    Ltree(String),
    /// pgvector `vector`.
    Vector(Vec<f32>),
    /// PostGIS `geometry` / `geography` as EWKB.
    Ewkb(Vec<u8>),
    /// A type the codec does not know: PostgreSQL's text verbatim.
    Unknown(String),
}

/// A range value.
#[derive(Debug, Clone, PartialEq)]
pub enum RangeValue {
    /// `empty`.
    Empty,
    /// Bounds; `None` is unbounded.
    Bounds {
        /// Lower bound.
        lower: Option<Value>,
        /// Upper bound.
        upper: Option<Value>,
        /// `[` rather than `(`.
        lower_inclusive: bool,
        /// `]` rather than `)`.
        upper_inclusive: bool,
    },
}

/// Operation of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// INSERT.
    Insert,
    /// UPDATE.
    Update,
    /// DELETE.
    Delete,
    /// TRUNCATE.
    Truncate,
    /// A row read by the initial snapshot / backfill (Debezium's `r`): the row as it was
    /// at the snapshot, applied like an insert (an upsert where the key already exists).
    Read,
}

impl Op {
    /// Lower-case name used in every format.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Insert => "insert",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::Truncate => "truncate",
            Self::Read => "read",
        }
    }
}

/// Column values of one tuple, in table order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Row {
    /// One value per column of the schema. Columns PostgreSQL did not send (unchanged
    /// TOAST, or non-identity columns of an old key tuple) are `Value::Null` and listed in
    /// `absent`.
    pub values: Vec<Value>,
    /// Indexes of columns whose value was not sent: unchanged TOAST in `after`, non-key
    /// columns in a key-only `before`.
    pub absent: Vec<usize>,
}

/// One row change of one table, as every format carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Operation.
    pub op: Op,
    /// Commit LSN of the transaction.
    pub commit_lsn: u64,
    /// LSN of the change itself (0 when unknown); with `(table, key)` the idempotency key.
    pub lsn: u64,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_micros: i64,
    /// Transaction id.
    pub xid: u32,
    /// Old values (update/delete), when PostgreSQL sent them.
    pub before: Option<Row>,
    /// New values (insert/update).
    pub after: Option<Row>,
}

impl Change {
    /// A snapshot read of `row`: op `read`, commit and change LSN `lsn`, xid 0.
    pub fn read(lsn: u64, commit_time_micros: i64, row: Row) -> Self {
        Self {
            op: Op::Read,
            commit_lsn: lsn,
            lsn,
            commit_time_micros,
            xid: 0,
            before: None,
            after: Some(row),
        }
    }
}
