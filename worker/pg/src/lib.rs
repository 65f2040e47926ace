//! `wallaby-pg`: PostgreSQL connection settings resolved from a Flow's `source.postgres`
//! (DSN without password) and its Secret, rustls verifiers per `sslMode`, identifier
//! quoting and the state-table set-up, shared by the worker and the operator's cleanup.
//! The password and the full DSN never leave this crate in a printable form.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use wallaby_crds::flow::{PostgresSource, SslMode};

pub use error::PgError;
pub use state_table::{EnsureError, TableDdl, ensure_table};

mod error;
mod state_table;

/// `ident` quoted for SQL (`"..."`, with `"` doubled).
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Session settings that fix how PostgreSQL prints values, so the codec's text decoding
/// (`wallaby_codec::text`) sees one canonical form: ISO dates, UTC times, `postgres`
/// intervals, shortest round-trip floats, hex bytea and `$1,234.56` money.
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=postgres \
     -c extra_float_digits=1 -c bytea_output=hex -c lc_monetary=C";

/// `application_name` unless the caller names the flow.
const DEFAULT_APPLICATION_NAME: &str = "wallaby-worker";

/// Where and how to connect. `Debug` and [`PgConnection::describe`] omit the password.
#[derive(Clone)]
pub struct PgConnection {
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
    dbname: String,
    ssl_mode: SslMode,
    ssl_root_cert: Option<PathBuf>,
    /// The CA bundle as PEM text ([`PgConnection::with_root_cert_pem`]); wins over
    /// `ssl_root_cert` for the SQL connections.
    ssl_root_cert_pem: Option<String>,
    /// Shown in `pg_stat_activity`, so an operator (or a stale-holder warning) can tell
    /// which flow a backend belongs to. pg_walstream's native replication connection
    /// ignores it (its libpq backend honours it), so today only the SQL connection shows it.
    application_name: String,
}

impl fmt::Debug for PgConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl PgConnection {
    /// Combines `source.postgres.dsn` with the keys of its Secret (`dsn`, `host`, `port`,
    /// `user`, `password`, `dbname`): the Secret's `dsn` wins over `spec.dsn`, then the
    /// other keys override its parts. Without any DSN the Secret's keys alone suffice as
    /// long as `host` is among them (port 5432, user `postgres` and dbname = user unless
    /// given). `ssl_root_cert` is a file holding the PEM CA (written by the caller from
    /// `source.postgres.sslRootCert`); see also [`PgConnection::with_root_cert_pem`].
    pub fn resolve(
        spec: &PostgresSource,
        secret: Option<&BTreeMap<String, String>>,
        ssl_root_cert: Option<PathBuf>,
    ) -> Result<Self, PgError> {
        let empty = BTreeMap::new();
        let secret = secret.unwrap_or(&empty);
        let from_dsn = secret.contains_key("dsn") || spec.dsn.is_some();
        let (config, dsn_ssl_mode, dsn_root_cert) = match secret.get("dsn").or(spec.dsn.as_ref()) {
            Some(dsn) => {
                let (dsn, dsn_ssl_mode, dsn_root_cert) = split_tls_params(dsn);
                let config = tokio_postgres::Config::from_str(&dsn).map_err(|e| {
                    PgError::Config(format!(
                        "source.postgres.dsn (or the Secret's `dsn`) is not a valid PostgreSQL connection string: {e}; write e.g. postgres://user@host:5432/dbname"
                    ))
                })?;
                (config, dsn_ssl_mode, dsn_root_cert)
            }
            // The Secret's keys alone: `host` is the one without a usable default.
            None if secret.contains_key("host") => (tokio_postgres::Config::new(), None, None),
            None => {
                return Err(PgError::Config(
                    "no connection string: set source.postgres.dsn or key `dsn` in the Secret of source.postgres.secretRef".into(),
                ));
            }
        };
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let mut conn = Self {
            host,
            port,
            user: config.get_user().unwrap_or("postgres").to_owned(),
            password: config
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            // Set below, once the Secret's `user` is known.
            dbname: String::new(),
            ssl_mode: spec.ssl_mode.or(dsn_ssl_mode).unwrap_or_default(),
            ssl_root_cert: ssl_root_cert.or(dsn_root_cert.map(PathBuf::from)),
            ssl_root_cert_pem: None,
            application_name: DEFAULT_APPLICATION_NAME.into(),
        };
        if let Some(h) = secret.get("host") {
            conn.host = h.clone();
        }
        if let Some(p) = secret.get("port") {
            conn.port = p.trim().parse().map_err(|_| {
                PgError::Config(format!("the Secret's `port` is not a port number: {p:?}"))
            })?;
        }
        if let Some(u) = secret.get("user") {
            conn.user = u.clone();
        }
        if let Some(p) = secret.get("password") {
            conn.password = Some(p.clone());
        }
        // The Secret's, else the DSN's dbname or user, else `postgres`; without a DSN, the
        // Secret's user (libpq's default).
        conn.dbname = match secret.get("dbname") {
            Some(d) => d.clone(),
            None if !from_dsn => conn.user.clone(),
            None => config
                .get_dbname()
                .or(config.get_user())
                .unwrap_or("postgres")
                .to_owned(),
        };
        Ok(conn)
    }

