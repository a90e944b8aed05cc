import importlib

import pytest
import torch

from steiner import format as fmt
from steiner.infer.budget import Budget, StepBudget, TokenIds
from steiner.infer.generate import generate, load

QUESTIONS = [
    "Reach 79.",
    "Using the numbers 3, 7, 25, 50, reach 79 please.",
    "Go.",
    "A longer question with many many words in it to vary the prompt length a lot.",
    "Two words",
    "Reach 24 with 2 3 4.",
    "Find a path.",
    "Why?",
]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load(tiny_model_dir)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("extend_with", ["model", "proceed", "backtrack"])
def test_min_steps_control_is_total(model, k, extend_with):
    m, tok = model
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    budget = Budget(min_steps=k, max_step_tokens=6, extend_with=extend_with)
    outs = generate(
        m, tok, convs, [budget] * 8, max_new_tokens=14 * k + 40, temperature=1.0, seed=k
    )
    for out in outs:
        assert out.text.startswith(fmt.REASONING_START)
        assert out.trace.n_steps >= k, out.text
        assert out.format_errors == [] or not out.trace.finished, out.format_errors
        if extend_with == "proceed":
            assert all(d is fmt.Decision.PROCEED for d in out.trace.decisions[: k - 1])
        if extend_with == "backtrack":
            assert all(d is fmt.Decision.BACKTRACK for d in out.trace.decisions[: k - 1])


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_max_steps_control_is_total(model, k):
    m, tok = model
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    budgets = [Budget(max_steps=k, max_step_tokens=5)] * 8
    outs = generate(m, tok, convs, budgets, max_new_tokens=200, temperature=1.0, seed=10 + k)
    for out in outs:
        assert out.trace.n_steps <= k, out.text
        assert out.text.count(fmt.STEP_START) == out.trace.n_steps
    # with min = max the count is exact, and the reasoning has ended
    exact = generate(
        m,
        tok,
        convs,
        [Budget(min_steps=k, max_steps=k, max_step_tokens=5)] * 8,
        max_new_tokens=200,
        temperature=1.0,
        seed=k,
    )
    for out in exact:
        assert out.trace.n_steps == k and out.trace.finished, out.text


def test_per_row_budgets_and_reasoning_token_cap(model):
    m, tok = model
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS[:4]]
    budgets = [
        Budget(min_steps=1, max_steps=1, max_step_tokens=4),
        Budget(min_steps=3, max_step_tokens=4),
        Budget(max_reasoning_tokens=12, min_steps=5),
        None,
    ]
    outs = generate(m, tok, convs, budgets, max_new_tokens=120, temperature=1.0, seed=0)
    assert outs[0].trace.n_steps == 1 and outs[0].trace.finished
    assert outs[1].trace.n_steps >= 3
    # the cap wins over min_steps: the step is closed and the reasoning ends right after
    # closing takes at most the remaining field tokens (8), the step end and the reasoning end
    assert outs[2].trace.finished and 12 <= outs[2].reasoning_tokens <= 12 + 10
    assert outs[3].text.startswith(fmt.REASONING_START)


