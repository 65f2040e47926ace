//! DDL capture on the source: the event triggers that turn every DDL command into a
//! transactional logical message (so it reaches the stream at its exact LSN, inside its
//! transaction), and the parsed form of those messages.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use wallaby_crds::flow::PostgresSource;

use super::DdlError;
use wallaby_pg::quote_ident;

/// Advisory lock serialising concurrent installs (two workers starting together).
const INSTALL_LOCK_KEY: i64 = 0x7761_6c6c_6162_7902;

/// Version of the installed function bodies; a worker reinstalls older ones.
pub const CAPTURE_VERSION: u32 = 1;

/// Where the capture lives and what it emits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureSpec {
    /// Schema of the functions.
    pub schema: String,
    /// Name of the `ddl_command_end` event trigger (`<name>_drop` is the `sql_drop` one).
    pub trigger: String,
    /// Prefix of the emitted messages.
    pub prefix: String,
}

impl CaptureSpec {
    /// The capture a flow's source asks for.
    pub fn of(pg: &PostgresSource) -> Self {
        Self {
            schema: pg.ddl_trigger_schema.clone(),
            trigger: pg.ddl_trigger_name.clone(),
            prefix: pg.ddl_message_prefix.clone(),
        }
    }

    fn drop_trigger(&self) -> String {
        format!("{}_drop", self.trigger)
    }

