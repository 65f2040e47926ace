//! The `s3` destination: every batch becomes one object per (table schema version,
//! partition) in a bucket of Amazon S3 or an S3-compatible store. Object keys derive only
//! from the content (table, schema version, LSN range, partition), so a batch delivered
//! again after a crash overwrites the same objects. A write is durable when PutObject (or
//! CompleteMultipartUpload) succeeded.
//!
//! ```text
//! ChangeBatch ─▶ per table group ─▶ split by partition_by ─▶ encode(format) ─▶ [gzip]
//!     (snapshot pieces without partition_by arrive encoded by the copy workers)
//!     ─▶ PutObject (≤ one part) | CreateMultipartUpload → UploadPart… → Complete (abort on error)
//! ```

use std::collections::BTreeMap;
use std::io::Write as _;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use chrono::{DateTime, Datelike as _, NaiveDate, Timelike as _};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use wallaby_codec::{Change, Op, TableSchema, Value, WireFormat};
use wallaby_crds::destination::{DestinationSpec, ObjectCompression, S3Spec};
use wallaby_crds::{DestinationType, Flow};

use wallaby_pipeline::batch::ChangeBatch;
use wallaby_pipeline::destination::{
    Destination, DestinationError, PayloadEncoding, TypeOverrides, WriteAck,
};

use crate::registry::{OpenError, Registration, SecretSource};

/// Default part size of multipart uploads; an object larger than one part is uploaded in
/// parts.
pub const DEFAULT_PART_BYTES: usize = 8 * 1024 * 1024;
/// Smallest part S3 accepts for every part but the last: `CompleteMultipartUpload`
/// answers `EntityTooSmall` below it (AWS, MinIO and s3s-fs alike), so a smaller knob
/// would turn every large batch into a permanent error.
pub const MIN_PART_BYTES: usize = 5 * 1024 * 1024;
/// Most parts one multipart upload may have.
pub const MAX_PARTS: usize = 10_000;
/// Environment knob overriding [`DEFAULT_PART_BYTES`] (≥ [`MIN_PART_BYTES`]).
pub const PART_BYTES_ENV: &str = "WALLABY_S3_PART_BYTES";
/// Keys of the credentials Secret.
pub const SECRET_KEYS: [&str; 3] = ["accessKeyId", "secretAccessKey", "sessionToken"];
/// Region used when neither the spec nor the default chain names one (needed to sign).
const FALLBACK_REGION: &str = "us-east-1";
/// Hive's name for the partition of NULL (and not sent) values, understood by Spark,
/// Hive, Trino and Athena.
pub const NULL_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";

/// Characters escaped in a partition value: everything but `A-Za-z0-9-_.`, so a value
/// never adds a `/` (a level) or an `=` to the key.
const PARTITION_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');

/// Time granularity of a `partition_by` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// `YYYY`.
    Year,
    /// `YYYY-MM`.
    Month,
    /// `YYYY-MM-DD`.
    Day,
    /// `YYYY-MM-DDTHH`.
    Hour,
}

/// One `partition_by` entry: `column` or `column:day|hour|month|year`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionField {
    /// Column name.
    pub column: String,
    /// Truncation of a date/timestamp value; `None` keeps the value's text.
    pub granularity: Option<Granularity>,
}

impl PartitionField {
    /// Parses `column` or `column:granularity`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (column, granularity) = match text.split_once(':') {
            None => (text, None),
            Some((c, g)) => {
                let g = match g {
                    "year" => Granularity::Year,
                    "month" => Granularity::Month,
                    "day" => Granularity::Day,
                    "hour" => Granularity::Hour,
                    other => {
                        return Err(format!(
                            "{text:?}: unknown granularity {other:?}; use day, hour, month or year"
                        ));
                    }
                };
                (c, Some(g))
            }
        };
        let valid = column
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && column
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!(
                "{text:?}: the column must be an identifier ([A-Za-z_][A-Za-z0-9_]*), optionally followed by :day, :hour, :month or :year"
            ));
        }
        Ok(Self {
            column: column.to_owned(),
            granularity,
        })
    }

    /// The `column=value/` key segment of a row.
    fn segment(&self, schema: &TableSchema, change: &Change) -> Result<String, String> {
        let Some(index) = schema.columns.iter().position(|c| c.name == self.column) else {
            return Err(format!(
                "partition column {:?} is not a column of {}",
                self.column,
                schema.qualified_name()
            ));
        };
        // Deletes carry only `before`; with a key-only replica identity a non-key column is
        // absent there and the change lands in the NULL partition.
        let row = change.after.as_ref().or(change.before.as_ref());
        let value = row
            .filter(|r| !r.absent.contains(&index))
            .and_then(|r| r.values.get(index))
            .unwrap_or(&Value::Null);
        let text = match (value, self.granularity) {
            (Value::Null, _) => return Ok(format!("{}={NULL_PARTITION}/", self.column)),
            (v, None) => wallaby_codec::text::render(&schema.columns[index].ty, v),
            (v, Some(g)) => truncate_time(v, g).ok_or_else(|| {
                format!(
                    "partition column {:?} of {} has type {}, but :{} needs a date, timestamp or timestamptz column",
                    self.column,
                    schema.qualified_name(),
                    schema.columns[index].ty.name,
                    granularity_name(g)
                )
            })?,
        };
        Ok(format!(
            "{}={}/",
            self.column,
            utf8_percent_encode(&text, PARTITION_ESCAPE)
        ))
    }
}

