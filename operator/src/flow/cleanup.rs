//! Deletion of a Flow (finalizer `wallaby.dev/cleanup`): with `cleanupPolicy: delete` the
//! operator stops the worker, then connects to PostgreSQL with the Flow's connection
//! settings and drops the replication slot and the publication; with `retain` nothing is
//! touched. The operator connects itself instead of running a cleanup Job because a Job
//! cannot be created in a terminating namespace (the namespace would hang on the
//! finalizer), and because the result and its error land directly in events and logs.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use wallaby_crds::Flow;
use wallaby_crds::flow::{CleanupPolicy, PostgresSource, SslMode};

use super::apply::{self, ApplyError};
use super::dereference::secret_value;

/// Why a Flow's PostgreSQL objects could not be dropped; the finalizer stays until fixed.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// Stopping the worker failed.
    #[error("stopping the worker of Flow {flow} before dropping its slot failed: {source}")]
    StopWorker {
        flow: String,
        #[source]
        source: ApplyError,
    },
    /// The worker's workload is still being deleted; cleanup retries until it is gone.
    #[error(
        "Flow {flow}: waiting for the worker ({kinds}) to stop before dropping the replication slot"
    )]
    WorkerStopping { flow: String, kinds: String },
    /// The connection Secret could not be read.
    #[error(
        "reading Secret {secret} of Flow {flow} to drop its slot failed: {source}; restore the Secret, or set cleanupPolicy: retain to delete the Flow without dropping the slot"
    )]
    Secret {
        flow: String,
        secret: String,
        #[source]
        source: kube::Error,
    },
    /// The connection settings are unusable.
    #[error(
        "Flow {flow}: {message}; fix the connection settings, or set cleanupPolicy: retain to delete the Flow without dropping the slot"
    )]
    Config { flow: String, message: String },
    /// Connecting or running the drop failed.
    #[error(
        "Flow {flow}: {action} on {target} failed: {source}; the Flow keeps its finalizer and the operator retries (set cleanupPolicy: retain to give up and keep the slot)"
    )]
    Postgres {
        flow: String,
        action: &'static str,
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The slot is still used by a walsender after the worker was stopped.
    #[error(
        "Flow {flow}: replication slot {slot:?} is still active (pid {pid}) after the worker was stopped; retrying"
    )]
    SlotActive {
        flow: String,
        slot: String,
        pid: i32,
    },
}

/// What cleanup did, for events and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CleanupOutcome {
    /// `cleanupPolicy: retain`: nothing dropped.
    Retained,
    /// Slot and publication dropped (or already absent).
    Dropped {
        /// Whether the slot existed.
        slot: bool,
        /// Whether the publication existed.
        publication: bool,
    },
}

/// Runs the cleanup of a Flow being deleted.
pub async fn run(client: &Client, flow: &Flow) -> Result<CleanupOutcome, CleanupError> {
    if flow.spec.cleanup_policy == CleanupPolicy::Retain {
        return Ok(CleanupOutcome::Retained);
    }
    let name = flow.metadata.name.clone().unwrap_or_default();
    let namespace = flow.metadata.namespace.clone().unwrap_or_default();
    let uid = flow.metadata.uid.clone().unwrap_or_default();
    let id = format!("{namespace}/{name}");
    // The children are still there (garbage collection waits for the finalizer): stop the
    // worker and wait until its pods are gone, so no worker can reconnect (and, with
    // createSlot, recreate the slot) after the drop.
    let running = apply::stop_workloads(client, &namespace, &name, &uid)
        .await
        .map_err(|source| CleanupError::StopWorker {
            flow: id.clone(),
            source,
        })?;
    if !running.is_empty() {
        return Err(CleanupError::WorkerStopping {
            flow: id,
            kinds: running.join(", "),
        });
    }
    let pg = &flow.spec.source.postgres;
    let secret = match &pg.secret_ref {
        Some(r) => Some(read_secret(client, &namespace, &r.name, &id).await?),
        None => None,
    };
    let root_cert = match &pg.ssl_root_cert {
        Some(sel) => {
            let s = read_secret(client, &namespace, &sel.name, &id).await?;
            Some(
                secret_value(&s, &sel.key).ok_or_else(|| CleanupError::Config {
                    flow: id.clone(),
                    message: format!(
                        "Secret {:?} has no key {:?} (sslRootCert)",
                        sel.name, sel.key
                    ),
                })?,
            )
        }
        None => None,
    };
    let keys: BTreeMap<String, String> = secret
        .as_ref()
        .map(|s| {
            ["dsn", "host", "port", "user", "password", "dbname"]
                .into_iter()
                .filter_map(|k| secret_value(s, k).map(|v| (k.to_owned(), v)))
                .collect()
        })
        .unwrap_or_default();
    let target = Target::resolve(pg, &keys).map_err(|message| CleanupError::Config {
        flow: id.clone(),
        message,
    })?;
    drop_objects(
        &id,
        &target,
        root_cert.as_deref(),
        &pg.slot,
        &pg.publication,
    )
    .await
}

