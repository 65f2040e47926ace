//! The `grpc` destination: a client of `wallaby.ingest.v1.IngestService`
//! (worker/proto/ingest.proto). Each table group of a batch is one `IngestBatch` call with
//! the group's payload, its idempotency key and LSN range; OK makes it durable, the status
//! code decides whether a failure is worth retrying (the pipeline retries).
//!
//! The messages are written by hand from the proto (prost derives, same field numbers) and
//! the call goes through tonic's generic client, so building needs no `protoc`.

use std::time::Duration;

use async_trait::async_trait;
use http::uri::PathAndQuery;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};
use wallaby_codec::{Change, TableSchema, WireFormat};
use wallaby_crds::destination::{DestinationSpec, GrpcSpec, PayloadMode};

use super::http::{changes_key, messages_payload};
use super::{Destination, DestinationError, TypeOverrides, WriteAck};
use crate::batch::ChangeBatch;

/// Full method path of `IngestService/IngestBatch`.
pub const INGEST_BATCH_PATH: &str = "/wallaby.ingest.v1.IngestService/IngestBatch";
/// Metadata key carrying the payload mode.
pub const PAYLOAD_MODE_METADATA: &str = "x-wallaby-payload-mode";

/// `IngestBatchRequest` of worker/proto/ingest.proto.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IngestBatchRequest {
    /// Flow id.
    #[prost(string, tag = "1")]
    pub flow_id: String,
    /// Logical destination name.
    #[prost(string, tag = "2")]
    pub destination: String,
    /// `schema.table` (empty for logical messages).
    #[prost(string, tag = "3")]
    pub table: String,
    /// Schema version of the table.
    #[prost(uint32, tag = "4")]
    pub schema_version: u32,
    /// Wire format of `payload`.
    #[prost(string, tag = "5")]
    pub format: String,
    /// Encoded changes, or JSON lines of logical messages.
    #[prost(bytes = "vec", tag = "6")]
    pub payload: Vec<u8>,
    /// MIME type of `payload`.
    #[prost(string, tag = "7")]
    pub content_type: String,
    /// Hash of the changes' (table, key, lsn).
    #[prost(string, tag = "8")]
    pub idempotency_key: String,
    /// LSN of the first change.
    #[prost(uint64, tag = "9")]
    pub first_lsn: u64,
    /// LSN of the last change.
    #[prost(uint64, tag = "10")]
    pub last_lsn: u64,
    /// Changes (or messages) in `payload`.
    #[prost(uint32, tag = "11")]
    pub record_count: u32,
    /// `changes` or `messages`.
    #[prost(string, tag = "12")]
    pub kind: String,
}

/// `IngestBatchResponse` of worker/proto/ingest.proto.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IngestBatchResponse {
    /// Records the server accepted.
    #[prost(uint64, tag = "1")]
    pub accepted: u64,
}

/// Configuration of a `grpc` Destination that cannot work; each names the field.
#[derive(Debug, thiserror::Error)]
pub enum GrpcConfigError {
    /// `endpoint` is not `host:port` or an http(s) URL.
    #[error("spec.grpc.endpoint {endpoint:?}: {reason}; write host:port (e.g. ingest:50051)")]
    Endpoint {
        /// As written.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// A metadata header is not valid gRPC metadata.
    #[error("spec.grpc.headers.{name}: {reason}")]
    Header {
        /// Header name.
        name: String,
        /// Why.
        reason: String,
    },
    /// `timeout` does not parse.
    #[error("spec.grpc.timeout: {0}")]
    Timeout(String),
    /// `payloadMode: wal`.
    #[error(
        "spec.grpc.payloadMode: wal is not supported: the worker decodes pgoutput into typed changes and does not keep the raw WAL bytes; use wire (the encoded batch in spec.format) or recordJson (JSON lines)"
    )]
    WalMode,
    /// TLS options the client cannot honour.
    #[error("spec.grpc.tls: {0}")]
    Tls(String),
}

