"""Closed-loop HTTP load for the Serve drills and soak: each client thread sends its next POST
/predict when the previous one is answered, and every answer is kept (times, status, error code,
Retry-After), so a test can split them into before / during / after a fault."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np


@dataclass
class Answer:
    started: float  # time.monotonic()
    ended: float
    status: int  # 0: no HTTP answer (connection error, client timeout)
    error: str = ""  # the JSON body's error code, or the exception's name
    retry_after: str | None = None

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class ClosedLoop:
    def __init__(self, url: str, images: list[bytes], clients: int, headers: dict[str, str] | None = None,
                 timeout_s: float = 120, max_requests: int | None = None) -> None:
        self.url, self.images, self.clients, self.headers = url, images, clients, headers or {}
        self.timeout_s, self.max_requests = timeout_s, max_requests
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._counter = itertools.count()
        self._threads: list[threading.Thread] = []

    def start(self) -> "ClosedLoop":
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, join_s: float = 180) -> list[Answer]:
        self._stop.set()
        for thread in self._threads:
            thread.join(join_s)
        return sorted(self.answers, key=lambda a: a.started)

    def wait(self, join_s: float = 600) -> list[Answer]:
        """Until ``max_requests`` have been answered."""
        for thread in self._threads:
            thread.join(join_s)
        return sorted(self.answers, key=lambda a: a.started)

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout_s, headers=self.headers) as http:
            while not self._stop.is_set():
                index = next(self._counter)
                if self.max_requests is not None and index >= self.max_requests:
                    return
                image = self.images[index % len(self.images)]
                started = time.monotonic()
                try:
                    r = http.post("/predict", files={"file": (f"{index}.png", image, "image/png")})
                    error = "" if r.status_code == 200 else _error_code(r)
                    answer = Answer(started, time.monotonic(), r.status_code, error, r.headers.get("retry-after"))
                except httpx.HTTPError as exc:
                    answer = Answer(started, time.monotonic(), 0, type(exc).__name__)
                with self._lock:
                    self.answers.append(answer)


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", "?"))
    except ValueError:
        return f"not JSON: {response.text[:80]!r}"


def percentile_ms(answers: list[Answer], q: float) -> float:
    return round(float(np.percentile([a.seconds * 1000 for a in answers], q)), 1) if answers else 0.0
