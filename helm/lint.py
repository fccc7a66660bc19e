#!/usr/bin/env python3
"""Lint and render-check the packmeter Helm chart with real Helm.

Helm comes from the PyPI package helm-sdkpy, which embeds the Helm Go library
(no `helm` binary needed):

    pip install --ignore-requires-python helm-sdkpy pyyaml
    python3 helm/lint.py                   # every check below
    python3 helm/lint.py --print-defaults  # JSON the Rust tests compare with the binary
    python3 helm/lint.py --print-default-toml  # the default packmeter.toml, for the binary to parse
    python3 helm/lint.py --render helm/packmeter/ci/postgres-values.yaml  # rendered objects, as JSON

For the chart defaults and for every `helm/packmeter/ci/*-values.yaml`:

1. **lint**: Helm's own linter (`helm lint`). helm-sdkpy's Lint takes no
   values, so the chart is copied to a temporary directory whose values.yaml
   is the defaults deep-merged with the CI file, exactly as `-f` would merge
   them. Lint warnings and errors fail the run. Helm's lint mode only *logs*
   the chart's own `fail` checks instead of failing, so stderr is captured
   and such a log line fails the run too.
2. **render**: helm-sdkpy has no `template`/dry-run action, so the chart is
   installed with Helm's real Install action into an in-process fake
   Kubernetes API server bound to 127.0.0.1 (it accepts every object and
   keeps none). Helm returns the rendered manifest, and the checks below read
   it: the workload each mode must (or must not) have, the packmeter.toml in
   the ConfigMap, probes, the security context, the grace period versus the
   shutdown grace, the PostgreSQL Secret, PVC/PDB/ServiceMonitor, and in
   sidecar mode the pod-spec fragment that NOTES.txt prints.

Then a few deliberately broken value sets must be rejected by both lint and
render with a message naming the problem.

Output: one PASS/FAIL line per check, then `N passed, M failed`.
Exit status: 0 when everything passed, 1 when anything failed, 2 when
helm-sdkpy (or PyYAML, or a TOML parser) is unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHART = HERE / "packmeter"
RELEASE = "pm"
NAMESPACE = "default"
CONFIG_PATH = "/etc/packmeter/packmeter.toml"
BINARY = "/usr/local/bin/packmeter"

# Value sets the chart must refuse: (name, overrides, text the error must contain).
MUST_FAIL = [
    ("grace-shorter-than-drain", {"terminationGracePeriodSeconds": 20},
     "terminationGracePeriodSeconds (20) must be greater"),
    ("unknown-mode", {"mode": "statefulset"}, "mode"),
    ("postgres-without-url", {"store": {"type": "postgres"}},
     "needs store.postgres.existingSecret"),
    ("sqlite-with-replicas", {"deployment": {"replicas": 3}},
     "allows deployment.replicas=1 only"),
    ("daemonset-with-pvc", {"mode": "daemonset", "persistence": {"type": "pvc"}},
     "not available in daemonset mode"),
    ("sqlite-outside-volume", {"store": {"sqlite": {"path": "/data/packmeter.db"}}},
     "must be inside persistence.mountPath"),
    ("postgres-replicas-sharing-a-claim",
     {"store": {"type": "postgres", "postgres": {"existingSecret": "pg"}},
      "deployment": {"replicas": 3},
      "persistence": {"type": "pvc", "pvc": {"existingClaim": "shared"}}},
     "the same spill file"),
    ("tls-with-grpc-probes", {"tls": {"existingSecret": "packmeter-grpc-tls"}},
     "kubelet's gRPC probes speak plaintext"),
    ("tls-client-auth-without-secret", {"tls": {"clientAuth": True}},
     "tls.clientAuth needs tls.existingSecret"),
    ("flush-max-lag-not-a-duration", {"config": {"flushMaxLag": "soon"}}, "flushMaxLag"),
]

SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


# === values ===

def load_yaml_module():
    try:
        import yaml  # type: ignore[import]
    except ImportError as e:
        print(f"lint.py: PyYAML is not importable ({e}); install it with `pip install pyyaml`",
              file=sys.stderr)
        sys.exit(2)
    return yaml


def deep_merge(base: dict, override: dict) -> dict:
    """Helm's coalescing of user values over chart defaults: maps merge
    recursively, anything else replaces, and null deletes the key."""
    out = copy.deepcopy(base)
    for key, val in override.items():
        if val is None:
            out.pop(key, None)
        elif isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], val)
        else:
            out[key] = copy.deepcopy(val)
    return out


def grace_floor(v: dict) -> int:
    return int(v["preStop"]["sleepSeconds"]) + int(v["config"]["shutdownGraceSeconds"])


def expected_grace_period(v: dict) -> int:
    """Mirror of the chart's packmeter.terminationGracePeriodSeconds."""
    explicit = v.get("terminationGracePeriodSeconds")
    if explicit is None or explicit == "":
        return grace_floor(v) + int(v["terminationGraceMarginSeconds"])
    return int(explicit)


