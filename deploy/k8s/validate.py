#!/usr/bin/env python3
"""Validates the manifests of deploy/k8s against the Kubernetes schemas, offline.

Usage: validate.py [DIR]              (default: the directory of this script)
       validate.py --containers [DIR]  prints every container of the kit as JSON lines
                                       (resource, container, init, command, args, env) and
                                       checks nothing; tests/tests/deploy_kits.rs runs them

Every resource of every *.yaml (and *.yaml.example) is validated strictly (unknown fields are errors) with
kubernetes-validate's bundled schemas for each version in VERSIONS. LeaderWorkerSet is a CRD
whose schema is not bundled: its envelope is checked here by hand and its pod templates are
validated as Pods. Then the kit's cross-references are checked (what the schemas cannot
see): the workers' --router_url names exactly the routers the autoscaler may create, each
Secret a pod mounts is in the kit, a TP group's --tp_size is its LeaderWorkerSet size, and
the routers' --worker_url_allowlist names every worker pod. Exit status 1 on any error.
"""

import glob
import json
import os
import sys

import kubernetes_validate
import yaml

# The oldest and the newest minor the pinned kubernetes-validate ships schemas for that the
# kit supports (autoscaling/v2 behavior, NetworkPolicy, StatefulSet ordinals).
VERSIONS = ["1.30.0", "1.37.0"]
LWS_API = "leaderworkerset.x-k8s.io/v1"

errors = []


def error(where, message):
    errors.append(f"{where}: {message}")


def pod_specs(resource):
    """(name, pod spec) of every pod template in a resource."""
    spec = resource.get("spec", {})
    if resource["kind"] == "LeaderWorkerSet":
        lwt = spec.get("leaderWorkerTemplate", {})
        for key in ("leaderTemplate", "workerTemplate"):
            if key in lwt:
                yield key, lwt[key].get("spec", {})
    elif "template" in spec:
        yield "template", spec["template"].get("spec", {})


def args_of(spec):
    for c in spec.get("containers", []):
        for a in c.get("command", []) + c.get("args", []):
            yield a


def flag(spec, name):
    for a in args_of(spec):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def check_lws(where, resource):
    """The parts of LeaderWorkerSet's v1 schema the kit uses, then its pods as Pods."""
    if resource.get("apiVersion") != LWS_API:
        error(where, f"apiVersion {resource.get('apiVersion')!r}, expected {LWS_API}")
    spec = resource.get("spec", {})
    known = {"replicas", "startupPolicy", "leaderWorkerTemplate", "rolloutStrategy", "networkConfig"}
    for key in spec:
        if key not in known:
            error(where, f"spec.{key} is not a LeaderWorkerSet field ({sorted(known)})")
    lwt = spec.get("leaderWorkerTemplate")
    if not isinstance(lwt, dict) or "workerTemplate" not in lwt:
        error(where, "spec.leaderWorkerTemplate.workerTemplate is required")
        return
    known = {"leaderTemplate", "workerTemplate", "size", "restartPolicy", "subGroupPolicy"}
    for key in lwt:
        if key not in known:
            error(where, f"spec.leaderWorkerTemplate.{key} is not a LeaderWorkerSet field")
    size = lwt.get("size", 1)
    if not isinstance(size, int) or size < 1:
        error(where, f"spec.leaderWorkerTemplate.size {size!r} must be a positive integer")
    if lwt.get("restartPolicy", "RecreateGroupOnPodRestart") not in ("RecreateGroupOnPodRestart", "None"):
        error(where, f"restartPolicy {lwt.get('restartPolicy')!r}")
    if spec.get("startupPolicy", "LeaderCreated") not in ("LeaderCreated", "LeaderReady"):
        error(where, f"startupPolicy {spec.get('startupPolicy')!r}")
    for key in ("leaderTemplate", "workerTemplate"):
        if key not in lwt:
            continue
        template = lwt[key]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{resource['metadata']['name']}-{key.lower()}", **template.get("metadata", {})}, "spec": template.get("spec", {})}
        validate(f"{where} {key} (as a Pod)", pod)


