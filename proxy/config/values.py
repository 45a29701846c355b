"""Readers of single values in routes.yaml: durations, sizes, addresses, URLs, names, rates, switches.

Each takes what YAML gave (after `${VAR}` substitution, see `proxy.config.yaml_source`) and returns
the typed value, or raises ValueError/TypeError whose text becomes the `file:line: where: text`
message. They know nothing of where the value sits in the file; the callers in parse.py and the
`*_checks` modules do.
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import re
from typing import Any, Callable
from urllib.parse import unquote

from redis.asyncio.connection import Connection as RedisConnection
from redis.asyncio.connection import parse_url as parse_redis_url
from yarl import URL

from proxy.adapters.quota import RateLimit
from proxy.config.yaml_source import LineDict, LineList, Substituted
from proxy.resilience.hedging import HEDGE_AUTO, HedgePolicy
from proxy.resilience.outcome import RETRY_CLASSES

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3, None: 1}
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}\Z")  # a service's or an upstream's name
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
# Nothing the proxy times needs longer; far larger values overflow clocks, dates and Redis TTLs.
MAX_DURATION = 3650 * 86400.0
MAX_SIZE = 1024**4     # 1 TiB: sizes past it are typing mistakes, and overflow what they are handed to
MAX_COUNT = 10**9      # the same for counts (thresholds, queue lengths, topics)
# Headers about one connection (RFC 9110 7.6.1): never forwarded, and no upstream's `headers:` may set them.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})


def parse_duration(value: Any) -> float:
    """`500ms`, `30s`, `5m`, `1h`, `7d` or a number of seconds → seconds, at most `MAX_DURATION`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 30s, 5m, 1h, 7d")
    seconds: float | None = None
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        seconds = float(value)
    elif isinstance(value, str):
        found = _DURATION.match(value)
        if found:
            seconds = float(found.group(1)) * _DURATION_UNITS[found.group(2)]
    if seconds is None:
        raise ValueError(f"bad duration {value!r}: use 500ms, 30s, 5m, 1h, 7d or a number of seconds")
    if not seconds <= MAX_DURATION:  # NaN too
        raise ValueError(f"bad duration {value!r}: at most 3650d")
    return seconds


def parse_size(value: Any) -> int:
    """`512KiB`, `1MiB`, `10MB` or a number of bytes → bytes, at most `MAX_SIZE`."""
    size: int | None = None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        size = value
    elif isinstance(value, str):
        found = _SIZE.match(value)
        if found:
            unit = found.group(2).lower() if found.group(2) else None
            size = int(found.group(1)) * _SIZE_UNITS[unit]
    if size is None:
        raise ValueError(f"bad size {value!r}: use a number of bytes or 512KiB, 1MiB, 10MB")
    if size > MAX_SIZE:
        raise ValueError(f"bad size {value!r}: at most 1TiB")
    return size


_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?\Z")


def valid_host(host: str) -> bool:
    """An IP address or a host name (letters, digits, `-` and `_` in dot-separated labels), not a mistyped IPv4."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return len(host) <= 253 and bool(_HOSTNAME.match(host)) and not host.rstrip(".").replace(".", "").isdigit()


def parse_listen(value: Any) -> tuple[str, int]:
    """`HOST:PORT`, `[::1]:PORT` or `:PORT` → (host, port)."""
    if not isinstance(value, str):
        raise ValueError("expected HOST:PORT")
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"bad listen address {value!r}: expected HOST:PORT")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"bad port {port} in {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host and not valid_host(host):
        raise ValueError(f"bad listen address {value!r}: {host!r} is neither an IP address nor a host name")
    return host or "0.0.0.0", port


_SECRET_MIN = 4  # shorter values are not masked: hiding every "1" or "ab" would garble every line


def environment_values(value: Any) -> set[str]:
    """The values `${VAR}` substituted anywhere in `value` (a scalar, mapping or list), long enough to mask."""
    if isinstance(value, Substituted):
        return {v for v in value.values if len(v) >= _SECRET_MIN}
    if isinstance(value, dict):
        return environment_values(list(value)) | environment_values(list(value.values()))
    if isinstance(value, list):
        return set().union(*map(environment_values, value))
    return set()


def type_name(value: Any) -> str:
    """How a message names the kind of value YAML gave (a mapping, a number...)."""
    return {LineDict: "a mapping", LineList: "a list", str: "a string", Substituted: "a string",
            int: "a number", float: "a number", bool: "a boolean", type(None): "nothing"}.get(type(value), type(value).__name__)


def string(value: Any) -> str:
    """A string, as it is."""
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type_name(value)}")
    return value


def boolean(value: Any) -> bool:
    """`true` or `false` (YAML's other spellings are already booleans)."""
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {type_name(value)}")
    return value


def positive_int(value: Any) -> int:
    """A whole number from 1 to `MAX_COUNT` (thresholds, queue lengths, attempts)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        raise ValueError(f"expected a whole number from 1 to {MAX_COUNT}, got {value!r}")
    return value


def retry_count(value: Any) -> int:
    """A number of retries, 0 to 20."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20:
        raise ValueError(f"expected 0..20 retries, got {value!r}")
    return value


def non_negative(value: Any) -> float:
    """A number from 0 to `MAX_COUNT`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_COUNT:  # NaN too
        raise ValueError(f"expected a number from 0 to {MAX_COUNT}, got {value!r}")
    return float(value)


def fraction(value: Any) -> float:
    """A rate above 0 and at most 1; a number above 1 is a percent (50 is 0.5)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type_name(value)}")
    if isinstance(value, (int, float)) and value > 1:
        value = value / 100.0  # 50 means 50 %
    if not 0 < value <= 1:
        raise ValueError(f"expected a rate between 0 and 1 (or a percent), got {value!r}")
    return float(value)