    /// The SQL installing (or refreshing) the capture: idempotent, one transaction.
    pub fn install_sql(&self) -> String {
        let schema = quote_ident(&self.schema);
        let columns_fn = format!(
            "{schema}.{}",
            quote_ident(&format!("{}_columns", self.trigger))
        );
        let end_fn = format!("{schema}.{}", quote_ident(&format!("{}_fn", self.trigger)));
        let drop_fn = format!(
            "{schema}.{}",
            quote_ident(&format!("{}_drop_fn", self.trigger))
        );
        let prefix = self.prefix.replace('\'', "''");
        let end_trigger = quote_ident(&self.trigger);
        let drop_trigger = quote_ident(&self.drop_trigger());
        let end_name = self.trigger.replace('\'', "''");
        let drop_name = self.drop_trigger().replace('\'', "''");
        // The functions run as their owner (the installing superuser), so any role's DDL can
        // emit the message; an error in them fails the statement rather than letting it
        // pass uncaptured. The column list is what pgoutput publishes (no dropped or generated columns), with
        // the attribute number (stable across renames, so a rename is told from drop + add)
        // and the replica-identity flag pgoutput sets on key columns.
        format!(
            r#"SELECT pg_advisory_xact_lock({INSTALL_LOCK_KEY});
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE OR REPLACE FUNCTION {columns_fn}(rel oid) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $wallaby$
  SELECT coalesce(jsonb_agg(jsonb_build_object(
           'name', a.attname,
           'attnum', a.attnum,
           'typeOid', a.atttypid::int8,
           'typeMod', a.atttypmod,
           'type', format_type(a.atttypid, a.atttypmod),
           'notNull', a.attnotnull,
           'key', coalesce(CASE c.relreplident
             WHEN 'f' THEN true
             WHEN 'n' THEN false
             WHEN 'i' THEN a.attnum = ANY (coalesce((SELECT i.indkey::int2[] FROM pg_index i WHERE i.indrelid = rel AND i.indisreplident LIMIT 1), '{{}}'::int2[]))
             ELSE a.attnum = ANY (coalesce((SELECT i.indkey::int2[] FROM pg_index i WHERE i.indrelid = rel AND i.indisprimary LIMIT 1), '{{}}'::int2[]))
           END, false)
         ) ORDER BY a.attnum), '[]'::jsonb)
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
  WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
$wallaby$;
COMMENT ON FUNCTION {columns_fn}(oid) IS 'wallaby ddl capture v{CAPTURE_VERSION}';
CREATE OR REPLACE FUNCTION {end_fn}() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $wallaby$
DECLARE
  cmd record;
  objects jsonb := '[]'::jsonb;
BEGIN
  FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
    IF cmd.classid = 'pg_catalog.pg_class'::regclass AND cmd.object_type IN ('table', 'table column', 'foreign table') THEN
      objects := objects || jsonb_build_array(jsonb_build_object(
        'type', cmd.object_type,
        'identity', cmd.object_identity,
        'schema', cmd.schema_name,
        'name', (SELECT c.relname FROM pg_class c WHERE c.oid = cmd.objid),
        'tag', cmd.command_tag,
        'columns', {columns_fn}(cmd.objid)));
    ELSE
      objects := objects || jsonb_build_array(jsonb_build_object(
        'type', cmd.object_type,
        'identity', cmd.object_identity,
        'schema', cmd.schema_name,
        'tag', cmd.command_tag));
    END IF;
  END LOOP;
  IF jsonb_array_length(objects) > 0 THEN
    PERFORM pg_logical_emit_message(true, '{prefix}', jsonb_build_object(
      'v', {CAPTURE_VERSION}, 'kind', 'ddl', 'tag', tg_tag,
      'statement', current_query(), 'objects', objects)::text);
  END IF;
END
$wallaby$;
CREATE OR REPLACE FUNCTION {drop_fn}() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $wallaby$
DECLARE
  obj record;
  objects jsonb := '[]'::jsonb;
BEGIN
  -- Dropped columns come with the table's ddl_command_end message (its new column list);
  -- only whole tables are reported here.
  FOR obj IN SELECT * FROM pg_event_trigger_dropped_objects() WHERE object_type IN ('table', 'foreign table') AND NOT is_temporary LOOP
    objects := objects || jsonb_build_array(jsonb_build_object(
      'type', obj.object_type,
      'identity', obj.object_identity,
      'schema', obj.schema_name,
      'name', obj.object_name,
      'tag', tg_tag,
      'dropped', true));
  END LOOP;
  IF jsonb_array_length(objects) > 0 THEN
    PERFORM pg_logical_emit_message(true, '{prefix}', jsonb_build_object(
      'v', {CAPTURE_VERSION}, 'kind', 'drop', 'tag', tg_tag,
      'statement', current_query(), 'objects', objects)::text);
  END IF;
END
$wallaby$;
DO $wallaby$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = '{end_name}') THEN
    CREATE EVENT TRIGGER {end_trigger} ON ddl_command_end EXECUTE FUNCTION {end_fn}();
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = '{drop_name}') THEN
    CREATE EVENT TRIGGER {drop_trigger} ON sql_drop EXECUTE FUNCTION {drop_fn}();
  END IF;
END
$wallaby$;"#
        )
    }

    /// Whether this capture (both triggers, enabled, at [`CAPTURE_VERSION`], emitting
    /// this prefix) is already in place — then a worker without the privilege to install
    /// it can still run.
    pub async fn installed(&self, client: &Client) -> Result<bool, DdlError> {
        let row = client
            .query_one(
                "SELECT
                   (SELECT count(*) FROM pg_event_trigger WHERE evtname IN ($1, $2) AND evtenabled <> 'D'),
                   coalesce((SELECT obj_description(p.oid, 'pg_proc') FROM pg_proc p
                     JOIN pg_namespace n ON n.oid = p.pronamespace
                     WHERE n.nspname = $3 AND p.proname = $4 LIMIT 1), ''),
                   coalesce((SELECT p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                     WHERE n.nspname = $3 AND p.proname = $5 LIMIT 1), '')",
                &[
                    &self.trigger,
                    &self.drop_trigger(),
                    &self.schema,
                    &format!("{}_columns", self.trigger),
                    &format!("{}_fn", self.trigger),
                ],
            )
            .await
            .map_err(|e| DdlError::sql("looking up the DDL event triggers", e))?;
        let triggers: i64 = row.get(0);
        let comment: String = row.get(1);
        let body: String = row.get(2);
        Ok(triggers == 2
            && comment == format!("wallaby ddl capture v{CAPTURE_VERSION}")
            && body.contains(&format!("'{}'", self.prefix.replace('\'', "''"))))
    }

    /// Installs the capture unless it is already in place.
    pub async fn ensure(&self, client: &Client) -> Result<bool, DdlError> {
        if self.installed(client).await? {
            return Ok(false);
        }
        client.batch_execute(&self.install_sql()).await.map_err(|e| {
            let denied = e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE);
            let message = e
                .as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_else(|| e.to_string());
            DdlError::Install {
                trigger: self.trigger.clone(),
                message,
                hint: if denied {
                    "event triggers can only be created by a superuser on PostgreSQL 15: run `wallaby-worker ddl install -f <flow.yaml>` once as a superuser (or the SQL in docs/ddl.md), or set source.postgres.captureDDL: false".into()
                } else {
                    "check ddlTriggerSchema / ddlTriggerName, or set source.postgres.captureDDL: false".into()
                },
            }
        })?;
        tracing::info!(trigger = %self.trigger, schema = %self.schema, prefix = %self.prefix, "installed the DDL capture event triggers");
        Ok(true)
    }
}

/// A column as the capture reports it after the statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CapturedColumn {
    /// Column name.
    pub name: String,
    /// Attribute number: stable across renames.
    #[serde(default)]
    pub attnum: Option<i32>,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier (`-1`: none).
    pub type_mod: i32,
    /// `format_type` of the column.
    #[serde(rename = "type", default)]
    pub type_name: String,
    /// `NOT NULL`.
    #[serde(default)]
    pub not_null: bool,
    /// Part of the replica identity (the key pgoutput flags).
    #[serde(default)]
    pub key: bool,
}

