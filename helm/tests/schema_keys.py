#!/usr/bin/env python3
"""Checks that values.schema.json takes every key of docs/configuration.md.

Each key in the tables of a section the chart renders must be in the
schema's `config`, unless the chart sets it itself (docs/deploy.md,
"Configuration"); a key in the schema that the reference does not list is
an error too. Sections the chart does not render are named in
NOT_RENDERED, so a new section is a decision, not an oversight.
"""
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
# Section heading in configuration.md -> path in the schema's `config`.
RENDERED = {
    "node": ("node",),
    "smtp": ("smtp",),
    "[smtp.users]": ("smtp", "users", "[]"),
    "queue": ("queue",),
    "delivery": ("delivery",),
    "[domains]": ("domains", "[]"),
    "bounce": ("bounce",),
    "admin": ("admin",),
    "[admin.operators]": ("admin", "operators", "[]"),
    "log": ("log",),
}
# Keys the chart writes itself, from values outside `config`.
CHART_SETS = {
    "smtp": {"listen", "tls"},
    "queue": {"backend", "path", "redis_url", "redis_cluster"},
    "delivery": {"log_file"},
    "admin": {"listen", "metrics_listen"},
}
# Keys only the local spool reads: the chart always runs the Redis backend,
# so its schema refuses them rather than take a setting that does nothing.
LOCAL_SPOOL_ONLY = {
    "queue": {"zero_fill_segments"},
}
# Sections not taken from `config`: [smtp.tls] comes from `tls`; the others
# a chart user gives in the credentials.existingSecret file (docs/deploy.md).
NOT_RENDERED = {"smtp.tls", "api", "webhooks", "suppression", "pickup", "badmail"}


def documented():
    """Each section heading's keys, from the first column of its tables."""
    keys, section = {}, None
    text = (ROOT / "docs" / "configuration.md").read_text()
    for line in text.splitlines():
        heading = re.match(r"^##+ `\[(\[?[a-z_.]+\]?)\]`", line)
        if heading:
            section = heading.group(1)
            keys.setdefault(section, set())
        elif line.startswith("## "):
            section = None
        elif section and (row := re.match(r"^\| `([a-z_]+)`", line)):
            keys[section].add(row.group(1))
    return keys


def in_schema(schema, path):
    node = schema["properties"]["config"]
    for step in path:
        node = node["items"] if step == "[]" else node["properties"][step]
    return {key for key, value in node["properties"].items()
            if not (value.get("type") == "array" and "properties" in value.get("items", {}))}


def main():
    schema = json.loads((ROOT / "helm" / "smarthost" / "values.schema.json").read_text())
    problems = []
    for section, keys in documented().items():
        if section in NOT_RENDERED:
            continue
        if section not in RENDERED:
            problems.append(f"[{section}] is documented but neither rendered by the chart "
                            "nor listed in NOT_RENDERED")
            continue
        expected = keys - CHART_SETS.get(section, set()) - LOCAL_SPOOL_ONLY.get(section, set())
        present = in_schema(schema, RENDERED[section])
        for key in sorted(expected - present):
            problems.append(f"{section}.{key} is documented but the schema refuses it")
        for key in sorted(present - expected):
            problems.append(f"{section}.{key} is in the schema but not documented")
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
