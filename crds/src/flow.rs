//! The `Flow` resource: one PostgreSQL source (slot + publication) fanned out to
//! Destinations, run by a worker Deployment / Job / CronJob.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use kube::CustomResource;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    Conditions, DurationString, SecretKeySelector, SecretReference, WireFormat,
    conditions_list_map, named_list_map, string_map,
};

/// Desired state of a change-data-capture flow from one PostgreSQL database to one or more
/// Destinations.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "wallaby.dev",
    version = "v1alpha1",
    kind = "Flow",
    namespaced,
    status = "FlowStatus",
    shortname = "flw",
    category = "wallaby",
    doc = "A Flow streams row changes of a PostgreSQL database (logical replication, pgoutput) to one or more Destinations.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Display phase; see the conditions for the reason"),
    printcolumn(name = "Lag", type_ = "integer", json_path = ".status.lag.bytes", description = "WAL bytes between the server's current position and the confirmed checkpoint"),
    printcolumn(name = "Checkpoint", type_ = "string", json_path = ".status.checkpoint.lsn", description = "Last LSN confirmed to the replication slot"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 63").message("a Flow name must be at most 63 characters (it names the worker Deployment and its labels)"),
)]
#[x_kube(
    validation = Rule::new("self.ackPolicy != 'primary' || has(self.primaryDestination)").message("primaryDestination is required when ackPolicy is primary").reason(Reason::FieldValueRequired),
    validation = Rule::new("!has(self.primaryDestination) || self.destinations.exists(d, d.name == self.primaryDestination)").message("primaryDestination must name one of spec.destinations"),
    validation = Rule::new("self.mode != 'scheduled' || has(self.schedule)").message("schedule is required when mode is scheduled").reason(Reason::FieldValueRequired),
    validation = Rule::new("self.mode == 'scheduled' || !has(self.schedule)").message("schedule is only valid with mode: scheduled"),
)]
#[serde(rename_all = "camelCase")]
pub struct FlowSpec {
    /// Where changes come from.
    pub source: Source,

    /// Destinations (in this namespace) that receive every change. At least one.
    #[schemars(length(min = 1, max = 16))]
    #[schemars(transform = named_list_map)]
    pub destinations: Vec<DestinationRef>,

    /// Default encoding of batches for every destination; a Destination's `format` overrides it.
    #[serde(default)]
    pub wire_format: WireFormat,

    /// Maximum number of destinations written concurrently for one batch.
    #[serde(default = "default_parallelism")]
    #[schemars(range(min = 1, max = 64))]
    pub parallelism: u32,

    /// Which destinations must make a batch durable before the slot advances: `all` (the
    /// minimum over every destination) or `primary` (only `primaryDestination`; the others
    /// keep their own position in status and catch up).
    #[serde(default)]
    pub ack_policy: AckPolicy,

    /// Name of the destination that drives the slot when `ackPolicy` is `primary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub primary_destination: Option<String>,

    /// With `ackPolicy: primary`, the bound of each secondary destination's durable spool:
    /// the bytes of changes appended to it (on the worker's state volume, under
    /// `<stateDir>/spool/<destination>/`, fsynced before the slot may pass them) that the
    /// secondary has not yet made durable. A secondary catches up from its spool at its own
    /// pace, across restarts. Past the bound it is detached: its spool is deleted, it no
    /// longer holds back the slot, and status says from which LSN it stopped and that it
    /// must be re-synced (backfill). The primary is never slowed down by a secondary.
    #[serde(default = "default_secondary_buffer_bytes")]
    #[schemars(range(min = 65536))]
    pub secondary_buffer_bytes: u64,

    /// What happens to the replication slot after retries are exhausted: `holdSlot` keeps it
    /// (WAL is retained until the flow is repaired) or `dropSlot` drops it (WAL is released,
    /// changes in between are lost for this flow and a new snapshot is needed).
    #[serde(default)]
    pub failure_mode: FailureMode,

    /// When the worker gives up on a failing destination: `onRetryExhaustion` (after the
    /// destination's retries) or `never` (retry forever with capped backoff).
    #[serde(default)]
    pub give_up_policy: GiveUpPolicy,

    /// DDL governance: how captured schema changes are gated and applied.
    #[serde(default)]
    pub ddl: DdlPolicy,

