//! Fan-out, ack and failure policies against the real PostgreSQL, with fault-injecting
//! destinations (fail N times, fail permanently, hang, slow). The invariant checked
//! throughout: the slot's `confirmed_flush_lsn` never passes what the required
//! destinations made durable.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::{TestDb, parse_lsn, wait_for};
use pg_walstream::CancellationToken;
use wallaby_crds::flow::GiveUpPolicy;
use wallaby_pipeline::batch::ChangeBatch;
use wallaby_pipeline::destination::{Destination, DestinationError, WriteAck};
use wallaby_pipeline::retry::RetryPolicy;
use wallaby_pipeline::runner::DestinationSlot;
use wallaby_worker::run::{RunOptions, run_with};
use wallaby_worker::standalone;

/// What the fault destination does.
#[derive(Debug, Default)]
struct Script {
    /// Fail this many writes (transiently) before succeeding.
    fail_writes: u32,
    /// Fail every write with a permanent error.
    permanent: bool,
    /// Block writes while true.
    hang: bool,
    /// Delay each write.
    delay: Duration,
    /// Acknowledge writes as durable at once (else accepted + flush).
    durable_writes: bool,
    /// Delay each flush.
    flush_delay: Duration,
}

#[derive(Debug, Default)]
struct Observed {
    /// Rows written (ids from the `id` column), in order, accepted or durable.
    accepted_rows: u64,
    /// Rows made durable.
    durable_rows: u64,
    /// Highest checkpoint made durable.
    durable_lsn: u64,
    /// Checkpoint accepted but not yet flushed.
    pending_lsn: u64,
    pending_rows: u64,
    failures: u32,
    /// Commit LSN of every transaction the destination received.
    commits: std::collections::BTreeSet<u64>,
    /// (slot position, durable end) sampled in that order while the flow ran.
    samples: Vec<(u64, u64)>,
    /// Deliveries per inserted `id` (accepted or durable).
    ids: std::collections::BTreeMap<i32, u32>,
    /// Batches ending a transaction that were written, and flushes.
    checkpoint_writes: u32,
    flushes: u32,
}

#[derive(Debug, Clone, Default)]
struct Fault {
    script: Arc<Mutex<Script>>,
    seen: Arc<Mutex<Observed>>,
}

impl Fault {
    fn durable_lsn(&self) -> u64 {
        self.seen.lock().unwrap().durable_lsn
    }
    fn durable_rows(&self) -> u64 {
        self.seen.lock().unwrap().durable_rows
    }
    /// Ids in `1..=n` never delivered, and how many deliveries were repeats.
    fn missing_and_repeated(&self, n: i32) -> (Vec<i32>, u32) {
        let seen = self.seen.lock().unwrap();
        let missing = (1..=n).filter(|i| !seen.ids.contains_key(i)).collect();
        let repeated = seen.ids.values().map(|c| c - 1).sum();
        (missing, repeated)
    }

    /// Samples the invariant: read the slot first, then the durable end (which only
    /// grows), so a later check cannot be fooled by the order of the reads.
    async fn sample(&self, db: &TestDb) -> u64 {
        let slot = confirmed(db).await;
        let durable = self.durable_lsn();
        self.seen.lock().unwrap().samples.push((slot, durable));
        slot
    }

    /// PostgreSQL skips, on restart, every transaction whose commit record starts before
    /// the slot's confirmed position. So at every sample, no transaction with a commit LSN
    /// in [durable end, slot) may exist: such a transaction would be lost.
    fn assert_never_passed_durable(&self, floor: u64) {
        let seen = self.seen.lock().unwrap();
        assert!(!seen.samples.is_empty());
        for (slot, durable) in &seen.samples {
            let durable = (*durable).max(floor);
            if durable >= *slot {
                continue;
            }
            if let Some(lost) = seen.commits.range(durable..*slot).next() {
                panic!(
                    "slot confirmed {slot:X} while the transaction committed at {lost:X} was not durable (durable end {durable:X})"
                );
            }
        }
    }
}

#[derive(Debug)]
struct FaultDestination(Fault);