fn granularity_name(g: Granularity) -> &'static str {
    match g {
        Granularity::Year => "year",
        Granularity::Month => "month",
        Granularity::Day => "day",
        Granularity::Hour => "hour",
    }
}

/// A date or timestamp cut to `g`: timestamptz in UTC, timestamp as written (no zone),
/// ±infinity as `infinity` / `-infinity`. `None` for other types.
fn truncate_time(value: &Value, g: Granularity) -> Option<String> {
    let micros = match value {
        Value::Timestamp(m) | Value::TimestampTz(m) => *m,
        Value::Date(d) => match *d {
            i32::MIN => return Some("-infinity".into()),
            i32::MAX => return Some("infinity".into()),
            d => i64::from(d) * 86_400_000_000,
        },
        _ => return None,
    };
    match micros {
        i64::MIN => return Some("-infinity".into()),
        i64::MAX => return Some("infinity".into()),
        _ => {}
    }
    let t = DateTime::from_timestamp_micros(micros)?.naive_utc();
    let d: NaiveDate = t.date();
    Some(match g {
        Granularity::Year => format!("{:04}", d.year()),
        Granularity::Month => format!("{:04}-{:02}", d.year(), d.month()),
        Granularity::Day => format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day()),
        Granularity::Hour => format!(
            "{:04}-{:02}-{:02}T{:02}",
            d.year(),
            d.month(),
            d.day(),
            t.hour()
        ),
    })
}

/// Static credentials from the Destination's Secret.
#[derive(Clone)]
pub struct SecretCredentials {
    /// `accessKeyId`.
    pub access_key_id: String,
    /// `secretAccessKey`.
    pub secret_access_key: String,
    /// `sessionToken`, for temporary credentials.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for SecretCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("SecretCredentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl SecretCredentials {
    /// Credentials from a Secret's string data; `Err` names the missing key.
    pub fn from_secret(data: &BTreeMap<String, String>) -> Result<Self, String> {
        let get = |k: &str| data.get(k).filter(|v| !v.is_empty()).cloned();
        Ok(Self {
            access_key_id: get("accessKeyId").ok_or("key \"accessKeyId\" is missing")?,
            secret_access_key: get("secretAccessKey")
                .ok_or("key \"secretAccessKey\" is missing")?,
            session_token: get("sessionToken"),
        })
    }
}

/// Configuration problems found when opening the destination.
#[derive(Debug, thiserror::Error)]
pub enum S3ConfigError {
    /// A `partitionBy` entry is malformed.
    #[error("spec.s3.partitionBy: {0}")]
    PartitionBy(String),
    /// `compression` does not apply to the format.
    #[error("spec.s3.compression: {0}")]
    Compression(String),
    /// The part-size knob is malformed.
    #[error(
        "{PART_BYTES_ENV}={value:?}: expected a number of bytes ≥ {MIN_PART_BYTES} (5 MiB, the smallest part S3 accepts)"
    )]
    PartBytes {
        /// The value given.
        value: String,
    },
}

/// Whether `compression` applies to `format`, and what it does; `Err` explains why not.
pub fn check_compression(format: WireFormat, compression: ObjectCompression) -> Result<(), String> {
    match (format, compression) {
        (_, ObjectCompression::None) => Ok(()),
        // Parquet compresses its pages with Snappy already (the codec's choice); wrapping
        // the file would make it unreadable for Parquet readers.
        (WireFormat::Parquet, ObjectCompression::Snappy) => Ok(()),
        (WireFormat::Parquet, c) => Err(format!(
            "{c:?} does not apply to parquet: Parquet pages are Snappy-compressed by the worker; use none or snappy"
        )),
        (_, ObjectCompression::Gzip) => Ok(()),
        (f, c) => Err(format!(
            "{c:?} is not available for {}; use gzip (whole object, `.gz` suffix) or none",
            f.extension()
        )),
    }
}

/// Writer of one S3 destination.
pub struct S3Destination {
    /// Destination name, for messages.
    name: String,
    spec: S3Spec,
    credentials: Option<SecretCredentials>,
    /// Built on first use: loading the default credential chain is async.
    client: Option<Client>,
    prefix: String,
    format: WireFormat,
    gzip: bool,
    partition_by: Vec<PartitionField>,
    overrides: TypeOverrides,
    part_bytes: usize,
}

