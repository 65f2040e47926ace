//! The `http` destination (webhook): one request per table group of a batch, carrying the
//! group's encoded payload (`wire`), its JSON lines (`recordJson` / `raw`) or pgoutput
//! messages (`wal`), with an idempotency header derived from the changes' (table, key, lsn). A 2xx answer makes the
//! group durable; the status code decides whether a failure is worth retrying.
//!
//! ```text
//! ChangeBatch ─▶ per table group: encode ─▶ POST url (Idempotency-Key = H(table,key,lsn…))
//!                                                 ├─ 2xx ─▶ next group … ─▶ WriteAck::Durable
//!                                                 ├─ 408/429/5xx/timeout/network ─▶ transient
//!                                                 └─ other 4xx, 3xx ─▶ permanent (with a hint)
//! ```
//!
//! Retries belong to the pipeline (one loop, the Destination's retry policy, see
//! [`super::effective_retry`]); a re-delivered batch re-sends every group with the same header
//! values, so an endpoint that deduplicates on the header sees each change once.

use std::time::Duration;

use crate::idempotency::{changes_key, messages_payload};
use async_trait::async_trait;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use wallaby_codec::{Change, TableSchema, WireFormat};
use wallaby_crds::DestinationType;
use wallaby_crds::destination::{DestinationSpec, HttpMethod, HttpSpec};

use crate::payload::{BodyMode, Encoded};
use crate::registry::{OpenError, Registration, SecretData, SecretSource};
use wallaby_pipeline::batch::ChangeBatch;
use wallaby_pipeline::destination::{Destination, DestinationError, TypeOverrides, WriteAck};

/// Longest wait a `Retry-After` answer can impose before the error goes back to the
/// pipeline (whose own backoff follows): a peer asking for hours must not freeze shutdown.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Bytes of an error answer's body kept for the error message.
const ERROR_BODY_SNIPPET: usize = 300;
/// Largest response body read (the body is only used in error messages).
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// Metadata headers sent with every request.
pub const HEADER_TABLE: &str = "x-wallaby-table";
/// Schema version of the table group.
pub const HEADER_SCHEMA_VERSION: &str = "x-wallaby-schema-version";
/// `first-last` LSN of the changes in the request (PostgreSQL `X/Y` notation).
pub const HEADER_LSN_RANGE: &str = "x-wallaby-lsn-range";
/// Payload mode (`wire`, `recordJson` or `wal`).
pub const HEADER_PAYLOAD_MODE: &str = "x-wallaby-payload-mode";
/// Wire format of the body (`json` in `recordJson` mode, `pgoutput` in `wal` mode).
pub const HEADER_FORMAT: &str = "x-wallaby-format";
/// Number of changes (or messages) in the body.
pub const HEADER_ROWS: &str = "x-wallaby-rows";
/// `changes` or `messages`.
pub const HEADER_KIND: &str = "x-wallaby-kind";

/// Configuration of an `http` Destination that cannot work; each names the field.
#[derive(Debug, thiserror::Error)]
pub enum HttpConfigError {
    /// `url` is not an absolute http(s) URL.
    #[error("spec.http.url {url:?} is not an absolute http:// or https:// URL: {reason}")]
    Url {
        /// The URL as written.
        url: String,
        /// Why.
        reason: String,
    },
    /// A header name or value is not valid HTTP.
    #[error("{field}: {reason}")]
    Header {
        /// `spec.http.headers.NAME`, `spec.http.idempotencyHeader` or the Secret key.
        field: String,
        /// Why.
        reason: String,
    },
    /// A duration does not parse.
    #[error("spec.http.timeout: {0}")]
    Timeout(String),
    /// TLS set-up failed.
    #[error("TLS set-up for spec.http.url failed: {0}")]
    Tls(String),
}

/// Webhook client of one Destination.
pub struct HttpDestination {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    url: Uri,
    method: Method,
    format: WireFormat,
    mode: BodyMode,
    timeout: Duration,
    /// Static headers: `headers` and the keys of `headersSecretRef` (values never logged).
    headers: HeaderMap,
    idempotency_header: HeaderName,
    overrides: TypeOverrides,
}

