"""One dataclass per training stage. Each loads from YAML (``--config file.yaml``) and every
field is a command-line flag (TRL's parser), e.g.
``steiner train sft --config sft.yaml --learning_rate 1e-3``.

The SFT/CPT configs are TRL ``SFTConfig`` subclasses, so every Hugging Face training argument
works too; only the defaults differ: CPU-friendly (fp32, ``use_cpu`` when no GPU, no
activation checkpointing), logging to nowhere, and batching chosen for throughput: SFT
batches examples of similar length (little padding, no example split or attending to
another); CPT packs text into 512-token rows ("wrapped", as in pre-training). Measured on
CPU, padding-free/BFD packing was slower: SDPA pays full attention over the packed row.
On GPUs pass ``--bf16`` and launch the same command under ``accelerate launch``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from trl import SFTConfig

from steiner.io import (
    InputError,
    check_at_least,
    check_logger_names,
    check_seed,
    check_share,
    expand_home,
)
from steiner.train.model import check_lora_settings

_NO_GPU = not torch.cuda.is_available()


def check_eval_set(config: SFTConfig, flag: str | None) -> None:
    """An --eval_strategy needs a held-out set (transformers' words for its absence come with a
    traceback, after the model and data have loaded); ``flag`` names the stage's, if any."""
    if config.eval_strategy == "no" or getattr(config, "eval_data", None):
        return
    if flag is None:
        why = "expected no: this stage takes no held-out set"
    else:
        why = f"expected no, or a held-out set with {flag} FILE"
    raise InputError("--eval_strategy", None, f"{why}, got {config.eval_strategy!r}")


@dataclass
class InitConfig:
    output_dir: str = field(
        metadata={"help": "Where to save the model and tokenizer.", "aliases": ["--out"]}
    )
    # None: tiny. Unset rather than "tiny" so that a preset given with --from is seen
    preset: str | None = field(
        default=None,
        metadata={"help": "micro (~0.6M) | tiny (~1M, the default) | small (~10M) | base (~50M)."},
    )
    data: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Files (or datasets names/directories) to train the tokenizer on "
            "(from scratch)."
        },
    )
    from_pretrained: str | None = field(
        default=None,
        metadata={
            "help": "A local pretrained model directory instead of a preset.",
            "aliases": ["--from"],
        },
    )
    vocab_size: int | None = field(
        default=None, metadata={"help": "BPE vocabulary (default: preset's)."}
    )
    split_digits: bool = field(
        default=True,
        metadata={"help": "One token per digit (off: one token per number, e.g. node ids)."},
    )
    max_positions: int | None = field(
        default=None, metadata={"help": "Context length of a new model (default 8192)."}
    )
    seed: int = 0

    def __post_init__(self) -> None:
        expand_home(self, ("output_dir", "data", "from_pretrained"))
        check_seed(self.seed)
        # vocab_size 0 read as unset once, and positions <= 0 made a model nothing can run
        check_at_least(self, (("vocab_size", 1, ""), ("max_positions", 1, "")))
        names = ("data", "vocab_size", "preset", "max_positions")
        given = [f"--{n}" for n in names if getattr(self, n) not in (None, [])]
        if self.from_pretrained and given:
            # they were passed over without a word: the model keeps its own tokenizer, shape
            # and positions
            raise InputError(
                "--from",
                None,
                f"expected no {' or '.join(given)} with it: the pretrained model keeps its "
                "own tokenizer, size and context length",
            )
        self.preset = self.preset or "tiny"
        self.max_positions = self.max_positions or 8192


@dataclass
class _StageMixin:
    model: str = field(
        default="", metadata={"help": "Model directory (train init or an earlier stage)."}
    )
    max_train_tokens: int | None = field(
        default=None, metadata={"help": "Stop after this many (non-padding) training tokens."}
    )
    resume: bool = field(
        default=True, metadata={"help": "Resume from the last checkpoint in output_dir."}
    )
    use_lora: bool = field(
        default=False, metadata={"help": "Train LoRA adapters (PEFT) + new tokens."}
    )
    fused_lm_head: bool | None = field(
        default=None,
        metadata={
            "help": "TRL's chunked log-prob LM head, which never holds a batch's full logits "
            "(default: on for vocabularies over 32,768 tokens, where it saves memory, and for "
            "loss types other than nll; off otherwise, where it costs time)."
        },
    )
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # TRL's ModelConfig name, so its recipes carry over
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules the adapters go on, by name (q_proj v_proj ...); default all-linear."
        },
    )

    def __post_init__(self) -> None:
        expand_home(self, ("model",))  # output_dir: TrainingArguments does it
        # checked here, at parse time, not after the model is loaded and the data tokenized:
        # the plain loss is the mean token NLL; other loss types (DFT) live in TRL's head
        if self.fused_lm_head is False and self.loss_type != "nll":
            raise InputError("--fused_lm_head", None, "false needs --loss_type nll")
        check_seed(self.seed)
        # each of these crashed in torch, peft or datasets mid-stage, or trained nothing
        check_at_least(
            self,
            (
                ("per_device_train_batch_size", 1, ""),
                ("gradient_accumulation_steps", 1, ""),
                ("max_length", 1, " tokens"),
                ("max_train_tokens", 1, ""),
                ("learning_rate", 0, ""),
            ),
        )
        check_lora_settings(self)
        # transformers trains -1 (unset) by epochs, and max_steps 0 not at all
        if self.max_steps == 0 or self.max_steps < -1:
            raise InputError(
                "--max_steps",
                None,
                f"expected >= 1, or -1 to train --num_train_epochs, got {self.max_steps}",
            )
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise InputError(
                "--num_train_epochs", None, f"expected > 0, got {self.num_train_epochs}"
            )
        super().__post_init__()


