//! Round trips of every `Value` variant through every wire format, schema checks, batch
//! shapes and `typeMappings` overrides. Pure: no PostgreSQL needed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use wallaby_codec::value::RangeValue;
use wallaby_codec::{
    Change, ColumnSchema, Op, Row, TableSchema, TypeInfo, TypeKind, Value, WireFormat, decode,
    encode,
};

fn ty(name: &str, oid: u32, kind: TypeKind) -> Arc<TypeInfo> {
    Arc::new(TypeInfo {
        oid,
        name: name.into(),
        typmod: -1,
        kind,
    })
}

fn array_of(elem: &Arc<TypeInfo>, oid: u32) -> Arc<TypeInfo> {
    ty(
        &format!("_{}", elem.name),
        oid,
        TypeKind::Array(elem.clone()),
    )
}

fn arr(dims: &[(i32, i32)], elements: Vec<Value>) -> Value {
    Value::Array {
        dims: dims.to_vec(),
        elements,
    }
}

fn range(lower: Option<Value>, upper: Option<Value>, li: bool, ui: bool) -> Value {
    Value::Range(Box::new(RangeValue::Bounds {
        lower,
        upper,
        lower_inclusive: li,
        upper_inclusive: ui,
    }))
}

fn empty_range() -> Value {
    Value::Range(Box::new(RangeValue::Empty))
}

