"""The request-target check (proxy/config/routing.py `check_target`): what may reach an upstream, and that
the lean front end never keeps a target the check would refuse."""

from __future__ import annotations

import pytest

from proxy.config.routing import UnsafePath, check_target
from proxy.downstream.connection import is_plain_target

REFUSED = {
    "/fx/../admin": "dot segments",
    "/fx/..;/admin": "dot segments",                      # Tomcat and Spring read `..;` as `..`
    "/fx/a/..;jsessionid=1/b": "dot segments",
    "/fx/.;x/a": "dot segments",
    "/fx/%2e%2e%3B/admin": "dot segments",                # `..;` once decoded
    "/fx/%2e%2e/admin": "dot segments",
    "/fx/a#b": "raw #",
    "/fx/a?next=#frag": "raw #",
    "/fx/%252e%252e/admin": "escapes",                    # an escape that decodes to another one
    "/fx/%2525252e%2525252e/admin": "escapes",            # however many rounds deep
    "/fx/%25%32%65%25%32%65/admin": "escapes",            # `%2e` spelled with an escaped percent sign
    "/fx/%%32%65%%32%65/admin": "escapes",
    "/fx/%2541": "escapes",
    "//evil.example/fx": "//",
    "/fx/a%2f%2fb": "empty path segments",
    "/fx/a%5cb": "backslashes",
    "/fx/a%0d%0aX: y": "control characters",
    "http://elsewhere.example/fx": "must be a path",
}


@pytest.mark.parametrize("target", list(REFUSED))
def test_targets_that_could_escape_the_route_table_are_refused_with_the_reason(target):
    with pytest.raises(UnsafePath, match=REFUSED[target]):
        check_target(target)


@pytest.mark.parametrize("target, decoded", [
    ("/fx/latest/USD", "/fx/latest/USD"),
    ("/fx/a;v=1/b", "/fx/a;v=1/b"),          # a parameter on an ordinary segment is the upstream's business
    ("/fx/..a/b.", "/fx/..a/b."),            # dots inside a name are not dot segments
    ("/fx/100%25", "/fx/100%"),              # an escaped percent sign that escapes nothing
    ("/fx/%25zz", "/fx/%zz"),
    ("/fx/caf%C3%A9?q=%2e%2e", "/fx/café"),  # the query is not a path
])
def test_ordinary_targets_pass_decoded_once(target, decoded):
    assert check_target(target) == decoded


@pytest.mark.parametrize("target", list(REFUSED))
def test_the_lean_front_end_hands_every_refused_target_to_the_checked_path(target):
    assert not is_plain_target(target.encode())