@dataclass
class _CPUDefaults(SFTConfig):
    """The defaults both stages share (see the module docstring)."""

    # --out as every other steiner command spells it (argparse called it ambiguous)
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where checkpoints and the final model go.", "aliases": ["--out"]},
    )
    use_cpu: bool = _NO_GPU
    bf16: bool | None = False
    activation_checkpointing: bool | None = False
    report_to: str | list[str] = "none"
    per_device_train_batch_size: int = 8
    logging_steps: float = 10
    save_steps: float = 200
    save_total_limit: int | None = 2
    learning_rate: float = 1e-3
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        # TRL's parser turns the "none" default of this str-or-list field into [None]
        if self.report_to is None or self.report_to == [None]:
            self.report_to = "none"
        super().__post_init__()
        check_report_to(self.report_to)
        check_trainer_extras(self)
        check_lr_scheduler(self)


# the metrics a stage's evaluation (SFT's --eval_data) reports, less timings: SteinerTrainer
# logs TRL's token metrics on either loss path
EVAL_METRICS = ("loss", "mean_token_accuracy", "entropy", "num_tokens")


def check_trainer_extras(config: SFTConfig) -> None:
    """Trainer settings Steiner's stages cannot honour, or whose package is missing, are one
    error line at parse time; each was a traceback once the model and data had loaded."""
    import re

    from transformers.utils import is_liger_kernel_available

    if config.use_liger_kernel and not is_liger_kernel_available():
        raise InputError(
            "--use_liger_kernel",
            None,
            "liger-kernel is not installed; pip install liger-kernel (it needs a GPU), or drop "
            "the flag",
        )
    if config.activation_offloading and (config.use_cpu or not torch.accelerator.is_available()):
        # TRL's offloading moves activations from an accelerator to CPU memory: on CPU it was
        # an AttributeError traceback once the model had loaded
        raise InputError("--activation_offloading", None, "expected false: it needs a GPU")
    if config.padding_free and not config.packing:
        # TRL then cannot cut examples at max_length, which a stage always sets (to the
        # model's positions when not given): its refusal came after the model had loaded
        raise InputError(
            "--padding_free", None, "expected --packing true with it (--packing_strategy bfd)"
        )
    template = config.chat_template_path
    if template and template.endswith(".jinja") and not os.path.isfile(template):
        # TRL took a missing template file for a Hub name: "couldn't connect to the Hub"
        raise InputError(template, None, "cannot open: no such file (--chat_template_path)")
    from transformers import Trainer

    try:
        # the optimizer's class and package, as the Trainer looks them up at its first step:
        # a missing package (bitsandbytes, galore_torch, torchao, ...) was a traceback there
        Trainer.get_optimizer_cls_and_kwargs(config)
    except (ImportError, ValueError) as exc:
        # GaLore, APOLLO and LOMO pick their parameters from the model, which is not loaded
        # yet: past their package and settings checks, that is theirs to ask for
        if not re.search(r"pass a `?model", str(exc)):
            optim = getattr(config.optim, "value", config.optim)
            raise InputError("--optim", None, f"{optim}: {' '.join(str(exc).split())}") from None
    metric = config.metric_for_best_model
    if metric and metric.removeprefix("eval_") not in EVAL_METRICS:
        # a KeyError traceback at the first evaluation, after training up to it
        raise InputError(
            "--metric_for_best_model",
            None,
            f"expected one of {', '.join(EVAL_METRICS)} (what a stage's evaluation reports), "
            f"got {metric!r}",
        )
    if (config.dataset_kwargs or {}).get("skip_prepare_dataset"):
        # TRL then trains the dataset as given, and a stage's dataset is records, not tokens
        raise InputError(
            "--dataset_kwargs",
            None,
            "skip_prepare_dataset is for an already tokenized dataset; a Steiner stage builds "
            "its dataset from records and tokenizes it itself",
        )


