"""What a caller without a certificate sees of an error from inside the mesh: a fixed message.

A state replica's or the keyvault's error text can name other tenants' instances and counts,
the keyvault's address, database hosts or raw exception text. For callers on the public port
(no client certificate) the gateway keeps the status code and the ErrorInfo reason, which is
what clients act on, and replaces the message with a fixed one for that reason and the
metadata with a correlation id; the original goes to the log under the same id. Callers
holding a mesh certificate (operators, on the mTLS port) still get the details.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import grpc

from veil.services.common.errors import CORRELATION_ID, VeilError, new_correlation_id
from veil.services.common.identity import certificate_identity

_log = logging.getLogger(__name__)

_RETRY = "; retry with backoff"

#: The public message of each reason a state replica (or the gateway for it) gives.
MESSAGES: Mapping[str, str] = {
    "NOT_SERVING": "the instance's state replica is not serving yet" + _RETRY,
    "COMMIT_HEAD_LAG": "the instance is waiting for its commits to be confirmed" + _RETRY,
    "STORE_UNAVAILABLE": "the instance's store is unavailable" + _RETRY,
    "SEQUENCE_CONFLICT": "the instance's store refused a write" + _RETRY,
    "SHARD_UNAVAILABLE": "the state replica for this instance is unreachable" + _RETRY,
    "UPSTREAM_ERROR": "the state service could not serve the request",
    "ENCLAVE_ERROR": "the enclave could not serve the call" + _RETRY,
    "RECOVERY_REFUSED": "the instance's stored state failed its integrity checks; it is not served "
    "until an operator acts",
    "COMMAND_UNOPENABLE": "the enclave refused the command unopened: if the enclave restarted, seal it "
    "again to the keys of GetAttestation; a query must carry counter 0",
    "INVALID_ARGUMENT": "the enclave refused the command as malformed",
    "FAILED_PRECONDITION": "the enclave cannot serve this call in its present state",
    "NOT_FOUND": "the instance was not found",
    "ALREADY_EXISTS": "the instance exists already",
    "RESOURCE_EXHAUSTED": "the enclave's memory budget is exhausted" + _RETRY,
    "DATA_LOSS": "the instance's stored data failed authentication",
    "PERMISSION_DENIED": "the command's identity may not do this",
    "UNAUTHENTICATED": "the command's identity proof is missing or invalid",
    "ABORTED": "the command's counter is not the account's next one; read the counter and seal "
    "the command again",
    "DEADLINE_EXCEEDED": "the state service did not answer within the deadline",
    "REQUEST_IN_FLIGHT": "an identical request is still in flight",
}
#: For a reason without its own message: one per status code.
BY_CODE: Mapping[grpc.StatusCode, str] = {
    grpc.StatusCode.UNAVAILABLE: "the service is unavailable" + _RETRY,
    grpc.StatusCode.DEADLINE_EXCEEDED: "the request did not finish within its deadline",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "a resource is exhausted" + _RETRY,
}


def public_message(error: VeilError) -> str:
    """The fixed message for `error`'s reason (or, failing that, its code)."""
    return MESSAGES.get(error.reason) or BY_CODE.get(error.code, "the request could not be served")


def present(error: VeilError, context: grpc.ServicerContext) -> VeilError:
    """`error` as the caller may see it: internal detail only for callers with a mesh certificate."""
    if not error.internal or certificate_identity(context) is not None:
        return error
    correlation_id = new_correlation_id()
    _log.warning(
        "upstream error for a public caller (correlation id %s): %s %s: %s %s",
        correlation_id,
        error.code.name,
        error.reason,
        error.message,
        error.metadata,
    )
    return type(error)(public_message(error), reason=error.reason, metadata={CORRELATION_ID: correlation_id})
