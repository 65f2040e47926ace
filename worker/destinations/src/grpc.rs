//! The `grpc` destination: a client of `wallaby.ingest.v1.IngestService`
//! (worker/destinations/proto/ingest.proto). Each table group of a batch is one `IngestBatch` call with
//! the group's payload, its idempotency key and LSN range; OK makes it durable, the status
//! code decides whether a failure is worth retrying (the pipeline retries).
//!
//! The messages are written by hand from the proto (prost derives, same field numbers) and
//! the call goes through tonic's generic client, so building needs no `protoc`. TLS uses
//! the Mozilla roots, or the PEM CA of `tls.ca`, and a client certificate for mutual TLS.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::uri::PathAndQuery;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};
use wallaby_codec::{Change, TableSchema, WireFormat};
use wallaby_crds::DestinationType;
use wallaby_crds::destination::{DestinationSpec, GrpcSpec};

use crate::idempotency::{changes_key, messages_payload};
use crate::payload::{BodyMode, Encoded};
use crate::registry::{OpenError, Registration, SecretSource};
use wallaby_pipeline::batch::ChangeBatch;
use wallaby_pipeline::destination::{Destination, DestinationError, TypeOverrides, WriteAck};

/// Full method path of `IngestService/IngestBatch`.
pub const INGEST_BATCH_PATH: &str = "/wallaby.ingest.v1.IngestService/IngestBatch";
/// Metadata key carrying the payload mode.
pub const PAYLOAD_MODE_METADATA: &str = "x-wallaby-payload-mode";

/// `IngestBatchRequest` of worker/destinations/proto/ingest.proto.
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

/// `IngestBatchResponse` of worker/destinations/proto/ingest.proto.
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
    /// TLS options the client cannot honour.
    #[error("spec.grpc.tls: {0}")]
    Tls(String),
}

/// Key of the `tls.ca` PEM in a grpc Destination's entry of `Resolved.destination_secrets`.
pub const TLS_CA: &str = "tls.ca";
/// Key of the `tls.clientCert` PEM there.
pub const TLS_CLIENT_CERT: &str = "tls.clientCert";
/// Key of the `tls.clientKey` PEM there.
pub const TLS_CLIENT_KEY: &str = "tls.clientKey";

/// PEM material of `spec.grpc.tls`, read from the Secret keys its selectors name.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct GrpcTlsMaterial {
    /// CA bundle that replaces the Mozilla roots.
    pub ca_pem: Option<String>,
    /// Client certificate (chain) for mutual TLS.
    pub client_cert_pem: Option<String>,
    /// Private key of the client certificate.
    pub client_key_pem: Option<String>,
}

impl std::fmt::Debug for GrpcTlsMaterial {
    // The private key is a secret: only whether it is there.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcTlsMaterial")
            .field("ca_pem", &self.ca_pem.is_some())
            .field("client_cert_pem", &self.client_cert_pem.is_some())
            .field("client_key_pem", &self.client_key_pem.is_some())
            .finish()
    }
}

impl GrpcTlsMaterial {
    /// The material as stored in `Resolved.destination_secrets` (keys [`TLS_CA`], …).
    pub fn from_secret_data(data: &BTreeMap<String, String>) -> Self {
        Self {
            ca_pem: data.get(TLS_CA).cloned(),
            client_cert_pem: data.get(TLS_CLIENT_CERT).cloned(),
            client_key_pem: data.get(TLS_CLIENT_KEY).cloned(),
        }
    }

    /// The inverse of [`Self::from_secret_data`].
    pub fn into_secret_data(self) -> BTreeMap<String, String> {
        [
            (TLS_CA, self.ca_pem),
            (TLS_CLIENT_CERT, self.client_cert_pem),
            (TLS_CLIENT_KEY, self.client_key_pem),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_owned(), v?)))
        .collect()
    }
}

