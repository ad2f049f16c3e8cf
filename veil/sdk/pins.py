"""Instance pins: the genesis and configuration a client expects an instance id to name.

An instance id is only a name; the host could delete an instance and create another under
the same id (with itself as token issuer, say) on an enclave the keyvault never saw it on.
The keyvault registers each instance's genesis, so that cannot move a live instance, but a
client that pins what it created (or first used) notices any other one at once: the
enclave-signed descriptor must carry the pinned genesis hash and configuration hash.

File format (`<data_dir>/instances.json`, written by `veil instance create` and
`veil instance pin`)::

    {"<instance id>": {"genesis_hash": "<64 hex>", "config_hash": "<64 hex>"}, ...}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from veil.sdk.errors import PolicyError
from veil.sdk.files import write_json
from veil.verify.bundle import VerifiedDescriptor
from veil.verify.errors import AttestationError

PINS_FILE = "instances.json"


@dataclass(frozen=True)
class InstancePin:
    """What one instance id must name."""

    genesis_hash: bytes
    config_hash: bytes

    @classmethod
    def of(cls, descriptor: VerifiedDescriptor) -> InstancePin:
        return cls(descriptor.genesis_hash, descriptor.config_hash)


class InstancePins:
    """Pins kept in memory, or in a JSON file when `path` is given."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._pins: dict[str, InstancePin] = self._load() if path is not None else {}

    def _load(self) -> dict[str, InstancePin]:
        assert self.path is not None
        try:
            document = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise PolicyError(f"cannot read instance pins {self.path}: {exc}") from None
        try:
            return {
                str(instance_id): InstancePin(
                    bytes.fromhex(pin["genesis_hash"]), bytes.fromhex(pin["config_hash"])
                )
                for instance_id, pin in document.items()
            }
        except (AttributeError, KeyError, TypeError, ValueError):
            raise PolicyError(f"instance pins {self.path} are malformed") from None

    def get(self, instance_id: str) -> InstancePin | None:
        return self._pins.get(instance_id)

    def check(self, descriptor: VerifiedDescriptor) -> None:
        """AttestationError unless the descriptor is the pinned instance (unpinned ids pass)."""
        pin = self._pins.get(descriptor.instance_id)
        if pin is None:
            return
        if descriptor.genesis_hash != pin.genesis_hash:
            raise AttestationError(
                f"instance {descriptor.instance_id!r} is not the pinned one: its genesis differs "
                "(it was created again, possibly by the host)"
            )
        if descriptor.config_hash != pin.config_hash:
            raise AttestationError(
                f"instance {descriptor.instance_id!r} has another configuration than pinned"
            )

    def pin(self, descriptor: VerifiedDescriptor) -> None:
        """Pin an instance (replacing an earlier pin of the id) and save the file."""
        self._pins[descriptor.instance_id] = InstancePin.of(descriptor)
        if self.path is None:
            return
        document = {
            instance_id: {"genesis_hash": pin.genesis_hash.hex(), "config_hash": pin.config_hash.hex()}
            for instance_id, pin in sorted(self._pins.items())
        }
        write_json(self.path, document)
