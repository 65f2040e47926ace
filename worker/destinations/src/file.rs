//! The `file` destination: a local directory. With `format: json` every change is a JSON
//! line appended to a rolling file (rotated by size and age); with a binary format
//! (arrow, parquet, avro, proto) each batch becomes one file per table schema. Writes are
//! *accepted*; `flush` fsyncs files and the directory (binary files are renamed into place
//! only once complete), and only then may the slot advance past them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use wallaby_codec::{TableSchema, WireFormat};
use wallaby_crds::DestinationType;
use wallaby_crds::destination::FileSpec;

use wallaby_pipeline::batch::ChangeBatch;
use wallaby_pipeline::destination::{
    Destination, DestinationError, PayloadEncoding, TypeOverrides, WriteAck,
};

use crate::registry::{OpenContext, OpenError, Registration, SecretData, no_secrets};

/// Writer of one destination directory.
#[derive(Debug)]
pub struct FileDestination {
    dir: PathBuf,
    format: WireFormat,
    overrides: TypeOverrides,
    max_file_bytes: u64,
    rotate_interval: Duration,
    current: Option<OpenFile>,
    /// Complete binary files waiting for flush: (temporary path, final path).
    staged: Vec<(PathBuf, PathBuf)>,
    /// A file was created (or finished) since the last directory fsync.
    dir_dirty: bool,
    /// Files opened by this process.
    sequence: u32,
    /// Millisecond stamp of the last file name: names increase strictly, so sorting them
    /// gives write order even when several files open within one millisecond.
    last_millis: u128,
}

#[derive(Debug)]
struct OpenFile {
    writer: BufWriter<File>,
    path: PathBuf,
    bytes: u64,
    opened: Instant,
    /// Bytes already handed to the kernel's writeback (see [`WRITE_BEHIND`]).
    written_back: u64,
}

/// Bytes of a JSON-lines file after which their writeback is started (without waiting for
/// it), so that the flush's `fdatasync` finds them mostly on disk already instead of writing
/// everything since the last flush while the pipeline waits.
const WRITE_BEHIND: u64 = 8 << 20;

