//! Local spill of streamed (in-progress) transactions: with pgoutput protocol version 2 the
//! server sends a transaction larger than `logical_decoding_work_mem` in chunks before it
//! commits. Each top-level transaction's changes go to its own file here, tagged with the
//! (sub)transaction that made them, and are read back in order when it commits.
//!
//! A frame is `u32 length (LE) · payload`; a payload is `u32 subxid · u8 kind · body`:
//!
//! ```text
//! kind 1 (row)      u32 relation index · u64 lsn · u8 op · u8 flags(before, before-is-identity, after)
//!                   · [tuple before] · [tuple after]
//! kind 2 (message)  u8 transactional · u64 lsn · u32 len · prefix · u32 len · content
//! tuple             u16 columns · per column u8 tag (0 null, 1 unchanged TOAST, 2 text
//!                   followed by u32 len · bytes)
//! ```
//!
//! Relations are not written: the file keeps the (few) relation versions its rows used in
//! memory and a row names one by index, so a row replays with the exact column list it was
//! decoded with even if the table changed later in the transaction.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Buf, Bytes};

use wallaby_pipeline::change::{Cell, Op, Relation, RowChange, SourceEvent};
use wallaby_pipeline::lsn::Lsn;

/// Write and read buffer per open spill file: what a streamed transaction holds in memory.
const IO_BUFFER: usize = 256 * 1024;
/// Spill files are named `xid-<xid>.spill`; only such files are ever deleted here.
const PREFIX: &str = "xid-";
const SUFFIX: &str = ".spill";

const KIND_ROW: u8 = 1;
const KIND_MESSAGE: u8 = 2;
const TAG_NULL: u8 = 0;
const TAG_UNCHANGED: u8 = 1;
const TAG_TEXT: u8 = 2;
const HAS_BEFORE: u8 = 1;
const BEFORE_IS_IDENTITY: u8 = 2;
const HAS_AFTER: u8 = 4;

/// A spill file could not be written or read back.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    /// A file system operation failed.
    #[error(
        "spill {action} {path}: {source}. Large transactions are spilled to --spill-dir \
         (WALLABY_SPILL_DIR): give it a writable local directory with room for the largest \
         transaction"
    )]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A spill file does not decode (changed underneath the worker, or a bug).
    #[error(
        "spill file {path} is corrupt at byte {offset}: {what}; restart the worker (the \
         server re-sends the transaction)"
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: String,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SpillError {
    let path = path.to_owned();
    move |source| SpillError::Io {
        action,
        path,
        source,
    }
}

/// The directory holding one worker's spill files.
#[derive(Debug, Clone)]
pub struct SpillDir {
    path: PathBuf,
}

impl SpillDir {
    /// Creates the directory if needed (mode 0700: it holds row data) and deletes spill
    /// files (`xid-*.spill`, nothing else) left by an earlier run: their transactions
    /// never committed downstream, the slot did not move past them, and the server sends
    /// them again from the start.
    pub fn prepare(path: &Path) -> Result<Self, SpillError> {
        if path.is_dir() {
            // A directory given by the user (say /var/tmp) keeps its mode; the files in it
            // are 0600 regardless.
            let mode = fs::metadata(path)
                .map_err(io_error("reading metadata of directory", path))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                tracing::info!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "the spill directory is open to other users; spill files themselves are created with mode 0600");
            }
        } else {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(io_error("creating directory", path))?;
            // The mode given to DirBuilder is filtered by the umask.
            fs::set_permissions(path, fs::Permissions::from_mode(0o700))
                .map_err(io_error("restricting permissions of directory", path))?;
        }
        let entries = fs::read_dir(path).map_err(io_error("reading directory", path))?;
        for entry in entries {
            let entry = entry.map_err(io_error("reading directory", path))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(PREFIX) && name.ends_with(SUFFIX) {
                let stale = entry.path();
                fs::remove_file(&stale).map_err(io_error("removing stale file", &stale))?;
                tracing::debug!(path = %stale.display(), "removed a spill file of an earlier run");
            }
        }
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts the spill file of top-level transaction `xid` (replacing a leftover one).
    pub fn create(&self, xid: u32) -> Result<SpillFile, SpillError> {
        let path = self.path.join(format!("{PREFIX}{xid}{SUFFIX}"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_error("creating file", &path))?;
        Ok(SpillFile {
            writer: BufWriter::with_capacity(IO_BUFFER, file),
            path: RemoveOnDrop(path),
            relations: Vec::new(),
            relation_index: HashMap::new(),
            aborted: HashSet::new(),
            entries: 0,
            bytes: 0,
            scratch: Vec::new(),
        })
    }
}

