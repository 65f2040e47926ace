//! Type fidelity against the real PostgreSQL: edge values of every supported type are
//! inserted, read back through the real replication path (publication, slot, pgoutput via
//! `ReplicationReader`), typed with `TypeResolver` and `text::decode`, and rendered back;
//! the text must equal PostgreSQL's own output of the same value, directly and after a
//! round trip through each wire format.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use pg_walstream::CancellationToken;
use tokio::sync::mpsc;
use wallaby_codec::format::{self, WireFormat};
use wallaby_codec::{Change, Op, Row, TableSchema, TypeKind, Value, text};
use wallaby_pipeline::change::{Cell, RowChange, SourceEvent};
use wallaby_source::PgConnection;
use wallaby_source::reader::ReplicationReader;
use wallaby_source::types::TypeResolver;

const DEADLINE: Duration = Duration::from_secs(90);

/// Matrix types that resolve to `TypeKind::Unknown` by design (see docs/types.md).
const UNMODELLED: &[&str] = &["int4multirange", "point", "tsvector"];

/// One column type and the SQL expressions of its edge values (one row each).
struct Case {
    ty: &'static str,
    values: Vec<String>,
}

fn case(ty: &'static str, values: &[&str]) -> Case {
    Case {
        ty,
        values: values.iter().map(|v| (*v).to_owned()).collect(),
    }
}

