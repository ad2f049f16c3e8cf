"""The grammar of instance ids, one for every service that stores or keys by them.

The enclave (`veil.enclave.runtime`) creates instances under this grammar only, the state host
refuses other ids before any work, and the keyvault refuses them on its lease and commit-head
calls: a NUL or other control character, which PostgreSQL refuses in text (so it surfaced as
"storage unavailable") and SQLite stores, never reaches a database, and a row stays small.
"""

from __future__ import annotations

import re

#: Lowercase letters, digits and dashes, starting with a letter or digit; ``\\Z``, because "$"
#: also matches before a final newline ("v\\n" once passed as a second instance "v").
INSTANCE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")
INSTANCE_ID_RULE = "instance_id: lowercase letters, digits and dashes, at most 63 characters"


def is_instance_id(value: object) -> bool:
    """Whether `value` is a well-formed instance id."""
    return isinstance(value, str) and INSTANCE_ID.match(value) is not None
