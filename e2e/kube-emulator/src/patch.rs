//! The patch flavours the API server accepts: JSON merge patch (RFC 7386), JSON patch
//! (RFC 6902, with Go json-patch's "null test on a missing path succeeds"), strategic merge
//! patch for built-in kinds, and server-side apply with lite field ownership per manager.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

/// A field path in managed-fields terms: `f:<name>` for a map key, `k:{…}` for a list-map entry.
pub type FieldPath = Vec<String>;

/// Field ownership of one object: manager name → the leaf fields it owns.
pub type Managers = BTreeMap<String, BTreeSet<FieldPath>>;

/// List-map keys of built-in kinds (their strategic-merge `patchMergeKey`s), by field name.
fn builtin_list_keys(field: &str) -> Option<Vec<String>> {
    let key = match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets" => "name",
        "ports" => "containerPort",
        "volumeMounts" | "volumeDevices" => "mountPath",
        "conditions" => "type",
        "ownerReferences" => "uid",
        "hostAliases" => "ip",
        _ => return None,
    };
    Some(vec![key.to_owned()])
}

/// The list-map keys of the array at `field`: from the CRD schema node when there is a schema,
/// from the built-in table otherwise.
fn list_keys(schema: Option<&Value>, field: &str) -> Option<Vec<String>> {
    match schema {
        Some(s) => {
            if s.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
                s.get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)
                    .map(|k| {
                        k.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect()
                    })
            } else {
                None
            }
        }
        None => builtin_list_keys(field),
    }
}

fn child_schema<'a>(schema: Option<&'a Value>, key: &str) -> Option<&'a Value> {
    let s = schema?;
    s.get("properties")
        .and_then(|p| p.get(key))
        .or_else(|| s.get("additionalProperties").filter(|a| a.is_object()))
}

fn item_schema(schema: Option<&Value>) -> Option<&Value> {
    schema?.get("items")
}

fn key_of(item: &Value, keys: &[String]) -> Value {
    let mut m = Map::new();
    for k in keys {
        m.insert(k.clone(), item.get(k).cloned().unwrap_or(Value::Null));
    }
    Value::Object(m)
}

fn matches_key(item: &Value, key: &Value) -> bool {
    key.as_object().is_some_and(|m| {
        m.iter()
            .all(|(k, v)| item.get(k).unwrap_or(&Value::Null) == v)
    })
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in patch_map {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Why a JSON patch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum JsonPatchError {
    #[error("the JSON patch is not a list of operations: {0}")]
    Malformed(String),
    #[error("JSON patch op {op} on {path}: the path does not exist")]
    Missing { op: String, path: String },
    #[error("JSON patch test on {path} failed: found {found}, expected {expected}")]
    TestFailed {
        path: String,
        found: String,
        expected: String,
    },
}

fn pointer_tokens(path: &str) -> Vec<String> {
    if path.is_empty() {
        return Vec::new();
    }
    path.trim_start_matches('/')
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

fn parent_mut<'a>(doc: &'a mut Value, tokens: &[String]) -> Option<&'a mut Value> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m.get_mut(t)?,
            Value::Array(a) => a.get_mut(t.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn add_at(doc: &mut Value, path: &str, value: Value, op: &str) -> Result<(), JsonPatchError> {
    let tokens = pointer_tokens(path);
    let Some((last, parents)) = tokens.split_last() else {
        *doc = value;
        return Ok(());
    };
    let missing = || JsonPatchError::Missing {
        op: op.to_owned(),
        path: path.to_owned(),
    };
    match parent_mut(doc, parents).ok_or_else(missing)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(value);
            } else {
                let i = last
                    .parse::<usize>()
                    .ok()
                    .filter(|i| *i <= a.len())
                    .ok_or_else(missing)?;
                a.insert(i, value);
            }
        }
        _ => return Err(missing()),
    }
    Ok(())
}

fn remove_at(doc: &mut Value, path: &str, op: &str) -> Result<Value, JsonPatchError> {
    let tokens = pointer_tokens(path);
    let missing = || JsonPatchError::Missing {
        op: op.to_owned(),
        path: path.to_owned(),
    };
    let (last, parents) = tokens.split_last().ok_or_else(missing)?;
    match parent_mut(doc, parents).ok_or_else(missing)? {
        Value::Object(m) => m.remove(last).ok_or_else(missing),
        Value::Array(a) => {
            let i = last
                .parse::<usize>()
                .ok()
                .filter(|i| *i < a.len())
                .ok_or_else(missing)?;
            Ok(a.remove(i))
        }
        _ => Err(missing()),
    }
}

