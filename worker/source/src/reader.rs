//! The replication stream: pg_walstream carries the walsender's CopyData (keepalives and
//! standby status updates included) and parses pgoutput; this module turns the parsed
//! messages into [`SourceEvent`]s, resolving each table's primary key on the SQL
//! connection so records are keyed by it even under `REPLICA IDENTITY FULL`.
//!
//! With protocol version 2 a transaction that outgrows the server's
//! `logical_decoding_work_mem` arrives in chunks (StreamStart … StreamStop) before it
//! commits, interleaved with other transactions. Chunks go to a spill file per top-level
//! transaction ([`super::spill`]); at StreamCommit the file is replayed as Begin → Row… →
//! Commit, so the pipeline still sees whole transactions in commit order and the worker
//! holds a bounded amount of any transaction in memory. Every row passes the `toastFetch`
//! stage ([`super::toast`]) right before it is sent (at replay time for streamed ones).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pg_walstream::{
    CancellationToken, ColumnData, LogicalReplicationMessage, LogicalReplicationParser,
    LogicalReplicationStream, ReplicationError, ReplicationStreamConfig, RetryConfig,
    SharedLsnFeedback, StreamingMode, TupleData, postgres_timestamp_to_chrono,
};
use tokio::sync::mpsc;
use tokio_postgres::Client;

use super::spill::{SpillDir, SpillFile};
use super::toast::ToastStage;
use super::{PgConnection, SourceError};
use wallaby_pipeline::change::{Cell, Column, Op, Relation, RowChange, SourceEvent};
use wallaby_pipeline::lsn::Lsn;

/// pgoutput protocol version 2 (PostgreSQL 14+): streaming of in-progress transactions.
const PROTOCOL_STREAMING: u32 = 2;
/// Protocol version 1 for older servers: whole transactions only, decoded (and spilled)
/// by the server.
const PROTOCOL_WHOLE: u32 = 1;
/// Replayed events between two looks at the cancellation token and the status clock.
const CHECK_EVERY: u64 = 1024;

/// A streamed top-level transaction being received.
#[derive(Debug)]
struct StreamedTxn {
    file: SpillFile,
    /// Relation messages sent inside this transaction's chunks. pgoutput describes a
    /// table once per streamed transaction, and such a description (possibly of a schema
    /// this transaction changed) must not replace the one other transactions use.
    relations: HashMap<u32, Arc<Relation>>,
}

/// What the reader forwarded, to decide when the stream is idle.
#[derive(Debug, Default)]
struct IdleTracker {
    in_transaction: bool,
    last_commit_end: u64,
    /// Non-transactional messages forwarded since the last commit (they carry no
    /// position the pipeline confirms).
    loose_messages: u64,
}

impl IdleTracker {
    fn forwarded(&mut self, event: &SourceEvent) {
        match event {
            SourceEvent::Begin { .. } => self.in_transaction = true,
            SourceEvent::Commit { end_lsn, .. } => {
                self.in_transaction = false;
                self.last_commit_end = end_lsn.0;
                self.loose_messages = 0;
            }
            SourceEvent::Message {
                transactional: false,
                ..
            } => self.loose_messages += 1,
            _ => {}
        }
    }

    fn is_idle(&self, confirmed: u64) -> bool {
        !self.in_transaction && self.loose_messages == 0 && confirmed >= self.last_commit_end
    }
}

/// Aborts the ticker task when the reader stops.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// An open replication stream.
pub struct ReplicationReader {
    stream: LogicalReplicationStream,
    parser: LogicalReplicationParser,
    protocol_version: u32,
    relations: HashMap<u32, Arc<Relation>>,
    catalog: Arc<Client>,
    slot: String,
    spill: SpillDir,
    /// Streamed transactions not yet committed or aborted, by top-level xid.
    streamed: HashMap<u32, StreamedTxn>,
    /// Top-level xid of the chunk being received (between StreamStart and StreamStop).
    in_stream: Option<u32>,
    toast: ToastStage,
    status_interval: Duration,
    idle: IdleTracker,
    /// The run's cancellation, so a send blocked on a full channel gives way to a stop.
    stop: CancellationToken,
}

impl std::fmt::Debug for ReplicationReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationReader")
            .field("slot", &self.slot)
            .field("protocol_version", &self.protocol_version)
            .field("spill_dir", &self.spill.path())
            .field("streamed", &self.streamed.len())
            .finish_non_exhaustive()
    }
}