def check_lr_scheduler(config: SFTConfig) -> None:
    """The schedule and its ``lr_scheduler_kwargs`` are built once, on a one-parameter
    optimizer, so a schedule that needs a setting (``cosine_with_min_lr``: min_lr or
    min_lr_rate; ``warmup_stable_decay``: num_decay_steps) or is given one it does not take is
    one error line now: the Trainer builds it at its first step, a traceback after the model
    and data had loaded. transformers' own builder, so its rules are the ones checked."""
    import re

    from transformers.optimization import get_scheduler

    name = str(getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    kwargs = config.lr_scheduler_kwargs or {}
    try:
        get_scheduler(name, optimizer, 1, 10, scheduler_specific_kwargs=dict(kwargs))
    except (TypeError, ValueError) as exc:
        said = str(exc)
        missing = re.search(r"missing \d+ required .*?: (.*)", said)
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", said)
        if missing:
            names = missing.group(1).replace("'", "")
            said = f"expected {names} in it"
        elif unexpected:
            said = f"{unexpected.group(1)} is not a setting of it"
        elif "min_lr or min_lr_rate" in said:
            said = "expected min_lr or min_lr_rate in it"
        raise InputError(
            "--lr_scheduler_kwargs",
            None,
            f"for --lr_scheduler_type {name}: {said} (a JSON object of its settings)",
        ) from None


def check_report_to(names: list[str]) -> None:
    """A logging integration that is unknown or not installed is one error line at parse time;
    transformers raises it as a RuntimeError traceback once the model and data have loaded.
    (``transformers`` has already turned "all" into the installed ones and "none" into [].)"""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    check_logger_names(names, INTEGRATION_TO_CALLBACK, get_available_reporting_integrations())


@dataclass
class SFTStageConfig(_StageMixin, _CPUDefaults):
    """``steiner train sft``: TRL SFT on chat paths, loss on the assistant part only."""

    data: str = field(
        default="",
        metadata={
            "help": "paths.jsonl, or a datasets name or directory of chat records (its train "
            "split); shortcut records with --shortcut."
        },
    )
    shortcut: bool = field(
        default=False, metadata={"help": "Baseline: train on shortcut solutions as straight paths."}
    )
    limit_problems: int | None = field(
        default=None, metadata={"help": "Use only the first N records."}
    )
    eval_data: str | None = field(
        default=None,
        metadata={
            "help": "Held-out records in --data's form: their loss is logged as eval_loss "
            "(by --eval_strategy steps|epoch, steps by default)."
        },
    )
    assistant_only_loss: bool = True
    train_sampling_strategy: str = "group_by_length"
    max_length: int | None = 8192

    def __post_init__(self) -> None:
        expand_home(self, ("data", "eval_data"))
        if self.eval_data and self.eval_strategy == "no":
            self.eval_strategy = "steps"  # the held-out loss is what --eval_data is given for
        check_eval_set(self, "--eval_data")
        # 0 read as unset (every record), and -2 as all but the last two
        check_at_least(self, (("limit_problems", 1, ""),))
        super().__post_init__()


@dataclass
class CPTStageConfig(_StageMixin, _CPUDefaults):
    """``steiner train cpt``: language modelling on plain text mixed with reasoning paths."""

    paths: list[str] = field(
        default_factory=list,
        metadata={"help": "Path records to mix in (files, or datasets names or directories)."},
    )
    texts: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Plain text, or the --dataset_text_field of records (files, or datasets "
            "names/dirs)."
        },
    )
    reasoning_ratio: float = field(
        default=0.5, metadata={"help": "Share of documents that are paths."}
    )
    countdown_facts: int = field(default=0, metadata={"help": "Add N countdown arithmetic facts."})
    dataset_text_field: str = field(
        default="text", metadata={"help": "The field of --texts records that holds the text."}
    )
    reset_unseen_tokens: bool = field(
        default=False,
        metadata={
            "help": "After training, give each token the CPT data never held (chat and "
            "reasoning tokens, unused merges) the mean embedding of those it held, so the SFT "
            "starts from neutral logits for them. For from-scratch models; a pretrained "
            "model's unused vocabulary would lose its embeddings."
        },
    )
    completion_only_loss: bool | None = False
    packing: bool = True
    packing_strategy: str = "wrapped"
    max_length: int | None = 512

    def __post_init__(self) -> None:
        expand_home(self, ("paths", "texts"))
        check_eval_set(self, None)
        check_share(self, ("reasoning_ratio",))
        check_at_least(self, (("countdown_facts", 0, ""),))
        super().__post_init__()