/// (column name, type, values): every value must survive every format exactly.
fn cases() -> Vec<(&'static str, Arc<TypeInfo>, Vec<Value>)> {
    let int4 = ty("int4", 23, TypeKind::Int4);
    let text = ty("text", 25, TypeKind::Text);
    let float8 = ty("float8", 701, TypeKind::Float8);
    let tstz = ty("timestamptz", 1184, TypeKind::TimestampTz);
    let date = ty("date", 1082, TypeKind::Date);
    let mood = ty(
        "public.mood",
        16_400,
        TypeKind::Enum(vec!["sad".into(), "ok".into(), "happy face".into()]),
    );
    let inner = ty(
        "public.inner_t",
        16_410,
        TypeKind::Composite(vec![
            ("x".into(), float8.clone()),
            ("ys".into(), array_of(&int4, 1007)),
        ]),
    );
    let outer = ty(
        "public.outer_t",
        16_420,
        TypeKind::Composite(vec![
            ("a".into(), int4.clone()),
            ("b".into(), text.clone()),
            ("inner".into(), inner.clone()),
        ]),
    );
    let posint = ty("public.posint", 16_430, TypeKind::Domain(int4.clone()));
    let int4range = ty("int4range", 3904, TypeKind::Range(int4.clone()));
    let tstzrange = ty("tstzrange", 3910, TypeKind::Range(tstz.clone()));
    let daterange = ty("daterange", 3912, TypeKind::Range(date.clone()));
    let numeric = ty("numeric", 1700, TypeKind::Numeric);
    let numrange = ty("numrange", 3906, TypeKind::Range(numeric.clone()));
    let composite_value = |a: Value, b: Value, x: Value, ys: Value| {
        Value::Composite(vec![a, b, Value::Composite(vec![x, ys])])
    };
    vec![
        (
            "c_bool",
            ty("bool", 16, TypeKind::Bool),
            vec![Value::Bool(true), Value::Bool(false)],
        ),
        (
            "c_int2",
            ty("int2", 21, TypeKind::Int2),
            vec![Value::Int2(i16::MIN), Value::Int2(i16::MAX), Value::Int2(0)],
        ),
        (
            "c_int4",
            int4.clone(),
            vec![
                Value::Int4(i32::MIN),
                Value::Int4(i32::MAX),
                Value::Int4(-1),
            ],
        ),
        (
            "c_int8",
            ty("int8", 20, TypeKind::Int8),
            vec![Value::Int8(i64::MIN), Value::Int8(i64::MAX), Value::Int8(7)],
        ),
        (
            "c_oid",
            ty("oid", 26, TypeKind::Oid),
            vec![Value::Oid(0), Value::Oid(u32::MAX)],
        ),
        (
            "c_float4",
            ty("float4", 700, TypeKind::Float4),
            vec![
                Value::Float4(f32::NAN),
                Value::Float4(-0.0),
                Value::Float4(f32::INFINITY),
                Value::Float4(f32::NEG_INFINITY),
                Value::Float4(0.1),
                Value::Float4(f32::MAX),
                Value::Float4(f32::MIN_POSITIVE / 4.0),
            ],
        ),
        (
            "c_float8",
            float8.clone(),
            vec![
                Value::Float8(f64::NAN),
                Value::Float8(-0.0),
                Value::Float8(f64::INFINITY),
                Value::Float8(f64::NEG_INFINITY),
                Value::Float8(0.1),
                Value::Float8(5e-324),
                Value::Float8(f64::MAX),
            ],
        ),
        (
            "c_numeric",
            numeric.clone(),
            vec![
                Value::Numeric("-12.340".into()),
                Value::Numeric("NaN".into()),
                Value::Numeric("Infinity".into()),
                Value::Numeric("-Infinity".into()),
                Value::Numeric("123456789012345678901234567890.0000000000123456789".into()),
            ],
        ),
        (
            "c_money",
            ty("money", 790, TypeKind::Money),
            vec![
                Value::Money(i64::MIN),
                Value::Money(i64::MAX),
                Value::Money(-1234),
            ],
        ),
        (
            "c_text",
            text.clone(),
            vec![
                Value::Text(String::new()),
                Value::Text("héllo \"quoted\"\n\t\\ 🦘".into()),
            ],
        ),
        (
            "c_varchar",
            ty("varchar", 1043, TypeKind::Text),
            vec![Value::Text("abc".into())],
        ),
        (
            "c_bytea",
            ty("bytea", 17, TypeKind::Bytea),
            vec![Value::Bytes(Vec::new()), Value::Bytes(vec![0, 255, 1, 128])],
        ),
        (
            "c_uuid",
            ty("uuid", 2950, TypeKind::Uuid),
            vec![Value::Uuid([
                0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
                0x0a, 0x11,
            ])],
        ),
        (
            "c_json",
            ty("json", 114, TypeKind::Json),
            vec![Value::Json("{\"b\": 1,   \"a\": [1, 2], \"a\": 3}".into())],
        ),
        (
            "c_jsonb",
            ty("jsonb", 3802, TypeKind::Jsonb),
            vec![Value::Json("{\"a\": 1, \"bb\": null}".into())],
        ),
        (
            "c_xml",
            ty("xml", 142, TypeKind::Xml),
            vec![Value::Xml("<a b=\"1\">x</a>".into())],
        ),
        (
            "c_date",
            date.clone(),
            vec![
                Value::Date(i32::MIN),
                Value::Date(i32::MAX),
                Value::Date(0),
                Value::Date(-2_451_545),
                Value::Date(2_000_000),
            ],
        ),
        (
            "c_time",
            ty("time", 1083, TypeKind::Time),
            vec![
                Value::Time(0),
                Value::Time(86_400_000_000),
                Value::Time(45_296_789_012),
            ],
        ),
        (
            "c_timetz",
            ty("timetz", 1266, TypeKind::TimeTz),
            vec![
                Value::TimeTz {
                    micros: 1,
                    offset_seconds: -(5 * 3600 + 30 * 60 + 7),
                },
                Value::TimeTz {
                    micros: 86_400_000_000,
                    offset_seconds: 14 * 3600,
                },
                Value::TimeTz {
                    micros: 0,
                    offset_seconds: 0,
                },
            ],
        ),
        (
            "c_timestamp",
            ty("timestamp", 1114, TypeKind::Timestamp),
            vec![
                Value::Timestamp(i64::MIN),
                Value::Timestamp(i64::MAX),
                Value::Timestamp(0),
                Value::Timestamp(-1),
                Value::Timestamp(-211_813_488_000_000_000),
                Value::Timestamp(9_224_318_015_999_999),
            ],
        ),
        (
            "c_timestamptz",
            tstz.clone(),
            vec![
                Value::TimestampTz(i64::MIN),
                Value::TimestampTz(i64::MAX),
                Value::TimestampTz(1_700_000_000_123_456),
            ],
        ),
        (
            "c_interval",
            ty("interval", 1186, TypeKind::Interval),
            vec![
                Value::Interval {
                    months: -14,
                    days: 3,
                    micros: i64::MAX,
                },
                Value::Interval {
                    months: i32::MIN,
                    days: i32::MAX,
                    micros: i64::MIN,
                },
                Value::Interval {
                    months: 0,
                    days: 0,
                    micros: 0,
                },
            ],
        ),
        (
            "c_inet",
            ty("inet", 869, TypeKind::Inet),
            vec![
                Value::Inet {
                    addr: vec![192, 168, 0, 1],
                    prefix: 24,
                },
                Value::Inet {
                    addr: vec![0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                    prefix: 128,
                },
            ],
        ),
        (
            "c_cidr",
            ty("cidr", 650, TypeKind::Cidr),
            vec![Value::Inet {
                addr: vec![10, 0, 0, 0],
                prefix: 8,
            }],
        ),
        (
            "c_macaddr",
            ty("macaddr", 829, TypeKind::MacAddr),
            vec![Value::MacAddr(vec![8, 0, 0x2b, 1, 2, 3])],
        ),
        (
            "c_macaddr8",
            ty("macaddr8", 774, TypeKind::MacAddr8),
            vec![Value::MacAddr(vec![8, 0, 0x2b, 1, 2, 3, 4, 5])],
        ),
        (
            "c_bit",
            ty("bit", 1560, TypeKind::Bit),
            vec![Value::Bits("10101".into())],
        ),
        (
            "c_varbit",
            ty("varbit", 1562, TypeKind::VarBit),
            vec![Value::Bits(String::new()), Value::Bits("1".into())],
        ),
        (
            "c_enum",
            mood.clone(),
            vec![Value::Enum("happy face".into()), Value::Enum("sad".into())],
        ),
        ("c_domain", posint.clone(), vec![Value::Int4(5)]),
        (
            "c_composite",
            outer.clone(),
            vec![
                composite_value(
                    Value::Int4(1),
                    Value::Null,
                    Value::Float8(f64::NAN),
                    arr(&[(2, 1)], vec![Value::Int4(1), Value::Null]),
                ),
                Value::Composite(vec![Value::Null, Value::Null, Value::Null]),
                composite_value(
                    Value::Null,
                    Value::Text("t".into()),
                    Value::Null,
                    arr(&[], vec![]),
                ),
            ],
        ),
        (
            "c_int4range",
            int4range.clone(),
            vec![
                empty_range(),
                range(Some(Value::Int4(1)), None, true, false),
                range(None, None, false, false),
                range(Some(Value::Int4(-5)), Some(Value::Int4(10)), true, true),
            ],
        ),
        (
            "c_tstzrange",
            tstzrange,
            vec![range(
                Some(Value::TimestampTz(i64::MIN)),
                Some(Value::TimestampTz(0)),
                false,
                true,
            )],
        ),
        (
            "c_daterange",
            daterange.clone(),
            vec![range(
                Some(Value::Date(0)),
                Some(Value::Date(i32::MAX)),
                true,
                false,
            )],
        ),
        (
            "c_numrange",
            numrange,
            vec![range(
                Some(Value::Numeric("1.50".into())),
                None,
                true,
                false,
            )],
        ),
        (
            "c_int4_array",
            array_of(&int4, 1007),
            vec![
                arr(&[], vec![]),
                arr(&[(3, 1)], vec![Value::Int4(1), Value::Null, Value::Int4(3)]),
                arr(
                    &[(2, 1), (3, 0)],
                    (0..6).map(Value::Int4).collect::<Vec<_>>(),
                ),
                arr(&[(1, -5)], vec![Value::Null]),
            ],
        ),
        (
            "c_text_array",
            array_of(&text, 1009),
            vec![arr(
                &[(2, 1)],
                vec![Value::Text("NULL".into()), Value::Null],
            )],
        ),
        (
            "c_float8_array",
            array_of(&float8, 1022),
            vec![arr(
                &[(3, 1)],
                vec![
                    Value::Float8(f64::NAN),
                    Value::Float8(-0.0),
                    Value::Float8(f64::NEG_INFINITY),
                ],
            )],
        ),
        (
            "c_composite_array",
            array_of(&inner, 16_411),
            vec![arr(
                &[(2, 1)],
                vec![
                    Value::Composite(vec![
                        Value::Float8(1.5),
                        arr(&[(1, 1)], vec![Value::Int4(9)]),
                    ]),
                    Value::Null,
                ],
            )],
        ),
        (
            "c_enum_array",
            array_of(&mood, 16_401),
            vec![arr(&[(1, 1)], vec![Value::Enum("ok".into())])],
        ),
        (
            "c_range_array",
            array_of(&int4range, 3905),
            vec![arr(
                &[(2, 1)],
                vec![
                    empty_range(),
                    range(None, Some(Value::Int4(3)), false, false),
                ],
            )],
        ),
        (
            "c_domain_array",
            array_of(&posint, 16_431),
            vec![arr(&[(1, 1)], vec![Value::Int4(42)])],
        ),
        (
            "c_hstore",
            ty("public.hstore", 16_500, TypeKind::Hstore),
            vec![
                Value::Hstore(vec![
                    ("b".into(), Some("1".into())),
                    ("a".into(), None),
                    ("".into(), Some(String::new())),
                ]),
                Value::Hstore(Vec::new()),
            ],
        ),
        (
            "c_ltree",
            ty("public.ltree", 16_510, TypeKind::Ltree),
            vec![Value::Ltree("top.science.astronomy".into())],
        ),
        (
            "c_vector",
            ty("public.vector", 16_520, TypeKind::Vector),
            vec![
                Value::Vector(vec![1.0, -0.0, 3.5, f32::MAX]),
                Value::Vector(Vec::new()),
            ],
        ),
        (
            "c_geometry",
            ty("public.geometry", 16_530, TypeKind::Geometry),
            vec![Value::Ewkb(vec![
                1, 1, 0, 0, 32, 230, 16, 0, 0, 0, 0, 0, 0, 0, 0, 240, 63, 0, 0, 0, 0, 0, 0, 0, 64,
            ])],
        ),
        (
            "c_geography",
            ty("public.geography", 16_540, TypeKind::Geography),
            vec![Value::Ewkb(vec![1, 2, 3])],
        ),
        (
            "c_unknown",
            ty("point", 600, TypeKind::Unknown),
            vec![Value::Unknown("(1,2)".into())],
        ),
    ]
}

fn column(name: &str, ty: Arc<TypeInfo>, key: bool) -> ColumnSchema {
    ColumnSchema {
        name: name.into(),
        ty,
        key,
        mapped_type: None,
    }
}

fn table(columns: Vec<ColumnSchema>) -> TableSchema {
    TableSchema {
        schema: "public".into(),
        table: "items".into(),
        columns,
        version: 3,
    }
}

fn change(op: Op, n: u64, before: Option<Row>, after: Option<Row>) -> Change {
    Change {
        op,
        commit_lsn: 0x16B_3748 + n,
        lsn: 0x16B_3700 + n,
        commit_time_micros: 1_700_000_000_000_000 + i64::try_from(n).unwrap(),
        xid: 700 + u32::try_from(n).unwrap(),
        before,
        after,
    }
}

fn row(values: Vec<Value>) -> Row {
    Row {
        values,
        absent: Vec::new(),
    }
}

/// Debug text compares floats NaN-aware (`NaN == NaN`) and sign-aware (`-0.0 != 0.0`).
fn same(a: &impl std::fmt::Debug, b: &impl std::fmt::Debug) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

fn assert_round_trip(format: WireFormat, schema: &TableSchema, changes: &[Change]) {
    let payload = encode(format, schema, changes)
        .unwrap_or_else(|e| panic!("{}: encode: {e}", format.as_str()));
    let back = decode(format, schema, &payload)
        .unwrap_or_else(|e| panic!("{}: decode: {e}", format.as_str()));
    assert_eq!(
        back.len(),
        changes.len(),
        "{}: change count",
        format.as_str()
    );
    for (i, (got, want)) in back.iter().zip(changes).enumerate() {
        for (side, g, w) in [
            ("before", &got.before, &want.before),
            ("after", &got.after, &want.after),
        ] {
            if let (Some(g), Some(w)) = (g, w) {
                for (c, (gv, wv)) in g.values.iter().zip(&w.values).enumerate() {
                    assert!(
                        same(gv, wv),
                        "{}: change {i} {side} column {} ({}): got {gv:?}, want {wv:?}",
                        format.as_str(),
                        schema.columns[c].name,
                        schema.columns[c].ty.name,
                    );
                }
            }
        }
        assert!(
            same(got, want),
            "{}: change {i}: got {got:?}, want {want:?}",
            format.as_str()
        );
    }
}

#[test]
fn every_value_survives_every_format_one_type_per_table() {
    for (name, ty, values) in cases() {
        let schema = table(vec![
            column("id", ty_int4(), true),
            column(name, ty.clone(), false),
        ]);
        let mut changes: Vec<Change> = values
            .iter()
            .chain([&Value::Null])
            .enumerate()
            .map(|(i, v)| {
                let id = Value::Int4(i32::try_from(i).unwrap());
                change(Op::Insert, i as u64, None, Some(row(vec![id, v.clone()])))
            })
            .collect();
        // An update carrying the full old row, and a delete of it.
        let first = row(vec![Value::Int4(0), values[0].clone()]);
        let last = row(vec![Value::Int4(0), values[values.len() - 1].clone()]);
        changes.push(change(Op::Update, 100, Some(first.clone()), Some(last)));
        changes.push(change(Op::Delete, 101, Some(first), None));
        for format in WireFormat::ALL {
            assert_round_trip(format, &schema, &changes);
        }
    }
}

fn ty_int4() -> Arc<TypeInfo> {
    ty("int4", 23, TypeKind::Int4)
}

#[test]
fn every_value_survives_every_format_in_one_wide_table() {
    let cases = cases();
    let mut columns = vec![column("id", ty_int4(), true)];
    columns.extend(
        cases
            .iter()
            .map(|(name, ty, _)| column(name, ty.clone(), false)),
    );
    let schema = table(columns);
    let rows = cases.iter().map(|(_, _, v)| v.len()).max().unwrap() + 1;
    let changes: Vec<Change> = (0..rows)
        .map(|r| {
            let mut values = vec![Value::Int4(i32::try_from(r).unwrap())];
            // Row r takes each column's r-th value; past the end, NULL.
            values.extend(
                cases
                    .iter()
                    .map(|(_, _, v)| v.get(r).cloned().unwrap_or(Value::Null)),
            );
            change(Op::Insert, r as u64, None, Some(row(values)))
        })
        .collect();
    for format in WireFormat::ALL {
        assert_round_trip(format, &schema, &changes);
    }
}

fn small_schema() -> TableSchema {
    table(vec![
        column("id", ty_int4(), true),
        column("name", ty("text", 25, TypeKind::Text), false),
        column("doc", ty("jsonb", 3802, TypeKind::Jsonb), false),
    ])
}

#[test]
fn mixed_ops_absent_columns_and_truncate_survive_every_format() {
    let schema = small_schema();
    let full = |id: i32, name: &str| {
        row(vec![
            Value::Int4(id),
            Value::Text(name.into()),
            Value::Json("{\"k\": 1}".into()),
        ])
    };
    let key_only = Row {
        values: vec![Value::Int4(1), Value::Null, Value::Null],
        absent: vec![1, 2],
    };
    let toasted = Row {
        values: vec![Value::Int4(1), Value::Text("renamed".into()), Value::Null],
        absent: vec![2],
    };
    let changes = vec![
        change(Op::Insert, 1, None, Some(full(1, "first"))),
        change(Op::Insert, 2, None, Some(full(2, "second"))),
        change(Op::Update, 3, Some(key_only.clone()), Some(toasted)),
        change(Op::Update, 4, None, Some(full(2, "no old row"))),
        change(Op::Delete, 5, Some(key_only), None),
        change(Op::Truncate, 6, None, None),
    ];
    for format in WireFormat::ALL {
        assert_round_trip(format, &schema, &changes);
    }
}

#[test]
fn empty_batches_survive_every_format() {
    for format in WireFormat::ALL {
        assert_round_trip(format, &small_schema(), &[]);
    }
}

#[test]
fn decode_rejects_a_payload_of_another_schema() {
    let schema = small_schema();
    let changes = vec![change(
        Op::Insert,
        1,
        None,
        Some(row(vec![Value::Int4(1), Value::Null, Value::Null])),
    )];
    for format in WireFormat::ALL {
        let payload = encode(format, &schema, &changes).unwrap();
        let mut newer = schema.clone();
        newer.version = 4;
        let mut retyped = schema.clone();
        retyped.columns[1].ty = ty("varchar", 1043, TypeKind::Text);
        let mut renamed = schema.clone();
        renamed.columns[1].name = "title".into();
        let mut other = schema.clone();
        other.table = "orders".into();
        let mut wider = schema.clone();
        wider.columns.push(column("extra", ty_int4(), false));
        for (expected, wrong) in [
            ("schema version", &newer),
            ("varchar", &retyped),
            ("title", &renamed),
            ("orders", &other),
            ("columns", &wider),
        ] {
            let err = decode(format, wrong, &payload)
                .map(|_| ())
                .expect_err(&format!(
                    "{} accepted a mismatching schema",
                    format.as_str()
                ));
            let text = err.to_string();
            assert!(
                text.contains(expected) && text.contains(format.as_str()),
                "{}: error {text:?} does not mention {expected:?}",
                format.as_str()
            );
        }
    }
}

#[test]
fn encode_rejects_values_that_do_not_fit_their_column() {
    let schema = small_schema();
    let bad = vec![change(
        Op::Insert,
        1,
        None,
        Some(row(vec![Value::Text("1".into()), Value::Null, Value::Null])),
    )];
    let short = vec![change(Op::Insert, 1, None, Some(row(vec![Value::Int4(1)])))];
    for format in WireFormat::ALL {
        let err = encode(format, &schema, &bad).map(|_| ()).unwrap_err();
        assert!(
            err.to_string().contains("\"id\""),
            "{}: {err}",
            format.as_str()
        );
        let err = encode(format, &schema, &short).map(|_| ()).unwrap_err();
        assert!(
            err.to_string().contains("3 columns"),
            "{}: {err}",
            format.as_str()
        );
    }
}

fn mapped(name: &str, ty: Arc<TypeInfo>, target: &str) -> ColumnSchema {
    ColumnSchema {
        mapped_type: Some(target.into()),
        ..column(name, ty, false)
    }
}

fn decoded_after(format: WireFormat, schema: &TableSchema, values: Vec<Value>) -> Vec<Value> {
    let changes = vec![change(Op::Insert, 1, None, Some(row(values)))];
    let payload = encode(format, schema, &changes)
        .unwrap_or_else(|e| panic!("{}: encode: {e}", format.as_str()));
    let back = decode(format, schema, &payload)
        .unwrap_or_else(|e| panic!("{}: decode: {e}", format.as_str()));
    back[0].after.clone().unwrap().values
}

#[test]
fn float64_mapping_carries_numeric_as_a_double() {
    let numeric = ty("numeric", 1700, TypeKind::Numeric);
    let schema = table(vec![
        column("id", ty_int4(), true),
        mapped("price", numeric, "float64"),
    ]);
    for format in WireFormat::ALL {
        for (input, output) in [
            ("-12.340", "-12.34"),
            ("0.1", "0.1"),
            ("NaN", "NaN"),
            ("-Infinity", "-Infinity"),
        ] {
            let back = decoded_after(
                format,
                &schema,
                vec![Value::Int4(1), Value::Numeric(input.into())],
            );
            assert_eq!(
                back[1],
                Value::Numeric(output.into()),
                "{}",
                format.as_str()
            );
        }
    }
}

#[test]
fn decimal_mapping_rounds_to_its_scale() {
    let numeric = ty("numeric", 1700, TypeKind::Numeric);
    let schema = table(vec![
        column("id", ty_int4(), true),
        mapped("price", numeric, "decimal(10,2)"),
    ]);
    for format in WireFormat::ALL {
        for (input, output) in [
            (
                Value::Numeric("12.345".into()),
                Value::Numeric("12.35".into()),
            ),
            (
                Value::Numeric("-0.004".into()),
                Value::Numeric("0.00".into()),
            ),
            (Value::Numeric("7".into()), Value::Numeric("7.00".into())),
            (Value::Numeric("NaN".into()), Value::Null),
            (Value::Null, Value::Null),
        ] {
            let back = decoded_after(format, &schema, vec![Value::Int4(1), input]);
            assert_eq!(back[1], output, "{}", format.as_str());
        }
        let too_big = vec![change(
            Op::Insert,
            1,
            None,
            Some(row(vec![
                Value::Int4(1),
                Value::Numeric("123456789.5".into()),
            ])),
        )];
        let err = encode(format, &schema, &too_big).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("decimal(10,2)"), "{err}");
    }
}

