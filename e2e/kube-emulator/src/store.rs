//! The in-memory object store: resource versions, admission (CRD schemas, CEL, built-in
//! defaults and immutable fields), status-subresource rules, field ownership, finalizers,
//! owner-reference garbage collection and the watch history.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::patch::{self, Managers};
use crate::resources::{self, ResourceType};
use crate::schema::{self, FieldError, FieldValidation};

/// How many watch events are kept for `watch?resourceVersion=…` resumption.
const HISTORY: usize = 20_000;

/// One change, as watchers see it.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    pub rv: u64,
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub kind: &'static str,
    pub object: Value,
}

/// An API error, rendered as a `Status` object.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Value,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: Value::Null,
        }
    }

    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", rt.qualified()),
        );
        e.details = json!({"name": name, "group": rt.group, "kind": rt.plural});
        e
    }

    pub fn invalid(rt: &ResourceType, name: &str, errors: &[FieldError]) -> Self {
        let rendered: Vec<String> = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect();
        let list = if rendered.len() == 1 {
            rendered.concat()
        } else {
            format!("[{}]", rendered.join(", "))
        };
        let kind_group = if rt.group.is_empty() {
            rt.kind.clone()
        } else {
            format!("{}.{}", rt.kind, rt.group)
        };
        let causes: Vec<Value> = errors
            .iter()
            .map(|e| json!({"reason": e.reason, "message": e.message, "field": e.field}))
            .collect();
        let mut err = Self::new(
            422,
            "Invalid",
            format!("{kind_group} \"{name}\" is invalid: {list}"),
        );
        err.details = json!({"name": name, "group": rt.group, "kind": rt.kind, "causes": causes});
        err
    }

    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if !self.details.is_null() {
            s["details"] = self.details.clone();
        }
        s
    }
}

/// Options of one write request.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    pub field_manager: Option<String>,
    pub field_validation: FieldValidation,
    pub force: bool,
    pub dry_run: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            field_manager: None,
            field_validation: FieldValidation::Ignore,
            force: false,
            dry_run: false,
        }
    }
}

/// A successful write: the object and the warnings to return (`Warning` headers).
#[derive(Debug)]
pub struct Written {
    pub object: Value,
    pub created: bool,
    pub warnings: Vec<String>,
}

/// The kind of patch body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Json,
    Strategic,
    Apply,
}

type Key = (String, String);

/// Everything the emulator stores.
#[derive(Debug)]
pub struct Store {
    rv: u64,
    types: Vec<ResourceType>,
    objects: HashMap<(String, String), BTreeMap<Key, Value>>,
    managers: HashMap<String, Managers>,
    history: VecDeque<Arc<WatchEvent>>,
    /// Watches from a resourceVersion at or below this get 410 Gone.
    compacted: u64,
    tx: broadcast::Sender<Arc<WatchEvent>>,
}

fn meta_str<'a>(obj: &'a Value, key: &str) -> &'a str {
    obj["metadata"][key].as_str().unwrap_or_default()
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn random_suffix(len: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

pub fn new_uid() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    let b: [u8; 16] = rng.random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The object without metadata and status: what `generation` tracks.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
        m.remove("apiVersion");
        m.remove("kind");
    }
    v
}

