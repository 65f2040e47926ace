//! RBAC for ServiceAccount identities: processes the kubelet starts authenticate with a token
//! naming their pod's ServiceAccount, and every resource request they make is checked against
//! the Roles/ClusterRoles bound to it (so a least-privilege Role that is too tight fails here
//! as it would on a cluster). Requests without such a token (tests, kubectl, the operator) are
//! cluster-admin.

use serde_json::Value;

use crate::store::Store;

/// Bearer tokens of ServiceAccounts: `emulator-sa:<namespace>:<name>`.
const TOKEN_PREFIX: &str = "emulator-sa:";

pub fn token_for(namespace: &str, service_account: &str) -> String {
    format!("{TOKEN_PREFIX}{namespace}:{service_account}")
}

/// The ServiceAccount `(namespace, name)` an `Authorization` header authenticates, if any.
pub fn identity(authorization: Option<&str>) -> Option<(String, String)> {
    let token = authorization?
        .strip_prefix("Bearer ")?
        .strip_prefix(TOKEN_PREFIX)?;
    let (ns, name) = token.split_once(':')?;
    Some((ns.to_owned(), name.to_owned()))
}

/// One resource request, in RBAC terms.
#[derive(Debug)]
pub struct Request<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    /// `plural` or `plural/subresource`.
    pub resource: &'a str,
    pub name: Option<&'a str>,
    /// `None` for cluster-scoped resources and cross-namespace lists.
    pub namespace: Option<&'a str>,
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn rule_allows(rule: &Value, req: &Request<'_>) -> bool {
    let groups = strings(&rule["apiGroups"]);
    let resources = strings(&rule["resources"]);
    let verbs = strings(&rule["verbs"]);
    let names = strings(&rule["resourceNames"]);
    let plural = req.resource.split('/').next().unwrap_or_default();
    let resource_ok = resources.iter().any(|r| {
        *r == "*"
            || *r == req.resource
            || (r.ends_with("/*")
                && r.trim_end_matches("/*") == plural
                && req.resource.contains('/'))
    });
    (groups.contains(&"*") || groups.contains(&req.group))
        && resource_ok
        && (verbs.contains(&"*") || verbs.contains(&req.verb))
        && (names.is_empty() || req.name.is_some_and(|n| names.contains(&n)))
}

fn subject_matches(binding: &Value, sa_ns: &str, sa_name: &str) -> bool {
    let binding_ns = binding["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default();
    binding["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| match s["kind"].as_str() {
            Some("ServiceAccount") => {
                s["name"] == sa_name && s["namespace"].as_str().unwrap_or(binding_ns) == sa_ns
            }
            Some("Group") => {
                matches!(
                    s["name"].as_str(),
                    Some("system:serviceaccounts" | "system:authenticated")
                ) || s["name"].as_str() == Some(&format!("system:serviceaccounts:{sa_ns}"))
            }
            Some("User") => {
                s["name"].as_str() == Some(&format!("system:serviceaccount:{sa_ns}:{sa_name}"))
            }
            _ => false,
        })
}

fn role_rules(store: &Store, role_ref: &Value, binding_ns: &str) -> Vec<Value> {
    let name = role_ref["name"].as_str().unwrap_or_default();
    let found = match role_ref["kind"].as_str() {
        Some("Role") => store
            .find_kind("rbac.authorization.k8s.io/v1", "Role")
            .and_then(|rt| store.get(&rt, binding_ns, name)),
        Some("ClusterRole") => store
            .find_kind("rbac.authorization.k8s.io/v1", "ClusterRole")
            .and_then(|rt| store.get(&rt, "", name)),
        _ => None,
    };
    found
        .and_then(|r| r["rules"].as_array().cloned())
        .unwrap_or_default()
}

/// Whether the ServiceAccount may make the request.
pub fn allowed(store: &Store, sa_ns: &str, sa_name: &str, req: &Request<'_>) -> bool {
    let mut rules = Vec::new();
    if let Some(ns) = req.namespace
        && let Some(rt) = store.find_kind("rbac.authorization.k8s.io/v1", "RoleBinding")
    {
        for b in store
            .list(&rt, Some(ns))
            .iter()
            .filter(|b| subject_matches(b, sa_ns, sa_name))
        {
            rules.extend(role_rules(store, &b["roleRef"], ns));
        }
    }
    if let Some(rt) = store.find_kind("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") {
        for b in store
            .list(&rt, None)
            .iter()
            .filter(|b| subject_matches(b, sa_ns, sa_name))
        {
            rules.extend(role_rules(store, &b["roleRef"], ""));
        }
    }
    rules.iter().any(|r| rule_allows(r, req))
}

/// The API server's wording of a denial.
pub fn forbidden_message(sa_ns: &str, sa_name: &str, req: &Request<'_>, qualified: &str) -> String {
    let (plural, sub) = req
        .resource
        .split_once('/')
        .map_or((req.resource, None), |(p, s)| (p, Some(s)));
    let what = match req.name {
        Some(n) => format!("{qualified} \"{n}\" is forbidden"),
        None => format!("{qualified} is forbidden"),
    };
    let resource = match sub {
        Some(s) => format!("resource \"{plural}/{s}\""),
        None => format!("resource \"{plural}\""),
    };
    let scope = match req.namespace {
        Some(ns) => format!(" in the namespace \"{ns}\""),
        None => " at the cluster scope".to_owned(),
    };
    format!(
        "{what}: User \"system:serviceaccount:{sa_ns}:{sa_name}\" cannot {} {resource} in API group \"{}\"{scope}",
        req.verb, req.group
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn rules_match_verbs_resources_and_names() {
        let rule = json!({"apiGroups": ["wallaby.dev"], "resources": ["flows/status"], "verbs": ["patch"], "resourceNames": ["a"]});
        let req = |verb, resource, name| Request {
            verb,
            group: "wallaby.dev",
            resource,
            name,
            namespace: Some("ns"),
        };
        assert!(rule_allows(&rule, &req("patch", "flows/status", Some("a"))));
        assert!(!rule_allows(
            &rule,
            &req("patch", "flows/status", Some("b"))
        ));
        assert!(!rule_allows(&rule, &req("patch", "flows", Some("a"))));
        assert!(!rule_allows(
            &rule,
            &req("update", "flows/status", Some("a"))
        ));
        assert_eq!(
            identity(Some(&format!("Bearer {}", token_for("ns", "sa")))),
            Some(("ns".into(), "sa".into()))
        );
    }
}
