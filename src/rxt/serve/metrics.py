"""Counters, gauges and histograms written in the Prometheus text format (version 0.0.4).

Small on purpose: labelled counters and histograms, and gauges read from a callback at scrape time.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()):
        self.name, self.help, self.labelnames = name, help_text, tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> Labels:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", *self.samples()]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()):
        super().__init__(name, help_text, labelnames)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in items]


class Histogram(Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = LATENCY_BUCKETS):
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}  # bucket counts, [sum]

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * len(self.buckets), [0.0]))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            total[0] += value

    def count(self, **labels: str) -> int:
        series = self._series.get(self._key(labels))
        return series[0][-1] if series else 0

    def samples(self) -> list[str]:
        lines = []
        with self._lock:
            items = sorted((k, (list(c), t[0])) for k, (c, t) in self._series.items())
        for key, (counts, total) in items:
            for bound, count in zip(self.buckets, counts, strict=True):
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {count}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {counts[-1]}")
        return lines


class Gauge(Metric):
    """A value read when scraped; the callback returns None when it cannot tell (the sample is left out)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float | None]):
        super().__init__(name, help_text)
        self.read = read

    def samples(self) -> list[str]:
        value = self.read()
        return [] if value is None else [f"{self.name} {_number(value)}"]


class Registry:
    def __init__(self) -> None:
        self.metrics: list[Metric] = []

    def add(self, metric: Metric) -> Metric:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(line for m in self.metrics for line in m.render()) + "\n"


class ServerMetrics:
    """The metrics of one server process."""

    def __init__(self) -> None:
        self.registry = Registry()
        add = self.registry.add
        self.requests = add(Counter("rxt_http_requests_total", "HTTP requests by route and status.",
                                    ("method", "route", "status")))
        self.request_seconds = add(Histogram("rxt_http_request_duration_seconds",
                                             "Time to the response headers, by route.", ("route",)))
        self.first_token = add(Histogram("rxt_time_to_first_token_seconds",
                                         "From the request to the first answer token (lock wait included)."))
        self.answer = add(Histogram("rxt_answer_seconds", "From the request to the last answer token."))
        self.memory_update = add(Histogram("rxt_memory_update_seconds",
                                           "From the end of the answer to the new memory written to the store."))
        self.turns = add(Counter("rxt_turns_total", "Answered turns."))
        self.tokens = add(Counter("rxt_generated_tokens_total", "Answer tokens generated."))
        self.queue_rejections = add(Counter("rxt_queue_rejections_total",
                                            "Turns refused with 429 because --max-queue turns were waiting."))
        self.write_failures = add(Counter("rxt_memory_write_failures_total",
                                          "Memory updates that could not be written (the turn is not remembered)."))
        self.history_rereads = add(Counter("rxt_history_rereads_total",
                                           "Stateless model: turns that read a session's history again because "
                                           "its KV cache was not kept (evicted, or another replica answered)."))
        self.nonfinite_memories = add(Counter("rxt_nonfinite_memories_total",
                                              "Turns whose new memory held NaN or infinity (not written; the "
                                              "session keeps its previous memory)."))

    def add_gauge(self, name: str, help_text: str, read: Callable[[], float | None]) -> None:
        self.registry.add(Gauge(name, help_text, read))

    def render(self) -> str:
        return self.registry.render()