impl std::fmt::Debug for S3Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Destination")
            .field("name", &self.name)
            .field("bucket", &self.spec.bucket)
            .field("prefix", &self.prefix)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// One object to upload.
#[derive(Debug)]
struct PendingObject {
    key: String,
    body: Bytes,
    content_type: &'static str,
    rows: usize,
}

impl S3Destination {
    /// Checks the options; the client is created on the first write.
    pub fn open(
        name: &str,
        spec: &S3Spec,
        format: WireFormat,
        overrides: TypeOverrides,
        credentials: Option<SecretCredentials>,
    ) -> Result<Self, S3ConfigError> {
        let partition_by = spec
            .partition_by
            .iter()
            .map(|p| PartitionField::parse(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(S3ConfigError::PartitionBy)?;
        check_compression(format, spec.compression).map_err(S3ConfigError::Compression)?;
        let part_bytes = match std::env::var(PART_BYTES_ENV) {
            Ok(v) => parse_part_bytes(&v)?,
            Err(_) => DEFAULT_PART_BYTES,
        };
        Ok(Self {
            name: name.to_owned(),
            spec: spec.clone(),
            credentials,
            client: None,
            prefix: normalize_prefix(spec.prefix.as_deref()),
            format,
            gzip: spec.compression == ObjectCompression::Gzip,
            partition_by,
            overrides,
            part_bytes,
        })
    }

    /// The client, built and checked against the bucket (HeadBucket) on first use, so a
    /// missing bucket or bad credentials fail the first batch with a precise error.
    async fn client(&mut self) -> Result<Client, DestinationError> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        match (&self.spec.region, &self.spec.endpoint) {
            (Some(region), _) => loader = loader.region(Region::new(region.clone())),
            // S3-compatible stores ignore the region; asking the chain would probe IMDS.
            (None, Some(_)) => loader = loader.region(Region::from_static(FALLBACK_REGION)),
            (None, None) => {}
        }
        if let Some(c) = &self.credentials {
            loader = loader.credentials_provider(Credentials::new(
                c.access_key_id.clone(),
                c.secret_access_key.clone(),
                c.session_token.clone(),
                None,
                "wallaby-destination-secret",
            ));
        }
        let sdk = loader.load().await;
        let client = Client::from_conf(s3_config(&self.spec, &sdk).build());
        client
            .head_bucket()
            .bucket(&self.spec.bucket)
            .send()
            .await
            .map_err(|e| self.classify("HeadBucket", "", e))?;
        self.client = Some(client.clone());
        Ok(client)
    }

    /// The objects of a batch: one per (table group, partition), in batch order, and one
    /// JSON-lines object of the batch's logical messages.
    fn objects(&mut self, batch: &ChangeBatch) -> Result<Vec<PendingObject>, DestinationError> {
        let mut out = Vec::new();
        let encoding = self.payload_encoding();
        for group in &batch.tables {
            let schema = self.overrides.apply(&group.schema);
            // Snapshot rows a copy worker already encoded (only without partitionBy): one
            // object per piece, keyed like the rows' own objects.
            for rows in &group.encoded {
                let payload = rows
                    .payload(encoding.as_ref(), &schema.qualified_name())
                    .map_err(|e| {
                        DestinationError::permanent(format!(
                            "Destination/{}: {}",
                            self.name, e.message
                        ))
                    })?;
                out.push(PendingObject {
                    key: self.object_key(&schema, "", (rows.lsn, rows.lsn), Some(payload)),
                    body: if self.gzip {
                        self.compress(payload.to_vec())?
                    } else {
                        payload.clone()
                    },
                    content_type: content_type(self.format),
                    rows: usize::try_from(rows.rows).unwrap_or(usize::MAX),
                });
            }
            if group.changes.is_empty() {
                continue;
            }
            // Partitions in first-seen order; changes keep their commit order within one.
            let mut partitions: Vec<(String, Vec<Change>)> = Vec::new();
            for change in &group.changes {
                let mut path = String::new();
                for field in &self.partition_by {
                    path += &field.segment(&schema, change).map_err(|e| {
                        DestinationError::permanent(format!("Destination/{}: {e}", self.name))
                            .with_hint("fix spec.s3.partitionBy")
                    })?;
                }
                match partitions.iter_mut().find(|(p, _)| *p == path) {
                    Some((_, changes)) => changes.push(change.clone()),
                    None => partitions.push((path, vec![change.clone()])),
                }
            }
            for (path, changes) in partitions {
                let payload =
                    wallaby_codec::encode(self.format, &schema, &changes).map_err(|e| {
                        DestinationError::permanent(format!(
                            "Destination/{}: encoding {}: {e}",
                            self.name,
                            schema.qualified_name()
                        ))
                    })?;
                let reads = changes.iter().any(|c| c.op == Op::Read);
                let key = self.object_key(
                    &schema,
                    &path,
                    lsn_range(&changes),
                    reads.then_some(payload.as_slice()),
                );
                out.push(PendingObject {
                    key,
                    body: self.compress(payload)?,
                    content_type: content_type(self.format),
                    rows: changes.len(),
                });
            }
        }
        if !batch.messages.is_empty() {
            let mut lines = Vec::new();
            for m in &batch.messages {
                let line = serde_json::json!({
                    "kind": "message",
                    "lsn": m.lsn.to_string(),
                    "commit_lsn": m.commit_lsn.map(|l| l.to_string()),
                    "transactional": m.commit_lsn.is_some(),
                    "prefix": m.prefix,
                    "content": String::from_utf8_lossy(&m.content),
                });
                lines.extend_from_slice(line.to_string().as_bytes());
                lines.push(b'\n');
            }
            let first = batch.messages.first().map_or(0, |m| m.lsn.0);
            let last = batch.messages.last().map_or(0, |m| m.lsn.0);
            out.push(PendingObject {
                key: format!(
                    "{}_messages/{first:016X}-{last:016X}.jsonl{}",
                    self.prefix,
                    if self.gzip { ".gz" } else { "" }
                ),
                body: self.compress(lines)?,
                content_type: "application/x-ndjson",
                rows: 0,
            });
        }
        Ok(out)
    }

    /// The key of a table object: `path` is its `partitionBy` levels, `content` the
    /// payload of snapshot reads. Those all carry one LSN (the slot's consistent point),
    /// so the LSN range cannot tell their batches apart: their keys also carry a hash of
    /// the content, so each batch gets its own object (and the same batch delivered again
    /// still overwrites its own).
    fn object_key(
        &self,
        schema: &TableSchema,
        path: &str,
        (first, last): (u64, u64),
        content: Option<&[u8]>,
    ) -> String {
        let content = content.map_or_else(String::new, |p| format!("-{:016x}", content_hash(p)));
        format!(
            "{}{}/{}/{path}{first:016X}-{last:016X}{content}-v{}.{}{}",
            self.prefix,
            key_safe(&schema.schema),
            key_safe(&schema.table),
            schema.version,
            self.format.extension(),
            if self.gzip { ".gz" } else { "" }
        )
    }

    fn compress(&self, payload: Vec<u8>) -> Result<Bytes, DestinationError> {
        if !self.gzip {
            return Ok(Bytes::from(payload));
        }
        let mut gz = flate2::write::GzEncoder::new(
            Vec::with_capacity(payload.len() / 4),
            flate2::Compression::default(),
        );
        gz.write_all(&payload)
            .and_then(|()| gz.finish())
            .map(Bytes::from)
            .map_err(|e| {
                DestinationError::permanent(format!("Destination/{}: gzip: {e}", self.name))
            })
    }

    async fn upload(&self, client: &Client, object: PendingObject) -> Result<(), DestinationError> {
        let bucket = &self.spec.bucket;
        if object.body.len() <= self.part_bytes {
            client
                .put_object()
                .bucket(bucket)
                .key(&object.key)
                .content_type(object.content_type)
                .body(ByteStream::from(object.body))
                .send()
                .await
                .map_err(|e| self.classify("PutObject", &object.key, e))?;
        } else {
            self.upload_multipart(client, &object).await?;
        }
        tracing::debug!(destination = %self.name, key = %object.key, rows = object.rows, "object uploaded");
        Ok(())
    }

    async fn upload_multipart(
        &self,
        client: &Client,
        object: &PendingObject,
    ) -> Result<(), DestinationError> {
        let bucket = &self.spec.bucket;
        let created = client
            .create_multipart_upload()
            .bucket(bucket)
            .key(&object.key)
            .content_type(object.content_type)
            .send()
            .await
            .map_err(|e| self.classify("CreateMultipartUpload", &object.key, e))?;
        let Some(upload_id) = created.upload_id() else {
            return Err(DestinationError::transient(format!(
                "Destination/{}: s3://{bucket}/{}: CreateMultipartUpload returned no upload id",
                self.name, object.key
            )));
        };
        let result = self.upload_parts(client, object, upload_id).await;
        if result.is_err() {
            // An abandoned upload keeps its parts (and their cost) until aborted; the batch
            // is retried from scratch with a new upload.
            if let Err(e) = client
                .abort_multipart_upload()
                .bucket(bucket)
                .key(&object.key)
                .upload_id(upload_id)
                .send()
                .await
            {
                tracing::warn!(destination = %self.name, key = %object.key, error = %DisplayErrorContext(&e), "aborting the multipart upload failed; a bucket lifecycle rule (AbortIncompleteMultipartUpload) removes its parts");
            }
        }
        result
    }

    async fn upload_parts(
        &self,
        client: &Client,
        object: &PendingObject,
        upload_id: &str,
    ) -> Result<(), DestinationError> {
        let bucket = &self.spec.bucket;
        let part_bytes = part_size(object.body.len(), self.part_bytes);
        let mut parts = Vec::new();
        let mut start = 0;
        let mut number: i32 = 1;
        while start < object.body.len() {
            let end = (start + part_bytes).min(object.body.len());
            let uploaded = client
                .upload_part()
                .bucket(bucket)
                .key(&object.key)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(object.body.slice(start..end)))
                .send()
                .await
                .map_err(|e| self.classify(&format!("UploadPart {number}"), &object.key, e))?;
            parts.push(
                CompletedPart::builder()
                    .set_e_tag(uploaded.e_tag().map(str::to_owned))
                    .part_number(number)
                    .build(),
            );
            start = end;
            number += 1;
        }
        let completed = client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(&object.key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.classify("CompleteMultipartUpload", &object.key, e))?;
        tracing::debug!(destination = %self.name, key = %object.key, parts = number - 1, part_bytes, bytes = object.body.len(), e_tag = completed.e_tag().unwrap_or_default(), "multipart upload complete");
        Ok(())
    }

