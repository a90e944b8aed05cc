"""Stages 1-2 on CPU with a tiny model: init, CPT, SFT, resume, shortcut baseline, LoRA."""

import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainerCallback,
)

from steiner.format import REASONING_START, SPECIAL_TOKENS, parse
from steiner.io import InputError, settings_differences
from steiner.train.config import CPTStageConfig, SFTStageConfig
from steiner.train.data import sft_dataset
from steiner.train.model import descriptive_words, init_model
from steiner.train.rewards import RewardWeights
from steiner.train.rl import RLStageConfig, run_rl
from steiner.train.trainer import run_cpt, run_sft, shared_tied_keys


def steiner(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "steiner.cli", *args], capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    shortcut = tmp / "shortcut.jsonl"
    assert (
        steiner(
            "countdown",
            "generate",
            "--n-numbers",
            "3",
            "--count",
            "60",
            "--seed",
            "4",
            "--shortcut",
            "--out",
            str(shortcut),
        ).returncode
        == 0
    )
    assert (
        steiner(
            "synth",
            "--shortcut",
            str(shortcut),
            "--out",
            str(tmp / "synth"),
            "--paths-per-dag",
            "3",
        ).returncode
        == 0
    )
    proc = steiner(
        "train",
        "init",
        "--preset",
        "tiny",
        "--data",
        str(tmp / "synth" / "paths.jsonl"),
        "--out",
        str(tmp / "init"),
    )
    assert proc.returncode == 0, proc.stderr
    return tmp


def quick(cls, tmp, name, **kw):
    base = dict(
        output_dir=str(tmp / name),
        logging_steps=2,
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=3e-3,
    )
    return cls(**{**base, **kw})


def test_cpt_then_sft_learns_and_reloads(data):
    history: list[dict] = []

    class KeepLogs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            history.append(dict(logs or {}))

    paths = str(data / "synth" / "paths.jsonl")
    cpt = run_cpt(
        quick(
            CPTStageConfig,
            data,
            "cpt",
            model=str(data / "init"),
            paths=[paths],
            countdown_facts=400,
            max_steps=8,
        ),
        callbacks=[KeepLogs()],
    )
    assert cpt["final_loss"] < cpt["first_loss"]
    *steps, summary = history
    # the first log has a rate too: its clock starts when training does
    assert len(steps) > 1 and all(log["tokens_per_s"] > 0 for log in steps)
    assert "train_runtime" in summary and "tokens_per_s" not in summary  # not a rate of 0
    sft = run_sft(
        quick(SFTStageConfig, data, "sft", model=str(data / "cpt"), data=paths, max_steps=120)
    )
    assert sft["final_loss"] < sft["first_loss"]
    assert sft["tokens_seen"] > 0 and sft["tokens_per_s"] > 0
    tok = AutoTokenizer.from_pretrained(data / "sft")
    model = AutoModelForCausalLM.from_pretrained(data / "sft")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Using the numbers 3, 5, 7, reach 22."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :])
    assert text.startswith(REASONING_START), text
    summary = json.loads((data / "sft" / "training_summary.json").read_text())
    assert summary["steps"] == 120


class Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise KeyboardInterrupt


class RecordStart(TrainerCallback):
    def __init__(self):
        self.seen = None

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.seen is None:
            param = next(p for g in optimizer.param_groups for p in g["params"])
            self.seen = (state.global_step, int(optimizer.state[param]["step"]))


def checkpointed(data, max_steps: int, save_steps: int) -> dict:
    """SFT settings from the tiny init model that save a checkpoint every save_steps."""
    return dict(
        model=str(data / "init"),
        data=str(data / "synth" / "paths.jsonl"),
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=save_steps,
    )


def test_resume_restores_step_and_optimizer(data):
    cfg = checkpointed(data, max_steps=8, save_steps=3)
    with pytest.raises(KeyboardInterrupt):
        run_sft(quick(SFTStageConfig, data, "resume", **cfg), callbacks=[Interrupt()])
    state = json.loads((data / "resume" / "checkpoint-3" / "trainer_state.json").read_text())
    earlier = state["stateful_callbacks"]["TrainTime"]["args"]["earlier"]
    # a checkpoint the crash cut short while it was being written: no trainer_state.json yet
    half = data / "resume" / "checkpoint-6"
    half.mkdir()
    shutil.copy(data / "resume" / "checkpoint-3" / "config.json", half)
    record = RecordStart()
    summary = run_sft(quick(SFTStageConfig, data, "resume", **cfg), callbacks=[record])
    assert summary["resumed_from"].endswith("checkpoint-3")
    assert record.seen == (3, 3)  # global step and Adam's step count came back from the checkpoint
    assert summary["steps"] == 8
    # the training time of the first run's three saved steps came back from the checkpoint too
    assert earlier > 0
    total = summary["train_seconds_all_runs"]
    assert total == pytest.approx(earlier + summary["train_seconds"], abs=0.02)
    # and a later checkpoint carries the time of the steps before it, over both runs
    state = json.loads((data / "resume" / "checkpoint-6" / "trainer_state.json").read_text())
    assert earlier < state["stateful_callbacks"]["TrainTime"]["args"]["earlier"] <= total
    # a checkpoint goes on only from the same model and data (one error line, before the model
    # loads); hyperparameters may change, as with Trainer's resume_from_checkpoint
    with pytest.raises(InputError, match="limit_problems: None there, 10 here") as err:
        run_sft(quick(SFTStageConfig, data, "resume", **cfg, limit_problems=10))
    assert err.value.path == str(data / "resume" / "train_settings.json")
    with pytest.raises(InputError, match="'sft' there, 'sft-shortcut' here"):
        shortcuts = cfg | {"data": str(data / "shortcut.jsonl")}
        run_sft(quick(SFTStageConfig, data, "resume", **shortcuts, shortcut=True))
    more = run_sft(quick(SFTStageConfig, data, "resume", **(cfg | {"max_steps": 9})))
    assert more["resumed_from"].endswith("checkpoint-8") and more["steps"] == 9
    # the data are checked by content, not by path: a moved file resumes, an edited one does not
    moved = data / "resume-moved" / "paths.jsonl"
    moved.parent.mkdir()
    shutil.copy(cfg["data"], moved)
    onward = cfg | {"data": str(moved), "max_steps": 10}
    assert run_sft(quick(SFTStageConfig, data, "resume", **onward))["resumed_from"].endswith(
        "checkpoint-9"
    )
    lines = moved.read_text().splitlines(keepends=True)
    moved.write_text("".join(lines[1:] + lines[:1]))  # the same records in another order
    with pytest.raises(InputError, match="data_sha256: '[0-9a-f]{16}' there, '[0-9a-f]{16}' here"):
        run_sft(quick(SFTStageConfig, data, "resume", **(onward | {"max_steps": 11})))
    # starting over writes the new inputs down
    again = quick(SFTStageConfig, data, "resume", **cfg, limit_problems=10, resume=False)
    assert run_sft(again)["resumed_from"] is None
    settings = json.loads((data / "resume" / "train_settings.json").read_text())
    assert settings["limit_problems"] == 10 and settings["model"] == str(data / "init")


def test_resume_from_checkpoint_goes_on_from_that_checkpoint_into_output_dir(data, tmp_path):
    cfg = checkpointed(data, max_steps=4, save_steps=2)
    run_sft(quick(SFTStageConfig, tmp_path, "first", **cfg))
    given = str(tmp_path / "first" / "checkpoint-2")
    # before: transformers' flag was accepted and passed over, so this trained from step 0
    record = RecordStart()
    onward = cfg | {"max_steps": 5, "resume_from_checkpoint": given}
    summary = run_sft(quick(SFTStageConfig, tmp_path, "second", **onward), callbacks=[record])
    assert summary["resumed_from"] == given and record.seen == (2, 2)
    assert summary["steps"] == 5 and (tmp_path / "second" / "model.safetensors").is_file()
    for where, message in (
        (str(tmp_path / "first"), "expected a checkpoint directory with trainer_state.json"),
        (given, "give a checkpoint of this stage's model and data"),  # other data
    ):
        other = onward | {"resume_from_checkpoint": where, "limit_problems": 10}
        with pytest.raises(InputError, match=re.escape(message)):
            run_sft(quick(SFTStageConfig, tmp_path, "third", **other))
    assert not (tmp_path / "third").exists()


def test_shortcut_sft_data_may_be_a_datasets_directory_or_name(tmp_path):
    # the baseline reads shortcut records from `datasets` too; the resume record's digest said
    # "cannot open: Is a directory" (or "No such file" for a Hub name) before any work
    from datasets import Dataset

    from steiner.train.trainer import stage_inputs

    Dataset.from_list([{"nums": [3, 4], "target": 7}]).save_to_disk(tmp_path / "ds")
    config = lambda data: SFTStageConfig(model="m", data=data, shortcut=True)  # noqa: E731
    inputs = stage_inputs(config(str(tmp_path / "ds")), "sft-shortcut")
    assert inputs["data"] == str(tmp_path / "ds") and len(inputs["data_sha256"]) == 16
    inputs = stage_inputs(config("someone/countdown"), "sft-shortcut")
    assert inputs["data"] == "someone/countdown" and "data_sha256" not in inputs


def test_sft_chat_data_may_be_a_datasets_directory_with_splits(tmp_path):
    # as TRL's dataset_name: before, "cannot open: Is a directory"
    from datasets import Dataset, DatasetDict

    chat = lambda answer: {  # noqa: E731
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]
    }
    DatasetDict(
        {"train": Dataset.from_list([chat("a"), chat("b")]), "test": Dataset.from_list([chat("c")])}
    ).save_to_disk(tmp_path / "chats")
    assert sft_dataset(str(tmp_path / "chats"))["messages"] == [
        chat("a")["messages"],
        chat("b")["messages"],
    ]
    assert sft_dataset(str(tmp_path / "chats"), split="test")["messages"] == [chat("c")["messages"]]
    user_only = {"messages": [{"role": "user", "content": "q"}]}
    Dataset.from_list([chat("a"), user_only]).save_to_disk(tmp_path / "bad")
    with pytest.raises(InputError, match=r"bad:2: expected an 'assistant' message"):
        sft_dataset(str(tmp_path / "bad"))