/// The `grpc` entry of the registry.
pub static REGISTRATION: Registration = Registration {
    types: &[DestinationType::Grpc],
    secret_names: |spec| spec.grpc.iter().flat_map(secret_names).collect(),
    check: |ctx| resolve(ctx.name, ctx.spec, ctx.secrets).map(GrpcTlsMaterial::into_secret_data),
    open: |ctx| {
        let spec = ctx.spec.grpc.as_ref().ok_or_else(|| {
            OpenError(format!(
                "Destination/{}: type grpc needs a spec.grpc block",
                ctx.name
            ))
        })?;
        let tls = GrpcTlsMaterial::from_secret_data(ctx.secrets);
        let sink = GrpcDestination::open(
            spec,
            &tls,
            ctx.flow_id(),
            ctx.name.to_owned(),
            ctx.format(),
            ctx.overrides(),
        )
        .map_err(|e| OpenError(format!("Destination/{}: {e}", ctx.name)))?;
        Ok(Box::new(sink))
    },
};

/// Names of the Secrets `spec.grpc.tls` reads.
pub fn secret_names(spec: &GrpcSpec) -> Vec<String> {
    spec.tls
        .iter()
        .flat_map(|t| [&t.ca, &t.client_cert, &t.client_key])
        .flatten()
        .map(|s| s.name.clone())
        .collect()
}

/// Checks the `grpc` block of Destination `name` and reads its TLS material from
/// `secrets`; problems name the field (and the Secret key).
pub fn resolve(
    name: &str,
    spec: &DestinationSpec,
    secrets: &dyn SecretSource,
) -> Result<GrpcTlsMaterial, Vec<String>> {
    let mut problems = validate(name, spec);
    let Some(grpc) = &spec.grpc else {
        return Err(problems);
    };
    let mut material = GrpcTlsMaterial::default();
    if let Some(tls) = &grpc.tls {
        for (field, selector, slot) in [
            ("tls.ca", &tls.ca, &mut material.ca_pem),
            (
                "tls.clientCert",
                &tls.client_cert,
                &mut material.client_cert_pem,
            ),
            (
                "tls.clientKey",
                &tls.client_key,
                &mut material.client_key_pem,
            ),
        ] {
            let Some(sel) = selector else { continue };
            match secrets
                .secret(&sel.name, &[sel.key.as_str()])
                .and_then(|mut d| d.remove(&sel.key))
            {
                Some(pem) => *slot = Some(pem),
                None => problems.push(format!(
                    "Destination/{name} spec.grpc.{field}: key {:?} of Secret {:?} not found: {}",
                    sel.key,
                    sel.name,
                    secrets.how_to_provide(&sel.name, &sel.key)
                )),
            }
        }
    }
    if problems.is_empty()
        && let Err(e) = tls(grpc, &material)
    {
        problems.push(format!("Destination/{name} {e}"));
    }
    if problems.is_empty() {
        Ok(material)
    } else {
        Err(problems)
    }
}

/// Checks the `grpc` block of Destination `name` without reading Secrets; problems name
/// the field.
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
    if let Err(e) = grpc.timeout.parse() {
        problems.push(GrpcConfigError::Timeout(e));
    }
    if let Err(e) = metadata(grpc) {
        problems.push(e);
    }
    problems.extend(tls_shape(grpc));
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
    mode: BodyMode,
    timeout: Duration,
    /// `spec.grpc.maxMessageBytes`: larger table groups are split into several calls.
    max_message_bytes: u64,
    metadata: MetadataMap,
    overrides: TypeOverrides,
    /// What TLS was set up with, to explain a failed handshake.
    tls: TlsSetup,
    /// Explains transport failures of a TLS channel; `None` in plain text.
    probe: Option<TlsProbe>,
}

/// Room kept under `maxMessageBytes` for the request's fields around the payload (table,
/// flow id, destination, idempotency key, LSNs) and the gRPC frame.
const REQUEST_ENVELOPE_BYTES: u64 = 16 * 1024;

