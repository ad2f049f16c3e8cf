"""Minimal JSON Schemas for the cert-manager.io/v1 kinds Veil uses.

kubernetes-validate ships only the core Kubernetes schemas, so Issuer and Certificate are
checked here instead: strictly (no unknown fields), but only for the fields our manifests
use, with the enums and formats cert-manager documents for them. A field we start using
must be added here first, which is the point.
"""

from __future__ import annotations

from typing import Any

import jsonschema

GO_DURATION = r"^([0-9]+(\.[0-9]+)?(h|m|s|ms))+$"
SPIFFE_ID = r"^spiffe://[a-z0-9.-]+(/[A-Za-z0-9._-]+)+$"  # the only URIs Veil certificates carry
DNS_NAME = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

# cert-manager's KeyUsage enum (pkg/apis/certmanager/v1/types.go).
KEY_USAGES = [
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
]


def _closed(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required or [],
        "additionalProperties": False,
    }


_METADATA = _closed(
    {
        "name": {"type": "string", "pattern": DNS_NAME},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    ["name", "namespace"],
)

ISSUER = _closed(
    {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Issuer"},
        "metadata": _METADATA,
        "spec": {
            "oneOf": [
                _closed(
                    {"ca": _closed({"secretName": {"type": "string", "minLength": 1}}, ["secretName"])},
                    ["ca"],
                ),
                _closed({"selfSigned": _closed({})}, ["selfSigned"]),
            ]
        },
    },
    ["apiVersion", "kind", "metadata", "spec"],
)

CERTIFICATE = _closed(
    {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Certificate"},
        "metadata": _METADATA,
        "spec": {
            **_closed(
                {
                    "secretName": {"type": "string", "pattern": DNS_NAME},
                    "issuerRef": _closed(
                        {
                            "name": {"type": "string"},
                            "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                            "group": {"const": "cert-manager.io"},
                        },
                        ["name"],
                    ),
                    "isCA": {"type": "boolean"},
                    "commonName": {"type": "string", "maxLength": 64},
                    "duration": {"type": "string", "pattern": GO_DURATION},
                    "renewBefore": {"type": "string", "pattern": GO_DURATION},
                    "revisionHistoryLimit": {"type": "integer", "minimum": 1},
                    "privateKey": _closed(
                        {
                            "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                            "size": {"type": "integer"},
                            "encoding": {"enum": ["PKCS1", "PKCS8"]},
                            "rotationPolicy": {"enum": ["Never", "Always"]},
                        }
                    ),
                    "usages": {"type": "array", "items": {"enum": KEY_USAGES}, "uniqueItems": True},
                    "uris": {
                        "type": "array",
                        "items": {"type": "string", "pattern": SPIFFE_ID},
                        "minItems": 1,
                    },
                    "dnsNames": {
                        "type": "array",
                        "items": {"type": "string", "pattern": DNS_NAME},
                        "minItems": 1,
                        "uniqueItems": True,
                    },
                },
                ["secretName", "issuerRef"],
            ),
            # cert-manager refuses a certificate that names no subject at all.
            "anyOf": [{"required": ["commonName"]}, {"required": ["dnsNames"]}, {"required": ["uris"]}],
        },
    },
    ["apiVersion", "kind", "metadata", "spec"],
)

_VALUES = _closed(
    {
        "values": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "required": {"type": "boolean"},
    },
    ["values"],
)

# approver-policy's CertificateRequestPolicy (policy.cert-manager.io/v1alpha1), the fields we use.
# It is cluster-scoped: kustomize still stamps the overlay's namespace on it (it cannot know the
# CRD's scope), which the API server clears for cluster-scoped kinds.
CERTIFICATE_REQUEST_POLICY = _closed(
    {
        "apiVersion": {"const": "policy.cert-manager.io/v1alpha1"},
        "kind": {"const": "CertificateRequestPolicy"},
        "metadata": _METADATA,
        "spec": _closed(
            {
                "selector": _closed(
                    {
                        "issuerRef": _closed(
                            {
                                "name": {"type": "string"},
                                "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                                "group": {"type": "string"},
                            }
                        )
                    },
                    ["issuerRef"],
                ),
                "allowed": _closed(
                    {
                        "isCA": {"type": "boolean"},
                        "commonName": _closed(
                            {"value": {"type": "string"}, "required": {"type": "boolean"}}, ["value"]
                        ),
                        "uris": _VALUES,
                        "dnsNames": _VALUES,
                        "usages": {"type": "array", "items": {"enum": KEY_USAGES}, "uniqueItems": True},
                    }
                ),
                "constraints": _closed(
                    {
                        "maxDuration": {"type": "string", "pattern": GO_DURATION},
                        "minDuration": {"type": "string", "pattern": GO_DURATION},
                        "privateKey": _closed(
                            {
                                "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                                "minSize": {"type": "integer"},
                                "maxSize": {"type": "integer"},
                            }
                        ),
                    }
                ),
            },
            ["selector", "allowed"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)

SCHEMAS = {
    "Issuer": ISSUER,
    "Certificate": CERTIFICATE,
    "CertificateRequestPolicy": CERTIFICATE_REQUEST_POLICY,
}


def validate(obj: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError unless `obj` fits the schema for its kind."""
    schema = SCHEMAS.get(obj["kind"])
    if schema is None:
        raise LookupError(f"no schema for cert-manager kind {obj['kind']}")
    jsonschema.Draft202012Validator(schema).validate(obj)