class _CheckedBudget:
    """The processor under test, with every mask it gives compared to a fresh automaton's over
    the same row's generated tokens (the state from scratch, as no reordering can fool)."""

    def __init__(self, tok, budget):
        from steiner.infer.hf import StepBudgetLogitsProcessor

        self.inner, self.budget = StepBudgetLogitsProcessor(tok, budget), budget
        self.start: int | None = None
        self.calls = self.wrong_rows = self.rewinds = 0
        self.longest = 0

    def __call__(self, input_ids, scores):
        self.start = input_ids.shape[1] if self.start is None else self.start
        self.rewinds += input_ids.shape[1] <= self.longest
        self.longest = max(self.longest, input_ids.shape[1])
        masked = self.inner(input_ids, scores.clone())
        rows = len(input_ids)
        budgets = self.budget if isinstance(self.budget, list) else [self.budget]
        per_row = [b for b in budgets for _ in range(rows // len(budgets))]
        fresh = StepBudget(self.inner.ids, per_row, scores.device)
        expected = fresh.step(None, scores.clone())
        for position in range(self.start, input_ids.shape[1]):
            expected = fresh.step(input_ids[:, position], scores.clone())
        self.calls += 1
        self.wrong_rows += int((masked.isinf() != expected.isinf()).any(1).sum())
        return masked


@pytest.mark.parametrize(
    "decoding",
    [
        {"num_beams": 3, "num_return_sequences": 2},  # beams reorder the rows at every step
        {"prompt_lookup_num_tokens": 3},  # assisted decoding rewinds rejected candidates
        {"do_sample": True, "num_return_sequences": 2},
    ],
)
def test_the_budget_follows_rows_that_beam_search_and_assisted_decoding_move(model, decoding):
    # before: each row kept the state of whatever row had its place in the last call, so
    # beam search and assisted decoding got masks of other beams' or rejected tokens
    m, tok = model
    prompts = QUESTIONS[:1] if "prompt_lookup_num_tokens" in decoding else QUESTIONS[:3]
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in prompts
    ]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    budget = Budget(min_steps=2, max_steps=3, max_step_tokens=3)
    checked = _CheckedBudget(tok, budget)
    torch.manual_seed(0)
    out = m.generate(**batch, max_new_tokens=60, logits_processor=[checked], **decoding)
    assert checked.calls >= 30 and checked.wrong_rows == 0
    if "prompt_lookup_num_tokens" in decoding:
        assert checked.rewinds > 0  # the case under test did come up
    for row in tok.batch_decode(out[:, batch["input_ids"].shape[1] :]):
        trace, _ = fmt.parse(row.split("<|im_end|>")[0])
        assert trace.n_steps <= 3, row


def test_one_budget_per_prompt_holds_for_each_of_its_returned_sequences(model):
    # generate repeats each prompt's row; a list of one budget per prompt was one per row
    m, tok = model
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in QUESTIONS[:2]
    ]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    budgets = [
        Budget(min_steps=1, max_steps=1, max_step_tokens=3),
        Budget(min_steps=3, max_steps=3, max_step_tokens=3),
    ]
    checked = _CheckedBudget(tok, budgets)
    torch.manual_seed(1)
    out = m.generate(
        **batch,
        max_new_tokens=80,
        logits_processor=[checked],
        do_sample=True,
        num_return_sequences=2,
    )
    steps = [
        fmt.parse(row)[0].n_steps for row in tok.batch_decode(out[:, batch["input_ids"].shape[1] :])
    ]
    assert steps == [1, 1, 3, 3] and checked.wrong_rows == 0
    from steiner.infer.hf import StepBudgetLogitsProcessor

    with pytest.raises(
        ValueError, match="2 budgets for 3 rows; expected one per row, or one per prompt"
    ):
        StepBudgetLogitsProcessor(tok, budgets)(
            torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, len(tok))
        )


def test_one_processor_serves_generate_calls_in_turn(model):
    # before: the second call went on from the first call's state (its prompt length and
    # rows), so its masks were the end of the first call's traces
    m, tok = model

    def batch(questions):
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            for q in questions
        ]
        return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    checked = _CheckedBudget(tok, Budget(min_steps=2, max_steps=2, max_step_tokens=3))
    for questions in (QUESTIONS[:3], QUESTIONS[3:5], QUESTIONS[3:5], QUESTIONS[:3]):
        checked.start = None  # the checker's own reference starts over with each call
        inputs = batch(questions)
        out = m.generate(**inputs, max_new_tokens=40, logits_processor=[checked], do_sample=True)
        assert checked.wrong_rows == 0, questions
        for row in tok.batch_decode(out[:, inputs["input_ids"].shape[1] :]):
            assert fmt.parse(row.split("<|im_end|>")[0])[0].n_steps == 2, row


