"""HTTP GET with bounded retries, exponential backoff with jitter, Retry-After, a request-rate cap, and redacted URLs.

Timeouts, connection errors, bodies cut short, undecodable bodies, 429 and 5xx are retried; 204 and
404 mean "nothing here" and are returned as None. URLs in messages and logs pass through `redact`,
so API keys never leave the process. A client's `max_requests_per_s` spaces the starts of its requests
(first tries and retries alike, from all its threads, and from every process sharing its cap's file) at least
1/cap seconds apart.
"""

from __future__ import annotations

import fcntl
import logging
import math
import random
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import NamedTuple, TypeVar
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from pipeline.errors import FetchError, ImageryError, RetriesExhausted, TileDecodeError

LOGGER = logging.getLogger(__name__)
# urllib3 logs every request line at DEBUG level, query string included.
URLLIB3_LOGGER = logging.getLogger("urllib3.connectionpool")
USER_AGENT = "sat2sound-maps/0.1 (python-requests)"
REDACTED = "***"
NO_CONTENT_STATUSES = frozenset({204, 404})
_SENSITIVE_QUERY = re.compile(
    r"(?i)([?&](?:api[_-]?key|key|access[_-]?token|token|sig|signature|subscription[_-]key|client[_-]secret"
    r"|x-(?:amz|goog)-(?:signature|credential|security-token))=)[^&#]*"
)

T = TypeVar("T")


class RetryPolicy(NamedTuple):
    """How hard to try one URL. `attempts` counts every try, the first included."""

    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    max_retry_after_s: float = 120.0


DEFAULT_RETRY = RetryPolicy()
# The `retry` option of the readers that fetch: RetryPolicy's fields as a mapping (`retry_policy` names the ones
# it does not know).
RETRY_OPTION = {
    "type": "object",
    "properties": {"attempts": {"type": "integer", "minimum": 1}},
    "additionalProperties": {"type": "number", "minimum": 0},
    "description": f"give a mapping of {', '.join(RetryPolicy._fields)} (attempts a whole number from 1, the rest"
    " seconds)",
}


def retry_policy(value: RetryPolicy | Mapping[str, float]) -> RetryPolicy:
    """A RetryPolicy from itself or from a mapping of its fields (as read from a YAML config)."""
    if isinstance(value, RetryPolicy):
        return value
    unknown = sorted(set(value) - set(RetryPolicy._fields))
    if unknown:
        raise ImageryError(f"unknown retry setting {unknown[0]!r}; use {', '.join(RetryPolicy._fields)}")
    return RetryPolicy(**value)  # type: ignore[arg-type]


def backoff_delay(policy: RetryPolicy, retry_index: int, rng: random.Random) -> float:
    """Delay before retry number `retry_index` (0-based): exponential, capped, with 'equal jitter'.

    Half the delay is fixed and half random, so concurrent clients spread out but never hammer.
    """
    ceiling = min(policy.max_backoff_s, policy.backoff_s * 2.0**retry_index)
    return ceiling * (0.5 + 0.5 * rng.random())


def retry_after_s(header: str | None, now: datetime) -> float | None:
    """Seconds a Retry-After header asks to wait (delta-seconds or HTTP date); None if absent or invalid."""
    if header is None:
        return None
    header = header.strip()
    if header.isdigit():
        return float(header)
    try:
        when = parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def is_http_url(url: str) -> bool:
    """Whether `url` is http(s) with a host, and a port in range where it names one."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises for a port out of range or not a number
    except ValueError:  # also a malformed IPv6 host
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every secret value and every credential-like query parameter replaced by ***."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return _SENSITIVE_QUERY.sub(rf"\g<1>{REDACTED}", text)


class SecretFilter(logging.Filter):
    """Rewrites log records that contain a secret, whoever logs them."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = tuple(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        shown = redact(message, self.secrets)
        if shown != message:
            record.msg, record.args = shown, None
        return True


