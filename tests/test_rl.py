"""30 RL steps with DAG step rewards raise the mean reward of a tiny SFT model (countdown-3)."""

import copy
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
from itertools import pairwise

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from steiner.infer.budget import TokenIds
from steiner.infer.vllm_budget import VLLM_PROCESSOR, request_processor, token_ids_or_none
from steiner.io import InputError
from steiner.train import rl
from steiner.train.config import SFTStageConfig
from steiner.train.rewards import RewardWeights
from steiner.train.rl import RLStageConfig, run_rl
from steiner.train.trainer import run_sft


def steiner(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "steiner.cli", *args], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_rl_raises_mean_reward(tmp_path):
    steiner(
        "countdown",
        "generate",
        "--n-numbers",
        "3",
        "--count",
        "80",
        "--seed",
        "2",
        "--shortcut",
        "--out",
        str(tmp_path / "sc.jsonl"),
    )
    steiner(
        "synth",
        "--shortcut",
        str(tmp_path / "sc.jsonl"),
        "--out",
        str(tmp_path / "synth"),
        "--paths-per-dag",
        "4",
    )
    steiner(
        "train",
        "init",
        "--preset",
        "tiny",
        "--data",
        str(tmp_path / "synth" / "paths.jsonl"),
        "--out",
        str(tmp_path / "init"),
    )
    run_sft(
        SFTStageConfig(
            output_dir=str(tmp_path / "sft"),
            model=str(tmp_path / "init"),
            data=str(tmp_path / "synth" / "paths.jsonl"),
            max_steps=200,
            learning_rate=3e-3,
            save_strategy="no",
            disable_tqdm=True,
        )
    )
    history = run_rl(
        RLStageConfig(
            model=str(tmp_path / "sft"),
            problems=str(tmp_path / "sc.jsonl"),
            dags=str(tmp_path / "synth" / "dags.jsonl"),
            output_dir=str(tmp_path / "rl"),
            steps=30,
            max_new_tokens=160,
            learning_rate=2e-4,
            seed=0,
        ),
        log=lambda record: None,
    )["history"]
    rewards = [h["mean_reward"] for h in history]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.1, (first, last)
    assert (tmp_path / "rl" / "rl_summary.json").exists() and (
        tmp_path / "rl" / "model.safetensors"
    ).exists()
    assert {"mean_reward", "accuracy", "mean_steps", "mean_backtracks", "terms"} <= set(history[0])


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def small_countdown(tmp_path_factory):
    """20 countdown-3 problems with their DAGs."""
    tmp = tmp_path_factory.mktemp("countdown")
    steiner(
        "countdown",
        "generate",
        "--n-numbers",
        "3",
        "--count",
        "20",
        "--seed",
        "3",
        "--shortcut",
        "--out",
        str(tmp / "sc.jsonl"),
    )
    steiner("synth", "--shortcut", str(tmp / "sc.jsonl"), "--out", str(tmp / "synth"))
    return tmp / "sc.jsonl", tmp / "synth" / "dags.jsonl"


def small_rl_config(model, data, output_dir, **overrides) -> RLStageConfig:
    problems, dags = data
    settings = dict(
        model=str(model),
        problems=str(problems),
        dags=str(dags),
        output_dir=str(output_dir),
        steps=4,
        save_steps=2,
        max_new_tokens=24,
        prompts_per_step=2,
        group_size=2,
    )
    return RLStageConfig(**(settings | overrides))


def test_rl_problems_may_be_a_datasets_directory(tmp_path, tiny_model_dir, small_countdown):
    # load_problems reads one; the resume record's digest said "cannot open: Is a directory"
    from datasets import Dataset

    problems, dags = small_countdown
    rows = [json.loads(line) for line in problems.read_text().splitlines()]
    Dataset.from_list(rows).save_to_disk(tmp_path / "problems")
    config = lambda steps: small_rl_config(  # noqa: E731
        tiny_model_dir, (tmp_path / "problems", dags), tmp_path / "rl", steps=steps, save_steps=1
    )
    assert len(run_rl(config(1), log=lambda r: None)["history"]) == 1
    settings = json.loads((tmp_path / "rl" / "rl_settings.json").read_text())
    assert re.fullmatch("[0-9a-f]{16}", settings["problems_sha256"])
    # other problems saved in its place are refused on resume, as an edited file is
    Dataset.from_list(rows[:-1]).save_to_disk(tmp_path / "problems")
    with pytest.raises(InputError, match="problems_sha256: "):
        run_rl(config(2), log=lambda r: None)


