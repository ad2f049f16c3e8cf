"""Every conformance vector through the Python SDK's own verification functions.

Attestation bundles go through `veil.verify.bundle.verify_bundle` with the policy loaded by
`veil.sdk.trust_policy` (schema and rules), answers through `veil.sdk.sealing.open_outcome`,
receipts through `veil.sdk.sealing.verify_receipt`, commands through the SDK's wire helpers and
the enclave's HPKE suites, policies through `policy_from_document`. A refusal must also be for
the vector's reason: each refusal id maps to what the SDK says when it refuses for it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.conformance.vectors import VECTORS, by_id, checklist, ids, refusals, vectors
from veil.cli.main import main
from veil.dev import conformance
from veil.enclave import crypto, wire
from veil.enclave.v1 import command_pb2, envelope_pb2
from veil.gateway.v1 import gateway_pb2
from veil.sdk.errors import CommandRefused, IntegrityError, PolicyError
from veil.sdk.sealing import SealedRequest, open_outcome, verify_receipt
from veil.sdk.trust_policy import policy_from_document
from veil.verify.bundle import verify_bundle
from veil.verify.errors import AttestationError
from veil.verify.roots import load_root_pem

#: What the Python SDK says when it refuses for each reason (a regular expression).
REASONS = {
    "quote-format": r"^quote: (quote truncated|unsupported)",
    "quote-root": r"^quote: PCK chain: chain does not end at the pinned root",
    "pck-chain": r"^quote: PCK chain .* is not valid at",
    "quote-signature": r"^quote: quote signature does not verify",
    "qe-report-signature": r"^quote: QE report signature does not verify",
    "qe-report-binding": r"^quote: QE report data does not bind the attestation key",
    "qe-identity": r"^quote: QE report (is not Intel's Quoting Enclave|is from a debug Quoting Enclave)",
    "report-data": r"^quote report data does not bind the runtime data and nonce",
    "keys-substituted": r"^the bundle's keys are not the attested runtime data",
    "token-signature": r"^token: token (kid .* is not a known signing key|signature does not verify)",
    "token-algorithm": r"^token: token algorithm .* is not ES256",
    "token-issuer": r"^token: token issuer .* is not",
    "token-lifetime": r"^token: token (has expired|is not valid yet)",
    "token-claims": (
        r"^(token claim .* disagrees|token x-ms-sgx-ehd does not equal|token: token lacks claims)"
    ),
    "measurement": r"^MRENCLAVE .* is not an expected measurement",
    "signer": r"^(MRSIGNER .* is not the expected signer|product id .* is not|SVN .* is below the minimum)",
    "debug-enclave": r"^the enclave is debuggable",
    "tcb-status": r"^TCB status .* is not accepted",
    "keyvault-pin": (
        r"^(the enclave accepts keys from another keyvault|the policy pins no keyvault release key)"
    ),
    "descriptor": r"^(the bundle carries no descriptor|the instance descriptor (names|is not signed))",
    "response-authentication": r"^the response does not authenticate under this request's key",
    "response-request-id": r"^the response answers another request",
    "receipt-signature": r"^the receipt's signature is not the attested enclave's",
    "receipt-instance": r"^the receipt is for another instance",
    "receipt-command": r"^the receipt is for another command",
    "receipt-result": r"^the receipt is for another result",
    "receipt-kind": r"^the receipt is of the wrong kind",
    "receipt-missing": r"^the enclave's answer lacks its signed receipt",
    "outcome-flags": r"^the receipt's sequence does not match the committed outcome",
}


def _b(text: str) -> bytes:
    return bytes.fromhex(text)


# --- attestation ------------------------------------------------------------------------------------


def bundle_message(bundle: dict[str, Any]) -> gateway_pb2.GetAttestationResponse:
    """A vector's bundle as the GetAttestationResponse a gateway would send."""
    message = gateway_pb2.GetAttestationResponse(
        quote=_b(bundle["quote"]),
        runtime_data=_b(bundle["runtime_data"]),
        nonce=_b(bundle["nonce"]),
        attestation_token=bundle["attestation_token"],
        keys=envelope_pb2.EnclavePublicKeys(**{name: _b(value) for name, value in bundle["keys"].items()}),
        jwks_json=bundle["jwks_json"],
    )
    descriptor = bundle["descriptor"]
    if descriptor is not None:
        message.descriptor.CopyFrom(
            envelope_pb2.InstanceDescriptor(
                instance_id=descriptor["instance_id"],
                config=_b(descriptor["config"]),
                genesis_hash=_b(descriptor["genesis_hash"]),
                signature=_b(descriptor["signature"]),
            )
        )
    return message