    /// How the worker runs: `stream` (a Deployment with one replica), `backfill` (a Job that
    /// copies `snapshot.tables` and exits) or `scheduled` (a CronJob that drains the slot and
    /// exits on each run).
    #[serde(default)]
    pub mode: FlowMode,

    /// Cron schedule for `mode: scheduled`, e.g. `*/10 * * * *`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub schedule: Option<String>,

    /// Pause the flow: the worker is stopped and the slot (with its retained WAL) is kept.
    #[serde(default)]
    pub suspend: bool,

    /// Initial snapshot / backfill of existing rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotSpec>,

    /// One-shot replay from an LSN the slot still retains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplaySpec>,

    /// What happens to the slot and publication when the Flow is deleted: `retain` (default)
    /// keeps both; `delete` drops them.
    #[serde(default)]
    pub cleanup_policy: CleanupPolicy,

    /// Settings of the worker pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerSpec>,
}

fn default_parallelism() -> u32 {
    1
}

/// Source of a flow; exactly one block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// A PostgreSQL database read through logical replication with the `pgoutput` plugin.
    pub postgres: PostgresSource,
}

/// Connection, slot, publication and batching options of a PostgreSQL source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(
    validation = Rule::new("has(self.dsn) || has(self.secretRef)").message("set source.postgres.dsn or source.postgres.secretRef (a Secret with key `dsn`, or `host`/`user`/`password`)").reason(Reason::FieldValueRequired),
    validation = Rule::new("self.toastFetch != 'cache' || self.toastCacheSize > 0").message("toastCacheSize must be positive when toastFetch is cache"),
    validation = Rule::new("self.memoryBudgetBytes >= 2 * self.batchMaxBytes").message("memoryBudgetBytes must be at least twice batchMaxBytes (one batch is assembled while another is written)"),
)]
#[serde(rename_all = "camelCase")]
pub struct PostgresSource {
    /// Connection string without a password, e.g. `postgres://wallaby@db:5432/app`. Keys of
    /// `secretRef` (password, host, …) override its parts. Never put a password here: use
    /// `secretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("!self.matches('^[a-z]+://[^/@]*:[^/@]*@')").message("dsn must not contain a password: put it in the Secret named by secretRef (key `password`)"))]
    pub dsn: Option<String>,

    /// Secret with the connection: key `dsn` (a full connection string), or any of `host`,
    /// `port`, `user`, `password`, `dbname`, which override the parts of `dsn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretReference>,

    /// TLS mode, as libpq's `sslmode`. `verify-ca` / `verify-full` check the server
    /// certificate against `sslRootCert` (or the public web PKI roots when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_mode: Option<SslMode>,

    /// PEM CA bundle that signs the server certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_root_cert: Option<SecretKeySelector>,

    /// Logical replication slot the flow consumes. Immutable: a new slot is a new flow.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9_]+$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("slot is immutable: create a new Flow to use another slot"))]
    pub slot: String,

    /// Publication the slot decodes. Immutable.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z0-9_]+$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("publication is immutable: create a new Flow to use another publication"))]
    pub publication: String,

    /// Create the slot when it does not exist.
    #[serde(default = "yes")]
    pub create_slot: bool,

    /// Create the publication when it does not exist (for `tables`, `schemas`, or all tables).
    #[serde(default = "yes")]
    pub ensure_publication: bool,

    /// Tables of the publication, as `schema.table` (or `table` for `public`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024), inner(length(min = 1, max = 127)))]
    pub tables: Vec<String>,

    /// Schemas whose tables belong to the publication (`FOR TABLES IN SCHEMA`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63)))]
    pub schemas: Vec<String>,

    /// Reconcile the publication with `tables`/`schemas` at start: `off`, `add` (add missing
    /// tables and schemas) or `sync` (also drop tables and schemas that are not listed).
    #[serde(default)]
    pub sync_publication: SyncPublication,

    /// Maximum changes per batch handed to the destinations.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub batch_size: u32,

    /// A batch is flushed after this long even when it is not full.
    #[serde(default = "default_batch_timeout")]
    pub batch_timeout: DurationString,

    /// Maximum bytes of decoded changes per batch (a batch is cut at whichever of
    /// `batchSize`, `batchMaxBytes` or `batchTimeout` comes first; a cut inside a
    /// transaction never checkpoints).
    #[serde(default = "default_batch_max_bytes")]
    #[schemars(range(min = 1024))]
    pub batch_max_bytes: u64,