@pytest.mark.slow
def test_rl_resume_after_crash_matches_uninterrupted(tmp_path, tiny_model_dir, small_countdown):
    def crash_at_3(record):
        if record.get("step") == 3 and "loss" in record:
            raise Crash

    with pytest.raises(Crash):
        run_rl(small_rl_config(tiny_model_dir, small_countdown, tmp_path / "a"), log=crash_at_3)
    assert (tmp_path / "a" / "checkpoint-2" / "state.pt").exists()
    resumed_log = []
    resumed = run_rl(
        small_rl_config(tiny_model_dir, small_countdown, tmp_path / "a"), log=resumed_log.append
    )["history"]
    assert resumed_log[0] == {"resumed_from": str(tmp_path / "a" / "checkpoint-2"), "step": 2}
    # its checkpoints go on only from the same start, which is also the KL term's reference
    other = small_rl_config(tmp_path / "a" / "checkpoint-2", small_countdown, tmp_path / "a")
    with pytest.raises(InputError, match="model: ") as err:
        run_rl(other, log=lambda r: None)
    assert err.value.path == str(tmp_path / "a" / "rl_settings.json")
    # and from the same problems and DAGs, by content: fewer DAGs elsewhere are refused
    problems, dags = small_countdown
    fewer = tmp_path / "fewer-dags.jsonl"
    fewer.write_text("".join(dags.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(InputError, match="dags_sha256: "):
        run_rl(
            small_rl_config(tiny_model_dir, (problems, fewer), tmp_path / "a"), log=lambda r: None
        )
    clean = run_rl(
        small_rl_config(tiny_model_dir, small_countdown, tmp_path / "b"), log=lambda r: None
    )["history"]
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed) == strip(clean)
    # a re-run of the finished run trains nothing: its last step has a checkpoint (before, the
    # run went on from checkpoint-2 and redid steps 3 and 4)
    weights = (tmp_path / "b" / "model.safetensors").read_bytes()
    rerun_log = []
    rerun = run_rl(
        small_rl_config(tiny_model_dir, small_countdown, tmp_path / "b"), log=rerun_log.append
    )
    assert rerun_log == [{"resumed_from": str(tmp_path / "b" / "checkpoint-4"), "step": 4}]
    assert rerun["resumed_from"] == str(tmp_path / "b" / "checkpoint-4")
    assert strip(rerun["history"]) == strip(clean)
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == weights


def test_rl_with_lora_trains_adapters_against_its_own_base_and_resumes(
    tmp_path, tiny_model_dir, small_countdown, monkeypatch
):
    """--use_lora, as GRPOConfig's peft users run it: before, an unknown flag, so RL held a
    full second copy of the model for the KL term and trained every weight."""
    from safetensors.torch import load_file

    from steiner.infer.generate import load

    loads = []
    from_pretrained = rl.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        rl.AutoModelForCausalLM,
        "from_pretrained",
        lambda *a, **k: loads.append(a[0]) or from_pretrained(*a, **k),
    )
    lora = lambda out, **kw: small_rl_config(  # noqa: E731
        tiny_model_dir, small_countdown, out, use_lora=True, lora_r=4, **kw
    )
    whole = run_rl(lora(tmp_path / "whole"), log=lambda r: None)  # 4 steps, checkpoints at 2, 4
    assert whole["config"]["beta"] > 0 and len(loads) == 1  # the reference is the base itself
    start, end = (
        load_file(tiny_model_dir / "model.safetensors"),
        load_file(tmp_path / "whole" / "model.safetensors"),
    )
    assert set(end) == set(start)  # the merged model, loadable anywhere
    changed = [k for k in start if not torch.equal(start[k], end[k])]
    assert changed and all("proj" in k for k in changed)  # the adapted layers, nothing else
    # a crash after checkpoint-2 resumes from the adapter to the same model
    with pytest.raises(Crash):
        run_rl(lora(tmp_path / "halves"), log=lambda r: r.get("step") == 3 and _raise(Crash))
    resumed = run_rl(lora(tmp_path / "halves"), log=lambda r: None)
    assert resumed["resumed_from"] == str(tmp_path / "halves" / "checkpoint-2")
    halves = load_file(tmp_path / "halves" / "model.safetensors")
    assert all(torch.allclose(end[k], halves[k], atol=1e-6) for k in end)
    # its checkpoints are models to eval, as SFT's LoRA checkpoints are
    at_4, _ = load(tmp_path / "whole" / "checkpoint-4")
    assert all(torch.allclose(end[k], v, atol=1e-6) for k, v in at_4.state_dict().items())
    with pytest.raises(InputError, match="written with --use_lora; expected the same setting"):
        run_rl(small_rl_config(tiny_model_dir, small_countdown, tmp_path / "halves", steps=5))
    with pytest.raises(InputError, match="--lora_target_modules: expected --use_lora true"):
        run_rl(
            small_rl_config(
                tiny_model_dir, small_countdown, tmp_path, lora_target_modules=["q_proj"]
            )
        )