@pytest.mark.parametrize("vector_id", ids("attestation.json"))
def test_attestation_vector(vector_id: str) -> None:
    vector = by_id("attestation.json", vector_id)
    policy = policy_from_document(vector["policy"], f"{vector_id} policy")
    root = load_root_pem(VECTORS / vector["root"])

    def verify() -> object:
        return verify_bundle(
            bundle_message(vector["bundle"]),
            policy,
            root_public_key=root,
            now=vector["now"],
            instance_id=vector["instance_id"],
        )

    expect = vector["expect"]
    if expect["verdict"] == "valid":
        verified = verify()
        assert verified is not None
        return
    with pytest.raises(AttestationError) as refused:
        verify()
    assert re.search(REASONS[expect["refusal"]], refused.value.reason), refused.value.reason


# --- answers ------------------------------------------------------------------------------------------


def sealed_request(request: dict[str, Any]) -> SealedRequest:
    command = request["command"]
    return SealedRequest(
        instance_id=request["instance_id"],
        request_id=request["request_id"],
        counter=request["counter"],
        account="",
        response_key=_b(request["response_key"]),
        command=envelope_pb2.SealedCommand(
            suite=command["suite"],
            encapsulated_key=_b(command["encapsulated_key"]),
            ciphertext=_b(command["ciphertext"]),
        ),
    )


def outcome_message(outcome: dict[str, Any]) -> envelope_pb2.CommandOutcome:
    message = envelope_pb2.CommandOutcome(
        accepted=outcome["accepted"],
        sequence=outcome["sequence"],
        sealed_response=_b(outcome["sealed_response"]),
    )
    if outcome["error"] is not None:
        message.error.code = outcome["error"]["code"]
        message.error.message = outcome["error"]["message"]
    return message


@pytest.mark.parametrize("vector_id", ids("answers.json"))
def test_answer_vector(vector_id: str) -> None:
    vector = by_id("answers.json", vector_id)
    request = sealed_request(vector["request"])
    outcome = outcome_message(vector["outcome"])
    signing_key = _b(vector["signing_public_key"])
    expect = vector["expect"]
    if expect["verdict"] == "refused":
        with pytest.raises((IntegrityError, CommandRefused)) as refused:
            open_outcome(request, outcome, signing_key, query=vector["query"])
        assert re.search(REASONS[expect["refusal"]], str(refused.value)), str(refused.value)
        return
    opened = open_outcome(request, outcome, signing_key, query=vector["query"])
    assert opened.accepted is expect["accepted"]
    assert opened.sequence == expect["sequence"]
    assert opened.result.SerializeToString(deterministic=True) == _b(expect["result"])
    assert opened.result.error.code == expect["error_code"]
    if expect["next_counter"] is None:
        assert not opened.result.HasField("counter")
    else:
        assert opened.result.counter.next_counter == expect["next_counter"]
        assert opened.result.counter.last_command_hash.hex() == expect["last_command_hash"]


def test_a_wrong_counter_is_answered_with_the_typed_counter_state() -> None:
    """The machine-readable next counter: ABORTED carries CounterState naming the command that
    used the counter (here the accepted transfer), with that command's answer and receipt."""
    stale = by_id("answers.json", "stale-counter-aborted")
    transfer = by_id("answers.json", "transfer-accepted")
    opened = open_outcome(
        sealed_request(stale["request"]),
        outcome_message(stale["outcome"]),
        _b(stale["signing_public_key"]),
        query=False,
    )
    assert not opened.accepted
    assert opened.receipt is None
    counter = opened.result.counter
    assert counter.next_counter == stale["request"]["counter"] + 1
    command = transfer["request"]["command"]
    assert counter.last_command_hash == wire.command_hash(
        _b(command["encapsulated_key"]), _b(command["ciphertext"])
    )
    assert counter.last_sequence == transfer["expect"]["sequence"]
    assert counter.last_result == _b(transfer["expect"]["result"])
    assert wire.verify_receipt(counter.last_receipt, _b(stale["signing_public_key"]))


# --- receipts and commands ------------------------------------------------------------------------------


