//! CRD structural-schema handling for custom resources: pruning of unknown fields, dropping of
//! non-nullable nulls, OpenAPI v3 validation (types, required, enums, patterns, bounds) and
//! the `x-kubernetes-validations` CEL rules (via kube-cel, including `oldSelf` transitions).

use serde_json::{Map, Value};

/// One field error, rendered the way the API server renders `field.Error`.
#[derive(Debug, Clone)]
pub struct FieldError {
    pub field: String,
    pub reason: &'static str,
    pub message: String,
}

impl FieldError {
    fn new(field: &str, reason: &'static str, message: String) -> Self {
        Self {
            field: field.to_owned(),
            reason,
            message,
        }
    }
}

/// How unknown fields are treated (the `fieldValidation` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("Strict") => Self::Strict,
            Some("Warn") => Self::Warn,
            _ => Self::Ignore,
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn is_true(schema: &Value, key: &str) -> bool {
    schema.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// Removes fields the schema does not declare (recording their paths in `unknown`) and
/// `null`s the schema does not allow, like the API server does before defaulting.
pub fn prune(schema: &Value, value: &mut Value, path: &str, unknown: &mut Vec<String>) {
    if let Value::Object(map) = value {
        let props = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties");
        let preserve = is_true(schema, "x-kubernetes-preserve-unknown-fields");
        let keys: Vec<String> = map.keys().cloned().collect();
        for key in keys {
            // The root's apiVersion/kind/metadata are handled by the server, not the schema.
            if path.is_empty() && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            let child_schema = props
                .and_then(|p| p.get(&key))
                .or(additional.filter(|a| a.is_object()));
            match child_schema {
                Some(cs) => {
                    let drop_null =
                        map.get(&key).is_some_and(Value::is_null) && !is_true(cs, "nullable");
                    if drop_null {
                        map.remove(&key);
                    } else if let Some(child) = map.get_mut(&key) {
                        prune(cs, child, &join(path, &key), unknown);
                    }
                }
                None => {
                    let allowed = preserve || additional.is_some_and(|a| a == &Value::Bool(true));
                    if !allowed {
                        unknown.push(join(path, &key));
                        map.remove(&key);
                    }
                }
            }
        }
    } else if let Value::Array(items) = value
        && let Some(item_schema) = schema.get("items")
    {
        for (i, item) in items.iter_mut().enumerate() {
            prune(item_schema, item, &format!("{path}[{i}]"), unknown);
        }
    }
}

/// Validates `value` against the OpenAPI v3 part of a structural schema (not the CEL rules).
pub fn validate(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let shown = if path.is_empty() { "<root>" } else { path };
    if value.is_null() {
        if !is_true(schema, "nullable") && !path.is_empty() {
            errors.push(FieldError::new(
                shown,
                "FieldValueInvalid",
                format!(
                    "Invalid value: \"null\": {shown} in body must be of type {}: \"null\"",
                    schema
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or("object")
                ),
            ));
        }
        return;
    }
    if is_true(schema, "x-kubernetes-int-or-string") {
        if !(value.is_string() || type_name(value) == "integer") {
            errors.push(FieldError::new(
                shown,
                "FieldValueInvalid",
                format!(
                    "Invalid value: \"{}\": {shown} in body must be of type integer-or-string",
                    type_name(value)
                ),
            ));
        }
        return;
    }
    if let Some(ty) = schema.get("type").and_then(Value::as_str) {
        let actual = type_name(value);
        let ok = actual == ty || (ty == "number" && actual == "integer");
        if !ok {
            errors.push(FieldError::new(
                shown,
                "FieldValueTypeInvalid",
                format!("Invalid value: \"{actual}\": {shown} in body must be of type {ty}: \"{actual}\""),
            ));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
        errors.push(FieldError::new(
            shown,
            "FieldValueNotSupported",
            format!(
                "Unsupported value: {value}: supported values: {}",
                list.join(", ")
            ),
        ));
    }
    match value {
        Value::Object(map) => validate_object(schema, map, path, errors),
        Value::Array(items) => validate_array(schema, items, path, errors),
        Value::String(s) => validate_string(schema, s, shown, errors),
        Value::Number(n) => validate_number(schema, n, value, shown, errors),
        Value::Bool(_) | Value::Null => {}
    }
}

fn validate_object(
    schema: &Value,
    map: &Map<String, Value>,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for r in required.iter().filter_map(Value::as_str) {
            if !map.contains_key(r) {
                errors.push(FieldError::new(
                    &join(path, r),
                    "FieldValueRequired",
                    "Required value".into(),
                ));
            }
        }
    }
    let props = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    for (key, child) in map {
        if path.is_empty() && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        if let Some(cs) = props.and_then(|p| p.get(key)).or(additional) {
            validate(cs, child, &join(path, key), errors);
        }
    }
    let shown = if path.is_empty() { "<root>" } else { path };
    if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
        && map.len() as u64 > max
    {
        errors.push(FieldError::new(
            shown,
            "FieldValueTooMany",
            format!("Too many: {}: must have at most {max} items", map.len()),
        ));
    }
    if let Some(min) = schema.get("minProperties").and_then(Value::as_u64)
        && (map.len() as u64) < min
    {
        errors.push(FieldError::new(
            shown,
            "FieldValueInvalid",
            format!(
                "Invalid value: {}: {shown} in body should have at least {min} properties",
                map.len()
            ),
        ));
    }
}

fn list_map_key(item: &Value, keys: &[&str]) -> String {
    let parts: Vec<String> = keys
        .iter()
        .map(|k| item.get(*k).map(Value::to_string).unwrap_or_default())
        .collect();
    parts.join(",")
}

fn validate_array(schema: &Value, items: &[Value], path: &str, errors: &mut Vec<FieldError>) {
    if let Some(item_schema) = schema.get("items") {
        for (i, item) in items.iter().enumerate() {
            validate(item_schema, item, &format!("{path}[{i}]"), errors);
        }
    }
    if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
        && items.len() as u64 > max
    {
        errors.push(FieldError::new(
            path,
            "FieldValueTooMany",
            format!("Too many: {}: must have at most {max} items", items.len()),
        ));
    }
    if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
        && (items.len() as u64) < min
    {
        errors.push(FieldError::new(
            path,
            "FieldValueInvalid",
            format!(
                "Invalid value: {}: {path} in body should have at least {min} items",
                items.len()
            ),
        ));
    }
    match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("map") => {
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|k| k.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut seen = std::collections::BTreeSet::new();
            for (i, item) in items.iter().enumerate() {
                let key = list_map_key(item, &keys);
                if !seen.insert(key.clone()) {
                    errors.push(FieldError::new(
                        &format!("{path}[{i}]"),
                        "FieldValueDuplicate",
                        format!("Duplicate value: {{{key}}}"),
                    ));
                }
            }
        }
        Some("set") => {
            for (i, item) in items.iter().enumerate() {
                if items[..i].contains(item) {
                    errors.push(FieldError::new(
                        &format!("{path}[{i}]"),
                        "FieldValueDuplicate",
                        format!("Duplicate value: {item}"),
                    ));
                }
            }
        }
        _ => {}
    }
}