/// RFC 6902 JSON patch.
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), JsonPatchError> {
    let ops = ops
        .as_array()
        .ok_or_else(|| JsonPatchError::Malformed(ops.to_string()))?;
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or_default();
        let path = op.get("path").and_then(Value::as_str).unwrap_or_default();
        let value = op.get("value").cloned().unwrap_or(Value::Null);
        match kind {
            "add" => add_at(doc, path, value, kind)?,
            "remove" => {
                remove_at(doc, path, kind)?;
            }
            "replace" => {
                remove_at(doc, path, kind)?;
                add_at(doc, path, value, kind)?;
            }
            "test" => {
                let found = doc.pointer(path).cloned().unwrap_or(Value::Null);
                if found != value {
                    return Err(JsonPatchError::TestFailed {
                        path: path.to_owned(),
                        found: found.to_string(),
                        expected: value.to_string(),
                    });
                }
            }
            "move" | "copy" => {
                let from = op.get("from").and_then(Value::as_str).unwrap_or_default();
                let v = if kind == "move" {
                    remove_at(doc, from, kind)?
                } else {
                    doc.pointer(from)
                        .cloned()
                        .ok_or_else(|| JsonPatchError::Missing {
                            op: kind.to_owned(),
                            path: from.to_owned(),
                        })?
                };
                add_at(doc, path, v, kind)?;
            }
            other => return Err(JsonPatchError::Malformed(format!("unknown op {other:?}"))),
        }
    }
    Ok(())
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

/// Strategic merge patch for built-in kinds: list-maps merge by their merge key, `null` and
/// `$patch: delete` remove, `$patch: replace`, `$retainKeys`, `$deleteFromPrimitiveList/…` and
/// `$setElementOrder/…` are honoured.
pub fn strategic_merge(target: &mut Value, patch: &Value) {
    let Value::Object(pm) = patch else {
        *target = strip_directives(patch);
        return;
    };
    if pm.get("$patch").and_then(Value::as_str) == Some("replace") {
        *target = strip_directives(patch);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    let mut orders = Vec::new();
    for (k, pv) in pm {
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            orders.push((field.to_owned(), pv.clone()));
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(del)) = (t.get_mut(field), pv.as_array()) {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        if pv.is_null() || pv.get("$patch").and_then(Value::as_str) == Some("delete") {
            t.remove(k);
            continue;
        }
        let keys = builtin_list_keys(k);
        match (t.get_mut(k), pv, keys) {
            (Some(Value::Array(list)), Value::Array(items), Some(keys)) => {
                for item in items {
                    let key = key_of(item, &keys);
                    let pos = list.iter().position(|x| matches_key(x, &key));
                    let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                    match (pos, delete) {
                        (Some(i), true) => {
                            list.remove(i);
                        }
                        (None, true) => {}
                        (Some(i), false) => strategic_merge(&mut list[i], item),
                        (None, false) => list.push(strip_directives(item)),
                    }
                }
            }
            (Some(existing @ Value::Object(_)), Value::Object(_), _) => {
                strategic_merge(existing, pv)
            }
            _ => {
                t.insert(k.clone(), strip_directives(pv));
            }
        }
    }
    for (field, order) in orders {
        let (Some(Value::Array(list)), Some(order)) = (t.get_mut(&field), order.as_array()) else {
            continue;
        };
        let keys = builtin_list_keys(&field);
        let pos_of = |x: &Value| {
            order.iter().position(|o| match &keys {
                Some(keys) => matches_key(x, &key_of(o, keys)),
                None => o == x,
            })
        };
        list.sort_by_key(|x| pos_of(x).unwrap_or(usize::MAX));
    }
    if let Some(Value::Array(retain)) = pm.get("$retainKeys") {
        t.retain(|k, _| retain.iter().any(|r| r.as_str() == Some(k)));
    }
}

/// Leaf fields of `v` (maps recurse, list-maps recurse per entry and own the entry itself,
/// everything else is a leaf).
pub fn collect_leaves(
    v: &Value,
    schema: Option<&Value>,
    field: &str,
    prefix: &mut FieldPath,
    out: &mut BTreeSet<FieldPath>,
) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                prefix.push(format!("f:{k}"));
                collect_leaves(c, child_schema(schema, k), k, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => match list_keys(schema, field) {
            Some(keys) if !items.is_empty() => {
                for item in items {
                    prefix.push(format!("k:{}", key_of(item, &keys)));
                    out.insert(prefix.clone());
                    collect_leaves(item, item_schema(schema), "", prefix, out);
                    prefix.pop();
                }
            }
            _ => {
                out.insert(prefix.clone());
            }
        },
        _ => {
            out.insert(prefix.clone());
        }
    }
}