    /// Memory budget of the pipeline: bytes of changes held at once, in the batch being
    /// assembled and in batches not yet written by every destination. Reading from
    /// PostgreSQL pauses while it is spent. Must be at least twice `batchMaxBytes`.
    #[serde(default = "default_memory_budget_bytes")]
    #[schemars(range(min = 65536))]
    pub memory_budget_bytes: u64,

    /// Interval of standby status updates to PostgreSQL and of status reports.
    #[serde(default = "default_status_interval")]
    pub status_interval: DurationString,

    /// Emit empty batches (useful to mark progress on scheduled runs).
    #[serde(default)]
    pub emit_empty: bool,

    /// Resolve type OIDs through `pg_type` so extension types keep their names.
    #[serde(default = "yes")]
    pub resolve_types: bool,

    /// How unchanged TOAST columns of an UPDATE are filled: `off` (flagged as unchanged),
    /// `source` (re-select those columns by key), `full` (re-select the row), `cache`
    /// (last value seen, bounded by `toastCacheSize`).
    #[serde(default)]
    pub toast_fetch: ToastFetch,

    /// Entries of the LRU used by `toastFetch: cache`.
    #[serde(default = "default_toast_cache_size")]
    #[schemars(range(min = 0, max = 10_000_000))]
    pub toast_cache_size: u32,

    /// Install an event trigger that emits each DDL statement as a logical message.
    #[serde(default, rename = "captureDDL")]
    pub capture_ddl: bool,

    /// Schema of the DDL capture function.
    #[serde(default = "default_state_schema", rename = "ddlTriggerSchema")]
    #[schemars(length(min = 1, max = 63))]
    pub ddl_trigger_schema: String,

    /// Name of the DDL event trigger.
    #[serde(default = "default_ddl_trigger_name", rename = "ddlTriggerName")]
    #[schemars(length(min = 1, max = 63))]
    pub ddl_trigger_name: String,

    /// Prefix of the logical messages carrying DDL.
    #[serde(default = "default_ddl_prefix", rename = "ddlMessagePrefix")]
    #[schemars(length(min = 1, max = 63))]
    pub ddl_message_prefix: String,

    /// Check `wal_level`, `max_replication_slots`, `max_wal_senders` (and that one is free)
    /// and the REPLICATION privilege before starting.
    #[serde(default = "yes")]
    pub validate_replication: bool,

    /// Keep a durable source-state table (flow, slot, publication, last LSN) in the database.
    #[serde(default = "yes")]
    pub ensure_state: bool,

    /// Schema of the source-state table.
    #[serde(default = "default_state_schema")]
    #[schemars(length(min = 1, max = 63))]
    pub state_schema: String,

    /// Name of the source-state table.
    #[serde(default = "default_state_table")]
    #[schemars(length(min = 1, max = 63))]
    pub state_table: String,

    /// Stable id of this flow in the source-state table (`stateSchema`.`stateTable`). Default
    /// `<namespace>/<flow name>` (standalone: the Flow's `metadata.namespace`, default
    /// `default`, and `metadata.name`). Keep it when renaming or moving a Flow that should
    /// keep its state row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub flow_id: Option<String>,

    /// Authenticate with AWS RDS IAM instead of a password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_rds_iam: Option<AwsRdsIam>,
}

fn yes() -> bool {
    true
}
fn default_batch_size() -> u32 {
    100
}
fn default_secondary_buffer_bytes() -> u64 {
    64 << 20
}

fn default_batch_max_bytes() -> u64 {
    8 << 20
}

fn default_memory_budget_bytes() -> u64 {
    256 << 20
}

fn default_batch_timeout() -> DurationString {
    "1s".into()
}
fn default_status_interval() -> DurationString {
    "10s".into()
}
fn default_toast_cache_size() -> u32 {
    10_000
}
fn default_state_schema() -> String {
    "wallaby".into()
}
fn default_state_table() -> String {
    "source_state".into()
}
fn default_ddl_trigger_name() -> String {
    "wallaby_ddl_capture".into()
}
fn default_ddl_prefix() -> String {
    "wallaby_ddl".into()
}