@pytest.mark.parametrize("vector_id", ids("receipts.json"))
def test_receipt_vector(vector_id: str) -> None:
    vector = by_id("receipts.json", vector_id)
    fields = vector["receipt"]
    receipt = envelope_pb2.Receipt(
        kind=fields["kind"],
        instance_id=fields["instance_id"],
        sequence=fields["sequence"],
        command_hash=_b(fields["command_hash"]),
        result_hash=_b(fields["result_hash"]),
        signature=_b(fields["signature"]),
    )
    valid = verify_receipt(receipt, _b(vector["signing_public_key"]))
    assert valid is (vector["expect"]["verdict"] == "valid")
    if vector["signing_bytes"] is not None:
        assert wire.receipt_signing_bytes(receipt) == _b(vector["signing_bytes"])


def _open_hpke(vector: dict[str, Any]) -> bytes:
    """Open the vector's sealed command as the enclave does (its suites, info and aad)."""
    spec = vector["hpke"]
    private = spec["recipient_private_key"]
    key: Any
    if spec["suite"] == crypto.X25519_SUITE:
        key = x25519.X25519PrivateKey.from_private_bytes(_b(private["x25519"]))
    else:
        pq = mlkem.MLKEM768PrivateKey.from_seed_bytes(_b(private["mlkem768_seed"]))
        classic = x25519.X25519PrivateKey.from_private_bytes(_b(private["x25519"]))
        # The published hybrid key is X-Wing's encoding: ML-KEM-768 public key || X25519 public key.
        assert pq.public_key().public_bytes_raw() + classic.public_key().public_bytes_raw() == _b(
            spec["recipient_public_key"]
        )
        key = hpke.MLKEM768X25519PrivateKey(pq, classic)
    command = vector["command"]
    plaintext: bytes = crypto._decrypt_with_aad(
        crypto._SUITES[spec["suite"]],
        _b(command["encapsulated_key"]) + _b(command["ciphertext"]),
        key,
        info=_b(spec["info"]),
        aad=_b(spec["aad"]),
    )
    return plaintext


@pytest.mark.parametrize("vector_id", ids("commands.json"))
def test_command_vector(vector_id: str) -> None:
    vector = by_id("commands.json", vector_id)
    assert _b(vector["hpke"]["info"]) == wire.COMMAND_INFO
    assert _b(vector["hpke"]["aad"]) == wire.command_aad(vector["instance_id"])
    signing_bytes = wire.command_signing_bytes(
        instance_id=vector["instance_id"],
        counter=vector["counter"],
        request_id=vector["request_id"],
        response_key=_b(vector["response_key"]),
        call=_b(vector["call"]),
    )
    assert signing_bytes == _b(vector["signing_bytes"])
    identity = ed25519.Ed25519PrivateKey.from_private_bytes(_b(vector["identity_private_seed"]))
    assert identity.public_key().public_bytes_raw().hex() == vector["account"]
    assert identity.sign(signing_bytes) == _b(vector["signature"])  # Ed25519 is deterministic
    plaintext = _open_hpke(vector)
    assert plaintext == _b(vector["plaintext"])
    command = command_pb2.Command.FromString(plaintext)
    assert command.counter == vector["counter"]
    assert command.auth.signature.signature == _b(vector["signature"])
    sealed = vector["command"]
    assert wire.command_hash(_b(sealed["encapsulated_key"]), _b(sealed["ciphertext"])) == _b(
        vector["command_hash"]
    )
    assert (
        hashlib.sha256(_b(sealed["encapsulated_key"]) + _b(sealed["ciphertext"])).hexdigest()
        == vector["command_hash"]
    )


# --- policies ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vector_id", ids("policies.json"))
def test_policy_vector(vector_id: str) -> None:
    vector = by_id("policies.json", vector_id)

    def load() -> object:
        if vector["text"] is not None:  # a file's text: parsed with one reading, as load_policy does
            return policy_from_document(wire.strict_json_object(vector["text"], "policy", PolicyError))
        return policy_from_document(vector["document"])

    if vector["expect"]["verdict"] == "valid":
        load()
        return
    with pytest.raises(PolicyError) as refused:
        load()
    # A reason a policy author can act on: it names the field (or the rule) it breaks.
    message = str(refused.value)
    assert any(
        word in message
        for word in (
            "mrenclave",
            "mrsigner",
            "jwks",
            "policy",
            "svn",
            "root",
            "release_key",
            "allow_debug",
            "TCB",
            "tcb",
            "unknown",
            "duplicate",
        )
    ), message