def test_a_sampled_row_does_not_depend_on_its_batch(model):
    m, tok = model
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS[:5]]
    budgets = [Budget(max_steps=2, max_step_tokens=5)] * 5
    temperatures, seeds = [0.0, 1.0, 1.0, 1.0, 0.8], [None, 1, 2, 1, 1]
    together = generate(m, tok, convs, budgets, 60, temperatures, seed=seeds)
    for i in range(5):
        [alone] = generate(
            m, tok, convs[i : i + 1], budgets[:1], 60, temperatures[i], seed=seeds[i]
        )
        assert alone.text == together[i].text, i
        assert together[i].trace.n_steps <= 2  # the budget still holds for sampled rows
    [greedy] = generate(m, tok, convs[:1], budgets[:1], 60)
    assert together[0].text == greedy.text  # temperature 0 in a sampled batch is greedy
    # the same prompt and seed give one completion; another seed, another one
    same = generate(m, tok, [convs[1]] * 3, budgets[:3], 60, 1.0, seed=[7, 7, 8])
    assert same[0].text == same[1].text != same[2].text


def test_a_row_ends_where_it_fills_the_models_positions(model, monkeypatch):
    m, tok = model
    convs = [[{"role": "user", "content": q}] for q in (QUESTIONS[2], QUESTIONS[3])]
    lengths = [r.prompt_tokens for r in generate(m, tok, convs, max_new_tokens=1)]
    limit = max(lengths) + 6
    monkeypatch.setattr(m.config, "max_position_embeddings", limit)
    # before: every row ran on to max_new_tokens, past the positions (IndexError for a learned
    # position table; RoPE at angles never trained)
    reasoning = [Budget(min_steps=30)] * 2  # no end of sequence while it reasons
    together = generate(m, tok, convs, reasoning, 100, temperature=1.0, seed=[1, 2])
    for i, done in enumerate(together):
        assert done.prompt_tokens + done.completion_tokens == limit, i
        assert done.finish_reason == "length"
        # each row by its own prompt, not the batch's padded one
        [alone] = generate(m, tok, convs[i : i + 1], reasoning[:1], 100, 1.0, seed=i + 1)
        assert alone.text == done.text


def test_a_prompt_that_fills_the_models_positions_is_not_run(model, monkeypatch, tmp_path):
    import json

    from steiner.evaluate.accuracy import EvalConfig, evaluate

    m, tok = model
    questions = [QUESTIONS[2], QUESTIONS[2] + " Think it through." * 8, QUESTIONS[3]]
    convs = [[{"role": "user", "content": q}] for q in questions]
    lengths = [r.prompt_tokens for r in generate(m, tok, convs, max_new_tokens=1)]
    limit = lengths[1]  # the long prompt fills every position; the others leave room
    assert max(lengths[0], lengths[2]) + 4 < limit
    monkeypatch.setattr(m.config, "max_position_embeddings", limit)
    widths = []  # before: the long prompt ran through the model (IndexError for GPT-2's table)
    hook = m.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["attention_mask"].sum(1).max()),
        with_kwargs=True,
    )
    try:
        done = generate(m, tok, convs, [Budget(max_steps=2)] * 3, 30, 1.0, seed=[1, 2, 3])
    finally:
        hook.remove()
    assert max(widths) < limit
    assert (done[1].text, done[1].completion_tokens, done[1].finish_reason) == ("", 0, "length")
    assert done[1].prompt_tokens == limit
    for i in (0, 2):  # the others as if the long one were not in the batch
        [alone] = generate(m, tok, convs[i : i + 1], [Budget(max_steps=2)], 30, 1.0, seed=i + 1)
        assert done[i].text == alone.text and done[i].completion_tokens > 0, i
    # eval counts it wrong, among the cut answers, and says why it was cut
    problems = tmp_path / "problems.jsonl"
    records = [{"id": f"q{i}", "question": q, "answer": "7"} for i, q in enumerate(questions)]
    problems.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = EvalConfig("tiny", str(problems), str(tmp_path / "eval"), max_new_tokens=3)
    metrics = evaluate(cfg, model_and_tokenizer=(m, tok))
    assert metrics["prompt_too_long_rate"] == round(1 / 3, 4)
    assert metrics["length_cut_rate"] >= metrics["prompt_too_long_rate"]