def persistence_type(v: dict) -> str:
    """Mirror of the chart's packmeter.persistenceType."""
    if v["persistence"]["type"]:
        return v["persistence"]["type"]
    if v["store"]["type"] == "postgres" and v["mode"] != "daemonset":
        return "emptyDir"
    return {"deployment": "pvc", "daemonset": "hostPath"}.get(v["mode"], "emptyDir")


def print_defaults(yaml) -> int:
    v = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    c, p = v["config"], v["probes"]

    def probe(kind: str) -> dict:
        return {
            "enabled": p[kind]["enabled"],
            "type": p["type"],
            "grpc_port": c["grpcPort"],
            "grpc_service": p[kind]["grpcService"],
            "http_port": c["adminPort"],
            "http_path": p[kind]["httpPath"],
        }

    tag = v["image"]["tag"] or chart["appVersion"]
    out = {
        "grpc_port": c["grpcPort"],
        "admin_port": c["adminPort"],
        "listen": f"{c['listenHost']}:{c['grpcPort']}",
        "admin_listen": f"{c['listenHost']}:{c['adminPort']}",
        "liveness": probe("liveness"),
        "readiness": probe("readiness"),
        "shutdown_grace_seconds": c["shutdownGraceSeconds"],
        "shutdown_grace": f"{c['shutdownGraceSeconds']}s",
        "prestop_sleep_seconds": v["preStop"]["sleepSeconds"],
        "termination_grace_period_seconds": expected_grace_period(v),
        "binary": BINARY,
        "args": ["serve", "--config", CONFIG_PATH],
        "config_path": CONFIG_PATH,
        "store_env": "PACKMETER_STORE",
        "sqlite_store": f"sqlite://{v['store']['sqlite']['path']}",
        "run_as_user": v["securityContext"]["runAsUser"],
        "image": f"{v['image']['repository']}:{tag}",
        "app_version": chart["appVersion"],
    }
    print(json.dumps(out, indent=2))
    return 0


def print_default_toml(yaml) -> int:
    """The packmeter.toml that templates/configmap.yaml renders from the
    defaults (sqlite store), without Helm, so the Rust tests can feed it to
    the binary's config parser. The full run checks the real rendering key by
    key against the same values, so the two cannot drift apart unnoticed."""
    v = yaml.safe_load((CHART / "values.yaml").read_text())
    c = v["config"]
    q = json.dumps  # TOML basic strings accept what toJson prints
    lines = [
        "listen = " + q(f"{c['listenHost']}:{c['grpcPort']}"),
        "admin_listen = " + q(f"{c['listenHost']}:{c['adminPort']}"),
        "store = " + q("sqlite://" + v["store"]["sqlite"]["path"]),
    ]
    for key, val in (("flush_interval", c["flushInterval"]), ("flush_max_lag", c["flushMaxLag"]),
                     ("late_grace", c["lateGrace"]),
                     ("dedup_window", c["dedupWindow"]), ("timezone", c["timezone"]),
                     ("max_future_skew", c["maxFutureSkew"]),
                     ("unknown_accounts", c["unknownAccounts"])):
        if val not in (None, ""):
            lines.append(f"{key} = {q(str(val))}")
    lines.append(f"shutdown_grace = {q(str(int(c['shutdownGraceSeconds'])) + 's')}")
    if c["logFormat"] not in (None, ""):
        lines.append(f"log_format = {q(str(c['logFormat']))}")
    if c["extraToml"]:
        lines.append(str(c["extraToml"]).rstrip("\n"))
    print("\n".join(lines))
    return 0


# === fake Kubernetes API server ===