def validate(where, resource):
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            error(where, f"Kubernetes {version}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            error(where, f"Kubernetes {version}: no schema ({e})")


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    resources = []
    files = sorted(glob.glob(os.path.join(root, "*.yaml")) + glob.glob(os.path.join(root, "*.yaml.example")))
    if not files:
        error(root, "no *.yaml manifests")
    for path in files:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    resources.append((os.path.basename(path), doc))
    for name, r in resources:
        where = f"{name} {r.get('kind')}/{r.get('metadata', {}).get('name')}"
        if r.get("kind") == "LeaderWorkerSet":
            check_lws(where, r)
            print(f"{where}: CRD, envelope checked by hand, pod templates validated as Pods")
        else:
            validate(where, r)
            print(f"{where}: validated against Kubernetes {', '.join(VERSIONS)} (strict)")

    by_kind = {}
    for name, r in resources:
        by_kind.setdefault(r["kind"], []).append(r)
    # The routers the autoscaler may run, by their stable names.
    routers = [s for s in by_kind.get("StatefulSet", []) if s["metadata"]["name"] == "llmapi-router"]
    hpas = [h for h in by_kind.get("HorizontalPodAutoscaler", []) if h["spec"]["scaleTargetRef"]["name"] == "llmapi-router"]
    if len(routers) != 1 or len(hpas) != 1:
        error("router.yaml", "expected one StatefulSet llmapi-router and one HorizontalPodAutoscaler for it")
        return
    router, hpa = routers[0], hpas[0]
    service = router["spec"]["serviceName"]
    expected = [f"http://llmapi-router-{i}.{service}:8000" for i in range(hpa["spec"]["maxReplicas"])]
    secrets = {s["metadata"]["name"] for s in by_kind.get("Secret", [])}
    allowlist = set((flag(next(iter(dict(pod_specs(router)).values())), "worker_url_allowlist") or "").split(","))
    for name, r in resources:
        for key, spec in pod_specs(r):
            where = f"{name} {r['kind']}/{r['metadata']['name']} {key}"
            for v in spec.get("volumes", []):
                ref = v.get("secret", {}).get("secretName")
                if ref and ref not in secrets:
                    error(where, f"mounts Secret {ref}, which the kit does not define")
            urls = flag(spec, "router_url")
            if r is router or urls is None:
                continue
            if urls.split(",") != expected:
                error(where, f"--router_url {urls} must name every router the autoscaler may run (maxReplicas {hpa['spec']['maxReplicas']}): {','.join(expected)}")
            if r["kind"] == "StatefulSet":
                names = {f"{r['metadata']['name']}-{i}.{r['spec']['serviceName']}" for i in range(r["spec"]["replicas"])}
            elif r["kind"] == "LeaderWorkerSet":
                size = r["spec"]["leaderWorkerTemplate"].get("size", 1)
                tp = flag(spec, "tp_size")
                if tp is None or int(tp) != size:
                    error(where, f"--tp_size {tp} must equal the group size {size}")
                lws = r["metadata"]["name"]
                names = {f"{lws}-{g}.{lws}" for g in range(r["spec"].get("replicas", 1))}
            else:
                names = set()
            missing = sorted(names - allowlist)
            if missing:
                error(where, f"the routers' --worker_url_allowlist lacks {','.join(missing)}")


def containers(root):
    for path in sorted(glob.glob(os.path.join(root, "*.yaml"))):
        with open(path) as f:
            for r in yaml.safe_load_all(f):
                if not r:
                    continue
                for key, spec in pod_specs(r):
                    for init, c in [(True, c) for c in spec.get("initContainers", [])] + [(False, c) for c in spec.get("containers", [])]:
                        env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
                        print(json.dumps({"resource": f"{r['kind']}/{r['metadata']['name']}", "template": key, "container": c["name"], "init": init, "image": c.get("image"), "command": c.get("command"), "args": c.get("args", []), "env": env}))


if len(sys.argv) > 1 and sys.argv[1] == "--containers":
    containers(sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(os.path.abspath(__file__)))
    sys.exit(0)
main()
for e in errors:
    print(f"ERROR {e}", file=sys.stderr)
if errors:
    sys.exit(1)
print("ok")