@pytest.mark.parametrize("use_lora", [False, True])
def test_rl_bf16_is_autocast_over_fp32_weights(
    tmp_path, tiny_model_dir, small_countdown, layer_dtypes, use_lora
):
    """GRPOConfig's bf16, which TRL's GRPO users leave on (its default on GPUs): before, an
    unknown flag and RL ran in fp32 only. The layers compute in bf16, the policy, its KL
    reference (the second copy, or the policy with its adapters off) and the sampling alike;
    an fp32 checkpoint's weights stay fp32."""
    from safetensors.torch import load_file

    out = tmp_path / "rl"
    cfg = small_rl_config(
        tiny_model_dir, small_countdown, out, steps=2, bf16=True, use_lora=use_lora
    )
    assert [r["step"] for r in run_rl(cfg, log=lambda r: None)["history"]] == [1, 2]
    assert layer_dtypes == {(torch.float32, torch.bfloat16)}
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}
    # a bf16 checkpoint (most on the Hub) trains its bf16 weights, as TRL loads it
    bf16_dir = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(
        bf16_dir
    )
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(bf16_dir)
    layer_dtypes.clear()
    cfg = small_rl_config(
        bf16_dir, small_countdown, tmp_path / "rl-bf16", steps=1, bf16=True, use_lora=use_lora
    )
    run_rl(cfg, log=lambda r: None)
    assert layer_dtypes == {(torch.bfloat16, torch.bfloat16)}


