#!/usr/bin/env python3
"""Adapts rendered chart manifests to what `podman kube play` (4.3) can run.

Reads YAML documents on stdin, writes the playable ones to stdout:
- kinds podman does not run (Service, ServiceAccount, PodDisruptionBudget,
  HorizontalPodAutoscaler, NetworkPolicy, ServiceMonitor) are dropped;
- Secrets become ConfigMaps of the same name and keys: podman crashes on
  Secret volumes;
- container `ports` are dropped: podman publishes each one on the host's
  port of the same number on every address (and three pods collide there);
  the test reaches the pods by their addresses on its own network instead;
- probes are dropped: podman turns them into healthchecks that need
  systemd timers. The test asks /healthz and /readyz itself.
Everything else (Deployments, ConfigMaps, volumes, env, security contexts,
args) is played as rendered.
"""
import base64
import sys

import yaml

SKIP = {"Service", "ServiceAccount", "PodDisruptionBudget", "HorizontalPodAutoscaler",
        "NetworkPolicy", "ServiceMonitor"}

out = []
for doc in yaml.safe_load_all(sys.stdin):
    if not doc or doc.get("kind") in SKIP:
        continue
    if doc["kind"] == "Secret":
        data = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
        data.update(doc.get("stringData") or {})
        doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"], "data": data}
    if doc["kind"] in ("Deployment", "StatefulSet"):
        pod = doc["spec"]["template"]["spec"]
        for container in pod["containers"]:
            for key in ("ports", "readinessProbe", "livenessProbe", "startupProbe", "lifecycle"):
                container.pop(key, None)
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                volume["configMap"] = {"name": volume.pop("secret")["secretName"]}
    out.append(doc)
yaml.safe_dump_all(out, sys.stdout, sort_keys=False)
