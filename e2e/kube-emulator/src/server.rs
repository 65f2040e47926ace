//! The HTTP face of the store: URL routing, discovery, the OpenAPI v3 stub, list/watch
//! (selectors, bookmarks, 410 Gone, Table and PartialObjectMetadata renderings) and writes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::rbac;
use crate::resources::ResourceType;
use crate::schema::FieldValidation;
use crate::store::{ApiError, PatchKind, Store, WatchEvent, WriteOptions};

/// Shared state behind the router.
#[derive(Debug)]
pub struct Shared {
    pub store: Mutex<Store>,
    /// How often watches get a BOOKMARK.
    pub bookmark_interval: Duration,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock is a bug in the emulator; keep serving anyway.
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn json_response(code: u16, body: &Value, warnings: &[String]) -> Response {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for w in warnings {
        if let Ok(v) = HeaderValue::from_str(&format!("299 - \"{}\"", w.replace('"', "'"))) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
    resp
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.status(), &[])
}

fn parse_query(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

/// The single entry point: routes every request by hand, like the API server's path layout.
pub async fn handle(
    shared: Arc<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_end_matches('/').to_owned();
    let query = parse_query(&uri);
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["version"] => return json_response(200, &version(), &[]),
        ["healthz"] | ["readyz"] | ["livez"] => {
            let mut r = Response::new(Body::from("ok"));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            return r;
        }
        ["api"] => {
            return json_response(
                200,
                &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
                &[],
            );
        }
        ["apis"] => return json_response(200, &group_list(&shared.lock()), &[]),
        ["api", "v1"] => return json_response(200, &resource_list(&shared.lock(), "", "v1"), &[]),
        ["apis", g] => {
            let list = group_list(&shared.lock());
            return match list["groups"]
                .as_array()
                .and_then(|gs| gs.iter().find(|x| x["name"] == *g))
            {
                Some(group) => {
                    let mut group = group.clone();
                    group["kind"] = json!("APIGroup");
                    group["apiVersion"] = json!("v1");
                    json_response(200, &group, &[])
                }
                None => error_response(&ApiError::new(
                    404,
                    "NotFound",
                    format!("the server could not find the requested resource (group {g})"),
                )),
            };
        }
        ["apis", g, v] => {
            let store = shared.lock();
            if !store
                .types()
                .iter()
                .any(|t| t.group == *g && t.version == *v)
            {
                return error_response(&ApiError::new(
                    404,
                    "NotFound",
                    format!("the server could not find the requested resource ({g}/{v})"),
                ));
            }
            return json_response(200, &resource_list(&store, g, v), &[]);
        }
        ["openapi", "v3"] => return json_response(200, &openapi_root(&shared.lock()), &[]),
        ["openapi", "v3", rest @ ..] => {
            let gv = rest.join("/");
            return json_response(200, &openapi_gv(&shared.lock(), &gv), &[]);
        }
        _ => {}
    }
    let (group, version, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => {
            return error_response(&ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            ));
        }
    };
    let (ns, rest) = {
        let store = shared.lock();
        match rest {
            ["namespaces", ns, plural, tail @ ..]
                if store
                    .find_type(group, version, plural)
                    .is_some_and(|t| t.namespaced) =>
            {
                (Some((*ns).to_owned()), {
                    let mut v = vec![*plural];
                    v.extend(tail);
                    v
                })
            }
            other => (None, other.to_vec()),
        }
    };
    let Some((plural, tail)) = rest.split_first() else {
        return error_response(&ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    };
    let Some(rt) = shared.lock().find_type(group, version, plural) else {
        return error_response(&ApiError::new(
            404,
            "NotFound",
            format!(
                "the server could not find the requested resource ({group}/{version} {plural})"
            ),
        ));
    };
    let name = tail.first().copied();
    let sub = tail.get(1).copied();
    if let Some(sub) = sub
        && !((sub == "status" && rt.status) || (sub == "scale" && rt.has_scale()))
    {
        return error_response(&ApiError::new(
            404,
            "NotFound",
            format!(
                "the server could not find the requested resource ({} {sub})",
                rt.qualified()
            ),
        ));
    }
    let status = sub == Some("status");
    let ns_str = ns.clone().unwrap_or_default();
    if rt.namespaced && ns.is_none() && (name.is_some() || method != Method::GET) {
        return error_response(&ApiError::new(
            404,
            "NotFound",
            format!(
                "{} is namespaced: use /namespaces/<ns>/{}",
                rt.qualified(),
                rt.plural
            ),
        ));
    }
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Some((sa_ns, sa_name)) = rbac::identity(auth) {
        let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
        let verb = match (&method, name) {
            (&Method::GET, Some(_)) => "get",
            (&Method::GET, None) if watching => "watch",
            (&Method::GET, None) => "list",
            (&Method::POST, _) => "create",
            (&Method::PUT, _) => "update",
            (&Method::PATCH, _) => "patch",
            (&Method::DELETE, Some(_)) => "delete",
            (&Method::DELETE, None) => "deletecollection",
            _ => "unknown",
        };
        let selected_name = query
            .get("fieldSelector")
            .and_then(|f| f.split(',').find_map(|r| r.strip_prefix("metadata.name=")));
        let resource = match sub {
            Some(s) => format!("{}/{s}", rt.plural),
            None => rt.plural.clone(),
        };
        let req = rbac::Request {
            verb,
            group: &rt.group,
            resource: &resource,
            name: name.or(selected_name),
            namespace: ns.as_deref().filter(|_| rt.namespaced),
        };
        let store = shared.lock();
        if !rbac::allowed(&store, &sa_ns, &sa_name, &req) {
            let mut e = ApiError::new(
                403,
                "Forbidden",
                rbac::forbidden_message(&sa_ns, &sa_name, &req, &rt.qualified()),
            );
            e.details =
                json!({"name": name.unwrap_or_default(), "group": rt.group, "kind": rt.plural});
            return error_response(&e);
        }
    }
    let opts = WriteOptions {
        field_manager: query.get("fieldManager").cloned(),
        field_validation: FieldValidation::parse(query.get("fieldValidation").map(String::as_str)),
        force: query.get("force").is_some_and(|f| f == "true"),
        dry_run: query.contains_key("dryRun"),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if content_type.contains("protobuf") || content_type.contains("cbor") {
        return error_response(&ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the kube emulator speaks JSON only, not {content_type}: use `kubectl apply -f` instead of generator commands such as `kubectl create configmap`"
            ),
        ));
    }
    let parse_body = || -> Result<Value, ApiError> {
        serde_json::from_slice(&body)
            .or_else(|_| serde_norway::from_slice(&body))
            .map_err(|e| {
                ApiError::new(
                    400,
                    "BadRequest",
                    format!("the request body is neither JSON nor YAML: {e}"),
                )
            })
    };
    if sub == Some("scale") {
        let body = if method == Method::GET {
            Ok(Value::Null)
        } else {
            parse_body()
        };
        return body
            .and_then(|b| {
                scale(
                    &shared,
                    &rt,
                    &ns_str,
                    name.unwrap_or_default(),
                    &method,
                    &content_type,
                    &b,
                    &opts,
                )
            })
            .map(|v| json_response(200, &v, &[]))
            .unwrap_or_else(|e| error_response(&e));
    }
    let result: Result<Response, ApiError> = (|| match (method.clone(), name) {
        (Method::GET, None) => {
            if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
                return Ok(watch(&shared, &rt, ns.as_deref(), &query, &accept));
            }
            Ok(list(&shared.lock(), &rt, ns.as_deref(), &query, &accept))
        }
        (Method::GET, Some(name)) => {
            let obj = shared
                .lock()
                .get(&rt, &ns_str, name)
                .ok_or_else(|| ApiError::not_found(&rt, name))?;
            Ok(json_response(200, &render_one(&rt, obj, &accept), &[]))
        }
        (Method::POST, None) => {
            let w = shared.lock().create(&rt, &ns_str, parse_body()?, &opts)?;
            Ok(json_response(201, &w.object, &w.warnings))
        }
        (Method::PUT, Some(name)) => {
            let w = shared
                .lock()
                .update(&rt, &ns_str, name, parse_body()?, status, &opts)?;
            Ok(json_response(200, &w.object, &w.warnings))
        }
        (Method::PATCH, Some(name)) => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let kind = match ct.split(';').next().unwrap_or_default().trim() {
                "application/merge-patch+json" => PatchKind::Merge,
                "application/json-patch+json" => PatchKind::Json,
                "application/strategic-merge-patch+json" => PatchKind::Strategic,
                "application/apply-patch+yaml" | "application/apply-patch+cbor" => PatchKind::Apply,
                other => {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!("the body of the request was in an unknown format ({other:?})"),
                    ));
                }
            };
            let w = shared
                .lock()
                .patch(&rt, &ns_str, name, kind, &parse_body()?, status, &opts)?;
            Ok(json_response(
                if w.created { 201 } else { 200 },
                &w.object,
                &w.warnings,
            ))
        }
        (Method::DELETE, Some(name)) => {
            let body_opts: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let policy = query
                .get("propagationPolicy")
                .cloned()
                .or_else(|| body_opts["propagationPolicy"].as_str().map(str::to_owned));
            let orphan =
                policy.as_deref() == Some("Orphan") || body_opts["orphanDependents"] == json!(true);
            let obj = shared.lock().delete(&rt, &ns_str, name, orphan)?;
            Ok(json_response(200, &obj, &[]))
        }
        (Method::DELETE, None) => {
            let mut store = shared.lock();
            let victims: Vec<Value> = store
                .list(&rt, ns.as_deref())
                .into_iter()
                .filter(|o| selected(o, &query))
                .collect();
            for v in &victims {
                let n = v["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let vns = v["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                store.delete(&rt, &vns, &n, false)?;
            }
            Ok(json_response(
                200,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                &[],
            ))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on this path"),
        )),
    })();
    result.unwrap_or_else(|e| error_response(&e))
}