def test_per_row_sampler_draws_from_the_warped_distribution():
    from steiner.infer.sampling import PerRowSampler

    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1]]))
    ids = torch.zeros(2, 1, dtype=torch.long)
    sampler = PerRowSampler([1.0, 1.0], [1.0, 0.5], [0, 0])
    counts = torch.zeros(2, 3)
    for _ in range(4000):
        out = sampler(ids, logits)
        assert torch.isfinite(out).sum(dim=1).tolist() == [1, 1]
        counts[torch.arange(2), out.argmax(dim=1)] += 1
    assert torch.allclose(counts[0] / 4000, torch.tensor([0.6, 0.3, 0.1]), atol=0.03)
    assert counts[1].tolist() == [4000, 0, 0]  # top-p 0.5 keeps the most likely token only
    greedy = PerRowSampler([0.0], [1.0], [None])
    assert torch.equal(greedy(ids[:1], logits[:1]), logits[:1])  # temperature 0: untouched


def test_state_updates_incrementally(tiny_tokenizer):
    ids = TokenIds.from_tokenizer(tiny_tokenizer)
    core = StepBudget(ids, [Budget(min_steps=2, extend_with="proceed")])
    vocab = len(tiny_tokenizer)
    seq = [ids.reasoning_start, ids.step_start, 5, 6, ids.step_end]

    def allowed(logits: torch.Tensor) -> set[int]:  # whitespace aside
        return set((logits[0] == 0).nonzero().flatten().tolist()) - set(ids.spaces)

    logits = core.step(None, torch.zeros(1, vocab))
    assert allowed(logits) == {ids.reasoning_start}
    for tok in seq[1:]:
        logits = core.step(torch.tensor([tok]), torch.zeros(1, vocab))
    assert int(core.steps[0]) == 1 and allowed(logits) == {ids.proceed}
    logits = core.step(torch.tensor([ids.proceed]), torch.zeros(1, vocab))
    assert allowed(logits) == {ids.step_start}


def example_trace() -> fmt.Trace:
    step = fmt.Step("Add 50 and 25", "50+25=75", "left 3 7 75", "far from 79")
    return fmt.Trace(
        steps=[step, fmt.Step("Back to 3 7 25 50", "7-3=4", "left 4 25 50", "promising"), step],
        decisions=[fmt.Decision.BACKTRACK, fmt.Decision.PROCEED, fmt.Decision.END],
        answer="(50+25)+(7-3)",
    )


@pytest.mark.parametrize("separator", ["\n", ""])
def test_every_token_of_a_rendered_trace_is_allowed(tiny_tokenizer, separator):
    """Teacher-force a training-style trace through the budget: no token of it is masked,
    so a model trained on newline-separated traces can write them (the budget once forced
    each structural token straight after the last one and pushed such models off their text
    at every step boundary: countdown scored 0 %)."""
    ids = TokenIds.from_tokenizer(tiny_tokenizer)
    assert tiny_tokenizer.convert_tokens_to_ids("Ċ") in ids.spaces  # "\n"
    tokens = tiny_tokenizer(fmt.render(example_trace(), separator), add_special_tokens=False)
    core = StepBudget(ids, [Budget(min_steps=3, max_steps=3)])
    last = None
    for token in tokens["input_ids"]:
        logits = core.step(last, torch.zeros(1, len(tiny_tokenizer)))
        assert logits[0, token] == 0, tiny_tokenizer.decode([token])
        last = torch.tensor([token])
    assert int(core.steps[0]) == 3