def is_off(value: Any) -> bool:
    """`off` (or false): a setting that is switched off rather than given a value."""
    return value is False or (isinstance(value, str) and value.strip().lower() == "off")


def status_list(value: Any) -> frozenset[int]:
    """A non-empty list of HTTP status codes."""
    if not isinstance(value, list) or not value:
        raise TypeError("expected a list of HTTP status codes")
    codes = set()
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not 100 <= item <= 599:
            raise ValueError(f"bad HTTP status {item!r}")
        codes.add(item)
    return frozenset(codes)


def header_names(value: Any) -> tuple[str, ...]:
    """A list of header names, lower-cased."""
    if not isinstance(value, list) or not all(isinstance(v, str) and HEADER_NAME.match(v) for v in value):
        raise TypeError("expected a list of header names")
    return tuple(v.lower() for v in value)


def fraction_or_off(value: Any) -> float | None:
    """A rate, or `off` to turn a rate-based trip off."""
    return None if is_off(value) else fraction(value)


def retry_on(value: Any) -> frozenset[str]:
    """What a retry policy retries: outcome classes and 5xx/429 statuses."""
    if not isinstance(value, list) or not value:
        raise TypeError(f"expected a list of {', '.join(RETRY_CLASSES)} or status codes")
    names = set()
    for item in value:
        text = str(item).lower() if not isinstance(item, bool) else ""
        if text in RETRY_CLASSES or (text.isdigit() and 500 <= int(text) <= 599) or text == "429":
            names.add(text)
        else:
            raise ValueError(f"bad retry_on entry {item!r}: use {', '.join(RETRY_CLASSES)} or a 5xx/429 status")
    return frozenset(names)


def stale_if_slow(value: Any) -> float | None:
    """A duration (0: serve the stale copy at once), or `off`: wait for the refresh however long it takes."""
    return None if is_off(value) else parse_duration(value)


def hedge_after(value: Any) -> HedgePolicy | None:
    """`auto` (the upstream's recent p95, at least 100 ms), a duration, or `off`."""
    if is_off(value):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return HEDGE_AUTO
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("expected auto, off or a duration above 0")
    return HedgePolicy(after=seconds)


def coalesce_mode(value: Any) -> str:
    """`local` or `cluster`: where concurrent misses of one key share one upstream call."""
    if value not in ("local", "cluster"):
        raise ValueError(f"expected local or cluster, got {value!r}")
    return value


_PATH = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2}|\{[A-Za-z_][A-Za-z0-9_]*\})*\Z")


def upstream_path(value: Any) -> str:
    """A path template: absolute, and nothing a request line cannot carry (a space: use %20)."""
    text = string(value)
    if not text.startswith("/"):
        raise ValueError("must start with /")
    if not _PATH.match(text):
        raise ValueError(f"{text!r} has characters a URL path cannot carry (percent-encode them, e.g. %20)")
    return text


def has_control(text: str) -> bool:
    """A control character other than a tab (which header values and YAML may hold)."""
    return any(ord(char) < 0x20 and char != "\t" or char == "\x7f" for char in text)


def upstream_url(value: Any) -> URL:
    """An upstream's base URL: http(s), a host to connect to, no credentials, query or fragment."""
    text = string(value)
    if any(char.isspace() or has_control(char) for char in text):
        raise ValueError(f"bad URL {text!r}: whitespace or a control character (yarl would drop some silently)")
    try:
        url = URL(text)
        port = url.port
    except ValueError as exc:
        raise ValueError(f"bad URL {text!r}: {exc}") from None
    if url.scheme not in ("http", "https"):
        raise ValueError(f"upstream URL must be http:// or https://, got {text!r}")
    if not url.host:
        raise ValueError(f"upstream URL has no host: {text!r}")
    if not valid_host(url.raw_host or "") or port == 0:  # raw_host: an international name in its IDNA form
        raise ValueError(f"bad URL {text!r}: {url.host!r} port {port} is no address to connect to")
    if url.user or url.password:
        raise ValueError("credentials in the upstream URL are not allowed; use headers with ${VAR}")
    if url.query_string or url.fragment:
        raise ValueError("the upstream URL must not carry a query or fragment; use `query:`")
    return url


def url_password(url: str) -> str:
    """The password in a Redis URL, "" when there is none (or the URL does not parse)."""
    try:
        return URL(url).password or ""
    except ValueError:
        return ""