/// How the reader handles what does not fit in a plain stream of small transactions.
#[derive(Debug)]
pub struct ReaderOptions {
    /// Interval of standby status updates.
    pub status_interval: Duration,
    /// Spill directory, prepared (created, emptied) by the caller.
    pub spill: SpillDir,
    /// The `toastFetch` stage.
    pub toast: ToastStage,
}

impl ReplicationReader {
    /// Opens the replication connection and starts streaming from the slot's confirmed
    /// position. `catalog` is a normal connection used to look up primary keys.
    pub async fn start(
        conn: &PgConnection,
        slot: &str,
        publication: &str,
        catalog: Arc<Client>,
        options: ReaderOptions,
    ) -> Result<Self, SourceError> {
        Self::start_from(conn, slot, publication, catalog, options, None).await
    }

    /// Like [`ReplicationReader::start`], from `from` instead when it is set. PostgreSQL
    /// never goes back before the slot's `confirmed_flush_lsn` (it silently starts there),
    /// and skips transactions that committed before a later `from`; callers check `from`
    /// against the slot first.
    pub async fn start_from(
        conn: &PgConnection,
        slot: &str,
        publication: &str,
        catalog: Arc<Client>,
        options: ReaderOptions,
        from: Option<Lsn>,
    ) -> Result<Self, SourceError> {
        let server_version: i32 = catalog
            .query_one("SELECT current_setting('server_version_num')::int4", &[])
            .await
            .map_err(SourceError::query("reading the server version"))?
            .get(0);
        let (protocol_version, streaming) = if server_version >= 140_000 {
            (PROTOCOL_STREAMING, StreamingMode::On)
        } else {
            tracing::info!(
                server_version,
                "PostgreSQL before 14 cannot stream in-progress transactions; large transactions arrive whole at commit"
            );
            (PROTOCOL_WHOLE, StreamingMode::Off)
        };
        let config = ReplicationStreamConfig::new(
            slot.to_owned(),
            publication.to_owned(),
            protocol_version,
            streaming,
            options.status_interval,
            Duration::from_secs(30),
            Duration::from_secs(30),
            // Retries happen one level up (the worker restarts the stream from the slot).
            RetryConfig {
                max_attempts: 1,
                ..RetryConfig::default()
            },
        )
        .with_messages(true);
        let stream_err = |e: ReplicationError| SourceError::Stream {
            slot: slot.to_owned(),
            message: redact(&e.to_string()),
        };
        // The walsender prints values with its own settings; refuse ones the codec cannot read.
        conn.check_output_settings().await?;
        let mut stream = LogicalReplicationStream::new(&conn.replication_conninfo(), config)
            .await
            .map_err(stream_err)?;
        // Resume from the slot's confirmed_flush_lsn (unless asked to skip ahead): the
        // server ignores a start position below it, and everything before it was made
        // durable by an earlier run.
        stream.start(from.map(|l| l.0)).await.map_err(stream_err)?;
        Ok(Self {
            stream,
            parser: LogicalReplicationParser::with_protocol_version(protocol_version),
            protocol_version,
            relations: HashMap::new(),
            catalog,
            slot: slot.to_owned(),
            spill: options.spill,
            streamed: HashMap::new(),
            in_stream: None,
            toast: options.toast,
            status_interval: options.status_interval,
            idle: IdleTracker::default(),
            stop: CancellationToken::new(),
        })
    }

    /// The feedback cell: the pipeline advances it once destinations made data durable,
    /// and the stream reports it to PostgreSQL as the flush position.
    pub fn feedback(&self) -> Arc<SharedLsnFeedback> {
        self.stream.shared_lsn_feedback.clone()
    }

