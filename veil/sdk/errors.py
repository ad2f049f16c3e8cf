"""What the SDK raises: every failure is a `VeilClientError` (each subclass names one kind),
except refused evidence, which is the verification library's `AttestationError`
(`veil.verify.errors`): nothing was sent to an enclave that did not verify."""

from __future__ import annotations

import grpc

from veil.enclave.v1 import envelope_pb2, error_pb2
from veil.status import error_info

__all__ = [
    "CommandRefused",
    "CounterGap",
    "ForeignAnswer",
    "GatewayCredentialError",
    "GatewayError",
    "IdentityError",
    "IntegrityError",
    "NotRunYet",
    "NotSettledYet",
    "OutcomeUnknown",
    "PolicyError",
    "RequestTooLarge",
    "ResultLost",
    "VeilClientError",
]


class VeilClientError(Exception):
    """Base of every SDK error."""

    #: For a command that was sent: the call's request id. Passing it again (to `execute` or
    #: `execute_many`) resumes the call with the same sealed bytes instead of sealing it anew.
    request_id: str | None = None


class PolicyError(VeilClientError):
    """The expected-measurement policy itself is missing or malformed."""


class IdentityError(VeilClientError):
    """An identity key file is missing, unreadable or malformed."""


class GatewayCredentialError(VeilClientError):
    """A gateway credential the enclave could accept as an account's proof: never sent, since
    the host runs the gateway (veil.sdk.gateway_auth)."""


class IntegrityError(VeilClientError):
    """A response or receipt from the enclave does not authenticate: the host or gateway tampered."""


class ForeignAnswer(IntegrityError):
    """The answer under a call's request id opens under none of the call's sealings: the mesh's
    record of a sealing this client does not hold (the call ran before, from a client that lost
    its records, or another call used the same id), or the host's forgery.

    Nothing of this attempt ran through that request, and the SDK has used the call's counter up
    (the app's read-only call, sent as a command), so none of its sealings can run later either:
    the call left the calls store. (When the counter cannot be used up now, `NotSettledYet` is
    raised instead and the call is kept.) Check the state (e.g. the balance) before sending the
    command again under another id.
    """


class CommandRefused(VeilClientError):
    """The enclave refused the command (authorization, counter, app rule) or could not open it.

    `code` is the enclave's `EcallErrorCode`; `receipt` is set when the refusal was committed
    (an app rule refusal consumes the account's counter and is logged).
    """

    def __init__(
        self,
        code: error_pb2.EcallErrorCode.ValueType,
        message: str,
        receipt: envelope_pb2.Receipt | None = None,
    ) -> None:
        self.code = code
        self.code_name = error_pb2.EcallErrorCode.Name(code).removeprefix("ECALL_ERROR_CODE_")
        self.message = message
        self.receipt = receipt
        super().__init__(f"{self.code_name}: {message}")


class OutcomeUnknown(VeilClientError):
    """A command may or may not have run, and the SDK cannot prove which, so it stopped.

    After an ambiguous failure (the answer was lost, or the gateway claimed the enclave could
    not open the command) the enclave said the account's counter moved on by more than this
    command, and the command that used the counter was not this one's last. Sending it again
    could run it twice; check the state (e.g. the balance) before deciding.
    """


class CounterGap(OutcomeUnknown):
    """The enclave waits for a lower counter: earlier calls of this client were sealed and are
    not settled (a batch or a call that ended without a definitive answer).

    This call's sealing stays valid and would run once those counters are used, so it is never
    sealed again under another counter. Resume the calls named in `waiting_for` (their request
    ids, with `execute`/`execute_many`), then this one (`request_id`).
    """

    def __init__(self, message: str, waiting_for: list[str]) -> None:
        super().__init__(message)
        self.waiting_for = waiting_for


class NotSettledYet(OutcomeUnknown):
    """The mesh answered the call's request id with what none of its sealings opens (see
    `ForeignAnswer`), and the call's counter could not be used up now (no answer, refused for
    now, or an earlier counter still open). Its sealing stays valid in the host's hands and may
    still run, so the call is kept under `request_id`: pass that id again to resume it (the SDK
    then tries again to use the counter up); never send the command as a new call.
    """

    def __init__(self, instance_id: str, request_id: str, cause: str) -> None:
        super().__init__(
            f"{instance_id}: the mesh answered request id {request_id} with an answer this client "
            f"cannot open ({cause}), and the call's counter could not be used up now, so its sealing "
            f"may still run; the call is kept: resume it with request id {request_id}, never as a new call"
        )
        self.request_id = request_id


