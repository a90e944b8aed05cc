"""Model set-up: a from-scratch Llama-architecture model with its own BPE tokenizer, or a
pretrained model with the 14 reasoning tokens added and initialised from their descriptive
words.

Why Llama and not Qwen2 for from-scratch models: transformers 5 loads any ``qwen2``
checkpoint's tokenizer as ``Qwen2Tokenizer``, which rebuilds the pre-tokenizer with Qwen's own
rules (one token per digit, its word regex) and ignores the one saved in ``tokenizer.json``:
a model trained with our tokenizer would be fed other tokens after ``from_pretrained``. For a
``llama`` checkpoint whose ``tokenizer_config.json`` names ``TokenizersBackend``, AutoTokenizer
loads ``tokenizer.json`` exactly as saved. The two architectures are the same decoder (RMSNorm,
RoPE, SwiGLU, grouped-query attention) but for Qwen2's q/k/v biases."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from steiner.format import (
    CHATML_TOKENS,
    SPECIAL_TOKENS,
    add_reasoning_tokens,
    reasoning_token_ids,
)
from steiner.infer.adapters import token_row_weights
from steiner.io import (
    InputError,
    check_at_least,
    check_model_dir,
    check_output_dir,
    check_share,
    is_plain_text,
    read_text_input,
    source_rows,
    write_json,
)

# hidden, layers, heads, kv heads, MLP width, default vocab: about 0.6M, 1M, 10M and 50M
# parameters
PRESETS: dict[str, dict[str, int]] = {
    # the size that learns path-star search on a 2-core CPU in minutes (graph domain)
    "micro": dict(
        hidden_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        # a key-value head per query head: the graph's edge look-up is a copy through
        # attention, and with 2 shared heads the CPT formed it near step 1,000 or not at all,
        # with 4 by step 550-650 at every seed tried (README, Results)
        num_key_value_heads=4,
        intermediate_size=384,
        vocab_size=512,
    ),
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=384,
        vocab_size=1024,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=768,
        vocab_size=4096,
    ),
    "base": dict(
        hidden_size=512,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=2048,
        vocab_size=8192,
    ),
}


def corpus_texts(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Every string a tokenizer should learn from: message contents, questions, steps and
    "text" fields of records (a file or a ``datasets`` source), or the lines of a plain-text
    file."""
    for path in paths:
        texts = [t for t in _file_texts(path) if t.strip()]
        if not texts:
            # else a tokenizer of bytes alone, trained on nothing, with no word of it
            raise InputError(
                path,
                None,
                "no text for the tokenizer; expected chat records ('messages'), records with "
                "'text', 'question', 'answer' or 'steps', or lines of plain text",
            )
        yield from texts


def _file_texts(path: str | os.PathLike) -> Iterator[str]:
    if is_plain_text(path):
        yield from read_text_input(path).splitlines()
        return
    for _, rec in source_rows(path, "train"):  # a record file, or a `datasets` source
        messages = rec.get("messages")
        for msg in messages if isinstance(messages, list) else []:
            # any strings will do for a tokenizer; the training stages check the shape
            content = msg.get("content") if isinstance(msg, dict) else msg
            if isinstance(content, str):
                yield content
        for key in ("text", "question", "answer"):
            if isinstance(rec.get(key), str):
                yield rec[key]
        yield from (s for s in rec.get("steps") or [] if isinstance(s, str))


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, split_digits: bool = True
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the data, plus the 14 tokens and ChatML.

    ``split_digits`` makes every digit its own token (arithmetic generalises better);
    turn it off where numbers are names (graph node ids): byte-level pre-tokenization keeps
    " 12" (with its leading space) in one piece, so a frequent id becomes one token."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", *CHATML_TOKENS, *SPECIAL_TOKENS]
    # The special strings are removed before training so BPE does not learn their pieces.
    pattern = re.compile("|".join(re.escape(t) for t in special))
    # The ChatML role words join the corpus so each becomes one token: a tiny model then sees
    # "<|im_start|> assistant \n" as three tokens and learns where its answer starts.
    roles = ["system\nuser\nassistant\n"] * 1000
    tok.train_from_iterator(
        itertools.chain(roles, (pattern.sub(" ", t) for t in texts)),
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=8192)
    hf.pad_token = "<|endoftext|>"
    add_reasoning_tokens(hf)
    return hf


def build_model(
    preset: str, tokenizer: Any, max_positions: int = 8192, seed: int = 0
) -> LlamaForCausalLM:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    dims = {k: v for k, v in PRESETS[preset].items() if k != "vocab_size"}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        bos_token_id=None,
        **dims,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def descriptive_words(token: str) -> str:
    """``<|reasoning_step_summary_start|>`` -> ``reasoning step summary start``."""
    words = token.strip("<|>").replace("_", " ")
    return {"im start": "message start", "im end": "message end", "endoftext": "end of text"}.get(
        words, words
    )


def model_dtype(bf16: bool | None) -> torch.dtype | str:
    """The dtype a stage loads its model in. Under --bf16, the checkpoint's own, as TRL loads
    it: the Trainer's bf16 is an autocast, so an fp32 checkpoint (``steiner train init``
    writes one) trains fp32 weights and optimizer under it, and a bf16 one (most on the Hub)
    its bf16 weights. Without it fp32, the CPU's fast path. Before, SFT and CPT under --bf16
    cast every checkpoint to bf16, so Steiner's own fp32 models trained with no fp32 copy of
    the weights to keep the small updates, and RL cast every one to fp32."""
    return "auto" if bf16 else torch.float32


