#!/usr/bin/env python3
"""Renders every kustomization under k8s/ and validates what it renders,
offline, strictly (an unknown field is an error):

- Kubernetes kinds against the Kubernetes OpenAPI schemas that the
  `kubernetes-validate` package ships (version KUBERNETES_VERSION);
- ScyllaCluster against scylla-operator's CRD schema, vendored in
  k8s/schemas/scyllacluster-v1.json (every object that lists its
  properties and does not preserve unknown fields gets
  additionalProperties: false, as the API server would prune them);
- the Redpanda Helm values (k8s/redpanda/values.yaml), merged over the
  chart's defaults as Helm merges them, against the chart's own values
  schema; both vendored from chart version 26.2.1
  (k8s/schemas/redpanda-chart-values.yaml, k8s/schemas/redpanda-chart-values.json).

A kind with no schema here is an error, not a warning. Exits non-zero on
any problem, naming each. Run: python3 k8s/validate.py
"""

import json
import pathlib
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.32.0"
ROOT = pathlib.Path(__file__).resolve().parent
SCHEMAS = ROOT / "schemas"
CRDS = {("scylla.scylladb.com/v1", "ScyllaCluster"): SCHEMAS / "scyllacluster-v1.json"}
# (our values, the chart's default values, the chart's values schema)
HELM_VALUES = [
    (
        ROOT / "redpanda" / "values.yaml",
        SCHEMAS / "redpanda-chart-values.yaml",
        SCHEMAS / "redpanda-chart-values.json",
    )
]


def strict(schema):
    """The schema with additionalProperties: false on every object schema
    that names its properties and allows no unknown fields."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def helm_merge(defaults, values):
    """`values` over `defaults` as Helm coalesces them: maps merge key by
    key, anything else replaces, a null removes the key."""
    if not isinstance(defaults, dict) or not isinstance(values, dict):
        return values
    out = dict(defaults)
    for key, value in values.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = helm_merge(defaults.get(key), value)
    return out


def kustomizations():
    return sorted(p.parent for p in ROOT.rglob("kustomization.yaml"))


def render(directory):
    done = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory}: {done.stderr.strip()}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def check_resource(doc, crd_validators):
    """Problems of one rendered resource (empty: it passed)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if key in crd_validators:
        return [
            f"{name}: {'/'.join(map(str, e.path))}: {e.message}"
            for e in crd_validators[key].iter_errors(doc)
        ]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{name}: no schema for {key[0]} {key[1]}"]
    except kubernetes_validate.ValidationError as e:
        return [f"{name}: {'/'.join(map(str, e.path))}: {e.message}"]
    return []


def main():
    crd_validators = {}
    for key, path in CRDS.items():
        schema = strict(json.loads(path.read_text()))
        crd_validators[key] = jsonschema.Draft7Validator(schema)
    problems = []
    checked = 0
    for directory in kustomizations():
        label = directory.relative_to(ROOT.parent)
        try:
            docs = render(directory)
        except RuntimeError as e:
            problems.append(str(e))
            continue
        for doc in docs:
            checked += 1
            problems += [f"{label}: {p}" for p in check_resource(doc, crd_validators)]
        print(f"{label}: {len(docs)} resources rendered")
    for values, defaults, schema_path in HELM_VALUES:
        validator = jsonschema.Draft202012Validator(json.loads(schema_path.read_text()))
        data = helm_merge(yaml.safe_load(defaults.read_text()), yaml.safe_load(values.read_text()))
        errors = list(validator.iter_errors(data))
        problems += [
            f"{values.relative_to(ROOT.parent)}: {'/'.join(map(str, e.path))}: {e.message}"
            for e in errors
        ]
        checked += 1
        print(f"{values.relative_to(ROOT.parent)}: checked against the chart's values schema")
    for p in problems:
        print(f"INVALID {p}", file=sys.stderr)
    print(f"{checked} documents checked, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