fn scale_of(obj: &Value) -> Value {
    let selector: Vec<String> = obj["spec"]["selector"]["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    let m = &obj["metadata"];
    json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"], "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"]},
        "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(1)},
        "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0), "selector": selector.join(",")},
    })
}

/// The `scale` subresource of Deployments and ReplicaSets (`kubectl scale`).
#[allow(clippy::too_many_arguments)]
fn scale(
    shared: &Shared,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    method: &Method,
    content_type: &str,
    body: &Value,
    opts: &WriteOptions,
) -> Result<Value, ApiError> {
    let mut store = shared.lock();
    let obj = store
        .get(rt, ns, name)
        .ok_or_else(|| ApiError::not_found(rt, name))?;
    let mut scale = scale_of(&obj);
    match *method {
        Method::GET => return Ok(scale),
        Method::PUT => scale = body.clone(),
        Method::PATCH if content_type.starts_with("application/json-patch+json") => {
            crate::patch::json_patch(&mut scale, body)
                .map_err(|e| ApiError::new(422, "Invalid", e.to_string()))?;
        }
        Method::PATCH => crate::patch::merge_patch(&mut scale, body),
        _ => {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                format!("{method} is not supported on scale"),
            ));
        }
    }
    let replicas = scale["spec"]["replicas"]
        .as_i64()
        .ok_or_else(|| ApiError::new(422, "Invalid", "Scale.spec.replicas must be an integer"))?;
    let w = store.patch(
        rt,
        ns,
        name,
        PatchKind::Merge,
        &json!({"spec": {"replicas": replicas}}),
        false,
        opts,
    )?;
    Ok(scale_of(&w.object))
}