/// `'…'` with single quotes doubled; backslashes are literal (standard_conforming_strings).
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn cases() -> Vec<Case> {
    let digits_1000 = "9".repeat(1000);
    let frac_1000 = format!("-{}.{}", "1234567890".repeat(50), "0987654321".repeat(50));
    let all_bytes = "(SELECT string_agg(set_byte('\\x00'::bytea, 0, i), ''::bytea ORDER BY i) FROM generate_series(0, 255) i)";
    let nasty = [
        "",
        "héllo ☃ 𝄞 中文",
        "quote \" and 'single', back\\slash",
        "comma, {brace} (paren) [bracket]",
        " leading and trailing ",
        "NULL",
        "line\nbreak\ttab",
    ];
    let mut c = vec![
        case("bool", &["true", "false"]),
        case("int2", &["-32768", "32767", "0"]),
        case("int4", &["-2147483648", "2147483647"]),
        case("int8", &["-9223372036854775808", "9223372036854775807"]),
        case("oid", &["4294967295", "0"]),
        case(
            "float4",
            &[
                "'NaN'",
                "'Infinity'",
                "'-Infinity'",
                "'-0'",
                "'3.4028235e38'",
                "'1e-45'",
                "'0.1'",
                "'1e6'",
                "'123456'",
                "'1.17549435e-38'",
            ],
        ),
        case(
            "float8",
            &[
                "'NaN'",
                "'Infinity'",
                "'-Infinity'",
                "'-0'",
                "'1e-310'",
                "'1.7976931348623157e308'",
                "'0.1'",
                "'1e15'",
                "'123456789012345'",
                "'1e-5'",
                "'-2.5e-300'",
                "pi()",
            ],
        ),
        Case {
            ty: "numeric",
            values: vec![
                lit(&digits_1000),
                lit(&frac_1000),
                "'NaN'".into(),
                "'Infinity'".into(),
                "'-Infinity'".into(),
                "'0.000001'".into(),
                "'-12.340'".into(),
                "0".into(),
            ],
        },
        case("numeric(10,2)", &["12.3", "-99999999.99"]),
        case(
            "money",
            &[
                "'-92233720368547758.08'",
                "'92233720368547758.07'",
                "'-1234.56'",
                "'0'",
                "'1000000'",
            ],
        ),
        Case {
            ty: "text",
            values: nasty.iter().map(|s| lit(s)).collect(),
        },
        case("varchar(10)", &["'abc'", "''"]),
        case("char(5)", &["'ab'", "'abcde'"]),
        case("name", &["'a name'"]),
        case("\"char\"", &["'x'"]),
        Case {
            ty: "bytea",
            values: vec!["'\\x'".into(), all_bytes.into(), "'\\x00'".into()],
        },
        case(
            "uuid",
            &[
                "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
                "'00000000-0000-0000-0000-000000000000'",
            ],
        ),
        case(
            "json",
            &[
                "'{\"b\":1,   \"a\" : [1, 2.50, \"x\\u00e9\"]}'",
                "'null'",
                "'\"str\"'",
            ],
        ),
        case(
            "jsonb",
            &[
                "'{\"b\":1, \"a\":[1,2.50,{\"c\":null}], \"é\": \"\\\\\"}'",
                "'[]'",
            ],
        ),
        case("xml", &["'<a x=\"1\">t&amp;x<b/></a>'", "'plain text'"]),
        case(
            "date",
            &[
                "'0044-03-15 BC'",
                "'4713-01-01 BC'",
                "'5874897-12-31'",
                "'infinity'",
                "'-infinity'",
                "'2024-02-29'",
                "'0001-01-01'",
                "'1970-01-01'",
            ],
        ),
        case(
            "time",
            &[
                "'24:00:00'",
                "'00:00:00'",
                "'23:59:59.999999'",
                "'04:05:06.5'",
            ],
        ),
        case("time(3)", &["'04:05:06.789'"]),
        case(
            "timetz",
            &[
                "'12:34:56.789+05:30'",
                "'00:00:00-03:30'",
                "'24:00:00-15:59'",
                "'10:00:00+14'",
                "'01:02:03-00:00:15'",
            ],
        ),
        case(
            "timestamp",
            &[
                "'0044-03-15 12:00:00.5 BC'",
                "'4713-01-01 00:00:00 BC'",
                "'infinity'",
                "'-infinity'",
                "'2024-01-02 03:04:05.123456'",
                "'200000-01-01 00:00:00'",
                "'1969-12-31 23:59:59.999999'",
            ],
        ),
        case(
            "timestamptz",
            &[
                "'2024-01-02 03:04:05.123456+02'",
                "'0044-03-15 12:00:00 BC'",
                "'infinity'",
                "'-infinity'",
                "'1900-06-01 12:00:00-08:15'",
            ],
        ),
        case(
            "interval",
            &[
                "'1 year 2 mons -3 days 04:05:06.789'",
                "'-3 days 4 hours'",
                "'0'",
                "'1 mon -1 microsecond'",
                "'-1 year'",
                "'100 hours'",
                "'178956970 years 7 mons 2147483647 days 2562047788:00:54.775807'",
                "'-178956970 years -8 mons -2147483648 days -2562047788:00:54.775807'",
            ],
        ),
        case(
            "inet",
            &[
                "'1.2.3.4'",
                "'1.2.3.4/24'",
                "'::1'",
                "'2001:db8::1/64'",
                "'::ffff:1.2.3.4'",
                "'::1.2.3.4'",
                "'fe80::1:0:0:2'",
                "'2001:db8:0:0:1:0:0:1'",
            ],
        ),
        case(
            "cidr",
            &[
                "'10.0.0.0/8'",
                "'2001:db8::/32'",
                "'0.0.0.0/0'",
                "'1.2.3.4/32'",
            ],
        ),
        case("macaddr", &["'08:00:2b:01:02:03'", "'FF-FF-FF-FF-FF-FF'"]),
        case("macaddr8", &["'08:00:2b:01:02:03:04:05'"]),
        case("bit(4)", &["B'1010'"]),
        case("varbit", &["B''", "B'1'", "B'0101010101'"]),
        case("mood", &["'sad'", "'très \"happy\"'"]),
        case("posint", &["1", "2147483647"]),
        case(
            "pair",
            &[
                "ROW(NULL, 'a \"b\" \\c, (d)')",
                "ROW(1, '')",
                "ROW(NULL, NULL)",
                "ROW(-5, ' x ')",
            ],
        ),
        case(
            "int4range",
            &["'[1,5)'", "'empty'", "'(,)'", "'[3,)'", "'(,7]'"],
        ),
        case(
            "int8range",
            &["'[-9223372036854775808,9223372036854775807)'"],
        ),
        case("numrange", &["'(1.5,2.5]'", "'[NaN,NaN]'::text::numrange"]),
        case(
            "tsrange",
            &[
                "'[\"2024-01-01 00:00:00\",infinity)'",
                "'[\"0044-03-15 00:00:00 BC\",)'",
            ],
        ),
        case("tstzrange", &["'[2024-01-01 00:00:00+00,)'"]),
        case(
            "daterange",
            &["'[2024-01-01,2024-02-01)'", "'[0044-03-15 BC,)'"],
        ),
        case(
            "int4[]",
            &[
                "'{1,NULL,3}'",
                "'{{1,2},{3,4}}'",
                "'[2:3]={1,2}'",
                "'{}'",
                "'[0:1][-1:0]={{1,2},{3,4}}'",
            ],
        ),
        Case {
            ty: "text[]",
            values: vec![
                format!(
                    "ARRAY[{}, NULL]",
                    nasty.iter().map(|s| lit(s)).collect::<Vec<_>>().join(", ")
                ),
                "'{{a,b},{c,NULL}}'".into(),
            ],
        },
        case(
            "pair[]",
            &["ARRAY[ROW(1, 'a b')::pair, NULL, ROW(NULL, '\"')::pair]"],
        ),
        case(
            "int4range[]",
            &["ARRAY['[1,2)'::int4range, 'empty', '(,)']"],
        ),
        case(
            "tstzrange[]",
            &["ARRAY['[2024-01-01 00:00:00+00,)'::tstzrange]"],
        ),
        case("numeric[]", &["'{1.5,NaN,-Infinity,NULL}'"]),
        case("float8[]", &["'{NaN,Infinity,-0,1e-310}'"]),
        case("bytea[]", &["ARRAY['\\x'::bytea, '\\xdeadbeef', NULL]"]),
        case("jsonb[]", &["ARRAY['{\"a\": [1, \"x\"]}'::jsonb, 'null']"]),
        case("mood[]", &["'{sad,\"très \\\"happy\\\"\"}'"]),
        case("uuid[]", &["'{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}'"]),
        case("interval[]", &["ARRAY['-3 days 4 hours'::interval, '0']"]),
        case("date[]", &["ARRAY['0044-03-15 BC'::date, 'infinity']"]),
        case(
            "timestamptz[]",
            &["ARRAY['2024-01-02 03:04:05+00'::timestamptz]"],
        ),
        case("inet[]", &["'{1.2.3.4/24,::1}'"]),
        case("money[]", &["ARRAY['-1234.56'::money]"]),
        case("posint[]", &["'{1,2}'"]),
        case("citext", &["'MiXeD Case'", "''"]),
        case(
            "hstore",
            &[
                "'\"a\"=>\"1\", \"b\"=>NULL, \"q\\\"k\"=>\"v\\\\w\", \"\"=>\"\"'",
                "''",
            ],
        ),
        case("hstore[]", &["ARRAY['a=>1'::hstore, '']"]),
        case("ltree", &["'Top.Science.Astronomy'", "''"]),
        // Types the codec does not model: their text is kept verbatim.
        case("int4multirange", &["'{[1,3),[5,7)}'", "'{}'"]),
        case("point", &["'(1,2.5)'"]),
        case("tsvector", &["'a fat cat'"]),
        case("box[]", &["ARRAY['(1,1),(0,0)'::box, '(3,3),(2,2)']"]),
    ];
    // Extension types: required, see `require_extension`.
    c.push(case(
        "vector",
        &["'[1,2.5,3]'", "'[-0.1,1e+06,3.4028235e+38]'"],
    ));
    c.push(case(
        "geometry",
        &[
            "'SRID=4326;POINT(1 2)'",
            "'LINESTRING(0 0,1 1,2 0.5)'",
            "'POLYGON EMPTY'",
        ],
    ));
    c.push(case("geography", &["'SRID=4326;POINT(1 2)'"]));
    c.push(case("geometry[]", &["ARRAY['POINT(1 2)'::geometry]"]));
    c
}

