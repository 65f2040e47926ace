//! The `DDLApproval` resource: a captured schema change waiting for (or carrying) a human
//! decision. Created by the worker; only `spec.decision` is edited by people.

use kube::CustomResource;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Conditions, conditions_list_map, named_list_map};

/// A schema change captured on a gated Flow.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "wallaby.dev",
    version = "v1alpha1",
    kind = "DDLApproval",
    plural = "ddlapprovals",
    singular = "ddlapproval",
    namespaced,
    status = "DDLApprovalStatus",
    shortname = "ddl",
    category = "wallaby",
    doc = "A DDLApproval holds one DDL statement captured on a gated Flow; set spec.decision to Approved or Rejected.",
    printcolumn(name = "Flow", type_ = "string", json_path = ".spec.flow"),
    printcolumn(name = "LSN", type_ = "string", json_path = ".spec.lsn"),
    printcolumn(name = "Decision", type_ = "string", json_path = ".spec.decision"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("self.flow == oldSelf.flow && self.lsn == oldSelf.lsn && self.statement == oldSelf.statement && self.tables == oldSelf.tables && self.plan == oldSelf.plan").message("only spec.decision may change"),
    validation = Rule::new("oldSelf.decision == 'Pending' || self.decision == oldSelf.decision").message("a decision is final: create a new approval by replaying the flow instead"),
)]
#[serde(rename_all = "camelCase")]
pub struct DDLApprovalSpec {
    /// Name of the Flow (same namespace) that captured the statement.
    #[schemars(length(min = 1, max = 253))]
    pub flow: String,
    /// LSN of the logical message carrying the statement; the flow stops just before it.
    #[schemars(regex(pattern = r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$"))]
    pub lsn: String,
    /// The DDL statement as executed.
    #[schemars(length(min = 1, max = 65536))]
    pub statement: String,
    /// Tables the statement affects, as `schema.table`.
    #[serde(default)]
    #[schemars(length(max = 256), inner(length(max = 127)))]
    pub tables: Vec<String>,
    /// What each destination would do to apply it.
    #[serde(default)]
    #[schemars(length(max = 16), transform = named_list_map)]
    pub plan: Vec<DestinationPlan>,
    /// The decision: `Pending` until a human sets `Approved` or `Rejected`.
    #[serde(default)]
    pub decision: Decision,
}

/// A human decision on a gated DDL statement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Decision {
    /// Not decided yet.
    #[default]
    Pending,
    /// Apply the change and resume the flow.
    Approved,
    /// Stop the flow; the slot is held.
    Rejected,
}

/// The plan of one destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DestinationPlan {
    /// Destination name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Actions, e.g. `ALTER TABLE … ADD COLUMN …` or `new schema version 3`.
    #[serde(default)]
    #[schemars(length(max = 256), inner(length(max = 4096)))]
    pub actions: Vec<String>,
}

/// Lifecycle state of an approval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ApprovalState {
    /// Waiting for a decision.
    Pending,
    /// Approved, not applied yet.
    Approved,
    /// Applied to every destination; the flow resumed.
    Applied,
    /// Rejected; the flow is stopped.
    Rejected,
    /// Applying failed on at least one destination.
    Failed,
}

/// Observed state of a DDLApproval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DDLApprovalStatus {
    /// Lifecycle state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ApprovalState>,
    /// Result per destination.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(transform = named_list_map)]
    pub destinations: Vec<DestinationResult>,
    /// When the decision was observed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_time: Option<String>,
    /// When the change was applied (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_time: Option<String>,
    /// Human-readable summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(transform = conditions_list_map)]
    pub conditions: Conditions,
}

/// Result of applying on one destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DestinationResult {
    /// Destination name.
    pub name: String,
    /// `Applied`, `Skipped` or `Failed`.
    pub state: String,
    /// Detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