class RateLimiter:
    """At most `per_s` starts per second, shared by every thread that calls `wait`: each call is given the
    next free slot, slots lie at least 1/per_s seconds apart, and the caller sleeps until its slot.

    No bursts: any window of one second holds at most per_s + 1 slots. With `shared`, a file, the next free
    slot lives there under the kernel's lock (flock), so that every process of this machine using that file
    shares the cap: fetch jobs side by side stay under it together. `clock` and `sleep` are injectable (a fake
    clock whose sleep advances it makes tests wait for nothing); a shared limiter's clock must be the wall
    clock, the one time all processes agree on (its default).
    """

    def __init__(
        self,
        per_s: float,
        *,
        shared: Path | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not per_s > 0 or not math.isfinite(per_s):
            raise ImageryError(f"request rate cap {per_s} is not a positive number; use e.g. 10 (requests per second)")
        self.per_s = float(per_s)
        self.spacing_s = 1.0 / self.per_s
        self.shared = shared
        self._clock = clock or (time.monotonic if shared is None else time.time)
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_slot: float | None = None
        self._shared_folder_made = False

    def wait(self) -> float:
        """Block until this caller's slot; returns the slot's time on `clock`."""
        with self._lock:
            now = self._clock()
            if self.shared is None:
                slot = now if self._next_slot is None else max(now, self._next_slot)
                self._next_slot = slot + self.spacing_s
            else:
                slot = self._take_shared_slot(self.shared, now)
        if slot > now:
            self._sleep(slot - now)
        return slot

    def _take_shared_slot(self, path: Path, now: float) -> float:
        try:
            if not self._shared_folder_made:  # once: the tile cache may not exist before the first fetch
                path.parent.mkdir(parents=True, exist_ok=True)
                self._shared_folder_made = True
            with path.open("a+b") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
                handle.seek(0)
                stored = handle.read(_SLOT.size)
                slot = now
                if len(stored) == _SLOT.size:
                    next_slot = _SLOT.unpack(stored)[0]
                    # Further ahead than any queue of waiting requests puts it: the clock was set back since.
                    horizon = max(_SHARED_SLOT_HORIZON_S, _SHARED_SLOT_HORIZON_SLOTS * self.spacing_s)
                    if math.isfinite(next_slot) and next_slot - now <= horizon:
                        slot = max(now, next_slot)
                handle.truncate(0)
                handle.write(_SLOT.pack(slot + self.spacing_s))
        except OSError as exc:
            raise ImageryError(
                f"cannot share the request rate cap through {path}: {exc.strerror}; check permissions on the tile cache"
            ) from exc
        return slot


# The shared limiter's file holds the next free slot, a float of Unix time.
_SLOT = struct.Struct("<d")
_SHARED_SLOT_HORIZON_S = 3600.0
_SHARED_SLOT_HORIZON_SLOTS = 10_000


def rate_limiter(
    max_requests_per_s: float | None,
    *,
    shared: Path | None = None,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> RateLimiter | None:
    """A RateLimiter for a cap; None (no cap) for None or 0."""
    if max_requests_per_s is None or max_requests_per_s == 0:
        return None
    return RateLimiter(max_requests_per_s, shared=shared, clock=clock, sleep=sleep)


class HttpClient:
    """Retrying GETs from up to `concurrency` threads, each with its own keep-alive requests.Session.

    `max_requests_per_s` caps the rate at which requests start, across all threads and counting every
    retry (None or 0: no cap); with `shared_cap`, a file, across every process using that file too (RateLimiter).
    `sleep` and `clock` serve the backoff and the cap; tests inject fakes.
    """

    def __init__(
        self,
        *,
        concurrency: int,
        policy: RetryPolicy = DEFAULT_RETRY,
        secrets: Iterable[str] = (),
        sleep: Callable[[float], None] = time.sleep,
        max_requests_per_s: float | None = None,
        shared_cap: Path | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.concurrency = concurrency
        self.policy = policy
        self.max_requests_per_s = None if not max_requests_per_s else float(max_requests_per_s)
        self._limiter = rate_limiter(max_requests_per_s, shared=shared_cap, clock=clock, sleep=sleep)
        self._secrets = tuple(secret for secret in secrets if secret)
        self._sleep = sleep
        self._rng = random.Random()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        self._log_filter = SecretFilter(self._secrets) if self._secrets else None
        if self._log_filter is not None:
            URLLIB3_LOGGER.addFilter(self._log_filter)

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def fetch(self, url: str, validate: Callable[[bytes], T]) -> T | None:
        """GET `url` and return `validate(body)`; None for 204/404. Raises FetchError when retries run out.

        `validate` raises TileDecodeError for a body that is cut short or garbled; that is retried too.
        """
        policy = self.policy
        reason = ""
        for attempt in range(policy.attempts):
            if self._limiter is not None:
                self._limiter.wait()
            try:
                response = self._session().get(url, timeout=(policy.connect_timeout_s, policy.read_timeout_s))
            except (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                reason = type(exc).__name__
                wait = backoff_delay(policy, attempt, self._rng)
            except requests.RequestException as exc:  # a malformed URL or similar: retrying cannot help
                raise FetchError(
                    f"cannot request {self.redact(url)} ({type(exc).__name__}); check the URL template"
                ) from None
            else:
                status = response.status_code
                if status in NO_CONTENT_STATUSES:
                    return None
                if status == 200:
                    try:
                        return validate(response.content)
                    except TileDecodeError:
                        reason = "undecodable body"
                        wait = backoff_delay(policy, attempt, self._rng)
                elif status == 429 or status >= 500:
                    reason = f"HTTP {status}"
                    asked = retry_after_s(response.headers.get("Retry-After"), datetime.now(UTC))
                    wait = (
                        backoff_delay(policy, attempt, self._rng)
                        if asked is None
                        else min(asked, policy.max_retry_after_s)
                    )
                else:
                    hint = "check the API key" if status in (401, 403) else "check the URL template"
                    raise FetchError(f"HTTP {status} from {self.redact(url)}; {hint}")
            if attempt + 1 < policy.attempts:
                LOGGER.debug("retrying %s in %.2f s after %s", self.redact(url), wait, reason)
                self._sleep(wait)
        raise RetriesExhausted(
            f"gave up on {self.redact(url)} after {policy.attempts} tries (last: {reason}); "
            "check that the server is reachable, or retry later"
        )

    def close(self) -> None:
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()
        if self._log_filter is not None:
            URLLIB3_LOGGER.removeFilter(self._log_filter)

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = USER_AGENT
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session