class FakeCluster:
    """Just enough of a Kubernetes API for Helm's Install to run to the end.

    Discovery advertises the kinds the chart renders (and, when `monitoring` is
    set, monitoring.coreos.com/v1 so the ServiceMonitor path is exercised).
    Every GET of an object is 404, every create/update is echoed back, and
    nothing is stored, so installs never conflict. Helm stores its release
    record as a protobuf-encoded Secret; the last one is kept so the rendered
    NOTES can be read back.
    """

    KINDS = {
        ("", "v1"): [("secrets", "Secret"), ("configmaps", "ConfigMap"), ("services", "Service"),
                     ("serviceaccounts", "ServiceAccount"),
                     ("persistentvolumeclaims", "PersistentVolumeClaim")],
        ("apps", "v1"): [("deployments", "Deployment"), ("daemonsets", "DaemonSet")],
        ("policy", "v1"): [("poddisruptionbudgets", "PodDisruptionBudget")],
        ("networking.k8s.io", "v1"): [("networkpolicies", "NetworkPolicy")],
        ("monitoring.coreos.com", "v1"): [("servicemonitors", "ServiceMonitor")],
    }

    def __init__(self, monitoring: bool):
        self.monitoring = monitoring
        self.release_record: bytes | None = None
        cluster = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the lint output readable
                pass

            def reply(self, code: int, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                code, obj = cluster.route(self.command, self.path.split("?")[0],
                                          self.headers.get("Content-Type") or "", body)
                self.reply(code, obj)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def groups(self):
        return [(g, v) for (g, v) in self.KINDS
                if g and (self.monitoring or g != "monitoring.coreos.com")]

    def route(self, method: str, path: str, ctype: str, body: bytes):
        not_found = {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                     "reason": "NotFound", "code": 404}
        if method == "GET":
            if path == "/version":
                return 200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0"}
            if path == "/api":
                return 200, {"kind": "APIVersions", "versions": ["v1"]}
            if path == "/apis":
                return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                    {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                     "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}}
                    for g, v in self.groups()]}
            for (g, v), kinds in self.KINDS.items():
                gv_path = f"/apis/{g}/{v}" if g else f"/api/{v}"
                if path == gv_path and (not g or (g, v) in self.groups()):
                    return 200, {"kind": "APIResourceList", "apiVersion": "v1",
                                 "groupVersion": f"{g}/{v}" if g else v,
                                 "resources": [{"name": n, "singularName": "", "namespaced": True,
                                                "kind": k, "verbs": ["create", "get", "list",
                                                                     "update", "patch", "delete"]}
                                               for n, k in kinds]}
            if path.endswith("/secrets"):  # Helm looking for earlier releases
                return 200, {"kind": "SecretList", "apiVersion": "v1", "metadata": {}, "items": []}
            return 404, not_found
        if method in ("POST", "PUT"):
            code = 201 if method == "POST" else 200
            if "protobuf" in ctype:  # Helm's release record
                self.release_record = body
                return code, {"kind": "Secret", "apiVersion": "v1",
                              "metadata": {"name": "release", "namespace": NAMESPACE,
                                           "resourceVersion": "1"}}
            obj = json.loads(body)
            obj.setdefault("metadata", {}).setdefault("namespace", NAMESPACE)
            obj["metadata"].update(resourceVersion="1", uid="fake")
            return code, obj
        if method == "DELETE":
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        return 404, not_found

    def kubeconfig(self) -> str:
        port = self.server.server_address[1]
        return (
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: fake, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n"
            "users: [{name: fake, user: {token: fake}}]\n"
            f"contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: {NAMESPACE}}}}}]\n"
            "current-context: fake\n"
        )

    def notes(self) -> str | None:
        """NOTES.txt as rendered, read from the release record Helm stored.

        The record is a protobuf Secret whose data["release"] is
        base64(gzip(release JSON)); the map entry is located by its key.
        """
        raw = self.release_record
        marker = b"\n\x07release\x12"
        if not raw or marker not in raw:
            return None
        i = raw.index(marker) + len(marker)
        length = shift = 0
        while True:  # protobuf varint
            b = raw[i]
            i += 1
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        release = json.loads(gzip.decompress(base64.b64decode(raw[i:i + length])))
        return (release.get("info") or {}).get("notes")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# === running Helm ===

@contextlib.contextmanager
def captured_stderr():
    """Collect what the Go library writes to fd 2 (its log output)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        box: list[str] = []
        try:
            yield box
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            box.append(tmp.read().decode(errors="replace"))


def chart_failures(log: str) -> list[str]:
    """Chart `fail`/`required` messages that Helm's lint mode only logs."""
    pat = re.compile(r'(?:funcMap fail|missing required value) message="((?:[^"\\]|\\.)*)"')
    return sorted(set(pat.findall(log)))


