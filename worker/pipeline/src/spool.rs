//! The durable spool of a secondary destination under `ackPolicy: primary`: an append-only
//! queue of serialized [`ChangeBatch`]es in `<state_dir>/spool/<destination>/`, so the slot
//! may follow the primary while a secondary catches up from disk, across restarts.
//!
//! ```text
//! dispatch ─append + fsync─▶ 00000000000000000000.seg  00000000000067108864.seg  …
//!                              (a segment is named by the spool position of its first byte)
//! runner ◀─read, following the tail─┘      cursor.json ◀─ commit(position, lsn) once durable
//! ```
//!
//! A frame is `body length u32 LE | CRC-32 of body u32 LE | body`; the body is
//! `header length u32 LE | header JSON | blobs`, one blob per table group (an Arrow IPC
//! payload of the codec, lossless for every value) and per logical message (its content).
//! A torn or corrupt tail left by a crash is cut off at open.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use wallaby_codec::{Change, TableSchema, WireFormat};

use crate::batch::{ChangeBatch, LogicalMessage, TableChanges};
use crate::change::Op;
use crate::lsn::Lsn;

/// Size at which a new segment file is started.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Frame head: body length and CRC.
const FRAME_HEAD: u64 = 8;
const CURSOR: &str = "cursor.json";
const CURSOR_TMP: &str = "cursor.json.tmp";
const SEGMENT_SUFFIX: &str = ".seg";

/// A spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file operation failed.
    #[error(
        "spool {dir}: {action}: {source}; check that the worker's state directory is writable and has free space"
    )]
    Io {
        /// Spool directory.
        dir: PathBuf,
        /// What was being done.
        action: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A batch could not be serialized.
    #[error("spool {dir}: cannot serialize batch {seq}: {reason}")]
    Encode {
        /// Spool directory.
        dir: PathBuf,
        /// Batch sequence number.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// Stored data that passed its checksum does not decode (written by an incompatible
    /// worker version, or damaged).
    #[error(
        "spool {dir}: the frame at position {position} cannot be read: {reason}; delete the directory and re-sync the destination (backfill)"
    )]
    Corrupt {
        /// Spool directory.
        dir: PathBuf,
        /// Spool position of the frame.
        position: u64,
        /// Why.
        reason: String,
    },
    /// A blocking spool task did not complete.
    #[error("spool {dir}: background task failed: {reason}")]
    Task {
        /// Spool directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
}

/// What the writer and the reader share.
#[derive(Debug, Default)]
struct Tail {
    /// Position after the last fsynced frame.
    end: u64,
    /// Position the secondary made durable (the cursor).
    durable: u64,
    /// The reader must stop (the flow stops or the secondary was detached).
    stopped: bool,
    /// The directory was deleted: nothing may be written to it any more.
    removed: bool,
}

#[derive(Debug, Default)]
struct Shared {
    tail: Mutex<Tail>,
    /// Wakes the reader when a frame was appended or the spool stopped.
    notify: Notify,
}

impl Shared {
    fn tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        // The tail holds plain numbers, consistent even if a holder panicked.
        self.tail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The cursor file: what the secondary made durable.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Cursor {
    /// Spool position after the last frame the secondary made durable.
    position: u64,
    /// Transaction end the secondary made durable (`None`: nothing yet).
    durable_lsn: Option<u64>,
}

/// The header of a frame.
#[derive(Debug, Serialize, Deserialize)]
struct FrameHeader {
    seq: u64,
    rows: u64,
    bytes: u64,
    transactions: u64,
    checkpoint: Option<u64>,
    checkpoint_time: Option<DateTime<Utc>>,
    op_counts: Vec<(String, String, u64)>,
    /// Each group's schema and the length of its Arrow payload.
    tables: Vec<(TableSchema, u64)>,
    messages: Vec<MessageHead>,
}

#[derive(Debug, Serialize, Deserialize)]
struct MessageHead {
    lsn: u64,
    commit_lsn: Option<u64>,
    prefix: String,
    len: u64,
}

/// The appending side, owned by the pipeline.
#[derive(Debug)]
pub struct SecondarySpool {
    dir: PathBuf,
    segment_bytes: u64,
    shared: Arc<Shared>,
    /// Current segment (opened for append) and its base position.
    segment: Option<(u64, File)>,
    end: u64,
    /// Highest transaction end held (in the spool or durable at the secondary).
    end_lsn: Lsn,
    /// Changes committed before this position are already held (recovered at open): the
    /// slot sends them again after a restart, and they must not be appended twice.
    held_through: Lsn,
}

/// The reading side, owned by the secondary's runner.
#[derive(Debug)]
pub struct SpoolReader {
    dir: PathBuf,
    shared: Arc<Shared>,
    frames: Option<FrameReader>,
    durable_lsn: Option<Lsn>,
}

/// What the reader yields: a batch and the spool position after its frame.
#[derive(Debug)]
pub struct SpooledBatch {
    /// The batch as dispatched (changes already held before a restart left out).
    pub batch: ChangeBatch,
    /// Position to commit once the batch is durable at the secondary.
    pub end: u64,
}

fn io(dir: &Path, action: impl Into<String>) -> impl FnOnce(std::io::Error) -> SpoolError {
    let dir = dir.to_owned();
    let action = action.into();
    move |source| SpoolError::Io {
        dir,
        action,
        source,
    }
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}{SEGMENT_SUFFIX}"))
}

