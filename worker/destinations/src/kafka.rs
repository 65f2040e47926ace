//! The `kafka` and `bufstream` destinations (one code path, Bufstream speaks the Kafka
//! protocol): every change becomes one Kafka record keyed by its primary key, with the
//! change encoded in the destination's wire format and its position in headers. A write is
//! *durable* once every delivery report of the batch came back (acks as configured).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use wallaby_codec::{Change, TableSchema, WireFormat};
use wallaby_crds::DestinationType;
use wallaby_crds::destination::{
    DestinationSpec, KafkaAcks, KafkaCompression, KafkaSpec, OversizePolicy, SaslMechanism,
};

use wallaby_pipeline::batch::ChangeBatch;
use wallaby_pipeline::destination::{Destination, DestinationError, TypeOverrides, WriteAck};

use crate::registry::{
    CheckContext, OpenContext, OpenError, Registration, SecretData, SecretSource,
};

/// Secret keys the destination reads: SASL credentials and TLS material referenced by
/// `tls.ca` / `tls.clientCert` / `tls.clientKey` (those name their own Secrets and keys).
pub const SASL_SECRET_KEYS: [&str; 2] = ["username", "password"];

/// Records in flight in librdkafka's queue before `write` waits for the oldest report.
const QUEUE_MESSAGES: usize = 100_000;

/// A Kafka destination could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum KafkaOpenError {
    /// An option has a value the producer cannot use.
    #[error("{field}: {message}")]
    Option {
        /// Field path, e.g. `spec.kafka.deliveryTimeout`.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// librdkafka refused the configuration.
    #[error("creating the Kafka producer for brokers {brokers}: {source}")]
    Producer {
        /// The bootstrap list.
        brokers: String,
        /// The client's error.
        #[source]
        source: KafkaError,
    },
}

/// Credentials and TLS material resolved from Secrets.
#[derive(Debug, Clone, Default)]
pub struct KafkaSecrets {
    /// SASL user name and password (`secretRef` keys `username`, `password`).
    pub sasl: Option<(String, String)>,
    /// PEM CA bundle (`tls.ca`).
    pub ca_pem: Option<String>,
    /// PEM client certificate (`tls.clientCert`).
    pub client_cert_pem: Option<String>,
    /// PEM client key (`tls.clientKey`).
    pub client_key_pem: Option<String>,
}

impl KafkaSecrets {
    /// From the data [`REGISTRATION`]'s check resolved.
    pub fn from_secret_data(data: &SecretData) -> Self {
        let get = |k: &str| data.get(k).cloned();
        Self {
            sasl: get("username").zip(get("password")),
            ca_pem: get("tls.ca"),
            client_cert_pem: get("tls.clientCert"),
            client_key_pem: get("tls.clientKey"),
        }
    }

    /// The inverse of [`Self::from_secret_data`].
    pub fn into_secret_data(self) -> SecretData {
        let (username, password) = self.sasl.unzip();
        [
            ("username", username),
            ("password", password),
            ("tls.ca", self.ca_pem),
            ("tls.clientCert", self.client_cert_pem),
            ("tls.clientKey", self.client_key_pem),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_owned(), v?)))
        .collect()
    }
}

/// Producer of one Kafka / Bufstream destination.
pub struct KafkaDestination {
    producer: FutureProducer,
    topic: String,
    format: WireFormat,
    overrides: TypeOverrides,
    acks: KafkaAcks,
    max_record_bytes: u64,
    oversize_policy: OversizePolicy,
    brokers: String,
    /// Records dropped by `oversizePolicy: drop` since start.
    dropped: u64,
}

impl std::fmt::Debug for KafkaDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDestination")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("format", &self.format)
            .field("acks", &self.acks)
            .field("dropped", &self.dropped)
            .finish_non_exhaustive()
    }
}