/// The file is useless once its transaction committed downstream, aborted, or the worker
/// stops (the server re-sends unconfirmed transactions), so it goes with its owner.
#[derive(Debug)]
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.0)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.0.display(), error = %e, "cannot remove spill file");
        }
    }
}

/// The spill file of one streamed transaction being received.
#[derive(Debug)]
pub struct SpillFile {
    writer: BufWriter<File>,
    path: RemoveOnDrop,
    relations: Vec<Arc<Relation>>,
    /// Relation id → index in `relations` of the version last written.
    relation_index: HashMap<u32, usize>,
    /// Subtransactions rolled back (`ROLLBACK TO SAVEPOINT`): their entries, possibly
    /// already in the file, are skipped at replay.
    aborted: HashSet<u32>,
    entries: u64,
    bytes: u64,
    scratch: Vec<u8>,
}

impl SpillFile {
    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path.0
    }

    /// Entries written so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends a row change or a transactional message made by (sub)transaction `subxid`.
    /// Other events have no place in a spill file and are ignored.
    pub fn append(&mut self, subxid: u32, event: &SourceEvent) -> Result<(), SpillError> {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(&subxid.to_le_bytes());
        match event {
            SourceEvent::Row(change) => {
                let index = self.relation_slot(&change.relation);
                buf.push(KIND_ROW);
                buf.extend_from_slice(&index.to_le_bytes());
                buf.extend_from_slice(&change.lsn.0.to_le_bytes());
                buf.push(op_code(change.op));
                let mut flags = 0;
                if change.before.is_some() {
                    flags |= HAS_BEFORE;
                }
                if change.before_is_identity {
                    flags |= BEFORE_IS_IDENTITY;
                }
                if change.after.is_some() {
                    flags |= HAS_AFTER;
                }
                buf.push(flags);
                for cells in [&change.before, &change.after].into_iter().flatten() {
                    put_tuple(&mut buf, cells);
                }
            }
            SourceEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                buf.push(KIND_MESSAGE);
                buf.push(u8::from(*transactional));
                buf.extend_from_slice(&lsn.0.to_le_bytes());
                put_bytes(&mut buf, prefix.as_bytes());
                put_bytes(&mut buf, content);
            }
            // Decoded rows come from snapshot copies only, never from a streamed
            // transaction.
            SourceEvent::Begin { .. } | SourceEvent::Commit { .. } | SourceEvent::Decoded(_) => {
                self.scratch = buf;
                return Ok(());
            }
        }
        let len = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&len.to_le_bytes());
        let result = self
            .writer
            .write_all(&buf)
            .map_err(io_error("writing file", &self.path.0));
        self.entries += 1;
        self.bytes += buf.len() as u64;
        self.scratch = buf;
        result
    }

    /// Hands what is buffered to the file system at the end of a chunk: the next chunk may
    /// be minutes away, and the file's size then tells how much was received.
    pub fn end_chunk(&mut self) -> Result<(), SpillError> {
        self.writer
            .flush()
            .map_err(io_error("writing file", &self.path.0))
    }

    /// Records that subtransaction `subxid` rolled back.
    pub fn abort_subtransaction(&mut self, subxid: u32) {
        self.aborted.insert(subxid);
    }

    /// Finishes writing and opens the file for reading from the start.
    pub fn replay(mut self) -> Result<SpillReplay, SpillError> {
        self.writer
            .flush()
            .map_err(io_error("writing file", &self.path.0))?;
        let file = File::open(&self.path.0).map_err(io_error("reopening file", &self.path.0))?;
        Ok(SpillReplay {
            reader: BufReader::with_capacity(IO_BUFFER, file),
            path: self.path,
            relations: self.relations,
            aborted: self.aborted,
            offset: 0,
        })
    }

    fn relation_slot(&mut self, relation: &Arc<Relation>) -> u32 {
        if let Some(&i) = self.relation_index.get(&relation.id)
            && Arc::ptr_eq(&self.relations[i], relation)
        {
            return i as u32;
        }
        self.relations.push(relation.clone());
        let i = self.relations.len() - 1;
        self.relation_index.insert(relation.id, i);
        i as u32
    }
}