def redis_url_problem(url: str) -> str | None:
    """Why redis-py would fail on `url` at start or at every call, found now; None when it would not."""
    scheme, _, rest = url.partition("://")
    if scheme in ("redis+sentinel", "sentinel"):
        return "Sentinel is set with cache.sentinel: {hosts: [...], service: ...}, not a URL"
    if scheme not in ("redis", "rediss", "unix"):
        return "expected a redis://, rediss:// or unix:// URL"
    if scheme != "unix" and ("," in rest.partition("/")[0] or ";" in rest.partition("/")[0]):
        return ("one host only; for several use cache.sentinel.hosts, or cache.cluster: true "
                "with one node of the cluster")
    try:
        parsed = URL(url)
        port = parsed.port
        options = parse_redis_url(url)  # redis-py's own reading, as Redis.from_url makes it
    except (ValueError, TypeError) as exc:
        return f"bad URL: {exc}"
    if parsed.scheme == "unix":
        if not parsed.path or parsed.path == "/":
            return "a unix:// URL names the socket's path"
    elif not parsed.host or not valid_host(parsed.raw_host or "") or port == 0:
        return f"{parsed.host!r} port {port} is no address to connect to"
    elif parsed.path not in ("", "/") and not (parsed.path[1:].isdigit() and parsed.path[1:].isascii()):
        return f"the database after the host is a number such as /0, got {parsed.path!r}"
    unknown = set(parsed.query) - _connection_options(options.get("connection_class", RedisConnection))
    if unknown:
        return f"unknown connection option {sorted(unknown)[0]!r}"
    return None


def host_port(value: Any) -> tuple[str, int]:
    """`host:port` or `[v6]:port` (a Sentinel's address) → (host, port)."""
    host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not valid_host(host) or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"expected host:port, got {value!r}")
    return host, int(port)


def redis_db(value: Any) -> int:
    """A Redis database number, 0..15."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 15:
        raise ValueError(f"expected a database number 0..15, got {value!r}")
    return value


@functools.cache
def _connection_options(connection_class: type) -> frozenset[str]:
    """The keywords a redis-py connection class takes: what a URL's query may set."""
    names: set[str] = set()
    for klass in connection_class.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names.update(p.name for p in inspect.signature(init).parameters.values()
                         if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    return frozenset(names - {"self"})


def decoded_once(text: str) -> str:
    """`text` percent-decoded once if it holds escapes (a key pasted in its "encoded" form), else as it is.

    The URL encodes it once again when it is sent, so both forms of a key give the same request.
    """
    if not _ESCAPE.search(text):
        return text
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        return text  # escapes that are not UTF-8 text: not an encoded key, keep what was written


def topic_list(value: Any) -> tuple[str, ...]:
    """A watch's list of always-polled topics."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise TypeError("expected a list of topics such as flights/status/KE001")
    return tuple(value)


def positive_duration(value: Any) -> float:
    """A duration above 0."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be longer than 0")
    return seconds


def positive_size(value: Any) -> int:
    """A size above 0 bytes."""
    size = parse_size(value)
    if size <= 0:
        raise ValueError("must be more than 0 bytes")
    return size


def header_budget(value: Any) -> int:
    """`server.max_header_bytes`: below 1 KiB even a bare request's head would get 431."""
    size = parse_size(value)
    if size < 1024:
        raise ValueError("must be at least 1KiB")
    return size


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h|second|minute|hour)\s*$")


def rate_limit(value: Any) -> RateLimit:
    """`10/s`, `600/m`, `1000/h` or {rate, per, burst}."""
    if isinstance(value, str):
        found = _RATE.match(value)
        if not found:
            raise ValueError(f"bad rate limit {value!r}: use 10/s, 600/m, 1000/h or {{rate, per, burst}}")
        rate = float(found.group(1))
        per = {"s": 1.0, "second": 1.0, "m": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}[found.group(2)]
        burst = rate
    elif isinstance(value, dict):
        unknown = set(value) - {"rate", "per", "burst"}
        if unknown:
            raise ValueError(f"unknown key {sorted(unknown)[0]!r} (allowed: burst, per, rate)")
        rate = value.get("rate")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)):
            raise ValueError("rate must be a number of requests")
        per = parse_duration(value.get("per", 1))
        burst = value.get("burst", rate)
        if isinstance(burst, bool) or not isinstance(burst, (int, float)):
            raise ValueError("burst must be a number of requests")
    else:
        raise TypeError(f"expected 10/s or a mapping, got {type_name(value)}")
    if not (0 < rate <= MAX_COUNT and per > 0 and 1 <= burst <= MAX_COUNT):  # NaN and inf too
        raise ValueError("rate and per must be positive and burst at least 1")
    return RateLimit(rate=float(rate), per=per, burst=float(burst))


def one_of(*choices: str) -> Callable[[Any], str]:
    """A reader for a value that must be one of `choices` (`server.front`, `upstream_client`)."""

    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected {' or '.join(choices)}, got {value!r}")
        return value

    return convert
