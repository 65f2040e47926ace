//! Pure checks that span objects or that the CRD schema cannot express. The operator runs
//! them before building workloads; the standalone worker runs them before connecting.

use crate::destination::DestinationSpec;
use crate::flow::{AckPolicy, FlowMode, FlowSpec};
use crate::{Destination, Flow};

/// One problem, phrased as what is wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `Flow/demo`, `Destination/files`, …
    pub object: String,
    /// Dotted path of the offending field.
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.object, self.field, self.message)
    }
}

/// Checks a Destination on its own.
pub fn destination(name: &str, spec: &DestinationSpec) -> Vec<Problem> {
    let object = format!("Destination/{name}");
    let mut problems = Vec::new();
    let mut push = |field: &str, message: String| {
        problems.push(Problem {
            object: object.clone(),
            field: field.into(),
            message,
        })
    };
    let want = spec.kind.as_str();
    let blocks = spec.typed_blocks();
    if blocks != [want] {
        push(
            "spec",
            format!(
                "type is {want:?} but the typed blocks set are {blocks:?}: set exactly one block, spec.{want}"
            ),
        );
    }
    if let Some(Err(e)) = spec.file.as_ref().map(|f| f.rotate_interval.parse()) {
        push("spec.file.rotateInterval", e);
    }
    if let Some(meta) = &spec.meta_columns {
        let names = [
            ("syncedAt", &meta.synced_at),
            ("deleted", &meta.deleted),
            ("watermark", &meta.watermark),
            ("op", &meta.op),
        ];
        for (i, (field, name)) in names.iter().enumerate() {
            if name.trim().is_empty() {
                push(
                    &format!("spec.metaColumns.{field}"),
                    "must name a column (or be \"-\" for watermark, to drop it)".into(),
                );
            } else if name.as_str() == "-" && *field != "watermark" {
                push(
                    &format!("spec.metaColumns.{field}"),
                    "only watermark can be disabled with \"-\"".into(),
                );
            } else if let Some((other, _)) = names[..i]
                .iter()
                .find(|(_, n)| n == name && n.as_str() != "-")
            {
                push(
                    &format!("spec.metaColumns.{field}"),
                    format!(
                        "{name:?} is also the name of metaColumns.{other}: each metadata column needs its own name"
                    ),
                );
            }
        }
    }
    for (field, retry) in [
        ("spec.http.retry", spec.http.as_ref().map(|h| &h.retry)),
        ("spec.grpc.retry", spec.grpc.as_ref().map(|g| &g.retry)),
    ] {
        if let Some(retry) = retry {
            for (sub, d) in [
                ("backoffBase", &retry.backoff_base),
                ("backoffMax", &retry.backoff_max),
            ] {
                if let Err(e) = d.parse() {
                    push(&format!("{field}.{sub}"), e);
                }
            }
        }
    }
    problems
}

/// Checks a Flow against the Destinations it can see (same namespace).
pub fn flow<'a>(
    flow: &Flow,
    destinations: impl Fn(&str) -> Option<&'a Destination>,
) -> Vec<Problem> {
    let name = flow.metadata.name.as_deref().unwrap_or("<unnamed>");
    let object = format!("Flow/{name}");
    let spec: &FlowSpec = &flow.spec;
    let mut problems = Vec::new();
    let mut push = |field: &str, message: String| {
        problems.push(Problem {
            object: object.clone(),
            field: field.into(),
            message,
        })
    };
    let pg = &spec.source.postgres;
    if pg.dsn.is_none() && pg.secret_ref.is_none() {
        push(
            "spec.source.postgres",
            "no connection: set dsn (without password) and/or secretRef (a Secret with key `dsn`, or `host`/`user`/`password`)".into(),
        );
    }
    for (field, d) in [
        ("spec.source.postgres.batchTimeout", &pg.batch_timeout),
        ("spec.source.postgres.statusInterval", &pg.status_interval),
    ] {
        if let Err(e) = d.parse() {
            push(field, e);
        }
    }
    if spec.destinations.is_empty() {
        push(
            "spec.destinations",
            "at least one destination is required".into(),
        );
    }
    for (i, d) in spec.destinations.iter().enumerate() {
        if spec.destinations[..i].iter().any(|o| o.name == d.name) {
            push(
                &format!("spec.destinations[{i}]"),
                format!("destination {:?} is listed twice", d.name),
            );
        }
        if destinations(&d.name).is_none() {
            push(
                &format!("spec.destinations[{i}].name"),
                format!(
                    "Destination {:?} does not exist in this namespace: create it (kind: Destination, metadata.name: {}) or fix the reference",
                    d.name, d.name
                ),
            );
        }
    }
    match (spec.ack_policy, &spec.primary_destination) {
        (AckPolicy::Primary, None) => push(
            "spec.primaryDestination",
            "required when ackPolicy is primary".into(),
        ),
        (_, Some(p)) if !spec.destinations.iter().any(|d| &d.name == p) => push(
            "spec.primaryDestination",
            format!("{p:?} is not one of spec.destinations"),
        ),
        _ => {}
    }
    match (spec.mode, &spec.schedule) {
        (FlowMode::Scheduled, None) => {
            push("spec.schedule", "required when mode is scheduled".into())
        }
        (FlowMode::Stream | FlowMode::Backfill, Some(_)) => {
            push("spec.schedule", "only valid with mode: scheduled".into())
        }
        _ => {}
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest;

    fn bundle(text: &str) -> manifest::Bundle {
        manifest::parse("t.yaml", text).unwrap()
    }

    #[test]
    fn missing_destination_is_named_with_the_fix() {
        let b = bundle(
            "apiVersion: wallaby.dev/v1alpha1\nkind: Flow\nmetadata: {name: f}\nspec: {source: {postgres: {dsn: 'postgres://a@h/d', slot: s, publication: p}}, destinations: [{name: nowhere}]}\n",
        );
        let problems = flow(&b.flows[0], |n| b.destinations.get(n));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "spec.destinations[0].name");
        assert!(problems[0].message.contains("\"nowhere\" does not exist"));
    }

    #[test]
    fn destination_block_must_match_type() {
        let b = bundle(
            "apiVersion: wallaby.dev/v1alpha1\nkind: Destination\nmetadata: {name: d}\nspec: {type: file, file: {path: /x}}\n",
        );
        let d = &b.destinations["d"];
        assert!(destination("d", &d.spec).is_empty());
        let mut wrong = d.spec.clone();
        wrong.kind = crate::DestinationType::Kafka;
        let problems = destination("d", &wrong);
        assert!(
            problems[0]
                .message
                .contains("set exactly one block, spec.kafka"),
            "{problems:?}"
        );
    }

    #[test]
    fn metadata_columns_need_distinct_names() {
        let b = bundle(
            "apiVersion: wallaby.dev/v1alpha1\nkind: Destination\nmetadata: {name: d}\nspec: {type: file, file: {path: /x}, metaColumns: {enabled: true, op: __ds_is_deleted, syncedAt: '-', watermark: '-'}}\n",
        );
        let problems = destination("d", &b.destinations["d"].spec);
        let got: Vec<(&str, &str)> = problems
            .iter()
            .map(|p| (p.field.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "spec.metaColumns.syncedAt",
                    "only watermark can be disabled with \"-\""
                ),
                (
                    "spec.metaColumns.op",
                    "\"__ds_is_deleted\" is also the name of metaColumns.deleted: each metadata column needs its own name"
                ),
            ]
        );
    }
}