/// Reads a committed spill file back, in order, without the rolled-back subtransactions.
#[derive(Debug)]
pub struct SpillReplay {
    reader: BufReader<File>,
    path: RemoveOnDrop,
    relations: Vec<Arc<Relation>>,
    aborted: HashSet<u32>,
    offset: u64,
}

impl SpillReplay {
    /// The next surviving event, `None` at the end of the file.
    pub fn next_event(&mut self) -> Result<Option<SourceEvent>, SpillError> {
        loop {
            let mut len = [0u8; 4];
            match self.reader.read_exact(&mut len) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(io_error("reading file", &self.path.0)(e)),
            }
            let len = u32::from_le_bytes(len) as usize;
            let mut payload = vec![0u8; len];
            self.reader
                .read_exact(&mut payload)
                .map_err(io_error("reading file", &self.path.0))?;
            let at = self.offset;
            self.offset += 4 + len as u64;
            let mut frame = Bytes::from(payload);
            let decoded = self.decode(&mut frame);
            match decoded {
                Ok(Some(event)) => return Ok(Some(event)),
                Ok(None) => continue,
                Err(what) => {
                    return Err(SpillError::Corrupt {
                        path: self.path.0.clone(),
                        offset: at,
                        what,
                    });
                }
            }
        }
    }

    fn decode(&self, frame: &mut Bytes) -> Result<Option<SourceEvent>, String> {
        let subxid = get_u32(frame)?;
        if self.aborted.contains(&subxid) {
            return Ok(None);
        }
        match get_u8(frame)? {
            KIND_ROW => {
                let index = get_u32(frame)? as usize;
                let relation = self
                    .relations
                    .get(index)
                    .cloned()
                    .ok_or_else(|| format!("unknown relation index {index}"))?;
                let lsn = Lsn(get_u64(frame)?);
                let op = op_from_code(get_u8(frame)?)?;
                let flags = get_u8(frame)?;
                let before = if flags & HAS_BEFORE != 0 {
                    Some(get_tuple(frame)?)
                } else {
                    None
                };
                let after = if flags & HAS_AFTER != 0 {
                    Some(get_tuple(frame)?)
                } else {
                    None
                };
                Ok(Some(SourceEvent::Row(RowChange {
                    lsn,
                    relation,
                    op,
                    before,
                    before_is_identity: flags & BEFORE_IS_IDENTITY != 0,
                    after,
                })))
            }
            KIND_MESSAGE => {
                let transactional = get_u8(frame)? != 0;
                let lsn = Lsn(get_u64(frame)?);
                let prefix = get_bytes(frame)?;
                let content = get_bytes(frame)?;
                Ok(Some(SourceEvent::Message {
                    transactional,
                    lsn,
                    prefix: String::from_utf8_lossy(&prefix).into_owned(),
                    content,
                }))
            }
            other => Err(format!("unknown entry kind {other}")),
        }
    }
}