class NotRunYet(OutcomeUnknown):
    """The enclave refused the command *for now*, for a reason the host controls: its memory
    budget (RESOURCE_EXHAUSTED) or its clock outside the token's validity (UNAUTHENTICATED).

    The very same sealing stays valid in the host's hands and may still run later, so the call
    is not refused: it is kept under `request_id`. Pass that id again to resume it (the same
    sealed bytes first, then one fresh sealing under the same counter, which carries a renewed
    token); never send the command as a new call, or it may run twice. `code` and `reason` are
    the enclave's sealed refusal.
    """

    def __init__(
        self, instance_id: str, request_id: str, code: error_pb2.EcallErrorCode.ValueType, reason: str
    ) -> None:
        self.code = code
        self.code_name = error_pb2.EcallErrorCode.Name(code).removeprefix("ECALL_ERROR_CODE_")
        self.reason = reason
        super().__init__(
            f"{instance_id}: not run so far: the enclave refused it for now ({self.code_name}: {reason}), "
            "and the same sealed command may still run later (the host sets the memory budget and the "
            f"clock); the call is kept: resume it with request id {request_id}, never as a new call"
        )
        self.request_id = request_id


class ResultLost(VeilClientError):
    """The command ran, exactly once (the enclave says so), but its answer was lost.

    `sequence` is its log entry. Do not send it again: it would run a second time.
    """

    def __init__(self, instance_id: str, sequence: int) -> None:
        super().__init__(
            f"{instance_id}: the command ran (log sequence {sequence}) but its answer was lost; "
            "it must not be sent again"
        )
        self.sequence = sequence


class GatewayError(VeilClientError):
    """The gateway (or the mesh behind it) refused or failed the call.

    `code` is the gRPC status, `reason` the ErrorInfo reason when the server sent one.
    """

    def __init__(self, error: grpc.RpcError) -> None:
        self.code: grpc.StatusCode = error.code()
        info = error_info(error)
        self.reason = info.reason if info is not None else ""
        #: The ErrorInfo's metadata (e.g. `limit_bytes` of MESSAGE_TOO_LARGE), empty without one.
        self.metadata: dict[str, str] = dict(info.metadata) if info is not None else {}
        self.details = error.details() or ""
        #: For `VeilClient.execute`: the call's request id; pass it again to resume the call.
        self.request_id: str | None = None
        # The reason adds to the message only when it says something the code and text do not.
        extra = self.reason and self.reason != self.code.name and self.reason not in self.details
        super().__init__(f"{self.code.name}: {self.details}" + (f" ({self.reason})" if extra else ""))


class RequestTooLarge(VeilClientError):
    """A sealed command is larger than the gateway accepts: it never runs.

    The gateway refuses a request over its limit (`VEIL_GATEWAY_MAX_MESSAGE_BYTES`, 1 MiB by
    default) before reading it, and a resend carries the same bytes: kept, such a call could
    never be answered, and the account's later calls would wait for its counter. So the SDK
    checks the sealed size against `max_request_bytes` (the gateway's default unless the client
    names another) before it keeps or sends anything (`sent` False: nothing was sent). When the
    gateway refuses one anyway (a client limit set above the gateway's), the SDK uses the
    call's counter up with the app's read-only command, so that no sealing of it the host may
    hold can ever run, and drops the call (`sent` True: nothing ran). Send less (e.g. split a
    record), or raise the gateway's limit. A re-sealing over the limit of a call whose earlier
    sealing was sent (`earlier_sent`) leaves the call kept: resume it by its request id.
    """

    def __init__(
        self, size: int, limit: int | None, *, sent: bool = False, earlier_sent: bool = False
    ) -> None:
        refusal = None
        if earlier_sent:
            # A re-sealing (another suite, a renewed token) of a call whose earlier sealing went.
            text = (
                f"a new sealing of this call is {size} bytes, over the gateway's request limit of "
                f"{limit} bytes, so it was not sent; an earlier sealing of the call was sent and may "
                "still run: resume the call by its request id, never send it as a new call"
            )
        elif sent:
            over = f"over its request limit of {limit} bytes" if limit else "over its request limit"
            refusal = f"the gateway refused the sealed command of {size} bytes unread, {over}"
            text = (
                f"{refusal}; its counter was used up by a read-only command, so it never runs: "
                "nothing ran (send less, or raise the gateway's VEIL_GATEWAY_MAX_MESSAGE_BYTES)"
            )
        else:
            text = (
                f"the sealed command is {size} bytes, over the gateway's request limit of {limit} bytes "
                "(the client's max_request_bytes, `veil --max-request-bytes`; the gateway's "
                "VEIL_GATEWAY_MAX_MESSAGE_BYTES): nothing was sent"
            )
        super().__init__(text)
        #: What the gateway did, without what the client did about it (a call kept because its
        #: counter could not be used up is NotSettledYet with this as its cause).
        self.refusal = refusal or text
        self.size = size
        self.limit = limit
        self.sent = sent
        self.earlier_sent = earlier_sent
