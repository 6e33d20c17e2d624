"""Checks the field names of deploy/kserve/*.yaml against KServe's and Kubernetes' schemas.

Walks each manifest through the models the KServe Python SDK generates from KServe's OpenAPI
schema (ServingRuntime, InferenceService) and the Kubernetes client's (Deployment, Service,
NetworkPolicy) and prints every key the schema does not know: a misspelt or misplaced field
that `kubectl apply` would reject or drop. Field names only: no values, no cluster needed.

  python3.11 -m venv /tmp/peers-venvs/kserve && /tmp/peers-venvs/kserve/bin/pip install -r examples/peers/requirements-kserve.txt
  /tmp/peers-venvs/kserve/bin/python deploy/check_manifests.py deploy/kserve/*.yaml
"""

import re, sys, yaml
import kserve, kubernetes.client as k

kinds = {"ServingRuntime": "V1alpha1ServingRuntime", "InferenceService": "V1beta1InferenceService",
         "Deployment": "V1Deployment", "Service": "V1Service", "NetworkPolicy": "V1NetworkPolicy"}

def cls_of(name):
    return getattr(kserve, name, None) or getattr(k, name, None)

def check(data, typ, path, counts):
    m = re.fullmatch(r"list\[(.+)\]", typ)
    if m:
        for i, x in enumerate(data):
            check(x, m.group(1), f"{path}[{i}]", counts)
        return
    m = re.fullmatch(r"dict\(str, (.+)\)", typ)
    if m:
        for key, x in data.items():
            check(x, m.group(1), f"{path}.{key}", counts)
        return
    cls = cls_of(typ)
    if cls is None or not hasattr(cls, "openapi_types"):
        counts["leaf"] += 1
        return
    by_json = {v: a for a, v in cls.attribute_map.items()}
    for key, x in data.items():
        if key not in by_json:
            print(f"  UNKNOWN {path}.{key} (in {typ})")
            counts["bad"] += 1
        else:
            counts["known"] += 1
            check(x, cls.openapi_types[by_json[key]], f"{path}.{key}", counts)

unknown = 0
for f in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(f)):
        counts = {"known": 0, "bad": 0, "leaf": 0}
        check(doc, kinds[doc["kind"]], doc["kind"], counts)
        print(f"{f}: {doc['kind']}: {counts['known']} fields known to the schema, {counts['bad']} unknown")
        unknown += counts["bad"]
sys.exit(1 if unknown else 0)
