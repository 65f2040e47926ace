//! The `Destination` resource: one sink, with exactly one typed block matching `type`.
//! Option names and defaults come from the seeds' usage document.

use std::collections::BTreeMap;

use kube::CustomResource;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    Conditions, DurationString, SecretKeySelector, SecretReference, WireFormat,
    conditions_list_map, string_map,
};

/// One sink that Flows deliver changes to.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "wallaby.dev",
    version = "v1alpha1",
    kind = "Destination",
    namespaced,
    status = "DestinationStatus",
    shortname = "dst",
    category = "wallaby",
    doc = "A Destination is one sink (Kafka, S3, HTTP, files, ...) that Flows in the same namespace deliver changes to.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "(self.type == 'kafka') == has(self.kafka) && (self.type == 'bufstream') == has(self.bufstream) && (self.type == 's3') == has(self.s3) && (self.type == 'http') == has(self.http) && (self.type == 'grpc') == has(self.grpc) && (self.type == 'pgstream') == has(self.pgstream) && (self.type == 'duckdb') == has(self.duckdb) && (self.type == 'clickhouse') == has(self.clickhouse) && (self.type == 'snowflake') == has(self.snowflake) && (self.type == 'snowpipe') == has(self.snowpipe) && (self.type == 'ducklake') == has(self.ducklake) && (self.type == 'file') == has(self.file)"
).message("exactly one typed block must be set, and it must match spec.type (e.g. type: file with spec.file)"))]
#[serde(rename_all = "camelCase")]
pub struct DestinationSpec {
    /// Kind of sink; the block of the same name holds its options.
    #[serde(rename = "type")]
    pub kind: DestinationType,

    /// Encoding of batches; overrides the Flow's `wireFormat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<WireFormat>,

    /// Metadata columns appended to every table's columns (after the source columns):
    /// when the change was written, whether it deleted the row, its watermark and its
    /// source operation. Names must not exist in the source tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_columns: Option<MetaColumns>,

    /// Turn deletes into updates of the deleted row's key with the `deleted` metadata
    /// column set to true (the other columns are marked absent, so they keep their last
    /// values). Adds the `deleted` column even when `metaColumns.enabled` is false.
    #[serde(default)]
    pub soft_delete: bool,

    /// Turn updates and deletes into inserts (no old row), keeping the original operation
    /// in the `op` metadata column and flagging deletes in `deleted`: the destination gets
    /// an append-only history. Adds those two columns even when `metaColumns.enabled` is
    /// false; takes precedence over `softDelete` for deletes.
    #[serde(default)]
    pub append_mode: bool,

    /// Overrides of the PostgreSQL → wire type mapping, keyed by PostgreSQL type name:
    /// `string` (PostgreSQL's exact text, any type), `float64` (numeric as a double, lossy),
    /// `decimal(p,s)` (numeric as a fixed decimal in Arrow/Parquet/Avro, rounded) or `json`
    /// (json/jsonb as a JSON document), e.g. `numeric: decimal(18,4)`, `money: string`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = string_map)]
    pub type_mappings: BTreeMap<String, String>,

    /// Retries of a failed write or flush: exponential backoff with jitter; after
    /// `maxRetries` the Flow's `giveUpPolicy` and `failureMode` apply.
    #[serde(default)]
    pub retry: RetrySpec,

    /// Kafka options (`type: kafka`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSpec>,
    /// Bufstream options (`type: bufstream`); same as Kafka.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bufstream: Option<KafkaSpec>,
    /// S3 options (`type: s3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Spec>,
    /// HTTP webhook options (`type: http`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSpec>,
    /// gRPC ingest options (`type: grpc`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcSpec>,
    /// Postgres-backed stream options (`type: pgstream`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgstream: Option<PgStreamSpec>,
    /// DuckDB options (`type: duckdb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duckdb: Option<DuckDbSpec>,
    /// ClickHouse options (`type: clickhouse`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clickhouse: Option<ClickHouseSpec>,
    /// Snowflake options (`type: snowflake`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snowflake: Option<SnowflakeSpec>,
    /// Snowpipe options (`type: snowpipe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snowpipe: Option<SnowpipeSpec>,
    /// DuckLake options (`type: ducklake`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ducklake: Option<DuckLakeSpec>,
    /// Local-directory options (`type: file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileSpec>,
}

