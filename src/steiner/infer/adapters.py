"""A LoRA run's checkpoint (``--use_lora``) loaded as a model, so that ``eval``, ``scale``,
``generate`` and ``serve`` take ``DIR/checkpoint-N`` as they take a full fine-tune's.

Such a checkpoint holds PEFT's adapter and, beside it, the 14 reasoning tokens' embedding
rows, which train outside the adapter (``steiner.train.trainer.train_rows_only``): the model
is the base model, with those rows put back and the adapter merged in."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from steiner.format import reasoning_token_ids
from steiner.io import InputError

ADAPTER_CONFIG = "adapter_config.json"
TOKEN_ROWS_FILE = "new_token_rows.safetensors"
# the run's record, one folder up, with its --model as an absolute path: SFT/CPT's, RL's
RUN_SETTINGS = ("train_settings.json", "rl_settings.json")


def is_adapter_checkpoint(path: str | os.PathLike) -> bool:
    """A LoRA checkpoint: an adapter and no model of its own (a run's final folder holds the
    merged model and config.json)."""
    folder = Path(path)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def token_row_weights(model: Any) -> dict[str, torch.Tensor]:
    """The matrices that hold a row per token: the input embeddings, and the head if untied."""
    weights = {"embed_tokens": model.get_input_embeddings().weight}
    head = model.get_output_embeddings()
    if head is not None and head.weight is not weights["embed_tokens"]:
        weights["lm_head"] = head.weight
    return weights


def save_token_rows(model: Any, ids: list[int], checkpoint: str | os.PathLike) -> None:
    """Write the rows of ``ids`` in the input embeddings (and an untied head) beside a LoRA
    checkpoint's adapter, which does not hold them."""
    from safetensors.torch import save_file

    weights = token_row_weights(model)
    if any(w.dim() != 2 or w.shape[0] <= max(ids) for w in weights.values()):
        # a sharded weight (ZeRO-3, FSDP: untried, no GPU here) holds no whole rows; the
        # checkpoint goes without them, and resuming from it says so in one line
        return
    rows = {name: w.detach()[ids].cpu().contiguous() for name, w in weights.items()}
    save_file(rows, os.path.join(checkpoint, TOKEN_ROWS_FILE))


def load_token_rows(model: Any, ids: list[int], checkpoint: str | os.PathLike) -> None:
    """Put a LoRA checkpoint's trained token rows back: without them a resumed run went on
    from the initial rows, and a finished stage run again saved a model without its training
    of the 14 tokens."""
    from safetensors.torch import load_file

    path = os.path.join(checkpoint, TOKEN_ROWS_FILE)
    if not os.path.isfile(path):
        raise InputError(
            checkpoint,
            None,
            f"expected {TOKEN_ROWS_FILE} beside the LoRA adapter (the 14 new tokens' trained "
            "rows; checkpoints written before Steiner saved them lack it): start the stage "
            "over in a new --output_dir",
        )
    rows = load_file(path)
    with torch.no_grad():
        for name, weight in token_row_weights(model).items():
            weight[ids] = rows[name].to(weight.device, weight.dtype)


def base_model_dir(checkpoint: str | os.PathLike) -> str:
    """The adapter's base model. PEFT records it as the run's ``--model`` was written, often
    relative to where the run was started; from elsewhere, the run's own record
    (``train_settings.json`` or ``rl_settings.json``, its absolute path) finds it."""
    folder = Path(checkpoint)
    try:
        base = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))[
            "base_model_name_or_path"
        ]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(
            folder / ADAPTER_CONFIG, None, "expected PEFT's adapter config with its base model"
        ) from None
    candidates = [str(base)] if base else []
    for record in (folder.parent / name for name in RUN_SETTINGS):
        try:
            candidates.append(str(json.loads(record.read_text(encoding="utf-8"))["model"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none, or a hand-edited one: the adapter's own path is all there is
    found = next((c for c in candidates if (Path(c) / "config.json").is_file()), None)
    if found is None:
        raise InputError(
            folder / ADAPTER_CONFIG,
            None,
            f"the LoRA adapter's base model {base!r} is not a model directory here "
            f"(nor is the run's --model in {' or '.join(RUN_SETTINGS)}); expected the model "
            "the run trained from",
        )
    return found


def load_adapter_checkpoint(
    checkpoint: str | os.PathLike, tokenizer: Any, **from_pretrained: Any
) -> Any:
    """The base model with the checkpoint's token rows and merged adapter (``tokenizer``: the
    checkpoint's, for the 14 tokens' ids)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model_dir(checkpoint), **from_pretrained)
    load_token_rows(model, reasoning_token_ids(tokenizer), checkpoint)
    return PeftModel.from_pretrained(model, str(checkpoint)).merge_and_unload()