/// Segment bases in the directory, ascending.
fn segments(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir, "listing segments"))? {
        let entry = entry.map_err(io(dir, "listing segments"))?;
        let name = entry.file_name();
        if let Some(base) = name
            .to_str()
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
            .and_then(|n| n.parse::<u64>().ok())
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "syncing the directory"))
}

fn read_cursor(dir: &Path) -> Result<Option<Cursor>, SpoolError> {
    let path = dir.join(CURSOR);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| SpoolError::Corrupt {
                dir: dir.to_owned(),
                position: 0,
                reason: format!("{CURSOR} does not parse: {e}"),
            }),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(dir, format!("reading {CURSOR}"))(e)),
    }
}

/// Writes the cursor atomically: a crash leaves the old or the new one, never a mix.
fn write_cursor(dir: &Path, cursor: &Cursor) -> Result<(), SpoolError> {
    let tmp = dir.join(CURSOR_TMP);
    let body = serde_json::to_vec(cursor).map_err(|e| SpoolError::Encode {
        dir: dir.to_owned(),
        seq: 0,
        reason: format!("cursor: {e}"),
    })?;
    let mut f = File::create(&tmp).map_err(io(dir, format!("creating {CURSOR_TMP}")))?;
    f.write_all(&body)
        .and_then(|()| f.sync_all())
        .map_err(io(dir, format!("writing {CURSOR_TMP}")))?;
    fs::rename(&tmp, dir.join(CURSOR)).map_err(io(dir, format!("renaming to {CURSOR}")))?;
    sync_dir(dir)
}

/// Reads one frame body at the file's position: `Ok(None)` at a clean end of file,
/// `Err(reason)` for a torn or corrupt frame.
fn read_frame(r: &mut impl Read) -> std::io::Result<Result<Option<Vec<u8>>, String>> {
    let mut head = [0u8; FRAME_HEAD as usize];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..])? {
            0 => break,
            n => got += n,
        }
    }
    if got == 0 {
        return Ok(Ok(None));
    }
    if got < head.len() {
        return Ok(Err(format!("torn frame head ({got} of 8 bytes)")));
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let mut body = Vec::new();
    let read = r.take(len as u64).read_to_end(&mut body)?;
    if read < len {
        return Ok(Err(format!("torn frame body ({read} of {len} bytes)")));
    }
    if crc32fast::hash(&body) != crc {
        return Ok(Err("checksum mismatch".into()));
    }
    Ok(Ok(Some(body)))
}

fn split_header(body: &[u8]) -> Result<(FrameHeader, &[u8]), String> {
    let len = body
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or("frame shorter than its header length")?;
    let header = body
        .get(4..4 + len)
        .ok_or("frame shorter than its header")?;
    let header: FrameHeader =
        serde_json::from_slice(header).map_err(|e| format!("header does not parse: {e}"))?;
    Ok((header, &body[4 + len..]))
}