/// Longest a [`TlsProbe`] waits for the server's verdict.
const PROBE_WAIT: Duration = Duration::from_secs(5);

/// A bare TLS handshake with the channel's settings, run when a call on a TLS channel
/// failed in the transport without saying why. With TLS 1.3 the server judges the client
/// certificate after the client considers the handshake done, so its refusal (an alert)
/// races with the first request, which then often fails only with "connection closed".
/// The probe completes the handshake, sends the HTTP/2 preface and reads the server's
/// answer: its SETTINGS (all is well), or the alert.
struct TlsProbe {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    /// `host:port`.
    address: String,
}

/// HTTP/2 connection preface and an empty SETTINGS frame (RFC 9113 §3.4, §6.5).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

impl TlsProbe {
    /// Built from the same material as the channel's `ClientTlsConfig`.
    fn new(
        uri: &http::Uri,
        server_name: Option<&str>,
        material: &GrpcTlsMaterial,
    ) -> Result<Self, GrpcConfigError> {
        let tls_error = |e: rustls::Error| GrpcConfigError::Tls(e.to_string());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls_error)?;
        let mut roots = rustls::RootCertStore::empty();
        match &material.ca_pem {
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    let cert = cert.map_err(|e| {
                        GrpcConfigError::Tls(format!(
                            "tls.ca: a PEM certificate does not parse: {e}"
                        ))
                    })?;
                    roots.add(cert).map_err(tls_error)?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let builder = builder.with_root_certificates(roots);
        let mut config = match (&material.client_cert_pem, &material.client_key_pem) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| GrpcConfigError::Tls(format!("tls.clientCert: {e}")))?;
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
                    .map_err(|e| GrpcConfigError::Tls(format!("tls.clientKey: {e}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(tls_error)?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let host = server_name
            .or_else(|| uri.host())
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name = ServerName::try_from(host.clone()).map_err(|e| {
            GrpcConfigError::Tls(format!("{host:?} is not a valid TLS server name: {e}"))
        })?;
        let address = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        Ok(Self {
            config: Arc::new(config),
            server_name,
            address,
        })
    }

    /// The server's TLS verdict, or `None` when the handshake and the first read went
    /// through, the server could not be reached, or `wait` passed.
    async fn run(&self, wait: Duration) -> Option<rustls::Error> {
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(&self.address).await.ok()?;
            let connector = tokio_rustls::TlsConnector::from(self.config.clone());
            let mut tls = match connector.connect(self.server_name.clone(), tcp).await {
                Ok(s) => s,
                Err(e) => return rustls_error(&e).cloned(),
            };
            if let Err(e) = tls.write_all(H2_PREFACE).await {
                return rustls_error(&e).cloned();
            }
            let mut answer = [0u8; 9];
            match tls.read(&mut answer).await {
                Err(e) => rustls_error(&e).cloned(),
                Ok(_) => None,
            }
        };
        tokio::time::timeout(wait, attempt).await.ok().flatten()
    }
}

/// Whether `err` is (or wraps) a failure of tonic's transport rather than a gRPC status
/// the server sent.
fn in_transport(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if e.is::<tonic::transport::Error>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// The TLS options in use, as far as a handshake failure's hint needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsSetup {
    /// Plain-text HTTP/2.
    Plain,
    /// TLS; `custom_ca`: `tls.ca` replaced the Mozilla roots; `identity`: a client
    /// certificate is offered.
    Tls { custom_ca: bool, identity: bool },
}

impl std::fmt::Debug for GrpcDestination {
    // Metadata values may be credentials: only the names are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcDestination")
            .field("endpoint", &self.endpoint)
            .field("flow_id", &self.flow_id)
            .field("destination", &self.destination)
            .field("format", &self.format)
            .field("mode", &self.mode)
            .field("timeout", &self.timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .finish_non_exhaustive()
    }
}

impl GrpcDestination {
    /// Builds the client with the TLS material of `spec.grpc.tls` (see [`resolve`]); the
    /// connection is made lazily, so an unreachable server is a transient write error
    /// (retried), not a start-up failure.
    pub fn open(
        spec: &GrpcSpec,
        tls_material: &GrpcTlsMaterial,
        flow_id: String,
        destination: String,
        format: WireFormat,
        overrides: TypeOverrides,
    ) -> Result<Self, GrpcConfigError> {
        let uri = endpoint_uri(spec)?;
        let timeout = spec.timeout.parse().map_err(GrpcConfigError::Timeout)?;
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| GrpcConfigError::Endpoint {
                endpoint: spec.endpoint.clone(),
                reason: e.to_string(),
            })?
            .timeout(timeout)
            .connect_timeout(timeout);
        if let Some(config) = tls(spec, tls_material)? {
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| GrpcConfigError::Tls(e.to_string()))?;
        }
        let tls_setup = if uses_tls(spec) {
            TlsSetup::Tls {
                custom_ca: tls_material.ca_pem.is_some(),
                identity: tls_material.client_cert_pem.is_some(),
            }
        } else {
            TlsSetup::Plain
        };
        let probe = match tls_setup {
            TlsSetup::Plain => None,
            TlsSetup::Tls { .. } => {
                let parsed: http::Uri = uri.parse().map_err(|_| GrpcConfigError::Endpoint {
                    endpoint: spec.endpoint.clone(),
                    reason: "not a valid address".into(),
                })?;
                let server_name = spec.tls.as_ref().and_then(|t| t.server_name.as_deref());
                Some(TlsProbe::new(&parsed, server_name, tls_material)?)
            }
        };
        Ok(Self {
            tls: tls_setup,
            probe,
            client: tonic::client::Grpc::new(endpoint.connect_lazy()),
            endpoint: uri,
            flow_id: spec.flow_id.clone().unwrap_or(flow_id),
            destination: spec.destination.clone().unwrap_or(destination),
            format,
            mode: BodyMode::of(spec.payload_mode),
            timeout,
            max_message_bytes: spec.max_message_bytes,
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
                if let Some(err) = self.tls_failure(&target, &e).await {
                    return Err(err);
                }
                return Err(DestinationError::transient(format!(
                    "{target}: cannot connect: {}",
                    error_chain(&e)
                ))
                .with_hint(
                    "check spec.grpc.endpoint; the batch is retried once the server is reachable",
                ));
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
            Err(status) => match self.tls_failure(&target, &status).await {
                Some(err) => Err(err),
                None => Err(classify(&target, &status)),
            },
        }
    }

