//! The destination contract: a destination receives [`ChangeBatch`]es in order and says,
//! for each, whether it is merely *accepted* (buffered, lost if the process dies) or
//! already *durable*; `flush` makes everything accepted durable. The ack tracker only ever
//! confirms durable positions to the slot. Errors carry a retry class and a hint.

use std::fmt;

use async_trait::async_trait;

use crate::batch::ChangeBatch;
pub use crate::encoding::{PayloadEncoding, TypeOverrides};
pub use crate::error::{DestinationError, ErrorClass};

/// What a successful write guarantees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteAck {
    /// Buffered by the destination: durable only after [`Destination::flush`].
    Accepted,
    /// Durable now (e.g. a Kafka produce with `acks=all` that completed).
    Durable,
}

/// A sink. Batches arrive in order; a destination never sees batch `n+1` before it
/// returned from batch `n`.
#[async_trait]
pub trait Destination: Send + fmt::Debug {
    /// Writes one batch.
    async fn write(&mut self, batch: &ChangeBatch) -> Result<WriteAck, DestinationError>;

    /// Makes every accepted batch durable.
    async fn flush(&mut self) -> Result<(), DestinationError>;

    /// How this destination encodes a table group when it writes the group's rows as
    /// whole payloads (a JSON-lines run, one file or object per group). When every
    /// destination of a flow has one, a snapshot's copy workers encode the rows they
    /// read themselves, in parallel, and batches carry the payloads
    /// ([`TableChanges::encoded`](crate::batch::TableChanges::encoded)) instead of the
    /// rows. `None` (the default): the destination needs the rows.
    fn payload_encoding(&self) -> Option<PayloadEncoding> {
        None
    }
}
