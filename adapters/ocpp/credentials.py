"""Per-charge-point Basic-auth passwords (OCPP security profiles 1 and 2), hashed with bcrypt.

The hashes live in the Redis hash `adapters.redis_keys.charger_credentials(site)`. A password is
never stored or logged in clear. Checking is bcrypt in a worker thread (it is slow on purpose);
a successful check is remembered in memory as an HMAC under a per-process random key, bound to
the stored hash, so a reconnecting charge point does not cost another bcrypt round while a
rotated or removed password takes effect at once.

Rotation (TC_073, RELIABILITY.md SEC-02): `stage_password` keeps a second hash under the field
`next:{id}` (":" never occurs in an id) while ChangeConfiguration(AuthorizationKey) is under
way; both passwords are accepted during that overlap, and the first connection with the new one
promotes it and retires the old one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets

import bcrypt
from redis.asyncio import Redis

from adapters import redis_keys as keys
from adapters.ocpp.aio import redis_call
from adapters.ocpp.errors import BadCredential

# SEC-01: charge point ids are printable, without / ( ) < > = : and at most 48 characters.
CHARGER_ID = re.compile(r"^[A-Za-z0-9._\-*@#$%+,;!~]{1,48}$")
MIN_PASSWORD = 16  # OCPP 1.6 security whitepaper: AuthorizationKey of 16 to 40 characters
MAX_PASSWORD = 40


def valid_charger_id(charger_id: str) -> bool:
    """Whether a charge point id is acceptable in a URL path and as a Redis hash field."""
    return bool(CHARGER_ID.match(charger_id))


def _text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode()
    return value


class CredentialStore:
    """Hashed passwords per charge point of one site."""

    def __init__(self, redis: Redis, site: str, *, rounds: int = 12) -> None:
        self._redis = redis
        self._key = keys.charger_credentials(site)
        self._rounds = rounds
        self._pepper = secrets.token_bytes(32)
        self._verified: dict[str, tuple[str, bytes]] = {}

    async def set_password(self, charger_id: str, password: str) -> None:
        """Store (or replace) a charge point's password, hashed.

        Raises:
            BadCredential: the id is not a valid charge point id, or the password is not
                16 to 40 printable ASCII characters.
        """
        self._check(charger_id, password)
        hashed = await asyncio.to_thread(
            bcrypt.hashpw, password.encode(), bcrypt.gensalt(self._rounds)
        )
        await redis_call(self._redis.hset(self._key, charger_id, hashed.decode()))
        self._verified.pop(charger_id, None)

    def _check(self, charger_id: str, password: str) -> None:
        if not valid_charger_id(charger_id):
            raise BadCredential(f"{charger_id!r} is not a valid charge point id")
        if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD or not all(
            "!" <= ch <= "~" for ch in password
        ):
            raise BadCredential(
                f"the password of {charger_id!r} must have {MIN_PASSWORD} to {MAX_PASSWORD} "
                "printable ASCII characters"
            )

    async def stage_password(self, charger_id: str, password: str) -> None:
        """Accept `password` besides the current one until it is first used (rotation)."""
        self._check(charger_id, password)
        hashed = await asyncio.to_thread(
            bcrypt.hashpw, password.encode(), bcrypt.gensalt(self._rounds)
        )
        await redis_call(self._redis.hset(self._key, f"next:{charger_id}", hashed.decode()))

    async def discard_staged(self, charger_id: str) -> None:
        """Drop a staged password (the charger refused the new key)."""
        await redis_call(self._redis.hdel(self._key, f"next:{charger_id}"))

    async def remove(self, charger_id: str) -> None:
        """Forget a charge point's password: it can no longer connect."""
        await redis_call(self._redis.hdel(self._key, charger_id))
        self._verified.pop(charger_id, None)

    async def known(self, charger_id: str) -> bool:
        """Whether the charge point has a password."""
        return bool(await redis_call(self._redis.hexists(self._key, charger_id)))

    async def verify(self, charger_id: str, password: str) -> bool:
        """Whether `password` is the charge point's password (False for unknown ids)."""
        if not valid_charger_id(charger_id) or len(password) > 256:
            return False
        stored = _text(await redis_call(self._redis.hget(self._key, charger_id)))
        if stored is None:
            return False
        tag = hmac.new(self._pepper, password.encode(), hashlib.sha256).digest()
        cached = self._verified.get(charger_id)
        if cached is not None and cached[0] == stored and hmac.compare_digest(cached[1], tag):
            return True
        try:
            ok = await asyncio.to_thread(bcrypt.checkpw, password.encode(), stored.encode())
        except ValueError:  # a stored value that is not a bcrypt hash
            return False
        if ok:
            self._verified[charger_id] = (stored, tag)
            return True
        return await self._verify_staged(charger_id, password)

    async def _verify_staged(self, charger_id: str, password: str) -> bool:
        """The staged password of a rotation: on first use it becomes the only one."""
        staged = _text(await redis_call(self._redis.hget(self._key, f"next:{charger_id}")))
        if staged is None:
            return False
        try:
            ok = await asyncio.to_thread(bcrypt.checkpw, password.encode(), staged.encode())
        except ValueError:
            return False
        if ok:
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(self._key, charger_id, staged)
            pipe.hdel(self._key, f"next:{charger_id}")
            await pipe.execute()
            self._verified.pop(charger_id, None)
        return ok