    /// Maps an SDK error to a retry class with a hint naming the field to fix.
    fn classify<E>(&self, operation: &str, key: &str, err: SdkError<E>) -> DestinationError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code().map(str::to_owned);
        let message = format!(
            "Destination/{}: {operation} s3://{}/{key} failed: {}",
            self.name,
            self.spec.bucket,
            DisplayErrorContext(&err)
        );
        let class = classify(
            code.as_deref(),
            status,
            &err,
            self.credentials.is_some(),
            &self.spec.bucket,
        );
        match class {
            (true, hint) => DestinationError::transient(message).with_hint(hint),
            (false, hint) => DestinationError::permanent(message).with_hint(hint),
        }
    }
}

/// The part-size knob's value: a number of bytes ≥ [`MIN_PART_BYTES`].
fn parse_part_bytes(value: &str) -> Result<usize, S3ConfigError> {
    value
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|n| *n >= MIN_PART_BYTES)
        .ok_or_else(|| S3ConfigError::PartBytes {
            value: value.to_owned(),
        })
}

/// The part size for an object of `len` bytes: the configured size, grown when the
/// object would otherwise need more than [`MAX_PARTS`] parts.
fn part_size(len: usize, configured: usize) -> usize {
    configured.max(len.div_ceil(MAX_PARTS))
}