/// RDS IAM authentication through the AWS SDK's default credential chain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AwsRdsIam {
    /// Region of the database; inferred from an RDS host name when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Shared-config profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Role to assume before generating the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    /// Session name of the assumed role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_session_name: Option<String>,
    /// External id of the assumed role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_external_id: Option<String>,
    /// AWS endpoint override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// libpq `sslmode` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Plain text first, TLS if the server insists.
    Allow,
    /// TLS when the server offers it, without verifying the certificate (libpq's default).
    #[default]
    Prefer,
    /// TLS required, certificate not verified.
    Require,
    /// TLS required, certificate chain verified.
    VerifyCa,
    /// TLS required, certificate chain and host name verified.
    VerifyFull,
}

/// Reference from a Flow to a Destination of the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRef {
    /// Name of the Destination object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Which destinations gate the slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AckPolicy {
    /// Every destination must make a batch durable.
    #[default]
    All,
    /// Only `primaryDestination` must.
    Primary,
}

/// Fate of the slot after retries are exhausted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FailureMode {
    /// Keep the slot (and its WAL).
    #[default]
    HoldSlot,
    /// Drop the slot, releasing WAL.
    DropSlot,
}

/// When to give up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum GiveUpPolicy {
    /// After the destination's retries.
    #[default]
    OnRetryExhaustion,
    /// Never.
    Never,
}

/// How the worker runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FlowMode {
    /// Continuous streaming (Deployment, 1 replica, Recreate).
    #[default]
    Stream,
    /// One-off copy of existing rows (Job).
    Backfill,
    /// Periodic drain of the slot (CronJob).
    Scheduled,
}

/// Publication reconciliation at start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SyncPublication {
    /// Leave the publication as it is.
    #[default]
    Off,
    /// Add tables and schemas that are missing.
    Add,
    /// Add missing tables and schemas and drop the ones not listed.
    Sync,
}

/// Unchanged-TOAST handling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ToastFetch {
    /// Emit partial updates with the unchanged column names.
    #[default]
    Off,
    /// Re-select the unchanged columns by key.
    Source,
    /// Re-select the whole row by key.
    Full,
    /// Fill from an in-memory LRU of values seen before.
    Cache,
}

/// Deletion behaviour for the slot and publication.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CleanupPolicy {
    /// Keep slot and publication.
    #[default]
    Retain,
    /// Drop slot and publication.
    Delete,
}

/// DDL governance of a flow. A field left unset takes the operator-wide default (the
/// `WALLABY_DDL_GATE`, `WALLABY_DDL_AUTO_APPROVE`, `WALLABY_DDL_AUTO_APPLY` environment of the
/// operator, handed to its workers; the same variables in standalone mode), else accept and
/// apply: `gate: false`, `autoApprove: true`, `autoApply: true`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DdlPolicy {
    /// Stop before each captured DDL statement that touches the flow's tables, create a
    /// DDLApproval and wait for its decision (needs `source.postgres.captureDDL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<bool>,
    /// Approve gated statements without a human (the DDLApproval is still created, already
    /// `Approved`, as the record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_approve: Option<bool>,
    /// Apply an approved statement to the destinations and resume without a confirmation;
    /// `false`: the flow waits, after approval, until someone confirms the change was
    /// applied (annotation `wallaby.dev/applied: "true"` on the DDLApproval, or
    /// `wallaby-worker ddl apply`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_apply: Option<bool>,
}

/// The DDL policy with every field decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EffectiveDdlPolicy {
    /// Stop before captured statements and ask for a decision.
    pub gate: bool,
    /// Decide `Approved` without a human.
    pub auto_approve: bool,
    /// Apply without waiting for a confirmation.
    pub auto_apply: bool,
}

impl Default for EffectiveDdlPolicy {
    fn default() -> Self {
        Self {
            gate: false,
            auto_approve: true,
            auto_apply: true,
        }
    }
}

impl EffectiveDdlPolicy {
    /// Whether a captured statement stops the flow until a human acts: a decision is needed
    /// (gated, not auto-approved) or an apply confirmation is (not auto-applied).
    pub fn stops(&self) -> bool {
        (self.gate && !self.auto_approve) || !self.auto_apply
    }

    /// Whether a statement gets a DDLApproval (a record to decide on or confirm).
    pub fn records_approval(&self) -> bool {
        self.gate || !self.auto_apply
    }
}