fn op_code(op: Op) -> u8 {
    match op {
        Op::Insert => 1,
        Op::Update => 2,
        Op::Delete => 3,
        Op::Truncate => 4,
        Op::Read => 5,
    }
}

fn op_from_code(code: u8) -> Result<Op, String> {
    match code {
        1 => Ok(Op::Insert),
        2 => Ok(Op::Update),
        3 => Ok(Op::Delete),
        4 => Ok(Op::Truncate),
        5 => Ok(Op::Read),
        other => Err(format!("unknown operation code {other}")),
    }
}

fn put_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    buf.extend_from_slice(bytes);
}

fn put_tuple(buf: &mut Vec<u8>, cells: &[Cell]) {
    buf.extend_from_slice(&(cells.len() as u16).to_le_bytes());
    for cell in cells {
        match cell {
            Cell::Null => buf.push(TAG_NULL),
            Cell::UnchangedToast => buf.push(TAG_UNCHANGED),
            Cell::Text(text) => {
                buf.push(TAG_TEXT);
                put_bytes(buf, text);
            }
        }
    }
}

fn need(frame: &Bytes, n: usize) -> Result<(), String> {
    if frame.remaining() < n {
        Err(format!(
            "entry ends early (needs {n} more bytes, has {})",
            frame.remaining()
        ))
    } else {
        Ok(())
    }
}

fn get_u8(frame: &mut Bytes) -> Result<u8, String> {
    need(frame, 1)?;
    Ok(frame.get_u8())
}

fn get_u32(frame: &mut Bytes) -> Result<u32, String> {
    need(frame, 4)?;
    Ok(frame.get_u32_le())
}

fn get_u64(frame: &mut Bytes) -> Result<u64, String> {
    need(frame, 8)?;
    Ok(frame.get_u64_le())
}

/// A slice of the entry's buffer: no copy per value.
fn get_bytes(frame: &mut Bytes) -> Result<Bytes, String> {
    let len = get_u32(frame)? as usize;
    need(frame, len)?;
    Ok(frame.split_to(len))
}