/// One object a captured statement touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CapturedObject {
    /// `table`, `table column`, `index`, `sequence`, …
    #[serde(rename = "type")]
    pub object_type: String,
    /// `pg_identify_object` identity, e.g. `public.orders`.
    pub identity: String,
    /// Schema of the object.
    #[serde(default)]
    pub schema: Option<String>,
    /// Table name (tables only).
    #[serde(default)]
    pub name: Option<String>,
    /// Command tag of the (sub)command.
    #[serde(default)]
    pub tag: Option<String>,
    /// The table's published columns after the statement (tables only, not when dropped).
    #[serde(default)]
    pub columns: Option<Vec<CapturedColumn>>,
    /// The table was dropped.
    #[serde(default)]
    pub dropped: bool,
}

impl CapturedObject {
    /// `schema.table` when the object is a table.
    pub fn table(&self) -> Option<String> {
        if !matches!(
            self.object_type.as_str(),
            "table" | "table column" | "foreign table"
        ) {
            return None;
        }
        match (&self.schema, &self.name) {
            (Some(s), Some(n)) => Some(format!("{s}.{n}")),
            _ => None,
        }
    }
}

/// The payload of one capture message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapturedDdl {
    /// Payload version.
    #[serde(default)]
    pub v: u32,
    /// `ddl` (`ddl_command_end`) or `drop` (`sql_drop`).
    pub kind: String,
    /// Command tag, e.g. `ALTER TABLE`.
    pub tag: String,
    /// The statement as submitted (the whole query string of the client).
    pub statement: String,
    /// What it touched.
    pub objects: Vec<CapturedObject>,
}

impl CapturedDdl {
    /// Parses a message payload.
    pub fn parse(content: &[u8]) -> Result<Self, DdlError> {
        serde_json::from_slice(content).map_err(|e| DdlError::Message(e.to_string()))
    }

    /// Tables touched, `schema.table`, each once, in order.
    pub fn tables(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for t in self.objects.iter().filter_map(CapturedObject::table) {
            if !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }

    /// The column list after the statement of `table` (the last report of it), `None` when
    /// the table was dropped or not reported with columns.
    pub fn columns_of(&self, table: &str) -> Option<&[CapturedColumn]> {
        self.objects
            .iter()
            .rev()
            .filter(|o| o.table().as_deref() == Some(table) && !o.dropped)
            .find_map(|o| o.columns.as_deref())
    }

    /// Whether `table` was dropped by the statement.
    pub fn drops(&self, table: &str) -> bool {
        self.objects
            .iter()
            .any(|o| o.dropped && o.table().as_deref() == Some(table))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_lists_each_table_once_with_its_last_columns() {
        let text = r#"{"v":1,"kind":"ddl","tag":"ALTER TABLE","statement":"ALTER TABLE t ADD b int",
            "objects":[
              {"type":"table","identity":"public.t","schema":"public","name":"t","tag":"ALTER TABLE",
               "columns":[{"name":"a","attnum":1,"typeOid":23,"typeMod":-1,"type":"integer","notNull":true,"key":true}]},
              {"type":"index","identity":"public.t_pkey","schema":"public","tag":"CREATE INDEX"},
              {"type":"table","identity":"public.t","schema":"public","name":"t","tag":"ALTER TABLE",
               "columns":[{"name":"a","attnum":1,"typeOid":23,"typeMod":-1,"type":"integer","notNull":true,"key":true},
                          {"name":"b","attnum":2,"typeOid":23,"typeMod":-1,"type":"integer","notNull":false,"key":false}]}]}"#;
        let ddl = CapturedDdl::parse(text.as_bytes()).unwrap();
        assert_eq!(ddl.tables(), ["public.t"]);
        assert_eq!(ddl.columns_of("public.t").unwrap().len(), 2);
        assert!(!ddl.drops("public.t"));
    }

    #[test]
    fn a_drop_message_reports_the_dropped_table() {
        let text = r#"{"v":1,"kind":"drop","tag":"DROP TABLE","statement":"DROP TABLE t",
            "objects":[{"type":"table","identity":"public.t","schema":"public","name":"t","dropped":true}]}"#;
        let ddl = CapturedDdl::parse(text.as_bytes()).unwrap();
        assert!(ddl.drops("public.t"));
        assert!(ddl.columns_of("public.t").is_none());
    }

    #[test]
    fn a_foreign_payload_is_a_precise_error() {
        let err = CapturedDdl::parse(b"not json").unwrap_err();
        assert!(err.to_string().contains("DDL message"), "{err}");
    }
}
