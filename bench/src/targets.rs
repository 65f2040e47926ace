//! Where the worker writes in a run, and how the harness checks what arrived: the `file`
//! directory (JSON lines or Parquet files), librdkafka's in-process mock cluster, an
//! `s3s-fs` process with its own directory and port, an in-process HTTP endpoint that
//! answers 200 and sums the `x-wallaby-rows` header of each request, and an in-process gRPC
//! `IngestService` that sums the `record_count` of each `IngestBatch` call.

use std::collections::HashMap;
use std::fmt;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use parquet::file::reader::{FileReader, SerializedFileReader};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use tonic::codegen::{BoxFuture, Poll, Service, http};
use wallaby_destinations::grpc::{IngestBatchRequest, IngestBatchResponse};

use crate::proc::ChildGuard;

/// What a run delivers to: `pg_recvlogical` (the baseline) or one worker destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Baseline,
    FileJson,
    FileParquet,
    Kafka,
    S3,
    Http,
    Grpc,
}

pub const ALL: [Target; 7] = [
    Target::Baseline,
    Target::FileJson,
    Target::FileParquet,
    Target::Kafka,
    Target::S3,
    Target::Http,
    Target::Grpc,
];

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::FileJson => "file-json",
            Self::FileParquet => "file-parquet",
            Self::Kafka => "kafka",
            Self::S3 => "s3",
            Self::Http => "http",
            Self::Grpc => "grpc",
        }
    }

    /// What the run does, for the report.
    pub fn description(self) -> &'static str {
        match self {
            Self::Baseline => "pg_recvlogical, pgoutput proto_version=1, to /dev/null",
            Self::FileJson => "worker, file destination, JSON lines, fdatasync per batch",
            Self::FileParquet => "worker, file destination, one Parquet file per batch",
            Self::Kafka => {
                "worker, kafka destination (librdkafka mock cluster in the harness), JSON, acks=all"
            }
            Self::S3 => "worker, s3 destination (s3s-fs on localhost), Parquet",
            Self::Http => {
                "worker, http destination (hyper endpoint in the harness answering 200), JSON"
            }
            Self::Grpc => {
                "worker, grpc destination (tonic IngestService in the harness answering OK), JSON"
            }
        }
    }

    /// Slot of this target in `workload_db` (slot names are cluster-wide).
    pub fn slot(self, workload_db: &str) -> String {
        format!("{workload_db}_{}", self.name().replace('-', "_"))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ALL.into_iter().find(|t| t.name() == s).ok_or_else(|| {
            format!(
                "unknown target {s:?}: expected one of {}",
                ALL.map(Target::name).join(", ")
            )
        })
    }
}

/// Rows counted per request path by the HTTP endpoint (and per `grpc:<destination>` by the
/// gRPC endpoint).
#[derive(Debug, Clone, Default)]
pub struct HttpCounter {
    rows: Arc<Mutex<HashMap<String, u64>>>,
}

impl HttpCounter {
    /// Serves on 127.0.0.1 (any free port) for the rest of the harness; returns the base URL.
    pub async fn start() -> Result<(Self, String)> {
        let counter = Self::default();
        let app = axum::Router::new()
            .fallback(count)
            .layer(DefaultBodyLimit::disable())
            .with_state(counter.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the HTTP endpoint on 127.0.0.1")?;
        let addr = listener
            .local_addr()
            .context("reading the HTTP endpoint's address")?;
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok((counter, format!("http://{addr}")))
    }

    pub fn rows(&self, path: &str) -> u64 {
        self.rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

async fn count(
    State(counter): State<HttpCounter>,
    uri: Uri,
    headers: HeaderMap,
    // Read the whole body, as a real endpoint would.
    _body: axum::body::Bytes,
) -> StatusCode {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if header("x-wallaby-kind") != Some("changes") {
        return StatusCode::OK;
    }
    let Some(rows) = header("x-wallaby-rows").and_then(|v| v.parse::<u64>().ok()) else {
        return StatusCode::BAD_REQUEST;
    };
    *counter
        .rows
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(uri.path().to_owned())
        .or_default() += rows;
    StatusCode::OK
}

impl HttpCounter {
    /// Serves `IngestService/IngestBatch` on 127.0.0.1 (any free port) for the rest of the
    /// harness, counting into the same table under `grpc:<destination>`; returns host:port.
    pub async fn start_grpc(&self) -> Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the gRPC endpoint on 127.0.0.1")?;
        let addr = listener
            .local_addr()
            .context("reading the gRPC endpoint's address")?;
        let service = IngestService(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        Ok(addr.to_string())
    }
}

/// The ingest server: a tonic service routing every call to [`IngestBatch`].
#[derive(Clone)]
struct IngestService(HttpCounter);

impl tonic::server::NamedService for IngestService {
    const NAME: &'static str = "wallaby.ingest.v1.IngestService";
}

impl Service<http::Request<tonic::body::Body>> for IngestService {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let handler = IngestBatch(self.0.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
                IngestBatchResponse,
                IngestBatchRequest,
            >::default());
            Ok(grpc.unary(handler, request).await)
        })
    }
}

