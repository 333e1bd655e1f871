"""The ingress's calls to its replicas: sent again while the replica is lost, a JSON 503 with
Retry-After once the request timeout has passed, other errors untouched."""

from __future__ import annotations

import asyncio
import time

import pytest
from ray.exceptions import ActorDiedError

from ase_ray.errors import RequestError
from ase_ray.serve.app import RETRY_AFTER_S, call_until


class Flaky:
    """A handle call that fails with ``error`` ``failures`` times, then answers."""

    def __init__(self, failures: int, error: BaseException, delay_s: float = 0.0):
        self.failures, self.error, self.delay_s, self.calls = failures, error, delay_s, 0

    def __call__(self):
        self.calls += 1
        failing = self.calls <= self.failures

        async def answer():
            await asyncio.sleep(self.delay_s)
            if failing:
                raise self.error
            return "answer"

        return answer()


def test_a_call_to_a_dead_replica_is_sent_again_until_it_answers():
    call = Flaky(3, ActorDiedError())
    assert asyncio.run(call_until(time.monotonic() + 10, "Features", call)) == "answer"
    assert call.calls == 4


def test_past_the_deadline_the_answer_is_a_503_with_retry_after():
    call = Flaky(10**6, ActorDiedError())
    started = time.monotonic()
    with pytest.raises(RequestError) as caught:
        asyncio.run(call_until(started + 0.5, "Classifier", call))
    assert caught.value.status == 503 and caught.value.code == "service_unavailable"
    assert caught.value.retry_after_s == RETRY_AFTER_S and "Classifier" in caught.value.message
    assert 0.5 <= time.monotonic() - started < 2.5 and call.calls > 2


def test_a_slow_replica_is_cut_at_the_deadline():
    started = time.monotonic()
    with pytest.raises(RequestError) as caught:
        asyncio.run(call_until(started + 0.3, "Features", Flaky(0, ActorDiedError(), delay_s=30)))
    assert caught.value.status == 503 and time.monotonic() - started < 2


def test_other_errors_are_not_retried():
    call = Flaky(1, ValueError("a bug"))
    with pytest.raises(ValueError):
        asyncio.run(call_until(time.monotonic() + 10, "Features", call))
    assert call.calls == 1
