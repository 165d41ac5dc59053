#!/usr/bin/env python3
"""Adapts rendered chart manifests to what `podman kube play` (4.3) can run.

usage: podmanize.py FILES_DIR < rendered.yaml > play.yaml

Reads YAML documents on stdin, writes the playable ones to stdout:
- kinds podman does not run (Service, ServiceAccount, PodDisruptionBudget,
  HorizontalPodAutoscaler, NetworkPolicy, ServiceMonitor) are dropped;
- Secret volumes, on which podman crashes, are mounted like ConfigMaps
  (below);
- container `ports` are dropped: podman publishes each one on the host's
  port of the same number on every address (and three pods collide there);
  the test reaches the pods by their addresses on its own network instead;
- probes are dropped: podman turns them into healthchecks that need
  systemd timers. The test asks /healthz and /readyz itself;
- ConfigMap (and Secret) volumes become read-only hostPath directories
  under FILES_DIR holding the same files: podman makes one named volume per
  ConfigMap, shared by all pods, keeps it after `kube down` and rewrites
  its files as each pod starts, so a starting pod can read a half-written
  file;
- emptyDir volumes are dropped with their mounts: podman makes them one
  named volume shared by every pod; without the mount each container gets
  the image's own anonymous volume for /var/lib/smarthost, which is what
  an emptyDir is.
Everything else (the Deployments' pods with their images, args, env,
security contexts, replicas, and the files of the ConfigMaps) is played as
rendered.
"""
import base64
import os
import sys

import yaml

SKIP = {"Service", "ServiceAccount", "PodDisruptionBudget", "HorizontalPodAutoscaler",
        "NetworkPolicy", "ServiceMonitor"}

files_dir = os.path.abspath(sys.argv[1])
docs = [d for d in yaml.safe_load_all(sys.stdin) if d]


def config_data(doc):
    if doc["kind"] == "Secret":
        data = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
        data.update(doc.get("stringData") or {})
        return data
    return dict(doc.get("data") or {})


# Every ConfigMap and Secret as a directory of files, one per key.
for doc in docs:
    if doc["kind"] in ("ConfigMap", "Secret"):
        directory = os.path.join(files_dir, doc["metadata"]["name"])
        os.makedirs(directory, exist_ok=True)
        for key, text in config_data(doc).items():
            with open(os.path.join(directory, key), "w") as f:
                f.write(text)

out = []
for doc in docs:
    if not doc or doc.get("kind") in SKIP:
        continue
    if doc["kind"] in ("ConfigMap", "Secret"):
        continue  # mounted from FILES_DIR instead
    if doc["kind"] in ("Deployment", "StatefulSet"):
        pod = doc["spec"]["template"]["spec"]
        for container in pod["containers"]:
            for key in ("ports", "readinessProbe", "livenessProbe", "startupProbe", "lifecycle"):
                container.pop(key, None)
        dropped = set()
        volumes = []
        for volume in pod.get("volumes", []):
            if "emptyDir" in volume:
                dropped.add(volume["name"])
                continue
            source = volume.pop("secret", None) or volume.pop("configMap", None)
            if source is not None:
                name = source.get("secretName") or source["name"]
                volume["hostPath"] = {"path": os.path.join(files_dir, name), "type": "Directory"}
            volumes.append(volume)
        pod["volumes"] = volumes
        for container in pod["containers"]:
            container["volumeMounts"] = [m for m in container.get("volumeMounts", [])
                                         if m["name"] not in dropped]
    out.append(doc)
yaml.safe_dump_all(out, sys.stdout, sort_keys=False)