/// Checks the `grpc` block of Destination `name`; problems name the field.
pub fn validate(name: &str, spec: &DestinationSpec) -> Vec<String> {
    let Some(grpc) = &spec.grpc else {
        return vec![format!(
            "Destination/{name}: type grpc needs a spec.grpc block with at least endpoint"
        )];
    };
    let mut problems = Vec::new();
    if let Err(e) = endpoint_uri(grpc) {
        problems.push(e);
    }
    if grpc.payload_mode == PayloadMode::Wal {
        problems.push(GrpcConfigError::WalMode);
    }
    if let Err(e) = grpc.timeout.parse() {
        problems.push(GrpcConfigError::Timeout(e));
    }
    if let Err(e) = metadata(grpc) {
        problems.push(e);
    }
    if let Err(e) = tls(grpc) {
        problems.push(e);
    }
    problems
        .into_iter()
        .map(|e| format!("Destination/{name} {e}"))
        .collect()
}

/// Client of one `grpc` Destination.
pub struct GrpcDestination {
    client: tonic::client::Grpc<Channel>,
    endpoint: String,
    flow_id: String,
    destination: String,
    format: WireFormat,
    record_json: bool,
    timeout: Duration,
    metadata: MetadataMap,
    overrides: TypeOverrides,
}

impl std::fmt::Debug for GrpcDestination {
    // Metadata values may be credentials: only the names are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcDestination")
            .field("endpoint", &self.endpoint)
            .field("flow_id", &self.flow_id)
            .field("destination", &self.destination)
            .field("format", &self.format)
            .field("record_json", &self.record_json)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl GrpcDestination {
    /// Builds the client; the connection is made lazily, so an unreachable server is a
    /// transient write error (retried), not a start-up failure.
    pub fn open(
        spec: &GrpcSpec,
        flow_id: String,
        destination: String,
        format: WireFormat,
        overrides: TypeOverrides,
    ) -> Result<Self, GrpcConfigError> {
        let uri = endpoint_uri(spec)?;
        if spec.payload_mode == PayloadMode::Wal {
            return Err(GrpcConfigError::WalMode);
        }
        let timeout = spec.timeout.parse().map_err(GrpcConfigError::Timeout)?;
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| GrpcConfigError::Endpoint {
                endpoint: spec.endpoint.clone(),
                reason: e.to_string(),
            })?
            .timeout(timeout)
            .connect_timeout(timeout);
        if let Some(config) = tls(spec)? {
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| GrpcConfigError::Tls(e.to_string()))?;
        }
        Ok(Self {
            client: tonic::client::Grpc::new(endpoint.connect_lazy()),
            endpoint: uri,
            flow_id: spec.flow_id.clone().unwrap_or(flow_id),
            destination: spec.destination.clone().unwrap_or(destination),
            format,
            record_json: matches!(
                spec.payload_mode,
                PayloadMode::RecordJson | PayloadMode::Raw
            ),
            timeout,
            metadata: metadata(spec)?,
            overrides,
        })
    }

    async fn call(
        &mut self,
        what: &str,
        message: IngestBatchRequest,
    ) -> Result<(), DestinationError> {
        let target = format!("gRPC IngestBatch to {} ({what})", self.endpoint);
        let mut request = tonic::Request::new(message);
        *request.metadata_mut() = self.metadata.clone();
        request.set_timeout(self.timeout);
        let ready = tokio::time::timeout(self.timeout, self.client.ready()).await;
        match ready {
            Err(_) => {
                return Err(DestinationError::transient(format!(
                    "{target}: not connected within the timeout of {:?}",
                    self.timeout
                ))
                .with_hint("the server is slow or unreachable; the batch is retried"));
            }
            Ok(Err(e)) => {
                return Err(DestinationError::transient(format!(
                    "{target}: cannot connect: {e}"
                ))
                .with_hint("check spec.grpc.endpoint; the batch is retried once the server is reachable"));
            }
            Ok(Ok(())) => {}
        }
        let codec = tonic_prost::ProstCodec::<IngestBatchRequest, IngestBatchResponse>::default();
        let path = PathAndQuery::from_static(INGEST_BATCH_PATH);
        match self.client.unary(request, path, codec).await {
            Ok(response) => {
                tracing::debug!(accepted = response.get_ref().accepted, "{target}: accepted");
                Ok(())
            }
            // The server already holds this idempotency key: the payload is durable there.
            Err(status) if status.code() == Code::AlreadyExists => Ok(()),
            Err(status) => Err(classify(&target, &status)),
        }
    }

    fn request(&self, kind: &str, payload: Vec<u8>, key: String) -> IngestBatchRequest {
        IngestBatchRequest {
            flow_id: self.flow_id.clone(),
            destination: self.destination.clone(),
            kind: kind.into(),
            payload,
            idempotency_key: key,
            ..Default::default()
        }
    }

    async fn write_group(
        &mut self,
        schema: &TableSchema,
        changes: &[Change],
    ) -> Result<(), DestinationError> {
        let format = if self.record_json {
            WireFormat::Json
        } else {
            self.format
        };
        let table = schema.qualified_name();
        let payload = wallaby_codec::encode(format, schema, changes).map_err(|e| {
            DestinationError::permanent(format!("encoding {table} as {}: {e}", format.as_str()))
                .with_hint("map the offending type with spec.typeMappings (e.g. to string)")
        })?;
        let mut message = self.request("changes", payload, changes_key(schema, changes));
        message.table = table.clone();
        message.schema_version = schema.version;
        message.format = format.as_str().into();
        message.content_type = format.content_type().into();
        message.first_lsn = changes.first().map_or(0, |c| c.lsn);
        message.last_lsn = changes.last().map_or(0, |c| c.lsn);
        message.record_count = u32::try_from(changes.len()).unwrap_or(u32::MAX);
        self.call(&format!("{} changes of {table}", changes.len()), message)
            .await
    }
}