#[test]
fn json_mapping_embeds_documents() {
    let schema = table(vec![
        column("id", ty_int4(), true),
        mapped("doc", ty("jsonb", 3802, TypeKind::Jsonb), "json"),
    ]);
    for format in WireFormat::ALL {
        let back = decoded_after(
            format,
            &schema,
            vec![
                Value::Int4(1),
                Value::Json("{\"a\": [1, 2.5, null]}".into()),
            ],
        );
        let Value::Json(text) = &back[1] else {
            panic!("{}: not json: {:?}", format.as_str(), back[1]);
        };
        let parsed: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(parsed, serde_json::json!({"a": [1, 2.5, null]}));
    }
    let payload = encode(
        WireFormat::Json,
        &schema,
        &[change(
            Op::Insert,
            1,
            None,
            Some(row(vec![Value::Int4(1), Value::Json("{\"a\": 1}".into())])),
        )],
    )
    .unwrap();
    let line = String::from_utf8(payload).unwrap();
    assert!(
        line.contains("\"doc\":{\"a\":1}"),
        "json mapping must embed the document: {line}"
    );
}

#[test]
fn string_mapping_carries_postgres_text() {
    let int8 = ty("int8", 20, TypeKind::Int8);
    let schema = table(vec![
        column("id", ty_int4(), true),
        mapped("big", int8.clone(), "string"),
    ]);
    let value = Value::Int8(9_007_199_254_740_993);
    let rendered = wallaby_codec::text::render(&int8, &value);
    for format in WireFormat::ALL {
        let changes = vec![change(
            Op::Insert,
            1,
            None,
            Some(row(vec![Value::Int4(1), value.clone()])),
        )];
        let payload = encode(format, &schema, &changes).unwrap();
        if format == WireFormat::Json {
            let text = String::from_utf8(payload.clone()).unwrap();
            let expected = serde_json::to_string(&rendered).unwrap();
            assert!(text.contains(&format!("\"big\":{expected}")), "{text}");
        }
        // The decode side parses the text back with the text codec: exact when it is.
        match wallaby_codec::text::decode(&int8, &rendered) {
            Ok(parsed) => {
                let back = decode(format, &schema, &payload).unwrap();
                assert_eq!(back[0].after.as_ref().unwrap().values[1], parsed);
            }
            Err(_) => {
                assert!(decode(format, &schema, &payload).is_err());
            }
        }
    }
}

