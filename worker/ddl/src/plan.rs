//! What applying a captured statement means for each destination, shown in the
//! DDLApproval before anyone decides: a new schema version (with the format's
//! compatibility) for encoded outputs, SQL for destinations that materialize tables.

use wallaby_crds::common::WireFormat;
use wallaby_crds::ddl_approval::DestinationPlan;
use wallaby_crds::destination::DestinationType;

use super::history::{ColumnChange, ShapeColumn};
use wallaby_pg::quote_ident;

/// A table's change as one statement made it.
#[derive(Debug, Clone)]
pub struct TableChange {
    /// `schema.table`.
    pub table: String,
    /// The table's schema version before (none: first seen).
    pub from_version: Option<u32>,
    /// The version after (none: the table was dropped).
    pub to_version: Option<u32>,
    /// Column changes.
    pub changes: Vec<ColumnChange>,
    /// Columns after the statement (for a created table).
    pub columns: Vec<ShapeColumn>,
    /// The table was dropped.
    pub dropped: bool,
}

/// Whether a destination type keeps tables whose shape must follow the source.
pub fn materializes_tables(kind: DestinationType) -> bool {
    matches!(
        kind,
        DestinationType::Pgstream
            | DestinationType::Duckdb
            | DestinationType::Clickhouse
            | DestinationType::Snowflake
            | DestinationType::Snowpipe
            | DestinationType::Ducklake
    )
}

fn qualified(table: &str) -> String {
    match table.split_once('.') {
        Some((s, t)) => format!("{}.{}", quote_ident(s), quote_ident(t)),
        None => quote_ident(table),
    }
}

fn sql_type(c: &ShapeColumn) -> String {
    if c.type_name.is_empty() {
        format!("/* type oid {} */ text", c.type_oid)
    } else {
        c.type_name.clone()
    }
}

/// The SQL a table destination runs for `change`.
pub fn table_statements(change: &TableChange) -> Vec<String> {
    let t = qualified(&change.table);
    if change.dropped {
        return vec![format!("DROP TABLE IF EXISTS {t}")];
    }
    if change.from_version.is_none() {
        let columns = change
            .columns
            .iter()
            .map(|c| format!("{} {}", quote_ident(&c.name), sql_type(c)))
            .collect::<Vec<_>>()
            .join(", ");
        return vec![format!("CREATE TABLE IF NOT EXISTS {t} ({columns})")];
    }
    change
        .changes
        .iter()
        .filter_map(|c| match c {
            ColumnChange::Added(c) => Some(format!(
                "ALTER TABLE {t} ADD COLUMN {} {}",
                quote_ident(&c.name),
                sql_type(c)
            )),
            ColumnChange::Dropped(c) => Some(format!(
                "ALTER TABLE {t} DROP COLUMN {}",
                quote_ident(&c.name)
            )),
            ColumnChange::Renamed { from, to } => Some(format!(
                "ALTER TABLE {t} RENAME COLUMN {} TO {}",
                quote_ident(from),
                quote_ident(&to.name)
            )),
            ColumnChange::Retyped { to, .. } => Some(format!(
                "ALTER TABLE {t} ALTER COLUMN {} TYPE {}",
                quote_ident(&to.name),
                sql_type(to)
            )),
            ColumnChange::Key { .. } => None,
        })
        .collect()
}

/// Widening conversions readers of Avro / Protobuf accept without a new reader schema.
fn widens(from: u32, to: u32) -> bool {
    // int2 → int4 → int8, float4 → float8, varchar/bpchar → text.
    matches!(
        (from, to),
        (21, 23) | (21, 20) | (23, 20) | (700, 701) | (1043, 25) | (1042, 25)
    )
}

/// How readers of `format` take the change.
fn compatibility(format: WireFormat, change: &TableChange) -> String {
    let breaking: Vec<String> = change
        .changes
        .iter()
        .filter_map(|c| match c {
            ColumnChange::Renamed { from, to } => Some(format!("{from} renamed to {}", to.name)),
            ColumnChange::Retyped { from, to } if !widens(from.type_oid, to.type_oid) => {
                Some(format!("{} changes type", to.name))
            }
            _ => None,
        })
        .collect();
    let name = match format {
        WireFormat::Json => "JSON",
        WireFormat::Avro => "Avro",
        WireFormat::Proto => "Protobuf",
        WireFormat::Arrow => "Arrow",
        WireFormat::Parquet => "Parquet",
    };
    match format {
        WireFormat::Json => {
            "JSON records carry the new column set; readers keyed by column name keep working"
                .into()
        }
        _ if breaking.is_empty() => format!(
            "{name}: compatible (added columns are nullable, dropped columns read as null by older readers)"
        ),
        _ => format!(
            "{name}: breaking for readers of the previous version ({}); they must switch on schema_version",
            breaking.join(", ")
        ),
    }
}