impl std::fmt::Debug for HttpDestination {
    // Header values may be credentials: only their names are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpDestination")
            .field("url", &self.url)
            .field("method", &self.method)
            .field("format", &self.format)
            .field("mode", &self.mode)
            .field("timeout", &self.timeout)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The `http` entry of the registry.
pub static REGISTRATION: Registration = Registration {
    types: &[DestinationType::Http],
    secret_names: |spec| {
        spec.http
            .iter()
            .flat_map(|h| h.headers_secret_ref.clone())
            .map(|r| r.name)
            .collect()
    },
    check: |ctx| resolve(ctx.name, ctx.spec, ctx.secrets),
    open: |ctx| {
        let mut spec = ctx.spec.http.clone().ok_or_else(|| {
            OpenError(format!(
                "Destination/{}: type http needs a spec.http block with at least url",
                ctx.name
            ))
        })?;
        // The headers of `headersSecretRef`, as the check resolved them.
        spec.headers
            .extend(ctx.secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
        let sink = HttpDestination::open(&spec, ctx.format(), ctx.overrides())
            .map_err(|e| OpenError(format!("Destination/{}: {e}", ctx.name)))?;
        Ok(Box::new(sink))
    },
};

/// Checks the `http` block of Destination `name` and returns the headers of
/// `headersSecretRef`, which `open` merges into `headers` (like the source Secret, resolved
/// values live only in the run's memory and are never logged). Problems name the field.
pub fn resolve(
    name: &str,
    spec: &DestinationSpec,
    secrets: &dyn SecretSource,
) -> Result<SecretData, Vec<String>> {
    let Some(http) = &spec.http else {
        return Err(vec![format!(
            "Destination/{name}: type http needs a spec.http block with at least url"
        )]);
    };
    let mut problems = Vec::new();
    let mut push = |e: String| problems.push(format!("Destination/{name} {e}"));
    if let Err(e) = parse_url(&http.url) {
        push(e.to_string());
    }
    if let Err(e) = http.timeout.parse() {
        push(HttpConfigError::Timeout(e).to_string());
    }
    for (name, value) in &http.headers {
        if let Err(e) = header(&format!("spec.http.headers.{name}"), name, value) {
            push(e.to_string());
        }
    }
    if let Err(e) = HeaderName::from_bytes(http.idempotency_header.as_bytes()) {
        push(format!(
            "spec.http.idempotencyHeader {:?}: not a valid header name: {e}",
            http.idempotency_header
        ));
    }
    let mut resolved = SecretData::new();
    if let Some(secret_ref) = &http.headers_secret_ref {
        // A Secret document or the cluster gives every key; the environment can only be
        // asked for known keys, so it provides `Authorization`.
        match secrets.secret(&secret_ref.name, &["Authorization"]) {
            Some(data) => {
                for (key, value) in data {
                    let field = format!(
                        "spec.http.headersSecretRef: key {key:?} of Secret {:?}",
                        secret_ref.name
                    );
                    match header(&field, &key, &value) {
                        Ok(_) => {
                            resolved.insert(key, value);
                        }
                        Err(e) => push(e.to_string()),
                    }
                }
            }
            None => push(format!(
                "spec.http.headersSecretRef: Secret {:?} not found: {}",
                secret_ref.name,
                secrets.how_to_provide(&secret_ref.name, "Authorization")
            )),
        }
    }
    if problems.is_empty() {
        Ok(resolved)
    } else {
        Err(problems)
    }
}

impl HttpDestination {
    /// Builds the client from a spec whose `headers` include those of the Secret that
    /// [`resolve`] read.
    pub fn open(
        spec: &HttpSpec,
        format: WireFormat,
        overrides: TypeOverrides,
    ) -> Result<Self, HttpConfigError> {
        let url = parse_url(&spec.url)?;
        let mode = BodyMode::of(spec.payload_mode);
        let timeout = spec.timeout.parse().map_err(HttpConfigError::Timeout)?;
        let mut headers = HeaderMap::new();
        for (name, value) in &spec.headers {
            let (n, mut v) = header(&format!("spec.http.headers.{name}"), name, value)?;
            // Some of them come from a Secret: keep every value out of debug output.
            v.set_sensitive(true);
            headers.insert(n, v);
        }
        let idempotency_header = HeaderName::from_bytes(spec.idempotency_header.as_bytes())
            .map_err(|e| HttpConfigError::Header {
                field: "spec.http.idempotencyHeader".into(),
                reason: format!(
                    "{:?} is not a valid header name: {e}",
                    spec.idempotency_header
                ),
            })?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config()?)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            client,
            url,
            method: match spec.method {
                HttpMethod::Post => Method::POST,
                HttpMethod::Put => Method::PUT,
                HttpMethod::Patch => Method::PATCH,
            },
            format,
            mode,
            timeout,
            headers,
            idempotency_header,
            overrides,
        })
    }

    /// Sends one request; `Ok` only on a 2xx answer.
    async fn send(
        &self,
        what: &str,
        body: Vec<u8>,
        extra: HeaderMap,
    ) -> Result<(), DestinationError> {
        let mut request = Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.url.clone();
        let headers = request.headers_mut();
        headers.extend(self.headers.clone());
        headers.extend(extra);
        let target = format!("HTTP {} {} ({what})", self.method, self.url);
        let exchange = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            // Only an error answer's body matters (for the message); a body that fails
            // to arrive does not change the status the peer already gave.
            let body = if status.is_success() {
                Bytes::new()
            } else {
                Limited::new(response.into_body(), MAX_RESPONSE_BODY)
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default()
            };
            Ok::<_, hyper_util::client::legacy::Error>((status, retry_after, body))
        };
        let (status, retry_after, body) = match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => {
                return Err(DestinationError::transient(format!(
                    "{target}: no answer within the timeout of {:?}",
                    self.timeout
                ))
                .with_hint("the endpoint is slow or unreachable; raise spec.http.timeout if it needs longer"));
            }
            Ok(Err(e)) => return Err(classify_client_error(&target, &e)),
            Ok(Ok(answer)) => answer,
        };
        if status.is_success() {
            return Ok(());
        }
        let snippet = String::from_utf8_lossy(&body[..body.len().min(ERROR_BODY_SNIPPET)])
            .trim()
            .to_owned();
        let message = if snippet.is_empty() {
            format!("{target}: the endpoint answered {status}")
        } else {
            format!("{target}: the endpoint answered {status}: {snippet}")
        };
        let error = classify_status(status, message);
        if error.class == wallaby_pipeline::destination::ErrorClass::Transient
            && let Some(wait) = retry_after
        {
            // The peer said when to come back: honour it (bounded) before the pipeline's
            // own backoff starts.
            tokio::time::sleep(wait.min(MAX_RETRY_AFTER)).await;
        }
        Err(error)
    }

    async fn write_group(
        &mut self,
        schema: &TableSchema,
        changes: &[Change],
    ) -> Result<(), DestinationError> {
        let table = schema.qualified_name();
        let Encoded {
            body,
            format: format_name,
            content_type,
        } = self.mode.encode_group(self.format, schema, changes)?;
        let first = changes.first().map_or(0, |c| c.lsn);
        let last = changes.last().map_or(0, |c| c.lsn);
        let mut extra = HeaderMap::new();
        put(&mut extra, CONTENT_TYPE, content_type);
        put(
            &mut extra,
            self.idempotency_header.clone(),
            &changes_key(schema, changes),
        );
        put(&mut extra, HeaderName::from_static(HEADER_KIND), "changes");
        put(&mut extra, HeaderName::from_static(HEADER_TABLE), &table);
        put(
            &mut extra,
            HeaderName::from_static(HEADER_SCHEMA_VERSION),
            &schema.version.to_string(),
        );
        put(
            &mut extra,
            HeaderName::from_static(HEADER_LSN_RANGE),
            &format!("{}-{}", lsn_text(first), lsn_text(last)),
        );
        put(
            &mut extra,
            HeaderName::from_static(HEADER_PAYLOAD_MODE),
            self.mode.as_str(),
        );
        put(
            &mut extra,
            HeaderName::from_static(HEADER_FORMAT),
            format_name,
        );
        put(
            &mut extra,
            HeaderName::from_static(HEADER_ROWS),
            &changes.len().to_string(),
        );
        let what = format!("{} changes of {table}", changes.len());
        self.send(&what, body, extra).await
    }

    async fn write_messages(&self, batch: &ChangeBatch) -> Result<(), DestinationError> {
        let (json, key) = messages_payload(batch);
        let Encoded {
            body, content_type, ..
        } = self.mode.encode_messages(json, &batch.messages);
        let mut extra = HeaderMap::new();
        put(&mut extra, CONTENT_TYPE, content_type);
        put(&mut extra, self.idempotency_header.clone(), &key);
        put(&mut extra, HeaderName::from_static(HEADER_KIND), "messages");
        put(
            &mut extra,
            HeaderName::from_static(HEADER_ROWS),
            &batch.messages.len().to_string(),
        );
        let what = format!("{} logical messages", batch.messages.len());
        self.send(&what, body, extra).await
    }
}

