//! Destinations. This version delivers the `file` destination; the other types of the
//! Destination CRD are rejected at start-up with a precise message.

pub mod file;
