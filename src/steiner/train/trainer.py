"""Run a training stage with TRL's SFTTrainer: token budget, tokens/s logging, checkpoints,
resume, optional LoRA, and a final ``save_pretrained`` model."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, Features, List, Value
from huggingface_hub import HfApi, ModelCard
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerState,
)
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer

from steiner.format import reasoning_token_ids
from steiner.infer.adapters import load_token_rows, save_token_rows, token_row_weights
from steiner.infer.generate import position_limit
from steiner.io import (
    InputError,
    check_checkpoint_inputs,
    check_model_dir,
    check_resume_record,
    last_checkpoint,
    local_path,
    sole_writer,
    source_digest,
    source_digests,
    write_json,
)
from steiner.train.config import CPTStageConfig, SFTStageConfig
from steiner.train.data import cpt_dataset, sft_dataset
from steiner.train.model import add_lora, model_dtype, reset_unseen_tokens


def tokens_spent(state: TrainerState, budget: int | None) -> bool:
    """Whether a run with a token budget (None: none) has seen that many non-padding tokens."""
    return bool(budget) and state.num_input_tokens_seen >= budget


class TokenBudget(TrainerCallback):
    """Stop once the trainer has seen ``budget`` non-padding tokens (equal-token baselines)."""

    def __init__(self, budget: int):
        self.budget = budget

    def on_step_end(self, args, state, control, **kwargs):
        if tokens_spent(state, self.budget):
            control.should_training_stop = True
        return control


# Above this many tokens a batch's full logits get large and TRL's chunked LM head pays off
FUSED_LM_HEAD_MIN_VOCAB = 32_768


class TrainTime(TrainerCallback, ExportableState):
    """Training seconds of this run and of the runs before it, kept in each checkpoint's
    ``trainer_state.json`` (``stateful_callbacks``), so a resumed run's summary can say what
    all the steps of its model took (time after the last checkpoint of a crashed run is
    not counted: those steps are trained again)."""

    def __init__(self, earlier: float = 0.0):
        self.earlier = earlier
        self._start: float | None = None

    @classmethod
    def resumed_from(cls, state: TrainerState | None) -> TrainTime:
        saved = state.stateful_callbacks.get(cls.__name__) if state else None
        return cls(**saved["args"]) if saved else cls()

    def seconds(self) -> float:
        now = time.perf_counter()
        return self.earlier + (now - self._start if self._start is not None else 0.0)

    def state(self) -> dict:
        return {"args": {"earlier": round(self.seconds(), 2)}, "attributes": {}}

    def start(self) -> None:
        """Starts the clock where the run's own ``train_seconds`` does: on a GPU the Trainer's
        setup before ``on_train_begin`` (placing the model, CUDA's start) took most of a short
        run, which a resumed run's total then left out."""
        self._start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        if self._start is None:
            self._start = time.perf_counter()
        # a checkpoint written before this callback existed has no entry to update
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())


def tokenize_chats(
    batch: dict[str, list],
    tokenizer: Any,
    assistant_only_loss: bool,
    chat_template: str | None,
    kept: slice | None,
) -> dict[str, list]:
    """A batch of chats as TRL's SFT prepares them: ids and labels (-100 outside the assistant
    turns under ``assistant_only_loss``); with a ``kept`` slice (``max_length``), cut to it and
    rows left without a trained token dropped."""
    out = tokenizer.apply_chat_template(
        batch["messages"],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=assistant_only_loss,
        chat_template=chat_template,
    )
    rows: dict[str, list] = {"input_ids": [], "labels": []}
    for i, ids in enumerate(out["input_ids"]):
        if assistant_only_loss:
            mask = out["assistant_masks"][i]
            if 1 not in mask:  # TRL's error, as TRL words it
                raise RuntimeError(
                    "You're using `assistant_only_loss=True`, but at least one example has no "
                    "assistant tokens. This usually means the tokenizer's chat template doesn't "
                    "generate assistant masks — it may be missing the `{% generation %}` keyword."
                )
            labels = [token if bit else -100 for token, bit in zip(ids, mask, strict=True)]
        else:
            labels = list(ids)
        if kept is not None:
            ids, labels = ids[kept], labels[kept]
        if kept is None or any(label != -100 for label in labels):
            rows["input_ids"].append(ids)
            rows["labels"].append(labels)
    return rows