/// `(transient, hint)` of a failed request.
fn classify<E, R>(
    code: Option<&str>,
    status: Option<u16>,
    err: &SdkError<E, R>,
    static_credentials: bool,
    bucket: &str,
) -> (bool, String) {
    let credentials = if static_credentials {
        "check accessKeyId / secretAccessKey (/ sessionToken) in the Secret of spec.s3.secretRef"
    } else {
        "check the credentials the SDK's default chain finds (env, profile, IRSA web identity, instance role) or set spec.s3.secretRef"
    };
    match code {
        // HeadBucket answers without a body: a missing bucket is a bare 404 `NotFound`.
        Some("NoSuchBucket" | "NotFound") => {
            return (
                false,
                format!(
                    "bucket {bucket:?} does not exist: create it, or fix spec.s3.bucket (and spec.s3.region / spec.s3.endpoint)"
                ),
            );
        }
        Some("AccessDenied" | "AllAccessDisabled" | "AccountProblem") => {
            return (
                false,
                format!(
                    "grant s3:PutObject and s3:AbortMultipartUpload on arn:aws:s3:::{bucket}/* to the worker's credentials; {credentials}"
                ),
            );
        }
        Some("InvalidAccessKeyId" | "SignatureDoesNotMatch" | "InvalidToken") => {
            return (false, credentials.to_owned());
        }
        Some("ExpiredToken" | "TokenRefreshRequired") => {
            // The default chain refreshes temporary credentials by itself; a Secret's
            // session token only changes when someone updates the Secret.
            return (!static_credentials, credentials.to_owned());
        }
        Some(
            "PermanentRedirect"
            | "AuthorizationHeaderMalformed"
            | "IllegalLocationConstraintException",
        ) => {
            return (
                false,
                format!(
                    "bucket {bucket:?} is in another region: set spec.s3.region to the bucket's region"
                ),
            );
        }
        Some("InvalidBucketName") => {
            return (false, "fix spec.s3.bucket".to_owned());
        }
        Some("EntityTooSmall") => {
            return (
                false,
                format!(
                    "this store wants larger multipart parts than {PART_BYTES_ENV} gives: raise it (default {DEFAULT_PART_BYTES} bytes)"
                ),
            );
        }
        Some(
            "SlowDown"
            | "Throttling"
            | "ThrottlingException"
            | "RequestTimeout"
            | "InternalError"
            | "ServiceUnavailable"
            | "NoSuchUpload"
            | "RequestTimeTooSkewed",
        ) => {
            return (
                true,
                "the store is busy or failing; retried with backoff".to_owned(),
            );
        }
        _ => {}
    }
    match status {
        Some(s) if s >= 500 || s == 429 || s == 408 => {
            (true, "the store is busy or failing; retried with backoff".to_owned())
        }
        Some(403) => (
            false,
            format!("access denied or the request signature was rejected: {credentials}; the credentials need s3:ListBucket (HeadBucket) and s3:PutObject on {bucket:?}"),
        ),
        Some(404) => (
            false,
            format!("not found: check spec.s3.bucket ({bucket:?}), spec.s3.endpoint and spec.s3.forcePathStyle"),
        ),
        Some(_) => (
            false,
            "the store rejected the request: check spec.s3 (endpoint, region, forcePathStyle)"
                .to_owned(),
        ),
        None => match err {
            SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
                (true, "the store did not answer in time; retried with backoff".to_owned())
            }
            SdkError::DispatchFailure(d) if d.is_user() => (
                false,
                "the request could not be sent: check spec.s3.endpoint".to_owned(),
            ),
            SdkError::DispatchFailure(_) => (
                true,
                "cannot reach the store (connection refused, DNS or TLS failure); retried with backoff"
                    .to_owned(),
            ),
            _ => (
                false,
                format!(
                    "the request could not be built: check spec.s3 (region, endpoint) and the credentials; {credentials}"
                ),
            ),
        },
    }
}