async fn read_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    flow: &str,
) -> Result<Secret, CleanupError> {
    Api::<Secret>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(|source| CleanupError::Secret {
            flow: flow.into(),
            secret: name.into(),
            source,
        })
}

/// Where to connect; `Debug` omits the password.
#[derive(Clone)]
pub struct Target {
    config: tokio_postgres::Config,
    ssl_mode: SslMode,
    describe: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

impl Target {
    /// Resolves the connection the way the worker does: the Secret's `dsn`, else
    /// `spec.source.postgres.dsn`, then the Secret's `host`, `port`, `user`, `password`,
    /// `dbname` override its parts.
    pub fn resolve(
        spec: &PostgresSource,
        secret: &BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let dsn = secret.get("dsn").or(spec.dsn.as_ref());
        let (parsed, dsn_mode) = match dsn {
            Some(d) => {
                let (d, mode) = strip_sslmode(d);
                let config = tokio_postgres::Config::from_str(&d).map_err(|e| {
                    format!("the connection string (spec.source.postgres.dsn or the Secret's `dsn`) is invalid: {e}")
                })?;
                (config, mode)
            }
            None => (tokio_postgres::Config::new(), None),
        };
        // tokio-postgres appends hosts and ports, so the overridden parts go into a fresh
        // Config instead of the parsed one.
        let mut host = match parsed.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => Some(h.clone()),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => Some(p.display().to_string()),
            None => None,
        };
        let mut port = parsed.get_ports().first().copied().unwrap_or(5432);
        let mut user = parsed.get_user().unwrap_or("postgres").to_owned();
        let mut password = parsed.get_password().map(<[u8]>::to_vec);
        let mut dbname = parsed.get_dbname().map(str::to_owned);
        if let Some(h) = secret.get("host") {
            host = Some(h.clone());
        }
        if let Some(p) = secret.get("port") {
            port = p
                .trim()
                .parse()
                .map_err(|_| format!("the Secret's `port` is not a port number: {p:?}"))?;
        }
        if let Some(u) = secret.get("user") {
            user = u.clone();
        }
        if let Some(p) = secret.get("password") {
            password = Some(p.clone().into_bytes());
        }
        if let Some(d) = secret.get("dbname") {
            dbname = Some(d.clone());
        }
        let Some(host) = host else {
            return Err(
                "no host: set `host` or `dsn` in the Secret, or spec.source.postgres.dsn".into(),
            );
        };
        let dbname = dbname.unwrap_or_else(|| user.clone());
        let mut config = tokio_postgres::Config::new();
        config
            .host(&host)
            .port(port)
            .user(&user)
            .dbname(&dbname)
            .application_name("wallaby-operator")
            .connect_timeout(Duration::from_secs(10));
        if let Some(p) = &password {
            config.password(p);
        }
        let describe = format!("{user}@{host}:{port}/{dbname}");
        Ok(Self {
            config,
            ssl_mode: spec.ssl_mode.or(dsn_mode).unwrap_or_default(),
            describe,
        })
    }
}

/// tokio-postgres knows only disable/prefer/require: take `sslmode` out of the DSN and
/// handle it here (URL or key/value form).
fn strip_sslmode(dsn: &str) -> (String, Option<SslMode>) {
    let parse = |v: &str| {
        serde_json::from_value::<SslMode>(serde_json::Value::String(
            v.trim_matches('\'').to_owned(),
        ))
        .ok()
    };
    if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
        if let Ok(mut url) = url::Url::parse(dsn) {
            let mut mode = None;
            let kept: Vec<(String, String)> = url
                .query_pairs()
                .filter_map(|(k, v)| {
                    if k == "sslmode" {
                        mode = parse(&v);
                        None
                    } else {
                        Some((k.into_owned(), v.into_owned()))
                    }
                })
                .collect();
            if kept.is_empty() {
                url.set_query(None);
            } else {
                url.query_pairs_mut().clear().extend_pairs(kept);
            }
            return (url.to_string(), mode);
        }
        return (dsn.to_owned(), None);
    }
    let mut mode = None;
    let kept: Vec<&str> = dsn
        .split_whitespace()
        .filter(|part| match part.split_once('=') {
            Some(("sslmode", v)) => {
                mode = parse(v);
                false
            }
            _ => true,
        })
        .collect();
    (kept.join(" "), mode)
}