@pytest.mark.parametrize("use_lora", [False, True])
def test_rl_loss_computes_the_completions_logits_only(
    tmp_path, tiny_model_dir, small_countdown, monkeypatch, use_lora
):
    """The policy's and the reference's log-probabilities come from the completion's positions
    only (``logits_to_keep``, as in TRL's GRPO). Before, the model computed the prompt's
    logits too, a vocabulary wide each, and the loss dropped them."""
    from steiner.train.rl import _logprobs

    shapes = []
    from_pretrained = rl.AutoModelForCausalLM.from_pretrained

    def watched(*args, **kwargs):
        model = from_pretrained(*args, **kwargs)

        def record(module, args, kwargs, out):
            shapes.append((kwargs["input_ids"].shape[1], out.logits.shape[1]))

        model.register_forward_hook(record, with_kwargs=True)
        return model

    monkeypatch.setattr(rl.AutoModelForCausalLM, "from_pretrained", watched)
    cfg = small_rl_config(tiny_model_dir, small_countdown, tmp_path / "rl", steps=1,
                          use_lora=use_lora)  # fmt: skip
    run_rl(cfg, log=lambda r: None)
    # sampling: one prefill over the prompts (the last position's logits), then a token at a
    # time; the loss: the policy's forward and the KL reference's over prompt + completion
    [n_prompt] = {seen for seen, kept in shapes if seen > 1 and kept == 1}
    loss_calls = [(seen, kept) for seen, kept in shapes if seen > n_prompt]
    assert len(loss_calls) == 2, shapes
    assert all(kept == seen - n_prompt + 1 for seen, kept in loss_calls), (n_prompt, shapes)

    # the same values as log_softmax-then-gather over every position, at a temperature
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    attention = torch.ones_like(ids)
    attention[0, :2] = 0  # a left-padded prompt
    naive = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits / 0.7, -1)
    naive = naive[:, 4:-1].gather(-1, ids[:, 5:, None]).squeeze(-1)
    assert torch.allclose(_logprobs(model, ids, attention, 5, 0.7), naive, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_rl_micro_batches_give_the_whole_batchs_update(
    tmp_path, tiny_model_dir, small_countdown, loss_type
):
    """--micro_batch_size: a step's completions go through the model in parts, their gradients
    summed. Before, every completion's logits were held at once (a large vocabulary's did not
    fit); the update must not change with the part size."""
    from safetensors.torch import load_file

    weights, losses = {}, {}
    for size in (None, 1, 3):
        out = tmp_path / f"rl-{size}"
        cfg = small_rl_config(
            tiny_model_dir, small_countdown, out, steps=2, save_steps=0, group_size=4,
            loss_type=loss_type, micro_batch_size=size,
        )  # fmt: skip
        losses[size] = [r["loss"] for r in run_rl(cfg, log=lambda r: None)["history"]]
        weights[size] = load_file(out / "model.safetensors")
    start = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(start[k], weights[None][k]) for k in start)  # it did update
    for size in (1, 3):  # 8 completions a step: parts of 1, and of 3, 3 and 2
        assert losses[size] == pytest.approx(losses[None], abs=2e-4)
        assert all(
            torch.allclose(weights[None][k], weights[size][k], atol=1e-6) for k in weights[None]
        )
    with pytest.raises(InputError, match="--micro_batch_size: expected >= 1, got 0"):
        run_rl(small_rl_config(tiny_model_dir, small_countdown, tmp_path, micro_batch_size=0))


def _raise(exc: type[Exception]) -> None:
    raise exc


def test_each_process_resumes_its_own_generators_and_old_checkpoints_their_cpu_one():
    # before: the CPU generator alone was saved, and on a GPU sampling draws from the GPU's
    gpu = torch.cuda.is_available()
    torch.manual_seed(1)
    first = rl.process_rng_state()
    expected = torch.rand(3)
    expected_gpu = torch.rand(3, device="cuda") if gpu else None
    torch.manual_seed(2)
    rl.set_process_rng({"process_rng": [rl.process_rng_state(), first]}, 1)
    assert torch.equal(torch.rand(3), expected)
    if gpu:
        assert torch.equal(torch.rand(3, device="cuda"), expected_gpu)
    rl.set_process_rng({"torch_rng": first["torch"]}, 0)  # a checkpoint from before
    assert torch.equal(torch.rand(3), expected)


def assert_format_rules_held(completions: list[list[int]], ids: TokenIds) -> None:
    """Each completion opens the reasoning, then a step (or ends it), and never opens two steps
    in a row: what the step budget's format rules force on even a random model (one
    whitespace token may come before a structural one; it is left out here)."""
    for c in completions:
        c = [t for t in c if t not in ids.spaces]
        assert c[0] == ids.reasoning_start and c[1] in (ids.step_start, ids.reasoning_end), c
        assert all(not (a == b == ids.step_start) for a, b in pairwise(c)), c