fn validate_string(schema: &Value, s: &str, shown: &str, errors: &mut Vec<FieldError>) {
    let len = s.chars().count() as u64;
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && len > max
    {
        errors.push(FieldError::new(
            shown,
            "FieldValueTooLong",
            format!("Too long: may not be more than {max} bytes"),
        ));
    }
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && len < min
    {
        errors.push(FieldError::new(
            shown,
            "FieldValueInvalid",
            format!("Invalid value: \"{s}\": {shown} in body should be at least {min} chars long"),
        ));
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        match regex::Regex::new(pattern) {
            Ok(re) if !re.is_match(s) => errors.push(FieldError::new(
                shown,
                "FieldValueInvalid",
                format!("Invalid value: \"{s}\": {shown} in body should match '{pattern}'"),
            )),
            Ok(_) => {}
            Err(e) => errors.push(FieldError::new(
                shown,
                "InternalError",
                format!("the CRD pattern {pattern:?} does not compile: {e}"),
            )),
        }
    }
    if schema.get("format").and_then(Value::as_str) == Some("date-time")
        && chrono::DateTime::parse_from_rfc3339(s).is_err()
    {
        errors.push(FieldError::new(
            shown,
            "FieldValueInvalid",
            format!("Invalid value: \"{s}\": {shown} in body must be of type date-time: \"{s}\""),
        ));
    }
}

