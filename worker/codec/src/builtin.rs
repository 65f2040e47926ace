//! PostgreSQL's built-in types by OID (scalars, ranges, arrays): what a column of a
//! built-in type is without asking the catalog.

use std::sync::Arc;

use crate::{TypeInfo, TypeKind};

/// Built-in scalar types: OID, `pg_type.typname`, kind.
const SCALARS: &[(u32, &str, TypeKind)] = &[
    (16, "bool", TypeKind::Bool),
    (17, "bytea", TypeKind::Bytea),
    (18, "char", TypeKind::Text),
    (19, "name", TypeKind::Text),
    (20, "int8", TypeKind::Int8),
    (21, "int2", TypeKind::Int2),
    (23, "int4", TypeKind::Int4),
    (25, "text", TypeKind::Text),
    (26, "oid", TypeKind::Oid),
    (28, "xid", TypeKind::Oid),
    (29, "cid", TypeKind::Oid),
    (114, "json", TypeKind::Json),
    (142, "xml", TypeKind::Xml),
    (650, "cidr", TypeKind::Cidr),
    (700, "float4", TypeKind::Float4),
    (701, "float8", TypeKind::Float8),
    (774, "macaddr8", TypeKind::MacAddr8),
    (790, "money", TypeKind::Money),
    (829, "macaddr", TypeKind::MacAddr),
    (869, "inet", TypeKind::Inet),
    (1042, "bpchar", TypeKind::Text),
    (1043, "varchar", TypeKind::Text),
    (1082, "date", TypeKind::Date),
    (1083, "time", TypeKind::Time),
    (1114, "timestamp", TypeKind::Timestamp),
    (1184, "timestamptz", TypeKind::TimestampTz),
    (1186, "interval", TypeKind::Interval),
    (1266, "timetz", TypeKind::TimeTz),
    (1560, "bit", TypeKind::Bit),
    (1562, "varbit", TypeKind::VarBit),
    (1700, "numeric", TypeKind::Numeric),
    (2950, "uuid", TypeKind::Uuid),
    (3802, "jsonb", TypeKind::Jsonb),
];

/// Built-in range types: OID, name, element OID.
const RANGES: &[(u32, &str, u32)] = &[
    (3904, "int4range", 23),
    (3926, "int8range", 20),
    (3906, "numrange", 1700),
    (3908, "tsrange", 1114),
    (3910, "tstzrange", 1184),
    (3912, "daterange", 1082),
];

/// Built-in array types: array OID, element OID.
const ARRAYS: &[(u32, u32)] = &[
    (1000, 16),
    (1001, 17),
    (1002, 18),
    (1003, 19),
    (1016, 20),
    (1005, 21),
    (1007, 23),
    (1009, 25),
    (1028, 26),
    (1011, 28),
    (1012, 29),
    (199, 114),
    (143, 142),
    (651, 650),
    (1021, 700),
    (1022, 701),
    (775, 774),
    (791, 790),
    (1040, 829),
    (1041, 869),
    (1014, 1042),
    (1015, 1043),
    (1182, 1082),
    (1183, 1083),
    (1115, 1114),
    (1185, 1184),
    (1187, 1186),
    (1270, 1266),
    (1561, 1560),
    (1563, 1562),
    (1231, 1700),
    (2951, 2950),
    (3807, 3802),
    (3905, 3904),
    (3927, 3926),
    (3907, 3906),
    (3909, 3908),
    (3911, 3910),
    (3913, 3912),
];

/// The built-in type of `oid`, with `typmod` (an array's typmod is its elements').
pub fn builtin_type(oid: u32, typmod: i32) -> Option<TypeInfo> {
    if let Some((_, name, kind)) = SCALARS.iter().find(|(o, _, _)| *o == oid) {
        return Some(TypeInfo {
            oid,
            name: (*name).to_owned(),
            typmod,
            kind: kind.clone(),
        });
    }
    if let Some((_, name, element)) = RANGES.iter().find(|(o, _, _)| *o == oid) {
        let element = builtin_type(*element, -1)?;
        return Some(TypeInfo {
            oid,
            name: (*name).to_owned(),
            typmod,
            kind: TypeKind::Range(Arc::new(element)),
        });
    }
    let (_, element) = ARRAYS.iter().find(|(o, _)| *o == oid)?;
    let element = builtin_type(*element, typmod)?;
    Some(TypeInfo {
        oid,
        name: format!("_{}", element.name),
        typmod,
        kind: TypeKind::Array(Arc::new(element)),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn builtin_arrays_and_ranges_nest() {
        let t = builtin_type(1231, 655_366).unwrap();
        assert_eq!(t.name, "_numeric");
        match &t.kind {
            TypeKind::Array(e) => {
                assert_eq!(e.kind, TypeKind::Numeric);
                assert_eq!(e.typmod, 655_366);
            }
            other => panic!("{other:?}"),
        }
        let r = builtin_type(3913, -1).unwrap();
        assert_eq!(r.name, "_daterange");
        assert!(
            matches!(&r.kind, TypeKind::Array(e) if matches!(&e.kind, TypeKind::Range(d) if d.kind == TypeKind::Date))
        );
        for (oid, _, _) in SCALARS {
            assert!(builtin_type(*oid, -1).is_some());
        }
        for (oid, _) in ARRAYS {
            assert!(builtin_type(*oid, -1).is_some(), "array {oid}");
        }
        assert!(builtin_type(16_385, -1).is_none());
    }
}
