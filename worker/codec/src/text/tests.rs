//! Table-driven round trips: every text below is what PostgreSQL 15 prints (checked with
//! psql under the worker's session settings); decode then render must give it back.

use std::sync::Arc;

use super::{decode, render};
use crate::schema::{TypeInfo, TypeKind};
use crate::value::{RangeValue, Value};

fn ty(name: &str, kind: TypeKind) -> TypeInfo {
    TypeInfo {
        oid: 0,
        name: name.into(),
        typmod: -1,
        kind,
    }
}

fn arr(element: TypeInfo) -> TypeInfo {
    ty(
        &format!("_{}", element.name),
        TypeKind::Array(Arc::new(element)),
    )
}

fn round_trip(t: &TypeInfo, texts: &[&str]) {
    for text in texts {
        let value = decode(t, text).unwrap_or_else(|e| panic!("{}: {e}", t.name));
        assert_eq!(render(t, &value), *text, "type {} value {value:?}", t.name);
    }
}

#[test]
fn scalars_round_trip() {
    use TypeKind::*;
    let cases: Vec<(TypeInfo, Vec<&str>)> = vec![
        (ty("bool", Bool), vec!["t", "f"]),
        (ty("int2", Int2), vec!["-32768", "32767", "0"]),
        (ty("int4", Int4), vec!["-2147483648", "2147483647"]),
        (
            ty("int8", Int8),
            vec!["-9223372036854775808", "9223372036854775807"],
        ),
        (ty("oid", Oid), vec!["4294967295", "0"]),
        (
            ty("float8", Float8),
            vec![
                "NaN",
                "Infinity",
                "-Infinity",
                "-0",
                "0",
                "1e-310",
                "1.7976931348623157e+308",
                "1e-05",
                "0.0001",
                "1e+15",
                "100000000000000",
                "0.1",
                "-1.5",
                "123.456",
            ],
        ),
        (
            ty("float4", Float4),
            vec![
                "NaN",
                "-Infinity",
                "3.4028235e+38",
                "1e+06",
                "100000",
                "0.1",
                "-0",
                "1e-45",
            ],
        ),
        (
            ty("numeric", Numeric),
            vec![
                "NaN",
                "Infinity",
                "-Infinity",
                "0",
                "-12.340",
                "123456789012345678901234567890.000000000000000000001",
            ],
        ),
        (
            ty("money", Money),
            vec![
                "$1,234.56",
                "-$1,234.56",
                "$0.01",
                "-$92,233,720,368,547,758.08",
                "$92,233,720,368,547,758.07",
                "$0.00",
                "$100.00",
            ],
        ),
        (ty("text", Text), vec!["", "a \"q\" \\ {x}, é ☃"]),
        (ty("bytea", Bytea), vec!["\\x", "\\x00ff10"]),
        (
            ty("uuid", Uuid),
            vec!["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"],
        ),
        (ty("json", Json), vec!["{\"a\" :  1}"]),
        (ty("xml", Xml), vec!["<a>x</a>"]),
        (
            ty("date", Date),
            vec![
                "2024-02-29",
                "0044-03-15 BC",
                "4713-01-01 BC",
                "5874897-12-31",
                "infinity",
                "-infinity",
                "0001-01-01",
                "0001-12-31 BC",
                "1970-01-01",
            ],
        ),
        (
            ty("time", Time),
            vec!["00:00:00", "24:00:00", "04:05:06.789", "23:59:59.999999"],
        ),
        (
            ty("timetz", TimeTz),
            vec![
                "12:00:00+05:30",
                "12:00:00-03:30:15",
                "00:00:00.5+00",
                "24:00:00-15:59",
            ],
        ),
        (
            ty("timestamp", Timestamp),
            vec![
                "2024-01-02 03:04:05.123456",
                "0044-03-15 12:00:00.5 BC",
                "4713-01-01 00:00:00 BC",
                "200000-01-01 00:00:00",
                "infinity",
                "-infinity",
                "1969-12-31 23:59:59.999999",
            ],
        ),
        (
            ty("timestamptz", TimestampTz),
            vec![
                "2024-01-02 03:04:05.123456+00",
                "0044-03-15 12:00:00.5+00 BC",
                "infinity",
                "-infinity",
            ],
        ),
        (
            ty("interval", Interval),
            vec![
                "00:00:00",
                "1 year 2 mons -3 days +04:05:06.789",
                "-3 days +04:00:00",
                "-1 years",
                "1 day",
                "1 mon",
                "-1 mons -00:00:00.000001",
                "178956970 years 7 mons 2147483647 days 2562047788:00:54.775807",
                "-178956970 years -8 mons -2147483648 days -2562047788:00:54.775808",
                "10 mons 3 days -04:05:06.789",
            ],
        ),
        (
            ty("inet", Inet),
            vec![
                "1.2.3.4",
                "1.2.3.4/24",
                "::1",
                "2001:db8::1/64",
                "::1.2.3.4",
                "::ffff:1.2.3.4",
                "fe80::1:0:0:2",
            ],
        ),
        (
            ty("cidr", Cidr),
            vec!["10.0.0.0/8", "::/0", "2001:db8::/32", "1.2.3.4/32"],
        ),
        (ty("macaddr", MacAddr), vec!["08:00:2b:01:02:03"]),
        (ty("macaddr8", MacAddr8), vec!["08:00:2b:01:02:03:04:05"]),
        (ty("bit", Bit), vec!["1010", ""]),
        (ty("varbit", VarBit), vec!["1"]),
        (
            ty("mood", Enum(vec!["sad".into(), "ok".into()])),
            vec!["ok"],
        ),
        (ty("ltree", Ltree), vec!["Top.Science.Astronomy"]),
        (
            ty("hstore", Hstore),
            vec![
                "",
                "\"a\"=>\"1\", \"b\"=>NULL",
                "\"q\\\"k\"=>\"back\\\\slash\"",
            ],
        ),
        (ty("vector", Vector), vec!["[1,2.5,3]", "[-0.1,1e+06]"]),
        (
            ty("geometry", Geometry),
            vec!["0101000020E6100000000000000000F03F0000000000000040"],
        ),
        (ty("mystery", Unknown), vec!["whatever (it) {is}"]),
    ];
    for (t, texts) in &cases {
        round_trip(t, texts);
    }
}