def check_lora_settings(cfg: Any) -> None:
    """The LoRA settings of a stage's config (SFT, CPT or RL) that no run could use, as one
    error line before anything loads."""
    check_at_least(cfg, (("lora_r", 1, ""),))
    check_share(cfg, ("lora_dropout",))
    if cfg.lora_target_modules and not cfg.use_lora:  # it would be passed over
        raise InputError("--lora_target_modules", None, "expected --use_lora true with it")


def add_lora(model: Any, cfg: Any) -> Any:
    """``model`` with LoRA adapters as ``cfg`` sets them (``lora_r``, ``lora_alpha``,
    ``lora_dropout``, ``lora_target_modules``: TRL's ModelConfig names; ``seed``), for the SFT,
    CPT and RL stages alike. A module name the model lacks is one error line."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    # the adapter's initial weights are drawn here, before a Trainer seeds itself: an
    # unseeded draw gave every run of one command another model
    set_seed(cfg.seed)
    targets = cfg.lora_target_modules
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        # peft reads "all-linear" as a string only (in a list it is a module's name)
        target_modules=targets if targets and targets != ["all-linear"] else "all-linear",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:  # a module name the model does not have
        raise InputError("--lora_target_modules", None, " ".join(str(exc).split())) from None


def add_tokens_to_pretrained(model: Any, tokenizer: Any) -> list[int]:
    """Add the reasoning tokens to a pretrained model and initialise each new embedding
    (input and, when untied, output) as the mean of its descriptive words' embeddings.
    Returns the new token ids."""
    before = set(tokenizer.get_vocab())
    words = {
        t: tokenizer.encode(descriptive_words(t), add_special_tokens=False)
        for t in (*CHATML_TOKENS, *SPECIAL_TOKENS, "<|endoftext|>")
    }
    add_reasoning_tokens(tokenizer)
    new_tokens = [t for t in tokenizer.get_vocab() if t not in before]
    model.resize_token_embeddings(len(tokenizer))
    new_ids = [tokenizer.convert_tokens_to_ids(t) for t in new_tokens]
    embeddings = list(token_row_weights(model).values())
    n_old = len(before)
    with torch.no_grad():
        for token, token_id in zip(new_tokens, new_ids, strict=True):
            ids = words.get(token) or []
            for weight in embeddings:
                # no descriptive words (an exotic tokenizer): the mean of all old rows
                weight[token_id] = weight[ids].mean(0) if ids else weight[:n_old].mean(0)
    model.config.vocab_size = len(tokenizer)
    return new_ids


def reset_unseen_tokens(model: Any, seen: torch.Tensor) -> int:
    """Give each token that ``seen`` (one bool per embedding row) marks absent the mean
    embedding of the present ones, input and, when untied, output, as transformers'
    ``mean_resizing`` starts added tokens. Returns how many rows were reset.

    Why: CPT on text without the chat and reasoning tokens trains a from-scratch model's
    logits for them far down, so its SFT started at loss ~11 and, at some seeds, the first
    steps' updates undid CPT's edge look-up (README, Results)."""
    embeddings = list(token_row_weights(model).values())
    if any(w.ndim != 2 or w.shape[0] != seen.shape[0] for w in embeddings):
        # ZeRO-3 keeps a shard per process: the rows are not all here to average
        raise InputError(
            "--reset_unseen_tokens",
            None,
            "expected the whole embedding matrix in this process (not sharded by ZeRO-3/FSDP); "
            "the checkpoints are kept: run again without it to save the model",
        )
    if not seen.any():
        return 0
    with torch.no_grad():
        for weight in embeddings:
            weight[~seen] = weight[seen].mean(0)
    return int((~seen).sum())


def init_model(
    out: str | os.PathLike,
    preset: str = "tiny",
    data: list[str] | None = None,
    from_pretrained: str | None = None,
    vocab_size: int | None = None,
    split_digits: bool = True,
    max_positions: int = 8192,
    seed: int = 0,
) -> dict[str, Any]:
    """Create and save a model + tokenizer (``save_pretrained``); returns a summary."""
    out = Path(out)
    check_output_dir(out, "--out")  # before the tokenizer's training, not at the save
    if from_pretrained:
        check_model_dir(
            from_pretrained,
            "--from_pretrained",
            "save_pretrained, or a Hub snapshot",
            reasoning=False,  # init adds the reasoning tokens
        )
        tokenizer = AutoTokenizer.from_pretrained(from_pretrained)
        model = AutoModelForCausalLM.from_pretrained(from_pretrained, dtype=torch.float32)
        new_ids = add_tokens_to_pretrained(model, tokenizer)
        origin = f"pretrained {from_pretrained}"
    else:
        if not data:
            raise ValueError("a from-scratch model needs --data to train its tokenizer on")
        size = vocab_size or PRESETS[preset]["vocab_size"]
        tokenizer = train_tokenizer(corpus_texts(data), size, split_digits)
        model = build_model(preset, tokenizer, max_positions, seed)
        new_ids = reasoning_token_ids(tokenizer)
        origin = f"preset {preset}"
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {
        "origin": origin,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "new_token_ids": new_ids,
    }
    write_json(out / "steiner_init.json", summary)
    return summary
