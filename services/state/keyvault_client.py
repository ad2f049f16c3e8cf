"""The state host's typed client of the keyvault (over the shared mTLS channel helpers).

Every call has a deadline and retries only UNAVAILABLE (`veil.services.common.channels.call`).
The address may list several keyvault replicas (comma-separated; they share one database, so
any of them answers any call): a replica that is unreachable or too slow costs a retry on the
next one, not an error, and the client stays with the one that answered.
Failures become two domain errors: `KeyvaultUnavailable` (unreachable or too slow: retry
later) and `KeyvaultRefused` (the keyvault answered no; carries its ErrorInfo reason).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from opentelemetry.sdk.trace import TracerProvider

from veil.enclave import wire
from veil.enclave.v1 import envelope_pb2
from veil.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from veil.services.common.channels import call, secure_channel
from veil.services.common.config import TlsFiles
from veil.services.common.errors import FailedPrecondition, Unavailable
from veil.status import error_info

Resp = TypeVar("Resp")

INSTANCE_KEY_PREFIX = wire.instance_key_name("")  # "instance.": instance keys are fenced
LEASES_PER_CALL = 1000  # the keyvault's bound on ListLeasesRequest.instance_ids
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class KeyvaultUnavailable(Unavailable):
    """The keyvault did not answer in time; the caller may retry with backoff."""

    default_reason = "KEYVAULT_UNAVAILABLE"


class KeyvaultRefused(FailedPrecondition):
    """The keyvault answered with an error; `status` and `reason` are what it said."""

    default_reason = "KEYVAULT_REFUSED"

    def __init__(self, message: str, *, status: grpc.StatusCode, reason: str) -> None:
        super().__init__(message, reason=reason, metadata={"keyvault_status": status.name})
        self.status = status


@dataclass(frozen=True)
class RemoteHead:
    """An instance's commit head at the keyvault (sequence 0: the keyvault knows no such instance).

    `statement` is the keyvault's signed HeadStatement for the enclave key and challenge that
    asked (None if none asked); the enclave's CreateInstance and Restore require it.
    """

    sequence: int
    hash: bytes
    statement: envelope_pb2.HeadStatement | None = None


class KeyvaultClient:
    """A channel per keyvault replica; thread-safe (gRPC channels are)."""

    def __init__(
        self,
        address: str,
        channel: grpc.Channel,
        *,
        timeout: float = 5.0,
        attempts: int = 3,
        replicas: Sequence[tuple[str, grpc.Channel]] = (),
    ) -> None:
        """`channel` reaches `address`; `replicas` are further (address, channel) pairs."""
        self.address = address
        self._replicas = [(address, channel), *replicas]
        self._stubs = [keyvault_pb2_grpc.KeyvaultServiceStub(c) for _, c in self._replicas]
        self._preferred = 0
        self._channel = channel
        self._stub = self._stubs[0]
        self._timeout = timeout
        self._attempts = attempts
        #: The fencing token held for an instance (0: none); set by the host's Ownership.
        self.fencing: Callable[[str], int] = lambda _instance_id: 0
        #: The same for an instance-key release (may take the lease first: a creation).
        self.fencing_for_release: Callable[[str], int] = lambda _instance_id: 0

    @classmethod
    def connect(
        cls,
        address: str,
        tls: TlsFiles,
        *,
        tracer_provider: TracerProvider | None = None,
        timeout: float = 5.0,
    ) -> KeyvaultClient:
        """An mTLS client with the state service's identity; `address` may list replicas."""
        addresses = [part.strip() for part in address.split(",") if part.strip()]
        channels = [(a, secure_channel(a, tls, tracer_provider)) for a in addresses]
        (first, channel), *others = channels
        return cls(first, channel, timeout=timeout, replicas=others)

    def close(self) -> None:
        for _, channel in self._replicas:
            channel.close()

    def _call(
        self, name: str, method: Callable[..., Resp], request: object, timeout: float | None = None
    ) -> Resp:
        """Call `name` on the preferred replica, then on each other one while unreachable
        (`timeout`: per replica, default the client's)."""
        start = self._preferred
        failures = []
        for step in range(len(self._replicas)):
            index = (start + step) % len(self._replicas)
            bound: Callable[..., Resp] = getattr(self._stubs[index], name) if index else method
            try:
                answer = self._call_one(name, bound, request, self._replicas[index][0], timeout)
            except KeyvaultUnavailable as exc:
                failures.append(exc.message)
                continue
            self._preferred = index
            return answer
        raise KeyvaultUnavailable("; ".join(failures))

    def _call_one(
        self, name: str, method: Callable[..., Resp], request: object, address: str, timeout: float | None
    ) -> Resp:
        try:
            return call(method, request, timeout=timeout or self._timeout, attempts=self._attempts)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in _UNREACHABLE:
                raise KeyvaultUnavailable(
                    f"keyvault at {address} unreachable ({code.name}: {exc.details()})"
                ) from None
            info = error_info(exc)
            reason = info.reason if info is not None and info.reason else code.name
            raise KeyvaultRefused(
                f"keyvault refused {name}: {exc.details()}", status=code, reason=reason
            ) from None

    def attest(self, quote: bytes, runtime_data: bytes, nonce: bytes) -> keyvault_pb2.AttestResponse:
        """Verify the enclave's quote; returns the attestation token and its expiry."""
        request = keyvault_pb2.AttestRequest(quote=quote, runtime_data=runtime_data, nonce=nonce)
        return self._call("Attest", self._stub.Attest, request)

    def get_jwks(self) -> keyvault_pb2.GetJwksResponse:
        """The JWKS that verifies attestation tokens, and the key that signs key releases."""
        return self._call("GetJwks", self._stub.GetJwks, keyvault_pb2.GetJwksRequest())

    def create_key(self, name: str, policy_json: str, request_id: str) -> bool:
        """Create a data key; False (not an error) when it exists already."""
        request = keyvault_pb2.CreateKeyRequest(
            key_name=name, release_policy_json=policy_json, request_id=request_id
        )
        try:
            self._call("CreateKey", self._stub.CreateKey, request)
        except KeyvaultRefused as exc:
            if exc.status == grpc.StatusCode.ALREADY_EXISTS:
                return False
            raise
        return True

    def release_key(self, token: str, name: str, version: int = 0) -> keyvault_pb2.ReleaseKeyResponse:
        """A data key wrapped to the token's enclave (version 0: the latest)."""
        request = keyvault_pb2.ReleaseKeyRequest(token=token, key_name=name, version=version)
        if name.startswith(INSTANCE_KEY_PREFIX):  # the keyvault releases it to the lease holder only
            request.fencing_token = self.fencing_for_release(name[len(INSTANCE_KEY_PREFIX) :])
        return self._call("ReleaseKey", self._stub.ReleaseKey, request)

    def get_commit_head(
        self, instance_id: str, enclave_signing_public_key: bytes = b"", challenge: bytes = b""
    ) -> RemoteHead:
        """The instance's committed head (sequence 0 when the keyvault knows none).

        With an enclave key and its challenge (IssueChallenge) the answer carries the signed
        statement that enclave needs to create or restore the instance.
        """
        request = keyvault_pb2.GetCommitHeadRequest(
            instance_id=instance_id,
            enclave_signing_public_key=enclave_signing_public_key,
            challenge=challenge,
        )
        response = self._call("GetCommitHead", self._stub.GetCommitHead, request)
        statement = response.statement if response.HasField("statement") else None
        return RemoteHead(sequence=response.sequence, hash=response.hash, statement=statement)

    def advance_commit_head(
        self, links: Sequence[envelope_pb2.CommitLink], token: str, hold_key_version: int = 0
    ) -> keyvault_pb2.AdvanceCommitHeadResponse:
        """Move the instance's head along enclave-signed links; returns the keyvault's confirmation
        and the hold keys of the links' heads in `hold_key_version` (0: none)."""
        instance_id = links[0].instance_id
        request = keyvault_pb2.AdvanceCommitHeadRequest(
            instance_id=instance_id,
            links=links,
            token=token,
            fencing_token=self.fencing(instance_id),
            hold_key_version=hold_key_version,
        )
        return self._call("AdvanceCommitHead", self._stub.AdvanceCommitHead, request)

    def acquire_lease(
        self, instance_id: str, holder: str, ttl_ms: int, token: int, *, timeout: float | None = None
    ) -> keyvault_pb2.Lease:
        """Take (token 0) or renew the instance's lease for `holder`; KeyvaultRefused LEASE_HELD
        or LEASE_LOST when another host owns it."""
        request = keyvault_pb2.AcquireLeaseRequest(
            instance_id=instance_id, holder=holder, ttl_ms=ttl_ms, fencing_token=token
        )
        return self._call("AcquireLease", self._stub.AcquireLease, request, timeout).lease

    def list_leases(self, instance_ids: Sequence[str]) -> list[keyvault_pb2.Lease]:
        """The leases of `instance_ids` (those that have one; who serves them, until when),
        `LEASES_PER_CALL` ids a call: never the whole table, which only grows."""
        ids = sorted(set(instance_ids))
        leases: list[keyvault_pb2.Lease] = []
        for start in range(0, len(ids), LEASES_PER_CALL):
            request = keyvault_pb2.ListLeasesRequest(instance_ids=ids[start : start + LEASES_PER_CALL])
            leases += self._call("ListLeases", self._stub.ListLeases, request).leases
        return leases
