//! The `file` destination: a directory of JSON-lines files, one record per change,
//! rotated by size and age. A batch is durable once its bytes and (for a new file) the
//! directory entry are fsynced; only then may the slot advance past it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wallaby_crds::destination::FileSpec;

use crate::lsn::Lsn;

/// Writer of one destination directory.
#[derive(Debug)]
pub struct FileDestination {
    dir: PathBuf,
    max_file_bytes: u64,
    rotate_interval: Duration,
    current: Option<OpenFile>,
    /// A file was created (or finished) since the last directory fsync.
    dir_dirty: bool,
    /// Files opened by this process.
    sequence: u32,
}

#[derive(Debug)]
struct OpenFile {
    writer: BufWriter<File>,
    path: PathBuf,
    bytes: u64,
    opened: Instant,
}

impl FileDestination {
    /// Opens the directory (creating it), repairing a record torn by a crash.
    pub fn open(spec: &FileSpec) -> io::Result<Self> {
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
            }
        }
        Ok(Self {
            dir,
            max_file_bytes: spec.max_file_bytes,
            rotate_interval,
            current: None,
            dir_dirty: false,
            sequence: 0,
        })
    }

    /// Appends one record (a JSON line without the newline). `lsn` names a new file.
    pub fn write(&mut self, lsn: Lsn, record: &[u8]) -> io::Result<()> {
        let rotate = self.current.as_ref().is_some_and(|f| {
            f.bytes >= self.max_file_bytes || f.opened.elapsed() >= self.rotate_interval
        });
        if rotate {
            self.finish_current()?;
        }
        if self.current.is_none() {
            let millis = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis();
            // The sequence keeps names unique when several files open in one millisecond.
            self.sequence += 1;
            let path = self.dir.join(format!(
                "changes-{millis:013}-{:016X}-{:06}.jsonl",
                lsn.0, self.sequence
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
            });
            self.dir_dirty = true;
        }
        if let Some(f) = self.current.as_mut() {
            f.writer.write_all(record)?;
            f.writer.write_all(b"\n")?;
            f.bytes += record.len() as u64 + 1;
        }
        Ok(())
    }

    /// Makes everything written so far durable.
    pub fn sync(&mut self) -> io::Result<()> {
        if let Some(f) = self.current.as_mut() {
            f.writer.flush()?;
            f.writer
                .get_ref()
                .sync_data()
                .map_err(|e| annotate(e, "fsync of", &f.path))?;
        }
        if self.dir_dirty {
            File::open(&self.dir)?
                .sync_all()
                .map_err(|e| annotate(e, "fsync of", &self.dir))?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// Rotates when the current file is too old even without new records.
    pub fn rotate_if_due(&mut self) -> io::Result<()> {
        if self
            .current
            .as_ref()
            .is_some_and(|f| f.opened.elapsed() >= self.rotate_interval)
        {
            self.finish_current()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, max: u64) -> FileSpec {
        FileSpec {
            path: dir.display().to_string(),
            max_file_bytes: max,
            rotate_interval: "1h".into(),
        }
    }

    #[test]
    fn rotates_by_size_and_repairs_torn_tails() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = FileDestination::open(&spec(dir.path(), 1024)).unwrap();
        let record = vec![b'x'; 300];
        for i in 0..10 {
            d.write(Lsn(i), &record).unwrap();
        }
        d.sync().unwrap();
        let mut files: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert_eq!(
            files.len(),
            3,
            "10 records of 301 bytes with 1 KiB files: {files:?}"
        );
        // Simulate a crash mid-record.
        let last = files.last().unwrap();
        let mut f = OpenOptions::new().append(true).open(last).unwrap();
        f.write_all(b"{\"half\":").unwrap();
        drop(f);
        FileDestination::open(&spec(dir.path(), 1024)).unwrap();
        let text = fs::read_to_string(last).unwrap();
        assert!(text.ends_with('\n') && !text.contains("half"));
        assert_eq!(text.lines().count(), 2);
    }
}