/// What one table of the matrix produced: PostgreSQL's text per row id, and the rows
/// received through replication.
struct Table {
    ty: &'static str,
    pg_text: BTreeMap<i32, Option<String>>,
    rows: Vec<RowChange>,
}

struct Matrix {
    db: TestDb,
    tables: BTreeMap<String, Table>,
    resolver_client: Arc<tokio_postgres::Client>,
}

/// Creates `ext` in the test database. The extension types are part of the matrix, so a
/// missing extension fails the test (naming the fix) rather than skipping its columns.
async fn require_extension(su: &tokio_postgres::Client, ext: &str, package: &str) {
    let available = su
        .query_opt(
            "SELECT 1 FROM pg_available_extensions WHERE name = $1",
            &[&ext],
        )
        .await
        .unwrap()
        .is_some();
    assert!(
        available,
        "{package} is not installed: run e2e/setup.sh (extension {ext:?} is missing from pg_available_extensions)"
    );
    su.batch_execute(&format!("CREATE EXTENSION {ext}"))
        .await
        .unwrap_or_else(|e| panic!("CREATE EXTENSION {ext} failed: {e}"));
}

/// Creates the matrix tables, inserts every edge value, and reads the rows back through
/// the replication stream.
async fn replicate_matrix() -> Matrix {
    let db = TestDb::create("types").await;
    let su = db.superuser_client().await;
    su.batch_execute("CREATE EXTENSION hstore; CREATE EXTENSION citext; CREATE EXTENSION ltree;")
        .await
        .unwrap();
    require_extension(&su, "vector", "pgvector").await;
    require_extension(&su, "postgis", "PostGIS").await;
    let app = db.client().await;
    app.batch_execute(
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'très \"happy\"');
         CREATE DOMAIN posint AS int4 CHECK (VALUE > 0);
         CREATE TYPE pair AS (n int4, s text);",
    )
    .await
    .unwrap();

    let cases = cases();
    let mut ddl = String::new();
    let mut names = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let t = format!("t{i:02}");
        ddl.push_str(&format!(
            "CREATE TABLE {t} (id int4 PRIMARY KEY, v {});\n",
            c.ty
        ));
        names.push(t);
    }
    ddl.push_str(&format!(
        "CREATE PUBLICATION p FOR TABLE {};",
        names.join(", ")
    ));
    app.batch_execute(&ddl).await.unwrap();
    let slot = db.name.clone();
    app.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&slot],
    )
    .await
    .unwrap();

    let mut dml = String::from("BEGIN;\n");
    let mut expected_rows = 0;
    for (t, c) in names.iter().zip(&cases) {
        for (id, v) in c.values.iter().enumerate() {
            dml.push_str(&format!("INSERT INTO {t} VALUES ({id}, {v});\n"));
            expected_rows += 1;
        }
        // A NULL of every type too.
        dml.push_str(&format!(
            "INSERT INTO {t} VALUES ({}, NULL);\n",
            c.values.len()
        ));
        expected_rows += 1;
    }
    dml.push_str("COMMIT;");
    app.batch_execute(&dml)
        .await
        .unwrap_or_else(|e| panic!("inserting the matrix: {e:?}"));

    // The worker's own connections: catalog with the session settings, replication stream.
    let spec: wallaby_crds::flow::PostgresSource = serde_json::from_value(serde_json::json!({
        "dsn": db.dsn, "slot": slot, "publication": "p"
    }))
    .unwrap();
    let conn = PgConnection::resolve(&spec, None, None).unwrap();
    let catalog = Arc::new(conn.connect().await.unwrap());
    let mut reader =
        ReplicationReader::start(&conn, &slot, "p", catalog.clone(), reader_options(&catalog))
            .await
            .unwrap();
    let (tx, mut rx) = mpsc::channel(1024);
    let cancel = CancellationToken::new();
    let task = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let result = reader
                .run(
                    tx,
                    &cancel,
                    Arc::new(std::sync::atomic::AtomicU64::new(0)),
                    Duration::from_secs(1),
                )
                .await;
            reader.stop().await;
            result
        })
    };
    let mut rows: Vec<RowChange> = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while rows.len() < expected_rows {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(SourceEvent::Row(r))) => rows.push(r),
            Ok(Some(_)) => {}
            Ok(None) => panic!("the replication reader stopped: {:?}", task.await),
            Err(_) => panic!(
                "timed out after {DEADLINE:?}: {} of {expected_rows} rows replicated",
                rows.len()
            ),
        }
    }
    cancel.cancel();
    task.await.unwrap().unwrap();

    // PostgreSQL's own text output (text-format results of the simple query protocol use
    // the type output functions, as pgoutput does), on a session with the same settings.
    let mut tables = BTreeMap::new();
    for (t, c) in names.iter().zip(&cases) {
        let mut pg_text = BTreeMap::new();
        for msg in catalog
            .simple_query(&format!("SELECT id, v FROM {t} ORDER BY id"))
            .await
            .unwrap()
        {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = msg {
                let id: i32 = r.get(0).unwrap().parse().unwrap();
                pg_text.insert(id, r.get(1).map(str::to_owned));
            }
        }
        tables.insert(
            t.clone(),
            Table {
                ty: c.ty,
                pg_text,
                rows: Vec::new(),
            },
        );
    }
    for r in rows {
        let t = tables
            .get_mut(&r.relation.table)
            .unwrap_or_else(|| panic!("unexpected table {}", r.relation.table));
        t.rows.push(r);
    }
    Matrix {
        db,
        tables,
        resolver_client: catalog,
    }
}

