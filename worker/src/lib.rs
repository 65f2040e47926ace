//! `wallaby-worker`: the worker binary's library. It resolves a Flow (from a manifest file
//! or the Kubernetes API), wires source, DDL gate, pipeline and destinations into a run or
//! a backfill, and reports status, metrics and traces. The data plane lives in the crates
//! it depends on: `wallaby-source`, `wallaby-ddl`, `wallaby-pipeline`, `wallaby-destinations`.

pub mod backfill;
pub mod cluster;
pub mod ddl_admin;
pub mod metrics;
pub mod progress;
pub mod run;
pub mod standalone;
pub mod status;
pub mod telemetry;
