#!/usr/bin/env python3
"""Lints, renders and validates the Helm chart in helm/datastorage, and checks
the Dockerfile. scripts/chart-check.sh installs the tools and runs this;
`make chart-check` and `make test` run that. Any failure exits non-zero.

For each values case (the chart defaults, then every helm/datastorage/ci/*-values.yaml):
  1. `helm lint --strict` (warnings fail too);
  2. `helm template` with --kube-version (render errors fail), and a client-side
     dry-run `helm install` for NOTES.txt;
  3. every rendered manifest is validated:
     - built-in kinds against Kubernetes' own OpenAPI-derived JSON schemas
       (PyPI kubernetes-validate, its *strict* variants: unknown fields fail),
       for each version in KUBE_VERSIONS;
     - ServiceMonitor and PrometheusRule (CRDs: no schema ships with
       kubernetes-validate) against hand-written strict subsets of the
       prometheus-operator CRD schema in schemas/ (see their description);
     - any other kind fails: nothing is rendered unchecked;
  4. cross-manifest checks that no schema can express: selectors select the
     pods, probes and Service target ports name container ports, mounts name
     volumes, files named by the configuration are mounted, no Secret is
     rendered and every credential variable comes from a secretKeyRef, pod
     hardening (read-only root, no privilege escalation, ALL capabilities
     dropped, non-root, RuntimeDefault seccomp, /tmp emptyDir, no service
     links), the drain fits the termination grace period, hook ordering;
  5. config.toml parses and every key is a field of src/config.rs (parsed from
     the source); every DATASTORAGE_* variable names a setting too;
  6. every PromQL expression (alerts, dashboard panels and variables) parses
     with the Prometheus project's own grammar (promql.cjs) and uses only
     metrics and labels that src/ exports (parsed from the metrics! macro
     calls), plus the labels Prometheus adds when it scrapes.
Then:
  7. every helm/invalid-values/*.yaml must make `helm template` FAIL with the
     message its `# expect:` lines name (schema violations and chart checks);
  8. self-tests: a manifest with an unknown field, a broken PromQL expression
     and an unknown metric must each be rejected, so the checks above cannot
     silently pass;
  9. the Dockerfile parses (the official BuildKit parser, PyPI `dockerfile`),
     every COPY source exists and is let through .dockerignore, its ports, user
     and model directory agree with the chart.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import dockerfile
import jsonschema
import yaml
import kubernetes_validate.utils as kv

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CHART = ROOT / "helm" / "datastorage"
INVALID_DIR = ROOT / "helm" / "invalid-values"

# The chart's minimum (Chart.yaml kubeVersion) and the Kubernetes version of the
# kubectl that ships with the pinned Helm (1.33).
KUBE_VERSIONS = ["1.27.0", "1.33.0"]
RENDER_KUBE_VERSION = "1.33.0"
NAMESPACE = "datastorage-ci"

CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): HERE / "schemas" / "servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): HERE / "schemas" / "prometheusrule.json",
}

# Labels Prometheus (and the Prometheus Operator) attach to every scraped series.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "container", "endpoint"}

# Credentials: these variables must come from a Secret, never a literal.
SECRET_ENV = {
    "DATASTORAGE_DATABASE__URL",
    "DATASTORAGE_DATABASE__READ_REPLICA_URL",
    "DATASTORAGE_REDIS__URL",
    "DATASTORAGE_QUERY__PAGE_TOKEN_KEY",
    "DATASTORAGE_INTEGRITY__CHAIN_KEY",
    "DATASTORAGE_AUTH__HS256_SECRET",
    "DATASTORAGE_EMBEDDING__OPENAI__API_KEY",
}
# Settings the chart sets that src/config.rs may not have yet: being added in
# parallel. A warning while missing; drop the entry once it has landed.
PENDING_SETTINGS = {"database.read_replica_url"}
# Settings deliberately not in values.schema.json's `config` (owned by the
# chart, or credentials), so "not exposed" does not warn about them.
CHART_OWNED_SETTINGS = {
    "grpc.port", "grpc.tls", "http.port", "database.url", "database.read_replica_url",
    "database.migrate_on_start", "embedding.model_dir", "embedding.openai.api_key",
    "query.page_token_key", "redis.url", "integrity.chain_key", "integrity.export_signing_key",
    "auth.disabled", "auth.hs256_secret", "auth.public_keys",
}


@dataclass
class Case:
    name: str
    release: str
    values: list[Path]
    # Kinds (and how many of each) the case must render: "every option on"
    # stays true only if it is checked.
    expect: dict[str, int]


CASES = [
    Case("defaults", "datastorage", [], {
        "Deployment": 1, "Service": 1, "ServiceAccount": 2, "ConfigMap": 2, "Job": 1,
        "PodDisruptionBudget": 1, "NetworkPolicy": 1, "HorizontalPodAutoscaler": 1,
    }),
    Case("ci/all-on-values.yaml", "ds", [CHART / "ci" / "all-on-values.yaml"], {
        "Deployment": 1, "Service": 1, "ServiceAccount": 2, "ConfigMap": 3, "Job": 1,
        "PodDisruptionBudget": 1, "NetworkPolicy": 1, "HorizontalPodAutoscaler": 1,
        "ServiceMonitor": 1, "PrometheusRule": 1,
    }),
    Case("ci/single-replica-values.yaml", "ds", [CHART / "ci" / "single-replica-values.yaml"], {
        "Deployment": 1, "Service": 1, "ConfigMap": 1,
    }),
]


class Failures:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.passed = 0

    def check(self, ok: bool, message: str) -> bool:
        if ok:
            self.passed += 1
        else:
            self.errors.append(message)
            if not self.quiet:
                print(f"FAIL {message}", flush=True)
        return ok

    def fail(self, message: str) -> None:
        self.check(False, message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"WARN {message}", flush=True)


# --- the source of truth: src/ ------------------------------------------------

def settings_tree() -> dict:
    """The settings tree of src/config.rs (and the structs it uses), as
    {"struct": name} / {"list": node} / {"map": node} / {"scalar": type}."""
    structs: dict[str, dict[str, str]] = {}
    for path in sorted((ROOT / "src").rglob("*.rs")):
        text = path.read_text()
        for match in re.finditer(r"pub struct (\w+)\s*\{(.*?)\n\}", text, re.S):
            fields: dict[str, str] = {}
            attrs: list[str] = []
            for line in match.group(2).splitlines():
                line = line.strip()
                if line.startswith("#["):
                    attrs.append(line)
                    continue
                if line.startswith("//") or not line:
                    continue
                f = re.match(r"pub (\w+):\s*(.+?),?$", line)
                if f:
                    name = f.group(1)
                    joined = " ".join(attrs)
                    if re.search(r"serde\([^)]*\bskip\b", joined):
                        attrs = []
                        continue
                    rename = re.search(r'rename\s*=\s*"([^"]+)"', joined)
                    fields[rename.group(1) if rename else name] = f.group(2)
                attrs = []
            structs.setdefault(match.group(1), fields)

    def node(type_text: str, depth: int = 0) -> dict:
        t = type_text.strip()
        for wrapper in ("Option", "Box"):
            m = re.fullmatch(wrapper + r"<(.+)>", t)
            if m:
                return node(m.group(1), depth)
        m = re.fullmatch(r"Vec<(.+)>", t)
        if m:
            return {"list": node(m.group(1), depth)}
        m = re.fullmatch(r"(?:BTreeMap|HashMap)<\s*String\s*,\s*(.+)>", t)
        if m:
            return {"map": node(m.group(1), depth)}
        last = t.split("::")[-1]
        if last in structs and depth < 20:
            return {"struct": last, "fields": {k: node(v, depth + 1) for k, v in structs[last].items()}}
        return {"scalar": last}

    if "Settings" not in structs:
        raise SystemExit("chart-check: no `pub struct Settings` found under src/")
    return node("Settings")


def tree_paths(tree: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, child in tree.get("fields", {}).items():
        path = f"{prefix}{key}"
        paths.add(path)
        if "struct" in child:
            paths |= tree_paths(child, path + ".")
    return paths


def check_against_tree(value, tree: dict, path: str, problems: list[str]) -> None:
    if "struct" in tree:
        if not isinstance(value, dict):
            problems.append(f"{path or 'config'}: a table expected ({tree['struct']})")
            return
        for key, child_value in value.items():
            full = f"{path}.{key}" if path else key
            child = tree["fields"].get(key)
            if child is None:
                problems.append(f"{full}: not a setting of {tree['struct']} (src/config.rs)")
            else:
                check_against_tree(child_value, child, full, problems)
    elif "list" in tree:
        if not isinstance(value, list):
            problems.append(f"{path}: an array expected")
            return
        for i, item in enumerate(value):
            check_against_tree(item, tree["list"], f"{path}[{i}]", problems)
    elif "map" in tree:
        if not isinstance(value, dict):
            problems.append(f"{path}: a table expected")
            return
        for key, item in value.items():
            check_against_tree(item, tree["map"], f"{path}.{key!r}", problems)
    elif isinstance(value, (dict, list)) and tree["scalar"] not in {"Value"}:
        problems.append(f"{path}: a single value expected ({tree['scalar']})")


def env_setting(name: str, tree: dict) -> tuple[str, bool]:
    parts = name[len("DATASTORAGE_"):].lower().split("__")
    node = tree
    for part in parts:
        if "struct" in node and part in node["fields"]:
            node = node["fields"][part]
        elif "map" in node:
            node = node["map"]
        else:
            return ".".join(parts), False
    return ".".join(parts), True


def exported_metrics() -> dict[str, dict]:
    """Series the server exports, from the metrics::{counter,gauge,histogram}!
    calls under src/: name -> {"type", "labels"}. Histograms export
    _bucket (with le), _sum and _count."""
    consts: dict[str, str] = {}
    calls: list[tuple[str, str, set[str]]] = []
    for path in sorted((ROOT / "src").rglob("*.rs")):
        text = path.read_text()
        for m in re.finditer(r'const (\w+): &str = "([a-zA-Z_:][a-zA-Z0-9_:]*)";', text):
            consts[m.group(1)] = m.group(2)
        for m in re.finditer(r"\b(counter|gauge|histogram)!\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            inner = text[m.end(): i - 1]
            first = inner.split(",")[0].strip()
            labels = set(re.findall(r'"(\w+)"\s*=>', inner))
            calls.append((m.group(1), first, labels))
    series: dict[str, dict] = {}
    for kind, first, labels in calls:
        if first.startswith('"'):
            name = first.strip('"')
        elif first in consts:
            name = consts[first]
        else:
            continue
        entries = {name: labels}
        if kind == "histogram":
            entries = {f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels, f"{name}_count": labels}
        for series_name, series_labels in entries.items():
            entry = series.setdefault(series_name, {"type": kind, "labels": set()})
            entry["labels"] |= series_labels
    return series


# --- tools ----------------------------------------------------------------------

def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def helm_template(helm: str, case: Case) -> subprocess.CompletedProcess:
    cmd = [helm, "template", case.release, str(CHART), "--namespace", NAMESPACE,
           "--kube-version", RENDER_KUBE_VERSION]
    for values in case.values:
        cmd += ["--values", str(values)]
    return run(cmd)


def promql_analyse(node_tools: Path, exprs: list[str]) -> list[dict]:
    if not exprs:
        return []
    proc = subprocess.run(["node", str(HERE / "promql.cjs"), str(node_tools)],
                          input=json.dumps(exprs), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"chart-check: promql.cjs failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables, replaced so the expression is plain PromQL."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    expr = re.sub(r"\$\{\w+(:\w+)?\}|\$\w+", "x", expr)
    return expr


# --- checks -------------------------------------------------------------------

def validate_schema(doc: dict, where: str, f: Failures) -> None:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_SCHEMAS:
        schema = json.loads(CRD_SCHEMAS[key].read_text())
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
        f.check(not errors, f"{where}: {'; '.join(f'{list(e.path)}: {e.message}' for e in errors[:5])}")
        return
    for version in KUBE_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
            f.check(True, "")
        except kv.ValidationError as e:
            f.fail(f"{where}: Kubernetes {version} (strict): {'.'.join(map(str, e.path))}: {e.message}")
        except kv.SchemaNotFoundError as e:
            f.fail(f"{where}: {e.message} (no schema: add one under scripts/chart-check/schemas)")


def labels_match(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", {})
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def pod_spec_of(doc: dict) -> dict | None:
    if doc["kind"] in ("Deployment", "Job"):
        return doc["spec"]["template"]["spec"]
    return None


def check_pod(doc: dict, where: str, docs: list[dict], tree: dict, f: Failures) -> None:
    spec = pod_spec_of(doc)
    pod_sc = spec.get("securityContext", {})
    f.check(spec.get("enableServiceLinks") is False,
            f"{where}: enableServiceLinks must be false (service links add DATASTORAGE_* variables the server refuses)")
    f.check(pod_sc.get("runAsNonRoot") is True, f"{where}: pod securityContext.runAsNonRoot must be true")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    for name, volume in volumes.items():
        if "configMap" in volume:
            cm = configmaps.get(volume["configMap"]["name"])
            f.check(cm is not None, f"{where}: volume {name} names ConfigMap {volume['configMap']['name']}, which is not rendered")
            if cm is not None and doc["kind"] == "Job" and "helm.sh/hook" in doc["metadata"].get("annotations", {}):
                job_hook = doc["metadata"]["annotations"]
                cm_hook = cm["metadata"].get("annotations", {})
                f.check(cm_hook.get("helm.sh/hook") == job_hook["helm.sh/hook"]
                        and int(cm_hook.get("helm.sh/hook-weight", 0)) < int(job_hook.get("helm.sh/hook-weight", 0)),
                        f"{where}: the hook Job's ConfigMap {cm['metadata']['name']} must be a hook of the same phases with a lower weight (it must exist before the Job on a first install)")
    f.check("tmp" in volumes and "emptyDir" in volumes["tmp"], f"{where}: an emptyDir volume named tmp is expected")
    for container in spec["containers"]:
        cw = f"{where} container {container['name']}"
        sc = container.get("securityContext", {})
        f.check(sc.get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem must be true")
        f.check(sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation must be false")
        f.check("ALL" in sc.get("capabilities", {}).get("drop", []), f"{cw}: capabilities.drop must contain ALL")
        f.check((sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
                f"{cw}: seccompProfile RuntimeDefault expected")
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        for m in container.get("volumeMounts", []):
            f.check(m["name"] in volumes, f"{cw}: volumeMount {m['name']} names no volume")
        f.check(mounts.get("/tmp", {}).get("name") == "tmp", f"{cw}: /tmp must be the tmp emptyDir")
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        env = {e["name"]: e for e in container.get("env", [])}
        for name, var in env.items():
            if name in SECRET_ENV:
                f.check("value" not in var and "secretKeyRef" in var.get("valueFrom", {}),
                        f"{cw}: {name} is a credential and must come from a secretKeyRef")
            if name.startswith("DATASTORAGE_") and name != "DATASTORAGE_CONFIG":
                setting, known = env_setting(name, tree)
                if not known and setting in PENDING_SETTINGS:
                    f.warn(f"{cw}: {name} sets {setting}, which src/config.rs does not have yet (being added; the server refuses unknown variables)")
                else:
                    f.check(known, f"{cw}: {name} names no setting of src/config.rs (the server refuses unknown DATASTORAGE_* variables)")
        # The configuration file the server reads, and the files it names.
        config_path = env.get("DATASTORAGE_CONFIG", {}).get("value")
        f.check(config_path in mounts, f"{cw}: DATASTORAGE_CONFIG ({config_path}) is not a mount")
        config = {}
        if config_path in mounts:
            volume = volumes.get(mounts[config_path]["name"], {})
            cm = configmaps.get(volume.get("configMap", {}).get("name"))
            sub = mounts[config_path].get("subPath")
            if f.check(cm is not None and sub in cm.get("data", {}), f"{cw}: config file {sub} missing from its ConfigMap"):
                try:
                    config = tomllib.loads(cm["data"][sub])
                except tomllib.TOMLDecodeError as e:
                    f.fail(f"{cw}: config.toml does not parse: {e}")
                problems: list[str] = []
                check_against_tree(config, tree, "", problems)
                f.check(not problems, f"{cw}: config.toml: {'; '.join(problems)}")
        named_files = []
        tls = config.get("grpc", {}).get("tls")
        if tls:
            named_files += [tls["cert_file"], tls["key_file"]]
        named_files += [k["pem_file"] for k in config.get("auth", {}).get("public_keys", [])]
        if "DATASTORAGE_INTEGRITY__EXPORT_SIGNING_KEY" in env:
            named_files.append(env["DATASTORAGE_INTEGRITY__EXPORT_SIGNING_KEY"]["value"])
        for path in named_files:
            f.check(any(path.startswith(mount.rstrip("/") + "/") for mount in mounts),
                    f"{cw}: {path} (named by the configuration) is under no volume mount")
        if doc["kind"] != "Deployment":
            continue
        # Probes name the container's ports; TLS and gRPC probes exclude each other.
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(probe_name)
            if not f.check(probe is not None, f"{cw}: {probe_name} missing"):
                continue
            if "grpc" in probe:
                f.check(probe["grpc"]["port"] in ports.values(), f"{cw}: {probe_name} gRPC port is no container port")
                f.check(not tls, f"{cw}: {probe_name} is a gRPC probe but gRPC serves TLS")
                f.check(probe["grpc"]["port"] == config.get("grpc", {}).get("port"),
                        f"{cw}: {probe_name} probes a port the server does not listen on (grpc.port)")
            elif "httpGet" in probe:
                port = probe["httpGet"]["port"]
                f.check(port in ports or port in ports.values(), f"{cw}: {probe_name} HTTP port {port} is no container port")
                number = ports.get(port, port)
                f.check(number == config.get("http", {}).get("port"),
                        f"{cw}: {probe_name} probes a port the server's HTTP listener is not on (http.port)")
            else:
                f.fail(f"{cw}: {probe_name} must be a gRPC or HTTP probe")
        f.check(ports.get("grpc") == config.get("grpc", {}).get("port") and ports.get("metrics") == config.get("http", {}).get("port"),
                f"{cw}: container ports grpc/metrics must be the configured grpc.port/http.port")
        shutdown = config.get("shutdown", {})
        budget = shutdown.get("drain_delay_ms", 5000) + shutdown.get("grace_period_ms", 20000)
        f.check(spec.get("terminationGracePeriodSeconds", 30) * 1000 > budget,
                f"{where}: terminationGracePeriodSeconds must exceed drain_delay_ms + grace_period_ms")
        f.check(doc["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, f"{where}: maxUnavailable must be 0")


def check_case(helm: str, case: Case, tree: dict, metrics: dict, node_tools: Path, f: Failures) -> dict:
    print(f"== {case.name}", flush=True)
    lint_cmd = [helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--kube-version", RENDER_KUBE_VERSION]
    for values in case.values:
        lint_cmd += ["--values", str(values)]
    lint = run(lint_cmd)
    f.check(lint.returncode == 0, f"{case.name}: helm lint --strict failed:\n{lint.stdout}{lint.stderr}")
    rendered = helm_template(helm, case)
    if not f.check(rendered.returncode == 0, f"{case.name}: helm template failed:\n{rendered.stderr}"):
        return {}
    # `helm template` leaves NOTES.txt out; a client-side dry-run install renders it.
    notes_cmd = [helm, "install", case.release, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"]
    for values in case.values:
        notes_cmd += ["--values", str(values)]
    notes = run(notes_cmd)
    f.check(notes.returncode == 0 and "\nNOTES:\n" in notes.stdout, f"{case.name}: NOTES.txt does not render:\n{notes.stderr}")
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    kinds: dict[str, int] = {}
    for doc in docs:
        kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + 1
    for kind, count in case.expect.items():
        f.check(kinds.get(kind, 0) == count, f"{case.name}: expected {count} {kind}, rendered {kinds.get(kind, 0)}")
    for kind in kinds:
        f.check(kind in case.expect, f"{case.name}: rendered an unexpected {kind} (add it to the case's expectations)")
    f.check("Secret" not in kinds, f"{case.name}: the chart must not render Secrets (references only)")

    builtin = crd = 0
    for doc in docs:
        where = f"{case.name}: {doc['kind']}/{doc['metadata']['name']}"
        validate_schema(doc, where, f)
        if (doc.get("apiVersion"), doc.get("kind")) in CRD_SCHEMAS:
            crd += 1
        else:
            builtin += 1
        if pod_spec_of(doc) is not None:
            check_pod(doc, where, docs, tree, f)

    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    deployment = by_kind["Deployment"][0]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    f.check(labels_match(deployment["spec"]["selector"], pod_labels), f"{case.name}: the Deployment's selector does not select its pods")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port_names = {p["name"] for p in container["ports"]}
    for service in by_kind.get("Service", []):
        sel = service["spec"]["selector"]
        f.check(all(pod_labels.get(k) == v for k, v in sel.items()), f"{case.name}: Service selector does not select the server pods")
        for port in service["spec"]["ports"]:
            f.check(port["targetPort"] in port_names, f"{case.name}: Service port {port['name']} targets no container port")
        grpc = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        f.check(len(grpc) == 1 and grpc[0].get("appProtocol") == "grpc", f"{case.name}: Service needs a port named grpc with appProtocol grpc")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        f.check(labels_match(pdb["spec"]["selector"], pod_labels), f"{case.name}: the PDB does not select the server pods")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        f.check(hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"], f"{case.name}: the HPA scales another Deployment")
        f.check("replicas" not in deployment["spec"], f"{case.name}: with an HPA the Deployment must not set replicas")
    for policy in by_kind.get("NetworkPolicy", []):
        f.check(labels_match(policy["spec"]["podSelector"], pod_labels), f"{case.name}: the NetworkPolicy does not select the server pods")
    for monitor in by_kind.get("ServiceMonitor", []):
        services = by_kind.get("Service", [])
        f.check(any(labels_match(monitor["spec"]["selector"], s["metadata"]["labels"]) for s in services),
                f"{case.name}: the ServiceMonitor selects no rendered Service")
        service_ports = {p["name"] for s in services for p in s["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            f.check(endpoint["port"] in service_ports, f"{case.name}: ServiceMonitor endpoint port {endpoint['port']} is no Service port")
        f.check(NAMESPACE in monitor["spec"].get("namespaceSelector", {}).get("matchNames", [NAMESPACE]),
                f"{case.name}: the ServiceMonitor looks in another namespace than the release's")

    # PromQL: alerts, dashboard panels and dashboard variables.
    exprs: list[tuple[str, str]] = []
    for rule_doc in by_kind.get("PrometheusRule", []):
        for group in rule_doc["spec"]["groups"]:
            for rule in group["rules"]:
                exprs.append((f"alert {rule.get('alert') or rule.get('record')}", str(rule["expr"])))
    dashboards = 0
    for cm in by_kind.get("ConfigMap", []):
        for key, text in cm.get("data", {}).items():
            if not key.endswith(".json"):
                continue
            dashboards += 1
            where = f"{case.name}: ConfigMap/{cm['metadata']['name']} {key}"
            f.check(cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1", f"{where}: label grafana_dashboard: \"1\" expected")
            try:
                dash = json.loads(text)
            except json.JSONDecodeError as e:
                f.fail(f"{where}: not JSON: {e}")
                continue
            exprs += dashboard_exprs(dash, where, metrics, f)
    results = promql_analyse(node_tools, [grafana_to_promql(e) for _, e in exprs])
    for (where, expr), result in zip(exprs, results):
        check_promql(f"{case.name}: {where}", expr, result, metrics, f)
    print(f"   {len(docs)} manifests: {builtin} against Kubernetes {' and '.join(KUBE_VERSIONS)} schemas (strict), "
          f"{crd} custom resources against scripts/chart-check/schemas; {len(exprs)} PromQL expressions"
          f"{f' ({dashboards} dashboard)' if dashboards else ''}", flush=True)
    return {"docs": len(docs), "builtin": builtin, "crd": crd, "promql": len(exprs), "rendered": docs}


def dashboard_exprs(dash: dict, where: str, metrics: dict, f: Failures) -> list[tuple[str, str]]:
    exprs = []
    f.check(bool(dash.get("uid")) and bool(dash.get("title")), f"{where}: uid and title expected")
    ids = set()
    panels = list(dash.get("panels", []))
    for panel in dash.get("panels", []):
        panels += panel.get("panels", [])
    for panel in panels:
        f.check(panel.get("id") not in ids, f"{where}: panel id {panel.get('id')} repeated")
        ids.add(panel.get("id"))
        f.check({"x", "y", "w", "h"} <= set(panel.get("gridPos", {})), f"{where}: panel {panel.get('title')} lacks gridPos")
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets", [])
        f.check(bool(targets), f"{where}: panel {panel.get('title')} has no query")
        refs = [t.get("refId") for t in targets]
        f.check(len(set(refs)) == len(refs), f"{where}: panel {panel.get('title')} repeats a refId")
        for target in targets:
            exprs.append((f"panel {panel.get('title')!r}", target["expr"]))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var.get("query"), dict) else var.get("query", "")
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        if not f.check(m is not None, f"{where}: variable {var['name']}: only label_values(selector, label) queries are checked"):
            continue
        exprs.append((f"variable {var['name']}", m.group(1)))
        metric = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", m.group(1)).group(0)
        f.check(m.group(2) in TARGET_LABELS | metrics.get(metric, {}).get("labels", set()),
                f"{where}: variable {var['name']} reads label {m.group(2)}, which {metric} does not have")
    return exprs


def check_promql(where: str, expr: str, result: dict, metrics: dict, f: Failures) -> None:
    f.check(not result["errors"], f"{where}: PromQL does not parse (offset {result['errors'][:1]}): {expr}")
    f.check(not result["unsupported"], f"{where}: quoted label names are not checked: {result['unsupported']}")
    used_labels: set[str] = set(TARGET_LABELS)
    for selector in result["selectors"]:
        metric = selector["metric"]
        if not f.check(metric in metrics, f"{where}: {metric} is not a metric the server exports (src/): {expr}"):
            continue
        allowed = metrics[metric]["labels"] | TARGET_LABELS
        used_labels |= allowed
        for label in selector["labels"]:
            f.check(label in allowed, f"{where}: {metric} has no label {label}")
    for label in result["grouping"]:
        f.check(label in used_labels, f"{where}: groups by {label}, which none of its metrics has")


def check_invalid(helm: str, f: Failures) -> int:
    files = sorted(INVALID_DIR.glob("*.yaml"))
    f.check(bool(files), "helm/invalid-values holds no cases")
    for path in files:
        expects = re.findall(r"^# expect: (.+)$", path.read_text(), re.M)
        f.check(bool(expects), f"{path.name}: no `# expect:` line")
        proc = helm_template(helm, Case(path.name, "ds", [path], {}))
        if f.check(proc.returncode != 0, f"invalid-values/{path.name}: helm template succeeded, but these values must be refused"):
            for expect in expects:
                f.check(expect in proc.stderr, f"invalid-values/{path.name}: failed, but without {expect!r}:\n{proc.stderr}")
    print(f"== helm/invalid-values: {len(files)} values files, each refused by helm template with its expected message", flush=True)
    return len(files)


def self_tests(defaults: list[dict], metrics: dict, node_tools: Path) -> None:
    """The checks must catch what they claim to catch."""
    probe = Failures(quiet=True)
    deployment = copy.deepcopy(next(d for d in defaults if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["bogusField"] = True
    validate_schema(deployment, "self-test", probe)
    bad_monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
                   "metadata": {"name": "x", "namespace": "y"},
                   "spec": {"selector": {"matchLabels": {"a": "b"}}, "endpoints": [{"port": "metrics", "intervall": "30s"}]}}
    validate_schema(bad_monitor, "self-test", probe)
    exprs = ["sum(rate(grpc_server_handled_total[5m])", "rate(datastorage_no_such_metric_total[5m])",
             'sum by (no_such_label) (datastorage_jobs{state="failed"})']
    for expr, result in zip(exprs, promql_analyse(node_tools, exprs)):
        check_promql("self-test", expr, result, metrics, probe)
    if len(probe.errors) < 5:
        raise SystemExit(f"chart-check: self-test: expected 5 rejections, got {len(probe.errors)}: {probe.errors}")


def dockerignore_allows(rel: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in patterns:
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return not excluded


def check_dockerfile(values: dict, f: Failures) -> None:
    print("== Dockerfile", flush=True)
    commands = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        patterns.append((negate, re.compile(regex)))
    stages = {}
    current = None
    for c in commands:
        if c.cmd == "FROM":
            current = c.value[2] if len(c.value) >= 3 and c.value[1].upper() == "AS" else None
            stages[current] = c.value[0]
        if c.cmd in ("COPY", "ADD") and not any(fl.startswith("--from") for fl in c.flags):
            for source in c.value[:-1]:
                path = ROOT / source
                optional = current == "model-context"
                if not path.exists():
                    if optional:
                        f.warn(f"Dockerfile line {c.start_line}: {source} is missing (only MODEL_SOURCE=context needs it; `make deps` fills it)")
                    else:
                        f.fail(f"Dockerfile line {c.start_line}: COPY source {source} does not exist")
                    continue
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                blocked = [str(p.relative_to(ROOT)) for p in files if not dockerignore_allows(str(p.relative_to(ROOT)), patterns)]
                f.check(not blocked, f"Dockerfile line {c.start_line}: .dockerignore keeps out {blocked[:3]}")
    args = {c.value[0].split("=")[0]: c.value[0].split("=", 1)[1] for c in commands if c.cmd == "ARG" and "=" in c.value[0]}
    f.check(f"model-{args.get('MODEL_SOURCE')}" in stages, "Dockerfile: the default MODEL_SOURCE names no model-* stage")
    for source in ("pypi", "context", "none"):
        f.check(f"model-{source}" in stages, f"Dockerfile: no model-{source} stage")
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    copied = {v.rstrip("/") for c in commands if c.cmd == "COPY" and not c.flags for v in c.value[:-1]}
    for bench in cargo.get("bench", []):
        f.check("benches" in copied and (ROOT / "benches" / f"{bench['name']}.rs").exists(),
                f"Dockerfile: cargo needs benches/{bench['name']}.rs ([[bench]] in Cargo.toml)")
    for needed in ("Cargo.toml", "Cargo.lock", "build.rs", "proto", "src", "migrations"):
        f.check(needed in copied, f"Dockerfile: the builder must copy {needed}")
    exposed = {v for c in commands if c.cmd == "EXPOSE" for v in c.value}
    f.check({"8080", "9090"} <= exposed, "Dockerfile: EXPOSE 8080 9090 expected (the chart's ports)")
    users = [c.value[0] for c in commands if c.cmd == "USER"]
    f.check(bool(users) and users[-1].split(":")[0] == str(values["podSecurityContext"]["runAsUser"]),
            "Dockerfile: the final USER must be the chart's runAsUser (numeric)")
    model_dirs = re.findall(r'model_dir = \\?"([^"\\]+)', " ".join(c.original for c in commands if c.cmd == "RUN"))
    f.check(model_dirs == [values["model"]["dir"]], f"Dockerfile: the image's model_dir {model_dirs} must be the chart's model.dir")
    f.check(any(c.cmd == "COPY" and "/opt/datastorage/models/" in c.value for c in commands)
            and values["model"]["dir"].startswith("/opt/datastorage/models/"),
            "Dockerfile: the model must land where the chart's model.dir points")


def check_with_server(server: Path, summary: dict, f: Failures) -> None:
    """Each case's config.toml and environment, given to the real server's
    configuration loader: `datastorage migrate` loads and validates them exactly
    as the pod would, then fails to reach PostgreSQL (a closed local port). Files
    the configuration names are stood in for by empty files under a temporary
    directory (validation checks that they exist; `migrate` reads none)."""
    import tempfile
    print(f"== the server's own configuration loader ({server})", flush=True)
    dummy = {
        "DATASTORAGE_DATABASE__URL": "postgres://u:p@127.0.0.1:9/db",
        "DATASTORAGE_DATABASE__READ_REPLICA_URL": "postgres://u:p@127.0.0.1:9/db",
        "DATASTORAGE_REDIS__URL": "redis://127.0.0.1:9",
    }
    for name, s in summary.items():
        if not s:
            continue
        deployment = next(d for d in s["rendered"] if d["kind"] == "Deployment")
        spec = deployment["spec"]["template"]["spec"]
        container = spec["containers"][0]
        configmaps = {d["metadata"]["name"]: d for d in s["rendered"] if d["kind"] == "ConfigMap"}
        volume = next(v for v in spec["volumes"] if v["name"] == "config")
        config = tomllib.loads(configmaps[volume["configMap"]["name"]]["data"]["config.toml"])
        with tempfile.TemporaryDirectory() as tmp:
            def relocate(node, key=""):
                if isinstance(node, dict):
                    return {k: relocate(v, k) for k, v in node.items()}
                if isinstance(node, list):
                    return [relocate(v, key) for v in node]
                if isinstance(node, str) and node.startswith("/"):
                    path = Path(tmp + node)
                    if key.endswith("_dir"):
                        path.mkdir(parents=True, exist_ok=True)
                        for stub in ("model.safetensors", "tokenizer.json", "config.json"):
                            (path / stub).touch()
                    else:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.touch()
                    return str(path)
                return node
            config = relocate(config)
            lines = []
            def emit(table, prefix):
                scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict))}
                for k, v in scalars.items():
                    lines.append(f"{json.dumps(k)} = {json.dumps(v)}")
                for k, v in table.items():
                    if isinstance(v, dict):
                        lines.append(f"[{'.'.join(json.dumps(p) for p in prefix + [k])}]")
                        emit(v, prefix + [k])
                    elif isinstance(v, list) and v and isinstance(v[0], dict):
                        for item in v:
                            lines.append(f"[[{'.'.join(json.dumps(p) for p in prefix + [k])}]]")
                            emit(item, prefix + [k])
            emit(config, [])
            config_file = Path(tmp) / "config.toml"
            config_file.write_text("\n".join(lines) + "\n")
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RUST_BACKTRACE": "0",
                   "DATASTORAGE_DATABASE__ACQUIRE_TIMEOUT_MS": "100"}
            for var in container["env"]:
                var_name = var["name"]
                if var_name.startswith("OTEL_EXPORTER"):
                    continue  # no export attempts from a check
                if "secretKeyRef" in var.get("valueFrom", {}):
                    env[var_name] = dummy.get(var_name, "k" * 32)
                elif "value" in var:
                    value = var["value"]
                    if value.startswith("/") and var_name != "DATASTORAGE_CONFIG":
                        value = relocate(value)
                    env[var_name] = value
            env["DATASTORAGE_CONFIG"] = str(config_file)
            proc = subprocess.run([str(server), "migrate"], env=env, capture_output=True, text=True, timeout=120)
            out = proc.stdout + proc.stderr
            if f.check(proc.returncode != 0 and "running migrations" in out and "invalid configuration" not in out,
                       f"{name}: the server refused the chart's configuration:\n{out[-2000:]}"):
                print(f"   {name}: configuration accepted; stopped at the database as expected", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--helm", required=True)
    parser.add_argument("--node-tools", required=True, type=Path)
    parser.add_argument("--server-bin", type=Path,
                        help="a datastorage binary built from this tree: each case's configuration is loaded by it")
    args = parser.parse_args()
    f = Failures()
    tree = settings_tree()
    metrics = exported_metrics()
    for required in ("grpc_server_handled_total", "grpc_server_handling_seconds_bucket", "datastorage_outage_queue_dead_lettered_total"):
        f.check(required in metrics, f"src/: metric {required} not found (has the metrics code moved?)")

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())

    # values.schema.json's `config` against src/config.rs.
    def schema_paths(node: dict, prefix: str = "") -> set[str]:
        out = set()
        for key, child in node.get("properties", {}).items():
            out.add(prefix + key)
            if child.get("type") == "object" and "properties" in child:
                out |= schema_paths(child, prefix + key + ".")
        return out
    in_schema = schema_paths(schema["properties"]["config"])
    in_source = tree_paths(tree)
    for path in sorted(in_schema - in_source):
        f.fail(f"values.schema.json: config.{path} is not a setting of src/config.rs")
    def covered(path: str) -> bool:
        return any(path == p or path.startswith(p + ".") for p in in_schema | CHART_OWNED_SETTINGS)
    for path in sorted(p for p in in_source - in_schema if not covered(p)):
        f.warn(f"src/config.rs: {path} cannot be set through the chart (add it to values.schema.json's config)")

    # The scopes the schema accepts (subject_scopes, rate_limit.scopes) against src/auth.
    auth_src = (ROOT / "src" / "auth" / "mod.rs").read_text()
    source_scopes = set(re.findall(r'Scope::\w+ => "([a-z]+:[a-z]+)"', auth_src))
    schema_scopes = set(schema["definitions"]["scope"]["enum"])
    f.check(not schema_scopes - source_scopes, f"values.schema.json: scopes {sorted(schema_scopes - source_scopes)} are not in src/auth/mod.rs")
    if source_scopes - schema_scopes:
        f.warn(f"values.schema.json: scopes {sorted(source_scopes - schema_scopes)} of src/auth/mod.rs cannot be granted through the chart")

    ci_files = {p.name for p in (CHART / "ci").glob("*.yaml")}
    covered_files = {v.name for c in CASES for v in c.values}
    f.check(ci_files == covered_files, f"helm/datastorage/ci: {sorted(ci_files ^ covered_files)} not matched by a case in check.py")

    summary = {}
    for case in CASES:
        summary[case.name] = check_case(args.helm, case, tree, metrics, args.node_tools, f)
    invalid = check_invalid(args.helm, f)
    defaults = summary.get("defaults", {}).get("rendered")
    if defaults:
        self_tests(defaults, metrics, args.node_tools)
        print("== self-tests: an unknown field, a broken and an unknown-metric PromQL expression are rejected", flush=True)
    check_dockerfile(values, f)
    if args.server_bin:
        if f.check(args.server_bin.is_file(), f"--server-bin {args.server_bin} does not exist"):
            check_with_server(args.server_bin, summary, f)
    else:
        print("== the server's own configuration loader: skipped (no --server-bin; `make test` passes the binary it built)", flush=True)

    print()
    for name, s in summary.items():
        if s:
            print(f"chart-check: {name}: {s['docs']} manifests validated ({s['builtin']} Kubernetes, {s['crd']} CRD), {s['promql']} PromQL expressions")
    print(f"chart-check: {invalid} invalid values files refused; {len(f.warnings)} warnings")
    # Not the "N passed, N failed" form: that closing line belongs to the test runners.
    if f.errors:
        print(f"chart-check: FAILED, {len(f.errors)} of {f.passed + len(f.errors)} checks failed")
        return 1
    print(f"chart-check: OK, all {f.passed} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