# --- the spec and the generator -----------------------------------------------------------------------------


def test_every_refusal_a_vector_names_is_in_the_spec_checklist() -> None:
    listed = checklist()
    missing = {refusal: sorted(where) for refusal, where in refusals().items() if refusal not in listed}
    assert not missing, f"refusals not described in docs/protocol.md's checklist: {missing}"


def test_every_refusal_has_its_sdk_reason() -> None:
    assert set(refusals()) - {"policy-invalid"} <= set(REASONS)


def test_the_committed_vectors_are_the_generators(tmp_path: Path) -> None:
    """Regenerating gives the same vectors (ids, verdicts, refusals; fresh keys differ)."""
    conformance.generate(tmp_path)
    for path in sorted(VECTORS.glob("*.json")):
        committed = [(v["id"], v["expect"]) for v in vectors(path.name)]
        fresh = [(v["id"], v["expect"]) for v in json.loads((tmp_path / path.name).read_text())["vectors"]]
        assert [(i, e.get("verdict"), e.get("refusal")) for i, e in fresh] == [
            (i, e.get("verdict"), e.get("refusal")) for i, e in committed
        ], f"{path.name} is stale: run `python -m veil.dev.conformance`"


# --- the post-quantum suite, by hand --------------------------------------------------------------------

XWING_LABEL = b"\\.//^\\"  # draft-connolly-cfrg-xwing-kem: the combiner's label
XWING_KEM_ID = 0x647A


def _hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()


def _hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out, counter = out + block, counter + 1
    return out[:length]


def test_the_post_quantum_suite_is_x_wing_with_its_hpke_kem_id() -> None:
    """What docs/protocol.md names, checked from first principles: the hybrid vector opens with
    X-Wing decapsulation (ML-KEM-768 ‖ X25519 ciphertext, SHA3-256 combiner over ss_M ‖ ss_X ‖
    ct_X ‖ pk_X ‖ label) and RFC 9180's base-mode key schedule under KEM id 0x647A, HKDF-SHA256
    and AES-128-GCM, with no HPKE library involved."""
    vector = by_id("commands.json", "command-xwing")
    private = vector["hpke"]["recipient_private_key"]
    pq = mlkem.MLKEM768PrivateKey.from_seed_bytes(_b(private["mlkem768_seed"]))
    classic = x25519.X25519PrivateKey.from_private_bytes(_b(private["x25519"]))
    enc = _b(vector["command"]["encapsulated_key"])
    ct_m, ct_x = enc[:1088], enc[1088:]
    shared = hashlib.sha3_256(
        pq.decapsulate(ct_m)
        + classic.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
        + ct_x
        + classic.public_key().public_bytes_raw()
        + XWING_LABEL
    ).digest()
    suite_id = b"HPKE" + XWING_KEM_ID.to_bytes(2, "big") + (1).to_bytes(2, "big") + (1).to_bytes(2, "big")

    def extract(salt: bytes, label: bytes, ikm: bytes) -> bytes:
        return _hkdf_extract(salt, b"HPKE-v1" + suite_id + label + ikm)

    def expand(prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
        return _hkdf_expand(prk, length.to_bytes(2, "big") + b"HPKE-v1" + suite_id + label + info, length)

    context = b"\x00" + extract(b"", b"psk_id_hash", b"") + extract(b"", b"info_hash", wire.COMMAND_INFO)
    secret = extract(shared, b"secret", b"")
    key, nonce = expand(secret, b"key", context, 16), expand(secret, b"base_nonce", context, 12)
    plaintext = AESGCM(key).decrypt(nonce, _b(vector["command"]["ciphertext"]), _b(vector["hpke"]["aad"]))
    assert plaintext == _b(vector["plaintext"])


def test_the_cli_refuses_a_bad_policy_file_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`veil --policy FILE` loads through the SDK: schema and rules, before any connection."""
    document = dict(by_id("policies.json", "policy-minimal")["document"], product_id=70_000)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(document))
    status = main(["attest", "show", "--policy", str(policy), "--data-dir", str(tmp_path)])
    assert status == 1
    assert f"policy {policy}: product_id: 70000 is not valid" in capsys.readouterr().err