class CPUStandInForVLLM:
    """Plays TRL's ``VLLMGeneration`` on CPU: an engine with its own copy of the weights that,
    for every request, runs the processor our vLLM entry point gives it (``request_processor``
    from the request's ``extra_args``), one token at a time, as vLLM does."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.engine = copy.deepcopy(kwargs["model"]).eval()
        self.ids = token_ids_or_none(kwargs["processing_class"])
        self.syncs, self.completions = 0, []

    def sync_weights(self):
        self.engine.load_state_dict(self.kwargs["model"].state_dict())
        self.syncs += 1

    def generate(self, prompts, images, num_generations):
        params = self.kwargs["generation_kwargs"]
        completions = []
        for prompt in prompts:  # colocate mode: one sample per row, rows repeat the prompts
            processor = request_processor(self.ids, params["extra_args"], self.engine.device)
            out: list[int] = []
            while len(out) < self.kwargs["max_completion_length"]:
                with torch.no_grad():
                    ids = torch.tensor([prompt + out], device=self.engine.device)
                    logits = self.engine(ids).logits[0, -1]
                logits = processor(out, logits) / self.kwargs["temperature"]
                out.append(int(torch.multinomial(torch.softmax(logits, -1), 1)))
                if out[-1] in params["stop_token_ids"]:
                    break
            completions.append(out)
        self.completions += completions
        return prompts, completions, None, None


@pytest.mark.slow
def test_rl_generates_through_trl_vllm_backend(
    tmp_path, tiny_model_dir, small_countdown, monkeypatch
):
    """--use_vllm hands sampling to TRL's VLLMGeneration with arguments its (pinned) signature
    accepts, switches the step budget on through extra_args, and pushes the weights to the
    engine after every update."""
    from trl.generation.vllm_generation import VLLMGeneration

    engines = []

    def stand_in(cfg, model, accelerator, tokenizer):
        kwargs = rl.vllm_generation_kwargs(cfg, model, accelerator, tokenizer)
        inspect.signature(VLLMGeneration).bind(**kwargs)
        engines.append(CPUStandInForVLLM(**kwargs))
        return engines[-1]

    monkeypatch.setattr(rl, "vllm_generation", stand_in)
    cfg = small_rl_config(
        tiny_model_dir, small_countdown, tmp_path / "rl", steps=3, use_vllm=True, save_steps=0
    )
    history = run_rl(cfg, log=lambda r: None)["history"]
    (engine,) = engines
    assert len(history) == 3 and engine.syncs == 1 + 3
    assert len(engine.completions) == 3 * cfg.prompts_per_step * cfg.group_size
    # the budget ran inside the engine: a random model starts every completion as forced
    assert_format_rules_held(engine.completions, engine.ids)
    # the engine holds the trained weights, not the ones it started from
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "rl").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    engine_state = {k: v.cpu() for k, v in engine.engine.state_dict().items()}  # on a GPU too
    assert all(torch.equal(engine_state[k], trained[k]) for k in trained)
    assert any(not torch.equal(initial[k], trained[k]) for k in trained)


def test_rl_settings_are_checked(tmp_path, tiny_model_dir, small_countdown):
    for bad, message in (
        ({"loss_type": "mean"}, "grpo or dapo"),
        ({"temperature": 0}, "> 0"),
        # a negative norm turned the gradient round (clip_grad_norm_ scales by it)
        ({"max_grad_norm": -1.0}, "--max_grad_norm: expected >= 0 (0: no clipping), got -1.0"),
        ({"vllm_gpu_memory_utilization": 1.5}, "expected a share from 0 to 1, got 1.5"),
        ({"top_p": 0}, "--top_p: expected > 0 and <= 1 (1: off), got 0"),
        ({"top_p": 1.5}, "--top_p: expected > 0 and <= 1 (1: off), got 1.5"),
        ({"top_k": -1}, "--top_k: expected >= 0 (0: off), got -1"),
        ({"min_p": 2.0}, "--min_p: expected a share from 0 to 1, got 2.0"),
    ):
        cfg = small_rl_config(tiny_model_dir, small_countdown, tmp_path, **bad)
        with pytest.raises(InputError, match=re.escape(message)):
            run_rl(cfg, log=lambda r: None)
    cfg = small_rl_config(tiny_model_dir, small_countdown, tmp_path, vllm_mode="remote")
    with pytest.raises(InputError, match="colocate or server"):
        rl.vllm_generation_kwargs(cfg, None, None, None)
    if importlib.util.find_spec("vllm") is None:
        cfg = small_rl_config(tiny_model_dir, small_countdown, tmp_path, use_vllm=True)
        with pytest.raises(InputError, match="vLLM is not installed"):
            run_rl(cfg, log=lambda r: None)


@pytest.mark.parametrize("sampling_filter", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}])
def test_rl_sampling_filters_reach_the_sampler(tiny_model_dir, sampling_filter):
    """GRPOConfig's top_p, top_k and min_p: each at its tightest keeps the most likely token
    only, so a group's completions are the same at a temperature whose plain samples differ;
    vLLM gets them too."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    eos = TokenIds.from_tokenizer(tok).eos
    enc = tok(["Using 3 4 5, reach 12."] * 6, return_tensors="pt", add_special_tokens=False)

    def samples(**settings):
        cfg = RLStageConfig(temperature=2.0, max_new_tokens=16, group_size=6, **settings)
        torch.manual_seed(0)
        return rl.sample_completions(model, tok, enc, cfg, eos)

    assert len({tuple(c) for c in samples()}) > 1
    assert len({tuple(c) for c in samples(**sampling_filter)}) == 1
    cfg = RLStageConfig(**sampling_filter)
    kwargs = rl.vllm_generation_kwargs(cfg, None, None, tok)
    assert {k: kwargs[k] for k in sampling_filter} == sampling_filter