    /// A failed TLS handshake as a permanent error that says which side refused what:
    /// resending cannot help until the certificates or the spec change. `None` when `err`
    /// is not a TLS failure. When the call failed in the transport without a TLS cause,
    /// the [`TlsProbe`] asks the server directly.
    async fn tls_failure(
        &self,
        target: &str,
        err: &(dyn std::error::Error + Send + Sync + 'static),
    ) -> Option<DestinationError> {
        let (
            TlsSetup::Tls {
                custom_ca,
                identity,
            },
            Some(probe),
        ) = (self.tls, &self.probe)
        else {
            return None;
        };
        let probed;
        let failure = match rustls_error(err) {
            Some(f) => f,
            None if in_transport(err) => {
                probed = probe.run(self.timeout.min(PROBE_WAIT)).await?;
                &probed
            }
            None => return None,
        };
        let (what, hint) = match failure {
            rustls::Error::InvalidCertificate(c) => (
                format!("TLS certificate verification of the server failed: {c:?}"),
                if custom_ca {
                    "the server's certificate is not issued by the CA of spec.grpc.tls.ca, or does not name the endpoint's host: fix tls.ca, the server's certificate, or tls.serverName".to_owned()
                } else {
                    "the server's certificate is not issued by a public CA (Mozilla roots), or does not name the endpoint's host: set spec.grpc.tls.ca to the server's CA bundle, or fix tls.serverName".to_owned()
                },
            ),
            rustls::Error::AlertReceived(alert) if !identity => (
                format!("TLS handshake refused by the server: alert {alert:?} (no client certificate was offered)"),
                "the server requires mutual TLS: set spec.grpc.tls.clientCert and spec.grpc.tls.clientKey to a certificate issued by a CA the server trusts".to_owned(),
            ),
            rustls::Error::AlertReceived(alert) => (
                format!("TLS handshake refused by the server: alert {alert:?} (after the client certificate of spec.grpc.tls.clientCert)"),
                "the server rejected the client certificate: issue spec.grpc.tls.clientCert from a CA the server trusts, and check it has not expired".to_owned(),
            ),
            other => (
                format!("TLS failure: {other}"),
                "check spec.grpc.tls against the server's TLS settings".to_owned(),
            ),
        };
        Some(DestinationError::permanent(format!("{target}: {what}")).with_hint(hint))
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
        let table = schema.qualified_name();
        // Halves of a group too large for one request go first-half-first, so the calls
        // keep commit order; the split is deterministic, so a re-delivered batch is split
        // the same way and carries the same idempotency keys.
        let mut queue: VecDeque<&[Change]> = VecDeque::from([changes]);
        while let Some(chunk) = queue.pop_front() {
            let Encoded {
                body: payload,
                format: format_name,
                content_type,
            } = self.mode.encode_group(self.format, schema, chunk)?;
            if payload.len() as u64 + REQUEST_ENVELOPE_BYTES > self.max_message_bytes {
                if chunk.len() > 1 {
                    let (first, second) = chunk.split_at(chunk.len() / 2);
                    queue.push_front(second);
                    queue.push_front(first);
                    continue;
                }
                return Err(DestinationError::permanent(format!(
                    "gRPC IngestBatch to {}: one change of {table} at LSN {} encodes to {} bytes, above spec.grpc.maxMessageBytes {}",
                    self.endpoint,
                    wallaby_pipeline::lsn::Lsn(chunk[0].lsn),
                    payload.len(),
                    self.max_message_bytes
                ))
                .with_hint("raise spec.grpc.maxMessageBytes together with the server's maximum receive message size"));
            }
            let mut message = self.request("changes", payload, changes_key(schema, chunk));
            message.table = table.clone();
            message.schema_version = schema.version;
            message.format = format_name.into();
            message.content_type = content_type.into();
            message.first_lsn = chunk.first().map_or(0, |c| c.lsn);
            message.last_lsn = chunk.last().map_or(0, |c| c.lsn);
            message.record_count = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
            self.call(&format!("{} changes of {table}", chunk.len()), message)
                .await?;
        }
        Ok(())
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
            let (json, key) = messages_payload(batch);
            let Encoded {
                body: payload,
                format: format_name,
                content_type,
            } = self.mode.encode_messages(json, &batch.messages);
            let mut message = self.request("messages", payload, key);
            message.format = format_name.into();
            message.content_type = content_type.into();
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
    if status.message().contains("message length too large") {
        // tonic's (and grpc-go's) wording for a request above the server's receive limit.
        return DestinationError::permanent(message).with_hint(
            "the server's maximum receive message size is below spec.grpc.maxMessageBytes: set maxMessageBytes to the server's limit (requests are split to stay under it)",
        );
    }
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

/// The rustls error anywhere in `err`'s source chain, also inside an `io::Error` (whose
/// `source()` skips the error it wraps).
fn rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(r) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(r);
        }
        current = e.source();
    }
    None
}