    /// Trusts the CA bundle `pem` (PEM text, e.g. `source.postgres.sslRootCert` read from
    /// its Secret) instead of a file: used by [`PgConnection::connect`] and
    /// [`PgConnection::connect_plain`] in place of any `ssl_root_cert` file. The
    /// replication connection cannot take PEM text, so
    /// [`PgConnection::replication_conninfo`] still names the file only.
    pub fn with_root_cert_pem(mut self, pem: String) -> Self {
        self.ssl_root_cert_pem = Some(pem);
        self
    }

    /// Sets `application_name` of both connections, e.g. `wallaby-worker/<flow id>`.
    pub fn with_application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = name.into();
        self
    }

    /// `user@host:port/dbname` — safe for logs and status.
    pub fn describe(&self) -> String {
        format!("{}@{}:{}/{}", self.user, self.host, self.port, self.dbname)
    }

    /// Role the worker connects as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Database name.
    pub fn dbname(&self) -> &str {
        &self.dbname
    }

    /// The effective `sslmode`: `source.postgres.sslMode`, else the DSN's, else the default.
    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// Opens a normal SQL connection with [`SESSION_OPTIONS`]; the connection task runs in
    /// the background.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, PgError> {
        self.connect_with(Some(SESSION_OPTIONS)).await
    }

    /// Opens a normal SQL connection with the server's, database's and role's own session
    /// settings (no [`SESSION_OPTIONS`]), for callers that read no values through the
    /// codec, e.g. the operator's cleanup; the connection task runs in the background.
    pub async fn connect_plain(&self) -> Result<tokio_postgres::Client, PgError> {
        self.connect_with(None).await
    }

    /// Checks the settings the walsender will print values with. pg_walstream's native
    /// transport sends no `options` in its startup packet, so the replication session runs
    /// with the server's, database's and role's defaults; a plain session of the same role
    /// and database sees exactly those. TimeZone may be anything (the codec reads the
    /// offsets); the others must match what the codec parses.
    pub async fn check_output_settings(&self) -> Result<(), PgError> {
        let client = self.connect_plain().await?;
        let row = client
            .query_one(
                "SELECT current_setting('DateStyle'), current_setting('IntervalStyle'), \
                 current_setting('bytea_output'), current_setting('extra_float_digits')::int, \
                 '1234.56'::money::text",
                &[],
            )
            .await
            .map_err(PgError::query(format!(
                "reading the output settings of {}",
                self.describe()
            )))?;
        let date_style: String = row.get(0);
        let interval_style: String = row.get(1);
        let bytea_output: String = row.get(2);
        let float_digits: i32 = row.get(3);
        let money: String = row.get(4);
        let mut wrong = Vec::new();
        if !date_style.starts_with("ISO") {
            wrong.push(format!("DateStyle is {date_style:?}, needs 'ISO'"));
        }
        if interval_style != "postgres" {
            wrong.push(format!(
                "IntervalStyle is {interval_style:?}, needs 'postgres'"
            ));
        }
        if bytea_output != "hex" {
            wrong.push(format!("bytea_output is {bytea_output:?}, needs 'hex'"));
        }
        if float_digits < 1 {
            wrong.push(format!("extra_float_digits is {float_digits}, needs 1"));
        }
        if money != "$1,234.56" {
            wrong.push(format!("money prints as {money:?}, needs lc_monetary 'C'"));
        }
        if wrong.is_empty() {
            return Ok(());
        }
        Err(PgError::Settings(format!(
            "the replication session of {} would print values in a form the worker does not read: {}. \
             Set them for the replication user, e.g. ALTER ROLE {} SET DateStyle = 'ISO' (and likewise \
             IntervalStyle = 'postgres', bytea_output = 'hex', extra_float_digits = 1, lc_monetary = 'C')",
            self.describe(),
            wrong.join("; "),
            self.user
        )))
    }

    async fn connect_with(&self, options: Option<&str>) -> Result<tokio_postgres::Client, PgError> {
        let mut config = tokio_postgres::Config::new();
        if let Some(o) = options {
            config.options(o);
        }
        config
            .host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name(&self.application_name)
            .connect_timeout(std::time::Duration::from_secs(10))
            .ssl_mode(match self.ssl_mode {
                SslMode::Disable => tokio_postgres::config::SslMode::Disable,
                SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                    tokio_postgres::config::SslMode::Require
                }
            });
        if let Some(p) = &self.password {
            config.password(p);
        }
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(self.tls_config()?);
        let (client, connection) = config
            .connect(tls)
            .await
            .map_err(|e| PgError::connect(self, &e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "PostgreSQL connection closed");
            }
        });
        Ok(client)
    }

    /// libpq key/value connection string for the replication connection. Contains the
    /// password: hand it to pg_walstream only, never print it.
    pub fn replication_conninfo(&self) -> String {
        let mut parts = vec![
            kv("host", &self.host),
            kv("port", &self.port.to_string()),
            kv("user", &self.user),
            kv("dbname", &self.dbname),
            kv("replication", "database"),
            kv("application_name", &self.application_name),
            kv("sslmode", ssl_mode_name(self.ssl_mode)),
            // Honoured by libpq transports; pg_walstream's native one drops it, which is
            // why `check_output_settings` exists.
            kv("options", SESSION_OPTIONS),
        ];
        if let Some(p) = &self.password {
            parts.push(kv("password", p));
        }
        if let Some(c) = &self.ssl_root_cert {
            parts.push(kv("sslrootcert", &c.display().to_string()));
        }
        parts.join(" ")
    }

    /// rustls configuration matching `sslmode`: `verify-full` checks chain and host name,
    /// `verify-ca` the chain only, lower modes encrypt without verifying (as libpq does).
    /// The CA: the PEM text of [`PgConnection::with_root_cert_pem`], else the
    /// `ssl_root_cert` file, else the webpki roots.
    fn tls_config(&self) -> Result<rustls::ClientConfig, PgError> {
        use rustls::pki_types::pem::PemObject;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        if let Some(pem) = &self.ssl_root_cert_pem {
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| {
                    PgError::Config(format!("sslRootCert is not a PEM certificate bundle: {e}"))
                })?;
                roots.add(cert).map_err(|e| {
                    PgError::Config(format!("invalid CA certificate in sslRootCert: {e}"))
                })?;
            }
        } else if let Some(path) = &self.ssl_root_cert {
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    PgError::Config(format!(
                        "cannot read the CA bundle {} of source.postgres.sslRootCert: {e}",
                        path.display()
                    ))
                })?;
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    PgError::Config(format!("invalid CA certificate in sslRootCert: {e}"))
                })?;
            }
        } else {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| PgError::Config(format!("TLS setup failed: {e}")))?;
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build();
        let config = match (self.ssl_mode, webpki) {
            (SslMode::VerifyFull, Ok(v)) => builder.with_webpki_verifier(v).with_no_client_auth(),
            (SslMode::VerifyCa, Ok(v)) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(tls::ChainOnly(v)))
                .with_no_client_auth(),
            (SslMode::VerifyFull | SslMode::VerifyCa, Err(e)) => {
                return Err(PgError::Config(format!(
                    "sslmode {} needs CA certificates: {e}",
                    ssl_mode_name(self.ssl_mode)
                )));
            }
            _ => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(tls::Unverified(provider)))
                .with_no_client_auth(),
        };
        Ok(config)
    }
}