def test_train_rl_ends_with_a_summary_table_and_says_when_it_resumed(
    tmp_path, tiny_model_dir, small_countdown
):
    problems, dags = small_countdown
    args = ["train", "rl", "--model", str(tiny_model_dir), "--problems", str(problems)]
    args += ["--dags", str(dags), "--output_dir", str(tmp_path / "rl"), "--steps", "2"]
    args += ["--save_steps", "1", "--max_new_tokens", "16", "--prompts_per_step", "2"]
    env = {**os.environ, "COLUMNS": "200"}
    runs = [
        subprocess.run(
            [sys.executable, "-m", "steiner.cli", *args], capture_output=True, text=True, env=env
        )
        for _ in range(2)
    ]
    assert [r.returncode for r in runs] == [0, 0], runs[-1].stderr
    first, again = runs[0].stderr, runs[1].stderr  # the console is stderr, as a log
    assert re.search(r"what +┃ +first 1 steps +┃ +last 1 steps", first)
    for row in ("mean_reward", "accuracy", "mean_steps", "mean_backtracks"):
        assert re.search(rf"{row} +│ +-?\d+\.\d{{3}} +│ +-?\d+\.\d{{3}}", first), row
    assert re.search(r"resumed_from +│ +None", first) and "resumed from" not in first
    last = tmp_path / "rl" / "checkpoint-2"
    assert f"resumed from {last} (step 2)" in again
    assert re.search(rf"resumed_from +│ +{re.escape(str(last))}", again)


def test_every_prompt_must_leave_max_new_tokens_of_the_models_positions(
    tmp_path, tiny_model_dir, small_countdown
):
    # before: RL generated past the model's 2,048 positions with transformers' warning alone
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    problems = [json.loads(line) for line in small_countdown[0].read_text().splitlines()]
    prompts = [[{"role": "user", "content": p["question"]}] for p in problems]
    longest = max(
        len(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True)["input_ids"])
        for c in prompts
    )
    room = 2048 - longest
    out = tmp_path / "rl"
    cfg = small_rl_config(tiny_model_dir, small_countdown, out, max_new_tokens=room + 1)
    with pytest.raises(InputError, match=rf"^--max_new_tokens: expected at most {room} \("):
        run_rl(cfg, log=lambda r: None)
    assert not out.exists()  # checked before anything is written
    cfg.max_new_tokens = room
    rl.check_room_for_completions(tok, 2048, problems, cfg)  # exactly fills them: no error
    fills = rf"has a prompt of {longest} tokens .* {longest} positions; expected prompts"
    with pytest.raises(InputError, match=fills):
        rl.check_room_for_completions(tok, longest, problems, cfg)


@pytest.mark.slow
def test_max_grad_norm_0_means_no_clipping(tmp_path, tiny_model_dir, small_countdown):
    from safetensors.torch import load_file

    # before: clip_grad_norm_ to 0 zeroed every gradient (only weight decay moved the model)
    weights = {}
    for norm in (0.0, 1e9):  # no clipping, and a bound no gradient reaches
        out = tmp_path / f"rl-{norm}"
        cfg = small_rl_config(
            tiny_model_dir,
            small_countdown,
            out,
            steps=2,
            save_steps=0,
            max_grad_norm=norm,
            group_size=4,
        )
        run_rl(cfg, log=lambda r: None)
        weights[norm] = load_file(out / "model.safetensors")
    assert all(torch.equal(weights[0.0][k], weights[1e9][k]) for k in weights[0.0])