#[test]
fn decoded_values_are_the_right_numbers() {
    let d = |k: TypeKind, s: &str| decode(&ty("t", k), s).unwrap();
    assert_eq!(d(TypeKind::Date, "1970-01-02"), Value::Date(1));
    assert_eq!(d(TypeKind::Date, "0001-12-31 BC"), Value::Date(-719_163));
    assert_eq!(
        d(TypeKind::Timestamp, "1970-01-01 00:00:01.5"),
        Value::Timestamp(1_500_000)
    );
    assert_eq!(
        d(TypeKind::TimestampTz, "1970-01-01 05:30:00+05:30"),
        Value::TimestampTz(0)
    );
    assert_eq!(
        d(TypeKind::TimeTz, "12:00:00-03:30"),
        Value::TimeTz {
            micros: 43_200_000_000,
            offset_seconds: -12_600
        }
    );
    assert_eq!(
        d(TypeKind::Interval, "1 year 2 mons -3 days +04:05:06.789"),
        Value::Interval {
            months: 14,
            days: -3,
            micros: 14_706_789_000
        }
    );
    assert_eq!(d(TypeKind::Money, "-$1,234.56"), Value::Money(-123_456));
    assert!(matches!(d(TypeKind::Float8, "NaN"), Value::Float8(v) if v.is_nan()));
    assert!(
        matches!(d(TypeKind::Float8, "-0"), Value::Float8(v) if v == 0.0 && v.is_sign_negative())
    );
    assert_eq!(
        d(TypeKind::Inet, "::1"),
        Value::Inet {
            addr: [0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1].to_vec(),
            prefix: 128
        }
    );
}

