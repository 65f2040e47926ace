//! WALlaby worker: streams PostgreSQL logical replication (`pgoutput`) to destinations,
//! confirming to the slot only what every destination made durable.

pub mod ack;
pub mod backfill;
pub mod batch;
pub mod change;
pub mod cluster;
pub mod ddl;
pub mod destination;
pub mod lsn;
pub mod metrics;
pub mod pipeline;
pub mod retry;
pub mod run;
pub mod snapshot;
pub mod source;
pub mod spool;
pub mod standalone;
pub mod status;
pub mod telemetry;