#[async_trait]
impl Destination for HttpDestination {
    async fn write(&mut self, batch: &ChangeBatch) -> Result<WriteAck, DestinationError> {
        for group in &batch.tables {
            if group.changes.is_empty() {
                continue;
            }
            let schema = self.overrides.apply(&group.schema);
            self.write_group(&schema, &group.changes).await?;
        }
        if !batch.messages.is_empty() {
            self.write_messages(batch).await?;
        }
        Ok(WriteAck::Durable)
    }

    async fn flush(&mut self) -> Result<(), DestinationError> {
        // Every write is durable when it returns: nothing is buffered.
        Ok(())
    }
}

fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Inserts a header whose value the worker produced (table names, numbers, hex): a value
/// that is not valid header text (a table name with control characters) is left out
/// rather than failing the batch.
fn put(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

fn parse_url(url: &str) -> Result<Uri, HttpConfigError> {
    let bad = |reason: String| HttpConfigError::Url {
        url: url.to_owned(),
        reason,
    };
    let uri: Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => return Err(bad(format!("scheme {other:?} is not http or https"))),
        None => return Err(bad("it has no scheme".into())),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("it has no host".into()));
    }
    Ok(uri)
}

fn header(
    field: &str,
    name: &str,
    value: &str,
) -> Result<(HeaderName, HeaderValue), HttpConfigError> {
    let n = HeaderName::from_bytes(name.as_bytes()).map_err(|e| HttpConfigError::Header {
        field: field.to_owned(),
        reason: format!("{name:?} is not a valid header name: {e}"),
    })?;
    let v = HeaderValue::from_str(value).map_err(|e| HttpConfigError::Header {
        field: field.to_owned(),
        reason: format!("the value is not valid header text: {e}"),
    })?;
    Ok((n, v))
}

