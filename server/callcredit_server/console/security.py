"""The console's security decisions, without I/O: who must log in, passwords, sessions,
CSRF tokens and the brake on guessing. Time is an argument; randomness comes in as bytes.

- **Login:** on the machine's own address (settings.LOOPBACK_HOSTS) the console trusts
  its users, as the server does; on any other it requires a login with the admin token
  it was given or the operator password whose hash its configuration holds.
- **Sessions:** a random id in an HttpOnly, SameSite=Strict cookie. A logged-in id is
  kept here (bounded, with an idle expiry), so logging out ends it on the server too;
  a login issues a new id (no session fixation).
- **CSRF:** every form carries HMAC-SHA256(secret, session id); a POST whose token does
  not match its own session's cookie is refused before anything is parsed or sent.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict, deque

__all__ = [
    "LOGIN_FAILURES_MAX",
    "LOGIN_FAILURE_WINDOW_MS",
    "MAX_SESSIONS",
    "SESSION_IDLE_MS",
    "LoginBrake",
    "Sessions",
    "check_password",
    "csrf_ok",
    "csrf_token",
    "hash_password",
    "secret_matches",
]

MAX_SESSIONS = 1_000
"""Logged-in sessions kept; the one used longest ago is logged out first."""

SESSION_IDLE_MS = 8 * 3_600_000
"""A session unused this long is logged out (a working day)."""

LOGIN_FAILURES_MAX = 10
LOGIN_FAILURE_WINDOW_MS = 60_000
"""At most this many failed logins a minute, from anyone: a guesser gets ten a minute."""

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_SCHEME = "scrypt"


def hash_password(password: str, salt: bytes) -> str:
    """``scrypt:<salt hex>:<hash hex>``, for the configuration's operator_password_hash."""
    if len(salt) < 16:
        raise ValueError("a password salt needs at least 16 bytes")
    digest = _scrypt(password, salt)
    return f"{_SCHEME}:{salt.hex()}:{digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    """Whether ``password`` is the one ``stored`` (from hash_password) was made from."""
    scheme, _, rest = stored.partition(":")
    salt_hex, _, digest_hex = rest.partition(":")
    try:
        salt, digest = bytes.fromhex(salt_hex), bytes.fromhex(digest_hex)
    except ValueError:
        return False
    if scheme != _SCHEME or len(salt) < 16 or not digest:
        return False
    return hmac.compare_digest(_scrypt(password, salt), digest)


def _scrypt(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )


def secret_matches(given: str, expected: str | None) -> bool:
    """Constant-time comparison of a typed secret with the one configured (None: none)."""
    if not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def csrf_token(secret: bytes, session_id: str) -> str:
    """The token the forms of ``session_id`` carry."""
    return hmac.new(secret, b"csrf:" + session_id.encode(), hashlib.sha256).hexdigest()


def csrf_ok(secret: bytes, session_id: str | None, submitted: str | None) -> bool:
    """Whether a POST's token belongs to the session its cookie names."""
    if not session_id or not submitted:
        return False
    return hmac.compare_digest(csrf_token(secret, session_id).encode(), submitted.encode())


class Sessions:
    """The logged-in session ids and when each was last used."""

    def __init__(self, *, max_sessions: int = MAX_SESSIONS, idle_ms: int = SESSION_IDLE_MS):
        self._max_sessions = max_sessions
        self._idle_ms = idle_ms
        self._last_used_ms: OrderedDict[str, int] = OrderedDict()

    def log_in(self, session_id: str, now_ms: int) -> None:
        self._last_used_ms[session_id] = now_ms
        self._last_used_ms.move_to_end(session_id)
        while len(self._last_used_ms) > self._max_sessions:
            self._last_used_ms.popitem(last=False)

    def log_out(self, session_id: str) -> None:
        self._last_used_ms.pop(session_id, None)

    def active(self, session_id: str | None, now_ms: int) -> bool:
        """Whether ``session_id`` is logged in; using it counts as activity."""
        if session_id is None:
            return False
        last_ms = self._last_used_ms.get(session_id)
        if last_ms is None:
            return False
        if now_ms - last_ms > self._idle_ms:
            del self._last_used_ms[session_id]
            return False
        self._last_used_ms[session_id] = max(last_ms, now_ms)
        self._last_used_ms.move_to_end(session_id)
        return True

    def __len__(self) -> int:
        return len(self._last_used_ms)


class LoginBrake:
    """Failed logins in the last window, from anyone: past the limit, every login is
    refused until the oldest failure leaves the window (guessing costs time)."""

    def __init__(
        self, *, failures_max: int = LOGIN_FAILURES_MAX, window_ms: int = LOGIN_FAILURE_WINDOW_MS
    ):
        self._failures_max = failures_max
        self._window_ms = window_ms
        self._failures_ms: deque[int] = deque()

    def _forget(self, now_ms: int) -> None:
        while self._failures_ms and now_ms - self._failures_ms[0] >= self._window_ms:
            self._failures_ms.popleft()

    def wait_ms(self, now_ms: int) -> int:
        """0 if a login may be tried now, else how long until one may."""
        self._forget(now_ms)
        if len(self._failures_ms) < self._failures_max:
            return 0
        return self._failures_ms[0] + self._window_ms - now_ms

    def failed(self, now_ms: int) -> None:
        self._forget(now_ms)
        self._failures_ms.append(now_ms)
        while len(self._failures_ms) > self._failures_max:
            self._failures_ms.popleft()