#[test]
fn type_mappings_are_checked_against_the_column_type() {
    let schema = table(vec![
        column("id", ty_int4(), true),
        mapped("n", ty("text", 25, TypeKind::Text), "decimal(10,2)"),
    ]);
    for format in WireFormat::ALL {
        let err = encode(format, &schema, &[]).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("\"n\""), "{err}");
    }
    assert!(wallaby_codec::check_type_mapping("numeric", "decimal(38,10)").is_ok());
    assert!(wallaby_codec::check_type_mapping("int4", "json").is_err());
}

#[test]
fn odd_column_names_survive_every_format() {
    let text = ty("text", 25, TypeKind::Text);
    let schema = table(vec![
        column("id", ty_int4(), true),
        column("my col", text.clone(), false),
        column("my_col", text.clone(), false),
        column("_0_my_col", text.clone(), false),
        column("Ünïcode.dotted", text.clone(), false),
        column("1st", text.clone(), false),
        column("op", text, false),
    ]);
    let values: Vec<Value> = std::iter::once(Value::Int4(1))
        .chain((0..6).map(|i| Value::Text(format!("v{i}"))))
        .collect();
    let changes = vec![
        change(Op::Insert, 1, None, Some(row(values.clone()))),
        change(
            Op::Update,
            2,
            Some(Row {
                values: values.clone(),
                absent: vec![4, 1],
            }),
            Some(row(values)),
        ),
    ];
    for format in WireFormat::ALL {
        assert_round_trip(format, &schema, &changes);
    }
}