#[async_trait]
impl Destination for GrpcDestination {
    async fn write(&mut self, batch: &ChangeBatch) -> Result<WriteAck, DestinationError> {
        for group in &batch.tables {
            if group.changes.is_empty() {
                continue;
            }
            let schema = self.overrides.apply(&group.schema);
            self.write_group(&schema, &group.changes).await?;
        }
        if !batch.messages.is_empty() {
            let (payload, key) = messages_payload(batch);
            let mut message = self.request("messages", payload, key);
            message.format = WireFormat::Json.as_str().into();
            message.content_type = WireFormat::Json.content_type().into();
            message.first_lsn = batch.messages.first().map_or(0, |m| m.lsn.0);
            message.last_lsn = batch.messages.last().map_or(0, |m| m.lsn.0);
            message.record_count = u32::try_from(batch.messages.len()).unwrap_or(u32::MAX);
            let what = format!("{} logical messages", batch.messages.len());
            self.call(&what, message).await?;
        }
        Ok(WriteAck::Durable)
    }

    async fn flush(&mut self) -> Result<(), DestinationError> {
        // Every write is durable when it returns: nothing is buffered.
        Ok(())
    }
}

/// Retryable codes say "later"; the others say the request (or its credentials) is
/// wrong and resending the same batch cannot help.
fn classify(target: &str, status: &Status) -> DestinationError {
    let message = format!("{target}: status {:?}: {}", status.code(), status.message());
    match status.code() {
        // tonic reports a refused or broken connection as UNAVAILABLE too.
        Code::Unavailable => DestinationError::transient(message).with_hint(
            "the server is unreachable or overloaded (check spec.grpc.endpoint); the batch is retried",
        ),
        Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Internal
        | Code::Unknown
        | Code::Cancelled => DestinationError::transient(message),
        Code::Unauthenticated | Code::PermissionDenied => DestinationError::permanent(message)
            .with_hint("the server refused the credentials: check spec.grpc.headers"),
        Code::NotFound | Code::Unimplemented => DestinationError::permanent(message).with_hint(
            "the server does not serve wallaby.ingest.v1.IngestService/IngestBatch: check spec.grpc.endpoint",
        ),
        _ => DestinationError::permanent(message).with_hint(
            "the server rejected the request; check spec.grpc.payloadMode and spec.format against what it expects",
        ),
    }
}