def run_lint(helm, yaml, values: dict, workdir: Path) -> list[str]:
    dst = workdir / "packmeter"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(CHART, dst, ignore=shutil.ignore_patterns("ci"))
    (dst / "values.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    with captured_stderr() as log:
        try:
            result = asyncio.run(helm.Lint(helm.Configuration(namespace=NAMESPACE)).run(str(dst)))
        except helm.HelmError as e:
            return [f"helm lint raised: {e}"]
    problems = []
    for m in result.get("Messages") or []:
        sev = m.get("Severity", 0)
        if sev >= 2:
            # helm-sdkpy serialises Go errors as {}, so only the place is known;
            # the render step reports the message text for the same values.
            problems.append(f"{SEVERITY.get(sev, sev)} in {m.get('Path')}")
    if result.get("Errors") and not problems:
        problems.append(f"{len(result['Errors'])} lint error(s)")
    problems += [f"chart fail: {msg}" for msg in chart_failures(log[0])]
    return problems


def run_render(helm, yaml, overrides: dict, monitoring: bool):
    """Install into the fake cluster. Returns (objects, notes, error)."""
    with FakeCluster(monitoring) as cluster:
        with captured_stderr():
            try:
                cfg = helm.Configuration(namespace=NAMESPACE, kubeconfig=cluster.kubeconfig())
                result = asyncio.run(helm.Install(cfg).run(
                    RELEASE, str(CHART), values=overrides or None, wait=False, timeout=60))
            except helm.HelmError as e:
                return None, None, str(e)
        objects = [o for o in yaml.safe_load_all(result.get("manifest") or "") if o]
        return objects, cluster.notes(), None


def headline(err: str) -> str:
    """The chart's own words from a Helm error, shortened for one line."""
    m = re.search(r"execution error at \([^)]*\): (.*)", err)  # a template `fail`
    if not m:
        m = re.search(r"^- (at .*)$", err, re.M)  # a values.schema.json violation
    text = m.group(1) if m else err.strip().splitlines()[0]
    return text if len(text) <= 100 else text[:97] + "..."


# === expectations on rendered objects ===

class Checker:
    def __init__(self, v: dict, chart_meta: dict, tomllib):
        self.v = v
        self.meta = chart_meta
        self.toml = tomllib
        self.problems: list[str] = []
        self.fullname = f"{RELEASE}-{chart_meta['name']}"

    def expect(self, cond, msg: str) -> bool:
        if not cond:
            self.problems.append(msg)
        return bool(cond)

    def run(self, objects: list, notes: str | None, monitoring: bool) -> list[str]:
        v = self.v
        mode, sidecar = v["mode"], v["mode"] == "sidecar"
        by_kind: dict[str, list] = {}
        for o in objects:
            by_kind.setdefault(o["kind"], []).append(o)
        n = lambda kind: len(by_kind.get(kind, []))  # noqa: E731

        self.check_config(by_kind)

        self.expect(n("Deployment") == (mode == "deployment"),
                    f"{n('Deployment')} Deployment(s) rendered in {mode} mode")
        self.expect(n("DaemonSet") == (mode == "daemonset"),
                    f"{n('DaemonSet')} DaemonSet(s) rendered in {mode} mode")
        for kind in ("Deployment", "DaemonSet"):
            for w in by_kind.get(kind, []):
                spec = w["spec"]["template"]["spec"]
                self.check_pod(spec, kind, sidecar=False)
                pod_labels = w["spec"]["template"]["metadata"]["labels"]
                sel = w["spec"]["selector"]["matchLabels"]
                self.expect(all(pod_labels.get(k) == val for k, val in sel.items()),
                            f"{kind} selector does not match its pod labels")
                self.expect("checksum/config" in w["spec"]["template"]["metadata"]["annotations"],
                            f"{kind} pod template lacks the config checksum")
                if kind == "Deployment":
                    self.expect(spec["containers"] and w["spec"]["replicas"] == v["deployment"]["replicas"],
                                "Deployment replicas differ from deployment.replicas")

        want_svc = v["service"]["enabled"] and not sidecar
        self.expect(n("Service") == want_svc, f"{n('Service')} Service(s), expected {int(want_svc)}")
        for svc in by_kind.get("Service", []):
            ports = {p["name"]: p for p in svc["spec"]["ports"]}
            self.expect(ports.get("grpc", {}).get("port") == v["service"]["grpcPort"]
                        and ports["grpc"].get("targetPort") == "grpc",
                        "Service gRPC port is wrong")
            self.expect(ports.get("admin", {}).get("port") == v["service"]["adminPort"],
                        "Service admin port is wrong")
            want_itp = v["service"]["internalTrafficPolicy"] or (
                "Local" if mode == "daemonset" else "Cluster")
            self.expect(svc["spec"].get("internalTrafficPolicy") == want_itp,
                        f"Service internalTrafficPolicy is {svc['spec'].get('internalTrafficPolicy')},"
                        f" expected {want_itp}")

        self.expect(n("ServiceAccount") == (v["serviceAccount"]["create"] and not sidecar),
                    f"{n('ServiceAccount')} ServiceAccount(s) rendered in {mode} mode")

        ptype = persistence_type(v)
        want_pvc = (ptype == "pvc" and not v["persistence"]["pvc"]["existingClaim"]
                    and mode != "daemonset")
        self.expect(n("PersistentVolumeClaim") == want_pvc,
                    f"{n('PersistentVolumeClaim')} PVC(s), expected {int(want_pvc)}")

        want_pdb = v["podDisruptionBudget"]["enabled"] and not sidecar
        self.expect(n("PodDisruptionBudget") == want_pdb,
                    f"{n('PodDisruptionBudget')} PodDisruptionBudget(s), expected {int(want_pdb)}")

        want_np = v["networkPolicy"]["enabled"] and not sidecar
        self.expect(n("NetworkPolicy") == want_np,
                    f"{n('NetworkPolicy')} NetworkPolicy(s), expected {int(want_np)}")
        for np in by_kind.get("NetworkPolicy", []):
            pods = [w["spec"]["template"]["metadata"]["labels"]
                    for kind in ("Deployment", "DaemonSet") for w in by_kind.get(kind, [])]
            sel = np["spec"]["podSelector"]["matchLabels"]
            self.expect(pods and all(all(p.get(k) == val for k, val in sel.items()) for p in pods),
                        "NetworkPolicy does not select packmeter's pods")
            ports = sorted(port["port"] for rule in np["spec"]["ingress"] for port in rule["ports"])
            want_ports = sorted([v["config"]["grpcPort"], v["config"]["adminPort"]])
            self.expect(ports == want_ports,
                        f"NetworkPolicy admits ports {ports}, expected {want_ports}")

        want_sm = (v["serviceMonitor"]["enabled"] and want_svc and monitoring)
        self.expect(n("ServiceMonitor") == want_sm,
                    f"{n('ServiceMonitor')} ServiceMonitor(s) with monitoring.coreos.com/v1 "
                    f"{'served' if monitoring else 'absent'}, expected {int(want_sm)}")
        for sm in by_kind.get("ServiceMonitor", []):
            ep = sm["spec"]["endpoints"][0]
            self.expect(ep.get("port") == "admin" and ep.get("path") == "/metrics",
                        "ServiceMonitor does not scrape admin:/metrics")

        pg = v["store"]["type"] == "postgres"
        want_secret = pg and not v["store"]["postgres"]["existingSecret"]
        self.expect(n("Secret") == want_secret, f"{n('Secret')} Secret(s), expected {int(want_secret)}")
        for s in by_kind.get("Secret", []):
            key = v["store"]["postgres"]["secretKey"]
            got = base64.b64decode(s.get("data", {}).get(key, "")).decode()
            self.expect(got == v["store"]["postgres"]["url"],
                        f"created Secret key {key!r} does not hold store.postgres.url")
        url = v["store"]["postgres"]["url"] if pg else ""
        if url:
            leaks = [f"{o['kind']}/{o['metadata']['name']}" for o in objects
                     if o["kind"] != "Secret" and url in json.dumps(o)]
            self.expect(not leaks, f"the PostgreSQL URL appears outside its Secret: {leaks}")

        if sidecar:
            self.check_sidecar_notes(notes)
        return self.problems

    def check_config(self, by_kind: dict) -> None:
        v, c = self.v, self.v["config"]
        cms = [cm for cm in by_kind.get("ConfigMap", []) if cm["metadata"]["name"] == self.fullname]
        if not self.expect(len(cms) == 1, f"no ConfigMap named {self.fullname}"):
            return
        text = cms[0].get("data", {}).get("packmeter.toml", "")
        try:
            conf = self.toml.loads(text)
        except Exception as e:  # any parse error is a finding, not a crash
            self.problems.append(f"packmeter.toml is not valid TOML: {e}")
            return
        self.expect(conf.get("listen") == f"{c['listenHost']}:{c['grpcPort']}",
                    f"packmeter.toml listen = {conf.get('listen')!r}")
        self.expect(conf.get("admin_listen") == f"{c['listenHost']}:{c['adminPort']}",
                    f"packmeter.toml admin_listen = {conf.get('admin_listen')!r}")
        self.expect(conf.get("shutdown_grace") == f"{c['shutdownGraceSeconds']}s",
                    f"packmeter.toml shutdown_grace = {conf.get('shutdown_grace')!r}")
        for key, val in (("flush_interval", c["flushInterval"]), ("flush_max_lag", c["flushMaxLag"]),
                         ("late_grace", c["lateGrace"]),
                         ("dedup_window", c["dedupWindow"]), ("timezone", c["timezone"]),
                         ("max_future_skew", c["maxFutureSkew"]),
                         ("unknown_accounts", c["unknownAccounts"]), ("log_format", c["logFormat"])):
            want = str(val) if val not in (None, "") else None
            self.expect(conf.get(key) == want, f"packmeter.toml {key} = {conf.get(key)!r}, expected {want!r}")
        at = v["adminToken"]
        if at["existingSecret"]:
            want = f"{at['mountPath']}/{at['secretKey']}"
            self.expect(conf.get("admin_token_file") == want,
                        f"packmeter.toml admin_token_file = {conf.get('admin_token_file')!r}, expected {want!r}")
        else:
            # A default install: Admin RPCs answer loopback peers only.
            self.expect("admin_token_file" not in conf,
                        "packmeter.toml sets admin_token_file without adminToken.existingSecret")
        tls = v["tls"]
        want_tls = {}
        if tls["existingSecret"]:
            want_tls = {"tls_cert_file": f"{tls['mountPath']}/tls.crt",
                        "tls_key_file": f"{tls['mountPath']}/tls.key"}
            if tls["clientAuth"]:
                want_tls["tls_client_ca_file"] = f"{tls['mountPath']}/ca.crt"
        got_tls = {k: conf[k] for k in ("tls_cert_file", "tls_key_file", "tls_client_ca_file") if k in conf}
        self.expect(got_tls == want_tls, f"packmeter.toml TLS keys are {got_tls}, expected {want_tls}")
        if v["store"]["type"] == "sqlite":
            self.expect(conf.get("store") == f"sqlite://{v['store']['sqlite']['path']}",
                        f"packmeter.toml store = {conf.get('store')!r}")
        else:
            self.expect("store" not in conf, "packmeter.toml sets store although postgres comes from a Secret")
            if v["store"]["postgres"]["url"]:
                self.expect(v["store"]["postgres"]["url"] not in text,
                            "the PostgreSQL URL leaked into the ConfigMap")

    def check_container(self, ctr: dict, where: str, sidecar: bool) -> None:
        v, c = self.v, self.v["config"]
        tag = v["image"]["tag"] or self.meta["appVersion"]
        want_image = (f"{v['image']['repository']}@{v['image']['digest']}" if v["image"]["digest"]
                      else f"{v['image']['repository']}:{tag}")
        self.expect(ctr.get("image") == want_image, f"{where}: image {ctr.get('image')!r}")
        self.expect(ctr.get("command") == [BINARY], f"{where}: command {ctr.get('command')!r}")
        self.expect(ctr.get("args") == ["serve", "--config", CONFIG_PATH], f"{where}: args {ctr.get('args')!r}")
        ports = {p["containerPort"]: p for p in ctr.get("ports", [])}
        self.expect(c["grpcPort"] in ports and c["adminPort"] in ports, f"{where}: container ports {sorted(ports)}")
        prefix = "packmeter-" if sidecar else ""
        self.expect(ports.get(c["grpcPort"], {}).get("name") == f"{prefix}grpc", f"{where}: gRPC port name")
        if v["mode"] == "daemonset" and v["daemonset"]["hostPort"]["enabled"]:
            self.expect(ports.get(c["grpcPort"], {}).get("hostPort") == v["daemonset"]["hostPort"]["grpc"],
                        f"{where}: hostPort missing")

        p = v["probes"]
        for kind, key in (("liveness", "livenessProbe"), ("readiness", "readinessProbe")):
            probe = ctr.get(key)
            if not p[kind]["enabled"]:
                self.expect(probe is None, f"{where}: {key} rendered although disabled")
                continue
            if not self.expect(probe, f"{where}: no {key}"):
                continue
            if p["type"] == "grpc":
                g = probe.get("grpc") or {}
                self.expect(g.get("port") == c["grpcPort"] and g.get("service", "") == p[kind]["grpcService"],
                            f"{where}: {key} is {probe}, expected grpc port {c['grpcPort']} "
                            f"service {p[kind]['grpcService']!r}")
            else:
                h = probe.get("httpGet") or {}
                self.expect(h.get("port") == c["adminPort"] and h.get("path") == p[kind]["httpPath"],
                            f"{where}: {key} is {probe}, expected GET :{c['adminPort']}{p[kind]['httpPath']}")
        if p["startup"]["enabled"]:
            self.expect(ctr.get("startupProbe"), f"{where}: no startupProbe")

        sleep = int(v["preStop"]["sleepSeconds"])
        pre = ((ctr.get("lifecycle") or {}).get("preStop")) or {}
        if sleep > 0:
            got = (pre.get("sleep") or {}).get("seconds") if v["preStop"]["nativeSleep"] else \
                (pre.get("exec") or {}).get("command")
            want = sleep if v["preStop"]["nativeSleep"] else ["/bin/sleep", str(sleep)]
            self.expect(got == want, f"{where}: preStop is {pre}, expected a {sleep}s sleep")
        else:
            self.expect(not pre, f"{where}: preStop rendered although preStop.sleepSeconds is 0")

        sc = ctr.get("securityContext") or {}
        self.expect(sc.get("runAsNonRoot") is True and sc.get("runAsUser") not in (None, 0),
                    f"{where}: not forced to run as non-root")
        self.expect(sc.get("readOnlyRootFilesystem") is True, f"{where}: root filesystem is writable")
        self.expect(sc.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation allowed")
        self.expect("ALL" in ((sc.get("capabilities") or {}).get("drop") or []), f"{where}: capabilities not dropped")
        self.expect((sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{where}: no RuntimeDefault seccomp")
        self.expect(ctr.get("resources"), f"{where}: no resources")

        mounts = {m["mountPath"]: m for m in ctr.get("volumeMounts", [])}
        self.expect("/etc/packmeter" in mounts, f"{where}: config not mounted at /etc/packmeter")
        self.expect(v["persistence"]["mountPath"] in mounts, f"{where}: data dir not mounted")
        at = v["adminToken"]
        tm = mounts.get(at["mountPath"])
        if at["existingSecret"]:
            # A subPath mount would never see a rotated Secret.
            self.expect(tm and tm.get("readOnly") is True and not tm.get("subPath")
                        and tm.get("name") == "packmeter-admin-token",
                        f"{where}: admin token mount is {tm}, expected packmeter-admin-token read-only "
                        f"at {at['mountPath']} without subPath")
        else:
            self.expect(tm is None, f"{where}: admin token mounted without adminToken.existingSecret")
        tls = v["tls"]
        lm = mounts.get(tls["mountPath"])
        if tls["existingSecret"]:
            # A subPath mount would never see a renewed certificate.
            self.expect(lm and lm.get("readOnly") is True and not lm.get("subPath")
                        and lm.get("name") == "packmeter-tls",
                        f"{where}: TLS mount is {lm}, expected packmeter-tls read-only at {tls['mountPath']} "
                        f"without subPath")
            # Kubelet's gRPC probes cannot speak TLS.
            for key in ("livenessProbe", "readinessProbe", "startupProbe"):
                self.expect("grpc" not in (ctr.get(key) or {}), f"{where}: {key} is a gRPC probe on a TLS port")
        else:
            self.expect(lm is None, f"{where}: TLS Secret mounted without tls.existingSecret")

        env = {e["name"]: e for e in ctr.get("env", [])}
        self.expect(not any("postgres://" in str(e.get("value", "")) or "postgresql://" in str(e.get("value", ""))
                            for e in ctr.get("env", [])),
                    f"{where}: a PostgreSQL URL in a plain env value")
        if v["store"]["type"] == "postgres":
            # The spill file goes to $XDG_DATA_HOME/packmeter: the data volume.
            xdg = (env.get("XDG_DATA_HOME") or {}).get("value")
            self.expect(xdg == v["persistence"]["mountPath"],
                        f"{where}: XDG_DATA_HOME is {xdg!r}, expected the data dir {v['persistence']['mountPath']!r}")
            self.expect(not mounts.get(v["persistence"]["mountPath"], {}).get("readOnly"),
                        f"{where}: the data dir is mounted read-only")
            ref = ((env.get("PACKMETER_STORE") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            want_name = v["store"]["postgres"]["existingSecret"] or f"{self.fullname}-store"
            self.expect(ref.get("name") == want_name and ref.get("key") == v["store"]["postgres"]["secretKey"],
                        f"{where}: PACKMETER_STORE secretKeyRef is {ref}, expected {want_name}/"
                        f"{v['store']['postgres']['secretKey']}")
        else:
            self.expect("PACKMETER_STORE" not in env, f"{where}: PACKMETER_STORE set for sqlite")

    def check_pod(self, spec: dict, where: str, sidecar: bool) -> None:
        v = self.v
        grace = spec.get("terminationGracePeriodSeconds")
        floor = grace_floor(v)
        self.expect(isinstance(grace, int) and grace > floor,
                    f"{where}: terminationGracePeriodSeconds {grace} is not > preStop + shutdown grace ({floor})")
        self.expect(grace == expected_grace_period(v),
                    f"{where}: terminationGracePeriodSeconds {grace}, expected {expected_grace_period(v)}")
        all_ctrs = spec.get("containers", []) + spec.get("initContainers", [])
        ctrs = [ct for ct in all_ctrs if ct["name"] == "packmeter"]
        if not self.expect(len(ctrs) == 1, f"{where}: {len(ctrs)} packmeter containers"):
            return
        self.check_container(ctrs[0], where, sidecar)
        if sidecar and v["sidecar"]["native"]:
            self.expect(ctrs[0].get("restartPolicy") == "Always" and ctrs[0] in spec.get("initContainers", []),
                        f"{where}: native sidecar must be an initContainer with restartPolicy Always")

        vols = {vol["name"]: vol for vol in spec.get("volumes", [])}
        cfg = (vols.get("packmeter-config") or {}).get("configMap") or {}
        self.expect(cfg.get("name") == self.fullname, f"{where}: config volume does not use ConfigMap {self.fullname}")
        at = v["adminToken"]
        tok = (vols.get("packmeter-admin-token") or {}).get("secret")
        if at["existingSecret"]:
            self.expect(tok and tok.get("secretName") == at["existingSecret"]
                        and [i.get("key") for i in tok.get("items", [])] == [at["secretKey"]],
                        f"{where}: admin token volume is {tok}, expected Secret {at['existingSecret']} "
                        f"key {at['secretKey']}")
        else:
            self.expect(tok is None, f"{where}: admin token volume without adminToken.existingSecret")
        tls = v["tls"]
        tv = (vols.get("packmeter-tls") or {}).get("secret")
        if tls["existingSecret"]:
            keys = ["tls.crt", "tls.key"] + (["ca.crt"] if tls["clientAuth"] else [])
            self.expect(tv and tv.get("secretName") == tls["existingSecret"]
                        and [i.get("key") for i in tv.get("items", [])] == keys,
                        f"{where}: TLS volume is {tv}, expected Secret {tls['existingSecret']} keys {keys}")
        else:
            self.expect(tv is None, f"{where}: TLS volume without tls.existingSecret")
        data = vols.get("packmeter-data") or {}
        ptype = persistence_type(v)
        key = {"pvc": "persistentVolumeClaim"}.get(ptype, ptype)
        self.expect(key in data, f"{where}: data volume is {sorted(data)}, expected {key}")
        if ptype == "hostPath" and v["persistence"]["hostPath"]["chown"]:
            self.expect(any(ct["name"] == "data-permissions" for ct in spec.get("initContainers", [])),
                        f"{where}: hostPath without the chown init container")
        if not sidecar:
            psc = spec.get("securityContext") or {}
            self.expect(psc.get("runAsNonRoot") is True, f"{where}: pod securityContext allows root")
            self.expect(spec.get("enableServiceLinks") is False, f"{where}: service links enabled")

    def check_sidecar_notes(self, notes: str | None) -> None:
        if not self.expect(notes, "sidecar mode: NOTES.txt missing from the release"):
            return
        m = re.search(r"^# --- BEGIN packmeter pod spec fragment ---\n(.*?)^# --- END",
                      notes, re.S | re.M)
        if not self.expect(m, "sidecar mode: NOTES.txt has no pod spec fragment"):
            return
        import yaml  # already known to import
        try:
            fragment = yaml.safe_load(m.group(1))
        except yaml.YAMLError as e:
            self.problems.append(f"sidecar fragment in NOTES.txt is not valid YAML: {e}")
            return
        self.check_pod(fragment, "sidecar fragment", sidecar=True)


# === main ===

def main() -> int:
    global NAMESPACE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--print-defaults", action="store_true",
                    help="print the chart defaults the binary must match, as JSON, and exit")
    ap.add_argument("--print-default-toml", action="store_true",
                    help="print the packmeter.toml the chart renders from its defaults, and exit")
    ap.add_argument("--render", metavar="VALUES_YAML",
                    help="install the chart with these values (as `-f`) into the fake cluster and "
                         "print the rendered objects as a JSON list, then exit (1 if Helm refused)")
    ap.add_argument("--namespace", default=NAMESPACE,
                    help=f"the release namespace for --render (default {NAMESPACE})")
    args = ap.parse_args()
    NAMESPACE = args.namespace

    yaml = load_yaml_module()
    if args.print_defaults:
        return print_defaults(yaml)
    if args.print_default_toml:
        return print_default_toml(yaml)

    try:
        import tomllib  # Python >= 3.11
    except ImportError:
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            print("lint.py: no TOML parser (Python >= 3.11 or `pip install tomli`)", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="packmeter-helm-lint-"))
    # helm-sdkpy's shim creates Helm's cache/config/data dirs under $HOME
    # whatever HELM_*_HOME say, so this process gets a throwaway HOME (it
    # starts no children, and every kubeconfig is passed explicitly). Set
    # before the Go library loads, which reads the environment at load time.
    for var in ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME",
                "HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        os.environ[var] = str(work / var.lower())
    try:
        import helm_sdkpy as helm
        helm.get_version()  # loads the shared library
    except Exception as e:  # ImportError, HelmLibraryNotFound, OSError
        print(f"lint.py: helm_sdkpy is not usable ({type(e).__name__}: {e}); install it with "
              "`pip install --ignore-requires-python helm-sdkpy`", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
        return 2

    if args.render:
        try:
            overrides = yaml.safe_load(Path(args.render).read_text()) or {}
            objects, _, err = run_render(helm, yaml, overrides, True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if err:
            print(f"lint.py: helm refused {args.render}: {err}", file=sys.stderr)
            return 1
        print(json.dumps(objects, indent=1))
        return 0

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    chart_meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    print(f"packmeter chart {chart_meta['version']}: Helm via {helm.get_version()}")

    cases = [("defaults", {})]
    for f in sorted((CHART / "ci").glob("*-values.yaml")):
        cases.append((f"ci/{f.name}", yaml.safe_load(f.read_text()) or {}))

    passed = failed = 0

    def report(ok: bool, label: str, problems: list[str]) -> None:
        nonlocal passed, failed
        if ok:
            passed += 1
            print(f"PASS {label}")
        else:
            failed += 1
            print(f"FAIL {label}")
            for p in problems:
                print(f"       - {p}")

    try:
        for name, overrides in cases:
            values = deep_merge(defaults, overrides)
            problems = run_lint(helm, yaml, values, work)
            report(not problems, f"lint    {name}", problems)

            monitoring_runs = [True]
            if values["serviceMonitor"]["enabled"]:
                monitoring_runs.append(False)  # and without the Prometheus Operator
            for monitoring in monitoring_runs:
                label = f"render  {name}" + ("" if monitoring else " (no monitoring.coreos.com/v1)")
                objects, notes, err = run_render(helm, yaml, overrides, monitoring)
                if err:
                    report(False, label, [err])
                    continue
                kinds = sorted({o["kind"] for o in objects})
                problems = Checker(values, chart_meta, tomllib).run(objects, notes, monitoring)
                report(not problems, f"{label}: {', '.join(kinds)}", problems)

        for name, overrides, needle in MUST_FAIL:
            values = deep_merge(defaults, overrides)
            problems = []
            if not run_lint(helm, yaml, values, work):
                problems.append("helm lint accepted it")
            _, _, err = run_render(helm, yaml, overrides, True)
            if err is None:
                problems.append("helm install rendered it")
            elif needle not in err:
                problems.append(f"render error does not mention {needle!r}: {err}")
            report(not problems, f"reject  {name}" + (f": {headline(err)}" if err and not problems else ""),
                   problems)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