#[test]
fn a_table_without_columns_survives_every_format_but_parquet() {
    let schema = table(Vec::new());
    let changes = vec![
        change(Op::Insert, 1, None, Some(row(Vec::new()))),
        change(Op::Truncate, 2, None, None),
    ];
    for format in WireFormat::ALL {
        if format == WireFormat::Parquet {
            let err = encode(format, &schema, &changes).map(|_| ()).unwrap_err();
            assert!(err.to_string().contains("no columns"), "{err}");
        } else {
            assert_round_trip(format, &schema, &changes);
        }
    }
}

#[test]
fn mappings_follow_domains_to_their_base_type() {
    let numeric = ty("numeric", 1700, TypeKind::Numeric);
    let price = ty("public.price", 16_600, TypeKind::Domain(numeric));
    let schema = table(vec![
        column("id", ty_int4(), true),
        mapped("p", price, "decimal(6,1)"),
    ]);
    for format in WireFormat::ALL {
        let back = decoded_after(
            format,
            &schema,
            vec![Value::Int4(1), Value::Numeric("-2.25".into())],
        );
        assert_eq!(
            back[1],
            Value::Numeric("-2.3".into()),
            "{}",
            format.as_str()
        );
    }
}

fn typed_schema() -> TableSchema {
    let mut numeric = TypeInfo::clone(&ty("numeric", 1700, TypeKind::Numeric));
    numeric.typmod = (10 << 16) + 2 + 4;
    table(vec![
        column("id", ty_int4(), true),
        column("price", Arc::new(numeric), false),
        mapped("doc", ty("jsonb", 3802, TypeKind::Jsonb), "json"),
        column("at", ty("timestamptz", 1184, TypeKind::TimestampTz), false),
    ])
}