fn kv(key: &str, value: &str) -> String {
    format!(
        "{key}='{}'",
        value.replace('\\', "\\\\").replace('\'', "\\'")
    )
}

fn ssl_mode_name(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Allow => "allow",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

/// tokio-postgres knows only disable/prefer/require, so `sslmode` and `sslrootcert` are
/// taken out of the DSN (URL or key/value form) and handled here.
fn split_tls_params(dsn: &str) -> (String, Option<SslMode>, Option<String>) {
    let parse_mode = |v: &str| -> Option<SslMode> {
        serde_json::from_value(serde_json::Value::String(v.to_owned())).ok()
    };
    if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
        if let Ok(mut url) = url::Url::parse(dsn) {
            let mut mode = None;
            let mut root = None;
            let kept: Vec<(String, String)> = url
                .query_pairs()
                .filter_map(|(k, v)| match k.as_ref() {
                    "sslmode" => {
                        mode = parse_mode(&v);
                        None
                    }
                    "sslrootcert" => {
                        root = Some(v.into_owned());
                        None
                    }
                    _ => Some((k.into_owned(), v.into_owned())),
                })
                .collect();
            if kept.is_empty() {
                url.set_query(None);
            } else {
                url.query_pairs_mut().clear().extend_pairs(kept);
            }
            return (url.to_string(), mode, root);
        }
        return (dsn.to_owned(), None, None);
    }
    let mut mode = None;
    let mut root = None;
    let kept: Vec<&str> = dsn
        .split_whitespace()
        .filter(|part| match part.split_once('=') {
            Some(("sslmode", v)) => {
                mode = parse_mode(v.trim_matches('\''));
                false
            }
            Some(("sslrootcert", v)) => {
                root = Some(v.trim_matches('\'').to_owned());
                false
            }
            _ => true,
        })
        .collect();
    (kept.join(" "), mode, root)
}