/// The librdkafka properties of `spec` (credentials included, so never log them).
pub fn client_config(
    spec: &KafkaSpec,
    secrets: &KafkaSecrets,
) -> Result<ClientConfig, KafkaOpenError> {
    let option = |field: &str, message: String| KafkaOpenError::Option {
        field: format!("spec.kafka.{field}"),
        message,
    };
    let timeout: Duration = spec
        .delivery_timeout
        .parse()
        .map_err(|e: String| option("deliveryTimeout", e))?;
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", spec.brokers.join(","))
        .set("client.id", "wallaby")
        .set("message.timeout.ms", timeout.as_millis().to_string())
        // A topic the brokers report as unknown fails its records (permanently, below)
        // after half the delivery timeout instead of timing out (transiently) with them.
        .set(
            "topic.metadata.propagation.max.ms",
            (timeout.as_millis() / 2).max(1).to_string(),
        )
        .set("message.max.bytes", spec.max_message_bytes.to_string())
        .set(
            "batch.size",
            spec.max_batch_bytes
                .unwrap_or(spec.max_message_bytes)
                .to_string(),
        )
        .set("queue.buffering.max.messages", QUEUE_MESSAGES.to_string())
        .set("linger.ms", "5")
        .set(
            "compression.type",
            match spec.compression {
                KafkaCompression::None => "none",
                KafkaCompression::Gzip => "gzip",
                KafkaCompression::Snappy => "snappy",
                KafkaCompression::Lz4 => "lz4",
                KafkaCompression::Zstd => "zstd",
            },
        );
    match spec.acks {
        // The idempotent producer keeps per-partition order and drops the duplicates its
        // own retries would create; it requires acks=all.
        KafkaAcks::All => c.set("acks", "all").set("enable.idempotence", "true"),
        KafkaAcks::Leader => c.set("acks", "1"),
        KafkaAcks::None => c.set("acks", "0"),
    };
    let tls = spec.tls.as_ref().is_some_and(|t| t.enabled);
    if let Some(t) = spec.tls.as_ref().filter(|t| t.enabled) {
        if t.server_name.is_some() {
            return Err(option(
                "tls.serverName",
                "the Kafka client verifies each broker by the host name it advertises and cannot override it; remove serverName".into(),
            ));
        }
        if let Some(ca) = &secrets.ca_pem {
            c.set("ssl.ca.pem", ca);
        }
        match (&secrets.client_cert_pem, &secrets.client_key_pem) {
            (Some(cert), Some(key)) => {
                c.set("ssl.certificate.pem", cert).set("ssl.key.pem", key);
            }
            (None, None) => {}
            _ => {
                return Err(option(
                    "tls",
                    "clientCert and clientKey go together: set both for mutual TLS, or neither"
                        .into(),
                ));
            }
        }
    }
    match (&spec.sasl, &secrets.sasl) {
        (Some(sasl), Some((user, password))) => {
            c.set(
                "security.protocol",
                if tls { "SASL_SSL" } else { "SASL_PLAINTEXT" },
            )
            .set(
                "sasl.mechanisms",
                match sasl.mechanism {
                    SaslMechanism::Plain => "PLAIN",
                    SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
                    SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
                },
            )
            .set("sasl.username", user)
            .set("sasl.password", password);
        }
        (Some(_), None) => {
            return Err(option(
                "secretRef",
                "sasl is set but no credentials were resolved: set secretRef to a Secret with keys username and password".into(),
            ));
        }
        (None, _) => {
            c.set("security.protocol", if tls { "SSL" } else { "PLAINTEXT" });
        }
    }
    Ok(c)
}

impl KafkaDestination {
    /// Creates the producer (it connects lazily; an unreachable broker shows up as failed
    /// deliveries after `deliveryTimeout`).
    pub fn open(
        spec: &KafkaSpec,
        secrets: &KafkaSecrets,
        format: WireFormat,
        overrides: TypeOverrides,
    ) -> Result<Self, KafkaOpenError> {
        let brokers = spec.brokers.join(",");
        let producer: FutureProducer =
            client_config(spec, secrets)?
                .create()
                .map_err(|source| KafkaOpenError::Producer {
                    brokers: brokers.clone(),
                    source,
                })?;
        Ok(Self {
            producer,
            topic: spec.topic.clone(),
            format,
            overrides,
            acks: spec.acks,
            max_record_bytes: spec.max_record_bytes.unwrap_or(spec.max_message_bytes),
            oversize_policy: spec.oversize_policy,
            brokers,
            dropped: 0,
        })
    }