    /// Reads until `cancel` fires or the stream fails, sending events to `out`. Returns
    /// `Ok` on cancellation (or when the pipeline hung up).
    ///
    /// Every `tick` the reader wakes up (even when the database is idle) to send a standby
    /// status update with the position the pipeline confirmed in `confirmed`. When nothing
    /// it forwarded is still pending, it confirms the server's latest position (keepalive
    /// `wal_end`) instead, so WAL written by tables outside the publication is not retained
    /// by an idle slot.
    pub async fn run(
        &mut self,
        out: mpsc::Sender<SourceEvent>,
        cancel: &CancellationToken,
        confirmed: Arc<AtomicU64>,
        tick: Duration,
    ) -> Result<(), SourceError> {
        self.stop = cancel.clone();
        // Wake-ups interrupt a blocking read through a child token, which pg_walstream's
        // inline driver handles without losing buffered data. The threaded driver (used
        // off a multi-thread runtime) restarts its reader on cancellation, so there the
        // reader relies on the library's own keepalive replies.
        let multi_thread = matches!(
            tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()),
            Ok(tokio::runtime::RuntimeFlavor::MultiThread)
        );
        let wake = Arc::new(std::sync::Mutex::new(cancel.child_token()));
        let ticker = multi_thread.then(|| {
            let wake = wake.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(tick) => {}
                        _ = cancel.cancelled() => return,
                    }
                    wake.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .cancel();
                }
            })
        });
        let _abort = AbortOnDrop(ticker);
        // The ticker cancels the token in `wake`; this clone shares its state, so it is
        // refreshed only after a wake-up, not per message.
        let mut token = wake
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        loop {
            let raw = match self.stream.next_raw_event(&token).await {
                Ok(raw) => raw,
                Err(ReplicationError::Cancelled(_)) if cancel.is_cancelled() => return Ok(()),
                Err(ReplicationError::Cancelled(_)) => {
                    token = cancel.child_token();
                    *wake
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = token.clone();
                    self.on_tick(confirmed.load(Ordering::Acquire)).await;
                    continue;
                }
                Err(e) => {
                    return Err(SourceError::Stream {
                        slot: self.slot.clone(),
                        message: redact(&e.to_string()),
                    });
                }
            };
            // Inside a chunk every change starts with the xid of the (sub)transaction that
            // made it; the parser skips it, but a rolled-back savepoint is known only by it.
            let subxid = match (self.in_stream, raw.data.first()) {
                (Some(_), Some(b'I' | b'U' | b'D' | b'T' | b'M')) => raw
                    .data
                    .get(1..5)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(u32::from_be_bytes),
                _ => None,
            };
            let parsed =
                self.parser
                    .parse_wal_message_bytes(raw.data)
                    .map_err(|e| SourceError::Stream {
                        slot: self.slot.clone(),
                        message: e.to_string(),
                    })?;
            let lsn = Lsn(raw.wal_start.value());
            if !self
                .handle(parsed.message, subxid, lsn, &out, cancel)
                .await?
            {
                return Ok(());
            }
        }
    }

    /// A wake-up: report the confirmed position now rather than at the next reply-requested
    /// keepalive, and when nothing forwarded is pending, confirm the server's position.
    async fn on_tick(&mut self, confirmed: u64) {
        let feedback = self.stream.shared_lsn_feedback.clone();
        // A streamed transaction still open (spilled, not committed) is pending too.
        let streaming = self.in_stream.is_some() || !self.streamed.is_empty();
        if !streaming && self.idle.is_idle(confirmed) {
            // Safe: every transaction forwarded so far is durable, no transaction is open,
            // and anything committing at or below the server's last keepalive `wal_end`
            // was already on the wire before it (the walsender's FIFO), hence forwarded.
            let position = self.stream.current_lsn();
            feedback.update_flushed_lsn(position);
            feedback.update_applied_lsn(position);
        }
        if let Err(e) = self.stream.send_feedback().await {
            tracing::debug!(error = %e, "standby status update on wake-up");
        }
    }

    /// Sends a final standby status update with the confirmed position and closes. Spill
    /// files of transactions still in progress go with the reader.
    pub async fn stop(mut self) {
        if let Err(e) = self.stream.stop().await {
            tracing::warn!(error = %e, "closing the replication stream");
        }
    }

    /// Handles one message; `false` when the pipeline hung up or `cancel` fired mid-replay.
    async fn handle(
        &mut self,
        message: LogicalReplicationMessage,
        subxid: Option<u32>,
        lsn: Lsn,
        out: &mpsc::Sender<SourceEvent>,
        cancel: &CancellationToken,
    ) -> Result<bool, SourceError> {
        match message {
            LogicalReplicationMessage::StreamStart { xid, first_segment } => {
                self.in_stream = Some(xid);
                if first_segment {
                    let file = self.spill.create(xid)?;
                    tracing::debug!(xid, path = %file.path().display(), "streamed transaction: spilling");
                    let txn = StreamedTxn {
                        file,
                        relations: HashMap::new(),
                    };
                    if self.streamed.insert(xid, txn).is_some() {
                        tracing::warn!(
                            xid,
                            "streamed transaction started twice; starting its spill file over"
                        );
                    }
                } else if !self.streamed.contains_key(&xid) {
                    return Err(self.protocol(format!(
                        "a chunk of streamed transaction {xid} arrived without its first chunk"
                    )));
                }
                Ok(true)
            }
            LogicalReplicationMessage::StreamStop => {
                if let Some(txn) = self
                    .in_stream
                    .take()
                    .and_then(|x| self.streamed.get_mut(&x))
                {
                    txn.file.end_chunk()?;
                }
                Ok(true)
            }
            LogicalReplicationMessage::StreamAbort {
                xid,
                subtransaction_xid,
                ..
            } => {
                if subtransaction_xid == xid {
                    if let Some(txn) = self.streamed.remove(&xid) {
                        tracing::debug!(
                            xid,
                            entries = txn.file.entries(),
                            bytes = txn.file.bytes(),
                            "streamed transaction aborted: dropping its spill file"
                        );
                    }
                } else if let Some(txn) = self.streamed.get_mut(&xid) {
                    tracing::debug!(
                        xid,
                        subxid = subtransaction_xid,
                        "subtransaction of a streamed transaction rolled back"
                    );
                    txn.file.abort_subtransaction(subtransaction_xid);
                }
                Ok(true)
            }
            LogicalReplicationMessage::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                timestamp,
                ..
            } => {
                let commit_time = postgres_timestamp_to_chrono(timestamp);
                let begin = SourceEvent::Begin {
                    xid,
                    commit_lsn: Lsn(commit_lsn),
                    commit_time,
                };
                if !self.send(out, begin).await? {
                    return Ok(false);
                }
                if let Some(txn) = self.streamed.remove(&xid) {
                    let (entries, bytes) = (txn.file.entries(), txn.file.bytes());
                    tracing::debug!(
                        xid,
                        entries,
                        bytes,
                        "streamed transaction committed: replaying its spill file"
                    );
                    let mut replay = txn.file.replay()?;
                    let mut sent: u64 = 0;
                    let mut last_status = Instant::now();
                    while let Some(event) = replay.next_event()? {
                        if !self.send(out, event).await? {
                            return Ok(false);
                        }
                        sent += 1;
                        if !sent.is_multiple_of(CHECK_EVERY) {
                            continue;
                        }
                        if cancel.is_cancelled() {
                            // The transaction is incomplete downstream and never confirmed:
                            // the server sends it again after the restart.
                            return Ok(false);
                        }
                        // Nothing is read from the server while replaying at the
                        // destinations' pace; without a status update it would end the
                        // connection after wal_sender_timeout.
                        if last_status.elapsed() >= self.status_interval {
                            self.stream
                                .send_feedback()
                                .await
                                .map_err(|e| SourceError::Stream {
                                    slot: self.slot.clone(),
                                    message: redact(&e.to_string()),
                                })?;
                            last_status = Instant::now();
                        }
                    }
                } else {
                    tracing::debug!(
                        xid,
                        "streamed transaction committed with no change for this publication"
                    );
                }
                let commit = SourceEvent::Commit {
                    commit_lsn: Lsn(commit_lsn),
                    end_lsn: Lsn(end_lsn),
                    commit_time,
                };
                self.send(out, commit).await
            }
            LogicalReplicationMessage::Relation {
                relation_id,
                namespace,
                relation_name,
                columns,
                ..
            } => {
                let relation = self
                    .describe(relation_id, &namespace, &relation_name, &columns)
                    .await?;
                match self.in_stream.and_then(|x| self.streamed.get_mut(&x)) {
                    Some(txn) => txn.relations.insert(relation_id, relation),
                    None => self.relations.insert(relation_id, relation),
                };
                Ok(true)
            }
            other => {
                let events = self.decode(other, lsn)?;
                match self.in_stream {
                    Some(top) => {
                        let subxid = subxid.unwrap_or(top);
                        for event in events {
                            // A non-transactional message is not part of the transaction.
                            if let SourceEvent::Message {
                                transactional: false,
                                ..
                            } = event
                            {
                                if !self.send(out, event).await? {
                                    return Ok(false);
                                }
                                continue;
                            }
                            let txn = self.streamed.get_mut(&top).ok_or_else(|| {
                                SourceError::Stream {
                                    slot: self.slot.clone(),
                                    message: format!(
                                        "change of streamed transaction {top} outside its chunks"
                                    ),
                                }
                            })?;
                            txn.file.append(subxid, &event)?;
                        }
                    }
                    None => {
                        for event in events {
                            if !self.send(out, event).await? {
                                return Ok(false);
                            }
                        }
                    }
                }
                Ok(true)
            }
        }
    }

    /// Sends one event, rows through the `toastFetch` stage; `false` if the pipeline is gone.
    async fn send(
        &mut self,
        out: &mpsc::Sender<SourceEvent>,
        mut event: SourceEvent,
    ) -> Result<bool, SourceError> {
        if let SourceEvent::Row(change) = &mut event {
            self.toast.apply(change).await?;
        }
        self.idle.forwarded(&event);
        // A stop must not wait for a pipeline that no longer drains the channel (a
        // destination hung with the memory budget spent): what was not sent is not
        // confirmed and comes again after the restart.
        let event = match out.try_send(event) {
            Ok(()) => return Ok(true),
            Err(mpsc::error::TrySendError::Closed(_)) => return Ok(false),
            Err(mpsc::error::TrySendError::Full(event)) => event,
        };
        // The pipeline is not taking more (a slow destination, or a DDL gate holding the
        // stream for hours): keep answering the server, or it ends the connection after
        // wal_sender_timeout.
        let stop = self.stop.clone();
        loop {
            tokio::select! {
                permit = out.reserve() => {
                    return Ok(match permit {
                        Ok(permit) => {
                            permit.send(event);
                            true
                        }
                        Err(_) => false,
                    });
                }
                _ = stop.cancelled() => return Ok(false),
                _ = tokio::time::sleep(self.status_interval) => {
                    if let Err(e) = self.stream.send_feedback().await {
                        tracing::debug!(error = %e, "standby status update while the pipeline is full");
                    }
                }
            }
        }
    }

    fn protocol(&self, message: String) -> SourceError {
        SourceError::Stream {
            slot: self.slot.clone(),
            message,
        }
    }

    async fn describe(
        &self,
        relation_id: u32,
        namespace: &str,
        relation_name: &str,
        columns: &[pg_walstream::ColumnInfo],
    ) -> Result<Arc<Relation>, SourceError> {
        let key_flags: Vec<usize> = columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key())
            .map(|(i, _)| i)
            .collect();
        let columns: Vec<Column> = columns
            .iter()
            .map(|c| Column {
                name: c.name.to_string(),
                type_oid: c.type_id,
                type_modifier: c.type_modifier,
            })
            .collect();
        let pk = self.primary_key(relation_id).await?;
        let key = if pk.is_empty() {
            key_flags.clone()
        } else {
            pk.iter()
                .filter_map(|name| columns.iter().position(|c| &c.name == name))
                .collect()
        };
        Ok(Arc::new(Relation {
            id: relation_id,
            schema: namespace.to_owned(),
            table: relation_name.to_owned(),
            columns,
            key,
            identity: key_flags,
        }))
    }

    /// Begin, Commit, row changes and messages; everything else yields nothing.
    fn decode(&self, message: LogicalReplicationMessage, lsn: Lsn) -> Result<Decoded, SourceError> {
        let event = match message {
            LogicalReplicationMessage::Begin {
                final_lsn,
                timestamp,
                xid,
            } => SourceEvent::Begin {
                xid,
                commit_lsn: Lsn(final_lsn),
                commit_time: postgres_timestamp_to_chrono(timestamp),
            },
            LogicalReplicationMessage::Commit {
                commit_lsn,
                end_lsn,
                timestamp,
                ..
            } => SourceEvent::Commit {
                commit_lsn: Lsn(commit_lsn),
                end_lsn: Lsn(end_lsn),
                commit_time: postgres_timestamp_to_chrono(timestamp),
            },
            LogicalReplicationMessage::Insert { relation_id, tuple } => {
                let relation = self.relation(relation_id)?;
                SourceEvent::Row(RowChange {
                    lsn,
                    relation,
                    op: Op::Insert,
                    before: None,
                    before_is_identity: false,
                    after: Some(cells(&tuple)),
                })
            }
            LogicalReplicationMessage::Update {
                relation_id,
                old_tuple,
                new_tuple,
                key_type,
            } => {
                let relation = self.relation(relation_id)?;
                SourceEvent::Row(RowChange {
                    lsn,
                    relation,
                    op: Op::Update,
                    before: old_tuple.as_ref().map(cells),
                    before_is_identity: key_type == Some('K'),
                    after: Some(cells(&new_tuple)),
                })
            }
            LogicalReplicationMessage::Delete {
                relation_id,
                old_tuple,
                key_type,
            } => {
                let relation = self.relation(relation_id)?;
                SourceEvent::Row(RowChange {
                    lsn,
                    relation,
                    op: Op::Delete,
                    before: Some(cells(&old_tuple)),
                    before_is_identity: key_type == 'K',
                    after: None,
                })
            }
            LogicalReplicationMessage::Truncate { relation_ids, .. } => {
                let events = relation_ids
                    .iter()
                    .map(|id| {
                        Ok(SourceEvent::Row(RowChange {
                            lsn,
                            relation: self.relation(*id)?,
                            op: Op::Truncate,
                            before: None,
                            before_is_identity: false,
                            after: None,
                        }))
                    })
                    .collect::<Result<Vec<_>, SourceError>>()?;
                return Ok(None.into_iter().chain(events));
            }
            LogicalReplicationMessage::Message {
                flags,
                lsn,
                prefix,
                content,
            } => SourceEvent::Message {
                transactional: flags & 1 == 1,
                lsn: Lsn(lsn),
                prefix,
                content,
            },
            // Type and Origin carry nothing the records need; two-phase messages are not
            // requested.
            _ => return Ok(None.into_iter().chain(Vec::new())),
        };
        Ok(Some(event).into_iter().chain(Vec::new()))
    }

    /// The relation as described to the transaction being decoded: inside a chunk, the
    /// description sent in that streamed transaction, else the last one outside streams.
    fn relation(&self, id: u32) -> Result<Arc<Relation>, SourceError> {
        self.in_stream
            .and_then(|x| self.streamed.get(&x))
            .and_then(|t| t.relations.get(&id))
            .or_else(|| self.relations.get(&id))
            .cloned()
            .ok_or_else(|| {
                self.protocol(format!(
                    "change for relation {id} arrived before its Relation message"
                ))
            })
    }

    async fn primary_key(&self, relation_id: u32) -> Result<Vec<String>, SourceError> {
        let rows = self
            .catalog
            .query(
                "SELECT a.attname::text
                 FROM pg_index i
                 JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = $1::oid AND i.indisprimary
                 ORDER BY k.ord",
                &[&relation_id],
            )
            .await
            .map_err(SourceError::query(format!(
                "reading the primary key of relation {relation_id}"
            )))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

/// What one pgoutput message decodes to: one event, or several (a TRUNCATE of many
/// tables) — without a heap allocation for the common single event.
type Decoded =
    std::iter::Chain<std::option::IntoIter<SourceEvent>, std::vec::IntoIter<SourceEvent>>;

/// The tuple's values, copied out of the message (events wait in a 4096-deep channel and in
/// spill files; slices of the network buffer would pin it) into one buffer per tuple that
/// the cells share.
fn cells(tuple: &TupleData) -> Vec<Cell> {
    let has_text = |c: &&ColumnData| !c.is_null() && !c.is_unchanged();
    let total = tuple
        .columns
        .iter()
        .filter(has_text)
        .map(|c| c.as_bytes().len())
        .sum();
    let mut values = Vec::with_capacity(total);
    for c in tuple.columns.iter().filter(has_text) {
        values.extend_from_slice(c.as_bytes());
    }
    let values = bytes::Bytes::from(values);
    let mut at = 0;
    tuple
        .columns
        .iter()
        .map(|c| {
            if c.is_null() {
                Cell::Null
            } else if c.is_unchanged() {
                Cell::UnchangedToast
            } else {
                let end = at + c.as_bytes().len();
                let cell = Cell::Text(values.slice(at..end));
                at = end;
                cell
            }
        })
        .collect()
}

/// Error texts from the replication connection can echo the connection string; keep the
/// password out of logs and status.
fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("password=") {
        out.push_str(&rest[..i + "password=".len()]);
        out.push_str("***");
        rest = &rest[i + "password=".len()..];
        let end = if let Some(quoted) = rest.strip_prefix('\'') {
            quoted.find('\'').map(|j| j + 2).unwrap_or(rest.len())
        } else {
            rest.find(char::is_whitespace).unwrap_or(rest.len())
        };
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_passwords() {
        assert_eq!(
            super::redact("failed: host='h' password='p w' user=u password=x y"),
            "failed: host='h' password=*** user=u password=*** y"
        );
    }
}
