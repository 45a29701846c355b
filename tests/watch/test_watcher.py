"""The watcher (proxy/watch/watcher.py) on its own: a Runtime, a memory outbox and a stepped clock, no process."""

from __future__ import annotations

import pytest

from proxy import signals
from proxy.observability.tracing import parse_traceparent
from proxy.watch.outbox import MemoryOutbox
from proxy.watch.watcher import TooManyTopics, UnknownTopic, Watcher
from tests.fakes import Fail
from tests.watch_helpers import flight, runtime_for, watched_table

TOPIC = "flights/status/KE001"


@pytest.fixture
async def setup(fake_upstream, clock):
    """A watcher over a real chain to a fake flight API on loopback; what it publishes and emits is kept."""
    api = await fake_upstream("kac")
    api.default = flight("SCHEDULED")
    holder = {"runtime": runtime_for(watched_table(api.url), clock)}
    published, emitted = [], []
    outbox = MemoryOutbox(clock, 100)
    watcher = Watcher(lambda: holder["runtime"], outbox, published.append, clock=clock, emit=emitted.append,
                      max_topics=3)
    yield api, watcher, published, emitted, holder
    await holder["runtime"].close()


async def test_the_first_poll_is_a_baseline_and_a_change_is_published_once(setup, clock):
    api, watcher, published, emitted, _ = setup
    assert watcher.subscribe(TOPIC, "client-a") == TOPIC
    assert await watcher.tick() == 1 and published == []  # the first value seen is not a change
    clock.advance(300)
    assert await watcher.tick() == 1 and published == []  # the same fields: nothing to tell
    api.default = flight("DELAYED")
    clock.advance(300)
    assert await watcher.tick() == 1
    (event,) = published
    assert (event.topic, event.route, event.before, event.after) == (
        TOPIC, "/flights/status/{flight}", {"status": "SCHEDULED", "gate": "3"}, {"status": "DELAYED", "gate": "3"})
    assert api.calls == 3  # one upstream call per poll, through the chain
    assert [e for e in emitted if isinstance(e, signals.WatchEventEmitted)] == [
        signals.WatchEventEmitted("flights", "/flights/status/{flight}", event.evt_id)]


async def test_a_topic_is_polled_once_per_interval_whoever_subscribes(setup, clock):
    api, watcher, _, _, _ = setup
    for client in ("a", "b", "c"):
        watcher.subscribe(TOPIC, client)
    assert await watcher.tick() == 1
    clock.advance(299)
    assert await watcher.tick() == 0  # not due before its interval is over
    clock.advance(1)
    assert await watcher.tick() == 1
    assert api.calls == 2 and watcher.describe()[TOPIC]["subscribers"] == 3


async def test_the_last_unsubscribe_stops_the_polls(setup, clock):
    api, watcher, _, emitted, _ = setup
    watcher.subscribe(TOPIC, "a")
    watcher.subscribe(TOPIC, "b")
    watcher.unsubscribe(TOPIC, "a")
    assert TOPIC in watcher.topics
    watcher.unsubscribe(TOPIC, "b")
    assert watcher.topics == {}
    clock.advance(300)
    assert await watcher.tick() == 0 and api.calls == 0
    counts = [e.count for e in emitted if isinstance(e, signals.TopicSubscribers)]
    assert counts == [1, 2, 1, 0]


@pytest.mark.parametrize("topic, reason", [
    ("", "a topic is a watched route's path"),
    ("hotels/status/1", "no watched route matches"),
    ("flights/status/../admin", "dot segments"),
    ("flights/status/KE%00", "control characters"),
    ("x" * 600, "a topic is a watched route's path"),
])
def test_topics_that_name_no_watched_route_are_refused_with_the_reason(setup, topic, reason):
    _, watcher, _, _, _ = setup
    with pytest.raises(UnknownTopic, match=reason.replace(".", r"\.")):
        watcher.subscribe(topic, "client")
    assert watcher.topics == {}


def test_the_query_is_part_of_the_topic_in_a_stable_order(setup):
    _, watcher, _, _, _ = setup
    assert watcher.subscribe("/flights/status/KE001?date=2024-12-01&leg=2", "a") == \
        watcher.subscribe("flights/status/KE001?leg=2&date=2024-12-01", "b") == \
        "flights/status/KE001?date=2024-12-01&leg=2"
    assert len(watcher.topics) == 1


def test_the_proxy_wide_topic_cap_holds_and_names_its_setting(setup):
    _, watcher, _, _, _ = setup
    for n in range(3):
        watcher.subscribe(f"flights/status/KE00{n}", "a")
    with pytest.raises(TooManyTopics, match="events.max_topics"):
        watcher.subscribe("flights/status/KE009", "a")
    watcher.subscribe("flights/status/KE001", "b")  # a topic already watched costs nothing more
    assert len(watcher.topics) == 3


async def test_a_failed_poll_publishes_nothing_and_the_next_change_is_still_found(setup, clock):
    api, watcher, published, _, _ = setup
    watcher.subscribe(TOPIC, "a")
    await watcher.tick()  # baseline: SCHEDULED
    api.script(Fail(503))
    clock.advance(300)
    await watcher.tick()
    assert published == []
    api.default = flight("BOARDING")
    clock.advance(300)
    await watcher.tick()
    assert [e.after["status"] for e in published] == ["BOARDING"]
    assert api.calls == 3


async def test_a_reload_without_the_watch_returns_the_orphaned_subscribers(setup, clock):
    api, watcher, _, _, holder = setup
    watcher.subscribe(TOPIC, "a")
    old = holder["runtime"]
    holder["runtime"] = runtime_for(watched_table(api.url, watch=False), clock)
    await old.close()
    assert watcher.reconfigure() == {TOPIC: ["a"]}
    assert watcher.topics == {}


async def test_static_topics_follow_the_table_and_are_polled_without_subscribers(setup, clock):
    api, watcher, _, _, holder = setup
    old = holder["runtime"]
    holder["runtime"] = runtime_for(watched_table(api.url, topics=[TOPIC, "hotels/1"]), clock)
    await old.close()
    assert watcher.reconfigure() == {}  # the bad topic is logged and left out, the good one kept
    assert list(watcher.topics) == [TOPIC] and watcher.topics[TOPIC].static
    assert await watcher.tick() == 1 and api.calls == 1


async def test_each_poll_sends_the_vendor_a_traceparent_of_its_own_and_its_attempt_carries_that_trace(setup, clock):
    api, watcher, _, _, holder = setup
    told: list = []
    holder["runtime"].bus.subscribe(told.append)
    watcher.subscribe(TOPIC, "a")
    await watcher.tick()
    clock.advance(300)
    await watcher.tick()
    holder["runtime"].bus.deliver_waiting()
    sent = [seen.headers.getall("traceparent", []) for seen in api.seen]
    assert [len(values) for values in sent] == [1, 1]
    parsed = [parse_traceparent(values[0]) for values in sent]
    assert all(p is not None and p[2] == 0 for p in parsed)  # valid, and not sampled: no span is exported
    assert parsed[0][0] != parsed[1][0]  # a trace per poll
    attempts = [e for e in told if isinstance(e, signals.AttemptFinished)]
    assert [e.trace.trace_id for e in attempts] == [p[0] for p in parsed]
