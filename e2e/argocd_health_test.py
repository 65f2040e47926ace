"""Runs charts/wallaby/argocd/flow-health.lua against sample Flows, the way Argo CD does
(the object as the global `obj`, the returned table's status and message), in LuaJIT
(Lua 5.1, the dialect of Argo CD's gopher-lua) through lupa. Run by e2e/argocd-health.sh."""

import pathlib
import sys

import lupa.luajit21 as lupa

SCRIPT = (pathlib.Path(__file__).resolve().parent.parent
          / "charts/wallaby/argocd/flow-health.lua").read_text()


def cond(kind, status, reason="R", message=""):
    return {"type": kind, "status": status, "reason": reason, "message": message}


def flow(generation=1, suspend=None, status=None):
    obj = {"apiVersion": "wallaby.dev/v1alpha1", "kind": "Flow",
           "metadata": {"name": "orders", "namespace": "apps", "generation": generation},
           "spec": {"source": {"postgres": {"slot": "s", "publication": "p"}},
                    "destinations": [{"name": "lake"}]}}
    if suspend is not None:
        obj["spec"]["suspend"] = suspend
    if status is not None:
        obj["status"] = status
    return obj


# (name, object, expected status, substring of the message)
CASES = [
    ("no status yet", flow(), "Progressing", "Waiting for the operator"),
    ("ready", flow(status={"observedGeneration": 1, "phase": "Running",
                           "conditions": [cond("Ready", "True", message="streaming changes"),
                                          cond("Progressing", "False")]}),
     "Healthy", "streaming changes"),
    ("ready but spec not observed", flow(generation=3, status={
        "observedGeneration": 2, "conditions": [cond("Ready", "True")]}),
     "Progressing", "generation 3"),
    ("progressing", flow(status={"observedGeneration": 1, "conditions": [
        cond("Ready", "False"), cond("Progressing", "True", message="rolling out the worker")]}),
     "Progressing", "rolling out the worker"),
    ("degraded condition", flow(status={"observedGeneration": 1, "conditions": [
        cond("Ready", "True"), cond("Degraded", "True", message="lake: 3 failed attempt(s)")]}),
     "Degraded", "lake: 3 failed"),
    ("degraded condition false is healthy", flow(status={"observedGeneration": 1, "conditions": [
        cond("Ready", "True"), cond("Degraded", "False")]}),
     "Healthy", ""),
    ("phase failed", flow(status={"observedGeneration": 1, "phase": "Failed", "conditions": [
        cond("Ready", "False", message="slot s is active for another PID")]}),
     "Degraded", "slot s is active"),
    ("invalid spec: not ready, not progressing", flow(status={"observedGeneration": 1, "conditions": [
        cond("Ready", "False", reason="InvalidSpec", message="Destination lake not found"),
        cond("Progressing", "False")]}),
     "Degraded", "Destination lake not found"),
    ("suspended beats failed", flow(suspend=True, status={"phase": "Failed"}),
     "Suspended", "suspended"),
    ("suspend false is not suspended", flow(suspend=False, status={
        "observedGeneration": 1, "conditions": [cond("Ready", "True")]}),
     "Healthy", ""),
    ("empty conditions", flow(status={"observedGeneration": 1}), "Progressing", "Waiting"),
]


def health(lua, obj):
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(SCRIPT)
    return hs["status"], hs["message"]


def main():
    failures = 0
    for name, obj, want, fragment in CASES:
        lua = lupa.LuaRuntime(unpack_returned_tuples=True)
        got, message = health(lua, obj)
        ok = got == want and fragment in (message or "")
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {got} ({message})"
              + ("" if ok else f"; want {want} with {fragment!r}"))
    print(f"{len(CASES) - failures}/{len(CASES)} cases pass")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
