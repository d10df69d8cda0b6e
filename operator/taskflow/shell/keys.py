"""The operator's key: it signs reply subjects, journal entries and event ids.

From a file (a mounted Secret: ``--key-file``), or else made once and kept in the JetStream
key-value bucket ``taskflow-keys``, which NATS permissions must keep to the operator's user
(docs/security.md). Every replica and every restart must use the same key: a reply subject
signed by one is verified by the next.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError

log = logging.getLogger("taskflow.keys")

KEY_BUCKET = "taskflow-keys"
MIN_KEY_BYTES = 16


def key_from_file(path: str) -> bytes:
    key = Path(path).read_bytes().strip()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"the key in {path} has {len(key)} bytes; at least "
            f"{MIN_KEY_BYTES} are needed (e.g. openssl rand -hex 32)"
        )
    return key


async def key_from_nats(js: Any) -> bytes:
    """The key kept in NATS, made by the first operator that needed it."""
    try:
        bucket = await js.key_value(KEY_BUCKET)
    except Exception:
        bucket = await js.create_key_value(
            KeyValueConfig(
                bucket=KEY_BUCKET, history=1, storage=StorageType.FILE, max_value_size=1024
            )
        )
    try:
        entry = await bucket.get("operator")
        if entry.value:
            return bytes(entry.value)
    except NotFoundError:
        pass
    key = secrets.token_hex(32).encode()
    try:
        await bucket.create("operator", key)  # only if still absent: replicas agree
        log.info("made the operator's key (kept in the NATS bucket %s)", KEY_BUCKET)
    except KeyWrongLastSequenceError:
        entry = await bucket.get("operator")
        return bytes(entry.value)
    return key