    /// Records dropped by `oversizePolicy: drop` since the destination opened.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Waits for the oldest delivery report.
    async fn settle(&self, pending: &mut VecDeque<DeliveryFuture>) -> Result<(), DestinationError> {
        let Some(future) = pending.pop_front() else {
            return Ok(());
        };
        match future.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, message))) => {
                use rdkafka::Message;
                Err(self.classify(&e, message.topic()))
            }
            Err(_) => Err(DestinationError::transient(format!(
                "Kafka producer for {} shut down before reporting a delivery",
                self.brokers
            ))),
        }
    }

    /// The retry class and hint of a producer error.
    fn classify(&self, e: &KafkaError, topic: &str) -> DestinationError {
        use RDKafkaErrorCode as C;
        let message = format!(
            "producing to Kafka topic {topic:?} on {}: {e}",
            self.brokers
        );
        match e.rdkafka_error_code() {
            Some(C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge) => {
                DestinationError::permanent(message).with_hint(
                    "raise maxMessageBytes (and the topic's max.message.bytes on the broker), or set maxRecordBytes with oversizePolicy: drop",
                )
            }
            Some(C::UnknownTopic | C::UnknownTopicOrPartition) => {
                DestinationError::permanent(message).with_hint(format!(
                    "create topic {topic:?} or enable auto.create.topics.enable on the brokers; check spec.kafka.topic"
                ))
            }
            Some(
                C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::TransactionalIdAuthorizationFailed,
            ) => DestinationError::permanent(message).with_hint(format!(
                "grant the producer's principal WRITE on topic {topic:?} (and IDEMPOTENT_WRITE on the cluster for acks: all)"
            )),
            Some(C::SaslAuthenticationFailed | C::Authentication | C::UnsupportedSASLMechanism) => {
                DestinationError::permanent(message).with_hint(
                    "check the username/password in the Secret of spec.kafka.secretRef and spec.kafka.sasl.mechanism",
                )
            }
            Some(C::InvalidConfig | C::InvalidArgument | C::Fatal) => {
                DestinationError::permanent(message)
                    .with_hint("check the spec.kafka options against the broker's configuration")
            }
            Some(C::MessageTimedOut | C::AllBrokersDown | C::BrokerTransportFailure | C::Resolve) => {
                DestinationError::transient(message).with_hint(format!(
                    "no broker acknowledged within deliveryTimeout: check that {} is reachable from the worker",
                    self.brokers
                ))
            }
            _ => DestinationError::transient(message),
        }
    }

    /// The topic of a table.
    fn topic_of(&self, schema: &TableSchema) -> String {
        topic_for(&self.topic, &schema.schema, &schema.table)
    }
}

/// Names of the Secrets a Kafka block reads (SASL credentials, TLS material).
pub fn secret_names(spec: &KafkaSpec) -> Vec<String> {
    let tls = spec.tls.iter().filter(|t| t.enabled).flat_map(|t| {
        [&t.ca, &t.client_cert, &t.client_key]
            .into_iter()
            .flatten()
            .map(|s| s.name.clone())
    });
    spec.sasl
        .iter()
        .flat_map(|_| spec.secret_ref.iter().map(|r| r.name.clone()))
        .chain(tls)
        .collect()
}

/// Expands `{schema}` and `{table}` in a topic template.
pub fn topic_for(template: &str, schema: &str, table: &str) -> String {
    template
        .replace("{schema}", schema)
        .replace("{table}", table)
}

/// Placeholders of a topic template other than `{schema}` and `{table}`.
pub fn unknown_placeholders(template: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let Some(len) = rest[start..].find('}') else {
            out.push(rest[start..].to_owned());
            break;
        };
        let name = &rest[start..=start + len];
        if name != "{schema}" && name != "{table}" {
            out.push(name.to_owned());
        }
        rest = &rest[start + len + 1..];
    }
    out
}