#[async_trait]
impl Destination for S3Destination {
    async fn write(&mut self, batch: &ChangeBatch) -> Result<WriteAck, DestinationError> {
        let objects = self.objects(batch)?;
        if objects.is_empty() {
            return Ok(WriteAck::Durable);
        }
        let client = self.client().await?;
        for object in objects {
            self.upload(&client, object).await?;
        }
        Ok(WriteAck::Durable)
    }

    async fn flush(&mut self) -> Result<(), DestinationError> {
        // Every write is durable when it returns.
        Ok(())
    }

    /// Whole payloads per table group, unless `partitionBy` splits groups by row.
    fn payload_encoding(&self) -> Option<PayloadEncoding> {
        self.partition_by.is_empty().then(|| PayloadEncoding {
            format: self.format,
            type_mappings: self.overrides.mappings().clone(),
        })
    }
}

/// The S3 client configuration of a spec on top of the shared SDK configuration.
pub fn s3_config(spec: &S3Spec, sdk: &aws_config::SdkConfig) -> aws_sdk_s3::config::Builder {
    let mut b = aws_sdk_s3::config::Builder::from(sdk)
        .force_path_style(spec.force_path_style)
        .use_fips(spec.use_fips)
        .use_dual_stack(spec.use_dualstack)
        // The pipeline retries with the Destination's spec.retry: one policy, not two
        // stacked ones.
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(std::time::Duration::from_secs(5))
                .operation_attempt_timeout(std::time::Duration::from_secs(300))
                .build(),
        );
    if sdk.region().is_none() {
        b = b.region(Region::from_static(FALLBACK_REGION));
    }
    if let Some(endpoint) = &spec.endpoint {
        // Third-party stores often reject the SDK's default CRC trailers (aws-chunked
        // bodies); checksums are sent only where the API requires them.
        b = b
            .endpoint_url(endpoint)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    }
    b
}

/// `prefix/` without a leading slash; empty when unset.
fn normalize_prefix(prefix: Option<&str>) -> String {
    let p = prefix.unwrap_or_default().trim_matches('/');
    if p.is_empty() {
        String::new()
    } else {
        format!("{p}/")
    }
}

/// A schema or table name as one key level.
fn key_safe(name: &str) -> String {
    utf8_percent_encode(name, PARTITION_ESCAPE).to_string()
}

/// A 64-bit hash of an object's content (SipHash with fixed keys: the same bytes give the
/// same hash in every process of the same build; the standard library does not promise the
/// algorithm across Rust releases, so a batch delivered again by an upgraded worker may get
/// a second object, never a lost one).
fn content_hash(payload: &[u8]) -> u64 {
    use std::hash::Hasher as _;
    let mut hasher = std::hash::DefaultHasher::new();
    hasher.write(payload);
    hasher.finish()
}

/// First and last change LSN of a run of changes (the commit LSN where a change has none).
fn lsn_range(changes: &[Change]) -> (u64, u64) {
    let lsn = |c: &Change| if c.lsn != 0 { c.lsn } else { c.commit_lsn };
    (
        changes.first().map_or(0, lsn),
        changes.last().map_or(0, lsn),
    )
}

fn content_type(format: WireFormat) -> &'static str {
    match format {
        WireFormat::Parquet => "application/vnd.apache.parquet",
        WireFormat::Arrow => "application/vnd.apache.arrow.stream",
        WireFormat::Avro => "application/avro",
        WireFormat::Proto => "application/x-protobuf",
        WireFormat::Json => "application/x-ndjson",
    }
}

