"""Prometheus metrics of an API frontend, served at /metrics (prometheus-client).

Names follow vLLM's where they mean the same, under a `zmqchat:` prefix. The API records
each request's life here (`RequestMetrics`); the cluster gauges (queue depth, running
requests, workers per model) are read from the broker's STATUS at each scrape.

A model label is a model the cluster serves, never any string a client sent: each label set
lives for as long as the process, so a client naming a thousand models would otherwise add a
thousand. A request for a model not (yet) seen served is counted under model="unknown".
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from zmqchat.protocol import StatusReport

# Buckets in seconds, from vLLM's choices for the same histograms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)
UNKNOWN_MODEL = "unknown"  # the label of requests for models the cluster has not been seen serving


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r, model = self.registry, ["model"]
        self.requests = Counter("zmqchat:requests", "Requests finished, by model and outcome (finish reason or "
                                "error code).", ["model", "outcome"], registry=r)
        self.ttft = Histogram("zmqchat:time_to_first_token_seconds", "Time to first token.", model,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("zmqchat:inter_token_latency_seconds", "Time between streamed pieces of output.",
                             model, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("zmqchat:e2e_request_latency_seconds", "End-to-end request latency.", model,
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("zmqchat:prompt_tokens", "Prompt tokens processed.", model, registry=r)
        self.generation_tokens = Counter("zmqchat:generation_tokens", "Tokens generated.", model, registry=r)
        self.waiting = Gauge("zmqchat:num_requests_waiting", "Requests queued at the broker.", model, registry=r)
        self.running = Gauge("zmqchat:num_requests_running", "Requests running on workers.", model, registry=r)
        self.workers = Gauge("zmqchat:num_workers", "Workers serving the model.", model, registry=r)
        self.free_slots = Gauge("zmqchat:num_free_slots", "Free worker slots.", model, registry=r)
        self.broker_up = Gauge("zmqchat:broker_up", "1 while the broker answers this frontend.", registry=r)
        # Models seen served, in a STATUS or by a request's output: the only model labels.
        self.served: set[str] = set()

    def count(self, model: str | None, outcome: str) -> None:
        """A request ended with `outcome` (a finish reason or an error code)."""
        self.requests.labels(model if model in self.served else UNKNOWN_MODEL, outcome).inc()

    def render(self, report: StatusReport | None) -> bytes:
        """The exposition text, with the cluster gauges set from a broker STATUS (None: no answer)."""
        self.broker_up.set(report is not None)
        for gauge in (self.waiting, self.running, self.workers, self.free_slots):
            gauge.clear()  # a model no worker serves any more disappears
        for name, m in (report.models if report else {}).items():
            self.served.add(name)
            self.waiting.labels(name).set(m.queued)
            self.running.labels(name).set(m.slots - m.free)
            self.workers.labels(name).set(m.workers)
            self.free_slots.labels(name).set(m.free)
        return generate_latest(self.registry)


class RequestMetrics:
    """One request's timings, fed its events as they reach the client."""

    def __init__(self, metrics: Metrics, model: str):
        self.metrics = metrics
        self.model = model
        self.started = time.perf_counter()
        self.last: dict[int, float] = {}  # when each choice last gave output

    def output(self, choice: int = 0) -> None:
        """Output of `choice` arrived: the first of the request's is its time to first token;
        after that, the gap since the same choice's last output (choices interleave)."""
        self.metrics.served.add(self.model)
        now = time.perf_counter()
        if not self.last:
            self.metrics.ttft.labels(self.model).observe(now - self.started)
        elif choice in self.last:
            self.metrics.itl.labels(self.model).observe(now - self.last[choice])
        self.last[choice] = now

    def finished(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.metrics.served.add(self.model)  # it may have finished with no output (an empty reply)
        self.metrics.e2e.labels(self.model).observe(time.perf_counter() - self.started)
        self.metrics.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self.metrics.generation_tokens.labels(self.model).inc(completion_tokens)
        self.metrics.count(self.model, finish_reason)

    def failed(self, code: str) -> None:
        """The request ended without an answer: `code` is an ErrorCode's value, or "cancelled"."""
        self.metrics.count(self.model, code)