impl SecondarySpool {
    /// Opens (or creates) the spool in `dir`, cutting off a torn tail and dropping the
    /// segments the secondary already consumed. Returns the appending and the reading
    /// side; the reader resumes after what the secondary made durable.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<(Self, SpoolReader), SpoolError> {
        fs::create_dir_all(dir).map_err(io(dir, "creating the directory"))?;
        let _ = fs::remove_file(dir.join(CURSOR_TMP));
        let mut cursor = read_cursor(dir)?.unwrap_or_default();
        let mut bases = segments(dir)?;
        // Segments wholly before the cursor were consumed.
        while bases.len() > 1 && bases[1] <= cursor.position {
            let base = bases.remove(0);
            fs::remove_file(segment_path(dir, base)).map_err(io(dir, "removing a segment"))?;
        }
        let mut end = bases.first().copied().unwrap_or(cursor.position);
        let mut last_checkpoint = None;
        let mut kept = Vec::new();
        let mut cut = false;
        for base in bases {
            let path = segment_path(dir, base);
            if cut || base != end {
                // After a torn frame (or a gap) nothing can be trusted.
                fs::remove_file(&path).map_err(io(dir, "removing a segment after a torn tail"))?;
                cut = true;
                continue;
            }
            let file = File::open(&path).map_err(io(dir, "opening a segment"))?;
            let mut r = BufReader::new(file);
            let mut offset = 0u64;
            loop {
                let frame = read_frame(&mut r).map_err(io(dir, "reading a segment"))?;
                match frame {
                    Ok(Some(body)) => {
                        if let Ok((h, _)) = split_header(&body) {
                            last_checkpoint = h.checkpoint.or(last_checkpoint);
                        }
                        offset += FRAME_HEAD + body.len() as u64;
                    }
                    Ok(None) => break,
                    Err(reason) => {
                        tracing::warn!(spool = %dir.display(), position = base + offset, %reason, "cutting off the torn tail of the spool");
                        let f = OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .map_err(io(dir, "opening a segment to cut its tail"))?;
                        f.set_len(offset)
                            .and_then(|()| f.sync_all())
                            .map_err(io(dir, "cutting a torn tail"))?;
                        cut = true;
                        break;
                    }
                }
            }
            end = base + offset;
            kept.push(base);
        }
        if cursor.position > end {
            // Frames the cursor covers were lost (a damaged disk): resume at the end.
            cursor.position = end;
        }
        let start = kept.first().copied().unwrap_or(end);
        cursor.position = cursor.position.max(start);
        let segment = match kept.last() {
            Some(&base) => Some((
                base,
                OpenOptions::new()
                    .append(true)
                    .open(segment_path(dir, base))
                    .map_err(io(dir, "opening the last segment"))?,
            )),
            None => None,
        };
        let end_lsn = Lsn(last_checkpoint
            .unwrap_or(0)
            .max(cursor.durable_lsn.unwrap_or(0)));
        let shared = Arc::new(Shared {
            tail: Mutex::new(Tail {
                end,
                durable: cursor.position,
                stopped: false,
                removed: false,
            }),
            notify: Notify::new(),
        });
        let writer = Self {
            dir: dir.to_owned(),
            segment_bytes: segment_bytes.max(1),
            shared: shared.clone(),
            segment,
            end,
            end_lsn,
            held_through: end_lsn,
        };
        let reader = SpoolReader {
            dir: dir.to_owned(),
            shared,
            frames: Some(FrameReader {
                dir: dir.to_owned(),
                position: cursor.position,
                file: None,
            }),
            durable_lsn: cursor.durable_lsn.map(Lsn),
        };
        Ok((writer, reader))
    }

    /// Highest transaction end the spool holds (or the secondary made durable): the slot
    /// may pass it as far as this secondary is concerned.
    pub fn end_lsn(&self) -> Lsn {
        self.end_lsn
    }

    /// Bytes appended but not yet made durable by the secondary.
    pub fn unread_bytes(&self) -> u64 {
        let tail = self.shared.tail();
        tail.end.saturating_sub(tail.durable)
    }

    /// The serialized frame of `batch` (without what is already held), or `None` when
    /// the spool already holds all of it.
    pub fn frame(&self, batch: &ChangeBatch) -> Result<Option<Vec<u8>>, SpoolError> {
        if batch.has_encoded() {
            // Only a snapshot (ackPolicy all, no spool) encodes rows ahead.
            return Err(SpoolError::Encode {
                dir: self.dir.clone(),
                seq: batch.seq,
                reason: "internal error: the batch holds rows encoded ahead".into(),
            });
        }
        let held = self.held_through.0;
        let fresh = |commit_lsn: u64| commit_lsn >= held;
        let filtered = batch
            .tables
            .iter()
            .any(|g| g.changes.iter().any(|c| !fresh(c.commit_lsn)))
            || batch
                .messages
                .iter()
                .any(|m| !fresh(m.commit_lsn.unwrap_or(m.lsn).0));
        let mut header = FrameHeader {
            seq: batch.seq,
            rows: batch.rows,
            bytes: batch.bytes,
            transactions: batch.transactions,
            checkpoint: batch.checkpoint.map(|l| l.0),
            checkpoint_time: batch.checkpoint_time,
            op_counts: batch
                .op_counts
                .iter()
                .map(|(t, op, n)| (t.clone(), op.as_str().to_owned(), *n))
                .collect(),
            tables: Vec::new(),
            messages: Vec::new(),
        };
        let mut blobs: Vec<Vec<u8>> = Vec::new();
        let mut kept_commits = std::collections::BTreeSet::new();
        if filtered {
            header.rows = 0;
            header.op_counts.clear();
        }
        for group in &batch.tables {
            let kept: Vec<Change>;
            let changes: &[Change] = if filtered {
                kept = group
                    .changes
                    .iter()
                    .filter(|c| fresh(c.commit_lsn))
                    .cloned()
                    .collect();
                for c in &kept {
                    kept_commits.insert(c.commit_lsn);
                    count(&mut header.op_counts, &group.schema, c.op);
                }
                header.rows += kept.len() as u64;
                &kept
            } else {
                &group.changes
            };
            if changes.is_empty() {
                continue;
            }
            let plain = without_mappings(&group.schema);
            let payload =
                wallaby_codec::encode(WireFormat::Arrow, &plain, changes).map_err(|e| {
                    SpoolError::Encode {
                        dir: self.dir.clone(),
                        seq: batch.seq,
                        reason: e.to_string(),
                    }
                })?;
            header
                .tables
                .push(((*group.schema).clone(), payload.len() as u64));
            blobs.push(payload);
        }
        for m in &batch.messages {
            if filtered && !fresh(m.commit_lsn.unwrap_or(m.lsn).0) {
                continue;
            }
            header.messages.push(MessageHead {
                lsn: m.lsn.0,
                commit_lsn: m.commit_lsn.map(|l| l.0),
                prefix: m.prefix.clone(),
                len: m.content.len() as u64,
            });
            blobs.push(m.content.to_vec());
        }
        if filtered {
            header.transactions = kept_commits.len() as u64;
            if header.tables.is_empty()
                && header.messages.is_empty()
                && batch.checkpoint.is_none_or(|c| c.0 <= held)
            {
                return Ok(None);
            }
        }
        let head = serde_json::to_vec(&header).map_err(|e| SpoolError::Encode {
            dir: self.dir.clone(),
            seq: batch.seq,
            reason: format!("header: {e}"),
        })?;
        let body_len = 4 + head.len() + blobs.iter().map(Vec::len).sum::<usize>();
        let too_big = |what: &str| SpoolError::Encode {
            dir: self.dir.clone(),
            seq: batch.seq,
            reason: format!("{what} exceeds 4 GiB; lower batchMaxBytes"),
        };
        let head_len = u32::try_from(head.len()).map_err(|_| too_big("the header"))?;
        let frame_len = u32::try_from(body_len).map_err(|_| too_big("the frame"))?;
        let mut body = Vec::with_capacity(FRAME_HEAD as usize + body_len);
        body.extend_from_slice(&frame_len.to_le_bytes());
        body.extend_from_slice(&[0; 4]);
        body.extend_from_slice(&head_len.to_le_bytes());
        body.extend_from_slice(&head);
        for b in &blobs {
            body.extend_from_slice(b);
        }
        let crc = crc32fast::hash(&body[FRAME_HEAD as usize..]);
        body[4..8].copy_from_slice(&crc.to_le_bytes());
        Ok(Some(body))
    }

    /// Appends `batch` and fsyncs it; afterwards the reader may see it and the spool holds
    /// its checkpoint. Returns the bytes appended (0 when the spool already held it all).
    /// Blocking: call it from a blocking task.
    pub fn append(&mut self, batch: &ChangeBatch) -> Result<u64, SpoolError> {
        if self.shared.tail().removed {
            return Ok(0);
        }
        let Some(frame) = self.frame(batch)? else {
            return Ok(0);
        };
        let len = frame.len() as u64;
        let roll = match &self.segment {
            Some((base, _)) => self.end > *base && self.end - base + len > self.segment_bytes,
            None => true,
        };
        if roll {
            if let Some((_, f)) = self.segment.take() {
                f.sync_all().map_err(io(&self.dir, "syncing a segment"))?;
            }
            let path = segment_path(&self.dir, self.end);
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io(&self.dir, "creating a segment"))?;
            sync_dir(&self.dir)?;
            self.segment = Some((self.end, f));
        }
        if let Some((_, f)) = &mut self.segment {
            f.write_all(&frame)
                .and_then(|()| f.sync_data())
                .map_err(io(&self.dir, "appending a batch"))?;
        }
        self.end += len;
        if let Some(cp) = batch.checkpoint {
            self.end_lsn = self.end_lsn.max(cp);
        }
        self.shared.tail().end = self.end;
        self.shared.notify.notify_one();
        Ok(len)
    }

    /// Stops the reader at its next batch (the flow stops); the spool stays for the next
    /// run.
    pub fn stop(&self) {
        self.handle().stop();
    }

    /// Stops the reader and deletes the spool (the secondary was detached).
    pub fn remove(self) -> Result<(), SpoolError> {
        let handle = self.handle();
        drop(self.segment);
        handle.remove()
    }

    /// A handle that stops or deletes the spool from elsewhere.
    pub fn handle(&self) -> SpoolHandle {
        SpoolHandle {
            dir: self.dir.clone(),
            shared: self.shared.clone(),
        }
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Stops or deletes a spool without owning its writer.
#[derive(Debug, Clone)]
pub struct SpoolHandle {
    dir: PathBuf,
    shared: Arc<Shared>,
}

impl SpoolHandle {
    /// Stops the reader at its next batch; the spool stays for the next run.
    pub fn stop(&self) {
        self.shared.tail().stopped = true;
        self.shared.notify.notify_one();
    }

    /// Stops the reader, makes later appends and commits no-ops and deletes the spool.
    /// Deleting a spool that is already gone succeeds.
    pub fn remove(&self) -> Result<(), SpoolError> {
        {
            let mut tail = self.shared.tail();
            tail.stopped = true;
            tail.removed = true;
        }
        self.shared.notify.notify_one();
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&self.dir, "deleting the spool")(e)),
        }
    }
}