def test_one_whitespace_token_at_most_before_a_structural_token(tiny_tokenizer):
    ids = TokenIds.from_tokenizer(tiny_tokenizer)
    newline = tiny_tokenizer.convert_tokens_to_ids("Ċ")
    core = StepBudget(ids, [Budget(max_step_tokens=3)])
    vocab = len(tiny_tokenizer)
    # the first token is <|reasoning_start|>, with no whitespace before it
    assert core.step(None, torch.zeros(1, vocab))[0, newline] == float("-inf")
    logits = core.step(torch.tensor([ids.reasoning_start]), torch.zeros(1, vocab))
    assert logits[0, newline] == 0 and logits[0, ids.step_start] == 0
    logits = core.step(torch.tensor([newline]), torch.zeros(1, vocab))
    assert logits[0, newline] == float("-inf")  # a second one would stall the structure
    assert logits[0, ids.step_start] == 0 and logits[0, ids.reasoning_end] == 0
    # a step grown past max_step_tokens is closed with no whitespace in between
    for token in [ids.step_start, ids.fields[0], 5, 6, 7]:
        logits = core.step(torch.tensor([token]), torch.zeros(1, vocab))
    assert logits[0, newline] == float("-inf") and logits[0].argmax() == ids.fields[1]


def test_budget_validation():
    with pytest.raises(ValueError):
        Budget(min_steps=3, max_steps=2)
    with pytest.raises(ValueError):
        Budget(extend_with="sideways")
    assert Budget.from_extra({"max_steps": 3}) == Budget(max_steps=3)
    assert Budget.from_extra({"temperature": 1}) is None


def test_vllm_module_imports_without_vllm():
    module = importlib.import_module("steiner.infer.vllm_budget")
    has_vllm = importlib.util.find_spec("vllm") is not None
    assert hasattr(module, "StepBudgetVLLM") == has_vllm
    assert callable(module.RequestStepBudget)


def test_vllm_request_processor_logic(tiny_tokenizer):
    """The per-request callable vLLM calls, fed the whole output list each time as vLLM does."""
    from steiner.infer.vllm_budget import RequestStepBudget

    ids = TokenIds.from_tokenizer(tiny_tokenizer)
    proc = RequestStepBudget(ids, Budget(max_steps=1), torch.device("cpu"))
    vocab = len(tiny_tokenizer)
    name_start, name_end, thought_start = ids.fields[:3]
    # (output so far, the one token the processor must leave possible)
    expectations = [
        ([], ids.reasoning_start),
        ([ids.reasoning_start, ids.step_start], name_start),
        ([ids.reasoning_start, ids.step_start, name_start, 7, name_end], thought_start),
        (
            [ids.reasoning_start, ids.step_start, name_start, 7, name_end, *ids.fields[2:]],
            ids.reasoning_end,
        ),
    ]
    for output, forced in expectations:
        logits = proc(output, torch.randn(vocab))
        finite = set(torch.isfinite(logits).nonzero().flatten().tolist())
        assert finite - set(ids.spaces) == {forced}  # whitespace may come first
        assert proc.seen == len(output)


def test_vllm_request_processor_refuses_placeholders(tiny_tokenizer):
    """Under async scheduling vLLM may hand over -1 for tokens it has not copied back; masking
    from a guessed state would corrupt the trace, so the processor stops with the fix."""
    from steiner.infer.vllm_budget import VLLM_PROCESSOR, RequestStepBudget

    ids = TokenIds.from_tokenizer(tiny_tokenizer)
    proc = RequestStepBudget(ids, Budget(max_steps=2), torch.device("cpu"))
    proc([ids.reasoning_start], torch.randn(len(tiny_tokenizer)))
    with pytest.raises(RuntimeError, match=VLLM_PROCESSOR):
        proc([ids.reasoning_start, -1], torch.randn(len(tiny_tokenizer)))