def test_a_record_from_before_data_digests_compares_paths():
    old = {"data": "/a/paths.jsonl"}
    moved = {"data": "/b/paths.jsonl", "data_sha256": "0123456789abcdef"}
    assert settings_differences(old, moved, {}) == (
        "data: '/a/paths.jsonl' there, '/b/paths.jsonl' here"
    )
    assert settings_differences(old, moved | {"data": "/a/paths.jsonl"}, {}) == ""
    # with a digest on both sides the path no longer matters, the content does
    assert settings_differences(moved | {"data": "/a/paths.jsonl"}, moved, {}) == ""
    assert "data_sha256" in settings_differences(moved | {"data_sha256": "f" * 16}, moved, {})


def test_shortcut_baseline_and_token_budget(data):
    ds = sft_dataset(str(data / "shortcut.jsonl"), shortcut=True)
    assert len(ds) == 60
    for row in ds:
        trace, _ = parse(row["messages"][1]["content"], strict=True)
        assert trace.n_backtracks == 0 and trace.n_steps == 2
    summary = run_sft(
        quick(
            SFTStageConfig,
            data,
            "budget",
            model=str(data / "init"),
            data=str(data / "shortcut.jsonl"),
            shortcut=True,
            max_train_tokens=2000,
            max_steps=100,
            per_device_train_batch_size=4,
        )
    )
    assert 2000 <= summary["tokens_seen"] < 2000 + 4 * 200  # stopped within one step of the budget
    assert summary["steps"] < 100


@pytest.mark.parametrize("stage", ["sft", "cpt"])
def test_plain_loss_matches_trls_chunked_lm_head(data, stage):
    """The model's own cross-entropy (the small-vocabulary default) trains exactly as TRL's
    chunked head: the same losses, token metrics and weights, on padded SFT batches and
    packed CPT rows."""
    paths = str(data / "synth" / "paths.jsonl")
    runs = {}
    for fused in (None, True):
        name = f"{stage}-fused-{fused}"
        common = dict(model=str(data / "init"), max_steps=3, fused_lm_head=fused, logging_steps=1)
        if stage == "sft":
            cfg = quick(SFTStageConfig, data, name, data=paths, **common)
            runs[fused] = run_sft(cfg)
        else:
            cfg = quick(CPTStageConfig, data, name, paths=[paths], countdown_facts=200, **common)
            runs[fused] = run_cpt(cfg)
    plain, chunked = runs[None], runs[True]
    assert plain["fused_lm_head"] is False and chunked["fused_lm_head"] is True
    for a, b in zip(plain["log_history"][:3], chunked["log_history"][:3], strict=True):
        for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    weights = [
        AutoModelForCausalLM.from_pretrained(data / f"{stage}-fused-{fused}").state_dict()
        for fused in (None, True)
    ]
    for key, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][key], rtol=1e-4, atol=1e-5)


def test_other_loss_types_keep_trls_lm_head(data):
    common = dict(model=str(data / "init"), data=str(data / "synth" / "paths.jsonl"), max_steps=1)
    dft = run_sft(quick(SFTStageConfig, data, "dft", loss_type="dft", **common))
    assert dft["fused_lm_head"] is True  # the small vocabulary's default would be the plain loss
    with pytest.raises(InputError, match="--loss_type nll"):
        run_sft(quick(SFTStageConfig, data, "dft2", loss_type="dft", fused_lm_head=False, **common))


def plain_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = " ".join(descriptive_words(t) for t in SPECIAL_TOKENS) + " message start end of text"
    tok.train_from_iterator(
        [words] * 10 + ["some other text 1 2 3"] * 10,
        trainers.BpeTrainer(
            vocab_size=120,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    hf.eos_token = "<|endoftext|>"
    return hf


def test_from_pretrained_initialises_new_rows_from_descriptive_words(tmp_path):
    tok = plain_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "pre")
    tok.save_pretrained(tmp_path / "pre")
    old = Qwen2ForCausalLM.from_pretrained(tmp_path / "pre")
    old_in = old.get_input_embeddings().weight.detach().clone()
    old_out = old.get_output_embeddings().weight.detach().clone()
    init_model(tmp_path / "new", from_pretrained=str(tmp_path / "pre"))
    new_tok = AutoTokenizer.from_pretrained(tmp_path / "new")
    new = AutoModelForCausalLM.from_pretrained(tmp_path / "new")
    assert len(new_tok) == len(tok) + 16  # 14 reasoning tokens + 2 ChatML
    assert new.get_input_embeddings().weight.shape[0] == len(new_tok)
    for token in SPECIAL_TOKENS:
        ids = new_tok.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] >= len(tok)
        words = tok.encode(descriptive_words(token), add_special_tokens=False)
        assert torch.allclose(new.get_input_embeddings().weight[ids[0]], old_in[words].mean(0))
        assert torch.allclose(new.get_output_embeddings().weight[ids[0]], old_out[words].mean(0))
    assert torch.equal(new.get_input_embeddings().weight[: len(tok)], old_in)


def test_lora_trains_new_token_rows_and_saves_a_plain_model(data):
    before = (
        AutoModelForCausalLM.from_pretrained(data / "init").get_input_embeddings().weight.clone()
    )
    run_sft(
        quick(
            SFTStageConfig,
            data,
            "lora",
            model=str(data / "init"),
            max_steps=3,
            data=str(data / "synth" / "paths.jsonl"),
            use_lora=True,
        )
    )
    after = AutoModelForCausalLM.from_pretrained(data / "lora").get_input_embeddings().weight
    tok = AutoTokenizer.from_pretrained(data / "lora")
    start = tok.convert_tokens_to_ids(REASONING_START)
    assert not torch.allclose(after[start], before[start])
    other = tok.encode("7", add_special_tokens=False)[0]
    assert torch.allclose(after[other], before[other])  # old rows stay frozen under LoRA


def checkpointed_sft(data, out: Path, **kw) -> SFTStageConfig:
    """A short SFT into ``out`` that checkpoints every step."""
    return quick(
        SFTStageConfig,
        data,
        out.name,
        **{
            "output_dir": str(out),
            "model": str(data / "init"),
            "max_steps": 2,
            "save_strategy": "steps",
            "save_steps": 1,
            "data": str(data / "synth" / "paths.jsonl"),
            **kw,
        },
    )