fn count(op_counts: &mut Vec<(String, String, u64)>, schema: &TableSchema, op: Op) {
    let table = schema.qualified_name();
    let op = op.as_str();
    match op_counts
        .iter_mut()
        .find(|(t, o, _)| *t == table && o == op)
    {
        Some(entry) => entry.2 += 1,
        None => op_counts.push((table, op.to_owned(), 1)),
    }
}

/// The schema without `typeMappings`: a mapping may change how the wire formats carry a
/// value (e.g. numeric as float8), and the spool must keep every value exactly.
fn without_mappings(schema: &TableSchema) -> std::borrow::Cow<'_, TableSchema> {
    if schema.columns.iter().all(|c| c.mapped_type.is_none()) {
        return std::borrow::Cow::Borrowed(schema);
    }
    let mut plain = schema.clone();
    for c in &mut plain.columns {
        c.mapped_type = None;
    }
    std::borrow::Cow::Owned(plain)
}

fn parse_op(op: &str) -> Option<Op> {
    [Op::Insert, Op::Update, Op::Delete, Op::Truncate, Op::Read]
        .into_iter()
        .find(|o| o.as_str() == op)
}

/// Sequential frame reading from a position (blocking).
#[derive(Debug)]
struct FrameReader {
    dir: PathBuf,
    position: u64,
    file: Option<BufReader<File>>,
}