fn version() -> Value {
    json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-wallaby-emulator", "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"})
}

fn group_list(store: &Store) -> Value {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for t in store.types().iter().filter(|t| !t.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == t.group) {
            Some((_, versions)) => {
                if !versions.contains(&t.version) {
                    versions.push(t.version.clone());
                }
            }
            None => groups.push((t.group.clone(), vec![t.version.clone()])),
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, versions)| {
            let vs: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                .collect();
            json!({"name": g, "versions": vs, "preferredVersion": vs[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(store: &Store, group: &str, version: &str) -> Value {
    let resources: Vec<Value> = store
        .types()
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .flat_map(ResourceType::discovery)
        .collect();
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

/// `/openapi/v3`: one entry per group/version; the hash changes with the set of types so
/// kubectl's cache notices new CRDs.
fn openapi_root(store: &Store) -> Value {
    let mut paths = serde_json::Map::new();
    let hash = store.types().len();
    for t in store.types() {
        let key = if t.group.is_empty() {
            "api/v1".to_owned()
        } else {
            format!("apis/{}/{}", t.group, t.version)
        };
        paths.insert(
            key.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{key}?hash={hash:08X}")}),
        );
    }
    json!({"paths": paths})
}

/// `/openapi/v3/apis/G/V`: PATCH operations with their GVK and a `fieldValidation` parameter,
/// which tells kubectl to leave field validation to the server.
fn openapi_gv(store: &Store, gv: &str) -> Value {
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    for t in store.types() {
        let key = if t.group.is_empty() {
            "api/v1".to_owned()
        } else {
            format!("apis/{}/{}", t.group, t.version)
        };
        if key != gv {
            continue;
        }
        // CRD schemas, so `kubectl explain` works for custom resources.
        if let Some(schema) = &t.schema {
            let mut s = schema.clone();
            s["x-kubernetes-group-version-kind"] =
                json!([{"group": t.group, "version": t.version, "kind": t.kind}]);
            let reversed: Vec<&str> = t.group.split('.').rev().collect();
            schemas.insert(
                format!("{}.{}.{}", reversed.join("."), t.version, t.kind),
                s,
            );
        }
        let prefix = if t.namespaced {
            format!("/{key}/namespaces/{{namespace}}/{}", t.plural)
        } else {
            format!("/{key}/{}", t.plural)
        };
        let op = json!({
            "x-kubernetes-group-version-kind": {"group": t.group, "version": t.version, "kind": t.kind},
            "x-kubernetes-action": "patch",
            "parameters": [
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                {"name": "force", "in": "query", "schema": {"type": "boolean", "uniqueItems": true}},
            ],
            "responses": {"200": {"description": "OK"}},
        });
        paths.insert(format!("{prefix}/{{name}}"), json!({"patch": op.clone()}));
        if t.status {
            paths.insert(format!("{prefix}/{{name}}/status"), json!({"patch": op}));
        }
    }
    json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.33.0"}, "paths": paths, "components": {"schemas": schemas}})
}

fn label_selector_matches(labels: &Value, selector: &str) -> bool {
    let mut reqs = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in selector.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                reqs.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    reqs.push(cur);
    let get = |k: &str| labels.get(k.trim()).and_then(Value::as_str);
    reqs.iter()
        .map(|r| r.trim())
        .filter(|r| !r.is_empty())
        .all(|r| {
            let set = |s: &str| -> Vec<String> {
                s.trim()
                    .trim_start_matches('(')
                    .trim_end_matches(')')
                    .split(',')
                    .map(|x| x.trim().to_owned())
                    .collect()
            };
            if let Some((k, vs)) = r.split_once(" notin ") {
                return get(k).is_none_or(|v| !set(vs).iter().any(|x| x == v));
            }
            if let Some((k, vs)) = r.split_once(" in ") {
                return get(k).is_some_and(|v| set(vs).iter().any(|x| x == v));
            }
            if let Some((k, v)) = r.split_once("!=") {
                return get(k) != Some(v.trim());
            }
            if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
                return get(k) == Some(v.trim());
            }
            if let Some(k) = r.strip_prefix('!') {
                return get(k).is_none();
            }
            get(r).is_some()
        })
}

fn field_selector_matches(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|r| !r.is_empty()).all(|r| {
        let (path, want, negate) = match r.split_once("!=") {
            Some((p, v)) => (p, v, true),
            None => match r.split_once("==").or_else(|| r.split_once('=')) {
                Some((p, v)) => (p, v, false),
                None => return true,
            },
        };
        let mut cur = obj;
        for part in path.split('.') {
            cur = &cur[part];
        }
        let actual = match cur {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        (actual == want) != negate
    })
}

fn selected(obj: &Value, query: &HashMap<String, String>) -> bool {
    query
        .get("labelSelector")
        .is_none_or(|s| label_selector_matches(&obj["metadata"]["labels"], s))
        && query
            .get("fieldSelector")
            .is_none_or(|s| field_selector_matches(obj, s))
}

fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

fn wants_metadata(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=PartialObjectMetadata"))
}

fn partial(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]})
}

fn render_one(rt: &ResourceType, obj: Value, accept: &str) -> Value {
    if wants_table(accept) {
        table(rt, &[obj], "")
    } else if wants_metadata(accept) {
        partial(&obj)
    } else {
        obj
    }
}

fn list(
    store: &Store,
    rt: &ResourceType,
    ns: Option<&str>,
    query: &HashMap<String, String>,
    accept: &str,
) -> Response {
    let items: Vec<Value> = store
        .list(rt, ns)
        .into_iter()
        .filter(|o| selected(o, query))
        .collect();
    let rv = store.resource_version().to_string();
    if wants_table(accept) {
        return json_response(200, &table(rt, &items, &rv), &[]);
    }
    if wants_metadata(accept) {
        let items: Vec<Value> = items.iter().map(partial).collect();
        return json_response(
            200,
            &json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv}, "items": items}),
            &[],
        );
    }
    json_response(
        200,
        &json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(), "metadata": {"resourceVersion": rv}, "items": items}),
        &[],
    )
}