/// The actions of one destination for every changed table.
pub fn destination_plan(
    name: &str,
    kind: DestinationType,
    format: WireFormat,
    lsn: &str,
    changes: &[TableChange],
) -> DestinationPlan {
    let mut actions = Vec::new();
    for change in changes {
        if materializes_tables(kind) {
            actions.extend(table_statements(change));
            continue;
        }
        let action = match (change.dropped, change.from_version, change.to_version) {
            (true, _, _) => format!(
                "{}: dropped; no more records for it (records already written stay)",
                change.table
            ),
            (false, None, Some(v)) => format!(
                "{}: new table, schema version {v} from LSN {lsn}",
                change.table
            ),
            (false, Some(from), Some(to)) if from == to => format!(
                "{}: schema version {to} unchanged ({})",
                change.table,
                super::history::summary(&change.changes)
            ),
            (false, from, Some(to)) => format!(
                "{}: schema version {} -> {to} from LSN {lsn} ({}); {}",
                change.table,
                from.map_or_else(|| "-".to_owned(), |f| f.to_string()),
                super::history::summary(&change.changes),
                compatibility(format, change)
            ),
            (false, _, None) => format!("{}: no schema change", change.table),
        };
        actions.push(action);
    }
    DestinationPlan {
        name: name.to_owned(),
        actions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, attnum: i32, oid: u32, ty: &str) -> ShapeColumn {
        ShapeColumn {
            name: name.into(),
            attnum: Some(attnum),
            type_oid: oid,
            type_mod: -1,
            type_name: ty.into(),
            key: false,
        }
    }

    fn change(changes: Vec<ColumnChange>) -> TableChange {
        TableChange {
            table: "public.orders".into(),
            from_version: Some(1),
            to_version: Some(2),
            changes,
            columns: Vec::new(),
            dropped: false,
        }
    }

    #[test]
    fn table_destinations_get_alter_statements() {
        let c = change(vec![
            ColumnChange::Added(col("email", 3, 25, "text")),
            ColumnChange::Renamed {
                from: "note".into(),
                to: col("remark", 2, 25, "text"),
            },
            ColumnChange::Retyped {
                from: col("qty", 4, 23, "integer"),
                to: col("qty", 4, 20, "bigint"),
            },
            ColumnChange::Dropped(col("old", 5, 25, "text")),
        ]);
        assert_eq!(
            table_statements(&c),
            [
                r#"ALTER TABLE "public"."orders" ADD COLUMN "email" text"#,
                r#"ALTER TABLE "public"."orders" RENAME COLUMN "note" TO "remark""#,
                r#"ALTER TABLE "public"."orders" ALTER COLUMN "qty" TYPE bigint"#,
                r#"ALTER TABLE "public"."orders" DROP COLUMN "old""#,
            ]
        );
        let plan = destination_plan("wh", DestinationType::Duckdb, WireFormat::Json, "0/1", &[c]);
        assert_eq!(plan.actions.len(), 4);
    }

    #[test]
    fn encoded_outputs_get_a_version_and_the_formats_verdict() {
        let added = change(vec![ColumnChange::Added(col("email", 3, 25, "text"))]);
        let plan = destination_plan(
            "k",
            DestinationType::Kafka,
            WireFormat::Avro,
            "0/16B",
            &[added],
        );
        assert_eq!(
            plan.actions,
            [
                "public.orders: schema version 1 -> 2 from LSN 0/16B (+email text); Avro: compatible (added columns are nullable, dropped columns read as null by older readers)"
            ]
        );
        let retyped = change(vec![ColumnChange::Retyped {
            from: col("qty", 4, 23, "integer"),
            to: col("qty", 4, 25, "text"),
        }]);
        let plan = destination_plan(
            "k",
            DestinationType::Kafka,
            WireFormat::Avro,
            "0/16B",
            &[retyped],
        );
        assert!(plan.actions[0].contains("breaking"), "{:?}", plan.actions);
        let widened = change(vec![ColumnChange::Retyped {
            from: col("qty", 4, 23, "integer"),
            to: col("qty", 4, 20, "bigint"),
        }]);
        let plan = destination_plan(
            "k",
            DestinationType::S3,
            WireFormat::Parquet,
            "0/16B",
            &[widened],
        );
        assert!(plan.actions[0].contains("compatible"), "{:?}", plan.actions);
    }

    #[test]
    fn created_and_dropped_tables() {
        let created = TableChange {
            table: "public.n".into(),
            from_version: None,
            to_version: Some(1),
            changes: Vec::new(),
            columns: vec![col("id", 1, 23, "integer")],
            dropped: false,
        };
        assert_eq!(
            table_statements(&created),
            [r#"CREATE TABLE IF NOT EXISTS "public"."n" ("id" integer)"#]
        );
        let dropped = TableChange {
            dropped: true,
            to_version: None,
            ..created
        };
        assert_eq!(
            table_statements(&dropped),
            [r#"DROP TABLE IF EXISTS "public"."n""#]
        );
        let plan = destination_plan(
            "f",
            DestinationType::File,
            WireFormat::Json,
            "0/1",
            &[dropped],
        );
        assert!(plan.actions[0].contains("dropped"));
    }
}