impl FrameReader {
    /// Reads the frame at the position; the caller made sure one was appended there.
    fn next(&mut self) -> Result<SpooledBatch, SpoolError> {
        let corrupt = |position, reason: String| SpoolError::Corrupt {
            dir: self.dir.clone(),
            position,
            reason,
        };
        for _ in 0..2 {
            let file = match &mut self.file {
                Some(f) => f,
                None => {
                    let bases = segments(&self.dir)?;
                    let Some(base) = bases.iter().rev().find(|b| **b <= self.position).copied()
                    else {
                        return Err(corrupt(self.position, "no segment holds it".into()));
                    };
                    let mut f = File::open(segment_path(&self.dir, base))
                        .map_err(io(&self.dir, "opening a segment"))?;
                    f.seek(SeekFrom::Start(self.position - base))
                        .map_err(io(&self.dir, "seeking in a segment"))?;
                    self.file.insert(BufReader::new(f))
                }
            };
            match read_frame(file).map_err(io(&self.dir, "reading a segment"))? {
                Ok(Some(body)) => {
                    let at = self.position;
                    self.position += FRAME_HEAD + body.len() as u64;
                    let batch = decode(&body).map_err(|reason| corrupt(at, reason))?;
                    return Ok(SpooledBatch {
                        batch,
                        end: self.position,
                    });
                }
                // The end of a segment: the frame is at the start of the next one.
                Ok(None) => self.file = None,
                Err(reason) => return Err(corrupt(self.position, reason)),
            }
        }
        Err(corrupt(
            self.position,
            "announced by the writer but not found".into(),
        ))
    }
}

