#!/usr/bin/env python3
"""Writes helm/smarthost/values.schema.json.

The config sections list the keys of node/src/config.rs (docs/configuration.md);
keys the chart sets itself are left out, so a value for them is an error.
Run it after adding a config key, then commit the result. With a path
argument it writes there instead (the chart test compares the two).
"""
import json
import pathlib

DUR = {"type": "string", "pattern": r"^\s*([0-9]+\s*(ms|s|m|h|d)\s*)+$"}
SIZE = {"type": ["string", "integer"], "pattern": r"^\s*[0-9]+\s*([kKmMgG](i?[bB])?|[bB])?\s*$", "minimum": 0}
POS = {"type": "integer", "minimum": 1}
NONNEG = {"type": "integer", "minimum": 0}
STR = {"type": "string"}
NESTR = {"type": "string", "minLength": 1}
BOOL = {"type": "boolean"}
NET = {"type": "string", "pattern": r"^[0-9a-fA-F:.]+/[0-9]+$"}
ADDR = {"type": "string", "pattern": r"^(\[[0-9a-fA-F:.]+\]|[0-9.]+):[0-9]+$"}
TLS = {"type": "string", "enum": ["opportunistic", "required", "disabled"]}
RATE = {"type": "string", "pattern": r"^[0-9]+/(s|m|h)$"}


def obj(props, required=()):
    o = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        o["required"] = list(required)
    return o


def nullable(s):
    return {"anyOf": [s, {"type": "null"}]}


config = obj({
    "node": obj({"id": NESTR, "hostname": {"type": "string", "pattern": r"^\S+$"},
                 "shutdown_grace": DUR, "threads": NONNEG,
                 "thread_busy_percent": {"type": "integer", "minimum": 0, "maximum": 100}}),
    "smtp": obj({
        "max_connections": POS, "max_connections_per_ip": POS, "connection_timeout": DUR,
        "anonymous_connection_share": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "command_timeout": DUR, "data_timeout": DUR, "min_data_rate": SIZE,
        "tls_handshake_timeout": DUR, "greeting_delay": DUR,
        "max_message_size": SIZE, "max_session_size": SIZE, "max_recipients": POS,
        "require_tls": BOOL, "max_hop_count": POS,
        "junk_command_limit": NONNEG,
        "relay_networks": {"type": "array", "items": NET},
        "allow_plaintext_auth": BOOL, "auth_failure_delay": DUR,
        "max_password_checks": POS, "password_check_queue": NONNEG, "password_check_wait": DUR,
        "auth_failure_window": DUR, "auth_address_max_failures": NONNEG,
        "auth_user_max_failures": NONNEG, "auth_block_duration": DUR, "auth_trust_duration": DUR,
        "postmaster": NESTR, "max_body_memory": SIZE, "body_memory_wait": DUR,
        "body_spill_threshold": SIZE, "body_spill_dir": NESTR,
        "users": {"type": "array", "items": obj(
            {"name": NESTR, "password_hash": {"type": "string", "pattern": r"^\$argon2"},
             "senders": {"type": "array", "items": NESTR},
             "messages_per_minute": NONNEG, "messages_per_day": NONNEG},
            ["name", "password_hash"])},
    }),
    "queue": obj({
        "redis_min_replicas": NONNEG, "redis_require_fsync": BOOL,
        "redis_response_timeout": DUR, "lease": DUR, "rescan_interval": DUR,
        "node_timeout": DUR,
        "retry_intervals": {"type": "array", "items": DUR, "minItems": 1},
        "max_lifetime": DUR, "delay_notification": DUR,
    }),
    "delivery": obj({
        "smart_host": nullable(NESTR), "max_connections": POS,
        "max_connections_per_domain": POS, "max_messages_per_connection": POS,
        "tls": TLS, "tls_ca_file": nullable(NESTR),
        "dns_servers": {"type": "array", "items": ADDR},
        "mx_port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "connect_timeout": DUR, "greeting_timeout": DUR, "command_timeout": DUR,
        "data_timeout": DUR, "connection_lease": DUR, "body_cache": SIZE,
    }),
    "domains": {"type": "array", "items": obj({
        "name": NESTR, "kind": {"type": "string", "enum": ["remote", "local"]},
        "drop_dir": NESTR, "smart_host": NESTR, "max_connections": POS, "rate": RATE,
        "tls": TLS, "auth": obj({"user": NESTR, "password": STR}, ["user", "password"]),
    }, ["name"])},
    "bounce": obj({
        "copy_to": nullable({"type": "string", "pattern": "@"}),
        "double_bounce_to": nullable({"type": "string", "pattern": "@"}),
    }),
    "admin": obj({"operators": {"type": "array", "items": obj(
        {"name": NESTR, "token_hash": {"type": "string", "pattern": r"^\$argon2"},
         "role": {"type": "string", "enum": ["admin", "operator", "viewer"]}},
        ["name", "token_hash", "role"])},
        "max_token_checks": POS, "token_max_failures": NONNEG, "token_block_duration": DUR}),
    "log": obj({"format": {"type": "string", "enum": ["text", "json"]}, "level": NESTR,
            "session_log_dir": nullable(NESTR)}),
})

PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
RES = {"type": "object"}
K8S_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}


def component():
    return obj({
        "replicas": NONNEG, "resources": RES,
        "pdb": obj({"enabled": BOOL, "maxUnavailable": {"type": ["integer", "string"]}}),
        "affinity": {"type": "object"}, "nodeSelector": {"type": "object"},
        "tolerations": {"type": "array"}, "podLabels": {"type": "object"},
        "podAnnotations": {"type": "object"},
    })


schema = obj({
    "image": obj({"repository": NESTR, "tag": STR,
                  "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}}),
    "imagePullSecrets": {"type": "array"},
    "fullnameOverride": STR,
    "config": config,
    "configInSecret": BOOL,
    "credentials": obj({"existingSecret": STR}),
    "tls": obj({"enabled": BOOL, "existingSecret": STR, "cert": STR, "key": STR}),
    "smtp": obj({"containerPort": PORT, "service": obj({
        "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "port": PORT,
        "externalTrafficPolicyLocal": BOOL,
        "loadBalancerSourceRanges": {"type": "array", "items": NET},
        "annotations": {"type": "object"}})}),
    "admin": obj({"containerPort": PORT,
                  "metricsPort": {"type": "integer", "minimum": 0, "maximum": 65535},
                  "service": obj({"port": PORT})}),
    "preStopSeconds": NONNEG,
    "dataSizeLimit": {"type": "string"},
    "node": component(),
    "coordinator": component(),
    "topologySpread": BOOL,
    "extraEnv": {"type": "array"},
    "autoscaling": obj({
        "enabled": BOOL, "minReplicas": POS, "maxReplicas": POS,
        "targetCPUUtilizationPercentage": {"type": "integer", "minimum": 1, "maximum": 100},
        "queueDepth": obj({"enabled": BOOL, "metricName": NESTR, "selector": {"type": "object"},
                           "targetPerPod": {"type": ["string", "integer"]}})}),
    "serviceMonitor": obj({"enabled": BOOL, "interval": STR, "labels": {"type": "object"}}),
    "networkPolicy": obj({"enabled": BOOL, "smtpFrom": {"type": "array", "items": NET},
                          "metricsFrom": {"type": "array", "items": {"type": "object"}}}),
    "redis": obj({
        "external": obj({"url": STR, "cluster": BOOL, "existingSecret": nullable(
            obj({"name": K8S_NAME, "key": NESTR}, ["name", "key"]))}),
        "bundled": obj({"enabled": BOOL, "image": NESTR, "maxmemory": NESTR, "storage": NESTR,
                        "storageClassName": STR, "resources": RES}),
    }),
})
schema["$schema"] = "https://json-schema.org/draft-07/schema#"
schema["title"] = "values of the smarthost Helm chart"
import sys
out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else \
    pathlib.Path(__file__).resolve().parent.parent / "smarthost" / "values.schema.json"
out.write_text(json.dumps(schema, indent=2) + "\n")
