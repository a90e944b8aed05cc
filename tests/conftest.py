import os

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from steiner.format import add_reasoning_tokens


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs two workers on the 2-core machine), each worker
    and the commands its tests start get one thread: two workers with torch's default of a
    thread per core each ran the suite slower than one process did (load 4 on 2 cores)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the subprocesses tests start
        torch.set_num_threads(1)


CORPUS = [
    "Using the numbers 3, 7, 25, 50, reach 79. 7-3=4 50+25=75 75+4=79",
    "step name thought summary reflection proceed backtrack end answer reasoning",
    "The answer is (50+25)+(7-3). This looks right. Dead end, go back.",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on a toy corpus, with the 14 tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    add_reasoning_tokens(hf)
    return hf


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer, tmp_path_factory):
    """A randomly initialised tiny Qwen2 saved with the reasoning tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tiny_tokenizer.pad_token_id,
        eos_token_id=tiny_tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    path = tmp_path_factory.mktemp("tiny-model")
    Qwen2ForCausalLM(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def lock_held_elsewhere():
    """Hold a job's lock file from another process, as a second run of a command would."""
    import subprocess
    import sys

    holders = []

    def hold(path) -> None:
        code = (
            "import sys, time\nfrom filelock import FileLock\n"
            "lock = FileLock(sys.argv[1])\nlock.acquire()\n"
            "print('held', flush=True)\ntime.sleep(120)"
        )
        holder = subprocess.Popen(
            [sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True
        )
        holders.append(holder)
        assert holder.stdout.readline().strip() == "held"

    yield hold
    for holder in holders:
        holder.kill()
        holder.wait()


@pytest.fixture
def layer_dtypes(monkeypatch) -> set:
    """Filled with (weight dtype, output dtype) of the first layer's MLP projection at each
    forward of every model that ``AutoModelForCausalLM.from_pretrained`` loads from here on."""
    from transformers import AutoModelForCausalLM

    seen: set = set()
    from_pretrained = AutoModelForCausalLM.from_pretrained

    def watched(*args, **kwargs):
        model = from_pretrained(*args, **kwargs)
        layer = model.model.layers[0].mlp.down_proj
        layer.register_forward_hook(lambda m, i, out: seen.add((m.weight.dtype, out.dtype)))
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", watched)
    return seen


@pytest.fixture
def wait_for_server():
    """Waits (up to a minute) until a server started in a subprocess answers ``url`` with 200."""
    import time

    import httpx

    def wait(url: str) -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError(f"{url} did not answer within a minute")

    return wait