def test_lora_target_modules_choose_where_the_adapters_go(data, tmp_path):
    # TRL's ModelConfig field: before, every linear layer, and the flag was unknown
    out = tmp_path / "qv"
    run_sft(
        checkpointed_sft(
            data, out, max_steps=1, use_lora=True, lora_target_modules=["q_proj", "v_proj"]
        )
    )
    adapter = json.loads((out / "checkpoint-1" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    with pytest.raises(InputError, match="Target modules {'qq_proj'} not found") as err:
        run_sft(
            checkpointed_sft(data, tmp_path / "qq", use_lora=True, lora_target_modules=["qq_proj"])
        )
    assert err.value.path == "--lora_target_modules"
    with pytest.raises(InputError, match="expected --use_lora true with it"):
        checkpointed_sft(data, tmp_path / "plain", lora_target_modules=["q_proj"])


def test_a_lora_run_resumed_from_its_checkpoint_ends_as_the_uninterrupted_run(data, tmp_path):
    """The 14 token rows train outside the adapter, so a checkpoint held the adapter alone: a
    resumed run went on from the initial rows, and a re-run of a finished stage saved a model
    without them. The adapter's initial weights were drawn unseeded, so no two runs agreed."""
    from safetensors.torch import load_file

    whole, halves = tmp_path / "whole", tmp_path / "halves"
    two_steps = checkpointed_sft(data, halves, use_lora=True)
    run_sft(checkpointed_sft(data, whole, use_lora=True))
    # stopped after its first step, whose learning rate is the schedule's peak at any length
    run_sft(checkpointed_sft(data, halves, max_steps=1, use_lora=True))
    assert run_sft(two_steps)["resumed_from"] == str(halves / "checkpoint-1")
    expected = load_file(whole / "model.safetensors")
    init = load_file(data / "init" / "model.safetensors")
    got = load_file(halves / "model.safetensors")
    assert not torch.equal(expected["model.embed_tokens.weight"], init["model.embed_tokens.weight"])
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert run_sft(two_steps)["resumed_from"] == str(halves / "checkpoint-2")
    again = load_file(halves / "model.safetensors")  # the finished stage, run again
    assert all(torch.equal(expected[k], again[k]) for k in expected)
    # a checkpoint without the rows (written before they were saved) is not resumed quietly
    (halves / "checkpoint-2" / "new_token_rows.safetensors").unlink()
    with pytest.raises(InputError, match="expected new_token_rows.safetensors beside the LoRA"):
        run_sft(two_steps)


def test_a_lora_checkpoint_loads_as_the_model_of_its_step(data, tmp_path, monkeypatch):
    """eval, scale, generate and serve take a LoRA run's checkpoint-N as a model: before,
    "expected a model directory with config.json" (it holds the adapter and the token rows)."""
    from steiner.infer.generate import load

    out = tmp_path / "lora"
    monkeypatch.chdir(data)  # --model as typed there, relative: PEFT records it so
    run_sft(checkpointed_sft(data, out, use_lora=True, model="init"))
    monkeypatch.chdir(tmp_path)  # from elsewhere, the run's own record finds the base model
    final = AutoModelForCausalLM.from_pretrained(out).state_dict()
    last, _ = load(out / "checkpoint-2")
    assert all(torch.allclose(final[k], v, atol=1e-6) for k, v in last.state_dict().items())
    first, _ = load(out / "checkpoint-1")
    rows = "model.embed_tokens.weight"  # the 14 tokens' rows, put back from the checkpoint
    assert not torch.allclose(first.state_dict()[rows], final[rows])
    proc = subprocess.run(
        [sys.executable, "-m", "steiner.cli", "generate", "--model", str(out / "checkpoint-1"),
         "--max-new-tokens", "4", "Find a path from 1 to 2."],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (out / "train_settings.json").unlink()
    with pytest.raises(InputError, match="the LoRA adapter's base model 'init' is not a model"):
        load(out / "checkpoint-1")


@pytest.mark.parametrize("use_lora", [False, True])
def test_sft_bf16_is_autocast_over_fp32_weights(data, tmp_path, layer_dtypes, use_lora):
    """--bf16 as Transformers' Trainer and TRL mean it: an autocast over the checkpoint's own
    weights, so Steiner's fp32 models train fp32 weights and optimizer with the layers computing
    in bf16. Before, SFT cast every checkpoint to bf16 and trained the bf16 weights themselves
    (no fp32 master copy), unlike RL's --bf16 and TRL's."""
    from safetensors.torch import load_file

    out = tmp_path / "sft"
    summary = run_sft(
        quick(SFTStageConfig, tmp_path, "sft", model=str(data / "init"),
              data=str(data / "synth" / "paths.jsonl"), max_steps=2, bf16=True,
              use_lora=use_lora)
    )  # fmt: skip
    assert summary["steps"] == 2
    assert layer_dtypes == {(torch.float32, torch.bfloat16)}
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}
    # a bf16 checkpoint (most on the Hub) trains its bf16 weights, as TRL loads it
    AutoModelForCausalLM.from_pretrained(data / "init", dtype=torch.bfloat16).save_pretrained(
        tmp_path / "init-bf16"
    )
    AutoTokenizer.from_pretrained(data / "init").save_pretrained(tmp_path / "init-bf16")
    layer_dtypes.clear()
    run_sft(
        quick(SFTStageConfig, tmp_path, "sft-bf16", model=str(tmp_path / "init-bf16"),
              data=str(data / "synth" / "paths.jsonl"), max_steps=1, bf16=True,
              use_lora=use_lora)
    )  # fmt: skip
    assert layer_dtypes == {(torch.bfloat16, torch.bfloat16)}


@pytest.fixture
def fake_hub(monkeypatch):
    """A stand-in for the Hub's API: it records what each upload holds (the files, less the
    ignored ones) and fails the uploads while ``fail`` holds an error; no network is reached."""
    from concurrent.futures import Future

    from huggingface_hub import HfApi, RepoUrl

    hub = {"uploads": [], "fail": None}

    def upload_folder(self, *, folder_path, **kwargs):
        if hub["fail"] is not None and not kwargs.get("run_as_future"):
            raise hub["fail"]
        ignored = kwargs.get("ignore_patterns") or []
        files = {
            p.name
            for p in Path(folder_path).iterdir()
            if p.is_file() and not any(Path(p.name).match(pattern) for pattern in ignored)
        }
        hub["uploads"].append((files, kwargs))
        done: Future = Future()
        done.set_result(None)
        return done if kwargs.get("run_as_future") else None

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, name, **kw: RepoUrl(f"https://hf.co/{name}")
    )
    monkeypatch.setattr("huggingface_hub.repocard.RepoCard.validate", lambda self, *a, **k: None)
    return hub


def test_lora_with_push_to_hub_saves_and_uploads_the_merged_model_not_the_adapter(
    data, tmp_path, fake_hub
):
    """Trainer's checkpoint pushes copy the adapter into output_dir, and its own final push
    would upload the adapter: from_pretrained then read the merged model as an adapter."""
    out = tmp_path / "lora"
    run_sft(
        checkpointed_sft(data, out, use_lora=True, push_to_hub=True, hub_model_id="me/steiner-lora")
    )
    assert not (out / "adapter_config.json").exists()
    assert AutoModelForCausalLM.from_pretrained(out).get_input_embeddings() is not None
    *during, (final, kwargs) = fake_hub["uploads"]
    assert during and all("adapter_config.json" in files for files, _ in during)
    assert kwargs["repo_id"] == "me/steiner-lora"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= final
    assert not final & {"adapter_config.json", "adapter_model.safetensors"}
    assert "adapter_config.json" in kwargs["delete_patterns"]  # the checkpoints' copies go


def test_a_failed_final_push_keeps_the_model_and_summary_and_is_one_error_line(
    data, tmp_path, fake_hub
):
    """The model is saved before the push: losing the network at the end was a traceback
    that skipped the training summary. The same command again pushes it."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    out = tmp_path / "full"
    cfg = checkpointed_sft(data, out, push_to_hub=True, hub_model_id="me/steiner-full")
    fake_hub["fail"] = OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline.")
    with pytest.raises(
        InputError,
        match="trained and saved in .*, but the push to the Hub repo "
        "me/steiner-full failed \\(OfflineModeIsEnabled: Cannot reach",
    ):
        run_sft(cfg)
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 2
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    fake_hub["fail"] = None
    assert run_sft(cfg)["steps"] == 2  # no step trained again
    final, kwargs = fake_hub["uploads"][-1]
    assert "model.safetensors" in final and kwargs["repo_id"] == "me/steiner-full"


def test_the_same_sft_command_writes_the_same_files(data, tmp_path):
    """Only the clock may differ between two runs of one command. TRL's model card listed its
    tags in a set's order, which the interpreter's hash seed changes from run to run."""
    out, first = tmp_path / "sft", tmp_path / "first"
    args = [
        sys.executable, "-m", "steiner.cli", "train", "sft", "--model", str(data / "init"),
        "--data", str(data / "synth" / "paths.jsonl"), "--output_dir", str(out),
        "--max_steps", "2", "--save_steps", "1",
    ]  # fmt: skip
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run(args, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        if hash_seed == "1":
            out.rename(first)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    timed = {"trainer_state.json", "training_summary.json"}  # seconds and tokens per second
    differ = [f for f in files if (first / f).read_bytes() != (out / f).read_bytes()]
    assert all(f.name in timed for f in differ), differ
    assert "README.md" in {f.name for f in files}
    summaries = [json.loads((d / "training_summary.json").read_text()) for d in (first, out)]
    assert summaries[0]["final_loss"] == summaries[1]["final_loss"]


def test_train_cli_bad_flag_is_one_line(data):
    proc = steiner("train", "sft", "--model", str(data / "init"), "--bogus", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--bogus" in proc.stderr


def test_flags_of_older_transformers_and_trl_say_what_takes_their_place(tmp_path):
    # published recipes still write them; before, only "unknown option(s)"
    from steiner.cli import parse_stage_config

    with pytest.raises(InputError) as err:
        args = ["--output_dir", "u", "--warmup_ratio", "0.1", "--max-seq-length", "64", "--x"]
        parse_stage_config(SFTStageConfig, args, "steiner train sft")
    assert err.value.message == (
        "unknown option(s) --warmup_ratio, --max-seq-length, --x; for --warmup_ratio use "
        "--warmup_steps (a value below 1 is a share of the steps); for --max-seq-length use "
        "--max_length (newer transformers and TRL renamed or dropped them); "
        "`steiner train sft --help` lists them"
    )
    old = tmp_path / "old.yaml"
    old.write_text("output_dir: u\nevaluation_strategy: steps\n")
    with pytest.raises(InputError) as err:
        parse_stage_config(CPTStageConfig, ["--config", str(old)], "steiner train cpt")
    assert (err.value.path, err.value.message) == (
        str(old),
        "unknown config field(s) evaluation_strategy; for evaluation_strategy use eval_strategy "
        "(newer transformers and TRL renamed or dropped them); `steiner train cpt --help` "
        "lists them",
    )
    # RL has no warmup at all: no field to point at
    with pytest.raises(InputError) as err:
        parse_stage_config(RLStageConfig, ["--warmup_ratio", "0.1"], "steiner train rl")
    assert err.value.message == (
        "unknown option(s) --warmup_ratio; `steiner train rl --help` lists them"
    )


def test_a_trl_script_recipe_is_told_the_stages_names_for_its_fields(tmp_path):
    # a `trl sft|grpo --config` YAML names the model and dataset its own way; before, only
    # "unknown config field(s)"
    from steiner.cli import parse_stage_config

    recipe = tmp_path / "trl.yaml"
    recipe.write_text(
        "model_name_or_path: m\ndataset_name: d\nuse_peft: true\nnum_generations: 8\n"
        "max_completion_length: 64\nper_device_train_batch_size: 16\n"
    )
    listed = (
        "unknown config field(s) model_name_or_path, dataset_name, use_peft, num_generations, "
        "max_completion_length, per_device_train_batch_size; "
    )
    with pytest.raises(InputError) as err:
        parse_stage_config(RLStageConfig, ["--config", str(recipe)], "steiner train rl")
    assert (
        (err.value.path, err.value.message)
        == (
            str(recipe),
            listed + "for model_name_or_path use model; for dataset_name use problems; for "
            "use_peft use use_lora; "  # RL has LoRA too
            "for num_generations use group_size; for max_completion_length use max_new_tokens; for "
            "per_device_train_batch_size use prompts_per_step (a step samples it times group_size "
            "completions) (Steiner's names for fields of TRL's scripts); `steiner train rl --help` "
            "lists them",
        )
    )
    with pytest.raises(InputError) as err:
        args = ["--model_name_or_path", "m", "--dataset_config", "main", "--warmup_ratio", "0.1"]
        parse_stage_config(SFTStageConfig, args, "steiner train sft")
    assert err.value.message == (
        "unknown option(s) --model_name_or_path, --dataset_config, --warmup_ratio; for "
        "--warmup_ratio use --warmup_steps (a value below 1 is a share of the steps) (newer "
        "transformers and TRL renamed or dropped them); for --model_name_or_path use --model; "
        "for --dataset_config use --data NAME:CONFIG (Steiner's names for fields of TRL's "
        "scripts); `steiner train sft --help` lists them"
    )


def test_a_schedule_missing_or_given_a_wrong_setting_is_one_error_line():
    # each was a traceback at the first training step, after the model and data had loaded
    from steiner.cli import parse_stage_config

    for config, flags, said in (
        (
            SFTStageConfig,
            ["--lr_scheduler_type", "cosine_with_min_lr"],
            "cosine_with_min_lr: expected min_lr or min_lr_rate in it",
        ),
        (
            CPTStageConfig,
            ["--lr_scheduler_type", "warmup_stable_decay"],
            "warmup_stable_decay: expected num_decay_steps in it",
        ),
        (
            SFTStageConfig,
            ["--lr_scheduler_kwargs", '{"min_lr_ratio": 0.1}'],
            "cosine: min_lr_ratio is not a setting of it",
        ),
    ):
        with pytest.raises(InputError) as err:
            parse_stage_config(config, ["--output_dir", "u", *flags], "steiner train")
        assert (err.value.path, err.value.message) == (
            "--lr_scheduler_kwargs",
            f"for --lr_scheduler_type {said} (a JSON object of its settings)",
        )
    given = ["--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs"]
    cfg = parse_stage_config(
        SFTStageConfig, ["--output_dir", "u", *given, '{"min_lr_rate": 0.1}'], "x"
    )
    assert cfg.lr_scheduler_kwargs == {"min_lr_rate": 0.1}


def test_an_optimizer_without_its_package_or_an_unreported_best_metric_is_one_error_line():
    # a traceback at the first step, and at the first evaluation, before
    from transformers.utils import is_bitsandbytes_available

    from steiner.cli import parse_stage_config

    def refusal(config: type, *flags: str) -> tuple[str, str]:
        with pytest.raises(InputError) as err:
            parse_stage_config(config, ["--output_dir", "u", *flags], "steiner train")
        return err.value.path, err.value.message

    if not is_bitsandbytes_available():
        assert refusal(CPTStageConfig, "--optim", "adamw_bnb_8bit") == (
            "--optim",
            "adamw_bnb_8bit: You need to install `bitsandbytes` in order to use bitsandbytes "
            "optimizers: `pip install -U bitsandbytes`",
        )
    evaluated = ["--eval_data", "held.jsonl", "--eval_strategy", "steps"]
    best = ["--load_best_model_at_end", "true", "--metric_for_best_model"]
    assert refusal(SFTStageConfig, *evaluated, *best, "eval_accuracy") == (
        "--metric_for_best_model",
        "expected one of loss, mean_token_accuracy, entropy, num_tokens (what a stage's "
        "evaluation reports), got 'eval_accuracy'",
    )
    for metric in ("eval_mean_token_accuracy", "loss"):
        cfg = parse_stage_config(
            SFTStageConfig, ["--output_dir", "u", *evaluated, *best, metric], "x"
        )
        assert cfg.metric_for_best_model == metric
    assert (
        parse_stage_config(SFTStageConfig, ["--output_dir", "u", "--optim", "sgd"], "x").optim
        == "sgd"
    )


def test_a_missing_or_broken_config_file_is_one_error_line(tmp_path):
    from steiner.cli import parse_stage_config

    missing = tmp_path / "missing.yaml"
    with pytest.raises(InputError, match="cannot open: No such file") as err:
        parse_stage_config(SFTStageConfig, ["--config", str(missing)], "steiner train sft")
    assert err.value.path == str(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("max_steps: 10\nlearning_rate: [1e-3\n")
    with pytest.raises(InputError, match="invalid YAML") as err:
        parse_stage_config(SFTStageConfig, ["--config", str(broken)], "steiner train sft")
    assert (err.value.path, err.value.line) == (str(broken), 3)
    # unknown fields: which ones, in which file, and where the list is (TRL's own words
    # named its parser and advised setting `fail_with_unknown_args=False`)
    extra = tmp_path / "extra.yaml"
    extra.write_text("max_steps: 10\nlearning_rat: 1e-3\n")
    for config_args in (["--config", str(extra)], [f"--config={extra}"]):
        with pytest.raises(InputError) as err:
            parse_stage_config(SFTStageConfig, config_args, "steiner train sft")
        assert (err.value.path, err.value.message) == (
            str(extra),
            "unknown config field(s) learning_rat; `steiner train sft --help` lists them",
        )
    with pytest.raises(InputError) as err:
        parse_stage_config(SFTStageConfig, ["--bogus", "1", "--other"], "steiner train sft")
    assert err.value.message == (
        "unknown option(s) --bogus, --other; `steiner train sft --help` lists them"
    )


@pytest.mark.parametrize(
    "line, message",
    [
        # before: one training step, a float step count, a TypeError traceback
        ("max_steps: true", "field 'max_steps': Input should be a valid integer, got true"),
        ("max_steps: 2.5", "field 'max_steps': Input should be a valid integer, got 2.5"),
        ("output_dir: 2024", "field 'output_dir': Input should be a valid string, got 2024"),
        ("use_lora: 3", "field 'use_lora': Input should be a valid boolean, got 3"),
        ("paths: [a.jsonl, 3]", "field 'paths.1': Input should be a valid string, got"),
    ],
)
def test_config_file_values_of_the_wrong_type_are_one_error_line(tmp_path, line, message):
    from steiner.cli import parse_stage_config

    config = tmp_path / "cpt.yaml"
    config.write_text(f"model: runs/init\n{line}\n")
    with pytest.raises(InputError, match=re.escape(message)) as err:
        parse_stage_config(CPTStageConfig, ["--config", str(config)], "steiner train cpt")
    assert (err.value.path, err.value.line) == (str(config), 2)


def test_config_file_values_argparse_would_not_read_arrive_as_the_flags_give_them(tmp_path):
    from steiner.cli import parse_stage_config

    config = tmp_path / "cpt.yaml"
    # before: paths was the string, read one file per character
    config.write_text("model: runs/init\npaths: walks.jsonl\nlearning_rate: 1\nmax_steps: '7'\n")
    cfg = parse_stage_config(CPTStageConfig, ["--config", str(config)], "steiner train cpt")
    assert (cfg.paths, cfg.learning_rate, cfg.max_steps) == (["walks.jsonl"], 1, 7)
    flagged = ["--config", str(config), "--paths", "a.jsonl", "b.jsonl", "--max_steps", "3"]
    cfg = parse_stage_config(CPTStageConfig, flagged, "steiner train cpt")
    assert (cfg.paths, cfg.max_steps) == (["a.jsonl", "b.jsonl"], 3)
    config.write_bytes("max_steps: 10\n".encode("utf-16"))
    with pytest.raises(InputError, match="not UTF-8 text") as err:
        parse_stage_config(CPTStageConfig, ["--config", str(config)], "steiner train cpt")
    assert err.value.path == str(config)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": [{"content": "x"}]}, "field 'messages.0.role': Field required"),
        ({"messages": ["hi"]}, "field 'messages.0': Input should be a valid dictionary"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]},
            "field 'messages.1.content': Input should be a valid string",
        ),
        ({"messages": []}, "expected a non-empty 'messages' list"),
        ({"id": 1, "nums": [3, 4], "target": 7}, "shortcut records train with --shortcut"),
        # was TRL's RuntimeError, with a traceback, blaming the chat template
        ({"messages": [{"role": "user", "content": "q"}]}, "expected an 'assistant' message"),
    ],
)
def test_bad_chat_records_are_one_error_line(tmp_path, record, message):
    # before: a KeyError, a TypeError or pyarrow's ArrowInvalid, each with a traceback
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "paths.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(InputError) as err:
        sft_dataset(str(path))
    assert err.value.line == 2 and message in err.value.message, err.value


def test_chat_records_where_problems_are_expected_are_one_error_line(data):
    from steiner.domains import load_problems, load_shortcuts

    # before: read as text problems, "field 'question': Field required"
    paths = str(data / "synth" / "paths.jsonl")
    for load in (load_shortcuts, load_problems):
        with pytest.raises(InputError, match="a chat record \\('messages'\\); expected a problem"):
            load(paths)
    with pytest.raises(InputError, match="a chat record"):
        sft_dataset(paths, shortcut=True)


def test_init_reads_any_strings_and_refuses_files_without_utf8_or_text(tmp_path):
    from steiner.train.model import corpus_texts

    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"messages": ["hi", {"role": "user", "content": "there"}, 5]}) + "\n")
    assert list(corpus_texts([odd])) == ["hi", "there"]
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok\n\xff\xfe")
    with pytest.raises(InputError, match=r"bin\.txt: invalid UTF-8 at byte 3"):
        list(corpus_texts([binary]))
    # a file with nothing to learn from: was a tokenizer of bytes alone, and exit 0
    bare, blank = tmp_path / "bare.jsonl", tmp_path / "blank.txt"
    bare.write_text(json.dumps({"nums": [1, 2], "target": 3}) + "\n")
    blank.write_text("\n \n")
    for empty in (bare, blank):
        with pytest.raises(InputError, match="no text for the tokenizer; expected chat records"):
            init_model(tmp_path / "init", "micro", [str(odd), str(empty)])
    # an --out that is a file: before the tokenizer's training, not "File exists" at the save
    with pytest.raises(InputError, match="a file, not a directory; expected a directory"):
        init_model(odd, "micro", [str(odd)])
    assert not (tmp_path / "init").exists()


def test_a_missing_start_model_is_one_error_line_before_anything_is_written(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(InputError, match="expected a model directory") as err:
        init_model(tmp_path / "init", from_pretrained=missing)
    assert err.value.path == missing
    with pytest.raises(InputError, match="expected a model directory"):
        run_sft(quick(SFTStageConfig, tmp_path, "sft", model=missing, data="paths.jsonl"))
    with pytest.raises(InputError, match="expected a model directory"):
        run_rl(RLStageConfig(model=missing, output_dir=str(tmp_path / "rl")))
    assert not list(tmp_path.iterdir())  # no settings record of a run that never started


def test_bad_training_data_is_one_error_line_and_leaves_no_output_dir(data, tmp_path):
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"a": 1}\n')
    init, out = str(data / "init"), tmp_path / "runs"
    with pytest.raises(InputError, match="odd.jsonl:1: field 'messages': Field required"):
        run_sft(quick(SFTStageConfig, out, "sft", model=init, data=str(odd)))
    with pytest.raises(InputError, match="odd.jsonl:1: field 'messages': Field required"):
        run_cpt(quick(CPTStageConfig, out, "cpt", model=init, paths=[str(odd)]))
    problems, dags = str(data / "shortcut.jsonl"), str(data / "synth" / "dags.jsonl")
    rl = RLStageConfig(model=init, problems=problems, dags=str(odd), output_dir=str(out / "rl"))
    with pytest.raises(InputError, match="expected a dag record"):
        run_rl(rl)
    # DAGs of other problems: no problem left to train on (was an IndexError)
    other = tmp_path / "other.jsonl"
    other.write_text(Path(problems).read_text().replace('"id": "countdown-', '"id": "other-'))
    with pytest.raises(InputError, match="no DAG for any problem of"):
        run_rl(replace(rl, problems=str(other), dags=dags))
    # no settings record of a run that never started, which a re-run would be checked against
    assert not out.exists()


def test_an_unreachable_hub_is_one_error_line_before_training(data, tmp_path, monkeypatch):
    """--push_to_hub creates the repo when the trainer is built: offline, or with no token,
    that was an httpx ConnectError traceback. A closed local port stands in for the Hub, so
    the test reaches no network whatever the machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = tmp_path / "sft"
    proc = steiner(
        "train", "sft", "--model", str(data / "init"), "--data",
        str(data / "synth" / "paths.jsonl"), "--output_dir", str(out), "--max_steps", "1",
        "--push_to_hub", "true", "--hub_model_id", "me/steiner-x",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # above it: datasets' map bars
    assert last.startswith(
        "steiner: error: --push_to_hub: cannot create the Hub repo me/steiner-x (ConnectError"
    ), proc.stderr
    assert not (out / "model.safetensors").exists()


def test_a_seed_out_of_numpys_range_is_one_error_line(tmp_path):
    from steiner.cli import parse_stage_config

    for seed in ("-1", str(2**32)):
        with pytest.raises(InputError, match=f"expected 0 to 4294967295, got {seed}"):
            parse_stage_config(SFTStageConfig, ["--seed", seed], "steiner train sft")
        with pytest.raises(InputError, match="--seed"):
            run_rl(RLStageConfig(seed=int(seed)))
        proc = steiner("demo", "--out", str(tmp_path / "demo"), "--seed", seed)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--seed" in proc.stderr
        assert not (tmp_path / "demo").exists()


def test_yaml_config_with_command_line_override(tmp_path):

    import yaml

    from steiner.cli import parse_stage_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    cfg = parse_stage_config(
        SFTStageConfig,
        [
            "--config",
            str(configs / "sft_tiny.yaml"),
            "--model",
            "m",
            "--data",
            "d",
            "--learning_rate",
            "0.003",
        ],
        "steiner train sft",
    )
    assert cfg.num_train_epochs == 3 and cfg.learning_rate == 0.003 and cfg.output_dir == "runs/sft"
    assert cfg.use_cpu is not None and cfg.bf16 is False and cfg.gradient_checkpointing is False
    for name in ("deepspeed_zero2", "deepspeed_zero3", "fsdp"):
        conf = yaml.safe_load((configs / "accelerate" / f"{name}.yaml").read_text())
        assert conf["distributed_type"] in ("DEEPSPEED", "FSDP")
    # --out, as every other command spells it, sets the output directory of each stage
    for stage, config in (("sft", SFTStageConfig), ("cpt", CPTStageConfig), ("rl", RLStageConfig)):
        cfg = parse_stage_config(config, ["--out", "runs/x"], f"steiner train {stage}")
        assert cfg.output_dir == "runs/x", stage
    # and --max_steps, as TRL and the other stages spell it, RL's step count
    for flag in ("--max_steps", "--max-steps", "--steps"):
        cfg = parse_stage_config(RLStageConfig, [flag, "7"], "steiner train rl")
        assert cfg.steps == 7, flag


class KeptWarnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_rerun_of_a_finished_stage_trains_no_more_steps(data):
    cfg = checkpointed(data, max_steps=4, save_steps=2)
    first = run_sft(quick(SFTStageConfig, data, "rerun", **cfg))
    record = RecordStart()
    warnings = KeptWarnings()
    trainer_log = logging.getLogger("transformers.trainer")
    trainer_log.addHandler(warnings)
    try:
        again = run_sft(quick(SFTStageConfig, data, "rerun", **cfg), callbacks=[record])
    finally:
        trainer_log.removeHandler(warnings)
    # the tied LM head is stored once, under the embeddings: no "missing keys" on resume
    assert not [m for m in warnings.messages if "missing keys" in m], warnings.messages
    assert again["resumed_from"].endswith("checkpoint-4")
    assert record.seen is None  # not one more optimiser step
    assert again["steps"] == first["steps"] == 4
    assert again["tokens_seen"] == first["tokens_seen"] and again["tokens_per_s"] == 0
    # the re-run trained for no time, but its model took the first run's training time
    assert again["train_seconds_all_runs"] - again["train_seconds"] > 0.5 * first["train_seconds"]
    assert again["train_seconds_all_runs"] <= first["train_seconds_all_runs"] + 0.5
    final = AutoModelForCausalLM.from_pretrained(data / "rerun")
    saved = AutoModelForCausalLM.from_pretrained(data / "rerun" / "checkpoint-4")
    expected = saved.state_dict()
    for name, weight in final.state_dict().items():
        assert torch.equal(weight, expected[name]), name


def test_only_a_head_that_shares_the_embeddings_counts_as_stored_with_them(data):
    tied = AutoModelForCausalLM.from_pretrained(data / "init")
    assert shared_tied_keys(tied) == {"lm_head.weight"}
    config = AutoConfig.from_pretrained(data / "init")
    config.tie_word_embeddings = False
    # an untied head is its own tensor: a checkpoint without it has lost it, so it stays
    # in the resume warning
    assert shared_tied_keys(AutoModelForCausalLM.from_config(config)) == set()


def test_a_training_run_into_a_held_output_dir_is_refused(data, tmp_path, lock_held_elsewhere):
    for name in ("sft", "rl"):
        lock_held_elsewhere(tmp_path / name / ".steiner.lock")  # a run there is still going
    cfg = quick(SFTStageConfig, tmp_path, "sft", **checkpointed(data, max_steps=2, save_steps=1))
    with pytest.raises(InputError, match=r"another run is writing here \(--output_dir\)"):
        run_sft(cfg)
    with pytest.raises(InputError, match=r"another run is writing here \(--output_dir\)"):
        run_rl(RLStageConfig(model=str(data / "init"), output_dir=str(tmp_path / "rl")))
    for name in ("sft", "rl"):  # no settings record or checkpoint beside the other run's
        assert [p.name for p in (tmp_path / name).iterdir()] == [".steiner.lock"]


def test_the_demos_baseline_sft_ends_when_the_demo_is_killed_outright(data, tmp_path):
    from filelock import FileLock

    root = tmp_path / "demo"
    shutil.copytree(data / "init", root / "models" / "cpt")
    (root / "data").mkdir()
    shutil.copy(data / "shortcut.jsonl", root / "data" / "train.jsonl")
    # a demo that starts its baseline SFT (long enough to outlive the test) and is then
    # SIGKILLed, as by the OOM killer: no Python code of it runs to stop the baseline
    demo = (
        "import sys, time\nfrom pathlib import Path\n"
        "from steiner.demo import DemoSettings, start_baseline\n"
        "s = DemoSettings(sft_steps=100_000, batch_size=2)\n"
        "print(start_baseline(s, Path(sys.argv[1])).pid, flush=True)\ntime.sleep(600)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", demo, str(root)], stdout=subprocess.PIPE, text=True
    )
    baseline = int(parent.stdout.readline())
    lock = root / "models" / "shortcut-sft" / ".steiner.lock"
    log = root / "models" / "shortcut-sft.log"
    try:
        deadline = time.monotonic() + 120
        while not lock.exists():  # the baseline has started its run
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 60
        while not log.read_text().endswith("steiner: terminated\n"):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        # it unwound and let go of its output: a re-run's baseline is not refused
        FileLock(lock).acquire(timeout=30)
    finally:
        parent.kill()
        try:
            os.kill(baseline, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize(
    "config, flags, message",
    [
        (SFTStageConfig, ["--max_length", "0"], "--max_length: expected >= 1 tokens, got 0"),
        (SFTStageConfig, ["--per_device_train_batch_size", "0"], "expected >= 1, got 0"),
        (SFTStageConfig, ["--gradient_accumulation_steps", "0"], "expected >= 1, got 0"),
        (SFTStageConfig, ["--learning_rate", "-1"], "--learning_rate: expected >= 0"),
        (SFTStageConfig, ["--max_steps", "0"], "or -1 to train --num_train_epochs, got 0"),
        (SFTStageConfig, ["--num_train_epochs", "0"], "--num_train_epochs: expected > 0"),
        (CPTStageConfig, ["--max_train_tokens", "0"], "--max_train_tokens: expected >= 1"),
        (CPTStageConfig, ["--lora_r", "0"], "--lora_r: expected >= 1, got 0"),
        (CPTStageConfig, ["--lora_dropout", "1.5"], "expected a share from 0 to 1, got 1.5"),
        (CPTStageConfig, ["--reasoning_ratio", "1.5"], "expected a share from 0 to 1, got 1.5"),
        (CPTStageConfig, ["--countdown_facts", "-1"], "--countdown_facts: expected >= 0"),
        # 0 trained every record, -2 all but the last two
        (SFTStageConfig, ["--limit_problems", "0"], "--limit_problems: expected >= 1, got 0"),
        # unknown or not installed: transformers' RuntimeError once model and data had loaded
        (CPTStageConfig, ["--report_to", "foo"], "--report_to: expected none, all or one of"),
        # each a traceback once the model had loaded (TRL's ValueError, or on CPU an
        # AttributeError from its offloading)
        (SFTStageConfig, ["--padding_free", "true"], "--padding_free: expected --packing true"),
        pytest.param(
            CPTStageConfig,
            ["--activation_offloading", "true"],
            "--activation_offloading: expected false: it needs a GPU",
            marks=pytest.mark.skipif(torch.accelerator.is_available(), reason="a GPU can offload"),
        ),
        # TRL looked a missing template file up on the Hub ("couldn't connect to the Hub")
        (
            SFTStageConfig,
            ["--chat_template_path", "no/such/template.jinja"],
            "no/such/template.jinja: cannot open: no such file (--chat_template_path)",
        ),
        # TRL then trained the records untokenized: a ValueError traceback after loading
        (
            SFTStageConfig,
            ["--dataset_kwargs", '{"skip_prepare_dataset": true}'],
            "--dataset_kwargs: skip_prepare_dataset is for an already tokenized dataset",
        ),
    ],
)
def test_training_settings_out_of_range_are_one_error_line(config, flags, message):
    # before: torch's, peft's or datasets' traceback mid-stage, or (max_steps 0) an untrained
    # model saved with exit 0
    from steiner.cli import parse_stage_config

    with pytest.raises(InputError, match=re.escape(message)):
        parse_stage_config(config, ["--output_dir", "unused", *flags], "steiner train")


def test_settings_transformers_refuses_are_one_error_line():
    from steiner.cli import parse_stage_config

    def refusal(*flags: str) -> str:
        with pytest.raises(InputError) as err:
            parse_stage_config(SFTStageConfig, ["--output_dir", "unused", *flags], "sft")
        assert "\n" not in err.value.message
        return err.value.message

    # before: its message over three lines
    message = refusal("--load_best_model_at_end", "true")
    assert "requires the save and eval strategy to match" in message
    assert message.endswith(
        "- Evaluation strategy: IntervalStrategy.NO - Save strategy: SaveStrategy.STEPS"
    )
    if importlib.util.find_spec("deepspeed") is None:  # before: PackageNotFoundError traceback
        assert refusal("--deepspeed", "ds.json") == (
            "a setting needs deepspeed, which is not installed (pip install deepspeed)"
        )
        # and it leaves no DeepSpeed config registered: every later model load in the process
        # failed on it ('HfTrainerDeepSpeedConfig' object has no attribute 'is_zero3')
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        assert not is_deepspeed_zero3_enabled()


def test_settings_trl_refuses_as_it_builds_the_trainer_are_one_error_line(data, tmp_path):
    # before: TRL's ValueError traceback after the model and data had loaded
    paths = str(data / "synth" / "paths.jsonl")
    sft = quick(SFTStageConfig, tmp_path, "sft", model=str(data / "init"), data=paths)
    sft.eos_token = "<not a token>"
    with pytest.raises(InputError) as err:
        run_sft(sft)
    assert err.value.path == "steiner train sft"
    assert err.value.message.startswith("The specified `eos_token` ('<not a token>') is not")
    cpt = quick(CPTStageConfig, tmp_path, "cpt", model=str(data / "init"), paths=[paths])
    cpt.assistant_only_loss = True  # CPT's documents are plain text
    with pytest.raises(InputError, match="but the dataset is not conversational") as err:
        run_cpt(cpt)
    assert err.value.path == "steiner train cpt"
    assert not (tmp_path / "sft").exists() and not (tmp_path / "cpt").exists()


def test_liger_kernels_that_are_not_installed_are_one_error_line(monkeypatch):
    # before: transformers' ImportError traceback once the model and data had loaded
    import transformers.utils

    from steiner.cli import parse_stage_config

    args = ["--output_dir", "unused", "--use_liger_kernel", "true"]
    monkeypatch.setattr(transformers.utils, "is_liger_kernel_available", lambda: False)
    with pytest.raises(InputError, match="--use_liger_kernel: liger-kernel is not installed"):
        parse_stage_config(CPTStageConfig, args, "steiner train cpt")
    monkeypatch.setattr(transformers.utils, "is_liger_kernel_available", lambda: True)
    assert parse_stage_config(SFTStageConfig, args, "steiner train sft").use_liger_kernel


def test_a_logging_integration_that_is_not_installed_is_one_error_line(monkeypatch):
    import transformers.integrations

    from steiner.cli import parse_stage_config

    monkeypatch.setattr(
        transformers.integrations, "get_available_reporting_integrations", lambda: ["trackio"]
    )
    args = ["--output_dir", "unused", "--report_to"]
    with pytest.raises(InputError, match="--report_to: wandb is not installed; pip install it"):
        parse_stage_config(SFTStageConfig, [*args, "wandb"], "steiner train sft")
    assert parse_stage_config(SFTStageConfig, [*args, "trackio"], "x").report_to == ["trackio"]


def test_init_and_rl_settings_out_of_range_are_one_error_line(data, tmp_path):
    from steiner.cli import parse_stage_config
    from steiner.train.config import InitConfig

    for flags, message in (
        (["--max_positions", "0"], "--max_positions: expected >= 1, got 0"),
        # 0 was read as unset: the preset's vocabulary
        (["--vocab_size", "0"], "--vocab_size: expected >= 1, got 0"),
        # passed over without a word: a pretrained model keeps its own tokenizer
        (
            ["--from", "pre", "--data", "a.jsonl", "--vocab_size", "300"],
            "--from: expected no --data or --vocab_size with it: the pretrained model keeps",
        ),
        # so were these: the model keeps its own shape and context length
        (
            ["--from", "pre", "--preset", "micro", "--max_positions", "2048"],
            "--from: expected no --preset or --max_positions with it: the pretrained model "
            "keeps its own tokenizer, size and context length",
        ),
    ):
        with pytest.raises(InputError, match=re.escape(message)):
            parse_stage_config(InitConfig, ["--out", str(tmp_path), *flags], "steiner train init")
    for field, value, message in (
        ("learning_rate", -1.0, "--learning_rate: expected >= 0, got -1.0"),
        ("beta", -0.1, "--beta: expected >= 0 (0: no KL term), got -0.1"),
        ("forced_min_share", 1.5, "--forced_min_share: expected a share from 0 to 1"),
    ):
        rl = RLStageConfig(
            model=str(data / "init"), output_dir=str(tmp_path / "rl"), **{field: value}
        )
        with pytest.raises(InputError, match=re.escape(message)):
            run_rl(rl)
    # reward weights: were accepted, a negative one rewarding what it is there to punish
    for field, value, message in (
        ("correct", -2.0, "--correct: expected >= 0, got -2.0"),
        ("max_backtracks", -1, "--max_backtracks: expected >= 0, got -1"),
        ("similarity", 5.0, "--similarity: expected a share from 0 to 1, got 5.0"),
    ):
        rl = RLStageConfig(model=str(data / "init"), output_dir=str(tmp_path / "rl"))
        rl.weights = RewardWeights(**{field: value})
        with pytest.raises(InputError, match=re.escape(message)):
            run_rl(rl)
    assert not (tmp_path / "rl").exists()


def test_sft_logs_the_loss_of_eval_data_and_an_eval_strategy_needs_it(data, tmp_path):
    paths = (data / "synth" / "paths.jsonl").read_text().splitlines()
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("\n".join(paths[:6]) + "\n")

    def with_held_out(name: str, **settings) -> SFTStageConfig:
        return quick(
            SFTStageConfig,
            tmp_path,
            name,
            model=str(data / "init"),
            data=str(data / "synth" / "paths.jsonl"),
            eval_data=str(held_out),
            max_steps=4,
            **settings,
        )

    cfg = with_held_out("sft", eval_steps=2)
    assert cfg.eval_strategy == "steps"  # set by --eval_data, as the held-out loss is its use
    summary = run_sft(cfg)
    evals = [h for h in summary["log_history"] if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    assert summary["final_eval_loss"] == evals[-1]["eval_loss"] > 0
    from steiner.evaluate.report import build_report

    report = build_report(tmp_path / "sft")["markdown"].read_text()
    assert "| final loss | held-out loss | seconds |" in report
    assert f"| {summary['final_eval_loss']:.3f} |" in report
    # a held-out set TRL drops whole (each prompt fills --max_length): was an IndexError at
    # the first evaluation, with the training under way
    long = [json.loads(line) for line in paths[:3]]
    for row in long:
        row["messages"][0]["content"] = "x " * 400 + row["messages"][0]["content"]
    held_out.write_text("".join(json.dumps(row) + "\n" for row in long))
    cfg = with_held_out("sft-long", max_length=256)
    with pytest.raises(InputError, match="held_out.jsonl: no example has a trained token"):
        run_sft(cfg)
    assert not (tmp_path / "sft-long").exists()
    # before: transformers' ValueError with a traceback, once the model and data had loaded
    for cls, message in (
        (SFTStageConfig, "expected no, or a held-out set with --eval_data FILE, got 'steps'"),
        (CPTStageConfig, "expected no: this stage takes no held-out set, got 'steps'"),
    ):
        with pytest.raises(InputError, match=re.escape(f"--eval_strategy: {message}")):
            quick(cls, tmp_path, "x", eval_strategy="steps")


def test_examples_whose_prompt_fills_max_length_are_dropped_and_counted(data, tmp_path):
    def chat(question: str) -> dict:
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": "the answer is 4"},
            ]
        }

    paths = tmp_path / "paths.jsonl"
    paths.write_text(json.dumps(chat("2 + 2?")) + "\n" + json.dumps(chat("2 + 2? " * 80)) + "\n")
    init, out = str(data / "init"), tmp_path / "runs"
    summary = run_sft(
        quick(SFTStageConfig, out, "sft", model=init, data=str(paths), max_steps=1, max_length=64)
    )
    assert (summary["examples"], summary["examples_dropped"]) == (1, 1)
    # every prompt fills it: one line naming the data, before anything is written (was the
    # sampler's IndexError on an empty dataset)
    with pytest.raises(InputError, match="no example has a trained token within --max_length 4"):
        run_sft(quick(SFTStageConfig, out, "sft2", model=init, data=str(paths), max_length=4))
    assert not (out / "sft2").exists()


def test_examples_are_cut_at_the_models_positions(data, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def chat(question: str, answer: str) -> dict:
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        }

    # a learned position table of 48 rows: an example past them stopped SFT with IndexError
    tok = AutoTokenizer.from_pretrained(data / "init")
    model_dir = tmp_path / "gpt2"
    sizes = {"n_positions": 48, "n_embd": 32, "n_layer": 1, "n_head": 2}
    config = GPT2Config(vocab_size=len(tok), bos_token_id=None, eos_token_id=None, **sizes)
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    long_answer = chat("2 + 2?", "the answer is 4. " * 20)
    assert len(tok.apply_chat_template(long_answer["messages"])["input_ids"]) > 48
    paths = tmp_path / "paths.jsonl"
    paths.write_text(json.dumps(long_answer) + "\n")
    for run, cls, data_flag in (
        (run_sft, SFTStageConfig, "data"),
        (run_cpt, CPTStageConfig, "paths"),
    ):
        source = str(paths) if data_flag == "data" else [str(paths)]
        cfg = quick(
            cls, tmp_path, cls.__name__, model=str(model_dir), max_steps=1, **{data_flag: source}
        )
        asked = cfg.max_length
        summary = run(cfg)
        assert (summary["max_length"], summary["max_length_asked"]) == (48, asked)
        if run is run_sft:  # one example, cut (CPT packs its documents into rows of 48)
            assert summary["tokens_seen"] == 48
    # every prompt fills the positions: the line names them, not a --max_length never given
    paths.write_text(json.dumps(chat("2 + 2? " * 80, "4")) + "\n")
    with pytest.raises(InputError, match="within the model's 48 positions .* more positions$"):
        run_sft(quick(SFTStageConfig, tmp_path, "sft2", model=str(model_dir), data=str(paths)))


def test_lora_sft_and_rl_run_in_two_processes(data, tmp_path):
    # torchrun, as on GPUs, with two CPU processes (gloo): before, every process wrote a LoRA
    # checkpoint's token rows, and a run crashed at a save where that raced the writer's folder
    # (by timing: not every run); each process printed its own summary table
    def launch(*args: str) -> subprocess.CompletedProcess:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        return subprocess.run(
            [*torchrun, "--nproc_per_node", "2", "-m", "steiner.cli", *args],
            capture_output=True,
            text=True,
            # TMPDIR: torchrun leaves a torchelastic_* folder there after every launch
            env={
                **os.environ,
                # no ACCELERATE_USE_CPU, as a user types it: RL's processes each took themselves
                # for the only one without it, and the second stopped at the output lock
                # two processes on a one-GPU machine: rank 1's barrier asked for cuda:1
                "CUDA_VISIBLE_DEVICES": "",
                "COLUMNS": "200",
                "TMPDIR": str(tmp_path),
            },
        )

    sft = tmp_path / "sft"
    proc = launch(
        "train", "sft", "--model", str(data / "init"), "--output_dir", str(sft),
        "--data", str(data / "synth" / "paths.jsonl"), "--use_lora", "true",
        "--max_steps", "2", "--save_steps", "1", "--per_device_train_batch_size", "2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = sft / "checkpoint-2"
    assert {"rng_state_0.pth", "rng_state_1.pth", "new_token_rows.safetensors"} <= {
        p.name for p in last.iterdir()
    }
    assert proc.stderr.count("steiner train sft:") == 1  # one summary, not one per process
    summary = json.loads((sft / "training_summary.json").read_text())
    assert summary["steps"] == 2
    rl_out = tmp_path / "rl"
    proc = launch(
        "train", "rl", "--model", str(sft), "--output_dir", str(rl_out),
        "--problems", str(data / "shortcut.jsonl"), "--dags", str(data / "synth" / "dags.jsonl"),
        "--steps", "2", "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "16",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("steiner train rl:") == 1
    history = json.loads((rl_out / "rl_summary.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2]
    # and RL under LoRA: the reference is each process's policy with its adapters off; in
    # micro-batches of one, whose gradients are averaged across processes at the last only
    proc = launch(
        "train", "rl", "--model", str(sft), "--output_dir", str(tmp_path / "rl-lora"),
        "--problems", str(data / "shortcut.jsonl"), "--dags", str(data / "synth" / "dags.jsonl"),
        "--steps", "2", "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "16",
        "--use_lora", "true", "--micro_batch_size", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "rl-lora" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "rl-lora" / "model.safetensors").is_file()  # merged


def test_cpt_reasoning_ratio_keeps_that_share_of_path_documents(data, tmp_path):
    from steiner.train.data import cpt_dataset

    tok = AutoTokenizer.from_pretrained(data / "init")
    paths = [str(data / "synth" / "paths.jsonl")]
    n_paths = len(Path(paths[0]).read_text().splitlines())
    texts = tmp_path / "plain.txt"
    texts.write_text("\n\n".join(f"plain document {i}" for i in range(4 * n_paths)) + "\n")

    def path_share(ratio: float) -> tuple[int, int]:
        docs = cpt_dataset(tok, paths, [str(texts)], ratio)["text"]
        return sum(REASONING_START in d for d in docs), len(docs)

    assert path_share(0.5) == (n_paths, 2 * n_paths)
    # the ends keep one side only (both sides were used whole there, 1:4 at either end)
    assert path_share(1.0) == (n_paths, n_paths)
    assert path_share(0.0) == (0, 4 * n_paths)
    with pytest.raises(InputError, match="1 keeps --paths only; none given"):
        cpt_dataset(tok, [], [str(texts)], 1.0)
    # a --texts file without a document: was left out, the paths trained alone, exit 0
    blank, no_text = tmp_path / "blank.txt", tmp_path / "no_text.jsonl"
    blank.write_text("\n\n  \n")
    no_text.write_text(json.dumps({"text": " "}) + "\n")
    for empty, expected in (
        (blank, "documents separated by blank lines"),
        (no_text, "records with a non-empty 'text'"),
    ):
        with pytest.raises(InputError, match=f"{empty.name}: no text; expected {expected}"):
            cpt_dataset(tok, paths, [str(texts), str(empty)], 0.5)


def test_init_reads_the_tokenizers_text_from_a_datasets_directory(tmp_path):
    # as every training stage's data may be one; before, "cannot open: Is a directory"
    from datasets import Dataset

    from steiner.train.model import corpus_texts

    Dataset.from_list([{"question": "2+3?", "answer": "5"}]).save_to_disk(tmp_path / "qa")
    assert list(corpus_texts([str(tmp_path / "qa")])) == ["2+3?", "5"]
    with pytest.raises(InputError, match=r"notes\.md: cannot open"):  # a file, not a Hub name
        list(corpus_texts([str(tmp_path / "notes.md")]))


def test_cpt_texts_and_paths_may_be_datasets(tmp_path):
    # as TRL's dataset_name + dataset_text_field; before, "cannot open: Is a directory"
    from datasets import Dataset

    from steiner.train.data import plain_texts
    from steiner.train.trainer import stage_inputs

    Dataset.from_list([{"text": "one walk"}, {"text": "another"}]).save_to_disk(tmp_path / "docs")
    assert plain_texts(str(tmp_path / "docs")) == ["one walk", "another"]
    Dataset.from_list([{"text": "one"}, {"body": "x"}]).save_to_disk(tmp_path / "odd")
    with pytest.raises(InputError, match=r"odd:2: expected a string field 'text'"):
        plain_texts(str(tmp_path / "odd"))
    # a missing text file stays a missing file, not a dataset name looked up on the Hub
    with pytest.raises(InputError, match=r"walks\.txt: cannot open"):
        plain_texts(str(tmp_path / "walks.txt"))
    chats = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    ]
    Dataset.from_list(chats).save_to_disk(tmp_path / "paths")
    cfg = CPTStageConfig(model="m", paths=[str(tmp_path / "paths")], texts=[str(tmp_path / "docs")])
    inputs = stage_inputs(cfg, "cpt")
    assert [len(d) for d in inputs["paths_sha256"] + inputs["texts_sha256"]] == [16, 16]


def test_sft_reads_trls_prompt_completion_records_as_their_chat(data, tmp_path):
    # TRL's other dataset format; before: "field 'messages': Field required"
    paths = data / "synth" / "paths.jsonl"
    chats = [json.loads(line) for line in paths.read_text().splitlines()[:12]]
    split = tmp_path / "pc.jsonl"
    as_text = tmp_path / "pc_text.jsonl"
    split.write_text(
        "".join(
            json.dumps({"prompt": c["messages"][:-1], "completion": c["messages"][-1:]}) + "\n"
            for c in chats
        )
    )
    as_text.write_text(
        "".join(
            json.dumps(
                {"prompt": c["messages"][0]["content"], "completion": c["messages"][1]["content"]}
            )
            + "\n"
            for c in chats
        )
    )
    expected = [{"messages": c["messages"]} for c in chats]
    assert all(len(c["messages"]) == 2 for c in chats)  # user, assistant: both forms the same
    for source in (split, as_text):
        assert sft_dataset(str(source)).to_list() == expected
    checked = steiner("format", "check", str(split))  # the format checker reads them too
    assert checked.returncode == 0 and "│      12 │     12 │" in checked.stderr, checked.stderr
    summary = run_sft(
        quick(
            SFTStageConfig, tmp_path, "sft", model=str(data / "init"), data=str(split), max_steps=1
        )
    )
    assert summary["examples"] == 12
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "completion": 7}) + "\n")
    with pytest.raises(
        InputError, match="bad.jsonl:1: field 'completion': expected text or a list"
    ):
        sft_dataset(str(bad))


def test_cpt_reads_texts_from_the_dataset_text_field_it_is_given(data, tmp_path):
    """As TRL's dataset_text_field names the text column of a pretraining set. Before, the
    field was only the column of the dataset CPT built (always "text"): --texts records had
    to have "text", and any other field name was a KeyError traceback once training began."""
    from steiner.train.data import plain_texts

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"content": f"plain {i} + 1"}) + "\n" for i in range(20)))
    assert plain_texts(str(docs), "content")[:2] == ["plain 0 + 1", "plain 1 + 1"]
    with pytest.raises(InputError, match=r"docs\.jsonl:1: expected a string field 'text'"):
        plain_texts(str(docs))
    both = [{"content": f"plain {i} + 1", "text": f"other {i}"} for i in range(20)]
    docs.write_text("".join(json.dumps(record) + "\n" for record in both))
    out = tmp_path / "cpt"
    settings = dict(model=str(data / "init"), texts=[str(docs)], max_steps=2)
    cfg = quick(CPTStageConfig, tmp_path, "cpt", dataset_text_field="content", **settings)
    assert run_cpt(cfg)["steps"] == 2
    # the field decides the documents: a checkpoint of one is not continued with another
    record = json.loads((out / "train_settings.json").read_text())
    assert record["dataset_text_field"] == "content"
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with pytest.raises(
        InputError,
        match=r"settings \(dataset_text_field: 'content' there, '\(not set\)' here\); use",
    ):
        run_cpt(quick(CPTStageConfig, tmp_path, "cpt", **settings))