/// What every record of one table in a batch shares: the prepared encoder, the topic, the
/// key columns and the constant headers, so a record costs its own bytes only.
struct TableRecords<'a> {
    encoder: wallaby_codec::Encoder<'a>,
    schema: &'a TableSchema,
    /// Key columns in name order (the key object's member order) with their escaped
    /// `"name":` prefix.
    key_columns: Vec<(usize, String)>,
    table: String,
    schema_version: String,
    format: &'static str,
}

impl<'a> TableRecords<'a> {
    fn new(format: WireFormat, schema: &'a TableSchema) -> Result<Self, wallaby_codec::CodecError> {
        let mut key_columns: Vec<(usize, &str)> = schema
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key)
            .map(|(i, c)| (i, c.name.as_str()))
            .collect();
        key_columns.sort_by(|a, b| a.1.cmp(b.1));
        Ok(Self {
            encoder: wallaby_codec::Encoder::new(format, schema)?,
            schema,
            key_columns: key_columns
                .into_iter()
                .map(|(i, name)| (i, format!("{}:", serde_json::Value::from(name))))
                .collect(),
            table: schema.qualified_name(),
            schema_version: schema.version.to_string(),
            format: format.as_str(),
        })
    }

    /// The record key: the key columns of the change as a JSON object (members in name
    /// order), values as PostgreSQL prints them (the same bytes in every wire format).
    /// `None` for tables without a key.
    fn key(&self, change: &Change) -> Option<String> {
        let row = change.after.as_ref().or(change.before.as_ref())?;
        if self.key_columns.is_empty() {
            return None;
        }
        let mut key = String::with_capacity(16 * self.key_columns.len());
        key.push('{');
        for (n, (i, name)) in self.key_columns.iter().enumerate() {
            if n > 0 {
                key.push(',');
            }
            key.push_str(name);
            match row.values.get(*i) {
                Some(wallaby_codec::Value::Null) | None => key.push_str("null"),
                Some(v) => {
                    let text = wallaby_codec::text::render(&self.schema.columns[*i].ty, v);
                    key.push_str(&serde_json::Value::from(text).to_string());
                }
            }
        }
        key.push('}');
        Some(key)
    }

    /// Headers of a record: where the change comes from, so consumers can order,
    /// deduplicate (table, key, lsn) and pick the schema without decoding the value.
    fn headers(&self, change: &Change) -> OwnedHeaders {
        let lsn = wallaby_pipeline::lsn::Lsn(change.lsn).to_string();
        let commit_lsn = wallaby_pipeline::lsn::Lsn(change.commit_lsn).to_string();
        let pairs: [(&str, &str); 6] = [
            ("lsn", &lsn),
            ("commit_lsn", &commit_lsn),
            ("op", change.op.as_str()),
            ("table", &self.table),
            ("schema_version", &self.schema_version),
            ("format", self.format),
        ];
        pairs
            .iter()
            .fold(OwnedHeaders::new_with_capacity(6), |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(*value),
                })
            })
    }
}

