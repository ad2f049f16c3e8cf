"""vault: personal-data records owned by their subject.

A record is named by (owner, record_id); only its owner writes, shares, revokes or deletes it,
and only the owner and the readers it was shared with can read it. A record that does not
exist and one the caller may not read give the same NOT_FOUND, so probing reveals nothing.
Delete erases the record from the state, hence from every later snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping

from veil.enclave.apps.base import App, CallContext, Handler, check_name, load, save
from veil.enclave.errors import NOT_FOUND, EnclaveError
from veil.enclave.v1 import apps_pb2, envelope_pb2


def _key(owner: str, record_id: str) -> tuple[str, ...]:
    return ("vault", owner, record_id)


def _not_found() -> EnclaveError:
    return EnclaveError(NOT_FOUND, "record not found")


def _own(context: CallContext, record_id: str) -> apps_pb2.VaultRecord:
    check_name(record_id, "record_id")
    record: apps_pb2.VaultRecord | None = load(
        context.store, _key(context.caller.account, record_id), apps_pb2.VaultRecord
    )
    if record is None:
        raise _not_found()
    return record


class VaultApp(App):
    """Records owned by their subject, shared with named readers."""

    kind = envelope_pb2.APP_KIND_VAULT
    field = "vault"
    read_only = frozenset({"get"})

    def methods(self) -> Mapping[str, Handler]:
        return {
            "put": self.put,
            "get": self.get,
            "share": self.share,
            "revoke": self.revoke,
            "delete": self.delete,
        }

    def put(self, context: CallContext, request: apps_pb2.VaultPut) -> apps_pb2.VaultPutResult:
        """Create or replace one of the caller's records (readers are kept)."""
        check_name(request.record_id, "record_id")
        key = _key(context.caller.account, request.record_id)
        record: apps_pb2.VaultRecord | None = load(context.store, key, apps_pb2.VaultRecord)
        created = record is None
        record = record or apps_pb2.VaultRecord()
        record.data = request.data
        save(context.store, key, record)
        return apps_pb2.VaultPutResult(created=created)

    def get(self, context: CallContext, request: apps_pb2.VaultGet) -> apps_pb2.VaultGetResult:
        """Read a record as its owner or one of its readers."""
        check_name(request.owner, "owner")
        check_name(request.record_id, "record_id")
        record: apps_pb2.VaultRecord | None = load(
            context.store, _key(request.owner, request.record_id), apps_pb2.VaultRecord
        )
        caller = context.caller.account
        if record is None or (caller != request.owner and caller not in record.readers):
            raise _not_found()
        readers = list(record.readers) if caller == request.owner else []
        return apps_pb2.VaultGetResult(data=record.data, readers=readers)

    def share(self, context: CallContext, request: apps_pb2.VaultShare) -> apps_pb2.VaultShareResult:
        """Let `reader` read one of the caller's records."""
        check_name(request.reader, "reader")
        record = _own(context, request.record_id)
        readers = sorted(set(record.readers) | {request.reader})
        del record.readers[:]
        record.readers.extend(readers)
        save(context.store, _key(context.caller.account, request.record_id), record)
        return apps_pb2.VaultShareResult()

    def revoke(self, context: CallContext, request: apps_pb2.VaultRevoke) -> apps_pb2.VaultRevokeResult:
        """Take `reader`'s access away (no error if it had none)."""
        check_name(request.reader, "reader")
        record = _own(context, request.record_id)
        readers = [r for r in record.readers if r != request.reader]
        del record.readers[:]
        record.readers.extend(readers)
        save(context.store, _key(context.caller.account, request.record_id), record)
        return apps_pb2.VaultRevokeResult()

    def delete(self, context: CallContext, request: apps_pb2.VaultDelete) -> apps_pb2.VaultDeleteResult:
        """Erase one of the caller's records."""
        _own(context, request.record_id)
        context.store.delete(_key(context.caller.account, request.record_id))
        return apps_pb2.VaultDeleteResult()
