"""Dev policies of the local sim mesh: what its clients pin and what its keyvault trusts.

Both name the sim enclave built from this checkout: its MRENCLAVE is a hash of the enclave's
source (`veil.enclave.measurement`), its MRSIGNER the dev signer's
(`veil.enclave.providers.sim_quote.DEV_MRSIGNER`). Production never imports this module: a
production keyvault reads its operator enclave policy from a file (a ConfigMap on
Kubernetes), and a production client pins a policy file of its own.

* `dev_policy` / `write_dev_policy`: the client's expected-measurement policy,
  `<data_dir>/expected-measurement.json` (`veil.sdk.trust_policy` reads it);
* `dev_enclave_policy_json` / `write_dev_enclave_policy`: the keyvault's operator enclave policy,
  `<data_dir>/keyvault-enclave-policy.json` (what `VEIL_KEYVAULT_ENCLAVE_POLICY_FILE` names).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from veil.enclave.measurement import measure_source_tree
from veil.enclave.providers.sim_quote import DEV_MRSIGNER
from veil.sdk.trust_policy import DEFAULT_TCB_STATUSES, POLICY_FILE, ExpectedMeasurement, save_policy
from veil.services.keyvault.config import DEFAULT_ISSUER
from veil.services.keyvault.enclave_policy import enclave_policy_json
from veil.services.keyvault.release_policy import DEFAULT_ACCEPTED_TCB_STATUSES, TCB_UNEVALUATED

#: The sim enclave's ISV product id and SVN (`veil.enclave.runner.RunnerOptions` defaults).
DEV_PRODUCT_ID = 1
DEV_MIN_SVN = 1
#: What the sim mesh's clients accept: its tokens are evaluated against the dev collateral,
#: as production's are against Intel's, so the production default statuses.
DEV_TCB_STATUSES = DEFAULT_TCB_STATUSES
#: Where `veil up` keeps the keyvault's operator enclave policy, under its data dir.
DEV_ENCLAVE_POLICY_FILENAME = "keyvault-enclave-policy.json"
#: What the sim keyvault's operator policy accepts: a keyvault started without the dev
#: collateral verifies sim quotes without it, so their TCB status is "Unevaluated".
DEV_ACCEPTED_TCB_STATUSES: tuple[str, ...] = (*DEFAULT_ACCEPTED_TCB_STATUSES, TCB_UNEVALUATED)


# --- the client's expected-measurement policy ------------------------------------------------


def dev_policy(
    mrenclaves: Sequence[bytes] | None = None,
    *,
    keyvault_release_key: bytes | None = None,
    jwks: Mapping[str, Any],
) -> ExpectedMeasurement:
    """The development policy: the sim enclave built from this checkout, the dev signer and root,
    and the local keyvault's release key and token JWKS (`veil up` reads both from the keyvault
    it started)."""
    return ExpectedMeasurement(
        mrenclaves=tuple(mrenclaves) if mrenclaves is not None else (measure_source_tree(),),
        mrsigner=DEV_MRSIGNER,
        product_id=DEV_PRODUCT_ID,
        min_svn=DEV_MIN_SVN,
        allow_debug=False,
        accepted_tcb_statuses=DEV_TCB_STATUSES,
        root="dev",
        issuer=DEFAULT_ISSUER,
        jwks=jwks,
        keyvault_release_key=keyvault_release_key,
    )


def write_dev_policy(data_dir: Path, keyvault_release_key: bytes, jwks: Mapping[str, Any]) -> Path:
    """Write `<data_dir>/expected-measurement.json` for the local sim mesh (called by `veil up`)."""
    policy = dev_policy(keyvault_release_key=keyvault_release_key, jwks=jwks)
    return save_policy(policy, data_dir / POLICY_FILE)


# --- the keyvault's operator enclave policy --------------------------------------------------


def dev_enclave_policy_json(
    mrenclave: bytes,
    mrsigner: bytes,
    *,
    issuer: str = DEFAULT_ISSUER,
    product_id: int = DEV_PRODUCT_ID,
    min_svn: int = DEV_MIN_SVN,
    accepted_tcb_statuses: Sequence[str] = DEV_ACCEPTED_TCB_STATUSES,
) -> str:
    """The sim mesh's operator policy: this sim build (MRENCLAVE), its signer, never debuggable.

    ``mrenclave`` is ``veil.enclave.measurement.measure_source_tree()`` and ``mrsigner``
    ``veil.enclave.providers.sim_quote.DEV_MRSIGNER``. The sim TCB status "Unevaluated" is
    accepted, as the state's sim instance-key policies accept it (:mod:`veil.services.state.keys`).
    """
    return enclave_policy_json(
        issuer=issuer,
        mrenclaves=(mrenclave,),
        mrsigner=mrsigner,
        product_id=product_id,
        min_svn=min_svn,
        accepted_tcb_statuses=accepted_tcb_statuses,
    )


def write_dev_enclave_policy(data_dir: Path, *, issuer: str = DEFAULT_ISSUER) -> Path:
    """Write the sim enclave of this checkout's policy to ``<data_dir>/keyvault-enclave-policy.json``.

    Atomic (temporary file, then rename); returns the path, which is what
    ``VEIL_KEYVAULT_ENCLAVE_POLICY_FILE`` of the local keyvault must name.
    """
    path = data_dir / DEV_ENCLAVE_POLICY_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(dev_enclave_policy_json(measure_source_tree(), DEV_MRSIGNER, issuer=issuer))
    os.replace(temporary, path)
    return path