def test_forced_decisions_are_the_tokens_after_the_first_step_ends():
    E = 7  # a stand-in step-end id
    ids = [1, 2, E, 3, 4, E, 5, 6, E, 8]
    assert rl.forced_decisions(ids, E, 0) == [] and rl.forced_decisions(ids, E, 1) == []
    assert rl.forced_decisions(ids, E, 2) == [3]
    assert rl.forced_decisions(ids, E, 3) == [3, 6]
    assert rl.forced_decisions(ids, E, 9) == [3, 6, 9]
    assert rl.forced_decisions([1, E], E, 3) == []  # cut right after a step end
    # the budget lets one whitespace token come before a decision: it too was sampled with
    # the end forbidden
    S = 9  # a stand-in newline id
    assert rl.forced_decisions([1, E, S, 3, 4, E, 5], E, 3, frozenset({S})) == [2, 3, 6]
    assert rl.forced_decisions([1, E, S], E, 2, frozenset({S})) == [2]


def test_forced_decisions_leave_the_loss_but_stay_in_attention():
    E, S = 7, 9
    completions = [[1, E, S, 3, 4, E, 5], [1, E, 3]]
    comp, present, loss_mask, adv = rl.completion_batch(
        completions, [0.5, -1.0], 0, E, forced_min_steps=2, spaces=frozenset({S})
    )
    assert comp.tolist() == [[1, E, S, 3, 4, E, 5], [1, E, 3, 0, 0, 0, 0]]
    assert present.tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]  # forced tokens attended to
    assert loss_mask.tolist() == [[1, 1, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0]]
    assert adv[0, 6] == 0.5 and adv[1, 2] == -1.0 and adv[1, 3] == 0


def test_rl_samples_some_groups_under_a_forced_minimum(tmp_path, tiny_model_dir, small_countdown):
    cfg = small_rl_config(
        tiny_model_dir, small_countdown, tmp_path, steps=2, save_steps=0, forced_min_share=1.0
    )
    history = run_rl(cfg, log=lambda r: None)["history"]
    assert all(2 <= r["forced_min_steps"] <= 3 for r in history)
    plain = small_rl_config(tiny_model_dir, small_countdown, tmp_path / "plain", steps=2)
    assert all(r["forced_min_steps"] == 0 for r in run_rl(plain, log=lambda r: None)["history"])
    for bad, message in (
        ({"forced_min_share": 0.5, "use_vllm": True}, "with --use_vllm"),
        ({"forced_min_steps": 1}, ">= 2"),
        # each was a traceback (an IndexError, transformers' ValueError) or a silent no-op
        ({"prompts_per_step": 0}, "--prompts_per_step: expected >= 1, got 0"),
        ({"max_new_tokens": 0}, "--max_new_tokens: expected >= 1, got 0"),
        ({"group_size": 1}, r"--group_size: expected >= 2 \(GRPO compares"),
        ({"steps": 0}, "--steps: expected >= 1, got 0"),
        ({"save_steps": -1}, "--save_steps: expected >= 0"),
    ):
        with pytest.raises(InputError, match=message):
            run_rl(small_rl_config(tiny_model_dir, small_countdown, tmp_path, **bad))


def test_step_budget_is_a_vllm_entry_point():
    """vLLM loads every processor of this group into each engine it starts."""
    (point,) = [
        ep
        for ep in importlib.metadata.entry_points(group="vllm.logits_processors")
        if ep.value.startswith("steiner.")
    ]
    assert point.value == "steiner.infer.vllm_budget:StepBudgetVLLM"


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
    reason="needs vLLM and a GPU",
)
def test_rl_with_real_vllm(tmp_path, tiny_model_dir, small_countdown, monkeypatch):
    """TRL's colocated engine samples under the format rules: every completion opens the
    reasoning and then a step (or ends it), and never opens two steps in a row."""
    completions = []

    def recording(*args):
        engine = real_vllm_generation(*args)
        generate = engine.generate

        def record(*a, **k):
            out = generate(*a, **k)
            completions.extend(list(c) for c in out[1])
            return out

        engine.generate = record
        return engine

    real_vllm_generation = rl.vllm_generation
    monkeypatch.setattr(rl, "vllm_generation", recording)
    cfg = small_rl_config(
        tiny_model_dir, small_countdown, tmp_path / "rl", steps=2, use_vllm=True, save_steps=0
    )
    history = run_rl(cfg, log=lambda r: None)["history"]
    assert len(history) == 2 and (tmp_path / "rl" / "model.safetensors").exists()
    assert len(completions) == 2 * cfg.prompts_per_step * cfg.group_size
    ids = TokenIds.from_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    assert_format_rules_held(completions, ids)