/// The part of an object field ownership is tracked on.
fn owned_part(obj: &Value, rt: &ResourceType, status: bool) -> Value {
    let mut out = Map::new();
    if let Some(m) = obj.as_object() {
        for (k, v) in m {
            match k.as_str() {
                "apiVersion" | "kind" => {}
                "status" if rt.status && !status => {}
                "metadata" if !status => {
                    let kept: Map<String, Value> = v
                        .as_object()
                        .into_iter()
                        .flatten()
                        .filter(|(k, _)| {
                            matches!(
                                k.as_str(),
                                "labels" | "annotations" | "finalizers" | "ownerReferences"
                            )
                        })
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    if !kept.is_empty() {
                        out.insert(k.clone(), Value::Object(kept));
                    }
                }
                _ if status && rt.status && k != "status" => {}
                _ => {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
    }
    Value::Object(out)
}

impl Store {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(8192);
        let mut store = Self {
            rv: 1,
            types: resources::builtins(),
            objects: HashMap::new(),
            managers: HashMap::new(),
            history: VecDeque::new(),
            compacted: 0,
            tx,
        };
        let ns_type = store.types[0].clone();
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
            let _ = store.create(&ns_type, "", obj, &WriteOptions::default());
        }
        store
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<WatchEvent>> {
        self.tx.subscribe()
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn types(&self) -> &[ResourceType] {
        &self.types
    }

    pub fn find_type(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    }

    pub fn find_kind(&self, api_version: &str, kind: &str) -> Option<ResourceType> {
        self.types
            .iter()
            .find(|t| t.api_version() == api_version && t.kind == kind)
            .cloned()
    }

    /// Drops the watch history: watches from an older resourceVersion now get 410 Gone.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    /// Events after `rv` (for a watch resuming there), or `None` when they were compacted.
    pub fn events_since(&self, rv: u64) -> Option<Vec<Arc<WatchEvent>>> {
        if rv < self.compacted {
            return None;
        }
        if let Some(first) = self.history.front()
            && rv + 1 < first.rv
            && rv < self.rv
        {
            return None;
        }
        Some(self.history.iter().filter(|e| e.rv > rv).cloned().collect())
    }

    pub fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> Option<Value> {
        self.objects
            .get(&(rt.group.clone(), rt.plural.clone()))
            .and_then(|m| m.get(&(ns.to_owned(), name.to_owned())))
            .map(|o| with_version(o, rt))
    }

    /// Objects of a type, in one namespace or (`None`) all of them.
    pub fn list(&self, rt: &ResourceType, ns: Option<&str>) -> Vec<Value> {
        self.objects
            .get(&(rt.group.clone(), rt.plural.clone()))
            .map(|m| {
                m.iter()
                    .filter(|((n, _), _)| ns.is_none_or(|want| want == n))
                    .map(|(_, o)| with_version(o, rt))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn commit(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        mut obj: Value,
        kind: &'static str,
    ) -> Value {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let map = self
            .objects
            .entry((rt.group.clone(), rt.plural.clone()))
            .or_default();
        let key = (ns.to_owned(), name.to_owned());
        if kind == "DELETED" {
            map.remove(&key);
            self.managers.remove(meta_str(&obj, "uid"));
        } else {
            map.insert(key, obj.clone());
        }
        let event = Arc::new(WatchEvent {
            rv: self.rv,
            group: rt.group.clone(),
            plural: rt.plural.clone(),
            namespace: ns.to_owned(),
            kind,
            object: obj.clone(),
        });
        self.history.push_back(event.clone());
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
        let _ = self.tx.send(event);
        obj
    }

    /// Schema pruning/defaulting/validation, CEL and built-in rules for a write.
    fn admit(
        &self,
        rt: &ResourceType,
        old: Option<&Value>,
        obj: &mut Value,
        opts: &WriteOptions,
        warnings: &mut Vec<String>,
    ) -> Result<(), ApiError> {
        let name = meta_str(obj, "name").to_owned();
        let mut errors = Vec::new();
        if let Some(schema) = &rt.schema {
            let mut unknown = Vec::new();
            schema::prune(schema, obj, "", &mut unknown);
            if !unknown.is_empty() {
                match opts.field_validation {
                    FieldValidation::Strict => {
                        let fields: Vec<String> = unknown
                            .iter()
                            .map(|u| format!("unknown field \"{u}\""))
                            .collect();
                        return Err(ApiError::new(
                            400,
                            "BadRequest",
                            format!("strict decoding error: {}", fields.join(", ")),
                        ));
                    }
                    FieldValidation::Warn => {
                        warnings.extend(unknown.iter().map(|u| format!("unknown field \"{u}\"")))
                    }
                    FieldValidation::Ignore => {}
                }
            }
            *obj = schema::apply_defaults(schema, obj);
            schema::validate(schema, obj, "", &mut errors);
            if errors.is_empty() {
                schema::validate_cel(schema, obj, old, &mut errors);
            }
        } else {
            builtin_admission(rt, old, obj, &mut errors);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(rt, &name, &errors))
        }
    }

    pub fn create(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        mut obj: Value,
        opts: &WriteOptions,
    ) -> Result<Written, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the request body is not a JSON object",
            ));
        }
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        let mut name = meta_str(&obj, "name").to_owned();
        if name.is_empty() {
            let prefix = meta_str(&obj, "generateName").to_owned();
            if prefix.is_empty() {
                return Err(ApiError::invalid(
                    rt,
                    "",
                    &[FieldError {
                        field: "metadata.name".into(),
                        reason: "FieldValueRequired",
                        message: "Required value: name or generateName is required".into(),
                    }],
                ));
            }
            name = format!("{prefix}{}", random_suffix(5));
            obj["metadata"]["name"] = json!(name);
        }
        if rt.namespaced {
            let body_ns = meta_str(&obj, "namespace");
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    format!(
                        "the namespace of the provided object ({body_ns}) does not match the namespace sent on the request ({ns})"
                    ),
                ));
            }
            obj["metadata"]["namespace"] = json!(ns);
            match self.namespace(ns) {
                None => {
                    let mut e =
                        ApiError::new(404, "NotFound", format!("namespaces \"{ns}\" not found"));
                    e.details = json!({"name": ns, "kind": "namespaces"});
                    return Err(e);
                }
                Some(n) if n["metadata"].get("deletionTimestamp").is_some() => {
                    return Err(ApiError::new(
                        403,
                        "Forbidden",
                        format!(
                            "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                            rt.qualified()
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        let key_ns = if rt.namespaced { ns } else { "" };
        if self.get(rt, key_ns, &name).is_some() {
            let mut e = ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", rt.qualified()),
            );
            e.details = json!({"name": name, "group": rt.group, "kind": rt.plural});
            return Err(e);
        }
        if rt.status
            && rt.kind != "Namespace"
            && let Some(m) = obj.as_object_mut()
        {
            m.remove("status");
        }
        let mut warnings = Vec::new();
        self.admit(rt, None, &mut obj, opts, &mut warnings)?;
        let meta = &mut obj["metadata"];
        meta["uid"] = json!(new_uid());
        meta["creationTimestamp"] = json!(now());
        meta["generation"] = json!(1);
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
            m.remove("resourceVersion");
            m.remove("managedFields");
        }
        if opts.dry_run {
            return Ok(Written {
                object: obj,
                created: true,
                warnings,
            });
        }
        let mut managers = Managers::new();
        let manager = opts
            .field_manager
            .clone()
            .unwrap_or_else(|| "unknown".to_owned());
        patch::record_update(
            &json!({}),
            &owned_part(&obj, rt, false),
            rt.schema.as_ref(),
            &mut managers,
            &manager,
        );
        self.managers
            .insert(meta_str(&obj, "uid").to_owned(), managers);
        let stored = self.commit(rt, key_ns, &name, obj, "ADDED");
        if rt.kind == "Namespace" {
            // What the ServiceAccount controller does for every namespace.
            if let Some(sa) = self.find_kind("v1", "ServiceAccount") {
                let default_sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}});
                let _ = self.create(&sa, &name, default_sa, &WriteOptions::default());
            }
        }
        if rt.kind == "CustomResourceDefinition" {
            return Ok(Written {
                object: self.establish_crd(stored),
                created: true,
                warnings,
            });
        }
        Ok(Written {
            object: with_version(&stored, rt),
            created: true,
            warnings,
        })
    }

    fn namespace(&self, ns: &str) -> Option<&Value> {
        self.objects
            .get(&(String::new(), "namespaces".to_owned()))
            .and_then(|m| m.get(&(String::new(), ns.to_owned())))
    }

    /// A terminating namespace goes once nothing is left in it (the namespace controller).
    fn finish_namespace(&mut self, ns: &str) {
        let Some(obj) = self.namespace(ns).cloned() else {
            return;
        };
        if obj["metadata"].get("deletionTimestamp").is_none() {
            return;
        }
        let occupied = self.types.iter().filter(|t| t.namespaced).any(|t| {
            self.objects
                .get(&(t.group.clone(), t.plural.clone()))
                .is_some_and(|m| m.keys().any(|(n, _)| n == ns))
        });
        if occupied {
            return;
        }
        if let Some(rt) = self.find_kind("v1", "Namespace") {
            self.remove(&rt, "", ns, obj, false);
        }
    }

    /// Registers a CRD's resources and marks it Established.
    fn establish_crd(&mut self, mut crd: Value) -> Value {
        let name = meta_str(&crd, "name").to_owned();
        let served = resources::from_crd(&crd);
        self.types.retain(|t| {
            !served
                .iter()
                .any(|s| s.group == t.group && s.plural == t.plural)
        });
        self.types.extend(served);
        let names = crd["spec"]["names"].clone();
        crd["status"] = json!({
            "acceptedNames": names,
            "storedVersions": crd["spec"]["versions"].as_array().into_iter().flatten()
                .filter(|v| v["storage"].as_bool() == Some(true)).map(|v| v["name"].clone()).collect::<Vec<_>>(),
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now()},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now()},
            ],
        });
        let Some(rt) = self.find_kind("apiextensions.k8s.io/v1", "CustomResourceDefinition") else {
            return crd;
        };
        self.commit(&rt, "", &name, crd, "MODIFIED")
    }

    /// Replaces an object (PUT), on the main resource or its status subresource.
    pub fn update(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        body: Value,
        status: bool,
        opts: &WriteOptions,
    ) -> Result<Written, ApiError> {
        let key_ns = if rt.namespaced { ns } else { "" };
        let old = self
            .get(rt, key_ns, name)
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        let body_rv = meta_str(&body, "resourceVersion");
        if !body_rv.is_empty() && body_rv != meta_str(&old, "resourceVersion") {
            return Err(conflict(rt, name));
        }
        let body_name = meta_str(&body, "name");
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::new(
                400,
                "BadRequest",
                format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({name})"
                ),
            ));
        }
        self.write(rt, key_ns, name, old, body, status, opts, None)
    }

    /// Patches an object; server-side apply creates it when missing.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        kind: PatchKind,
        body: &Value,
        status: bool,
        opts: &WriteOptions,
    ) -> Result<Written, ApiError> {
        let key_ns = if rt.namespaced { ns } else { "" };
        let existing = self.get(rt, key_ns, name);
        if kind == PatchKind::Apply {
            let manager = opts
                .field_manager
                .clone()
                .ok_or_else(|| ApiError::new(400, "BadRequest", "PATCH with application/apply-patch+yaml requires the fieldManager query parameter"))?;
            let applied_name = meta_str(body, "name");
            if !applied_name.is_empty() && applied_name != name {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    format!(
                        "the name of the object ({applied_name}) does not match the name on the URL ({name})"
                    ),
                ));
            }
            let Some(old) = existing else {
                if status {
                    return Err(ApiError::not_found(rt, name));
                }
                let mut obj = owned_part(body, rt, false);
                obj["metadata"]["name"] = json!(name);
                let mut created = self.create(rt, ns, obj, opts)?;
                if !opts.dry_run {
                    let uid = meta_str(&created.object, "uid").to_owned();
                    let mut managers = Managers::new();
                    let mut scratch = json!({});
                    let _ = patch::apply(
                        &mut scratch,
                        &owned_part(body, rt, false),
                        rt.schema.as_ref(),
                        &mut managers,
                        &manager,
                        true,
                    );
                    self.managers.insert(uid, managers);
                }
                created.created = true;
                return Ok(created);
            };
            let uid = meta_str(&old, "uid").to_owned();
            let mut managers = self.managers.get(&uid).cloned().unwrap_or_default();
            let mut candidate = old.clone();
            let applied = owned_part(body, rt, status);
            if let Err(conflicts) = patch::apply(
                &mut candidate,
                &applied,
                rt.schema.as_ref(),
                &mut managers,
                &manager,
                opts.force,
            ) {
                let lines: Vec<String> = conflicts
                    .iter()
                    .map(|c| format!("conflict with \"{}\": {}", c.manager, c.field))
                    .collect();
                let mut e = ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Apply failed with {} conflict{}: {}",
                        conflicts.len(),
                        if conflicts.len() == 1 { "" } else { "s" },
                        lines.join("\n")
                    ),
                );
                e.details = json!({"causes": conflicts.iter().map(|c| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{}\"", c.manager), "field": c.field})).collect::<Vec<_>>()});
                return Err(e);
            }
            return self.write(
                rt,
                key_ns,
                name,
                old,
                candidate,
                status,
                opts,
                Some(managers),
            );
        }
        let old = existing.ok_or_else(|| ApiError::not_found(rt, name))?;
        let mut candidate = old.clone();
        match kind {
            PatchKind::Merge => patch::merge_patch(&mut candidate, body),
            PatchKind::Json => patch::json_patch(&mut candidate, body)
                .map_err(|e| ApiError::new(422, "Invalid", e.to_string()))?,
            PatchKind::Strategic => {
                if rt.schema.is_some() {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                    ));
                }
                patch::strategic_merge(&mut candidate, body);
            }
            PatchKind::Apply => {}
        }
        let patched_rv = meta_str(&candidate, "resourceVersion");
        if patched_rv != meta_str(&old, "resourceVersion") && !patched_rv.is_empty() {
            return Err(conflict(rt, name));
        }
        self.write(rt, key_ns, name, old, candidate, status, opts, None)
    }

    /// The common tail of every update: status-subresource rules, immutable metadata,
    /// generation, admission, no-op detection, finalizer-driven removal.
    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        old: Value,
        candidate: Value,
        status: bool,
        opts: &WriteOptions,
        managers: Option<Managers>,
    ) -> Result<Written, ApiError> {
        let mut new = if status {
            let mut n = old.clone();
            n["status"] = candidate.get("status").cloned().unwrap_or(Value::Null);
            if n["status"].is_null()
                && let Some(m) = n.as_object_mut()
            {
                m.remove("status");
            }
            n
        } else {
            let mut n = candidate;
            if rt.status {
                match old.get("status") {
                    Some(s) => n["status"] = s.clone(),
                    None => {
                        if let Some(m) = n.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            n
        };
        new["apiVersion"] = json!(rt.api_version());
        new["kind"] = json!(rt.kind);
        if !new["metadata"].is_object() {
            new["metadata"] = json!({});
        }
        for keep in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "generation",
            "resourceVersion",
        ] {
            match old["metadata"].get(keep) {
                Some(v) => new["metadata"][keep] = v.clone(),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(keep);
                    }
                }
            }
        }
        if let Some(m) = new["metadata"].as_object_mut() {
            m.remove("managedFields");
        }
        if old["metadata"].get("deletionTimestamp").is_some() {
            let old_f = old["metadata"]["finalizers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let new_f = new["metadata"]["finalizers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if new_f.iter().any(|f| !old_f.contains(f)) {
                return Err(ApiError::new(
                    422,
                    "Forbidden",
                    format!(
                        "{} \"{name}\" is being deleted: no new finalizers can be added",
                        rt.qualified()
                    ),
                ));
            }
        }
        let mut warnings = Vec::new();
        self.admit(rt, Some(&old), &mut new, opts, &mut warnings)?;
        if spec_part(&new) != spec_part(&old) {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            new["metadata"]["generation"] = json!(generation);
        }
        if new == old {
            return Ok(Written {
                object: old,
                created: false,
                warnings,
            });
        }
        if opts.dry_run {
            return Ok(Written {
                object: new,
                created: false,
                warnings,
            });
        }
        let uid = meta_str(&old, "uid").to_owned();
        let managers = match managers {
            Some(m) => m,
            None => {
                let mut m = self.managers.get(&uid).cloned().unwrap_or_default();
                let manager = opts
                    .field_manager
                    .clone()
                    .unwrap_or_else(|| "unknown".to_owned());
                patch::record_update(
                    &owned_part(&old, rt, status),
                    &owned_part(&new, rt, status),
                    rt.schema.as_ref(),
                    &mut m,
                    &manager,
                );
                m
            }
        };
        self.managers.insert(uid, managers);
        let finalized = new["metadata"].get("deletionTimestamp").is_some()
            && new["metadata"]["finalizers"]
                .as_array()
                .is_none_or(Vec::is_empty);
        if finalized {
            let object = self.remove(rt, ns, name, new, false);
            return Ok(Written {
                object,
                created: false,
                warnings,
            });
        }
        let stored = self.commit(rt, ns, name, new, "MODIFIED");
        if rt.kind == "CustomResourceDefinition" && !status {
            return Ok(Written {
                object: self.establish_crd(stored),
                created: false,
                warnings,
            });
        }
        Ok(Written {
            object: with_version(&stored, rt),
            created: false,
            warnings,
        })
    }

    /// DELETE: marks objects with finalizers, removes the others (and collects dependents).
    pub fn delete(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        orphan: bool,
    ) -> Result<Value, ApiError> {
        let key_ns = if rt.namespaced { ns } else { "" };
        let mut obj = self
            .get(rt, key_ns, name)
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        if rt.kind == "Namespace" {
            // Terminating until its content is gone; content with finalizers keeps it there.
            if obj["metadata"].get("deletionTimestamp").is_none() {
                obj["metadata"]["deletionTimestamp"] = json!(now());
                obj["status"]["phase"] = json!("Terminating");
                obj = self.commit(rt, "", name, obj, "MODIFIED");
            }
            self.delete_namespace_contents(name);
            self.finish_namespace(name);
            return Ok(with_version(&obj, rt));
        }
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if obj["metadata"].get("deletionTimestamp").is_none() {
                obj["metadata"]["deletionTimestamp"] = json!(now());
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                let generation = obj["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                obj["metadata"]["generation"] = json!(generation);
                let stored = self.commit(rt, key_ns, name, obj, "MODIFIED");
                return Ok(with_version(&stored, rt));
            }
            return Ok(obj);
        }
        Ok(self.remove(rt, key_ns, name, obj, orphan))
    }

    fn delete_namespace_contents(&mut self, ns: &str) {
        let mut victims = Vec::new();
        for rt in self.types.iter().filter(|t| t.namespaced) {
            if let Some(m) = self.objects.get(&(rt.group.clone(), rt.plural.clone())) {
                for (n, name) in m.keys() {
                    if n == ns {
                        victims.push((rt.clone(), name.clone()));
                    }
                }
            }
        }
        for (rt, name) in victims {
            let _ = self.delete(&rt, ns, &name, false);
        }
    }

    /// Removes an object for good, then garbage-collects what it owned.
    fn remove(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        obj: Value,
        orphan: bool,
    ) -> Value {
        let uid = meta_str(&obj, "uid").to_owned();
        let gone = self.commit(rt, ns, name, obj, "DELETED");
        if rt.kind == "CustomResourceDefinition" {
            self.drop_crd(&gone);
        }
        let mut dependents = Vec::new();
        for t in &self.types {
            if let Some(m) = self.objects.get(&(t.group.clone(), t.plural.clone())) {
                for ((dns, dname), o) in m {
                    let owned = o["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|refs| {
                            refs.iter().any(|r| r["uid"].as_str() == Some(uid.as_str()))
                        });
                    if owned {
                        dependents.push((t.clone(), dns.clone(), dname.clone()));
                    }
                }
            }
        }
        for (t, dns, dname) in dependents {
            if orphan {
                if let Some(mut o) = self.get(&t, &dns, &dname) {
                    if let Some(refs) = o["metadata"]["ownerReferences"].as_array_mut() {
                        refs.retain(|r| r["uid"].as_str() != Some(uid.as_str()));
                    }
                    self.commit(&t, &dns, &dname, o, "MODIFIED");
                }
            } else {
                let _ = self.delete(&t, &dns, &dname, false);
            }
        }
        if rt.namespaced {
            self.finish_namespace(ns);
        }
        with_version(&gone, rt)
    }

    fn drop_crd(&mut self, crd: &Value) {
        for t in resources::from_crd(crd) {
            let names: Vec<(String, String)> = self
                .objects
                .get(&(t.group.clone(), t.plural.clone()))
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            for (ns, name) in names {
                if let Some(obj) = self.get(&t, &ns, &name) {
                    self.remove(&t, &ns, &name, obj, false);
                }
            }
            self.types
                .retain(|x| !(x.group == t.group && x.plural == t.plural));
        }
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

fn conflict(rt: &ResourceType, name: &str) -> ApiError {
    let mut e = ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            rt.qualified()
        ),
    );
    e.details = json!({"name": name, "group": rt.group, "kind": rt.plural});
    e
}