/// The `s3` entry of the registry.
pub static REGISTRATION: Registration = Registration {
    types: &[DestinationType::S3],
    secret_names: |spec| {
        spec.s3
            .iter()
            .flat_map(|s| s.secret_ref.clone())
            .map(|r| r.name)
            .collect()
    },
    check: |ctx| {
        let mut problems = Vec::new();
        let data = check_s3(ctx.name, ctx.flow, ctx.spec, ctx.secrets, &mut problems);
        if problems.is_empty() {
            Ok(data.unwrap_or_default())
        } else {
            Err(problems)
        }
    },
    open: |ctx| {
        let spec = ctx.spec.s3.as_ref().ok_or_else(|| {
            OpenError(format!(
                "Destination/{}: type s3 needs a spec.s3 block",
                ctx.name
            ))
        })?;
        let secret = spec.secret_ref.as_ref().map(|_| ctx.secrets);
        let sink = open_s3(ctx.name, spec, ctx.format(), ctx.overrides(), secret)?;
        Ok(Box::new(sink))
    },
};

/// Checks an `s3` block against the Flow (format × compression, partitionBy) and reads
/// its credentials Secret; returns the Secret's data when it references one.
fn check_s3(
    name: &str,
    flow: &Flow,
    spec: &DestinationSpec,
    secrets: &dyn SecretSource,
    problems: &mut Vec<String>,
) -> Option<BTreeMap<String, String>> {
    let s3 = spec.s3.as_ref()?;
    if s3.bucket.trim().is_empty() {
        problems.push(format!(
            "Destination/{name} spec.s3.bucket: must name the bucket objects are written to"
        ));
    }
    if let Some(endpoint) = &s3.endpoint
        && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
    {
        problems.push(format!(
            "Destination/{name} spec.s3.endpoint: {endpoint:?} is not an http:// or https:// URL"
        ));
    }
    for p in &s3.partition_by {
        if let Err(e) = PartitionField::parse(p) {
            problems.push(format!("Destination/{name} spec.s3.partitionBy: {e}"));
        }
    }
    let format = crate::registry::wire_format(spec.format.unwrap_or(flow.spec.wire_format));
    if let Err(e) = check_compression(format, s3.compression) {
        problems.push(format!("Destination/{name} spec.s3.compression: {e}"));
    }
    let secret_ref = s3.secret_ref.as_ref()?;
    let data = secrets.secret(&secret_ref.name, &SECRET_KEYS);
    let Some(data) = data else {
        problems.push(format!(
            "Destination/{name} spec.s3.secretRef: Secret {:?} not found: {}",
            secret_ref.name,
            secrets.how_to_provide(&secret_ref.name, "accessKeyId")
        ));
        return None;
    };
    if let Err(e) = SecretCredentials::from_secret(&data) {
        problems.push(format!(
            "Destination/{name} spec.s3.secretRef: Secret {:?}: {e}: {}",
            secret_ref.name,
            secrets.how_to_provide(&secret_ref.name, "accessKeyId")
        ));
        return None;
    }
    Some(data)
}