def shared_tied_keys(model: Any) -> set[str]:
    """The tied parameter names whose tensor really is their source's (a checkpoint stores
    those once, under the source's name)."""
    shared = set()
    for key, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        try:
            if model.get_parameter(key) is model.get_parameter(source):
                shared.add(key)
        except AttributeError:  # a name this model (e.g. a PEFT wrapper) does not have
            continue
    return shared


class _RateClock(TrainerCallback):
    """Starts the tokens-per-second clock when training begins (after a resumed run has
    loaded its token count), so the first log has a rate too."""

    def __init__(self, trainer: SteinerTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._t0 = time.perf_counter()
        self.trainer._tokens0 = state.num_input_tokens_seen


class SteinerTrainer(SFTTrainer):
    """SFTTrainer that also logs tokens seen and tokens per second, and that can take the
    model's own cross-entropy instead of TRL's chunked LM head (``fused_lm_head=False``)."""

    _t0: float | None = None
    _tokens0 = 0
    fused_lm_head = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.add_callback(_RateClock(self))

    @property
    def new_token_ids(self) -> list[int] | None:
        """The embedding rows a LoRA run trains through a gradient mask (see train_rows_only),
        outside the adapter, so that its checkpoints carry them beside it."""
        return reasoning_token_ids(self.processing_class) if self.args.use_lora else None

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict)
        # the writer alone: under DDP every process calls _save, and another's write raced
        # the writer's folder (safetensors' temp file, "No such file or directory")
        if (ids := self.new_token_ids) is not None and self.args.should_save:
            save_token_rows(self.model, ids, output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if (ids := self.new_token_ids) is not None:
            load_token_rows(model or self.model, ids, resume_from_checkpoint)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        # TRL gathers the card's tags in a set and writes them in its iteration order, which
        # PYTHONHASHSEED changes from run to run: the same command wrote different README.md
        super().create_model_card(*args, **kwargs)
        card_path = Path(self.args.output_dir, "README.md")
        if self.is_world_process_zero() and card_path.is_file():
            card = ModelCard.load(card_path)
            if card.data.tags:
                card.data.tags = sorted(card.data.tags)
                card.save(card_path)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # transformers 5 writes a tied LM head once, under the input embeddings, and then warns
        # on every resume that "lm_head.weight" is missing: Trainer only recognises tied keys
        # through ``_keys_to_ignore_on_save``, which Llama leaves empty. The head shares the
        # embeddings' tensor, so nothing was lost; only such keys leave the warning
        shared = shared_tied_keys(self.model)
        missing = [k for k in load_result.missing_keys if k not in shared]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _prepare_dataset(
        self,
        dataset: Any,
        processing_class: Any,
        args: Any,
        packing: bool,
        formatting_func: Any,
        dataset_name: str,
    ) -> Any:
        # TRL tokenizes a chat dataset one row per call, in four row-by-row passes (tokens,
        # labels, truncation, the drop of rows left without a trained token): 36 s for the
        # quick demo's 60,000 walks, a third of its CPT's time. The same apply_chat_template call on
        # batches of rows, in one batched map, gives the same ids and labels in ~13 s
        # (tests/test_train.py compares the two). Anything else goes TRL's way.
        if not (
            isinstance(dataset, Dataset)
            and dataset.column_names == ["messages"]
            and dataset.format["type"] is None
            and formatting_func is None
            and not packing
            and isinstance(processing_class, PreTrainedTokenizerBase)
            and args.truncation_mode in ("keep_start", "keep_end")
        ):
            return super()._prepare_dataset(
                dataset, processing_class, args, packing, formatting_func, dataset_name
            )
        if args.max_length is None:
            kept = None
        elif args.truncation_mode == "keep_start":
            kept = slice(None, args.max_length)
        else:
            kept = slice(-args.max_length, None)
        dataset = dataset.map(
            tokenize_chats,
            batched=True,
            batch_size=1000,
            remove_columns=["messages"],
            # TRL's types (datasets keeps input_ids in int32), and the columns even where every
            # row was dropped: a map that returns no rows would keep the messages instead
            features=Features({"input_ids": List(Value("int32")), "labels": List(Value("int64"))}),
            fn_kwargs={
                "tokenizer": processing_class,
                "assistant_only_loss": args.assistant_only_loss,
                "chat_template": self.chat_template,
                "kept": kept,
            },
            num_proc=args.dataset_num_proc,
            desc=f"Tokenizing {dataset_name} dataset",
        )
        return dataset.shuffle(seed=args.seed) if args.shuffle_dataset else dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fused_lm_head:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # TRL 1.16 always scores through its chunked log-prob head. With the demo's micro
        # model (436 tokens, batch 32, one CPU thread) that held SFT at ~4.5k tokens/s, where
        # transformers' own loss, the same mean token cross-entropy, gives ~5.5k
        # (benchmarks/bench_sft.py)
        loss, outputs = Trainer.compute_loss(
            self,
            model,
            {**inputs, "use_cache": False},
            return_outputs=True,
            num_items_in_batch=num_items_in_batch,
        )
        self._log_token_metrics(outputs.logits.detach(), inputs)
        return (loss, outputs) if return_outputs else loss

    def _log_token_metrics(self, logits: torch.Tensor, inputs: dict[str, Any]) -> None:
        """The entropy, token accuracy and token count TRL logs, from the full logits."""
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"][:, 1:]
        mask = labels != -100
        logp = logits[:, :-1][mask].float().log_softmax(-1)
        valid = self.accelerator.gather_for_metrics(mask.sum()).sum()
        entropy = self.accelerator.gather_for_metrics(-(logp.exp() * logp).sum()).sum()
        top1 = self.accelerator.gather_for_metrics((logp.argmax(-1) == labels[mask]).sum()).sum()
        self._metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append(
            (top1 / valid).item() if valid > 0 else 0.0
        )
        if mode == "train":
            # padding-free batches carry position ids instead of an attention mask
            attention = inputs.get("attention_mask")
            local = (
                attention.sum()
                if attention is not None
                else torch.tensor(inputs["position_ids"].size(1))
            )
            tokens = self.accelerator.gather_for_metrics(local.to(logits.device)).sum()
            self._total_train_tokens += tokens.item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        now, seen = time.perf_counter(), self.state.num_input_tokens_seen
        # the end-of-training summary follows the last step's log with no tokens between: a
        # rate of 0 there would read as a stall (the summary has train_tokens_per_second)
        if self._t0 is not None and now > self._t0 and seen > self._tokens0:
            logs["tokens_per_s"] = round((seen - self._tokens0) / (now - self._t0), 1)
        logs["tokens_seen"] = seen
        self._t0, self._tokens0 = now, seen
        super().log(logs, start_time)


def train_rows_only(weight: torch.nn.Parameter, rows: list[int]) -> None:
    """Make an embedding matrix trainable for some rows only (the new tokens under LoRA).

    PEFT's token wrappers are not used because TRL 1.16 computes the loss from
    ``lm_head.weight`` directly, which would bypass them on the output side. A gradient mask
    keeps the other rows exactly as they were (weight decay is 0 by default)."""
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype)
    mask[rows] = 1
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * mask.to(grad.device))