/// The value at a managed-fields path.
pub fn get_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for seg in path {
        cur = if let Some(k) = seg.strip_prefix("f:") {
            cur.get(k)?
        } else {
            let key: Value = serde_json::from_str(seg.strip_prefix("k:")?).ok()?;
            cur.as_array()?.iter().find(|x| matches_key(x, &key))?
        };
    }
    Some(cur)
}

/// Removes the field at a managed-fields path (a no-op when it is already gone).
pub fn remove_path(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for seg in parents {
        let next = if let Some(k) = seg.strip_prefix("f:") {
            cur.get_mut(k)
        } else {
            let key: Option<Value> = seg
                .strip_prefix("k:")
                .and_then(|s| serde_json::from_str(s).ok());
            match (cur.as_array_mut(), key) {
                (Some(a), Some(key)) => a.iter_mut().find(|x| matches_key(x, &key)),
                _ => None,
            }
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(k) = last.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(k);
        }
    } else if let (Some(a), Some(key)) = (
        cur.as_array_mut(),
        last.strip_prefix("k:")
            .and_then(|s| serde_json::from_str::<Value>(s).ok()),
    ) {
        a.retain(|x| !matches_key(x, &key));
    }
}

/// Merges an applied configuration into the live object (maps and list-maps merge, other
/// lists and scalars are replaced).
pub fn merge_applied(live: &mut Value, applied: &Value, schema: Option<&Value>, field: &str) {
    match (&mut *live, applied) {
        (Value::Object(l), Value::Object(a)) => {
            for (k, av) in a {
                if av.is_null() {
                    l.remove(k);
                    continue;
                }
                match l.get_mut(k) {
                    Some(lv) => merge_applied(lv, av, child_schema(schema, k), k),
                    None => {
                        l.insert(k.clone(), av.clone());
                    }
                }
            }
        }
        (Value::Array(l), Value::Array(a)) => match list_keys(schema, field) {
            Some(keys) => {
                for item in a {
                    let key = key_of(item, &keys);
                    match l.iter_mut().find(|x| matches_key(x, &key)) {
                        Some(existing) => merge_applied(existing, item, item_schema(schema), ""),
                        None => l.push(item.clone()),
                    }
                }
            }
            None => *live = applied.clone(),
        },
        _ => *live = applied.clone(),
    }
}

/// A field owned by another manager with a different value (apply without `force`).
#[derive(Debug, Clone)]
pub struct Conflict {
    pub manager: String,
    pub field: String,
}

pub fn render_path(path: &[String]) -> String {
    let parts: Vec<String> = path
        .iter()
        .map(|s| match s.strip_prefix("f:") {
            Some(k) => format!(".{k}"),
            None => format!("[{}]", s.trim_start_matches("k:")),
        })
        .collect();
    parts.concat()
}