fn age(ts: &str) -> String {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(ts) else {
        return "<unknown>".into();
    };
    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// A tiny JSONPath for printer columns: `.a.b`, `.a[0]`, `.a[?(@.k=="v")].b`.
fn json_path<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = obj;
    let mut rest = path.trim_start_matches('.');
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('[') {
            let end = after.find(']')?;
            let inner = &after[..end];
            rest = after[end + 1..].trim_start_matches('.');
            if let Some(filter) = inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let (k, v) = filter.split_once("==")?;
                let v = v.trim().trim_matches(|c| c == '"' || c == '\'');
                cur = cur
                    .as_array()?
                    .iter()
                    .find(|x| x[k.trim()].as_str() == Some(v))?;
            } else {
                cur = cur.get(inner.parse::<usize>().ok()?)?;
            }
            continue;
        }
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        cur = cur.get(&rest[..end])?;
        rest = rest[end..].trim_start_matches('.');
    }
    Some(cur)
}

fn table(rt: &ResourceType, items: &[Value], rv: &str) -> Value {
    let mut columns = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}),
    ];
    for c in &rt.columns {
        columns.push(json!({"name": c["name"], "type": c["type"].as_str().unwrap_or("string"), "format": "", "description": c["description"].as_str().unwrap_or_default(), "priority": c["priority"].as_i64().unwrap_or(0)}));
    }
    let has_age = rt
        .columns
        .iter()
        .any(|c| c["jsonPath"] == ".metadata.creationTimestamp");
    if !has_age {
        columns.push(json!({"name": "Age", "type": "string", "format": "", "description": "Age", "priority": 0}));
    }
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut cells = vec![o["metadata"]["name"].clone()];
            for c in &rt.columns {
                let v = json_path(o, c["jsonPath"].as_str().unwrap_or_default())
                    .cloned()
                    .unwrap_or(Value::Null);
                let cell = if c["type"] == "date" {
                    v.as_str().map(|s| json!(age(s))).unwrap_or(Value::Null)
                } else {
                    v
                };
                cells.push(cell);
            }
            if !has_age {
                cells.push(json!(age(o["metadata"]["creationTimestamp"]
                    .as_str()
                    .unwrap_or_default())));
            }
            json!({"cells": cells, "object": partial(o)})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv}, "columnDefinitions": columns, "rows": rows})
}