/// `err` and its sources, `: `-separated, without repeating a message its parent shows.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut current = err.source();
    while let Some(e) = current {
        let part = e.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        current = e.source();
    }
    text
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
    map.insert(
        PAYLOAD_MODE_METADATA,
        AsciiMetadataValue::from_static(BodyMode::of(spec.payload_mode).as_str()),
    );
    Ok(map)
}

/// Whether the connection uses TLS: `insecure: false`, or an `https://` endpoint.
fn uses_tls(spec: &GrpcSpec) -> bool {
    let endpoint = spec.endpoint.trim();
    endpoint.starts_with("https://") || (!spec.insecure && !endpoint.starts_with("http://"))
}

/// Problems of `spec.grpc.tls` visible without the Secrets.
fn tls_shape(spec: &GrpcSpec) -> Vec<GrpcConfigError> {
    let Some(t) = &spec.tls else {
        return Vec::new();
    };
    let mut problems = Vec::new();
    let material = t.ca.is_some() || t.client_cert.is_some() || t.client_key.is_some();
    if material && !uses_tls(spec) {
        problems.push(GrpcConfigError::Tls(format!(
            "ca, clientCert and clientKey need TLS, but {:?} is reached in plain text (insecure: true is the default): set insecure: false",
            spec.endpoint
        )));
    }
    match (&t.client_cert, &t.client_key) {
        (Some(_), None) => problems.push(GrpcConfigError::Tls(
            "clientCert is set without clientKey: name the Secret key holding the certificate's private key (PEM), or drop clientCert".into(),
        )),
        (None, Some(_)) => problems.push(GrpcConfigError::Tls(
            "clientKey is set without clientCert: name the Secret key holding the client certificate (PEM), or drop clientKey".into(),
        )),
        _ => {}
    }
    problems
}

