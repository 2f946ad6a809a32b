"""Encryption of secrets at rest (webhook signing secrets), with Fernet from ``cryptography``.

Fernet is AES-128-CBC with an HMAC-SHA256 over the ciphertext: a tampered or foreign token
fails to open instead of yielding garbage.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog
from cryptography.fernet import Fernet, InvalidToken

from almanac.errors import AlmanacError

log = structlog.get_logger("almanac.secretbox")


class SecretUnreadable(AlmanacError):
    """A stored secret does not open with the configured key (the key changed?)."""


class SecretBox:
    def __init__(self, key: str | bytes) -> None:
        self._fernet = Fernet(key)

    def seal(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken:
            raise SecretUnreadable(
                "a stored webhook secret does not decrypt with ALMANAC_WEBHOOK_SECRET_KEY"
            ) from None

    @classmethod
    def from_key_file(cls, path: Path, *, shared: bool = False) -> SecretBox:
        """The key in ``path``, made (readable by this user only) if there is none yet.

        ``shared``: other machines read the same secrets (the services profile), and a key
        of this machine's own would not open theirs: making one is then a warning."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls(path.read_bytes().strip())
        with os.fdopen(fd, "wb") as sink:
            sink.write(Fernet.generate_key())
        (log.warning if shared else log.info)(
            "webhook.secret_key_created",
            path=str(path),
            hint="set ALMANAC_WEBHOOK_SECRET_KEY to share one key among machines",
        )
        return cls(path.read_bytes().strip())