fn decode(body: &[u8]) -> Result<ChangeBatch, String> {
    let (header, mut blobs) = split_header(body)?;
    let mut take = |len: u64| -> Result<&[u8], String> {
        let len = usize::try_from(len).map_err(|e| e.to_string())?;
        if blobs.len() < len {
            return Err("frame shorter than its payloads".into());
        }
        let (head, rest) = blobs.split_at(len);
        blobs = rest;
        Ok(head)
    };
    let mut batch = ChangeBatch::without_budget(header.seq);
    for (schema, len) in header.tables {
        let payload = take(len)?;
        let plain = without_mappings(&schema).into_owned();
        let changes =
            wallaby_codec::decode(WireFormat::Arrow, &plain, payload).map_err(|e| e.to_string())?;
        batch.tables.push(TableChanges {
            schema: Arc::new(schema),
            changes,
            encoded: Vec::new(),
        });
    }
    for m in header.messages {
        let content = bytes::Bytes::copy_from_slice(take(m.len)?);
        batch.messages.push(LogicalMessage {
            lsn: Lsn(m.lsn),
            commit_lsn: m.commit_lsn.map(Lsn),
            prefix: m.prefix,
            content,
        });
    }
    batch.rows = header.rows;
    batch.bytes = header.bytes;
    batch.transactions = header.transactions;
    batch.checkpoint = header.checkpoint.map(Lsn);
    batch.checkpoint_time = header.checkpoint_time;
    for (table, op, n) in header.op_counts {
        let op = parse_op(&op).ok_or_else(|| format!("unknown operation {op:?}"))?;
        batch.op_counts.push((table, op, n));
    }
    Ok(batch)
}

impl SpoolReader {
    /// The next batch, following the tail (waits while the secondary is caught up).
    /// `Ok(None)` once the spool was stopped or removed.
    pub async fn next(&mut self) -> Result<Option<SpooledBatch>, SpoolError> {
        loop {
            let Some(frames) = self.frames.take() else {
                return Err(SpoolError::Task {
                    dir: self.dir.clone(),
                    reason: "an earlier read panicked".into(),
                });
            };
            let ready = {
                let tail = self.shared.tail();
                if tail.stopped {
                    self.frames = Some(frames);
                    return Ok(None);
                }
                frames.position < tail.end
            };
            if !ready {
                self.frames = Some(frames);
                self.shared.notify.notified().await;
                continue;
            }
            let (frames, read) = tokio::task::spawn_blocking(move || {
                let mut frames = frames;
                let read = frames.next();
                (frames, read)
            })
            .await
            .map_err(|e| SpoolError::Task {
                dir: self.dir.clone(),
                reason: e.to_string(),
            })?;
            self.frames = Some(frames);
            return read.map(Some);
        }
    }