fn cell_text(cell: &Cell) -> Option<String> {
    match cell {
        Cell::Text(b) => Some(String::from_utf8(b.to_vec()).expect("pgoutput text is UTF-8")),
        Cell::Null => None,
        Cell::UnchangedToast => panic!("an insert carries every value"),
    }
}

/// How the values travel before they are rendered.
#[derive(Clone, Copy, Debug)]
enum Path {
    Direct,
    Wire(WireFormat),
}

/// Runs the matrix along `path`; every mismatch names the type, the column, PostgreSQL's
/// text and ours.
async fn check(path: Path, resolve_types: bool) -> Vec<String> {
    let m = replicate_matrix().await;
    let mut resolver = TypeResolver::new(m.resolver_client.clone(), resolve_types);
    let mut mismatches = Vec::new();
    let mut checked = 0;
    for (name, table) in &m.tables {
        let relation = &table.rows[0].relation;
        let schema: TableSchema = resolver.table_schema(relation, 1).await.unwrap();
        let v_ty = &schema.columns[1].ty;
        if resolve_types && !UNMODELLED.contains(&table.ty) {
            assert!(
                !matches!(v_ty.kind, TypeKind::Unknown),
                "{name} ({}) resolved to Unknown: {v_ty:?}",
                table.ty
            );
        }
        assert!(schema.columns[0].key, "id is the key of {name}");
        assert_eq!(
            table.rows.len(),
            table.pg_text.len(),
            "rows replicated for {name} ({})",
            table.ty
        );
        // Decode every replicated cell.
        let mut changes = Vec::new();
        for r in &table.rows {
            let cells = r.after.as_ref().unwrap();
            let mut values = Vec::new();
            for (col, cell) in schema.columns.iter().zip(cells) {
                values.push(match cell_text(cell) {
                    None => Value::Null,
                    Some(t) => text::decode(&col.ty, &t).unwrap_or_else(|e| {
                        panic!("{name} ({}) column {}: {e}", table.ty, col.name)
                    }),
                });
            }
            changes.push(Change {
                op: Op::Insert,
                commit_lsn: 1,
                lsn: 0,
                commit_time_micros: 0,
                xid: 1,
                before: None,
                after: Some(Row {
                    values,
                    absent: Vec::new(),
                }),
            });
        }
        let delivered = match path {
            Path::Direct => changes,
            Path::Wire(fmt) => {
                let payload = format::encode(fmt, &schema, &changes).unwrap_or_else(|e| {
                    panic!("{} encode of {name} ({}): {e}", fmt.as_str(), table.ty)
                });
                let back = format::decode(fmt, &schema, &payload).unwrap_or_else(|e| {
                    panic!("{} decode of {name} ({}): {e}", fmt.as_str(), table.ty)
                });
                assert_eq!(back.len(), changes.len(), "{} change count", fmt.as_str());
                back
            }
        };
        for change in &delivered {
            assert_eq!(change.op, Op::Insert);
            let values = &change.after.as_ref().expect("insert has after").values;
            let id = match &values[0] {
                Value::Int4(id) => *id,
                other => panic!("{name}: id decoded as {other:?}"),
            };
            let pg = table.pg_text.get(&id).cloned().flatten();
            let ours = match &values[1] {
                Value::Null => None,
                v => Some(text::render(v_ty, v)),
            };
            checked += 1;
            if pg != ours {
                mismatches.push(format!(
                    "{path:?} type {} column {name}.v (row {id}):\n    postgres: {pg:?}\n    ours:     {ours:?}",
                    table.ty
                ));
            }
        }
    }
    eprintln!(
        "{path:?}: {checked} values in {} tables checked, {} mismatches",
        m.tables.len(),
        mismatches.len()
    );
    m.db.drop_all().await;
    mismatches
}