mod tls {
    //! Certificate verifiers for `sslmode` below `verify-full`.

    use std::sync::Arc;

    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, Error, SignatureScheme};

    /// `prefer` / `require`: encrypt, but (like libpq) do not verify the certificate.
    #[derive(Debug)]
    pub(super) struct Unverified(pub Arc<rustls::crypto::CryptoProvider>);

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

    /// `verify-ca`: the chain must lead to a trusted root; the host name is not checked.
    #[derive(Debug)]
    pub(super) struct ChainOnly(pub Arc<WebPkiServerVerifier>);

    impl ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            match self
                .0
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            {
                Err(Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
                | Err(Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dsn: &str) -> PostgresSource {
        serde_json::from_value(serde_json::json!({"dsn": dsn, "slot": "s", "publication": "p"}))
            .unwrap()
    }

    #[test]
    fn secret_keys_override_the_dsn_and_the_password_is_never_described() {
        let secret: BTreeMap<String, String> = [
            ("password".to_owned(), "s3cr3t".to_owned()),
            ("port".to_owned(), "6543".to_owned()),
        ]
        .into();
        let c = PgConnection::resolve(
            &spec("postgres://app@db.internal/orders?sslmode=verify-full"),
            Some(&secret),
            None,
        )
        .unwrap();
        assert_eq!(c.describe(), "app@db.internal:6543/orders");
        assert_eq!(c.ssl_mode, SslMode::VerifyFull);
        assert!(!format!("{c:?}").contains("s3cr3t"));
        let info = c.replication_conninfo();
        assert!(info.contains("password='s3cr3t'") && info.contains("replication='database'"));
    }

    #[test]
    fn key_value_dsns_work_too() {
        let c = PgConnection::resolve(
            &spec("host=10.0.0.1 port=5433 user=u dbname=d sslmode=require"),
            None,
            None,
        )
        .unwrap();
        assert_eq!(c.describe(), "u@10.0.0.1:5433/d");
        assert_eq!(c.ssl_mode, SslMode::Require);
    }

    fn no_dsn() -> PostgresSource {
        serde_json::from_value(serde_json::json!({"slot": "s", "publication": "p"})).unwrap()
    }

    #[test]
    fn secret_keys_alone_need_a_host() {
        let only_host: BTreeMap<String, String> =
            [("host".to_owned(), "db.internal".to_owned())].into();
        let c = PgConnection::resolve(&no_dsn(), Some(&only_host), None).unwrap();
        assert_eq!(c.describe(), "postgres@db.internal:5432/postgres");
        assert_eq!(c.ssl_mode(), SslMode::default());
        // dbname defaults to the (Secret's) user, as in libpq.
        let keys: BTreeMap<String, String> = [
            ("host".to_owned(), "db.internal".to_owned()),
            ("port".to_owned(), "6543".to_owned()),
            ("user".to_owned(), "app".to_owned()),
            ("password".to_owned(), "s3cr3t".to_owned()),
        ]
        .into();
        let c = PgConnection::resolve(&no_dsn(), Some(&keys), None).unwrap();
        assert_eq!(c.describe(), "app@db.internal:6543/app");
        assert!(c.replication_conninfo().contains("password='s3cr3t'"));
        let keys: BTreeMap<String, String> = [
            ("host".to_owned(), "db.internal".to_owned()),
            ("user".to_owned(), "app".to_owned()),
            ("dbname".to_owned(), "orders".to_owned()),
        ]
        .into();
        let c = PgConnection::resolve(&no_dsn(), Some(&keys), None).unwrap();
        assert_eq!(c.describe(), "app@db.internal:5432/orders");
    }

    #[test]
    fn neither_a_dsn_nor_a_host_is_refused() {
        let no_host: BTreeMap<String, String> = [
            ("user".to_owned(), "app".to_owned()),
            ("password".to_owned(), "s3cr3t".to_owned()),
        ]
        .into();
        for secret in [None, Some(&no_host)] {
            let err = PgConnection::resolve(&no_dsn(), secret, None).unwrap_err();
            assert_eq!(
                err.to_string(),
                "no connection string: set source.postgres.dsn or key `dsn` in the Secret of source.postgres.secretRef"
            );
        }
    }

    #[test]
    fn a_pem_root_cert_is_parsed_and_bad_ones_are_named() {
        let c = PgConnection::resolve(&spec("postgres://u@h/d?sslmode=verify-ca"), None, None)
            .unwrap()
            .with_root_cert_pem("not a certificate".into());
        // No PEM section at all: an empty store, which verify-ca cannot work with.
        let err = c.tls_config().unwrap_err().to_string();
        assert!(
            err.contains("sslmode verify-ca needs CA certificates"),
            "{err}"
        );
        let c = c.with_root_cert_pem(
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
        );
        let err = c.tls_config().unwrap_err().to_string();
        assert!(
            err.contains("invalid CA certificate in sslRootCert"),
            "{err}"
        );
        let c = c.with_root_cert_pem("-----BEGIN CERTIFICATE-----\n!!!\n".into());
        let err = c.tls_config().unwrap_err().to_string();
        assert!(
            err.contains("sslRootCert is not a PEM certificate bundle"),
            "{err}"
        );
    }
}
