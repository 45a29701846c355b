"""Webhook delivery (proxy/watch/webhooks.py) on its own: receivers are real servers on loopback,
the route table is handed in, and backoff sleeps on a stepped clock. No proxy process."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

import orjson
import pytest

from proxy import signals
from proxy.config.parse import parse_config
from proxy.watch.outbox import Event, MemoryOutbox
from proxy.watch.webhooks import WebhookWorker
from tests.fakes import Fail, Ok, refused_port
from tests.watch_helpers import watched_table

ROUTE = "/flights/status/{flight}"
SECRET = "s3cret-hook"


def event(evt_id: str = "1733040000000-0") -> Event:
    return Event(evt_id, "flights/status/KE001", "2024-12-01T10:00:00.000Z",
                 {"status": "SCHEDULED"}, {"status": "DELAYED"}, ROUTE)


def config_for(webhook: str | None, attempts: int = 3):
    return parse_config(watched_table("http://127.0.0.1:9", webhook=webhook, attempts=attempts), "routes.yaml", {})


@pytest.fixture
async def worker_for(clock):
    made = []

    def make(config, **options):
        holder = {"config": config}
        emitted: list = []
        outbox = MemoryOutbox(clock, 100)
        worker = WebhookWorker(lambda: holder["config"], outbox, clock, emitted.append, **options)
        made.append(worker)
        return worker, emitted, holder, outbox

    yield make
    for worker in made:
        await worker.stop()


def signed(seen) -> bool:
    timestamp = seen.headers["X-Signature-Timestamp"]
    expected = hmac.new(SECRET.encode(), timestamp.encode() + b"." + seen.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(seen.headers["X-Signature"], "sha256=" + expected)


async def test_an_event_is_posted_signed_with_its_id_and_counted_once(fake_upstream, worker_for, clock):
    receiver = await fake_upstream("receiver")
    receiver.default = Ok(status=204, body=b"")
    worker, emitted, _, _ = worker_for(config_for(receiver.url + "/hook"))
    assert await worker.deliver(event()) is True
    (seen,) = receiver.seen
    assert (seen.method, seen.path_qs) == ("POST", "/hook")
    assert orjson.loads(seen.body) == event().as_json()
    assert seen.headers["X-Event-Id"] == "1733040000000-0" and seen.headers["Content-Type"] == "application/json"
    assert seen.headers["X-Signature-Timestamp"] == str(int(clock.time()))
    assert signed(seen)
    assert worker.counters == {"delivered": 1, "failed_attempts": 0, "dead": 0}
    assert emitted == [signals.EventDelivered("webhook", ROUTE), signals.EventAcked("webhook", ROUTE)]


async def test_a_failing_receiver_is_retried_with_doubling_waits_and_fresh_signatures(fake_upstream, worker_for, clock):
    receiver = await fake_upstream("receiver")
    receiver.script(Fail(503, times=2))
    receiver.default = Ok()
    worker, _, _, outbox = worker_for(config_for(receiver.url, attempts=4), base_delay=1.0)
    assert await worker.deliver(event()) is True
    assert receiver.calls == 3 and clock.sleeps == [1.0, 2.0]
    stamps = [int(s.headers["X-Signature-Timestamp"]) for s in receiver.seen]
    assert stamps[1] - stamps[0] == 1 and stamps[2] - stamps[1] == 2  # signed at each attempt, not once
    assert all(signed(s) for s in receiver.seen)
    assert worker.counters == {"delivered": 1, "failed_attempts": 2, "dead": 0}


async def test_the_waits_stop_growing_at_max_delay(fake_upstream, worker_for, clock):
    receiver = await fake_upstream("receiver")
    receiver.default = Fail(500)
    worker, _, _, outbox = worker_for(config_for(receiver.url, attempts=6), base_delay=1.0, max_delay=5.0)
    await worker.deliver(event())
    assert clock.sleeps == [1.0, 2.0, 4.0, 5.0, 5.0]


async def test_attempts_used_up_dead_letter_the_event_with_the_reason(fake_upstream, worker_for, clock):
    receiver = await fake_upstream("receiver")
    receiver.default = Fail(500)
    worker, emitted, _, outbox = worker_for(config_for(receiver.url, attempts=3))
    assert await worker.deliver(event()) is False
    assert receiver.calls == 3
    assert [(e.evt_id, reason) for e, reason in outbox.dead] == [("1733040000000-0", "HTTP 500")]
    assert worker.counters == {"delivered": 0, "failed_attempts": 3, "dead": 1}
    assert emitted == [signals.EventDeadLettered(ROUTE, "1733040000000-0", "HTTP 500")]


async def test_a_receiver_that_refuses_connections_is_a_failed_attempt_not_a_crash(worker_for):
    worker, _, _, outbox = worker_for(config_for(f"http://127.0.0.1:{refused_port()}/hook", attempts=2))
    assert await worker.deliver(event()) is False
    ((_, reason),) = outbox.dead
    assert reason.startswith("ClientConnectorError")


async def test_a_redirect_is_not_followed_and_counts_as_a_failure(fake_upstream, worker_for):
    elsewhere = await fake_upstream("elsewhere")
    receiver = await fake_upstream("receiver")
    receiver.default = Ok(status=307, headers={"Location": elsewhere.url + "/steal"})
    worker, _, _, outbox = worker_for(config_for(receiver.url, attempts=1))
    assert await worker.deliver(event()) is False
    assert elsewhere.calls == 0 and outbox.dead[0][1] == "HTTP 307"


async def test_events_of_a_route_without_a_webhook_are_not_posted_nor_queued(fake_upstream, worker_for):
    receiver = await fake_upstream("receiver")
    worker, emitted, holder, _ = worker_for(config_for(receiver.url))
    assert worker.any_webhooks()
    holder["config"] = config_for(None)  # a reload took the webhook away
    assert not worker.any_webhooks()
    worker.enqueue(event())
    with pytest.raises(asyncio.TimeoutError):
        await worker.work_once(block_ms=50)  # nothing was queued
    assert await worker.deliver(event()) is True  # nothing to do is done
    assert receiver.calls == 0 and emitted == []


async def test_the_memory_queue_hands_an_enqueued_event_to_delivery(fake_upstream, worker_for):
    receiver = await fake_upstream("receiver")
    worker, _, _, outbox = worker_for(config_for(receiver.url))
    worker.enqueue(event("1733040000000-7"))
    assert await worker.work_once(block_ms=1000) == 1
    assert [s.headers["X-Event-Id"] for s in receiver.seen] == ["1733040000000-7"]
