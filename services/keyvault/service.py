"""The gRPC face of the keyvault: ``KeyvaultService`` over the libraries, errors mapped once.

Each handler takes the caller's SPIFFE identity from its mTLS certificate (the
authorization interceptor has already checked the method table in ``server.py``), calls
one library operation, and converts the result to protobuf. Library errors become the
shared domain errors of ``services/common/errors.py`` (status code + ``ErrorInfo`` reason);
storage and KEK failures are reported without internal detail.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from veil.enclave.wire import instance_key_name
from veil.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from veil.services.common import errors as common
from veil.services.common import identity
from veil.services.common.identity import peer_identity
from veil.services.keyvault import errors as kv
from veil.services.keyvault.app import Keyvault
from veil.services.keyvault.enclave_policy import REASON_NOT_CONFIGURED
from veil.services.keyvault.heads import CommitHead
from veil.services.keyvault.hold_keys import hold_keys
from veil.services.keyvault.keys import KeyMetadata
from veil.services.keyvault.store import AuditRecord, LeaseRecord

_log = logging.getLogger(__name__)

# Library error -> shared error class. The first match in this order wins (subclasses first).
_MAPPING: tuple[tuple[type[kv.KeyvaultError], type[common.VeilError]], ...] = (
    (kv.ReleasePolicyError, common.InvalidArgument),
    (kv.InvalidArgumentError, common.InvalidArgument),
    (kv.TokenRefusedError, common.PermissionDenied),
    (kv.AttestationRefusedError, common.PermissionDenied),
    (kv.ReleaseRefusedError, common.PermissionDenied),
    (kv.KeyNotFoundError, common.NotFound),
    (kv.KeyExistsError, common.AlreadyExists),
    (kv.KeyDestroyedError, common.FailedPrecondition),
    (kv.CallerNotAllowedError, common.PermissionDenied),
    (kv.IdempotencyConflictError, common.FailedPrecondition),
    (kv.DecryptionError, common.DataLoss),
    (kv.AuditChainError, common.DataLoss),
)
_HEAD_SIGNATURE_REASONS = {"COMMIT_HEAD_BAD_SIGNATURE", "COMMIT_HEAD_ENCLAVE_NOT_ALLOWED"}


def to_veil_error(exc: kv.KeyvaultError) -> common.VeilError:
    """The shared error a library error is reported as."""
    if isinstance(exc, kv.HeadRefusedError) or exc.reason == REASON_NOT_CONFIGURED:
        # A bad signature or an enclave outside the operator policy is about who asks; a
        # rollback, a fork, or a keyvault that trusts no enclave until the operator names some
        # (no enclave policy configured) is about the state.
        if exc.reason in _HEAD_SIGNATURE_REASONS:
            return common.PermissionDenied(exc.message, reason=exc.reason)
        return common.FailedPrecondition(exc.message, reason=exc.reason)
    if isinstance(exc, kv.StoreError):
        return common.Unavailable("keyvault storage is unavailable", reason=exc.reason)
    if isinstance(exc, kv.KekError):
        return common.Unavailable("keyvault KEK is unavailable", reason=exc.reason)
    for library_error, shared_error in _MAPPING:
        if isinstance(exc, library_error):
            return shared_error(exc.message, reason=exc.reason)
    return common.FailedPrecondition(exc.message, reason=exc.reason)


@contextmanager
def _domain_errors() -> Iterator[None]:
    try:
        yield
    except kv.KeyvaultError as exc:
        if isinstance(exc, kv.StoreError | kv.KekError):
            _log.error("keyvault dependency failure: %s", exc)
        raise to_veil_error(exc) from exc


def timestamp(micros: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMicroseconds(micros)
    return stamp


def key_message(meta: KeyMetadata) -> keyvault_pb2.KeyMetadata:
    return keyvault_pb2.KeyMetadata(
        key_name=meta.name,
        latest_version=meta.latest_version,
        release_policy_json=meta.policy_json,
        create_time=timestamp(meta.created_us),
        update_time=timestamp(meta.updated_us),
        destroyed=meta.destroyed,
    )


def audit_message(event: AuditRecord) -> keyvault_pb2.AuditEvent:
    return keyvault_pb2.AuditEvent(
        sequence=event.sequence,
        time=timestamp(event.time_us),
        action=event.action,
        outcome=event.outcome,
        caller=event.caller,
        detail_json=event.detail_json,
        previous_hash=event.previous_hash,
        hash=event.hash,
    )


def lease_message(lease: LeaseRecord) -> keyvault_pb2.Lease:
    return keyvault_pb2.Lease(
        instance_id=lease.instance_id,
        holder=lease.holder,
        fencing_token=lease.token,
        expire_time=timestamp(lease.expires_us),
    )


class KeyvaultServicer(keyvault_pb2_grpc.KeyvaultServiceServicer):
    """Every KeyvaultService RPC."""

    def __init__(self, keyvault: Keyvault) -> None:
        self._kv = keyvault

    def Attest(
        self, request: keyvault_pb2.AttestRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.AttestResponse:
        caller = peer_identity(context)
        with _domain_errors():
            issued = self._kv.attestor.attest(
                request.quote, request.runtime_data, request.nonce, caller=caller
            )
        return keyvault_pb2.AttestResponse(
            token=issued.token, expire_time=Timestamp(seconds=issued.expires_at)
        )

    def GetJwks(
        self, request: keyvault_pb2.GetJwksRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.GetJwksResponse:
        with _domain_errors():
            jwks = self._kv.ring.jwks()
        return keyvault_pb2.GetJwksResponse(
            jwks_json=json.dumps(jwks, sort_keys=True, separators=(",", ":")),
            release_public_key=self._kv.release_signer.public_key,
        )

    def ReleaseKey(
        self, request: keyvault_pb2.ReleaseKeyRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.ReleaseKeyResponse:
        caller = peer_identity(context)
        with _domain_errors():
            released = self._kv.keys.release(
                request.token,
                request.key_name,
                request.version,
                caller=caller,
                fencing_token=request.fencing_token,
            )
        return keyvault_pb2.ReleaseKeyResponse(
            key_name=released.name,
            version=released.version,
            encapsulated_key=released.encapsulated_key,
            wrapped_key=released.wrapped_key,
            signature=released.signature,
        )

    def CreateKey(
        self, request: keyvault_pb2.CreateKeyRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.CreateKeyResponse:
        caller = peer_identity(context)
        with _domain_errors():
            meta = self._kv.keys.create(
                request.key_name, request.release_policy_json, request_id=request.request_id, caller=caller
            )
        return keyvault_pb2.CreateKeyResponse(key=key_message(meta))

    def RotateKey(
        self, request: keyvault_pb2.RotateKeyRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.RotateKeyResponse:
        caller = peer_identity(context)
        with _domain_errors():
            meta = self._kv.keys.rotate(request.key_name, request_id=request.request_id, caller=caller)
        return keyvault_pb2.RotateKeyResponse(key=key_message(meta))

    def ListKeys(
        self, request: keyvault_pb2.ListKeysRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.ListKeysResponse:
        with _domain_errors():
            keys = self._kv.keys.list_keys()
        return keyvault_pb2.ListKeysResponse(keys=[key_message(meta) for meta in keys])

    def GetKey(
        self, request: keyvault_pb2.GetKeyRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.GetKeyResponse:
        with _domain_errors():
            meta = self._kv.keys.get(request.key_name)
        return keyvault_pb2.GetKeyResponse(key=key_message(meta))

    def DestroyKey(
        self, request: keyvault_pb2.DestroyKeyRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.DestroyKeyResponse:
        caller = peer_identity(context)
        with _domain_errors():
            meta = self._kv.keys.destroy(request.key_name, request_id=request.request_id, caller=caller)
        self._kv.hold_roots.forget(request.key_name)  # (other replicas: at their next advance)
        return keyvault_pb2.DestroyKeyResponse(key=key_message(meta))

    def GetCommitHead(
        self, request: keyvault_pb2.GetCommitHeadRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.GetCommitHeadResponse:
        wants_statement = bool(request.enclave_signing_public_key or request.challenge)
        if wants_statement and peer_identity(context) != identity.STATE:
            # The operator reads heads (veil status: the head lag); statements are an enclave's.
            raise common.PermissionDenied("only a state host may ask for a signed head statement")
        with _domain_errors():
            head = self._kv.heads.get(request.instance_id)
            statement = (
                # For that enclave boot and challenge only: its Create/Restore takes nothing older.
                self._kv.heads.statement(
                    request.instance_id, request.enclave_signing_public_key, request.challenge
                )
                if wants_statement
                else None
            )
        response = keyvault_pb2.GetCommitHeadResponse(statement=statement)
        if head is not None:
            response.sequence, response.hash = head.sequence, head.hash
            response.genesis_hash, response.config_hash = head.genesis_hash, head.config_hash
            response.signing_public_key = head.signing_public_key
        return response

    def AdvanceCommitHead(
        self, request: keyvault_pb2.AdvanceCommitHeadRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.AdvanceCommitHeadResponse:
        caller = peer_identity(context)
        with _domain_errors():
            head, enclave_key = self._kv.heads.advance(
                request.instance_id,
                request.links,
                request.token,
                caller=caller,
                fencing_token=request.fencing_token,
                hold_key_version=request.hold_key_version,
            )
            confirmation = self._kv.heads.confirmation(head, enclave_key)
        return keyvault_pb2.AdvanceCommitHeadResponse(
            sequence=head.sequence,
            confirmation=confirmation,
            hold_keys=self._hold_keys(request, head, enclave_key),
        )

    def _hold_keys(
        self, request: keyvault_pb2.AdvanceCommitHeadRequest, head: CommitHead, enclave_key: bytes
    ) -> list[keyvault_pb2.HoldKey]:
        """The hold keys of an advance that reached the request's last head (hold_keys.py). None
        when the version is not at hand yet, or the key cannot be read now: the head moved all
        the same, and the host has the enclave release those answers, so this never fails or
        holds up an advance."""
        last, version = request.links[-1].head, request.hold_key_version
        if not version or (head.sequence, head.hash) != (last.sequence, last.hash):
            return []
        name = instance_key_name(head.instance_id)
        try:
            state = self._kv.keys.version_state(name, version)
            if state == "destroyed":
                self._kv.hold_roots.forget(name)  # keep nothing derived from it
            root = self._kv.hold_roots.get(name, version) if state == "live" else None
            return [] if root is None else hold_keys(request.links, enclave_key, root)
        except Exception as exc:
            _log.warning("no hold keys for %s@%d: %s", head.instance_id, head.sequence, exc)
            return []

    def ListAuditEvents(
        self, request: keyvault_pb2.ListAuditEventsRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.ListAuditEventsResponse:
        with _domain_errors():
            page = self._kv.audit.list_events(page_size=request.page_size, page_token=request.page_token)
            tip = self._kv.audit.signed_tip()
        response = keyvault_pb2.ListAuditEventsResponse(
            events=[audit_message(event) for event in page.events], next_page_token=page.next_page_token
        )
        if tip is not None:  # what to publish outside the database (see veil.services.keyvault.audit)
            response.tip.sequence, response.tip.hash = tip.sequence, tip.hash
            response.tip.signature, response.tip.release_public_key = tip.signature, tip.public_key
        return response

    def AcquireLease(
        self, request: keyvault_pb2.AcquireLeaseRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.AcquireLeaseResponse:
        caller = peer_identity(context)
        with _domain_errors():
            lease = self._kv.leases.acquire(
                request.instance_id, request.holder, request.ttl_ms, request.fencing_token, caller=caller
            )
        return keyvault_pb2.AcquireLeaseResponse(lease=lease_message(lease))

    def ListLeases(
        self, request: keyvault_pb2.ListLeasesRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.ListLeasesResponse:
        with _domain_errors():
            page = self._kv.leases.page(
                instance_ids=list(request.instance_ids),
                page_size=request.page_size,
                page_token=request.page_token,
            )
        return keyvault_pb2.ListLeasesResponse(
            leases=[lease_message(lease) for lease in page.leases], next_page_token=page.next_page_token
        )

    def GetStatus(
        self, request: keyvault_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> keyvault_pb2.GetStatusResponse:
        return keyvault_pb2.GetStatusResponse(
            serving=True,
            detail=f"serving ({self._kv.store.backend} store)",
            kek_provider=self._kv.kek.provider,
            collateral_source=self._kv.collateral_source,
        )
