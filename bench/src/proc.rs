//! Child processes of the harness and what /proc says about them: a guard that kills and
//! reaps a child on drop, CPU time (utime + stime) and peak RSS (VmHWM) read from
//! /proc/<pid>, and the exit of a child observed without reaping it (so its final CPU
//! time can still be read from the zombie's /proc/<pid>/stat).

use std::path::Path;
use std::process::{Child, ExitStatus};
use std::sync::OnceLock;
use std::time::Duration;

/// A child that is killed and reaped when dropped, so an error path never leaks one.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        Self { child: Some(child) }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Reaps the child after it exited (or kills it first if it still runs).
    pub fn reap(mut self) -> std::io::Result<ExitStatus> {
        match self.child.take() {
            Some(mut c) => {
                if c.try_wait()?.is_none() {
                    let _ = c.kill();
                }
                c.wait()
            }
            None => Err(std::io::Error::other("child already reaped")),
        }
    }

    /// Asks the child to stop cleanly (SIGTERM through kill(1): the workspace forbids
    /// unsafe code, so no libc::kill).
    fn terminate(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
    }

    /// SIGTERM, then up to `grace` for a clean exit, then SIGKILL; reaps the child.
    pub async fn stop(mut self, grace: Duration) -> std::io::Result<ExitStatus> {
        self.terminate();
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.reap()
    }

    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Err(std::io::Error::other("child already reaped")),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Clock ticks per second of /proc/<pid>/stat times (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// One reading of /proc/<pid>/stat.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcStat {
    /// Process state letter (`R`, `S`, `Z`, …).
    pub state: char,
    /// utime + stime of all threads, seconds.
    pub cpu_seconds: f64,
}

/// Reads /proc/<pid>/stat; `None` once the process is gone (reaped).
pub fn stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let state = fields.first()?.chars().next()?;
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some(ProcStat {
        state,
        cpu_seconds: (utime + stime) / clock_ticks(),
    })
}

/// Peak resident set size (VmHWM) in bytes; `None` for a zombie or a reaped process.
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// How often running processes are sampled: bounds the error of the exit time and of the
/// last walsender CPU reading.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// Running totals of one sampled process.
#[derive(Debug, Default, Clone, Copy)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub peak_rss_bytes: u64,
}

impl Usage {
    /// Folds in a new reading (CPU time only grows; VmHWM only grows).
    pub fn observe(&mut self, pid: u32) -> Option<ProcStat> {
        let s = stat(pid)?;
        self.cpu_seconds = self.cpu_seconds.max(s.cpu_seconds);
        if let Some(rss) = peak_rss_bytes(pid) {
            self.peak_rss_bytes = self.peak_rss_bytes.max(rss);
        }
        Some(s)
    }
}

/// Whether `path` is an executable file.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