def _load(cfg: SFTStageConfig | CPTStageConfig) -> tuple[Any, Any]:
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=model_dtype(cfg.bf16))
    if cfg.use_lora:
        model = add_lora(model, cfg)
        new_ids = reasoning_token_ids(tokenizer)
        for weight in token_row_weights(model).values():
            train_rows_only(weight, new_ids)
    return model, tokenizer


def reached_limit(state: TrainerState, cfg: SFTStageConfig | CPTStageConfig) -> bool:
    """Whether a checkpoint's trainer state already reached the run's step or token limit."""
    steps = cfg.max_steps if cfg.max_steps > 0 else state.max_steps
    return state.global_step >= steps or tokens_spent(state, cfg.max_train_tokens)


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint the Trainer finished writing. It writes one in place, its
    ``trainer_state.json`` last, so a run killed while saving leaves a checkpoint without it;
    a re-run goes on from the one before (``get_last_checkpoint`` picks the half one, and
    the run could not resume at all)."""
    last = last_checkpoint(output_dir, "trainer_state.json")
    return str(last) if last else None


def check_trained_examples(
    cfg: SFTStageConfig | CPTStageConfig,
    before: int,
    after: int,
    data: str | None = None,
    cut_to_positions: bool = False,
) -> None:
    """TRL drops an example that truncation to ``max_length`` leaves without a trained token
    (its prompt fills it); if that is every example, one error line, not the sampler's
    IndexError on an empty dataset (for a held-out set, at its first evaluation).
    ``cut_to_positions``: ``max_length`` is the model's positions, not the flag's value."""
    if after == 0 and before > 0:
        data = data or (cfg.data if isinstance(cfg, SFTStageConfig) else "--paths")
        limit, remedy = (
            (f"the model's {cfg.max_length} positions", "a model with more positions")
            if cut_to_positions
            else (f"--max_length {cfg.max_length}", "a larger --max_length")
        )
        raise InputError(
            data,
            None,
            f"no example has a trained token within {limit} (each prompt fills it); "
            f"expected {remedy}",
        )


def hub_request_failed(exc: BaseException) -> bool:
    """Whether an error came from a request to the Hub (no network, no token, a name taken):
    the trainer creates its repo when it is built, before any step, and huggingface_hub's
    errors surface as those of its HTTP stack (httpx, or the httpx2 fork it may use)."""
    seen: BaseException | None = exc
    while seen is not None:
        package = type(seen).__module__.split(".")[0]
        if package in ("huggingface_hub", "httpx", "httpx2", "httpcore", "httpcore2", "requests"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def error_line(exc: BaseException) -> str:
    """An exception as ``Type: message`` on one line (huggingface_hub's run over several)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def tokens_present(dataset: Dataset, vocab: int) -> torch.Tensor:
    """One bool per vocabulary id: whether a row of the tokenized ``dataset`` holds it."""
    seen = torch.zeros(vocab, dtype=torch.bool)
    for batch in dataset.iter(batch_size=1024):
        ids = torch.tensor(list(itertools.chain.from_iterable(batch["input_ids"])))
        seen[ids[ids < vocab]] = True
    return seen


def run_stage(
    cfg: SFTStageConfig | CPTStageConfig,
    dataset: Dataset,
    stage: str,
    callbacks: list[TrainerCallback] | None = None,
    eval_dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Train ``dataset``, from the start or on from ``check_resume``'s checkpoint; the loss of
    ``eval_dataset`` is logged by ``cfg.eval_strategy``."""
    model, tokenizer = _load(cfg)
    asked_max_length = cfg.max_length
    positions = position_limit(model)
    if positions and (cfg.max_length is None or cfg.max_length > positions):
        # an example past the model's positions stopped a learned position table (GPT-2) with
        # IndexError mid-step, and RoPE trained on positions generate never lets it reach:
        # examples are cut at the positions, as --max_length cuts them
        cfg.max_length = positions
    cfg.include_num_input_tokens_seen = "non_padding"  # the budget and tokens/s need it
    try:
        trainer = SteinerTrainer(
            model=model,
            args=cfg,
            train_dataset=dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    except Exception as exc:
        if cfg.push_to_hub and hub_request_failed(exc):
            raise InputError(
                "--push_to_hub",
                None,
                f"cannot create the Hub repo {cfg.hub_model_id or Path(cfg.output_dir).name} "
                f"({error_line(exc)})",
            ) from None
        if isinstance(exc, ValueError):
            # TRL refuses, as it builds the trainer, settings that do not go together or do
            # not fit the data (--eos_token not in the vocabulary, --assistant_only_loss on
            # CPT's plain text): its message says which, and nothing has trained yet
            command = "steiner train " + ("cpt" if stage == "cpt" else "sft")
            raise InputError(command, None, " ".join(str(exc).split())) from None
        raise
    # packed rows are not examples (CPT's documents wrap across them), and none is dropped
    trained = len(dataset) if cfg.packing else len(trainer.train_dataset)
    cut = cfg.max_length != asked_max_length
    check_trained_examples(cfg, len(dataset), trained, cut_to_positions=cut)
    if eval_dataset is not None:
        check_trained_examples(
            cfg,
            len(eval_dataset),
            len(trainer.eval_dataset),
            getattr(cfg, "eval_data", None),
            cut_to_positions=cut,
        )
    # after the trainer has prepared the data, so that data it cannot train stop the run
    # before anything is written
    last = check_resume(cfg, stage)
    resumed = (
        TrainerState.load_from_json(os.path.join(last, "trainer_state.json")) if last else None
    )
    clock = TrainTime.resumed_from(resumed)
    trainer.add_callback(clock)
    if cfg.max_train_tokens:
        trainer.add_callback(TokenBudget(cfg.max_train_tokens))
    vocab = model.get_output_embeddings().weight.shape[0]
    fused = cfg.fused_lm_head
    if fused is None:  # other loss types than nll need TRL's head (the config checks a False)
        fused = vocab > FUSED_LM_HEAD_MIN_VOCAB or cfg.loss_type != "nll"
    trainer.fused_lm_head = fused
    start = time.perf_counter()
    clock.start()
    if resumed and reached_limit(resumed, cfg):
        # transformers' loop, resumed from a checkpoint at max_steps, still takes one more
        # optimiser step before it checks the limit: a re-run of a finished stage would train on
        trainer._load_from_checkpoint(last)
        trainer.state = resumed
        mean_loss = None
    else:
        mean_loss = trainer.train(resume_from_checkpoint=last).training_loss
    seconds = time.perf_counter() - start
    # this run's tokens only: a resumed run's checkpoint brought the earlier ones
    tokens_now = trainer.state.num_input_tokens_seen - (
        resumed.num_input_tokens_seen if resumed else 0
    )
    reset = None
    if stage == "cpt" and cfg.reset_unseen_tokens:
        # the saved model only: checkpoints keep the trained rows, so a resumed run trains on
        # from what it trained
        reset = reset_unseen_tokens(
            trainer.accelerator.unwrap_model(trainer.model),
            tokens_present(trainer.train_dataset, vocab),
        )
    try:
        save_final_model(trainer, cfg, tokenizer)
        push_failure = None
    except Exception as exc:
        if not (cfg.push_to_hub and hub_request_failed(exc)):
            raise
        # the model is on disk by now: the summary is still written, and the error says so
        push_failure = exc
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    summary = {
        "stage": stage,
        "model": cfg.model,
        "examples": trained,
        "examples_dropped": len(dataset) - trained,
        "max_length": cfg.max_length,
        "max_length_asked": asked_max_length,
        "steps": trainer.state.global_step,
        "resumed_from": last,
        "fused_lm_head": trainer.fused_lm_head,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "train_seconds": round(seconds, 2),  # this run
        "train_seconds_all_runs": round(clock.earlier + seconds, 2),
        "tokens_per_s": round(tokens_now / max(seconds, 1e-9), 1),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "mean_train_loss": mean_loss,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "tokens_reset": reset,  # by --reset_unseen_tokens (None: not asked)
        "log_history": trainer.state.log_history,
    }
    if trainer.accelerator.is_main_process:
        write_json(Path(cfg.output_dir, "training_summary.json"), summary)
    if push_failure is not None:
        raise InputError(
            "--push_to_hub",
            None,
            f"trained and saved in {cfg.output_dir}, but the push to the Hub repo "
            f"{trainer.hub_model_id} failed ({error_line(push_failure)}); the same command "
            "again pushes it",
        ) from None
    return summary


# A LoRA run's checkpoint pushes (hub_strategy) copy the adapter into output_dir and the repo's
# root, where from_pretrained would read the merged model as an adapter of a base it may not reach
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]


def save_final_model(
    trainer: Trainer, cfg: SFTStageConfig | CPTStageConfig, tokenizer: Any
) -> None:
    """Save the trained model and its tokenizer in ``output_dir`` and, with ``--push_to_hub``,
    upload them as ``Trainer.push_to_hub`` does at the end of training."""
    main = trainer.accelerator.is_main_process
    if not cfg.use_lora:
        # gathers ZeRO-3 / FSDP shards on multi-GPU runs; pushes output_dir with push_to_hub
        trainer.save_model(cfg.output_dir)
        if main:
            tokenizer.save_pretrained(cfg.output_dir)
        return
    # merged, so the saved model loads without PEFT; Trainer's own push would save and upload
    # the adapter instead, so the merged model is uploaded here
    merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
    if not main:
        return
    for name in ADAPTER_FILES:  # copied there by the checkpoints' pushes (hub_strategy)
        Path(cfg.output_dir, name).unlink(missing_ok=True)
    merged.save_pretrained(cfg.output_dir)
    tokenizer.save_pretrained(cfg.output_dir)
    if cfg.push_to_hub:
        trainer.create_model_card(model_name=trainer.hub_model_id.split("/")[-1])
        trainer._finish_current_push()  # a checkpoint's upload may still be running
        HfApi().upload_folder(
            repo_id=trainer.hub_model_id,
            folder_path=cfg.output_dir,
            commit_message="End of training",
            token=cfg.hub_token,
            revision=cfg.hub_revision,
            ignore_patterns=["_*", f"{PREFIX_CHECKPOINT_DIR}-*", *ADAPTER_FILES],
            delete_patterns=ADAPTER_FILES,
        )


SETTINGS_FILE = "train_settings.json"


def stage_inputs(cfg: SFTStageConfig | CPTStageConfig, stage: str) -> dict[str, Any]:
    """What a stage trains from: the model it starts at and its data. A checkpoint continues
    only with these; hyperparameters may change on resume, as with Trainer's
    ``resume_from_checkpoint`` (to train on to more steps, say). Data files are checked by
    content, the model by its path (hashing gigabytes of weights on every start is not worth
    it: a stage's start model is a finished stage's output, which Steiner does not rewrite)."""
    inputs = {"stage": stage, "model": local_path(cfg.model)}
    if isinstance(cfg, SFTStageConfig):
        return (
            inputs
            | {"data": local_path(cfg.data), "limit_problems": cfg.limit_problems}
            | source_digests(data=cfg.data)  # the data may be a `datasets` source
        )
    return inputs | {
        "paths": [local_path(p) for p in cfg.paths],
        "paths_sha256": [source_digest(p) for p in cfg.paths],
        "texts": [local_path(t) for t in cfg.texts],
        "texts_sha256": [source_digest(t) for t in cfg.texts],
        "reasoning_ratio": cfg.reasoning_ratio,
        "countdown_facts": cfg.countdown_facts,
        # the field read from --texts records: named only when not "text", which every record
        # written before it was read from, so those runs still resume
        **(
            {"dataset_text_field": cfg.dataset_text_field}
            if cfg.dataset_text_field != "text"
            else {}
        ),
    }


def check_resume(cfg: SFTStageConfig | CPTStageConfig, stage: str) -> str | None:
    """The checkpoint to go on from, once the data have loaded (bad data stops the run before
    this writes anything): one in ``output_dir`` from another model or other data is one
    error line, not a run that quietly goes on from it; a fresh run records its inputs
    there."""
    record = Path(cfg.output_dir, SETTINGS_FILE)
    inputs = stage_inputs(cfg, stage)
    main = cfg.process_index == 0
    given = cfg.resume_from_checkpoint
    if given:
        # transformers' flag, read as it reads it: go on from this checkpoint, into output_dir
        # (it was accepted and passed over: the run started over or went on from the last)
        if not Path(given, "trainer_state.json").is_file():
            raise InputError(
                given,
                None,
                "expected a checkpoint directory with trainer_state.json "
                "(--resume_from_checkpoint)",
            )
        remedy = "give a checkpoint of this stage's model and data"
        where = Path(given).parent / SETTINGS_FILE  # the record of the run that wrote it
        check_resume_record(where, inputs, {}, f"a {stage} run", remedy, write=False)
        # a checkpoint is continued: output_dir's record, if any, must agree, or is written
        check_checkpoint_inputs(record, inputs, True, f"a {stage} run", main)
        return str(given)
    last = last_complete_checkpoint(cfg.output_dir) if cfg.resume else None
    check_checkpoint_inputs(record, inputs, last is not None, f"a {stage} run", main)
    return last


def holding_output_dir(cfg: SFTStageConfig | CPTStageConfig) -> Any:
    return sole_writer(cfg.output_dir, "--output_dir", main_process=cfg.process_index == 0)


def run_sft(cfg: SFTStageConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    stage = "sft-shortcut" if cfg.shortcut else "sft"
    with holding_output_dir(cfg):
        check_model_dir(cfg.model, "--model", "steiner train init")
        dataset = sft_dataset(
            cfg.data, cfg.shortcut, cfg.limit_problems, assistant_required=cfg.assistant_only_loss
        )
        held_out = (
            sft_dataset(
                cfg.eval_data,
                cfg.shortcut,
                assistant_required=cfg.assistant_only_loss,
                split="test",
            )
            if cfg.eval_data
            else None
        )
        return run_stage(cfg, dataset, stage, callbacks, held_out)


def run_cpt(cfg: CPTStageConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    with holding_output_dir(cfg):
        check_model_dir(cfg.model, "--model", "steiner train init")
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        dataset = cpt_dataset(
            tokenizer,
            cfg.paths,
            cfg.texts,
            cfg.reasoning_ratio,
            cfg.countdown_facts,
            cfg.seed,
            cfg.dataset_text_field,
        )
        return run_stage(cfg, dataset, "cpt", callbacks)