/// TLS with the Mozilla roots (webpki-roots), as for the source connection: the same
/// result on every machine, whatever its CA store.
fn tls_config() -> Result<rustls::ClientConfig, HttpConfigError> {
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpConfigError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// 2xx never gets here. 408 and 429 say "later", 5xx is the server's problem: transient.
/// Other 4xx say the request itself is wrong and 3xx is a redirect this client does not
/// follow: resending the same batch cannot help.
fn classify_status(status: StatusCode, message: String) -> DestinationError {
    match status.as_u16() {
        408 | 429 => DestinationError::transient(message)
            .with_hint("the endpoint is throttling or timed out; the batch is retried with backoff"),
        500..=599 => DestinationError::transient(message),
        401 | 403 => DestinationError::permanent(message).with_hint(
            "the endpoint refused the credentials: check spec.http.headers and the Secret of spec.http.headersSecretRef",
        ),
        404 | 405 => DestinationError::permanent(message)
            .with_hint("check spec.http.url and spec.http.method"),
        413 => DestinationError::permanent(message).with_hint(
            "the request is too large for the endpoint: lower the Flow's batchSize / batchMaxBytes",
        ),
        300..=399 => DestinationError::permanent(message)
            .with_hint("redirects are not followed: set spec.http.url to the final location"),
        _ => DestinationError::permanent(message).with_hint(
            "the endpoint rejected the payload; check spec.http.payloadMode and spec.format against what it expects",
        ),
    }
}

/// Network trouble (refused, reset, DNS) is transient; a certificate the client cannot
/// verify stays so until someone changes the server or the URL.
fn classify_client_error(target: &str, e: &hyper_util::client::legacy::Error) -> DestinationError {
    let mut chain = Vec::new();
    let mut tls_rejected = false;
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = source {
        chain.push(err.to_string());
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        if err.downcast_ref::<rustls::Error>().is_some()
            || inner.is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some())
        {
            tls_rejected = true;
        }
        source = err.source();
    }
    let detail = if chain.is_empty() {
        e.to_string()
    } else {
        format!("{e}: {}", chain.join(": "))
    };
    let message = format!("{target}: request failed: {detail}");
    if tls_rejected {
        return DestinationError::permanent(message).with_hint(
            "the TLS handshake failed: the server certificate must chain to a public CA and match the host of spec.http.url",
        );
    }
    let hint = if e.is_connect() {
        "cannot connect to the endpoint; the batch is retried once it is reachable"
    } else {
        "the connection broke during the request; the batch is retried"
    };
    DestinationError::transient(message).with_hint(hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        use wallaby_pipeline::destination::ErrorClass::{Permanent, Transient};
        let cases = [
            (400, Permanent),
            (401, Permanent),
            (404, Permanent),
            (408, Transient),
            (409, Permanent),
            (413, Permanent),
            (429, Transient),
            (500, Transient),
            (502, Transient),
            (503, Transient),
            (301, Permanent),
        ];
        for (code, class) in cases {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(
                classify_status(status, String::new()).class,
                class,
                "{code}"
            );
        }
    }

    #[test]
    fn urls_are_checked() {
        assert!(parse_url("http://127.0.0.1:8080/ingest").is_ok());
        assert!(parse_url("https://example.com").is_ok());
        for bad in ["ftp://x/y", "/relative", "http://", "not a url"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