impl FileDestination {
    /// Opens the directory (creating it), repairing a JSON record torn by a crash and
    /// removing binary files a crash left incomplete (their batches were never confirmed).
    pub fn open(spec: &FileSpec, format: WireFormat, overrides: TypeOverrides) -> io::Result<Self> {
        let dir = PathBuf::from(&spec.path);
        fs::create_dir_all(&dir).map_err(|e| annotate(e, "creating directory", &dir))?;
        let rotate_interval = spec
            .rotate_interval
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        for entry in fs::read_dir(&dir).map_err(|e| annotate(e, "reading directory", &dir))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "jsonl") {
                repair_torn_tail(&path)?;
            } else if path.extension().is_some_and(|e| e == "tmp") {
                tracing::warn!(file = %path.display(), "removing an incomplete file left by a crash");
                fs::remove_file(&path).map_err(|e| annotate(e, "removing", &path))?;
            }
        }
        Ok(Self {
            dir,
            format,
            overrides,
            max_file_bytes: spec.max_file_bytes,
            rotate_interval,
            current: None,
            staged: Vec::new(),
            dir_dirty: false,
            sequence: 0,
            last_millis: 0,
        })
    }

    fn append(&mut self, first_lsn: u64, lines: &[u8]) -> io::Result<()> {
        let rotate = self.current.as_ref().is_some_and(|f| {
            f.bytes >= self.max_file_bytes || f.opened.elapsed() >= self.rotate_interval
        });
        if rotate {
            self.finish_current()?;
        }
        if self.current.is_none() {
            let seq = self.next_sequence();
            let millis = self.next_millis();
            let path = self.dir.join(format!(
                "changes-{millis:013}-{first_lsn:016X}-{seq:06}.jsonl"
            ));
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)
                .map_err(|e| annotate(e, "creating", &path))?;
            self.current = Some(OpenFile {
                writer: BufWriter::with_capacity(1 << 20, file),
                path,
                bytes: 0,
                opened: Instant::now(),
                written_back: 0,
            });
            self.dir_dirty = true;
        }
        if let Some(f) = self.current.as_mut() {
            f.writer
                .write_all(lines)
                .map_err(|e| annotate(e, "writing", &f.path))?;
            f.bytes += lines.len() as u64;
            if f.bytes - f.written_back >= WRITE_BEHIND {
                f.writer
                    .flush()
                    .map_err(|e| annotate(e, "writing", &f.path))?;
                // POSIX_FADV_DONTNEED starts the writeback of the range's dirty pages and
                // lets the page cache drop them once written: nothing here reads them back.
                // Advice only: durability still comes from the flush's fdatasync.
                let _ = rustix::fs::fadvise(
                    f.writer.get_ref(),
                    f.written_back,
                    std::num::NonZeroU64::new(f.bytes - f.written_back),
                    rustix::fs::Advice::DontNeed,
                );
                f.written_back = f.bytes;
            }
        }
        Ok(())
    }

    fn next_millis(&mut self) -> u128 {
        self.last_millis = now_millis().max(self.last_millis + 1);
        self.last_millis
    }

    fn next_sequence(&mut self) -> u32 {
        // The sequence keeps names unique when several files open in one millisecond.
        self.sequence += 1;
        self.sequence
    }

    fn write_batch(&mut self, batch: &ChangeBatch) -> Result<(), DestinationError> {
        let encoding = self.payload_encoding();
        for group in &batch.tables {
            let schema = self.overrides.apply(&group.schema);
            if !group.changes.is_empty() {
                let payload =
                    wallaby_codec::encode(self.format, &schema, &group.changes).map_err(|e| {
                        DestinationError::permanent(format!(
                            "encoding {}: {e}",
                            schema.qualified_name()
                        ))
                    })?;
                let first_lsn = group.changes.first().map_or(0, |c| c.commit_lsn);
                self.write_payload(&schema, first_lsn, &payload)?;
            }
            for rows in &group.encoded {
                let payload = rows.payload(encoding.as_ref(), &schema.qualified_name())?;
                self.write_payload(&schema, rows.lsn, payload)?;
            }
        }
        for m in &batch.messages {
            let mut line = serde_json::json!({
                "kind": "message",
                "lsn": m.lsn.to_string(),
                "commit_lsn": m.commit_lsn.map(|l| l.to_string()),
                "transactional": m.commit_lsn.is_some(),
                "prefix": m.prefix,
                "content": String::from_utf8_lossy(&m.content),
            })
            .to_string()
            .into_bytes();
            line.push(b'\n');
            self.append(m.lsn.0, &line)
                .map_err(|e| DestinationError::from_io("file destination", &e))?;
        }
        Ok(())
    }

    /// Writes one group's payload: appended to the JSON-lines file, or staged as a file of
    /// its own.
    fn write_payload(
        &mut self,
        schema: &TableSchema,
        first_lsn: u64,
        payload: &[u8],
    ) -> Result<(), DestinationError> {
        if self.format == WireFormat::Json {
            return self
                .append(first_lsn, payload)
                .map_err(|e| DestinationError::from_io("file destination", &e));
        }
        let (millis, seq) = (self.next_millis(), self.next_sequence());
        let name = format!(
            "{}.{}.v{}-{millis:013}-{first_lsn:016X}-{seq:06}.{}",
            schema.schema,
            schema.table,
            schema.version,
            self.format.extension()
        );
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, payload)
            .map_err(|e| DestinationError::from_io(&format!("writing {}", tmp.display()), &e))?;
        self.staged.push((tmp, path));
        Ok(())
    }

    /// Makes everything written so far durable.
    fn sync(&mut self) -> io::Result<()> {
        let rotate = self
            .current
            .as_ref()
            .is_some_and(|f| f.opened.elapsed() >= self.rotate_interval);
        if rotate {
            self.finish_current()?;
        }
        if let Some(f) = self.current.as_mut() {
            f.writer.flush()?;
            f.writer
                .get_ref()
                .sync_data()
                .map_err(|e| annotate(e, "fsync of", &f.path))?;
        }
        for (tmp, path) in std::mem::take(&mut self.staged) {
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| annotate(e, "fsync of", &tmp))?;
            fs::rename(&tmp, &path).map_err(|e| annotate(e, "renaming", &tmp))?;
            self.dir_dirty = true;
        }
        if self.dir_dirty {
            File::open(&self.dir)?
                .sync_all()
                .map_err(|e| annotate(e, "fsync of", &self.dir))?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    fn finish_current(&mut self) -> io::Result<()> {
        if let Some(mut f) = self.current.take() {
            f.writer.flush()?;
            f.writer
                .get_ref()
                .sync_data()
                .map_err(|e| annotate(e, "fsync of", &f.path))?;
            self.dir_dirty = true;
        }
        Ok(())
    }
}