/// Server-side apply of `applied` (already reduced to the fields this endpoint may touch) onto
/// `live` by `manager`: conflicts, removal of fields the manager no longer applies, merge.
pub fn apply(
    live: &mut Value,
    applied: &Value,
    schema: Option<&Value>,
    managers: &mut Managers,
    manager: &str,
    force: bool,
) -> Result<(), Vec<Conflict>> {
    let mut leaves = BTreeSet::new();
    collect_leaves(applied, schema, "", &mut Vec::new(), &mut leaves);
    let mut conflicts = Vec::new();
    for leaf in &leaves {
        for (other, owned) in managers.iter_mut() {
            if other == manager || !owned.contains(leaf) {
                continue;
            }
            if get_path(live, leaf) != get_path(applied, leaf) {
                if force {
                    owned.remove(leaf);
                } else {
                    conflicts.push(Conflict {
                        manager: other.clone(),
                        field: render_path(leaf),
                    });
                }
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(conflicts);
    }
    let previous = managers.remove(manager).unwrap_or_default();
    for gone in previous.difference(&leaves) {
        let shared = managers
            .values()
            .any(|o| o.iter().any(|p| p.starts_with(gone)));
        if !shared {
            remove_path(live, gone);
        }
    }
    merge_applied(live, applied, schema, "");
    managers.retain(|_, o| !o.is_empty());
    managers.insert(manager.to_owned(), leaves);
    Ok(())
}

/// A non-apply write by `manager`: it takes ownership of the fields it changed; fields it
/// removed are no longer owned by anybody.
pub fn record_update(
    old: &Value,
    new: &Value,
    schema: Option<&Value>,
    managers: &mut Managers,
    manager: &str,
) {
    let mut new_leaves = BTreeSet::new();
    collect_leaves(new, schema, "", &mut Vec::new(), &mut new_leaves);
    let mut old_leaves = BTreeSet::new();
    collect_leaves(old, schema, "", &mut Vec::new(), &mut old_leaves);
    let changed: Vec<FieldPath> = new_leaves
        .iter()
        .filter(|p| get_path(old, p) != get_path(new, p))
        .cloned()
        .collect();
    for owned in managers.values_mut() {
        owned.retain(|p| new_leaves.contains(p) && !changed.contains(p));
    }
    if !changed.is_empty() {
        managers
            .entry(manager.to_owned())
            .or_default()
            .extend(changed);
    }
    managers.retain(|_, o| !o.is_empty());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn json_patch_null_test_on_missing_path_succeeds() {
        let mut doc = json!({"metadata":{}});
        let ops = json!([{"op":"test","path":"/metadata/finalizers","value":null},
                         {"op":"add","path":"/metadata/finalizers","value":["a"]}]);
        json_patch(&mut doc, &ops).unwrap();
        assert_eq!(doc, json!({"metadata":{"finalizers":["a"]}}));
        let bad = json!([{"op":"test","path":"/metadata/finalizers","value":null}]);
        assert!(json_patch(&mut doc, &bad).is_err());
    }

    #[test]
    fn strategic_merge_keeps_containers_by_name() {
        let mut live =
            json!({"spec":{"containers":[{"name":"a","image":"1"},{"name":"b","image":"1"}]}});
        strategic_merge(
            &mut live,
            &json!({"spec":{"containers":[{"name":"b","image":"2"},{"name":"a","$patch":"delete"}]}}),
        );
        assert_eq!(
            live,
            json!({"spec":{"containers":[{"name":"b","image":"2"}]}})
        );
    }

    #[test]
    fn apply_removes_fields_the_manager_stopped_applying() {
        let mut live = json!({});
        let mut managers = Managers::new();
        apply(
            &mut live,
            &json!({"spec":{"a":1,"b":2}}),
            None,
            &mut managers,
            "m1",
            false,
        )
        .unwrap();
        apply(
            &mut live,
            &json!({"spec":{"c":3}}),
            None,
            &mut managers,
            "m2",
            false,
        )
        .unwrap();
        apply(
            &mut live,
            &json!({"spec":{"a":1}}),
            None,
            &mut managers,
            "m1",
            false,
        )
        .unwrap();
        assert_eq!(live, json!({"spec":{"a":1,"c":3}}));
        let conflict = apply(
            &mut live,
            &json!({"spec":{"c":4}}),
            None,
            &mut managers,
            "m1",
            false,
        );
        assert!(conflict.is_err());
        apply(
            &mut live,
            &json!({"spec":{"c":4}}),
            None,
            &mut managers,
            "m1",
            true,
        )
        .unwrap();
        assert_eq!(live["spec"]["c"], 4);
    }

    #[test]
    fn apply_merges_conditions_by_type() {
        let mut live = json!({"status":{"conditions":[{"type":"Ready","status":"True"}]}});
        let mut managers = Managers::new();
        apply(
            &mut live,
            &json!({"status":{"conditions":[{"type":"SlotHealthy","status":"True"}]}}),
            None,
            &mut managers,
            "w",
            true,
        )
        .unwrap();
        assert_eq!(live["status"]["conditions"].as_array().unwrap().len(), 2);
    }
}
