"""What `fxscale serve MODEL` serves: a local Hugging Face model directory (config, safetensors
weights, tokenizer files, chat template), or a zoo name (random weights, the built-in
tokenizer) for trying it out.

Nothing a model directory ships is executed: no hub access, no remote code (a config or
tokenizer that asks for its own Python is refused), safetensors weights only (a pickle
checkpoint can run code when loaded), and a chat template renders in transformers' sandboxed
Jinja. Each missing or refused file is a clear error naming it, raised before anything loads.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fxscale.models import zoo
from fxscale.serving.api import ServedModel

PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth",
                  "tf_model.h5", "flax_model.msgpack")
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")



def check_model_dir(path: Path) -> None:
    """Refuse a model directory that lacks a file serving needs, holds only pickle weights,
    or asks to run its own code (a ValueError naming the file and what to do)."""
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json; MODEL must be a Hugging Face model "
                         "directory (save_pretrained writes one) or a zoo name "
                         f"({', '.join(zoo.ZOO_DECODERS)})")
    config = _json(path / "config.json")
    if "auto_map" in config:
        raise ValueError(f"{path / 'config.json'}: the model asks to run its own Python code "
                         "(auto_map); fxscale serves only architectures transformers ships")
    if not any((path / name).is_file() for name in SAFETENSORS):
        pickled = [name for name in PICKLE_WEIGHTS if (path / name).is_file()]
        why = (f"only {pickled[0]} is there, a pickle checkpoint, which can run code when "
               "loaded; convert it once to safetensors (model.save_pretrained(dir, "
               "safe_serialization=True)) where you trust it") if pickled else \
            "no weights found"
        raise ValueError(f"{path}: no {SAFETENSORS[0]} (or its index): {why}")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{path}: no tokenizer file ({', '.join(TOKENIZER_FILES)}); save the "
                         "tokenizer beside the model with tokenizer.save_pretrained(dir)")
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.is_file() and "auto_map" in _json(tokenizer_config):
        raise ValueError(f"{tokenizer_config}: the tokenizer asks to run its own Python code "
                         "(auto_map); fxscale loads only tokenizers transformers ships")


def _json(path: Path) -> dict:
    """A JSON object file, or a ValueError naming it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_model(spec: str) -> str:
    """Where MODEL comes from ("dir" or "zoo"), checked before the server starts."""
    path = Path(spec)
    if path.is_dir():
        check_model_dir(path)
        return "dir"
    if spec in zoo.ZOO_DECODERS:
        return "zoo"
    raise ValueError(f"MODEL {spec!r} is neither a model directory nor a zoo name "
                     f"({', '.join(zoo.ZOO_DECODERS)})")


def load_model(spec: str, served_name: str | None = None) -> ServedModel:
    """Load MODEL (checked by check_model): from its directory, without the hub or remote
    code, or a zoo model with random weights and the built-in tokenizer."""
    if check_model(spec) == "zoo":
        from fxscale.serving.tokenizer import builtin_tokenizer

        model = zoo.build(spec).model.eval()
        return ServedModel(model, builtin_tokenizer(model.config.vocab_size),
                           served_name or spec, "zoo")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec)
    safe = dict(local_files_only=True, trust_remote_code=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **safe)
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **safe)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: transformers could not load it without the hub or remote "
                         f"code: {err}") from None
    return ServedModel(model.eval(), tokenizer, served_name or path.resolve().name, str(path))