    /// Records that the secondary made everything before `position` durable, up to the
    /// transaction end `lsn`, and drops the segments it no longer needs.
    pub async fn commit(&mut self, position: u64, lsn: Lsn) -> Result<(), SpoolError> {
        if self.shared.tail().removed {
            return Ok(());
        }
        let dir = self.dir.clone();
        let cursor = Cursor {
            position,
            durable_lsn: Some(lsn.0),
        };
        let written = tokio::task::spawn_blocking(move || -> Result<(), SpoolError> {
            write_cursor(&dir, &cursor)?;
            let bases = segments(&dir)?;
            for pair in bases.windows(2) {
                if pair[1] <= position {
                    fs::remove_file(segment_path(&dir, pair[0]))
                        .map_err(io(&dir, "removing a consumed segment"))?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| SpoolError::Task {
            dir: self.dir.clone(),
            reason: e.to_string(),
        })?;
        if written.is_ok() {
            let mut tail = self.shared.tail();
            tail.durable = tail.durable.max(position);
            self.durable_lsn = Some(self.durable_lsn.map_or(lsn, |d| d.max(lsn)));
        }
        written
    }

    /// Transaction end the secondary made durable according to the cursor.
    pub fn durable_lsn(&self) -> Option<Lsn> {
        self.durable_lsn
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use wallaby_codec::{ColumnSchema, Row, TypeInfo, TypeKind, Value};

    fn ty(oid: u32, name: &str, kind: TypeKind) -> Arc<TypeInfo> {
        Arc::new(TypeInfo {
            oid,
            name: name.into(),
            typmod: -1,
            kind,
        })
    }

    fn schema() -> Arc<TableSchema> {
        let col = |name: &str, ty: Arc<TypeInfo>, key: bool| ColumnSchema {
            name: name.into(),
            ty,
            key,
            mapped_type: None,
        };
        let int4 = ty(23, "int4", TypeKind::Int4);
        let mut numeric = col("n", ty(1700, "numeric", TypeKind::Numeric), false);
        numeric.mapped_type = Some("float64".into());
        Arc::new(TableSchema {
            schema: "public".into(),
            table: "t".into(),
            columns: vec![
                col("id", int4.clone(), true),
                col("v", ty(25, "text", TypeKind::Text), false),
                numeric,
                col("b", ty(17, "bytea", TypeKind::Bytea), false),
                col("ts", ty(1184, "timestamptz", TypeKind::TimestampTz), false),
                col("a", ty(1007, "_int4", TypeKind::Array(int4.clone())), false),
                col(
                    "mood",
                    ty(
                        16390,
                        "public.mood",
                        TypeKind::Enum(vec!["sad".into(), "ok".into()]),
                    ),
                    false,
                ),
                col("j", ty(3802, "jsonb", TypeKind::Jsonb), false),
                col("u", ty(2950, "uuid", TypeKind::Uuid), false),
                col("i", ty(1186, "interval", TypeKind::Interval), false),
            ],
            version: 3,
        })
    }

    fn change(id: i32, commit_lsn: u64) -> Change {
        let values = vec![
            Value::Int4(id),
            Value::Text(format!("row {id} ✓")),
            Value::Numeric("12345678901234567890.000123".into()),
            Value::Bytes(vec![0, 1, 255]),
            Value::TimestampTz(i64::MAX),
            Value::Array {
                dims: vec![(2, 1)],
                elements: vec![Value::Int4(1), Value::Null],
            },
            Value::Enum("ok".into()),
            Value::Json(r#"{"a": [1, 2]}"#.into()),
            Value::Uuid([7; 16]),
            Value::Interval {
                months: 1,
                days: -2,
                micros: 3,
            },
        ];
        Change {
            op: if id % 2 == 0 { Op::Update } else { Op::Insert },
            commit_lsn,
            lsn: commit_lsn - 10 + id as u64 % 5,
            commit_time_micros: 1_700_000_000_000_000,
            xid: 42,
            before: (id % 2 == 0).then(|| Row {
                values: vec![
                    Value::Int4(id),
                    Value::Null,
                    Value::Null,
                    Value::Null,
                    Value::Null,
                    Value::Null,
                    Value::Null,
                    Value::Null,
                    Value::Null,
                    Value::Null,
                ],
                absent: vec![1, 2, 3, 4, 5, 6, 7, 8, 9],
            }),
            after: Some(Row {
                values,
                absent: vec![],
            }),
        }
    }

    fn batch(seq: u64, ids: std::ops::Range<i32>, commit_lsn: u64) -> ChangeBatch {
        let mut b = ChangeBatch::without_budget(seq);
        let changes: Vec<Change> = ids.map(|i| change(i, commit_lsn)).collect();
        b.rows = changes.len() as u64;
        b.bytes = 1000 * b.rows;
        b.transactions = 1;
        b.checkpoint = Some(Lsn(commit_lsn + 8));
        b.checkpoint_time = Some(Utc::now());
        b.op_counts = vec![("public.t".into(), Op::Insert, b.rows)];
        b.tables.push(TableChanges {
            schema: schema(),
            changes,
            encoded: Vec::new(),
        });
        b.messages.push(LogicalMessage {
            lsn: Lsn(commit_lsn - 1),
            commit_lsn: Some(Lsn(commit_lsn)),
            prefix: "audit".into(),
            content: bytes::Bytes::from_static(b"\x00payload\xff"),
        });
        b
    }

    fn assert_same(a: &ChangeBatch, b: &ChangeBatch) {
        assert_eq!(a.seq, b.seq);
        assert_eq!(a.rows, b.rows);
        assert_eq!(a.bytes, b.bytes);
        assert_eq!(a.transactions, b.transactions);
        assert_eq!(a.checkpoint, b.checkpoint);
        assert_eq!(a.checkpoint_time, b.checkpoint_time);
        assert_eq!(a.op_counts, b.op_counts);
        assert_eq!(a.tables.len(), b.tables.len());
        for (x, y) in a.tables.iter().zip(&b.tables) {
            assert_eq!(x.schema, y.schema, "schema with its type mappings");
            assert_eq!(x.changes, y.changes);
        }
        assert_eq!(a.messages.len(), b.messages.len());
        for (x, y) in a.messages.iter().zip(&b.messages) {
            assert_eq!(
                (x.lsn, x.commit_lsn, &x.prefix, &x.content),
                (y.lsn, y.commit_lsn, &y.prefix, &y.content)
            );
        }
    }

    #[tokio::test]
    async fn batches_round_trip_across_segments_and_follow_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, mut r) = SecondarySpool::open(dir.path(), 4096).unwrap();
        let sent: Vec<ChangeBatch> = (0..5)
            .map(|i| batch(i + 1, 0..(i as i32 + 1) * 3, 1000 * (i + 1)))
            .collect();
        for b in &sent {
            assert!(w.append(b).unwrap() > 0);
        }
        assert!(segments(dir.path()).unwrap().len() > 1, "rolled");
        assert_eq!(w.end_lsn(), Lsn(5008));
        for b in &sent {
            let got = r.next().await.unwrap().unwrap();
            assert_same(b, &got.batch);
        }
        // Caught up: the reader waits until the next append.
        let waiting = tokio::spawn(async move {
            let got = r.next().await.unwrap().map(|s| s.batch.seq);
            (r, got)
        });
        tokio::task::yield_now().await;
        w.append(&batch(6, 0..1, 9000)).unwrap();
        let (mut r, got) = waiting.await.unwrap();
        assert_eq!(got, Some(6));
        w.stop();
        assert!(r.next().await.unwrap().is_none(), "stopped");
    }

    #[tokio::test]
    async fn the_cursor_survives_a_reopen_and_consumed_segments_go() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, mut r) = SecondarySpool::open(dir.path(), 4096).unwrap();
        for i in 0..6u64 {
            w.append(&batch(i + 1, 0..4, 1000 * (i + 1))).unwrap();
        }
        let total = w.unread_bytes();
        let mut third = None;
        for _ in 0..3 {
            third = r.next().await.unwrap();
        }
        let third = third.unwrap();
        r.commit(third.end, third.batch.checkpoint.unwrap())
            .await
            .unwrap();
        assert_eq!(w.unread_bytes(), total - third.end);
        assert!(
            segments(dir.path()).unwrap()[0] > 0,
            "the first segment was consumed and removed"
        );
        drop((w, r));

        let (w, mut r) = SecondarySpool::open(dir.path(), 4096).unwrap();
        assert_eq!(r.durable_lsn(), Some(Lsn(3008)));
        assert_eq!(w.end_lsn(), Lsn(6008));
        assert_eq!(w.unread_bytes(), total - third.end);
        let next = r.next().await.unwrap().unwrap();
        assert_eq!(next.batch.seq, 4, "resumes after the durable batch");
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _r) = SecondarySpool::open(dir.path(), SEGMENT_BYTES).unwrap();
        w.append(&batch(1, 0..3, 1000)).unwrap();
        let good = w.unread_bytes();
        w.append(&batch(2, 0..3, 2000)).unwrap();
        drop(w);
        // A crash in the middle of the second append.
        let path = segment_path(dir.path(), 0);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(good + 20).unwrap();
        drop(f);
        let (mut w, mut r) = SecondarySpool::open(dir.path(), SEGMENT_BYTES).unwrap();
        assert_eq!(w.unread_bytes(), good, "the torn frame is gone");
        assert_eq!(fs::metadata(&path).unwrap().len(), good);
        assert_eq!(w.end_lsn(), Lsn(1008));
        // A flipped bit is caught by the checksum, too.
        w.append(&batch(3, 0..3, 3000)).unwrap();
        drop(w);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 5;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(r.next().await.unwrap().unwrap().batch.seq, 1);
        drop(r);
        let (w, mut r) = SecondarySpool::open(dir.path(), SEGMENT_BYTES).unwrap();
        assert_eq!(w.unread_bytes(), good);
        assert_eq!(r.next().await.unwrap().unwrap().batch.seq, 1);
    }