def test_colocated_vllm_engine_gets_the_step_budget(
    tmp_path, tiny_model_dir, small_countdown, monkeypatch
):
    """Loaded from the entry point alone the processor is blind under vLLM's async scheduling,
    so the engine TRL builds in colocate mode is given it explicitly, for that call only."""
    import trl.generation.vllm_generation as trl_vllm

    engines = []

    class RecordingLLM:
        def __init__(self, **kwargs):
            engines.append(kwargs)

    accelerator = Accelerator()  # as run_rl builds it (the state is per process)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = small_rl_config(tiny_model_dir, small_countdown, tmp_path, use_vllm=True)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "vllm" else find_spec(name, *a),
    )
    monkeypatch.setattr(trl_vllm, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(trl_vllm, "LLM", RecordingLLM, raising=False)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # TRL sets RANK, MASTER_PORT, ...
    rl.vllm_generation(cfg, model, accelerator, tokenizer)
    (kwargs,) = engines
    assert kwargs["logits_processors"] == [VLLM_PROCESSOR]
    assert kwargs["model"] == model.name_or_path and kwargs["gpu_memory_utilization"] == 0.3
    assert trl_vllm.LLM is RecordingLLM


def test_rl_reports_each_step_to_the_trackers_report_to_names(
    tmp_path, tiny_model_dir, small_countdown, monkeypatch
):
    # GRPOConfig's report_to; before, RL logged to the console and its checkpoints only
    from accelerate import tracking
    from accelerate.utils import LoggerType

    logged: dict[str, list] = {"config": [], "steps": [], "finished": []}

    class Recorder(tracking.GeneralTracker):  # stands in for tensorboard, not installed here
        name = "tensorboard"
        requires_logging_directory = True

        def __init__(self, run_name: str, logging_dir: str, **kwargs):
            super().__init__()
            logged["run"] = (run_name, str(logging_dir))

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values: dict) -> None:
            logged["config"].append(values)

        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            logged["steps"].append((step, values))

        def finish(self) -> None:
            logged["finished"].append(True)

    with pytest.raises(InputError, match="--report_to: tensorboard is not installed"):
        run_rl(
            small_rl_config(
                tiny_model_dir, small_countdown, tmp_path / "a", report_to=["tensorboard"]
            )
        )
    monkeypatch.setattr(tracking, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])
    monkeypatch.setitem(tracking.LOGGER_TYPE_TO_CLASS, "tensorboard", Recorder)
    out = tmp_path / "rl"
    cfg = small_rl_config(tiny_model_dir, small_countdown, out, steps=2, report_to=["tensorboard"])
    history = run_rl(cfg, log=lambda r: None)["history"]
    assert logged["run"] == ("steiner-rl", str(out))
    [config] = logged["config"]  # flat scalars, as tensorboard's hparams take them
    assert config["group_size"] == 2 and config["correct"] == RewardWeights().correct
    assert all(isinstance(v, (int, float, str, bool)) for v in config.values())
    assert [step for step, _ in logged["steps"]] == [1, 2]
    for (_, values), record in zip(logged["steps"], history, strict=True):
        assert values["mean_reward"] == record["mean_reward"] and values["loss"] == record["loss"]
        assert {f"terms/{k}" for k in record["terms"]} <= set(values)
    assert logged["finished"] == [True]
    with pytest.raises(InputError, match="expected none, all or one of aim, "):
        run_rl(
            small_rl_config(tiny_model_dir, small_countdown, tmp_path / "b", report_to=["wandbb"])
        )