/// TLS settings when [`uses_tls`]: the CA of `tls.ca` (which replaces the Mozilla roots)
/// or the Mozilla roots (webpki-roots), a client identity for mutual TLS, and the
/// endpoint's host or `tls.serverName` as the name to verify. The PEMs are parsed here so
/// a wrong Secret key fails at load with the field's name, not at the first handshake.
fn tls(
    spec: &GrpcSpec,
    material: &GrpcTlsMaterial,
) -> Result<Option<ClientTlsConfig>, GrpcConfigError> {
    if let Some(e) = tls_shape(spec).into_iter().next() {
        return Err(e);
    }
    if !uses_tls(spec) {
        return Ok(None);
    }
    let mut config = ClientTlsConfig::new();
    config = match &material.ca_pem {
        Some(pem) => {
            let count = certificates("tls.ca", pem)?;
            tracing::debug!(
                certificates = count,
                "spec.grpc.tls.ca replaces the Mozilla roots"
            );
            config.ca_certificate(Certificate::from_pem(pem))
        }
        None => config.with_webpki_roots(),
    };
    match (&material.client_cert_pem, &material.client_key_pem) {
        (Some(cert), Some(key)) => {
            certificates("tls.clientCert", cert)?;
            PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| {
                GrpcConfigError::Tls(format!(
                    "clientKey: no PEM private key (PKCS#8, PKCS#1 or SEC1) in the Secret key: {e}"
                ))
            })?;
            config = config.identity(Identity::from_pem(cert, key));
        }
        (None, None) => {}
        // tls_shape reported the selectors; this is material resolved without them.
        _ => {
            return Err(GrpcConfigError::Tls(
                "clientCert and clientKey go together: give both or neither".into(),
            ));
        }
    }
    if let Some(name) = spec.tls.as_ref().and_then(|t| t.server_name.as_ref()) {
        config = config.domain_name(name.clone());
    }
    Ok(Some(config))
}