#[async_trait]
impl Destination for FaultDestination {
    async fn write(&mut self, batch: &ChangeBatch) -> Result<WriteAck, DestinationError> {
        loop {
            let hang = self.0.script.lock().unwrap().hang;
            if !hang {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (delay, durable) = {
            let mut s = self.0.script.lock().unwrap();
            if s.permanent {
                self.0.seen.lock().unwrap().failures += 1;
                return Err(DestinationError::permanent("credentials rejected")
                    .with_hint("fix the destination's secret"));
            }
            if s.fail_writes > 0 {
                s.fail_writes -= 1;
                self.0.seen.lock().unwrap().failures += 1;
                return Err(DestinationError::transient("connection reset"));
            }
            (s.delay, s.durable_writes)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut seen = self.0.seen.lock().unwrap();
        seen.accepted_rows += batch.rows;
        seen.checkpoint_writes += u32::from(batch.checkpoint.is_some());
        for group in &batch.tables {
            seen.commits
                .extend(group.changes.iter().map(|c| c.commit_lsn));
            for change in &group.changes {
                if let Some(wallaby_codec::Value::Int4(id)) =
                    change.after.as_ref().and_then(|r| r.values.first())
                {
                    *seen.ids.entry(*id).or_default() += 1;
                }
            }
        }
        if durable {
            seen.durable_rows += batch.rows;
            if let Some(cp) = batch.checkpoint {
                seen.durable_lsn = seen.durable_lsn.max(cp.0);
            }
            Ok(WriteAck::Durable)
        } else {
            seen.pending_rows += batch.rows;
            if let Some(cp) = batch.checkpoint {
                seen.pending_lsn = seen.pending_lsn.max(cp.0);
            }
            Ok(WriteAck::Accepted)
        }
    }

    async fn flush(&mut self) -> Result<(), DestinationError> {
        let delay = self.0.script.lock().unwrap().flush_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut seen = self.0.seen.lock().unwrap();
        seen.flushes += 1;
        seen.durable_rows += std::mem::take(&mut seen.pending_rows);
        seen.durable_lsn = seen.durable_lsn.max(seen.pending_lsn);
        Ok(())
    }
}

fn retry(max_retries: u32, give_up: GiveUpPolicy) -> RetryPolicy {
    RetryPolicy {
        max_retries,
        base: Duration::from_millis(10),
        max: Duration::from_millis(50),
        factor: 2.0,
        give_up,
    }
}

fn manifest(dir: &Path, db: &TestDb, flow_extra: &str, source_extra: &str) -> std::path::PathBuf {
    let text = format!(
        r#"apiVersion: wallaby.dev/v1alpha1
kind: Flow
metadata: {{name: acks}}
spec:
{flow_extra}
  source:
    postgres:
      secretRef: {{name: pg}}
      slot: {slot}
      publication: {slot}
      tables: ["public.t"]
      batchSize: 50
      batchTimeout: 20ms
      statusInterval: 200ms
{source_extra}
  destinations: [{{name: a}}, {{name: b}}]
---
apiVersion: wallaby.dev/v1alpha1
kind: Destination
metadata: {{name: a}}
spec: {{type: file, file: {{path: "{out}/a"}}}}
---
apiVersion: wallaby.dev/v1alpha1
kind: Destination
metadata: {{name: b}}
spec: {{type: file, file: {{path: "{out}/b"}}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: pg}}
stringData: {{dsn: "{dsn}"}}
"#,
        slot = db.name,
        dsn = db.dsn,
        out = dir.display()
    );
    let path = dir.join("flow.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

struct Running {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    status: std::path::PathBuf,
}

impl Running {
    fn status(&self) -> serde_json::Value {
        std::fs::read_to_string(&self.status)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        self.task.await.unwrap()
    }
}

fn start(
    dir: &Path,
    manifest: &Path,
    a: (&Fault, RetryPolicy),
    b: (&Fault, RetryPolicy),
) -> Running {
    start_in(&tokio::runtime::Handle::current(), dir, manifest, a, b)
}

/// Starts the flow on `runtime` (a runtime of its own can be shut down abruptly to
/// simulate a crash: every task stops at its next await, nothing is flushed or confirmed).
fn start_in(
    runtime: &tokio::runtime::Handle,
    dir: &Path,
    manifest: &Path,
    a: (&Fault, RetryPolicy),
    b: (&Fault, RetryPolicy),
) -> Running {
    let resolved = standalone::load(manifest, None).unwrap();
    let slots = vec![
        DestinationSlot {
            name: "a".into(),
            sink: Box::new(FaultDestination(a.0.clone())),
            retry: a.1,
        },
        DestinationSlot {
            name: "b".into(),
            sink: Box::new(FaultDestination(b.0.clone())),
            retry: b.1,
        },
    ];
    let cancel = CancellationToken::new();
    let status = dir.join("status.json");
    let options = RunOptions {
        status_file: status.clone(),
        state_dir: dir.join("state"),
        spill_dir: Some(dir.join("spill")),
    };
    let task = runtime.spawn(run_with(
        resolved,
        slots,
        options,
        cancel.clone(),
        wallaby_pipeline::metrics::Metrics::new(),
    ));
    Running {
        cancel,
        task,
        status,
    }
}

async fn setup_table(db: &TestDb) -> tokio_postgres::Client {
    let c = db.client().await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    c
}

async fn insert(c: &tokio_postgres::Client, from: i32, to: i32) {
    c.execute(
        "INSERT INTO t SELECT g, 'v' || g FROM generate_series($1::int, $2::int) g",
        &[&from, &to],
    )
    .await
    .unwrap();
}

async fn confirmed(db: &TestDb) -> u64 {
    db.slot(&db.name)
        .await
        .map(|(lsn, _)| parse_lsn(&lsn))
        .unwrap_or(0)
}

/// Inserts rows in many small transactions while sampling the invariant at each step.
async fn write_and_check(db: &TestDb, c: &tokio_postgres::Client, required: &[&Fault], rows: i32) {
    for chunk in 0..(rows / 10) {
        insert(c, chunk * 10 + 1, chunk * 10 + 10).await;
        for f in required {
            f.sample(db).await;
        }
    }
}

/// The slot's position before the test wrote anything is the floor for the invariant.
async fn start_lsn(db: &TestDb) -> u64 {
    static START: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());
    if let Some((_, l)) = START.lock().unwrap().iter().find(|(n, _)| n == &db.name) {
        return *l;
    }
    let l = confirmed(db).await;
    START.lock().unwrap().push((db.name.clone(), l));
    l
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_waits_for_every_destination_and_retries_transient_failures() {
    let db = TestDb::create("ack_all").await;
    let c = setup_table(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), &db, "", "");
    let a = Fault::default();
    let b = Fault::default();
    // `a` fails three times transiently, `b` is slow and durable on write.
    a.script.lock().unwrap().fail_writes = 3;
    {
        let mut s = b.script.lock().unwrap();
        s.delay = Duration::from_millis(30);
        s.durable_writes = true;
    }
    let run = deliver_to_both(&db, &c, dir.path(), &m, (&a, &b), 300).await;
    assert_eq!(a.seen.lock().unwrap().failures, 3);
    run.stop().await.unwrap();
    db.drop_all().await;
}

/// Runs the flow into `a` and `b` (both required, retried), writes `rows` rows in small
/// transactions, waits until both made them durable and the slot reached them, and
/// checks that the slot never passed what either had made durable.
async fn deliver_to_both(
    db: &TestDb,
    c: &tokio_postgres::Client,
    dir: &Path,
    manifest: &Path,
    (a, b): (&Fault, &Fault),
    rows: u64,
) -> Running {
    let run = start(
        dir,
        manifest,
        (a, retry(5, GiveUpPolicy::OnRetryExhaustion)),
        (b, retry(5, GiveUpPolicy::OnRetryExhaustion)),
    );
    wait_for("slot created", Duration::from_secs(20), async || {
        db.slot(&db.name).await
    })
    .await;
    start_lsn(db).await;
    write_and_check(db, c, &[a, b], rows as i32).await;
    wait_for(
        "every row durable at both",
        Duration::from_secs(30),
        async || (a.durable_rows() == rows && b.durable_rows() == rows).then_some(()),
    )
    .await;
    wait_for(
        "slot reaches the last durable commit",
        Duration::from_secs(20),
        async || {
            let slot = a.sample(db).await;
            b.sample(db).await;
            (slot >= a.durable_lsn().min(b.durable_lsn())).then_some(())
        },
    )
    .await;
    let floor = start_lsn(db).await;
    a.assert_never_passed_durable(floor);
    b.assert_never_passed_durable(floor);
    run
}

/// Group commit: batches that queue up behind a slow flush are written and then made
/// durable by one flush, and the slot still never passes what is durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_queued_behind_a_slow_flush_share_the_next_one() {
    let db = TestDb::create("ack_group").await;
    let c = setup_table(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), &db, "", "");
    let a = Fault::default();
    let b = Fault::default();
    a.script.lock().unwrap().flush_delay = Duration::from_millis(100);
    let run = deliver_to_both(&db, &c, dir.path(), &m, (&a, &b), 600).await;
    let (writes, flushes) = {
        let seen = a.seen.lock().unwrap();
        (seen.checkpoint_writes, seen.flushes)
    };
    assert!(
        flushes < writes,
        "{flushes} flushes for {writes} batches: queued batches were flushed one by one"
    );
    run.stop().await.unwrap();
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_destination_holds_the_slot_under_all() {
    let db = TestDb::create("ack_hang").await;
    let c = setup_table(&db).await;
    let dir = tempfile::tempdir().unwrap();
    // Two concurrent writes, so `a` is not queued behind `b`'s hung write.
    let m = manifest(dir.path(), &db, "  parallelism: 2", "");
    let a = Fault::default();
    let b = Fault::default();
    b.script.lock().unwrap().hang = true;
    // A spool left from a run where `a` was a secondary: under `all` nothing reads it.
    wallaby_pipeline::spool::SecondarySpool::open(
        &spool_dir(dir.path(), "a"),
        wallaby_pipeline::spool::SEGMENT_BYTES,
    )
    .unwrap();
    let run = start(
        dir.path(),
        &m,
        (&a, retry(5, GiveUpPolicy::OnRetryExhaustion)),
        (&b, retry(5, GiveUpPolicy::OnRetryExhaustion)),
    );
    wait_for("slot created", Duration::from_secs(20), async || {
        db.slot(&db.name).await
    })
    .await;
    wait_for(
        "the stale spool is deleted",
        Duration::from_secs(20),
        async || (!spool_dir(dir.path(), "a").exists()).then_some(()),
    )
    .await;
    let floor = start_lsn(&db).await;
    insert(&c, 1, 100).await;
    wait_for("a has everything", Duration::from_secs(20), async || {
        (a.durable_rows() == 100).then_some(())
    })
    .await;
    // `a` is done, `b` hangs: the slot must not pass the transaction. Give the worker a
    // few status intervals to (wrongly) confirm it.
    for _ in 0..10 {
        b.sample(&db).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.script.lock().unwrap().hang = false;
    wait_for(
        "b catches up and the slot moves",
        Duration::from_secs(20),
        async || {
            let slot = b.sample(&db).await;
            (b.durable_rows() == 100 && slot >= b.durable_lsn()).then_some(())
        },
    )
    .await;
    b.assert_never_passed_durable(floor);
    run.stop().await.unwrap();
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_drives_the_slot_and_a_stuck_secondary_is_detached_past_its_buffer() {
    let db = TestDb::create("ack_primary").await;
    let c = setup_table(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        &db,
        "  ackPolicy: primary\n  primaryDestination: a\n  secondaryBufferBytes: 65536",
        "",
    );
    let a = Fault::default();
    let b = Fault::default();
    b.script.lock().unwrap().hang = true;
    let run = start(
        dir.path(),
        &m,
        (&a, retry(5, GiveUpPolicy::OnRetryExhaustion)),
        (&b, retry(5, GiveUpPolicy::OnRetryExhaustion)),
    );
    wait_for("slot created", Duration::from_secs(20), async || {
        db.slot(&db.name).await
    })
    .await;
    let floor = start_lsn(&db).await;
    write_and_check(&db, &c, &[&a], 200).await;
    wait_for(
        "the slot follows the primary",
        Duration::from_secs(20),
        async || {
            let slot = a.sample(&db).await;
            (a.durable_rows() == 200 && slot >= a.durable_lsn()).then_some(())
        },
    )
    .await;
    assert_eq!(b.durable_rows(), 0, "the secondary is stuck");
    a.assert_never_passed_durable(floor);
    // Past its buffer the secondary is detached, and status says so.
    c.execute(
        "INSERT INTO t SELECT g, repeat('x', 2000) FROM generate_series(1001, 1200) g",
        &[],
    )
    .await
    .unwrap();
    let status = wait_for(
        "b detached in status",
        Duration::from_secs(20),
        async || {
            let s = run.status();
            let b = s["destinations"]
                .as_array()?
                .iter()
                .find(|d| d["name"] == "b")?
                .clone();
            b["lastError"]
                .as_str()
                .filter(|e| e.contains("fell behind the primary"))
                .map(|_| s)
        },
    )
    .await;
    assert_eq!(status["phase"], "Degraded", "{status}");
    let error = status_of(&status, "b")["lastError"].to_string();
    assert!(
        error.contains("bytes of unread spool")
            && error.contains("its spool was deleted")
            && error.contains("re-synced (backfill)"),
        "{error}"
    );
    assert!(
        !spool_dir(dir.path(), "b").exists(),
        "the detached secondary's spool is deleted"
    );
    wait_for("primary keeps going", Duration::from_secs(20), async || {
        (a.durable_rows() == 400).then_some(())
    })
    .await;
    // Detached, the secondary no longer gates the slot: it follows the primary alone.
    wait_for(
        "the slot follows the primary past the detachment",
        Duration::from_secs(20),
        async || (a.sample(&db).await >= a.durable_lsn()).then_some(()),
    )
    .await;
    a.assert_never_passed_durable(floor);
    run.stop().await.unwrap();
    db.drop_all().await;
}

fn spool_dir(dir: &Path, destination: &str) -> std::path::PathBuf {
    dir.join("state").join("spool").join(destination)
}

/// Bytes in the spool's segment files.
fn spooled_bytes(dir: &Path, destination: &str) -> u64 {
    std::fs::read_dir(spool_dir(dir, destination))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn status_of(status: &serde_json::Value, destination: &str) -> serde_json::Value {
    status["destinations"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["name"] == destination))
        .cloned()
        .unwrap_or_default()
}

const PRIMARY_A: &str = "  ackPolicy: primary\n  primaryDestination: a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_secondary_catches_up_from_its_spool_while_the_slot_follows_the_primary() {
    let db = TestDb::create("ack_spool").await;
    let c = setup_table(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), &db, PRIMARY_A, "");
    let a = Fault::default();
    let b = Fault::default();
    b.script.lock().unwrap().hang = true;
    let run = start(
        dir.path(),
        &m,
        (&a, retry(5, GiveUpPolicy::OnRetryExhaustion)),
        (&b, retry(5, GiveUpPolicy::OnRetryExhaustion)),
    );
    wait_for("slot created", Duration::from_secs(20), async || {
        db.slot(&db.name).await
    })
    .await;
    let floor = start_lsn(&db).await;
    write_and_check(&db, &c, &[&a], 300).await;
    let slot = wait_for(
        "the slot follows the primary",
        Duration::from_secs(20),
        async || {
            let slot = a.sample(&db).await;
            (a.durable_rows() == 300 && slot >= a.durable_lsn()).then_some(slot)
        },
    )
    .await;
    a.assert_never_passed_durable(floor);
    assert_eq!(b.durable_rows(), 0, "the secondary hangs");
    assert!(slot > floor, "the slot moved past what the secondary has");
    assert!(
        spooled_bytes(dir.path(), "b") > 0,
        "what the secondary has not made durable waits in its spool"
    );
    // The secondary keeps its own position in status.
    wait_for(
        "status shows the secondary behind the slot",
        Duration::from_secs(20),
        async || {
            let own = status_of(&run.status(), "b")["lsn"]
                .as_str()
                .map(parse_lsn)?;
            (own < slot).then_some(())
        },
    )
    .await;

    b.script.lock().unwrap().hang = false;
    wait_for(
        "the secondary catches up from its spool",
        Duration::from_secs(30),
        async || (b.durable_rows() >= 300).then_some(()),
    )
    .await;
    let (missing, repeated) = b.missing_and_repeated(300);
    assert!(missing.is_empty(), "rows never delivered: {missing:?}");
    assert_eq!(repeated, 0, "delivered once");
    wait_for(
        "status shows the secondary's own durable position",
        Duration::from_secs(20),
        async || {
            let lsn = status_of(&run.status(), "b")["lsn"]
                .as_str()
                .map(parse_lsn)?;
            (lsn == b.durable_lsn()).then_some(())
        },
    )
    .await;
    run.stop().await.unwrap();
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_keeps_a_secondarys_changes_across_a_restart_after_the_slot_passed_them() {
    spool_survives(false, "ack_spool_restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_keeps_a_secondarys_changes_across_a_crash_after_the_slot_passed_them() {
    spool_survives(true, "ack_spool_crash").await;
}

/// Runs with a hung secondary until the slot passed what the secondary has, then stops
/// (cleanly, or by `crash`: the worker's runtime is dropped mid-flight), and starts a new
/// run on the same state directory with the secondary healthy.
async fn spool_survives(crash: bool, name: &str) {
    let db = TestDb::create(name).await;
    let c = setup_table(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), &db, PRIMARY_A, "");
    let a = Fault::default();
    let b = Fault::default();
    b.script.lock().unwrap().hang = true;
    let worker = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let run = start_in(
        worker.handle(),
        dir.path(),
        &m,
        (&a, retry(5, GiveUpPolicy::OnRetryExhaustion)),
        (&b, retry(5, GiveUpPolicy::OnRetryExhaustion)),
    );
    wait_for("slot created", Duration::from_secs(20), async || {
        db.slot(&db.name).await
    })
    .await;
    let floor = start_lsn(&db).await;
    write_and_check(&db, &c, &[&a], 200).await;
    wait_for(
        "the slot follows the primary",
        Duration::from_secs(20),
        async || {
            let slot = a.sample(&db).await;
            (a.durable_rows() == 200 && slot >= a.durable_lsn()).then_some(())
        },
    )
    .await;
    // Stop while the secondary still hangs: it made nothing durable.
    if crash {
        drop(run);
        worker.shutdown_background();
    } else {
        run.stop().await.unwrap();
        worker.shutdown_background();
    }
    assert_eq!(b.durable_rows(), 0);
    let slot = confirmed(&db).await;
    let passed = a.seen.lock().unwrap().commits.range(floor..slot).count();
    assert!(
        passed > 0 && b.seen.lock().unwrap().commits.is_empty(),
        "the slot ({slot:X}) passed {passed} transactions the secondary never received"
    );
    assert!(spooled_bytes(dir.path(), "b") > 0);

    // A new run on the same state directory, the secondary healthy again.
    let a2 = Fault::default();
    let b2 = Fault::default();
    let run = start(
        dir.path(),
        &m,
        (&a2, retry(5, GiveUpPolicy::OnRetryExhaustion)),
        (&b2, retry(5, GiveUpPolicy::OnRetryExhaustion)),
    );
    insert(&c, 201, 300).await;
    wait_for(
        "the secondary replays its spool, then follows the stream",
        Duration::from_secs(30),
        async || (b2.missing_and_repeated(300).0.is_empty()).then_some(()),
    )
    .await;
    let (_, repeated) = b2.missing_and_repeated(300);
    assert_eq!(
        repeated, 0,
        "what the spool held is not appended again when the slot re-sends it"
    );
    wait_for(
        "the primary has the new rows",
        Duration::from_secs(20),
        async || (a2.missing_and_repeated(300).0.iter().all(|id| *id <= 200)).then_some(()),
    )
    .await;
    run.stop().await.unwrap();
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_gives_up_and_drop_slot_drops_it() {
    let db = TestDb::create("ack_giveup").await;
    let c = setup_table(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), &db, "  failureMode: dropSlot", "");
    let a = Fault::default();
    let b = Fault::default();
    let run = start(
        dir.path(),
        &m,
        (&a, retry(5, GiveUpPolicy::OnRetryExhaustion)),
        (&b, retry(5, GiveUpPolicy::OnRetryExhaustion)),
    );
    wait_for("slot created", Duration::from_secs(20), async || {
        db.slot(&db.name).await
    })
    .await;
    insert(&c, 1, 10).await;
    wait_for("first rows durable", Duration::from_secs(20), async || {
        (a.durable_rows() == 10 && b.durable_rows() == 10).then_some(())
    })
    .await;
    b.script.lock().unwrap().permanent = true;
    insert(&c, 11, 20).await;
    let err = tokio::time::timeout(Duration::from_secs(30), run.task)
        .await
        .expect("the flow stops")
        .unwrap()
        .expect_err("the flow fails");
    let text = err.to_string();
    assert!(
        text.contains("destination \"b\" gave up after 1 attempt(s)")
            && text
                .contains("credentials rejected (permanent); hint: fix the destination's secret")
            && text.contains("failureMode dropSlot: slot"),
        "{text}"
    );
    assert_eq!(
        b.seen.lock().unwrap().failures,
        1,
        "permanent errors are not retried"
    );
    assert!(
        db.slot(&db.name).await.is_none(),
        "dropSlot dropped the slot"
    );
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("status.json")).unwrap())
            .unwrap();
    assert_eq!(status["phase"], "Failed");
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_slot_keeps_the_slot_at_the_last_durable_position() {
    let db = TestDb::create("ack_hold").await;
    let c = setup_table(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), &db, "", "");
    let a = Fault::default();
    let b = Fault::default();
    let run = start(
        dir.path(),
        &m,
        (&a, retry(2, GiveUpPolicy::OnRetryExhaustion)),
        (&b, retry(2, GiveUpPolicy::OnRetryExhaustion)),
    );
    wait_for("slot created", Duration::from_secs(20), async || {
        db.slot(&db.name).await
    })
    .await;
    insert(&c, 1, 10).await;
    wait_for("first rows durable", Duration::from_secs(20), async || {
        (b.durable_rows() == 10 && a.durable_rows() == 10).then_some(())
    })
    .await;
    let held = b.durable_lsn();
    a.script.lock().unwrap().fail_writes = 100;
    insert(&c, 11, 20).await;
    let err = tokio::time::timeout(Duration::from_secs(30), run.task)
        .await
        .expect("the flow stops")
        .unwrap()
        .expect_err("the flow fails");
    assert!(
        err.to_string().contains("gave up after 3 attempt(s)")
            && err.to_string().contains("failureMode holdSlot"),
        "{err}"
    );
    // The server releases the slot once it has seen the connection close.
    let lsn = wait_for(
        "the slot to be released",
        Duration::from_secs(20),
        async || {
            db.slot(&db.name)
                .await
                .and_then(|(lsn, active)| (!active).then_some(lsn))
        },
    )
    .await;
    assert!(
        parse_lsn(&lsn) <= held,
        "slot {lsn} past the last durable {held:X}"
    );
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn give_up_never_keeps_retrying_and_recovers() {
    let db = TestDb::create("ack_never").await;
    let c = setup_table(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), &db, "  giveUpPolicy: never", "");
    let a = Fault::default();
    let b = Fault::default();
    a.script.lock().unwrap().fail_writes = 1_000_000;
    let run = start(
        dir.path(),
        &m,
        (&a, retry(1, GiveUpPolicy::Never)),
        (&b, retry(1, GiveUpPolicy::Never)),
    );
    wait_for("slot created", Duration::from_secs(20), async || {
        db.slot(&db.name).await
    })
    .await;
    let floor = start_lsn(&db).await;
    insert(&c, 1, 10).await;
    let status = wait_for(
        "degraded with the error",
        Duration::from_secs(20),
        async || {
            let s = run.status();
            (s["phase"] == "Degraded" && a.seen.lock().unwrap().failures > 3).then_some(s)
        },
    )
    .await;
    assert!(
        status.to_string().contains("connection reset (transient)"),
        "{status}"
    );
    a.sample(&db).await;
    a.script.lock().unwrap().fail_writes = 0;
    wait_for("recovered", Duration::from_secs(30), async || {
        (a.durable_rows() == 10 && a.sample(&db).await > floor).then_some(())
    })
    .await;
    a.assert_never_passed_durable(floor);
    run.stop().await.unwrap();
    db.drop_all().await;
}