/// Opens an `s3` destination with the credentials of its Secret, if it references one.
fn open_s3(
    name: &str,
    spec: &S3Spec,
    format: WireFormat,
    overrides: TypeOverrides,
    secret: Option<&BTreeMap<String, String>>,
) -> Result<S3Destination, OpenError> {
    let credentials = match (&spec.secret_ref, secret) {
        (Some(r), Some(data)) => Some(SecretCredentials::from_secret(data).map_err(|e| {
            OpenError(format!(
                "Destination/{name} spec.s3.secretRef: Secret {:?}: {e}",
                r.name
            ))
        })?),
        (Some(r), None) => {
            return Err(OpenError(format!(
                "Destination/{name} spec.s3.secretRef: Secret {:?} was not resolved",
                r.name
            )));
        }
        (None, _) => None,
    };
    S3Destination::open(name, spec, format, overrides, credentials)
        .map_err(|e| OpenError(format!("Destination/{name} {e}")))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef;
    use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents, SharedCredentialsProvider};
    use aws_sdk_s3::error::BoxError;

    use super::*;

    fn spec() -> S3Spec {
        serde_json::from_value(serde_json::json!({"bucket": "bkt"})).unwrap()
    }

    /// Records the URI of the request and stops it before it leaves the process.
    #[derive(Debug, Clone, Default)]
    struct Capture(Arc<Mutex<Option<String>>>);

    impl Intercept for Capture {
        fn name(&self) -> &'static str {
            "capture"
        }
        fn read_before_transmit(
            &self,
            ctx: &BeforeTransmitInterceptorContextRef<'_>,
            _rc: &RuntimeComponents,
            _cfg: &mut ConfigBag,
        ) -> Result<(), BoxError> {
            // The host and path are the endpoint's; the query names the operation.
            let uri = ctx.request().uri();
            *self.0.lock().unwrap() = Some(uri.split('?').next().unwrap_or(uri).to_owned());
            Err("captured".into())
        }
    }

    async fn endpoint_of(spec: &S3Spec) -> String {
        let sdk = aws_config::SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(spec.region.clone().map(Region::new))
            .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
                "AKID", "secret", None, None, "test",
            )))
            .build();
        let capture = Capture::default();
        let client = Client::from_conf(s3_config(spec, &sdk).interceptor(capture.clone()).build());
        let _ = client.put_object().bucket("bkt").key("k").send().await;
        capture.0.lock().unwrap().clone().unwrap()
    }

    #[tokio::test]
    async fn partitions_resolve_through_the_sdk_endpoint_resolver() {
        let cases = [
            (
                Some("us-gov-west-1"),
                false,
                false,
                "https://bkt.s3.us-gov-west-1.amazonaws.com/k",
            ),
            (
                Some("us-gov-west-1"),
                true,
                false,
                "https://bkt.s3-fips.us-gov-west-1.amazonaws.com/k",
            ),
            (
                Some("cn-north-1"),
                false,
                false,
                "https://bkt.s3.cn-north-1.amazonaws.com.cn/k",
            ),
            (
                Some("eu-west-1"),
                false,
                true,
                "https://bkt.s3.dualstack.eu-west-1.amazonaws.com/k",
            ),
            (
                None,
                false,
                false,
                "https://bkt.s3.us-east-1.amazonaws.com/k",
            ),
        ];
        for (region, fips, dualstack, want) in cases {
            let mut s = spec();
            s.region = region.map(str::to_owned);
            s.use_fips = fips;
            s.use_dualstack = dualstack;
            assert_eq!(
                endpoint_of(&s).await,
                want,
                "{region:?} fips={fips} dualstack={dualstack}"
            );
        }
        let mut s = spec();
        s.endpoint = Some("http://127.0.0.1:9000".into());
        s.force_path_style = true;
        assert_eq!(endpoint_of(&s).await, "http://127.0.0.1:9000/bkt/k");
    }

    #[test]
    fn partition_fields_parse() {
        assert_eq!(
            PartitionField::parse("ts:day").unwrap(),
            PartitionField {
                column: "ts".into(),
                granularity: Some(Granularity::Day)
            }
        );
        assert_eq!(PartitionField::parse("region").unwrap().granularity, None);
        assert!(
            PartitionField::parse("ts:week")
                .unwrap_err()
                .contains("week")
        );
        assert!(PartitionField::parse("a-b").is_err());
    }

    #[test]
    fn times_truncate_in_utc() {
        // 2024-03-05 23:30:00.5 UTC
        let micros = 1_709_681_400_500_000;
        let v = Value::TimestampTz(micros);
        assert_eq!(truncate_time(&v, Granularity::Year).unwrap(), "2024");
        assert_eq!(truncate_time(&v, Granularity::Month).unwrap(), "2024-03");
        assert_eq!(truncate_time(&v, Granularity::Day).unwrap(), "2024-03-05");
        assert_eq!(
            truncate_time(&v, Granularity::Hour).unwrap(),
            "2024-03-05T23"
        );
        assert_eq!(
            truncate_time(&Value::Date(0), Granularity::Day).unwrap(),
            "1970-01-01"
        );
        assert_eq!(
            truncate_time(&Value::TimestampTz(i64::MAX), Granularity::Day).unwrap(),
            "infinity"
        );
        assert!(truncate_time(&Value::Int4(1), Granularity::Day).is_none());
    }

    #[test]
    fn compression_applies_per_format() {
        assert!(check_compression(WireFormat::Json, ObjectCompression::Gzip).is_ok());
        assert!(check_compression(WireFormat::Parquet, ObjectCompression::Snappy).is_ok());
        assert!(check_compression(WireFormat::Parquet, ObjectCompression::Gzip).is_err());
        assert!(check_compression(WireFormat::Json, ObjectCompression::Zstd).is_err());
    }

    #[test]
    fn the_part_size_knob_respects_the_s3_minimum() {
        assert_eq!(parse_part_bytes("5242880").unwrap(), MIN_PART_BYTES);
        assert_eq!(parse_part_bytes("16777216").unwrap(), 16 * 1024 * 1024);
        for bad in ["262144", "5242879", "0", "8MiB", ""] {
            let err = parse_part_bytes(bad).unwrap_err().to_string();
            assert!(
                err.contains(PART_BYTES_ENV) && err.contains("5242880"),
                "{err}"
            );
        }
    }

    #[test]
    fn parts_grow_to_stay_within_ten_thousand() {
        assert_eq!(part_size(20 * 1024 * 1024, MIN_PART_BYTES), MIN_PART_BYTES);
        let huge = 100_000 * MIN_PART_BYTES;
        let size = part_size(huge, MIN_PART_BYTES);
        assert!(huge.div_ceil(size) <= MAX_PARTS, "{size}");
        assert!(size >= MIN_PART_BYTES);
    }

    #[test]
    fn prefixes_normalize() {
        assert_eq!(normalize_prefix(None), "");
        assert_eq!(normalize_prefix(Some("/cdc/x/")), "cdc/x/");
        assert_eq!(normalize_prefix(Some("cdc")), "cdc/");
    }
}