impl DdlPolicy {
    /// Each field from the flow, else from `defaults` (operator-wide).
    pub fn effective(&self, defaults: EffectiveDdlPolicy) -> EffectiveDdlPolicy {
        EffectiveDdlPolicy {
            gate: self.gate.unwrap_or(defaults.gate),
            auto_approve: self.auto_approve.unwrap_or(defaults.auto_approve),
            auto_apply: self.auto_apply.unwrap_or(defaults.auto_apply),
        }
    }
}

/// Initial snapshot / backfill options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSpec {
    /// Copy existing rows before streaming (stream mode): everything when the worker creates
    /// the slot, later only what the plan lacks (a table added to the flow) or left
    /// unfinished (an interrupted copy). `mode: backfill` always copies.
    #[serde(default)]
    pub initial: bool,
    /// Tables to copy, as `schema.table`; all tables of the publication when empty
    /// (`wallaby-worker backfill --tables` overrides it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024), inner(length(min = 1, max = 127)))]
    pub tables: Vec<String>,
    /// Parallel copy workers (one connection each) across tables and partitions.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    pub workers: u32,
    /// Column used to hash-partition a table (`hashtext(column::text)`); tables without it,
    /// and every table when unset, are split into ranges of heap pages (ctid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_column: Option<String>,
    /// Partitions per table (the unit of parallelism and of resumption).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 4096))]
    pub partition_count: u32,
    /// Rows per batch while copying, in place of the source's `batchSize` (which is sized
    /// for the stream's latency): a copy is throughput-bound, and the `file` and `s3`
    /// destinations write one file or object per table per batch.
    #[serde(default = "default_snapshot_batch_size")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub batch_size: u32,
    /// Copy inside one exported snapshot: the new slot's (`EXPORT_SNAPSHOT`), so the
    /// hand-off to streaming loses and doubles nothing (a backfill: one
    /// `pg_export_snapshot()` all workers share). `false`: each partition reads the data
    /// current when it starts; the stream still replays every change after the slot's
    /// position (at-least-once). Later copies (added tables) use watermarks either way.
    #[serde(default = "yes")]
    pub consistent: bool,
    /// Where per-partition progress is kept so a restarted worker copies only unfinished
    /// partitions: `postgres` (a table in the source database), `file` (`statePath`) or
    /// `none` (no resumption; an existing slot is then never snapshotted again).
    #[serde(default)]
    pub state_backend: SnapshotStateBackend,
    /// Schema of the snapshot-state table (`stateBackend: postgres`).
    #[serde(default = "default_state_schema")]
    pub state_schema: String,
    /// Name of the snapshot-state table (`stateBackend: postgres`).
    #[serde(default = "default_snapshot_state_table")]
    pub state_table: String,
    /// Path of the state file (`stateBackend: file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_path: Option<String>,
}

fn one() -> u32 {
    1
}
fn default_snapshot_batch_size() -> u32 {
    10_000
}
fn default_snapshot_state_table() -> String {
    "snapshot_state".into()
}

/// Snapshot progress store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SnapshotStateBackend {
    /// A table in the source database.
    #[default]
    Postgres,
    /// A local file.
    File,
    /// No resumption.
    None,
}

/// One-shot replay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReplaySpec {
    /// LSN to restart streaming from, e.g. `0/16B6C50`; the slot must still retain it.
    #[serde(rename = "startLSN")]
    #[schemars(regex(pattern = r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$"))]
    pub start_lsn: String,
}

/// Worker pod settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    /// Worker image; the operator's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Image pull policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// CPU / memory requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Service account; the operator creates a least-privilege one when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Node selector of the worker pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = string_map)]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the worker pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Extra environment variables (e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Annotations of the worker pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = string_map)]
    pub annotations: BTreeMap<String, String>,
}