/// Kinds of destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DestinationType {
    /// Apache Kafka.
    Kafka,
    /// Bufstream (Kafka protocol).
    Bufstream,
    /// Amazon S3 or an S3-compatible store.
    S3,
    /// HTTP webhook.
    Http,
    /// gRPC `IngestService`.
    Grpc,
    /// Postgres-backed stream with consumer groups.
    Pgstream,
    /// DuckDB database file.
    Duckdb,
    /// ClickHouse.
    Clickhouse,
    /// Snowflake tables.
    Snowflake,
    /// Snowflake stage + COPY.
    Snowpipe,
    /// DuckLake catalog.
    Ducklake,
    /// Local directory of JSON-lines files.
    File,
}

impl DestinationType {
    /// The name used in `spec.type` and as the typed block's field name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kafka => "kafka",
            Self::Bufstream => "bufstream",
            Self::S3 => "s3",
            Self::Http => "http",
            Self::Grpc => "grpc",
            Self::Pgstream => "pgstream",
            Self::Duckdb => "duckdb",
            Self::Clickhouse => "clickhouse",
            Self::Snowflake => "snowflake",
            Self::Snowpipe => "snowpipe",
            Self::Ducklake => "ducklake",
            Self::File => "file",
        }
    }
}

impl DestinationSpec {
    /// Names of the typed blocks that are set, in declaration order.
    pub fn typed_blocks(&self) -> Vec<&'static str> {
        let set = [
            ("kafka", self.kafka.is_some()),
            ("bufstream", self.bufstream.is_some()),
            ("s3", self.s3.is_some()),
            ("http", self.http.is_some()),
            ("grpc", self.grpc.is_some()),
            ("pgstream", self.pgstream.is_some()),
            ("duckdb", self.duckdb.is_some()),
            ("clickhouse", self.clickhouse.is_some()),
            ("snowflake", self.snowflake.is_some()),
            ("snowpipe", self.snowpipe.is_some()),
            ("ducklake", self.ducklake.is_some()),
            ("file", self.file.is_some()),
        ];
        set.into_iter()
            .filter(|(_, on)| *on)
            .map(|(n, _)| n)
            .collect()
    }
}

/// Metadata columns (`meta_enabled` and friends in the seeds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetaColumns {
    /// Add all four metadata columns (those named `-` excepted).
    #[serde(default)]
    pub enabled: bool,
    /// Column (timestamptz) with the time the worker wrote the batch.
    #[serde(default = "default_synced_at")]
    pub synced_at: String,
    /// Column (bool) true for a change that deleted the row.
    #[serde(default = "default_deleted")]
    pub deleted: String,
    /// Column with the watermark (see `watermarkSource`); `-` leaves it out.
    #[serde(default = "default_watermark")]
    pub watermark: String,
    /// Column (text) with the source operation: insert, update or delete.
    #[serde(default = "default_op")]
    pub op: String,
    /// What the watermark holds: the transaction's commit `timestamp` (timestamptz) or
    /// its commit `lsn` (int8, the LSN as a 64-bit number, ordered like the WAL).
    #[serde(default)]
    pub watermark_source: WatermarkSource,
}

impl Default for MetaColumns {
    fn default() -> Self {
        Self {
            enabled: false,
            synced_at: default_synced_at(),
            deleted: default_deleted(),
            watermark: default_watermark(),
            op: default_op(),
            watermark_source: WatermarkSource::default(),
        }
    }
}

fn default_synced_at() -> String {
    "__ds_synced_at".into()
}
fn default_deleted() -> String {
    "__ds_is_deleted".into()
}
fn default_watermark() -> String {
    "__ds_watermark".into()
}
fn default_op() -> String {
    "__ds_op".into()
}

/// Source of the watermark column.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum WatermarkSource {
    /// Commit timestamp.
    #[default]
    Timestamp,
    /// Commit LSN.
    Lsn,
}

/// Local directory of JSON-lines files; the embedded default for demos and tests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileSpec {
    /// Directory the files are written to; created when missing.
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
    /// Start a new file once the current one reaches this many bytes.
    #[serde(default = "default_max_file_bytes")]
    #[schemars(range(min = 1024))]
    pub max_file_bytes: u64,
    /// Start a new file once the current one is this old.
    #[serde(default = "default_rotate_interval")]
    pub rotate_interval: DurationString,
}