async fn connect(
    flow: &str,
    target: &Target,
    root_cert: Option<&str>,
) -> Result<tokio_postgres::Client, CleanupError> {
    let pg_err = |action: &'static str| {
        let (flow, target) = (flow.to_owned(), target.describe.clone());
        move |source| CleanupError::Postgres {
            flow,
            action,
            target,
            source,
        }
    };
    if target.ssl_mode == SslMode::Disable {
        let mut config = target.config.clone();
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(pg_err("connecting"))?;
        tokio::spawn(connection);
        return Ok(client);
    }
    let tls = tls::config(target.ssl_mode, root_cert).map_err(|message| CleanupError::Config {
        flow: flow.into(),
        message,
    })?;
    let mut config = target.config.clone();
    config.ssl_mode(match target.ssl_mode {
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
        _ => tokio_postgres::config::SslMode::Prefer,
    });
    let (client, connection) = config
        .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
        .await
        .map_err(pg_err("connecting"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// Drops `slot` (ending a walsender still holding it) and `publication` on `target`;
/// absent objects are not errors, so a retried cleanup converges.
pub async fn drop_objects(
    flow: &str,
    target: &Target,
    root_cert: Option<&str>,
    slot: &str,
    publication: &str,
) -> Result<CleanupOutcome, CleanupError> {
    let client = connect(flow, target, root_cert).await?;
    let pg_err = |action: &'static str| {
        let (flow, target) = (flow.to_owned(), target.describe.clone());
        move |source| CleanupError::Postgres {
            flow,
            action,
            target,
            source,
        }
    };
    let active: Option<Option<i32>> = client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(pg_err("reading pg_replication_slots"))?
        .map(|row| row.get(0));
    let slot_existed = active.is_some();
    if let Some(Some(pid)) = active {
        // The worker was deleted above; a walsender still holding the slot is its
        // leftover (pod still terminating). Ending it is what the worker's stop would do.
        client
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .map_err(pg_err("terminating the slot's walsender"))?;
        let still: Option<Option<i32>> = client
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(pg_err("reading pg_replication_slots"))?
            .map(|row| row.get(0));
        if let Some(Some(pid)) = still {
            return Err(CleanupError::SlotActive {
                flow: flow.into(),
                slot: slot.into(),
                pid,
            });
        }
    }
    if slot_existed {
        client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(pg_err("dropping the replication slot"))?;
    }
    let publication_existed = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(pg_err("reading pg_publication"))?
        .is_some();
    if publication_existed {
        // The name matched the CRD's pattern ^[A-Za-z0-9_]+$; quoting keeps its case.
        let quoted = format!("\"{}\"", publication.replace('"', "\"\""));
        client
            .batch_execute(&format!("DROP PUBLICATION IF EXISTS {quoted}"))
            .await
            .map_err(pg_err("dropping the publication"))?;
    }
    Ok(CleanupOutcome::Dropped {
        slot: slot_existed,
        publication: publication_existed,
    })
}

mod tls {
    //! rustls settings per `sslmode`: `verify-full` checks chain and host name, `verify-ca`
    //! and lower modes encrypt; lower modes do not verify (as libpq does).

    use super::*;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, Error, SignatureScheme};

    pub(super) fn config(
        mode: SslMode,
        root_cert: Option<&str>,
    ) -> Result<rustls::ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup failed: {e}"))?;
        if mode != SslMode::VerifyFull {
            // verify-ca is treated like require here: the drop runs once, on a connection
            // whose target the worker already verified while streaming.
            return Ok(builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
                .with_no_client_auth());
        }
        let mut roots = rustls::RootCertStore::empty();
        match root_cert {
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    let cert = cert
                        .map_err(|e| format!("sslRootCert is not a PEM certificate bundle: {e}"))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("invalid CA certificate in sslRootCert: {e}"))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        Ok(builder.with_root_certificates(roots).with_no_client_auth())
    }

    #[derive(Debug)]
    struct Unverified(Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for Unverified {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(dsn: Option<&str>) -> PostgresSource {
        serde_json::from_value(serde_json::json!({
            "dsn": dsn, "slot": "s", "publication": "p"
        }))
        .unwrap()
    }

    #[test]
    fn connection_resolves_like_the_worker() {
        let keys = BTreeMap::from([
            ("host".to_owned(), "db.internal".to_owned()),
            ("password".to_owned(), "hunter2".to_owned()),
        ]);
        let t = Target::resolve(
            &source(Some("postgres://app@ignored:6543/shop?sslmode=disable")),
            &keys,
        )
        .unwrap();
        assert_eq!(format!("{t:?}"), "app@db.internal:6543/shop");
        assert_eq!(t.ssl_mode, SslMode::Disable);
        assert!(!format!("{t:?}").contains("hunter2"));
        // The Secret's dsn wins over spec.dsn.
        let keys = BTreeMap::from([("dsn".to_owned(), "host=h1 user=u dbname=d".to_owned())]);
        let t = Target::resolve(&source(Some("postgres://x@h2/y")), &keys).unwrap();
        assert_eq!(format!("{t:?}"), "u@h1:5432/d");
        assert!(Target::resolve(&source(None), &BTreeMap::new()).is_err());
    }
}