#[test]
fn arrow_and_parquet_payloads_carry_typed_fields_and_postgres_metadata() {
    use arrow_schema::{DataType, TimeUnit};
    let schema = typed_schema();
    let check = |arrow: &arrow_schema::Schema| {
        assert_eq!(arrow.metadata()["wallaby.table"], "public.items");
        assert_eq!(arrow.metadata()["wallaby.schema_version"], "3");
        let DataType::Struct(row) = arrow.field_with_name("after").unwrap().data_type() else {
            panic!("after is not a struct");
        };
        let price = &row[1];
        assert_eq!(price.metadata()["pg.type"], "numeric");
        assert_eq!(price.metadata()["pg.oid"], "1700");
        assert_eq!(price.metadata()["pg.typmod"], "655366");
        assert_eq!(price.data_type(), &DataType::Utf8);
        assert_eq!(row[2].metadata()["ARROW:extension:name"], "arrow.json");
        assert_eq!(
            row[3].data_type(),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
        assert_eq!(row[0].metadata()["pg.key"], "true");
    };
    let payload = encode(WireFormat::Arrow, &schema, &[]).unwrap();
    let reader =
        arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(payload), None).unwrap();
    check(&reader.schema());
    let payload = encode(WireFormat::Parquet, &schema, &[]).unwrap();
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        bytes::Bytes::from(payload),
    )
    .unwrap();
    check(builder.schema());
}

