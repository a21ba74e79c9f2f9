"""The engine package: Engine runs a Runner (HFRunner, a transformers model; FakeRunner, for
tests and benchmarks) over the batches its Scheduler decides, and its Detokenizer turns
tokens into text. HFRunner is imported on first use, so that importing the package (and the
fake path) does not load torch."""

from zmqchat.engine.engine import Engine
from zmqchat.engine.fake_runner import FakeRunner

__all__ = ["Engine", "FakeRunner", "HFRunner"]


def __getattr__(name: str):
    if name == "HFRunner":
        from zmqchat.engine.model_runner import HFRunner

        return HFRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