#[test]
fn containers_round_trip() {
    use TypeKind::*;
    let int4 = ty("int4", Int4);
    let text = ty("text", Text);
    let pair = ty(
        "public.pair",
        Composite(vec![
            ("n".into(), Arc::new(int4.clone())),
            ("s".into(), Arc::new(text.clone())),
        ]),
    );
    round_trip(
        &pair,
        &["(1,abc)", "(,\"\")", "(,)", "(-5,\"x\"\"y\\\\z (a,b)\")"],
    );
    let int4range = ty("int4range", Range(Arc::new(int4.clone())));
    round_trip(&int4range, &["empty", "[1,5)", "(,5)", "[3,)", "(,)"]);
    let tstzrange = ty("tstzrange", Range(Arc::new(ty("timestamptz", TimestampTz))));
    round_trip(
        &tstzrange,
        &[
            "[\"2024-01-01 00:00:00+00\",\"2024-02-01 00:00:00+00\")",
            "(,infinity]",
        ],
    );
    round_trip(
        &arr(int4.clone()),
        &[
            "{}",
            "{1,2,NULL}",
            "{{1,2},{3,4}}",
            "[2:3]={1,2}",
            "[0:1][5:6]={{1,2},{3,4}}",
            "{{{1},{2}}}",
        ],
    );
    round_trip(
        &arr(text.clone()),
        &[
            "{\"\",NULL,\"NULL\",\"a,b\",\"x\\\"y\\\\z\",\" \",plain,é}",
            "{{a,b},{c,NULL}}",
        ],
    );
    round_trip(&arr(pair.clone()), &["{\"(1,\\\"a b\\\")\",NULL,\"(,)\"}"]);
    round_trip(&arr(int4range), &["{\"[1,2)\",empty}"]);
    let domain = ty("public.posint", Domain(Arc::new(int4.clone())));
    round_trip(&domain, &["42"]);
    round_trip(&arr(domain), &["{1,2}"]);
}

#[test]
fn decoded_containers_have_structure() {
    let int4 = Arc::new(ty("int4", TypeKind::Int4));
    let v = decode(&arr((*int4).clone()), "[2:3]={7,NULL}").unwrap();
    assert_eq!(
        v,
        Value::Array {
            dims: vec![(2, 2)],
            elements: vec![Value::Int4(7), Value::Null]
        }
    );
    let r = decode(&ty("int4range", TypeKind::Range(int4)), "(,5)").unwrap();
    assert_eq!(
        r,
        Value::Range(Box::new(RangeValue::Bounds {
            lower: None,
            upper: Some(Value::Int4(5)),
            lower_inclusive: false,
            upper_inclusive: false
        }))
    );
    assert_eq!(
        decode(&ty("hstore", TypeKind::Hstore), "\"a\"=>\"1\", \"b\"=>NULL").unwrap(),
        Value::Hstore(vec![("a".into(), Some("1".into())), ("b".into(), None)])
    );
}

#[test]
fn bad_text_is_an_error_naming_the_type() {
    let cases: Vec<(TypeKind, &str)> = vec![
        (TypeKind::Int4, "x"),
        (TypeKind::Bool, "yes"),
        (TypeKind::Numeric, "1e5"),
        (TypeKind::Date, "2024-13-01"),
        (TypeKind::Bytea, "abc"),
        (
            TypeKind::Array(Arc::new(ty("int4", TypeKind::Int4))),
            "{1,{2}}",
        ),
        (
            TypeKind::Array(Arc::new(ty("int4", TypeKind::Int4))),
            "{{1},2}",
        ),
        (
            TypeKind::Array(Arc::new(ty("int4", TypeKind::Int4))),
            "{{1},{2,3}}",
        ),
        (TypeKind::Timestamp, "294277-01-01 00:00:00"),
    ];
    for (kind, text) in cases {
        let e = decode(&ty("the_type", kind), text).expect_err(text);
        assert!(e.to_string().contains("the_type"), "{e}");
    }
}