def test_one_step_budget_processor_per_engine():
    """The entry point and an explicit logits_processors each build one; only the first acts."""
    from steiner.infer.vllm_budget import first_for_engine

    class Processor:
        def __init__(self, config):
            self.vllm_config = config

    config, other = object(), object()
    first, second, elsewhere = Processor(config), Processor(config), Processor(other)
    assert first_for_engine(config, first)
    assert not first_for_engine(config, second)
    assert first_for_engine(config, first)  # asking again does not demote it
    assert first_for_engine(other, elsewhere)
    del first
    assert first_for_engine(config, Processor(config))  # a finished engine frees its slot


def test_load_places_the_model_for_its_machine(tiny_model_dir):
    # before: always the CPU in fp32, so eval, scale and serve left a GPU machine's GPUs idle
    m, _ = load(tiny_model_dir)
    wanted = "cuda" if torch.cuda.is_available() else "cpu"
    assert m.device.type == wanted
    assert m.dtype == torch.float32  # saved in fp32; on a CPU fp32 whatever it was saved in


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_generate_on_a_gpu_keeps_the_budget_and_each_rows_seed(tiny_model_dir):
    m, tok = load(tiny_model_dir)
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    budgets = [Budget(min_steps=2, max_steps=3)] * len(convs)
    seeds = list(range(len(convs)))
    together = generate(m, tok, convs, budgets, 80, 1.0, seed=seeds)
    for i, done in enumerate(together):
        assert 2 <= done.trace.n_steps <= 3 or done.finish_reason == "length", i
    [alone] = generate(m, tok, convs[1:2], budgets[:1], 80, 1.0, seed=1)
    assert alone.text == together[1].text
    greedy = generate(m, tok, convs, None, 40)
    assert [g.text for g in greedy] == [g.text for g in generate(m, tok, convs, None, 40)]


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (CUDA only)"
)
def test_vllm_adapter_class():
    from steiner.infer.vllm_budget import StepBudgetVLLM

    assert StepBudgetVLLM.is_argmax_invariant(object.__new__(StepBudgetVLLM)) is False


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
    reason="needs vLLM and a GPU",
)
def test_vllm_engine_applies_the_step_budget(tiny_model_dir, tiny_tokenizer, monkeypatch):
    """In a real engine (async scheduling on, the processor passed explicitly as the README
    says, and also loaded from the entry point): a request whose extra_args ask for k steps
    gets exactly k, a request without them is left alone, a budget that cannot be met is
    refused."""
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # CUDA may be up in pytest
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    from steiner.infer.vllm_budget import VLLM_PROCESSOR

    ids = TokenIds.from_tokenizer(tiny_tokenizer)
    prompts = [
        tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in QUESTIONS
    ]
    llm = LLM(
        model=str(tiny_model_dir),
        gpu_memory_utilization=0.2,
        max_model_len=512,
        seed=0,
        enforce_eager=True,
        logits_processors=[VLLM_PROCESSOR],
    )

    def texts(llm, params):
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [
            tiny_tokenizer.decode([t for t in o.outputs[0].token_ids if t not in ids.eos])
            for o in outs
        ]

    try:
        for k in (1, 3):
            extra = {"min_steps": k, "max_steps": k, "max_step_tokens": 5}
            params = SamplingParams(temperature=1.0, max_tokens=200, seed=k, extra_args=extra)
            for text in texts(llm, params):
                trace, _ = fmt.parse(text)
                assert text.startswith(fmt.REASONING_START), text
                assert trace.n_steps == k and trace.finished, text
        plain = texts(llm, SamplingParams(temperature=1.0, max_tokens=8, seed=0))
        assert not all(t.startswith(fmt.REASONING_START) for t in plain)
        with pytest.raises(ValueError, match="min_steps"):
            llm.generate(prompts[:1], SamplingParams(extra_args={"min_steps": 3, "max_steps": 2}))
    finally:
        del llm
        cleanup_dist_env_and_memory()