fn event_line(rt: &ResourceType, kind: &str, obj: &Value, accept: &str) -> Bytes {
    let object = if kind == "BOOKMARK" || kind == "ERROR" {
        obj.clone()
    } else if wants_table(accept) {
        table(
            rt,
            std::slice::from_ref(obj),
            obj["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default(),
        )
    } else if wants_metadata(accept) {
        partial(obj)
    } else {
        let mut o = obj.clone();
        o["apiVersion"] = json!(rt.api_version());
        o
    };
    Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))
}

fn bookmark(rt: &ResourceType, rv: u64, initial_end: bool) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": meta})
}

fn gone(rv: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("too old resource version: {rv}"), "reason": "Expired", "code": 410})
}

fn event_matches(
    e: &WatchEvent,
    rt: &ResourceType,
    ns: Option<&str>,
    query: &HashMap<String, String>,
) -> bool {
    e.group == rt.group
        && e.plural == rt.plural
        && ns.is_none_or(|n| n == e.namespace)
        && selected(&e.object, query)
}

/// `?watch=true`: replays history after `resourceVersion` (or the current state), then
/// streams changes, bookmarks, and ends after `timeoutSeconds`.
fn watch(
    shared: &Arc<Shared>,
    rt: &ResourceType,
    ns: Option<&str>,
    query: &HashMap<String, String>,
    accept: &str,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    let rv_param = query.get("resourceVersion").cloned().unwrap_or_default();
    let send_initial = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let (mut sub, backlog, mut last) = {
        let store = shared.lock();
        let sub = store.subscribe();
        let current = store.resource_version();
        let mut backlog: Vec<Bytes> = Vec::new();
        let start: u64 = rv_param.parse().unwrap_or(0);
        if rv_param.is_empty() || rv_param == "0" || send_initial {
            for o in store
                .list(rt, ns)
                .into_iter()
                .filter(|o| selected(o, query))
            {
                backlog.push(event_line(rt, "ADDED", &o, accept));
            }
            if send_initial {
                backlog.push(event_line(
                    rt,
                    "BOOKMARK",
                    &bookmark(rt, current, true),
                    accept,
                ));
            }
            (sub, backlog, current)
        } else {
            match store.events_since(start) {
                Some(events) => {
                    for e in events.iter().filter(|e| event_matches(e, rt, ns, query)) {
                        backlog.push(event_line(rt, e.kind, &e.object, accept));
                    }
                    (sub, backlog, current)
                }
                None => {
                    backlog.push(event_line(rt, "ERROR", &gone(&rv_param), accept));
                    let _ = tx.try_send(Ok(backlog.concat().into()));
                    drop(tx);
                    return stream_response(rx);
                }
            }
        }
    };
    let rt = rt.clone();
    let ns = ns.map(str::to_owned);
    let query = query.clone();
    let accept = accept.to_owned();
    let interval = shared.bookmark_interval;
    tokio::spawn(async move {
        for line in backlog {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(Duration::from_secs(timeout));
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                () = &mut deadline => return,
                () = tx.closed() => return,
                _ = ticker.tick(), if bookmarks => {
                    if tx.send(Ok(event_line(&rt, "BOOKMARK", &bookmark(&rt, last, false), &accept))).await.is_err() {
                        return;
                    }
                }
                ev = sub.recv() => match ev {
                    Ok(e) => {
                        if e.rv <= last {
                            continue;
                        }
                        last = e.rv;
                        if event_matches(&e, &rt, ns.as_deref(), &query)
                            && tx.send(Ok(event_line(&rt, e.kind, &e.object, &accept))).await.is_err()
                        {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(Ok(event_line(&rt, "ERROR", &gone(&last.to_string()), &accept))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    stream_response(rx)
}

fn stream_response(rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Response {
    let mut resp = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn selectors() {
        let labels = json!({"app": "a", "tier": "x"});
        assert!(label_selector_matches(&labels, "app=a,tier in (x,y)"));
        assert!(!label_selector_matches(&labels, "app!=a"));
        assert!(label_selector_matches(&labels, "!missing,app"));
        assert!(!label_selector_matches(&labels, "tier notin (x)"));
        let obj = json!({"metadata": {"name": "n"}});
        assert!(field_selector_matches(&obj, "metadata.name=n"));
        assert!(!field_selector_matches(&obj, "metadata.name!=n"));
    }

    #[test]
    fn printer_column_paths() {
        let obj = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}], "checkpoint": {"lsn": "0/1"}}});
        assert_eq!(
            json_path(&obj, ".status.conditions[?(@.type==\"Ready\")].status"),
            Some(&json!("True"))
        );
        assert_eq!(
            json_path(&obj, ".status.checkpoint.lsn"),
            Some(&json!("0/1"))
        );
    }
}