fn default_max_file_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_rotate_interval() -> DurationString {
    "1h".into()
}

/// Kafka / Bufstream producer options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSpec {
    /// Bootstrap brokers, `host:port`.
    #[schemars(length(min = 1, max = 64))]
    pub brokers: Vec<String>,
    /// Topic, or a template with `{schema}` and `{table}`, e.g. `cdc.{schema}.{table}`.
    #[schemars(length(min = 1, max = 249))]
    pub topic: String,
    /// Record compression.
    #[serde(default)]
    pub compression: KafkaCompression,
    /// Acknowledgements the producer waits for.
    #[serde(default)]
    pub acks: KafkaAcks,
    /// Upper bound of a Kafka record batch in bytes.
    #[serde(default = "default_max_message_bytes")]
    #[schemars(range(min = 1024))]
    pub max_message_bytes: u64,
    /// Size-aware split threshold of encoded batches (default: `maxMessageBytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_bytes: Option<u64>,
    /// Hard cap of a single record (default: `maxMessageBytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_record_bytes: Option<u64>,
    /// What to do with a record above `maxRecordBytes`.
    #[serde(default)]
    pub oversize_policy: OversizePolicy,
    /// SASL settings; credentials come from `secretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<KafkaSasl>,
    /// TLS settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Secret with keys `username` and `password` for SASL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretReference>,
    /// How long the producer keeps retrying one record (broker down, leader election)
    /// before the batch fails and the flow's retry policy takes over.
    #[serde(default = "default_delivery_timeout")]
    pub delivery_timeout: DurationString,
}

fn default_max_message_bytes() -> u64 {
    900_000
}
fn default_delivery_timeout() -> DurationString {
    "30s".into()
}

/// Kafka compression codecs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KafkaCompression {
    /// No compression.
    #[default]
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4.
    Lz4,
    /// Zstandard.
    Zstd,
}

/// Kafka producer acks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KafkaAcks {
    /// All in-sync replicas (required for durability).
    #[default]
    All,
    /// The partition leader only.
    Leader,
    /// No acknowledgement.
    None,
}

/// Oversize record handling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OversizePolicy {
    /// Fail the batch.
    #[default]
    Error,
    /// Drop the record and count it.
    Drop,
}

/// SASL mechanism.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSasl {
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub mechanism: SaslMechanism,
}

/// SASL mechanisms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SaslMechanism {
    /// SASL/PLAIN.
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM-SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM-SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

/// TLS client settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Use TLS.
    #[serde(default)]
    pub enabled: bool,
    /// PEM CA bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<SecretKeySelector>,
    /// Server name to verify (default: the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// Client certificate (PEM) for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<SecretKeySelector>,
    /// Client key (PEM) for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<SecretKeySelector>,
}

/// S3 options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Spec {
    /// Bucket name.
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// Key prefix of every object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Region, including GovCloud (`us-gov-west-1`) and China (`cn-north-1`) partitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Endpoint of an S3-compatible store (MinIO, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`).
    #[serde(default)]
    pub force_path_style: bool,
    /// FIPS endpoints.
    #[serde(default)]
    pub use_fips: bool,
    /// Dual-stack endpoints.
    #[serde(default)]
    pub use_dualstack: bool,
    /// Secret with `accessKeyId`, `secretAccessKey` and optionally `sessionToken`; the SDK's
    /// default credential chain (IRSA, env, profile) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretReference>,
    /// Object compression.
    #[serde(default)]
    pub compression: ObjectCompression,
    /// Partitioning of object keys: `column` or `column:day|hour|month|year`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 8),
        inner(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*(:(day|hour|month|year))?$"))
    )]
    pub partition_by: Vec<String>,
}

/// Object compression.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ObjectCompression {
    /// None (Parquet still compresses its pages with its own codec).
    #[default]
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
    /// Zstandard.
    Zstd,
}

/// How a webhook / gRPC destination shapes its payload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PayloadMode {
    /// The encoded batch in the destination's format.
    #[default]
    Wire,
    /// One JSON envelope per record (table, op, key, before/after); ignores `format`.
    RecordJson,
    /// Alias of `recordJson`.
    Raw,
    /// pgoutput protocol messages of the table group, rebuilt from the decoded changes.
    Wal,
}