fn validate_number(
    schema: &Value,
    n: &serde_json::Number,
    value: &Value,
    shown: &str,
    errors: &mut Vec<FieldError>,
) {
    let Some(x) = n.as_f64() else { return };
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
        let exclusive = is_true(schema, "exclusiveMinimum");
        if x < min || (exclusive && x <= min) {
            let rel = if exclusive {
                "greater than"
            } else {
                "greater than or equal to"
            };
            errors.push(FieldError::new(
                shown,
                "FieldValueInvalid",
                format!("Invalid value: {value}: {shown} in body should be {rel} {min}"),
            ));
        }
    }
    if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
        let exclusive = is_true(schema, "exclusiveMaximum");
        if x > max || (exclusive && x >= max) {
            let rel = if exclusive {
                "less than"
            } else {
                "less than or equal to"
            };
            errors.push(FieldError::new(
                shown,
                "FieldValueInvalid",
                format!("Invalid value: {value}: {shown} in body should be {rel} {max}"),
            ));
        }
    }
}

/// Evaluates the schema's `x-kubernetes-validations` rules; `old` enables transition rules.
pub fn validate_cel(
    schema: &Value,
    object: &Value,
    old: Option<&Value>,
    errors: &mut Vec<FieldError>,
) {
    if let Err(failures) = kube_cel::validate(schema, object, old) {
        for f in failures.into_vec() {
            let field = if f.field_path.is_empty() {
                "<root>".to_owned()
            } else {
                f.field_path.clone()
            };
            errors.push(FieldError {
                field,
                reason: "FieldValueInvalid",
                message: format!("Invalid value: \"object\": {}", f.message),
            });
        }
    }
}

/// Applies the schema's `default`s (missing fields under existing parents).
pub fn apply_defaults(schema: &Value, object: &Value) -> Value {
    kube_cel::apply_defaults(schema, object)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type":"object","properties":{"spec":{"type":"object","required":["mode"],"properties":{
            "mode":{"type":"string","enum":["a","b"]},
            "n":{"type":"integer","minimum":1,"maximum":3},
            "name":{"type":"string","pattern":"^[a-z]+$","maxLength":4},
            "items":{"type":"array","maxItems":1,"items":{"type":"string"}},
            "d":{"type":"string","default":"x"}}}}})
    }

    #[test]
    fn prunes_unknown_fields_and_reports_them() {
        let mut v = json!({"apiVersion":"x","spec":{"mode":"a","bogus":1}});
        let mut unknown = Vec::new();
        prune(&schema(), &mut v, "", &mut unknown);
        assert_eq!(unknown, vec!["spec.bogus".to_owned()]);
        assert_eq!(v, json!({"apiVersion":"x","spec":{"mode":"a"}}));
    }

    #[test]
    fn reports_each_violation() {
        let v = json!({"spec":{"mode":"c","n":5,"name":"ABCDE","items":["a","b"]}});
        let mut errors = Vec::new();
        validate(&schema(), &v, "", &mut errors);
        let mut fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            vec![
                "spec.items",
                "spec.mode",
                "spec.n",
                "spec.name",
                "spec.name"
            ]
        );
    }

    #[test]
    fn defaults_fill_missing_fields() {
        let v = apply_defaults(&schema(), &json!({"spec":{"mode":"a"}}));
        assert_eq!(v["spec"]["d"], "x");
    }
}