#[async_trait]
impl Destination for FileDestination {
    async fn write(&mut self, batch: &ChangeBatch) -> Result<WriteAck, DestinationError> {
        blocking(|| self.write_batch(batch))?;
        Ok(WriteAck::Accepted)
    }

    async fn flush(&mut self) -> Result<(), DestinationError> {
        blocking(|| self.sync()).map_err(|e| DestinationError::from_io("file destination", &e))
    }

    fn payload_encoding(&self) -> Option<PayloadEncoding> {
        Some(PayloadEncoding {
            format: self.format,
            type_mappings: self.overrides.mappings().clone(),
        })
    }
}

/// Runs blocking file I/O without stalling other tasks on a multi-threaded runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn now_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

fn annotate(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// A crash between `write` and `sync` can leave half a record at the end of the last
/// file; that record was never confirmed, so it is re-delivered after restart and the
/// fragment is cut off here (readers never see a torn line twice).
fn repair_torn_tail(path: &Path) -> io::Result<()> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(());
    }
    // Scan backwards in chunks for the last complete line.
    let mut end = len;
    let mut keep = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            keep = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    tracing::warn!(file = %path.display(), bytes = len - keep, "removing a torn record left by a crash");
    file.set_len(keep)?;
    file.sync_all()
}

/// The `file` entry of the registry.
pub static REGISTRATION: Registration = Registration {
    types: &[DestinationType::File],
    secret_names: no_secrets,
    check: |_| Ok(SecretData::new()),
    open,
};

fn open(ctx: &OpenContext<'_>) -> Result<Box<dyn Destination>, OpenError> {
    let file = ctx.spec.file.as_ref().ok_or_else(|| {
        OpenError(format!(
            "Destination/{}: type file needs a spec.file block with a path",
            ctx.name
        ))
    })?;
    let sink = FileDestination::open(file, ctx.format(), ctx.overrides()).map_err(|e| {
        OpenError(format!(
            "Destination/{}: cannot open {}: {e}",
            ctx.name, file.path
        ))
    })?;
    Ok(Box::new(sink))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repairs_torn_tails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("changes-1.jsonl");
        fs::write(&path, b"{\"a\":1}\n{\"b\":2}\n{\"half\":").unwrap();
        let spec = FileSpec {
            path: dir.path().display().to_string(),
            max_file_bytes: 1024,
            rotate_interval: "1h".into(),
        };
        FileDestination::open(&spec, WireFormat::Json, TypeOverrides::default()).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"a\":1}\n{\"b\":2}\n");
        fs::write(dir.path().join(".x.parquet.tmp"), b"partial").unwrap();
        FileDestination::open(&spec, WireFormat::Parquet, TypeOverrides::default()).unwrap();
        assert!(!dir.path().join(".x.parquet.tmp").exists());
    }

    /// Appends past several write-behind points (each a buffer flush and a writeback
    /// started, pages dropped from the cache) keep every byte, in order.
    #[test]
    fn write_behind_keeps_every_line() {
        let dir = tempfile::tempdir().unwrap();
        let spec = FileSpec {
            path: dir.path().display().to_string(),
            max_file_bytes: 1 << 30,
            rotate_interval: "1h".into(),
        };
        let mut file =
            FileDestination::open(&spec, WireFormat::Json, TypeOverrides::default()).unwrap();
        let mut want = Vec::new();
        let mut payload = Vec::new();
        for i in 0..300_000u64 {
            payload.extend_from_slice(format!("{{\"n\":{i},\"pad\":\"{:>64}\"}}\n", i).as_bytes());
            // Payloads of assorted sizes, most smaller than the buffer, some larger.
            if payload.len() > (i % 7 + 1) as usize * 300_000 {
                file.append(i, &payload).unwrap();
                want.append(&mut payload);
            }
        }
        file.append(0, &payload).unwrap();
        want.append(&mut payload);
        let written_back = file.current.as_ref().unwrap().written_back;
        assert!(
            written_back >= 2 * WRITE_BEHIND,
            "write-behind started for {written_back} bytes of {}",
            want.len()
        );
        file.sync().unwrap();
        let path = file.current.as_ref().unwrap().path.clone();
        assert!(
            fs::read(&path).unwrap() == want,
            "the file differs from what was appended"
        );
    }
}