/// A record written at schema version 3 still decodes with the writer schema of version 4
/// (a column added, one dropped): Avro schema resolution, as a consumer holding the newer
/// version would do it.
#[test]
fn avro_records_of_an_older_version_resolve_against_a_newer_one() {
    let old = small_schema();
    let mut new = table(vec![
        column("id", ty_int4(), true),
        column("name", ty("text", 25, TypeKind::Text), false),
        column("email", ty("text", 25, TypeKind::Text), false),
    ]);
    new.version = 4;
    let written = encode(
        WireFormat::Avro,
        &old,
        &[change(
            Op::Insert,
            1,
            None,
            Some(row(vec![
                Value::Int4(7),
                Value::Text("ann".into()),
                Value::Json("{}".into()),
            ])),
        )],
    )
    .unwrap();
    let newer = encode(WireFormat::Avro, &new, &[]).unwrap();
    let reader_schema = apache_avro::Reader::new(newer.as_slice())
        .unwrap()
        .writer_schema()
        .clone();
    let resolved: Vec<apache_avro::types::Value> =
        // No extra schemata: the writer's named types resolve within the writer schema.
        apache_avro::Reader::builder(written.as_slice())
            .reader_schema(&reader_schema)
            .schemata(Vec::new())
            .build()
            .unwrap()
            .map(Result::unwrap)
            .collect();
    assert_eq!(resolved.len(), 1);
    let text = format!("{:?}", resolved[0]);
    // The added column reads as null; the dropped one is gone; the rest is intact.
    assert!(text.contains("\"email\", Union(0, Null)"), "{text}");
    assert!(
        text.contains("\"name\", Union(1, String(\"ann\"))"),
        "{text}"
    );
    assert!(!text.contains("\"doc\""), "{text}");
}