/// `IngestBatch`: counts the changes of a call and answers OK.
struct IngestBatch(HttpCounter);

impl tonic::server::UnaryService<IngestBatchRequest> for IngestBatch {
    type Response = IngestBatchResponse;
    type Future = BoxFuture<tonic::Response<IngestBatchResponse>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<IngestBatchRequest>) -> Self::Future {
        let counter = self.0.clone();
        Box::pin(async move {
            let message = request.into_inner();
            let accepted = u64::from(message.record_count);
            if message.kind == "changes" {
                *counter
                    .rows
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(format!("grpc:{}", message.destination))
                    .or_default() += accepted;
            }
            Ok(tonic::Response::new(IngestBatchResponse { accepted }))
        })
    }
}

/// librdkafka's mock cluster (one broker) with one topic for one run; dropped after it.
pub struct KafkaPeer {
    cluster: MockCluster<'static, DefaultProducerContext>,
    pub topic: String,
    partitions: i32,
}

impl fmt::Debug for KafkaPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaPeer")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaPeer {
    pub fn start(topic: &str) -> Result<Self> {
        let partitions = 3;
        let cluster = MockCluster::new(1).context("starting librdkafka's mock cluster")?;
        cluster
            .create_topic(topic, partitions, 1)
            .with_context(|| format!("creating topic {topic} on the mock cluster"))?;
        Ok(Self {
            cluster,
            topic: topic.to_owned(),
            partitions,
        })
    }

    pub fn brokers(&self) -> Vec<String> {
        self.cluster
            .bootstrap_servers()
            .split(',')
            .map(str::to_owned)
            .collect()
    }

    /// Records in the topic: the sum of the partitions' high watermarks. The topic is fresh,
    /// so offsets start at 0 and each is one record; the low watermark is not subtracted
    /// because the mock broker drops old segments (about 5 MiB per partition is kept).
    pub fn records(&self) -> Result<u64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.cluster.bootstrap_servers())
            .set("group.id", "wallaby-bench")
            .create()
            .context("creating a Kafka consumer for the mock cluster")?;
        let mut total = 0u64;
        for p in 0..self.partitions {
            let (_low, high) = consumer
                .fetch_watermarks(&self.topic, p, Duration::from_secs(10))
                .with_context(|| format!("reading watermarks of {}[{p}]", self.topic))?;
            total += u64::try_from(high).unwrap_or(0);
        }
        Ok(total)
    }
}

/// An `s3s-fs` process serving `dir` on its own port, with bucket `bench`.
#[derive(Debug)]
pub struct S3Peer {
    _child: ChildGuard,
    pub port: u16,
    pub dir: PathBuf,
    pub access_key: String,
    pub secret_key: String,
}

pub const S3_BUCKET: &str = "bench";

impl S3Peer {
    pub async fn start(binary: &Path, dir: &Path) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port for s3s-fs")?
            .port();
        // s3s-fs keeps a bucket as a directory of its root.
        std::fs::create_dir_all(dir.join(S3_BUCKET)).with_context(|| {
            format!("creating the s3s-fs bucket directory in {}", dir.display())
        })?;
        let access_key = format!("AKBENCH{}", std::process::id());
        let secret_key = format!("bench-secret-{}", std::process::id());
        let child = Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", &access_key, "--secret-key", &secret_key])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (install it with e2e/setup.sh or pass --s3s-fs)",
                    binary.display()
                )
            })?;
        let child = ChildGuard::new(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("s3s-fs did not listen on 127.0.0.1:{port} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            _child: child,
            port,
            dir: dir.to_owned(),
            access_key,
            secret_key,
        })
    }
}

/// Row changes in the files under `dir` (recursively): change lines of `*.jsonl` files
/// (not the `wallaby_schema` header lines) plus the row counts of `*.parquet` footers.
/// Hidden files (unfinished `.…tmp`) are skipped.
pub fn count_rows(dir: &Path) -> Result<u64> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", d.display()))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if name.ends_with(".jsonl") {
                total += count_json_changes(&path)?;
            } else if name.ends_with(".parquet") {
                total += parquet_rows(&path)?;
            }
        }
    }
    Ok(total)
}

fn count_json_changes(path: &Path) -> Result<u64> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut n = 0u64;
    for line in std::io::BufReader::with_capacity(1 << 20, file).lines() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        // Change lines carry `"op":`; schema header and logical-message lines do not.
        if !line.starts_with("{\"wallaby_schema\"") && line.contains("\"op\":\"") {
            n += 1;
        }
    }
    Ok(n)
}

fn parquet_rows(path: &Path) -> Result<u64> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("reading the Parquet footer of {}", path.display()))?;
    Ok(u64::try_from(reader.metadata().file_metadata().num_rows()).unwrap_or(0))
}