/// Retry and backoff options shared by request/response destinations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// Attempts after the first.
    #[serde(default = "default_max_retries")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_retries: u32,
    /// First backoff.
    #[serde(default = "default_backoff_base")]
    pub backoff_base: DurationString,
    /// Largest backoff.
    #[serde(default = "default_backoff_max")]
    pub backoff_max: DurationString,
    /// Growth factor between attempts.
    #[serde(default = "default_backoff_factor")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub backoff_factor: f64,
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            max_retries: default_max_retries(),
            backoff_base: default_backoff_base(),
            backoff_max: default_backoff_max(),
            backoff_factor: default_backoff_factor(),
        }
    }
}

fn default_max_retries() -> u32 {
    5
}
fn default_backoff_base() -> DurationString {
    "200ms".into()
}
fn default_backoff_max() -> DurationString {
    "30s".into()
}
fn default_backoff_factor() -> f64 {
    2.0
}
fn default_timeout() -> DurationString {
    "10s".into()
}

/// HTTP webhook options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpSpec {
    /// Target URL.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://"))]
    pub url: String,
    /// HTTP method.
    #[serde(default)]
    pub method: HttpMethod,
    /// Payload shape.
    #[serde(default)]
    pub payload_mode: PayloadMode,
    /// Per-request timeout.
    #[serde(default = "default_timeout")]
    pub timeout: DurationString,
    /// Extra headers (not secret).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = string_map)]
    pub headers: BTreeMap<String, String>,
    /// Secret whose keys are sent as headers (e.g. `Authorization`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_secret_ref: Option<SecretReference>,
    /// Retries and backoff.
    #[serde(default)]
    pub retry: RetrySpec,
    /// Header carrying the idempotency key, a hash of (table, key, lsn).
    #[serde(default = "default_idempotency_header")]
    pub idempotency_header: String,
}

fn default_idempotency_header() -> String {
    "Idempotency-Key".into()
}

/// HTTP methods accepted by the webhook destination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    /// POST.
    #[default]
    Post,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
}

/// gRPC ingest options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrpcSpec {
    /// `host:port` of the `IngestService`.
    #[schemars(length(min = 1, max = 1024))]
    pub endpoint: String,
    /// Payload shape, sent as metadata `x-wallaby-payload-mode`.
    #[serde(default)]
    pub payload_mode: PayloadMode,
    /// Plain-text connection.
    #[serde(default = "yes")]
    pub insecure: bool,
    /// TLS settings when `insecure` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Extra metadata headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = string_map)]
    pub headers: BTreeMap<String, String>,
    /// Per-request timeout.
    #[serde(default = "default_timeout")]
    pub timeout: DurationString,
    /// Retries and backoff.
    #[serde(default)]
    pub retry: RetrySpec,
    /// Flow id forwarded in each request (default: `namespace/flow`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_id: Option<String>,
    /// Logical destination name forwarded in each request (default: this object's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// Largest request the server accepts, in bytes (gRPC servers refuse messages above 4
    /// MiB by default). A table group whose request would be larger is split into several
    /// calls, each under the limit.
    #[serde(default = "default_grpc_max_message_bytes")]
    #[schemars(range(min = 65536))]
    pub max_message_bytes: u64,
}

fn default_grpc_max_message_bytes() -> u64 {
    4 * 1024 * 1024
}

fn yes() -> bool {
    true
}

/// Postgres-backed stream options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PgStreamSpec {
    /// Secret with key `dsn` of the stream database.
    pub secret_ref: SecretReference,
    /// Stream name (default: the Destination name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Default visibility timeout of pulled messages.
    #[serde(default = "default_visibility")]
    pub visibility_timeout: DurationString,
}

fn default_visibility() -> DurationString {
    "30s".into()
}

/// Row-level write options shared by table destinations.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TableWrite {
    /// Target schema (default: the source schema).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// Target table (default: the source table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// `target` applies changes row by row; `append` inserts every change.
    #[serde(default)]
    pub write_mode: WriteMode,
    /// `staging` lands backfill loads in staging tables first.
    #[serde(default)]
    pub batch_mode: BatchMode,
    /// How staged data is resolved into the target.
    #[serde(default)]
    pub batch_resolution: BatchResolution,
    /// Schema of staging tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging_schema: Option<String>,
    /// Name of the staging table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging_table: Option<String>,
    /// Suffix of staging tables (default `_staging`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging_suffix: Option<String>,
    /// Maintain the metadata table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_table_enabled: Option<bool>,
}