#[async_trait]
impl Destination for KafkaDestination {
    async fn write(&mut self, batch: &ChangeBatch) -> Result<WriteAck, DestinationError> {
        let mut pending: VecDeque<DeliveryFuture> = VecDeque::new();
        let mut topics: BTreeMap<(String, String), String> = BTreeMap::new();
        for group in &batch.tables {
            let schema = self.overrides.apply(&group.schema);
            let topic = topics
                .entry((schema.schema.clone(), schema.table.clone()))
                .or_insert_with(|| self.topic_of(&schema))
                .clone();
            let encoding_error = |e: wallaby_codec::CodecError| {
                DestinationError::permanent(format!(
                    "encoding a change of {} for Kafka topic {topic:?}: {e}",
                    schema.qualified_name()
                ))
            };
            let records = TableRecords::new(self.format, &schema).map_err(encoding_error)?;
            for change in &group.changes {
                let value = records
                    .encoder
                    .encode(std::slice::from_ref(change))
                    .map_err(encoding_error)?;
                let key = records.key(change);
                let size = (value.len() + key.as_ref().map_or(0, String::len)) as u64;
                if size > self.max_record_bytes {
                    match self.oversize_policy {
                        OversizePolicy::Drop => {
                            self.dropped += 1;
                            tracing::warn!(
                                table = %schema.qualified_name(),
                                lsn = %wallaby_pipeline::lsn::Lsn(change.lsn),
                                bytes = size,
                                limit = self.max_record_bytes,
                                dropped = self.dropped,
                                "dropping a record above maxRecordBytes (oversizePolicy: drop)"
                            );
                            continue;
                        }
                        OversizePolicy::Error => {
                            return Err(DestinationError::permanent(format!(
                                "a change of {} at LSN {} encodes to {size} bytes, above maxRecordBytes {} of Kafka topic {topic:?}",
                                schema.qualified_name(),
                                wallaby_pipeline::lsn::Lsn(change.lsn),
                                self.max_record_bytes
                            ))
                            .with_hint("raise maxRecordBytes and maxMessageBytes (and the topic's max.message.bytes), or set oversizePolicy: drop"));
                        }
                    }
                }
                let headers = records.headers(change);
                let mut record = FutureRecord::to(&topic).payload(&value).headers(headers);
                if let Some(k) = &key {
                    record = record.key(k);
                }
                loop {
                    match self.producer.send_result(record) {
                        Ok(future) => {
                            pending.push_back(future);
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            // librdkafka's queue is full: wait for the oldest report, then
                            // enqueue again (back-pressure instead of failing the batch).
                            record = r;
                            if pending.is_empty() {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            self.settle(&mut pending).await?;
                        }
                        Err((e, _)) => return Err(self.classify(&e, &topic)),
                    }
                }
            }
        }
        // Logical messages (pg_logical_emit_message) have no table: they are not sent to
        // Kafka; say so once per batch rather than dropping them silently.
        if !batch.messages.is_empty() {
            tracing::debug!(
                count = batch.messages.len(),
                "logical decoding messages are not delivered to Kafka"
            );
        }
        while !pending.is_empty() {
            self.settle(&mut pending).await?;
        }
        // With acks: none a report only says the record left the client; nothing more can be
        // known, so such a batch counts as durable once sent (documented).
        Ok(WriteAck::Durable)
    }

    async fn flush(&mut self) -> Result<(), DestinationError> {
        // Every write waited for its delivery reports: nothing is ever only accepted.
        Ok(())
    }
}

/// The `kafka` / `bufstream` entry of the registry.
pub static REGISTRATION: Registration = Registration {
    types: &[DestinationType::Kafka, DestinationType::Bufstream],
    secret_names: |spec| block(spec).map(secret_names).unwrap_or_default(),
    check,
    open,
};

/// The `kafka` or `bufstream` block of a spec.
fn block(spec: &DestinationSpec) -> Option<&KafkaSpec> {
    spec.kafka.as_ref().or(spec.bufstream.as_ref())
}

fn check(ctx: &CheckContext<'_>) -> Result<SecretData, Vec<String>> {
    match block(ctx.spec) {
        Some(spec) => check_block(ctx.name, ctx.spec.kind.as_str(), spec, ctx.secrets)
            .map(KafkaSecrets::into_secret_data),
        // validate::destination reports the missing block.
        None => Ok(SecretData::new()),
    }
}

fn open(ctx: &OpenContext<'_>) -> Result<Box<dyn Destination>, OpenError> {
    let spec = block(ctx.spec).ok_or_else(|| {
        OpenError(format!(
            "Destination/{}: type {} needs a spec.{} block",
            ctx.name,
            ctx.spec.kind.as_str(),
            ctx.spec.kind.as_str()
        ))
    })?;
    let secrets = KafkaSecrets::from_secret_data(ctx.secrets);
    let sink =
        KafkaDestination::open(spec, &secrets, ctx.format(), ctx.overrides()).map_err(|e| {
            OpenError(format!(
                "Destination/{} ({}): {e}",
                ctx.name,
                ctx.spec.kind.as_str()
            ))
        })?;
    Ok(Box::new(sink))
}

/// Checks a `kafka` / `bufstream` block (`kind` is the block's name) and resolves its
/// Secrets: SASL credentials from `secretRef`, TLS material from the `tls` selectors.
fn check_block(
    name: &str,
    kind: &str,
    spec: &KafkaSpec,
    secrets: &dyn SecretSource,
) -> Result<KafkaSecrets, Vec<String>> {
    let field = |f: &str| format!("Destination/{name} spec.{kind}.{f}");
    let mut problems = Vec::new();
    if spec.brokers.is_empty() || spec.brokers.iter().any(|b| b.trim().is_empty()) {
        problems.push(format!(
            "{}: list at least one broker as host:port, without empty entries",
            field("brokers")
        ));
    }
    for b in &spec.brokers {
        if !b.trim().is_empty() && !b.contains(':') {
            problems.push(format!(
                "{}: {b:?} has no port: write host:port (e.g. {b}:9092)",
                field("brokers")
            ));
        }
    }
    if spec.topic.trim().is_empty() {
        problems.push(format!(
            "{}: set a topic, or a template such as cdc.{{schema}}.{{table}}",
            field("topic")
        ));
    }
    let unknown = unknown_placeholders(&spec.topic);
    if !unknown.is_empty() {
        problems.push(format!(
            "{}: unknown placeholder(s) {} in {:?}: only {{schema}} and {{table}} are expanded",
            field("topic"),
            unknown.join(", "),
            spec.topic
        ));
    }
    if let Err(e) = spec.delivery_timeout.parse() {
        problems.push(format!("{}: {e}", field("deliveryTimeout")));
    }
    let mut out = KafkaSecrets::default();
    match (&spec.sasl, &spec.secret_ref) {
        (Some(_), Some(secret_ref)) => {
            let data = secrets
                .secret(&secret_ref.name, &SASL_SECRET_KEYS)
                .unwrap_or_default();
            match (data.get("username"), data.get("password")) {
                (Some(u), Some(p)) => out.sasl = Some((u.clone(), p.clone())),
                _ => {
                    let missing: Vec<&str> = SASL_SECRET_KEYS
                        .into_iter()
                        .filter(|k| !data.contains_key(*k))
                        .collect();
                    problems.push(format!(
                        "{}: Secret {:?} with keys username and password not found: {}",
                        field("secretRef"),
                        secret_ref.name,
                        secrets.how_to_provide_keys(&secret_ref.name, &missing)
                    ));
                }
            }
        }
        (Some(_), None) => problems.push(format!(
            "{}: sasl is set: name the Secret holding username and password",
            field("secretRef")
        )),
        (None, _) => {}
    }
    if let Some(tls) = spec.tls.as_ref().filter(|t| t.enabled) {
        for (sub, sel, slot) in [
            ("tls.ca", &tls.ca, &mut out.ca_pem),
            ("tls.clientCert", &tls.client_cert, &mut out.client_cert_pem),
            ("tls.clientKey", &tls.client_key, &mut out.client_key_pem),
        ] {
            let Some(sel) = sel else { continue };
            match secrets
                .secret(&sel.name, &[sel.key.as_str()])
                .and_then(|mut d| d.remove(&sel.key))
            {
                Some(pem) => *slot = Some(pem),
                None => problems.push(format!(
                    "{}: key {:?} of Secret {:?} not found: {}",
                    field(sub),
                    sel.key,
                    sel.name,
                    secrets.how_to_provide(&sel.name, &sel.key)
                )),
            }
        }
    }
    if problems.is_empty()
        && let Err(e) = client_config(spec, &out)
    {
        problems.push(
            format!("Destination/{name} {e}").replace("spec.kafka.", &format!("spec.{kind}.")),
        );
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_templates_expand_and_unknown_placeholders_are_found() {
        assert_eq!(
            topic_for("cdc.{schema}.{table}", "public", "t"),
            "cdc.public.t"
        );
        assert_eq!(topic_for("fixed", "public", "t"), "fixed");
        assert!(unknown_placeholders("cdc.{schema}.{table}").is_empty());
        assert_eq!(unknown_placeholders("cdc.{db}.{table}"), vec!["{db}"]);
        assert_eq!(unknown_placeholders("cdc.{table"), vec!["{table"]);
    }
}