#[test]
fn avro_proto_and_json_payloads_describe_themselves() {
    use prost::Message as _;
    let schema = typed_schema();
    let changes = vec![change(
        Op::Insert,
        1,
        None,
        Some(row(vec![
            Value::Int4(1),
            Value::Numeric("1.50".into()),
            Value::Json("{}".into()),
            Value::TimestampTz(0),
        ])),
    )];

    let payload = encode(WireFormat::Avro, &schema, &changes).unwrap();
    let reader = apache_avro::Reader::new(payload.as_slice()).unwrap();
    let writer_schema = serde_json::to_string(reader.writer_schema()).unwrap();
    assert!(
        writer_schema.contains("timestamp-micros"),
        "{writer_schema}"
    );
    let descriptor: serde_json::Value =
        serde_json::from_slice(&reader.user_metadata()["wallaby.schema"]).unwrap();
    assert_eq!(descriptor["columns"][1]["typmod"], 655_366);
    assert_eq!(descriptor["schema_version"], 3);

    let payload = encode(WireFormat::Proto, &schema, &changes).unwrap();
    let batch = wallaby_codec::WireBatch::decode_length_delimited(payload.as_slice()).unwrap();
    assert_eq!(batch.table, "public.items");
    assert_eq!(batch.schema_version, 3);
    assert_eq!(batch.changes.len(), 1);
    let pool = prost_reflect::DescriptorPool::decode(batch.file_descriptor_set.as_slice()).unwrap();
    let change_desc = pool.get_message_by_name(&batch.change_message).unwrap();
    let message =
        prost_reflect::DynamicMessage::decode(change_desc, batch.changes[0].as_slice()).unwrap();
    let after = message.get_field_by_name("after").unwrap();
    let after = after.as_message().unwrap();
    assert_eq!(
        after.get_field_by_name("price").unwrap().as_str(),
        Some("1.50")
    );

    let payload = String::from_utf8(encode(WireFormat::Json, &schema, &changes).unwrap()).unwrap();
    let mut lines = payload.lines();
    let header: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(
        header["wallaby_schema"]["columns"][3]["type"],
        "timestamptz"
    );
    let line: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(line["after"]["at"], "1970-01-01T00:00:00Z");
    assert_eq!(line["after"]["price"], "1.50");
    assert_eq!(line["schema_version"], 3);
}

#[test]
fn appended_json_and_proto_payloads_decode_as_one_stream() {
    let schema = small_schema();
    let batch = |n: u64| {
        vec![change(
            Op::Insert,
            n,
            None,
            Some(row(vec![
                Value::Int4(i32::try_from(n).unwrap()),
                Value::Null,
                Value::Null,
            ])),
        )]
    };
    for format in [WireFormat::Json, WireFormat::Proto] {
        let mut stream = encode(format, &schema, &batch(1)).unwrap();
        stream.extend(encode(format, &schema, &batch(2)).unwrap());
        let back = decode(format, &schema, &stream).unwrap();
        let mut want = batch(1);
        want.extend(batch(2));
        assert!(same(&back, &want), "{}: {back:?}", format.as_str());
        let mut newer = schema.clone();
        newer.version += 1;
        stream.extend(encode(format, &newer, &batch(3)).unwrap());
        let err = decode(format, &schema, &stream).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("schema version"), "{err}");
    }
}

#[test]
fn payload_schema_reads_table_version_and_columns_of_every_format() {
    let schema = typed_schema();
    for format in WireFormat::ALL {
        let payload = encode(format, &schema, &[]).unwrap();
        let described = wallaby_codec::payload_schema(format, &payload)
            .unwrap_or_else(|e| panic!("{}: {e}", format.as_str()));
        assert_eq!(described.table, "public.items", "{}", format.as_str());
        assert_eq!(described.schema_version, 3);
        assert_eq!(
            described.layout_version,
            wallaby_codec::format::LAYOUT_VERSION
        );
        let names: Vec<&str> = described.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "price", "doc", "at"]);
        assert_eq!(described.columns[1].typmod, 655_366);
        assert_eq!(described.columns[1].oid, 1700);
        assert!(described.columns[0].key);
        assert_eq!(described.columns[2].mapped_type.as_deref(), Some("json"));
        let err = wallaby_codec::payload_schema(format, b"not a payload")
            .map(|_| ())
            .unwrap_err();
        assert!(err.to_string().contains(format.as_str()), "{err}");
    }
}