/// Objects are stored once per group/plural; they are served in the requested version.
fn with_version(obj: &Value, rt: &ResourceType) -> Value {
    let mut o = obj.clone();
    o["apiVersion"] = json!(rt.api_version());
    o
}

fn field_error(field: &str, reason: &'static str, message: String) -> FieldError {
    FieldError {
        field: field.to_owned(),
        reason,
        message,
    }
}

/// Defaults and validation of the built-in kinds the project uses (the parts that matter to
/// the operator: Secret stringData, Deployment/Job defaults, immutable fields).
fn builtin_admission(
    rt: &ResourceType,
    old: Option<&Value>,
    obj: &mut Value,
    errors: &mut Vec<FieldError>,
) {
    match (rt.group.as_str(), rt.kind.as_str()) {
        ("", "Secret") => {
            if let Some(Value::Object(string_data)) =
                obj.as_object_mut().and_then(|m| m.remove("stringData"))
            {
                use base64::Engine;
                for (k, v) in string_data {
                    let text = v
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string());
                    obj["data"][k] = json!(base64::engine::general_purpose::STANDARD.encode(text));
                }
            }
            if obj.get("type").is_none() {
                obj["type"] = json!("Opaque");
            }
        }
        ("apps", "Deployment") => {
            let spec = &mut obj["spec"];
            if spec.get("replicas").is_none() {
                spec["replicas"] = json!(1);
            }
            if spec.get("strategy").is_none() {
                spec["strategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}});
            }
            for (k, v) in [
                ("revisionHistoryLimit", 10),
                ("progressDeadlineSeconds", 600),
            ] {
                if spec.get(k).is_none() {
                    spec[k] = json!(v);
                }
            }
            pod_template_defaults(&mut spec["template"], "Always");
            let selector = spec["selector"]["matchLabels"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            if selector.is_empty() {
                errors.push(field_error(
                    "spec.selector",
                    "FieldValueRequired",
                    "Required value".into(),
                ));
            }
            let labels = &spec["template"]["metadata"]["labels"];
            if selector.iter().any(|(k, v)| labels.get(k) != Some(v)) {
                errors.push(field_error(
                    "spec.template.metadata.labels",
                    "FieldValueInvalid",
                    "Invalid value: `selector` does not match template `labels`".into(),
                ));
            }
            if let Some(old) = old
                && old["spec"]["selector"] != obj["spec"]["selector"]
            {
                errors.push(field_error(
                    "spec.selector",
                    "FieldValueInvalid",
                    format!(
                        "Invalid value: {}: field is immutable",
                        obj["spec"]["selector"]
                    ),
                ));
            }
        }
        ("batch", "Job") => {
            let spec = &mut obj["spec"];
            for (k, v) in [("backoffLimit", 6), ("completions", 1), ("parallelism", 1)] {
                if spec.get(k).is_none() {
                    spec[k] = json!(v);
                }
            }
            pod_template_defaults(&mut spec["template"], "");
            let policy = spec["template"]["spec"]["restartPolicy"]
                .as_str()
                .unwrap_or_default();
            if !matches!(policy, "Never" | "OnFailure") {
                errors.push(field_error(
                    "spec.template.spec.restartPolicy",
                    "FieldValueRequired",
                    format!(
                        "Required value: valid values: \"OnFailure\", \"Never\" (got {policy:?})"
                    ),
                ));
            }
            if let Some(old) = old
                && old["spec"]["template"] != obj["spec"]["template"]
            {
                errors.push(field_error(
                    "spec.template",
                    "FieldValueInvalid",
                    "Invalid value: field is immutable".into(),
                ));
            }
        }
        ("batch", "CronJob") => {
            let spec = &mut obj["spec"];
            if spec.get("concurrencyPolicy").is_none() {
                spec["concurrencyPolicy"] = json!("Allow");
            }
            if spec.get("suspend").is_none() {
                spec["suspend"] = json!(false);
            }
            if spec["schedule"]
                .as_str()
                .is_none_or(|s| crate::cron::Schedule::parse(s).is_err())
            {
                errors.push(field_error(
                    "spec.schedule",
                    "FieldValueInvalid",
                    format!(
                        "Invalid value: {}: not a standard 5-field cron schedule",
                        spec["schedule"]
                    ),
                ));
            }
            pod_template_defaults(&mut spec["jobTemplate"]["spec"]["template"], "");
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => crd_admission(obj, errors),
        _ => {}
    }
    if obj["metadata"]["name"]
        .as_str()
        .is_some_and(|n| !valid_dns_subdomain(n))
    {
        errors.push(field_error("metadata.name", "FieldValueInvalid", format!("Invalid value: {}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'", obj["metadata"]["name"])));
    }
}

/// The API server's checks of a CRD that matter here: names, and that every schema `default`
/// is valid against its own schema node (a YAML 1.1 `off` that became `false` fails this).
fn crd_admission(crd: &Value, errors: &mut Vec<FieldError>) {
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let plural = spec["names"]["plural"].as_str().unwrap_or_default();
    let expected = format!("{plural}.{group}");
    if crd["metadata"]["name"].as_str() != Some(expected.as_str()) {
        errors.push(field_error(
            "metadata.name",
            "FieldValueInvalid",
            format!(
                "Invalid value: {}: must be spec.names.plural+\".\"+spec.group",
                crd["metadata"]["name"]
            ),
        ));
    }
    if spec["names"]["kind"].as_str().is_none_or(str::is_empty) {
        errors.push(field_error(
            "spec.names.kind",
            "FieldValueRequired",
            "Required value".into(),
        ));
    }
    for (i, version) in spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(schema) = version["schema"].get("openAPIV3Schema") {
            check_defaults(
                schema,
                &format!("spec.versions[{i}].schema.openAPIV3Schema"),
                errors,
            );
        }
    }
}

fn check_defaults(node: &Value, path: &str, errors: &mut Vec<FieldError>) {
    if let Some(default) = node.get("default") {
        let mut found = Vec::new();
        schema::validate(node, default, &format!("{path}.default"), &mut found);
        for e in found {
            errors.push(field_error(
                &format!("{path}.default"),
                "FieldValueInvalid",
                format!("Invalid value: {default}: {}", e.message),
            ));
        }
    }
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (k, child) in props {
            check_defaults(child, &format!("{path}.properties[{k}]"), errors);
        }
    }
    if let Some(items) = node.get("items") {
        check_defaults(items, &format!("{path}.items"), errors);
    }
    if let Some(additional) = node.get("additionalProperties").filter(|a| a.is_object()) {
        check_defaults(additional, &format!("{path}.additionalProperties"), errors);
    }
}

fn pod_template_defaults(template: &mut Value, restart: &str) {
    let spec = &mut template["spec"];
    if spec.get("restartPolicy").is_none() && !restart.is_empty() {
        spec["restartPolicy"] = json!(restart);
    }
    if spec.get("terminationGracePeriodSeconds").is_none() {
        spec["terminationGracePeriodSeconds"] = json!(30);
    }
    if spec.get("dnsPolicy").is_none() {
        spec["dnsPolicy"] = json!("ClusterFirst");
    }
    if let Some(containers) = spec["containers"].as_array_mut() {
        for c in containers {
            if c.get("imagePullPolicy").is_none() {
                let latest = c["image"]
                    .as_str()
                    .is_some_and(|i| !i.contains(':') || i.ends_with(":latest"));
                c["imagePullPolicy"] = json!(if latest { "Always" } else { "IfNotPresent" });
            }
            if c.get("terminationMessagePath").is_none() {
                c["terminationMessagePath"] = json!("/dev/termination-log");
            }
        }
    }
}

fn valid_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}
