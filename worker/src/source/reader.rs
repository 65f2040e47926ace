//! The replication stream: pg_walstream carries the walsender's CopyData (keepalives and
//! standby status updates included) and parses pgoutput; this module turns the parsed
//! messages into [`SourceEvent`]s, resolving each table's primary key on the SQL
//! connection so records are keyed by it even under `REPLICA IDENTITY FULL`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pg_walstream::{
    CancellationToken, ColumnData, LogicalReplicationMessage, LogicalReplicationParser,
    LogicalReplicationStream, ReplicationError, ReplicationStreamConfig, RetryConfig,
    SharedLsnFeedback, StreamingMode, TupleData, postgres_timestamp_to_chrono,
};
use tokio::sync::mpsc;
use tokio_postgres::Client;

use super::{PgConnection, SourceError};
use crate::change::{Cell, Column, Op, Relation, RowChange, SourceEvent};
use crate::lsn::Lsn;

/// pgoutput protocol version 1: whole transactions in commit order.
const PROTOCOL_VERSION: u32 = 1;

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
    relations: HashMap<u32, Arc<Relation>>,
    catalog: Arc<Client>,
    slot: String,
}

impl std::fmt::Debug for ReplicationReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationReader")
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl ReplicationReader {
    /// Opens the replication connection and starts streaming from the slot's confirmed
    /// position. `catalog` is a normal connection used to look up primary keys.
    pub async fn start(
        conn: &PgConnection,
        slot: &str,
        publication: &str,
        status_interval: Duration,
        catalog: Arc<Client>,
    ) -> Result<Self, SourceError> {
        let config = ReplicationStreamConfig::new(
            slot.to_owned(),
            publication.to_owned(),
            PROTOCOL_VERSION,
            StreamingMode::Off,
            status_interval,
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
        // Resume from the slot's confirmed_flush_lsn: the server ignores a start position
        // below it, and everything before it was made durable by an earlier run.
        stream.start(None).await.map_err(stream_err)?;
        Ok(Self {
            stream,
            parser: LogicalReplicationParser::with_protocol_version(PROTOCOL_VERSION),
            relations: HashMap::new(),
            catalog,
            slot: slot.to_owned(),
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
        let mut idle = IdleTracker::default();
        loop {
            let token = wake
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let raw = match self.stream.next_raw_event(&token).await {
                Ok(raw) => raw,
                Err(ReplicationError::Cancelled(_)) if cancel.is_cancelled() => return Ok(()),
                Err(ReplicationError::Cancelled(_)) => {
                    *wake
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = cancel.child_token();
                    self.on_tick(&idle, confirmed.load(Ordering::Acquire)).await;
                    continue;
                }
                Err(e) => {
                    return Err(SourceError::Stream {
                        slot: self.slot.clone(),
                        message: redact(&e.to_string()),
                    });
                }
            };
            let parsed =
                self.parser
                    .parse_wal_message_bytes(raw.data)
                    .map_err(|e| SourceError::Stream {
                        slot: self.slot.clone(),
                        message: e.to_string(),
                    })?;
            for event in self
                .decode(parsed.message, Lsn(raw.wal_start.value()))
                .await?
            {
                idle.forwarded(&event);
                if out.send(event).await.is_err() {
                    return Ok(());
                }
            }
        }
    }

    /// A wake-up: report the confirmed position now rather than at the next reply-requested
    /// keepalive, and when nothing forwarded is pending, confirm the server's position.
    async fn on_tick(&mut self, idle: &IdleTracker, confirmed: u64) {
        let feedback = self.stream.shared_lsn_feedback.clone();
        if idle.is_idle(confirmed) {
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

    /// Sends a final standby status update with the confirmed position and closes.
    pub async fn stop(mut self) {
        if let Err(e) = self.stream.stop().await {
            tracing::warn!(error = %e, "closing the replication stream");
        }
    }

    async fn decode(
        &mut self,
        message: LogicalReplicationMessage,
        lsn: Lsn,
    ) -> Result<Vec<SourceEvent>, SourceError> {
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
            LogicalReplicationMessage::Relation {
                relation_id,
                namespace,
                relation_name,
                columns,
                ..
            } => {
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
                let relation = Relation {
                    id: relation_id,
                    schema: namespace.to_string(),
                    table: relation_name.to_string(),
                    columns,
                    key,
                    identity: key_flags,
                };
                self.relations.insert(relation_id, Arc::new(relation));
                return Ok(Vec::new());
            }
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
                return relation_ids
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
                    .collect();
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
            // Type and Origin carry nothing the records need; streaming and two-phase
            // messages are not requested (protocol version 1).
            _ => return Ok(Vec::new()),
        };
        Ok(vec![event])
    }

    fn relation(&self, id: u32) -> Result<Arc<Relation>, SourceError> {
        self.relations
            .get(&id)
            .cloned()
            .ok_or_else(|| SourceError::Stream {
                slot: self.slot.clone(),
                message: format!("change for relation {id} arrived before its Relation message"),
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

fn cells(tuple: &TupleData) -> Vec<Cell> {
    tuple.columns.iter().map(cell).collect()
}

fn cell(c: &ColumnData) -> Cell {
    if c.is_null() {
        Cell::Null
    } else if c.is_unchanged() {
        Cell::UnchangedToast
    } else {
        Cell::Text(bytes::Bytes::copy_from_slice(c.as_bytes()))
    }
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