def test_a_run_shorter_than_its_logging_steps_shows_its_mean_loss():
    """Two steps under --logging_steps 10 log no loss: the summary said first_loss and
    final_loss None and showed no loss at all, though the trainer returns the mean."""
    from steiner.cli import console, print_training_summary

    summary = {
        "stage": "sft", "examples": 764, "steps": 2, "tokens_seen": 9000, "tokens_per_s": 9000.0,
        "first_loss": None, "final_loss": None, "mean_train_loss": 5.8125,
        "train_seconds": 1.0, "resumed_from": None,
    }  # fmt: skip
    with console.capture() as shown:
        print_training_summary(summary, "runs/sft")
    row = next(line for line in shown.get().splitlines() if "mean_train_loss" in line)
    assert "5.8125" in row


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sft_and_rl_train_on_a_gpu_in_bf16_and_load_back_for_generation(data, tmp_path):
    # the README's GPU recipe (--bf16), which the CPU suite never reaches
    from steiner.infer.budget import Budget
    from steiner.infer.generate import generate, load

    paths = str(data / "synth" / "paths.jsonl")
    sft = run_sft(
        quick(SFTStageConfig, tmp_path, "sft", model=str(data / "init"), data=paths,
              max_steps=60, bf16=True)
    )  # fmt: skip
    assert sft["final_loss"] < sft["first_loss"]
    model, tok = load(tmp_path / "sft")
    assert model.device.type == "cuda"
    question = [{"role": "user", "content": "Using the numbers 3, 5, 7, reach 22."}]
    [done] = generate(model, tok, [question], [Budget(min_steps=1, max_steps=2)], 120, 1.0, seed=0)
    assert 1 <= done.trace.n_steps <= 2 or done.finish_reason == "length", done.text
    rl = tmp_path / "rl"
    run_rl(
        RLStageConfig(
            model=str(tmp_path / "sft"), problems=str(data / "shortcut.jsonl"),
            dags=str(data / "synth" / "dags.jsonl"), output_dir=str(rl), steps=2,
            prompts_per_step=2, group_size=2, max_new_tokens=24, save_steps=1,
        )
    )  # fmt: skip
    history = json.loads((rl / "rl_summary.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2]
    assert load(rl)[0].device.type == "cuda"


def test_every_train_stage_reads_a_tilde_in_its_paths(tmp_path, monkeypatch):
    """TrainingArguments expands ~ in output_dir, so train sft and cpt did there only; train
    init and rl made a directory named "~", and every stage took `model: ~/runs/sft` or
    `data: ~/paths.jsonl` (a --config file's, or --flag=~/x, where no shell expands it) for a
    missing path. A Hub name stays as it is."""
    from steiner.train.config import InitConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    home = lambda name: str(tmp_path / name)  # noqa: E731
    init = InitConfig(output_dir="~/init", data=["~/a.jsonl", "org/set"])
    assert (init.output_dir, init.data) == (home("init"), [home("a.jsonl"), "org/set"])
    assert InitConfig(output_dir="x", from_pretrained="~/base").from_pretrained == home("base")
    cpt = CPTStageConfig(output_dir="~/cpt", model="~/init", paths=["~/p.jsonl"], texts=["~/t"])
    assert (cpt.output_dir, cpt.model, cpt.paths, cpt.texts) == (
        home("cpt"), home("init"), [home("p.jsonl")], [home("t")]
    )  # fmt: skip
    sft = SFTStageConfig(output_dir="~/sft", model="~/cpt", data="~/d.jsonl",
                         eval_data="~/e.jsonl")  # fmt: skip
    assert (sft.output_dir, sft.model, sft.data, sft.eval_data) == (
        home("sft"), home("cpt"), home("d.jsonl"), home("e.jsonl")
    )  # fmt: skip
    rl = RLStageConfig(output_dir="~/rl", model="~/sft", problems="~/p.jsonl", dags="~/dags")
    assert (rl.output_dir, rl.model, rl.problems, rl.dags) == (
        home("rl"), home("sft"), home("p.jsonl"), home("dags")
    )  # fmt: skip
    assert SFTStageConfig(output_dir="x", data="openai/gsm8k:main").data == "openai/gsm8k:main"


def test_cpt_reset_unseen_tokens_gives_them_the_mean_embedding(data, tmp_path):
    """A from-scratch CPT on text without the chat and reasoning tokens trains their logits
    down; --reset_unseen_tokens gives each token its data never held the mean embedding of
    those it held, and leaves the trained rows as they were."""
    settings = dict(model=str(data / "init"), countdown_facts=300, max_steps=10, seed=3)
    plain = run_cpt(quick(CPTStageConfig, tmp_path, "plain", **settings))
    reset = run_cpt(quick(CPTStageConfig, tmp_path, "reset", reset_unseen_tokens=True, **settings))
    assert plain["tokens_reset"] is None
    tok = AutoTokenizer.from_pretrained(tmp_path / "reset")
    rows = {
        name: AutoModelForCausalLM.from_pretrained(tmp_path / name).get_input_embeddings().weight
        for name in ("plain", "reset")
    }
    changed = (rows["plain"] != rows["reset"]).any(-1)
    assert int(changed.sum()) == reset["tokens_reset"] > len(SPECIAL_TOKENS)
    special = torch.tensor(tok.convert_tokens_to_ids(SPECIAL_TOKENS))
    assert changed[special].all()  # CPT's arithmetic facts hold no reasoning token
    digits = torch.tensor(tok.convert_tokens_to_ids(list("0123456789")))
    assert not changed[digits].any()  # the facts' own tokens keep what CPT trained
    mean = rows["plain"][~changed].mean(0)
    assert torch.allclose(rows["reset"][changed], mean.expand(int(changed.sum()), -1))

    def reasoning_token_loss(name: str) -> float:
        """The mean loss of a synthesized path's reasoning tokens, where an SFT starts."""
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        path = json.loads((data / "synth" / "paths.jsonl").read_text().splitlines()[0])
        ids = tok.apply_chat_template(path["messages"], tokenize=True, return_dict=True)
        ids = torch.tensor([ids["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
        target = ids[0, 1:]
        where = torch.isin(target, special)
        return float(-logp[where, target[where]].mean())

    # the SFT starts from neutral logits for them, not trained-down ones
    assert reasoning_token_loss("reset") < reasoning_token_loss("plain")
    # embeddings that are not the whole vocabulary here (a ZeRO-3 shard): one error line
    from steiner.train.model import reset_unseen_tokens

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    with pytest.raises(InputError, match="--reset_unseen_tokens: expected the whole embedding"):
        reset_unseen_tokens(model, torch.ones(5, dtype=torch.bool))


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"max_length": 40, "truncation_mode": "keep_end"},
        {"max_length": 51, "truncation_mode": "keep_start"},  # prompts are 49-52 tokens
        {"assistant_only_loss": False, "max_length": 30, "shuffle_dataset": True},
    ],
)
def test_batched_chat_tokenizing_prepares_what_trl_prepares(data, settings):
    """SteinerTrainer tokenizes chat datasets in batches; the rows it trains on are TRL's:
    the same ids, labels, truncation, dropped rows and order."""
    from trl import SFTTrainer

    from steiner.train.trainer import SteinerTrainer

    paths = str(data / "synth" / "paths.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(data / "init")
    cfg = quick(SFTStageConfig, data, "prepare", model=str(data / "init"), data=paths)
    for key, value in settings.items():
        setattr(cfg, key, value)
    trainer = SteinerTrainer(
        model=AutoModelForCausalLM.from_pretrained(data / "init"),
        args=cfg,
        train_dataset=sft_dataset(paths),
        processing_class=tokenizer,
    )
    chats = sft_dataset(paths)
    shortcut = sft_dataset(str(data / "shortcut.jsonl"), shortcut=True)
    kept = {}
    for dataset in (chats, shortcut):
        trls = SFTTrainer._prepare_dataset(trainer, dataset, tokenizer, cfg, False, None, "train")
        ours = trainer._prepare_dataset(dataset, tokenizer, cfg, False, None, "train")
        assert ours["input_ids"] == trls["input_ids"]
        assert ours["labels"] == trls["labels"]
        assert ours.column_names == ["input_ids", "labels"]
        kept[dataset is chats] = len(ours)
    if settings.get("max_length") == 51:  # rows cut within their prompt are dropped
        assert 0 < kept[True] < len(chats) and 0 < kept[False] < len(shortcut), kept
    else:
        assert kept == {True: len(chats), False: len(shortcut)}
    # what it does not handle goes TRL's way: here a column besides the messages
    extra = chats.add_column("note", ["x"] * len(chats))
    prepared = trainer._prepare_dataset(extra, tokenizer, cfg, False, None, "train")
    assert "messages" in prepared.column_names