fn assert_clean(mismatches: Vec<String>) {
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_values_render_exactly_as_postgres_prints_them() {
    assert_clean(check(Path::Direct, true).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_roundtrip_arrow() {
    assert_clean(check(Path::Wire(WireFormat::Arrow), true).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_roundtrip_parquet() {
    assert_clean(check(Path::Wire(WireFormat::Parquet), true).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_roundtrip_avro() {
    assert_clean(check(Path::Wire(WireFormat::Avro), true).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_roundtrip_proto() {
    assert_clean(check(Path::Wire(WireFormat::Proto), true).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_roundtrip_json() {
    assert_clean(check(Path::Wire(WireFormat::Json), true).await);
}

/// With `resolveTypes: false` an extension type is Unknown and keeps PostgreSQL's text
/// byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresolved_extension_types_keep_their_exact_text() {
    let m = replicate_matrix().await;
    let mut resolver = TypeResolver::new(m.resolver_client.clone(), false);
    let mut seen = HashMap::new();
    for (name, table) in &m.tables {
        if !matches!(table.ty, "hstore" | "mood" | "pair") {
            continue;
        }
        let schema = resolver
            .table_schema(&table.rows[0].relation, 1)
            .await
            .unwrap();
        let ty = &schema.columns[1].ty;
        assert_eq!(
            ty.kind,
            TypeKind::Unknown,
            "{} with resolve_types off",
            table.ty
        );
        assert!(ty.name.ends_with(table.ty), "type name {:?}", ty.name);
        for r in &table.rows {
            let cells = r.after.as_ref().unwrap();
            let id: i32 = cell_text(&cells[0]).unwrap().parse().unwrap();
            let Some(raw) = cell_text(&cells[1]) else {
                continue;
            };
            let v = text::decode(ty, &raw).unwrap();
            assert_eq!(v, Value::Unknown(raw.clone()), "{name}");
            assert_eq!(Some(text::render(ty, &v)), m_text(&m, name, id));
            *seen.entry(table.ty).or_insert(0) += 1;
        }
    }
    assert_eq!(
        seen.get("hstore"),
        Some(&2),
        "hstore rows checked: {seen:?}"
    );
    // Built-in types stay typed.
    let int8 = resolver.resolve(20, -1).await.unwrap();
    assert_eq!(int8.kind, TypeKind::Int8);
    m.db.drop_all().await;
}

fn m_text(m: &Matrix, table: &str, id: i32) -> Option<String> {
    m.tables[table].pg_text.get(&id).cloned().flatten()
}

/// The walsender prints with the database's and role's defaults (the replication
/// transport cannot pass `-c` options): settings the codec cannot read stop the start
/// with a message naming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_server_output_settings_are_refused_at_start() {
    let db = TestDb::create("typeset").await;
    let app = db.client().await;
    app.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t;
         ALTER DATABASE {} SET bytea_output = 'escape';
         ALTER DATABASE {} SET IntervalStyle = 'iso_8601';",
        db.name, db.name
    ))
    .await
    .unwrap();
    let spec: wallaby_crds::flow::PostgresSource = serde_json::from_value(serde_json::json!({
        "dsn": db.dsn, "slot": db.name, "publication": "p"
    }))
    .unwrap();
    let conn = PgConnection::resolve(&spec, None, None).unwrap();
    // The worker's own sessions are unaffected: they set the options themselves.
    let catalog = Arc::new(conn.connect().await.unwrap());
    let row = catalog
        .query_one("SELECT current_setting('bytea_output')", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "hex");
    let err = ReplicationReader::start(
        &conn,
        &db.name,
        "p",
        catalog.clone(),
        reader_options(&catalog),
    )
    .await
    .expect_err("escape bytea output must be refused");
    let text = err.to_string();
    assert!(
        text.contains("bytea_output is \"escape\"")
            && text.contains("IntervalStyle is \"iso_8601\"")
            && text.contains("ALTER ROLE"),
        "{text}"
    );
    db.drop_all().await;
}

fn reader_options(catalog: &Arc<tokio_postgres::Client>) -> wallaby_source::reader::ReaderOptions {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "wallaby-matrix-spill-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    wallaby_source::reader::ReaderOptions {
        status_interval: Duration::from_secs(1),
        spill: wallaby_source::spill::SpillDir::prepare(&dir).unwrap(),
        toast: wallaby_source::toast::ToastStage::new(
            wallaby_crds::flow::ToastFetch::Off,
            0,
            catalog.clone(),
        ),
    }
}