/// Number of PEM certificates in `pem`; an error names the field when there are none or
/// one does not parse.
fn certificates(field: &str, pem: &str) -> Result<usize, GrpcConfigError> {
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        cert.map_err(|e| {
            GrpcConfigError::Tls(format!(
                "{field}: a PEM certificate in the Secret key does not parse: {e}"
            ))
        })?;
        count += 1;
    }
    if count == 0 {
        return Err(GrpcConfigError::Tls(format!(
            "{field}: the Secret key holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        )));
    }
    Ok(count)
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

    fn tls_spec(yaml: serde_json::Value) -> GrpcSpec {
        serde_json::from_value(yaml).unwrap()
    }

    #[test]
    fn tls_is_used_for_insecure_false_or_an_https_url() {
        assert!(!uses_tls(&spec("h:1", true)));
        assert!(uses_tls(&spec("h:1", false)));
        assert!(uses_tls(&spec("https://h:1", true)));
        assert!(!uses_tls(&spec("http://h:1", false)));
    }

    #[test]
    fn half_given_client_certificates_and_plain_text_material_are_refused() {
        let sel = serde_json::json!({"name": "s", "key": "k"});
        let cases = [
            (
                serde_json::json!({"endpoint": "h:1", "insecure": false, "tls": {"clientCert": sel}}),
                "clientCert is set without clientKey",
            ),
            (
                serde_json::json!({"endpoint": "h:1", "insecure": false, "tls": {"clientKey": sel}}),
                "clientKey is set without clientCert",
            ),
            (
                serde_json::json!({"endpoint": "h:1", "tls": {"ca": sel}}),
                "need TLS, but \"h:1\" is reached in plain text",
            ),
        ];
        for (json, want) in cases {
            let problems = tls_shape(&tls_spec(json.clone()));
            assert_eq!(problems.len(), 1, "{json}: {problems:?}");
            assert!(
                problems[0].to_string().contains(want),
                "{json}: {problems:?}"
            );
        }
        let both = tls_spec(serde_json::json!({
            "endpoint": "h:1", "insecure": false,
            "tls": {"ca": sel, "clientCert": sel, "clientKey": sel, "serverName": "ingest"}
        }));
        assert!(tls_shape(&both).is_empty());
        assert_eq!(secret_names(&both), ["s", "s", "s"]);
    }

    #[test]
    fn tls_material_round_trips_and_hides_the_key() {
        let material = GrpcTlsMaterial {
            ca_pem: Some("ca".into()),
            client_cert_pem: Some("cert".into()),
            client_key_pem: Some("-----BEGIN PRIVATE KEY-----".into()),
        };
        let data = material.clone().into_secret_data();
        assert_eq!(
            data.keys().collect::<Vec<_>>(),
            [TLS_CA, TLS_CLIENT_CERT, TLS_CLIENT_KEY]
        );
        assert_eq!(GrpcTlsMaterial::from_secret_data(&data), material);
        assert!(!format!("{material:?}").contains("PRIVATE"));
        assert!(GrpcTlsMaterial::default().into_secret_data().is_empty());
    }

    #[test]
    fn pem_material_that_does_not_parse_is_refused_with_the_field() {
        let s = tls_spec(serde_json::json!({"endpoint": "h:1", "insecure": false}));
        let bad_ca = GrpcTlsMaterial {
            ca_pem: Some("not a certificate".into()),
            ..Default::default()
        };
        let err = tls(&s, &bad_ca).unwrap_err().to_string();
        assert!(
            err.contains("tls.ca: the Secret key holds no PEM certificate"),
            "{err}"
        );
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .pem();
        let bad_key = GrpcTlsMaterial {
            client_cert_pem: Some(cert.clone()),
            client_key_pem: Some(cert.clone()),
            ..Default::default()
        };
        let err = tls(&s, &bad_key).unwrap_err().to_string();
        assert!(err.contains("clientKey: no PEM private key"), "{err}");
        let good = GrpcTlsMaterial {
            ca_pem: Some(cert.clone()),
            client_cert_pem: Some(cert),
            client_key_pem: Some(key.serialize_pem()),
        };
        assert!(tls(&s, &good).unwrap().is_some());
    }

    #[test]
    fn status_codes_are_classified() {
        use wallaby_pipeline::destination::ErrorClass::{Permanent, Transient};
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