    #[tokio::test]
    async fn what_the_spool_held_before_a_restart_is_not_appended_twice() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _r) = SecondarySpool::open(dir.path(), SEGMENT_BYTES).unwrap();
        w.append(&batch(1, 0..3, 1000)).unwrap();
        drop(w);
        let (mut w, mut r) = SecondarySpool::open(dir.path(), SEGMENT_BYTES).unwrap();
        assert_eq!(w.append(&batch(1, 0..3, 1000)).unwrap(), 0, "held");
        // Re-batched after the restart: the held transaction and a new one together.
        let mut mixed = batch(2, 0..3, 1000);
        mixed.tables[0]
            .changes
            .extend((10..12).map(|i| change(i, 2000)));
        mixed.rows = 5;
        mixed.transactions = 2;
        mixed.checkpoint = Some(Lsn(2008));
        assert!(w.append(&mixed).unwrap() > 0);
        assert_eq!(r.next().await.unwrap().unwrap().batch.seq, 1);
        let second = r.next().await.unwrap().unwrap().batch;
        assert_eq!(second.rows, 2);
        assert_eq!(second.transactions, 1);
        assert!(
            second.tables[0]
                .changes
                .iter()
                .all(|c| c.commit_lsn == 2000)
        );
        assert!(second.messages.is_empty(), "the held message is left out");
        let ops: u64 = second.op_counts.iter().map(|(_, _, n)| n).sum();
        assert_eq!(ops, 2);
    }

    #[tokio::test]
    async fn remove_stops_the_reader_and_deletes_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("b");
        let (mut w, mut r) = SecondarySpool::open(&spool, SEGMENT_BYTES).unwrap();
        w.append(&batch(1, 0..3, 1000)).unwrap();
        w.remove().unwrap();
        assert!(!spool.exists());
        assert!(r.next().await.unwrap().is_none());
        r.commit(10, Lsn(1008)).await.unwrap();
        assert!(!spool.exists(), "a late commit does not recreate it");
    }
}