fn get_tuple(frame: &mut Bytes) -> Result<Vec<Cell>, String> {
    need(frame, 2)?;
    let n = frame.get_u16_le() as usize;
    let mut cells = Vec::with_capacity(n.min(frame.remaining()));
    for _ in 0..n {
        cells.push(match get_u8(frame)? {
            TAG_NULL => Cell::Null,
            TAG_UNCHANGED => Cell::UnchangedToast,
            TAG_TEXT => Cell::Text(get_bytes(frame)?),
            other => return Err(format!("unknown cell tag {other}")),
        });
    }
    Ok(cells)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wallaby_pipeline::change::Column;

    fn relation(id: u32, columns: &[&str]) -> Arc<Relation> {
        Arc::new(Relation {
            id,
            schema: "public".into(),
            table: format!("t{id}"),
            columns: columns
                .iter()
                .map(|n| Column {
                    name: (*n).into(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
            key: vec![0],
            identity: vec![0],
        })
    }

    fn text(s: &str) -> Cell {
        Cell::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn row(
        relation: &Arc<Relation>,
        op: Op,
        before: Option<Vec<Cell>>,
        after: Option<Vec<Cell>>,
    ) -> SourceEvent {
        SourceEvent::Row(RowChange {
            lsn: Lsn(7),
            relation: relation.clone(),
            op,
            before_is_identity: before.is_some(),
            before,
            after,
        })
    }

    fn summary(event: &SourceEvent) -> String {
        match event {
            SourceEvent::Row(r) => format!(
                "{} {}({}) {:?} {:?} {}",
                r.op.as_str(),
                r.relation.table,
                r.relation.columns.len(),
                r.before,
                r.after,
                r.before_is_identity
            ),
            SourceEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => format!("message {transactional} {lsn} {prefix} {content:?}"),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn entries_replay_in_order_without_rolled_back_subtransactions_and_the_file_goes_away() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SpillDir::prepare(&tmp.path().join("spill")).unwrap();
        let mode = fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let v1 = relation(7, &["id", "v"]);
        // The table changes inside the transaction: later rows use the new version.
        let v2 = relation(7, &["id", "v", "w"]);
        let events = [
            (
                100,
                row(&v1, Op::Insert, None, Some(vec![text("1"), Cell::Null])),
            ),
            (
                101,
                row(
                    &v1,
                    Op::Insert,
                    None,
                    Some(vec![text("2"), text("rolled back")]),
                ),
            ),
            (
                100,
                SourceEvent::Message {
                    transactional: true,
                    lsn: Lsn(0x10),
                    prefix: "p".into(),
                    content: Bytes::from_static(b"\x00\xffbinary"),
                },
            ),
            (
                102,
                row(
                    &v2,
                    Op::Update,
                    Some(vec![text("1"), Cell::Null, Cell::Null]),
                    Some(vec![text("1"), Cell::UnchangedToast, text("")]),
                ),
            ),
            (
                100,
                row(
                    &v2,
                    Op::Delete,
                    Some(vec![text("1"), Cell::Null, Cell::Null]),
                    None,
                ),
            ),
            (100, row(&v1, Op::Truncate, None, None)),
        ];
        let mut file = dir.create(42).unwrap();
        for (subxid, event) in &events {
            file.append(*subxid, event).unwrap();
        }
        file.abort_subtransaction(101);
        assert_eq!(file.entries(), 6);
        let path = file.path().to_owned();
        assert!(path.exists());
        let mut replay = file.replay().unwrap();
        let mut got = Vec::new();
        while let Some(event) = replay.next_event().unwrap() {
            got.push(summary(&event));
        }
        let want: Vec<String> = events
            .iter()
            .filter(|(subxid, _)| *subxid != 101)
            .map(|(_, e)| summary(e))
            .collect();
        assert_eq!(got, want);
        drop(replay);
        assert!(!path.exists(), "replayed file is removed");
    }

    #[test]
    fn prepare_removes_stale_spill_files_only_and_keeps_an_existing_directory_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let spill = tmp.path().join("s");
        fs::create_dir_all(&spill).unwrap();
        fs::write(spill.join("xid-9.spill"), b"old").unwrap();
        fs::write(spill.join("notes.txt"), b"keep").unwrap();
        fs::set_permissions(&spill, fs::Permissions::from_mode(0o755)).unwrap();
        SpillDir::prepare(&spill).unwrap();
        let mode = fs::metadata(&spill).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "an existing directory keeps its mode");
        assert!(!spill.join("xid-9.spill").exists());
        assert!(spill.join("notes.txt").exists());
    }

    #[test]
    fn a_truncated_file_is_reported_with_its_path_and_offset() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SpillDir::prepare(tmp.path()).unwrap();
        let rel = relation(1, &["id"]);
        let mut file = dir.create(5).unwrap();
        file.append(5, &row(&rel, Op::Insert, None, Some(vec![text("1")])))
            .unwrap();
        file.append(5, &row(&rel, Op::Insert, None, Some(vec![text("2")])))
            .unwrap();
        let first_len = file.bytes() / 2;
        let mut replay = file.replay().unwrap();
        // Corrupt the second entry's cell tag.
        let mut raw = fs::read(&replay.path.0).unwrap();
        let tag_at = first_len as usize + 4 + 4 + 1 + 4 + 8 + 1 + 1 + 2;
        raw[tag_at] = 9;
        fs::write(&replay.path.0, raw).unwrap();
        assert!(replay.next_event().unwrap().is_some());
        let err = replay.next_event().unwrap_err().to_string();
        assert!(
            err.contains("xid-5.spill") && err.contains(&format!("byte {first_len}")),
            "{err}"
        );
        assert!(err.contains("unknown cell tag 9"), "{err}");
    }
}