/// `http(s)://host:port` from `endpoint` (`host:port`, or a URL as written).
fn endpoint_uri(spec: &GrpcSpec) -> Result<String, GrpcConfigError> {
    let raw = spec.endpoint.trim();
    let bad = |reason: &str| GrpcConfigError::Endpoint {
        endpoint: spec.endpoint.clone(),
        reason: reason.into(),
    };
    let uri = if raw.starts_with("http://") || raw.starts_with("https://") {
        raw.to_owned()
    } else {
        let scheme = if spec.insecure { "http" } else { "https" };
        format!("{scheme}://{raw}")
    };
    let parsed: http::Uri = uri.parse().map_err(|_| bad("not a valid address"))?;
    if parsed.host().is_none_or(str::is_empty) {
        return Err(bad("it has no host"));
    }
    if parsed.port_u16().is_none() {
        return Err(bad("it has no port"));
    }
    Ok(uri)
}

/// Metadata sent with every call: `headers` and the payload mode.
fn metadata(spec: &GrpcSpec) -> Result<MetadataMap, GrpcConfigError> {
    let mut map = MetadataMap::new();
    for (name, value) in &spec.headers {
        let bad = |reason: String| GrpcConfigError::Header {
            name: name.clone(),
            reason,
        };
        let key = AsciiMetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|e| bad(format!("not a valid metadata key: {e}")))?;
        let value = AsciiMetadataValue::try_from(value.as_str())
            .map_err(|e| bad(format!("not a valid ASCII metadata value: {e}")))?;
        map.insert(key, value);
    }
    let mode = match spec.payload_mode {
        PayloadMode::Wire => "wire",
        PayloadMode::RecordJson | PayloadMode::Raw => "recordJson",
        PayloadMode::Wal => "wal",
    };
    map.insert(PAYLOAD_MODE_METADATA, AsciiMetadataValue::from_static(mode));
    Ok(map)
}

/// TLS when `insecure` is false: the Mozilla roots and the endpoint's host (or
/// `tls.serverName`). CA bundles and client certificates from Secrets are not read by this
/// version: they are refused here rather than silently ignored.
fn tls(spec: &GrpcSpec) -> Result<Option<ClientTlsConfig>, GrpcConfigError> {
    let plain = spec.insecure || spec.endpoint.trim().starts_with("http://");
    if plain {
        return Ok(None);
    }
    let mut config = ClientTlsConfig::new().with_webpki_roots();
    if let Some(t) = &spec.tls {
        if t.ca.is_some() || t.client_cert.is_some() || t.client_key.is_some() {
            return Err(GrpcConfigError::Tls(
                "ca, clientCert and clientKey are not supported by this worker version; use a server certificate from a public CA (verified against the Mozilla roots), or insecure: true inside a trusted network".into(),
            ));
        }
        if let Some(name) = &t.server_name {
            config = config.domain_name(name.clone());
        }
    }
    Ok(Some(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(endpoint: &str, insecure: bool) -> GrpcSpec {
        serde_json::from_value(serde_json::json!({"endpoint": endpoint, "insecure": insecure}))
            .unwrap()
    }

    #[test]
    fn endpoints_get_a_scheme_from_insecure() {
        assert_eq!(endpoint_uri(&spec("h:1", true)).unwrap(), "http://h:1");
        assert_eq!(endpoint_uri(&spec("h:1", false)).unwrap(), "https://h:1");
        assert_eq!(
            endpoint_uri(&spec("https://h:443", true)).unwrap(),
            "https://h:443"
        );
        assert!(endpoint_uri(&spec("h", true)).is_err());
        assert!(endpoint_uri(&spec(":1", true)).is_err());
    }

    #[test]
    fn status_codes_are_classified() {
        use super::super::ErrorClass::{Permanent, Transient};
        for (code, class) in [
            (Code::Unavailable, Transient),
            (Code::DeadlineExceeded, Transient),
            (Code::ResourceExhausted, Transient),
            (Code::Aborted, Transient),
            (Code::InvalidArgument, Permanent),
            (Code::Unauthenticated, Permanent),
            (Code::PermissionDenied, Permanent),
            (Code::NotFound, Permanent),
        ] {
            assert_eq!(
                classify("t", &Status::new(code, "x")).class,
                class,
                "{code:?}"
            );
        }
    }
}
