//! `wallaby-pipeline`: the contract between the source and the destinations. It owns the
//! change model ([`change`], [`batch`]), the [`Destination`](destination::Destination) trait
//! with its error classes, and the runner that batches, fans out, retries, spools and
//! confirms to the slot only what every required destination made durable ([`runner`]).

pub mod ack;
pub mod batch;
pub mod change;
pub mod destination;
pub mod encoding;
pub mod error;
pub mod lsn;
pub mod metrics;
pub mod retry;
pub mod runner;
pub mod spool;