/// Table write mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum WriteMode {
    /// Apply inserts, updates and deletes.
    #[default]
    Target,
    /// Insert every change.
    Append,
}

/// Batch landing mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BatchMode {
    /// Write to the target.
    #[default]
    Target,
    /// Write to staging tables.
    Staging,
}

/// Staging resolution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BatchResolution {
    /// Leave staged data.
    #[default]
    None,
    /// Append staged rows to the target.
    Append,
    /// Replace the target with the staged rows.
    Replace,
}

/// DuckDB options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DuckDbSpec {
    /// Database file path (or `:memory:`).
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
    /// Table write options.
    #[serde(default)]
    pub write: TableWrite,
}

/// ClickHouse options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClickHouseSpec {
    /// Secret with key `dsn`.
    pub secret_ref: SecretReference,
    /// Database (default: the source schema).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// Table write options.
    #[serde(default)]
    pub write: TableWrite,
    /// Engine of the metadata table.
    #[serde(default = "default_meta_engine")]
    pub meta_engine: String,
    /// ORDER BY of the metadata table.
    #[serde(default = "default_meta_order_by")]
    pub meta_order_by: String,
}

fn default_meta_engine() -> String {
    "MergeTree".into()
}
fn default_meta_order_by() -> String {
    "flow_id, source_schema, source_table, key_json".into()
}

/// Snowflake options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnowflakeSpec {
    /// Secret with key `dsn` (`user:pass@account/db/schema?role=…`).
    pub secret_ref: SecretReference,
    /// Table write options.
    #[serde(default)]
    pub write: TableWrite,
    /// Schema of the metadata table.
    #[serde(default = "default_sf_meta_schema")]
    pub meta_schema: String,
    /// Name of the metadata table.
    #[serde(default = "default_sf_meta_table")]
    pub meta_table: String,
    /// Prefix of materialized primary-key columns.
    #[serde(default = "default_meta_pk_prefix")]
    pub meta_pk_prefix: String,
}

fn default_sf_meta_schema() -> String {
    "WALLABY_META".into()
}
fn default_sf_meta_table() -> String {
    "__METADATA".into()
}
fn default_meta_pk_prefix() -> String {
    "pk_".into()
}

/// Snowpipe options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnowpipeSpec {
    /// Secret with key `dsn`.
    pub secret_ref: SecretReference,
    /// Stage, e.g. `@my_stage` (or a table stage `@%schema.table`).
    #[schemars(length(min = 1))]
    pub stage: String,
    /// Prefix inside the stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_path: Option<String>,
    /// Target schema (required with `copyOnWrite`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// Target table (required with `copyOnWrite`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// Snowflake file format object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_format: Option<String>,
    /// Run `COPY INTO` after each upload.
    #[serde(default = "yes")]
    pub copy_on_write: bool,
    /// Only upload (Snowpipe auto-ingest copies).
    #[serde(default)]
    pub auto_ingest: bool,
    /// Maintain the metadata table.
    #[serde(default = "yes")]
    pub meta_table_enabled: bool,
}

/// DuckLake options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DuckLakeSpec {
    /// DuckDB connection string (file path).
    pub dsn: String,
    /// Metadata catalog location (`metadata.ducklake`, `postgres:…`, `sqlite:…`).
    pub catalog: String,
    /// Catalog alias.
    #[serde(default = "default_catalog_name")]
    pub catalog_name: String,
    /// Parquet data root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_path: Option<String>,
    /// Override the catalog's stored data path.
    #[serde(default)]
    pub override_data_path: bool,
    /// Install DuckDB extensions when missing.
    #[serde(default = "yes")]
    pub install_extensions: bool,
    /// Secret with credentials referenced by `catalog` (key `catalogDsn`), when it needs any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretReference>,
    /// Table write options.
    #[serde(default)]
    pub write: TableWrite,
}

fn default_catalog_name() -> String {
    "ducklake".into()
}

/// Observed state of a Destination.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DestinationStatus {
    /// Generation last validated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` after validation (and a connectivity check where cheap).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(transform = conditions_list_map)]
    pub conditions: Conditions,
    /// Flows in this namespace that use this destination.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub used_by: Vec<String>,
}
