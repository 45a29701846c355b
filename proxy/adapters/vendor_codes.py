"""Result codes inside an answer: what a vendor means when its HTTP status does not say it.

Public-data portals answer most errors with HTTP 200 and a code in the body: data.go.kr APIs put
it in `response.header.resultCode`, their gateway sends an XML `OpenAPI_ServiceResponse`
(`cmmMsgHeader.returnReasonCode`) even where JSON was asked, and ODCloud sends
`{"code": -4, "msg": "..."}` (with a 4xx). An upstream's `result_codes` says where the code and
its message are (JMESPath over the decoded answer, JSON or XML) and what each code means; the
attempt stage acts on the `Verdict`.

Codes are read from 2xx and 4xx answers (a 5xx is a failure whatever its body says). A code the
table does not know is a vendor error in a 2xx answer; in a 4xx answer the status decides.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from proxy.adapters.quota import DailyReset
from proxy.adapters.transform import TransformError, evaluate

_MAX_MESSAGE = 200


class Meaning(str, enum.Enum):
    """What one result code means; the values are what `result_codes.codes` maps codes to."""

    SUCCESS = "success"            # data: normalised and cached like any 2xx
    EMPTY = "empty"                # no data, and that is the answer: normalised (to an empty list) and cached
    CALLER_ERROR = "caller_error"  # the request was bad: no retry, no breaker failure; a 400 when nobody answers
    KEY_REFUSED = "key_refused"    # the key is refused: it rests as after a 401 and the next key is used
    QUOTA = "quota"                # the key's quota is spent: it rests until the daily reset
    VENDOR_ERROR = "vendor_error"  # the vendor failed: a breaker failure, fallback, never cached

    @property
    def refuses_key(self) -> bool:
        return self in (Meaning.KEY_REFUSED, Meaning.QUOTA)


MEANINGS = ", ".join(m.value for m in Meaning)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The code an answer carried, its message and what it means."""

    meaning: Meaning
    code: str
    message: str | None = None

    def __str__(self) -> str:
        return f"result code {self.code}" + (f" ({self.message})" if self.message else "")


@dataclass(frozen=True, slots=True)
class ResultCodes:
    """An upstream's table of result codes (`result_codes:` in the route table)."""

    code: str                          # JMESPath to the code, e.g. `response.header.resultCode || code`
    meanings: Mapping[str, Meaning]    # code (as text) -> meaning
    message: str | None = None         # JMESPath to the code's message
    daily_reset: DailyReset | None = None  # when a spent quota comes back; None: the key rests `key_cooldown`

    def verdict(self, document: Any, status: int, *, hide: Iterable[str] = ()) -> Verdict | None:
        """What the decoded answer's code means, or None when it carries none (or its status decides).

        `hide`: secrets (API keys) masked in the vendor's message, which may echo the request.
        """
        if status >= 500 or status < 200 or 300 <= status < 400:
            return None
        code = _text(self._find(self.code, document))
        if code is None:
            return None
        meaning = self.meanings.get(code)
        if meaning is None:
            if status >= 400:
                return None  # an unknown code on a 4xx: the 4xx already says what happened
            meaning = Meaning.VENDOR_ERROR
        elif status >= 400 and meaning in (Meaning.SUCCESS, Meaning.EMPTY):
            return None  # a "success" code with an error status: trust the status
        message = _text(self._find(self.message, document)) if self.message else None
        return Verdict(meaning, code, _printable(_masked(message, hide)) if message else None)

    @staticmethod
    def _find(expression: str, document: Any) -> Any:
        try:
            return evaluate(expression, {}, document)
        except TransformError:
            return None


def _text(value: Any) -> str | None:
    """A code or message as text: numbers as written (`-4`, not `-4.0`); anything else is no code."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _masked(text: str, secrets: Iterable[str]) -> str:
    """`text` with each secret, as written or URL-encoded, replaced by `***`."""
    for secret in secrets:
        if len(secret) >= 4:
            for form in {secret, quote(secret, safe=""), quote(secret)}:
                text = text.replace(form, "***")
    return text


def _printable(text: str) -> str:
    """A vendor's message fit for a detail line: one line, bounded."""
    flat = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return flat[:_MAX_MESSAGE] + ("..." if len(flat) > _MAX_MESSAGE else "")


def blamed_parameter(message: str | None, sent: Iterable[tuple[str, str]]) -> str:
    """Which of the caller's parameters a vendor refused, for the caller to read.

    `sent` pairs each vendor parameter filled from the request with the placeholder that filled
    it (`("schFln", "flight")`). A vendor that names its parameter in the message is taken at its
    word; otherwise every parameter that came from the request is listed.
    """
    pairs = list(dict.fromkeys(sent))
    if not pairs:
        return "the vendor refused the request's parameters"
    words = set("".join(ch if ch.isalnum() or ch == "_" else " " for ch in message or "").split())
    named = [(vendor, mine) for vendor, mine in pairs if vendor in words]
    if named:
        return "the vendor refused " + ", ".join(f"{{{mine}}} (sent as {vendor})" for vendor, mine in named)
    listed = ", ".join(f"{{{mine}}} (sent as {vendor})" for vendor, mine in pairs)
    return f"the vendor refused one of the request's parameters: {listed}"
