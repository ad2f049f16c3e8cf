"""The operator enclave policy: which state-enclave builds the operator trusts, whatever a key says.

A key's release policy is written by whoever creates the key, and the state identity creates
the instance keys ``instance.<id>`` (on CreateInstance). A malicious state host could therefore
create an instance key with a loose policy, have it released to an enclave it controls (say a
debug build, which is pinned to the real keyvault and so passes the release-key check), learn
the key, and later have the same key released to the honest enclave. The operator enclave
policy closes that: one release-policy document (the grammar of :mod:`veil.services.keyvault.release_policy`,
Veil's debug and TCB gates included, so a debuggable enclave is refused unless the document
explicitly requires ``x-ms-sgx-is-debuggable`` equals ``true``), configured by the operator
with ``VEIL_KEYVAULT_ENCLAVE_POLICY_FILE``, that bounds

* every release of an ``instance.*`` key: the token must satisfy the key's own policy **and**
  this policy (keys with other names keep their own policy only), and
* every commit-head advance: the advancing token must satisfy this policy.

It describes the state enclave builds (e.g. MRSIGNER + product id + minimum SVN, or a list of
MRENCLAVEs). Unconfigured, it refuses everything it guards (reason
``ENCLAVE_POLICY_NOT_CONFIGURED``); the keyvault refuses to start without one unless the
attestation root is ``dev`` (see :mod:`veil.services.keyvault.config`). It is read once at start-up:
a changed file needs a restart.

This module holds no build of its own: the operator's file names the trusted builds.
:func:`enclave_policy_json` writes such a document; the dev tooling
(:mod:`veil.dev.policies`) uses it for the local sim mesh's policy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from veil.enclave import wire
from veil.services.common.config import ENV_KEYVAULT_ENCLAVE_POLICY_FILE, ConfigError
from veil.services.keyvault.config import DEFAULT_ISSUER
from veil.services.keyvault.errors import ReleasePolicyError
from veil.services.keyvault.release_policy import (
    ACCEPTED_TCB_FIELD,
    CLAIM_DEBUGGABLE,
    CLAIM_MRENCLAVE,
    CLAIM_MRSIGNER,
    CLAIM_PRODUCT_ID,
    CLAIM_SVN,
    POLICY_VERSION,
    ReleasePolicy,
    parse_release_policy,
)

#: Keys named ``instance.<id>`` are instance data keys (the name :mod:`veil.enclave.wire` gives them).
INSTANCE_KEY_PREFIX = wire.instance_key_name("")

#: Refusal reasons (``ErrorInfo.reason``): outside the policy, and no policy configured.
REASON_ENCLAVE_NOT_ALLOWED = "ENCLAVE_NOT_ALLOWED"
REASON_NOT_CONFIGURED = "ENCLAVE_POLICY_NOT_CONFIGURED"


def is_instance_key(name: str) -> bool:
    """Whether ``name`` is an instance data key, whose releases the operator policy bounds."""
    return name.startswith(INSTANCE_KEY_PREFIX)


@dataclass(frozen=True)
class EnclaveRefusal:
    """Why an enclave was refused: a stable reason and a message for the caller and the audit log."""

    reason: str
    message: str


@dataclass(frozen=True)
class EnclavePolicy:
    """The operator enclave policy, or its absence (which refuses every enclave)."""

    policy: ReleasePolicy | None
    source: str = ""

    @classmethod
    def not_configured(cls) -> EnclavePolicy:
        return cls(policy=None)

    @property
    def configured(self) -> bool:
        return self.policy is not None

    def refusal(self, claims: Mapping[str, object]) -> EnclaveRefusal | None:
        """None when a verified token's claims satisfy the policy, else why not. Never raises."""
        if self.policy is None:
            return EnclaveRefusal(
                REASON_NOT_CONFIGURED,
                f"no operator enclave policy is configured ({ENV_KEYVAULT_ENCLAVE_POLICY_FILE}), "
                "so no enclave is trusted with instance keys or commit heads",
            )
        decision = self.policy.evaluate(claims)
        if decision.allowed:
            return None
        return EnclaveRefusal(
            REASON_ENCLAVE_NOT_ALLOWED, f"enclave is outside the operator enclave policy: {decision.reason}"
        )


def load_enclave_policy(path: Path, *, issuer: str) -> EnclavePolicy:
    """Read and validate the policy file; :class:`ConfigError` naming the variable on any problem.

    The policy must have a rule for ``issuer`` (this keyvault's token issuer): one without it
    would refuse every token, which is a configuration mistake, not a policy.
    """
    where = f"{ENV_KEYVAULT_ENCLAVE_POLICY_FILE} ({path})"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror or exc}") from None
    try:
        policy = parse_release_policy(raw)
    except ReleasePolicyError as exc:
        raise ConfigError(f"{where} is not a valid release policy: {exc.message}") from None
    if not any(rule.authority == issuer for rule in policy.rules):
        raise ConfigError(f"{where} has no rule for this keyvault's token issuer {issuer!r}")
    return EnclavePolicy(policy=policy, source=str(path))


def enclave_policy_json(
    *,
    issuer: str = DEFAULT_ISSUER,
    mrenclaves: Sequence[bytes] = (),
    mrsigner: bytes | None = None,
    product_id: int | None = None,
    min_svn: int | None = None,
    accepted_tcb_statuses: Sequence[str] | None = None,
) -> str:
    """A policy for the listed builds: any of ``mrenclaves`` and/or MRSIGNER + product id + SVN.

    Never debuggable (the document pins ``x-ms-sgx-is-debuggable`` to ``false``). At least
    ``mrenclaves`` or ``mrsigner`` must be given; the result is parsed before it is returned.
    """
    if not mrenclaves and mrsigner is None:
        raise ValueError("an enclave policy needs MRENCLAVEs or an MRSIGNER")
    conditions: list[dict[str, object]] = []
    if mrenclaves:
        pins: list[dict[str, object]] = [
            {"claim": CLAIM_MRENCLAVE, "equals": _hex32(m, "mrenclave")} for m in mrenclaves
        ]
        conditions.append(pins[0] if len(pins) == 1 else {"anyOf": pins})
    if mrsigner is not None:
        conditions.append({"claim": CLAIM_MRSIGNER, "equals": _hex32(mrsigner, "mrsigner")})
    if product_id is not None:
        conditions.append({"claim": CLAIM_PRODUCT_ID, "equals": product_id})
    if min_svn is not None:
        conditions.append({"claim": CLAIM_SVN, "greaterOrEquals": min_svn})
    conditions.append({"claim": CLAIM_DEBUGGABLE, "equals": False})
    doc: dict[str, object] = {
        "version": POLICY_VERSION,
        "anyOf": [{"authority": issuer, "allOf": conditions}],
    }
    if accepted_tcb_statuses is not None:
        doc[ACCEPTED_TCB_FIELD] = list(accepted_tcb_statuses)
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    parse_release_policy(text)  # what we hand out always loads
    return text


def _hex32(value: bytes, what: str) -> str:
    if len(value) != 32:
        raise ValueError(f"{what} must be 32 bytes")
    return value.hex()