/// Observed state of a Flow, written by the operator and the worker.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowStatus {
    /// Generation of the spec the operator last reconciled successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Display phase (`Pending`, `Running`, `Suspended`, `Gated`, `Degraded`, `Failed`,
    /// `Completed`); automation should read `conditions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<FlowPhase>,
    /// `Ready`, `Progressing`, `Degraded`, `DDLGated`, `SlotHealthy`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(transform = conditions_list_map)]
    pub conditions: Conditions,
    /// Last position confirmed to the slot (every required destination made it durable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    /// Position and last error of each destination.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(transform = named_list_map)]
    pub destinations: Vec<DestinationProgress>,
    /// How far the flow trails the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<Lag>,
    /// The replication slot as PostgreSQL reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<SlotStatus>,
    /// Snapshot progress per table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshot: Vec<TableSnapshotProgress>,
    /// The worker workload the operator manages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadRef>,
    /// Totals since the worker started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<Counters>,
    /// The last schema change seen on the flow's tables: a captured DDL statement, or, with
    /// `captureDDL` off, drift found in the stream's relation descriptions. Every version is
    /// kept in the schema-history table of the source's state schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schema_change: Option<SchemaChange>,
    /// The last `spec.replay` the operator handed to the worker (`--start-lsn`), and when the
    /// worker started with it; a replay runs once per `startLSN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplayStatus>,
}

/// Progress of a one-shot replay (`spec.replay`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplayStatus {
    /// The `startLSN` that was requested.
    #[serde(rename = "startLSN")]
    pub start_lsn: String,
    /// When the operator put `--start-lsn` into the worker's arguments (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_time: Option<String>,
    /// When a worker started with it (RFC 3339); from then on the argument is dropped, so a
    /// later restart resumes from the slot instead of replaying again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_time: Option<String>,
}

/// Display phase of a Flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FlowPhase {
    /// Accepted, worker not running yet.
    Pending,
    /// Streaming.
    Running,
    /// `suspend: true`.
    Suspended,
    /// Stopped before a DDL awaiting approval.
    Gated,
    /// Running with errors (retrying).
    Degraded,
    /// Stopped on a permanent error.
    Failed,
    /// A backfill or scheduled run finished.
    Completed,
}

/// A confirmed position.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    /// LSN, e.g. `0/16B6C50`.
    pub lsn: String,
    /// Commit time of the last transaction at or before `lsn` (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

/// Progress of one destination.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DestinationProgress {
    /// Destination name.
    pub name: String,
    /// Highest LSN this destination made durable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// Last error, cleared on the next success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When `lastError` happened (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_time: Option<String>,
}

/// Lag of the flow.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lag {
    /// WAL bytes between the server's current LSN and the checkpoint.
    pub bytes: u64,
    /// Seconds between now and the commit time of the checkpointed transaction, when changes
    /// are pending; 0 when caught up.
    pub seconds: f64,
}

/// The replication slot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlotStatus {
    /// Slot name.
    pub name: String,
    /// A walsender is attached.
    pub active: bool,
    /// WAL the slot holds back (`pg_current_wal_lsn() - restart_lsn`).
    pub retained_wal_bytes: u64,
    /// `confirmed_flush_lsn` of the slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_flush_lsn: Option<String>,
}

/// Snapshot progress of a table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TableSnapshotProgress {
    /// `schema.table`.
    pub table: String,
    /// `Pending`, `Copying`, `Done` or `Failed`.
    pub state: String,
    /// Rows copied so far.
    pub rows_copied: u64,
    /// Partitions finished.
    pub partitions_done: u32,
    /// Partitions in all.
    pub partitions_total: u32,
}

/// Reference to the worker workload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    /// `Deployment`, `Job` or `CronJob`.
    pub kind: String,
    /// Object name.
    pub name: String,
}

/// A schema change of one table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchemaChange {
    /// `schema.table`.
    pub table: String,
    /// The table's schema version from this change on (carried by every record).
    pub version: u32,
    /// Position of the change (the DDL message, or the first change with the new shape).
    pub lsn: String,
    /// `ddl` (captured statement) or `stream` (drift seen in a relation description).
    pub source: String,
    /// What changed, e.g. `+email text; qty int4 -> int8`.
    pub summary: String,
}

/// Counters since the worker started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Counters {
    /// Committed transactions delivered.
    pub transactions: u64,
    /// Row changes delivered (inserts + updates + deletes).
    pub rows: u64,
    /// Inserts delivered.
    pub inserts: u64,
    /// Updates delivered.
    pub updates: u64,
    /// Deletes delivered.
    pub deletes: u64,
    /// Truncates delivered.
    pub truncates: u64,
    /// Batches made durable.
    pub batches: u64,
    /// Encoded bytes made durable.
    pub bytes: u64,
}
