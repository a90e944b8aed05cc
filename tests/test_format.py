import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steiner import format as fmt
from steiner.format import Decision, FormatError, Step, Trace, parse, render

EXPECTED_TOKENS = """<|reasoning_start|> <|reasoning_end|>
<|reasoning_proceed|> <|reasoning_backtrack|>
<|reasoning_step_start|> <|reasoning_step_end|>
<|reasoning_step_name_start|> <|reasoning_step_name_end|>
<|reasoning_step_thought_start|> <|reasoning_step_thought_end|>
<|reasoning_step_summary_start|> <|reasoning_step_summary_end|>
<|reasoning_step_reflection_start|> <|reasoning_step_reflection_end|>""".split()


def test_the_fourteen_tokens_are_exactly_the_design_strings():
    assert list(fmt.SPECIAL_TOKENS) == EXPECTED_TOKENS
    assert len(set(fmt.SPECIAL_TOKENS)) == 14


def example_trace() -> Trace:
    return Trace(
        steps=[
            Step("Add 50 and 25", "50+25=75", "left 3 7 75", "75 is far from 79, try another"),
            Step("Back to 3 7 25 50", "7-3=4", "left 4 25 50", "promising"),
            Step("Finish", "50+25=75, 75+4=79", "left 79", "reached the target"),
        ],
        decisions=[Decision.BACKTRACK, Decision.PROCEED, Decision.END],
        answer="(50+25)+(7-3)",
    )


def test_render_matches_the_documented_layout():
    text = render(example_trace())
    assert text.startswith(
        "<|reasoning_start|>\n<|reasoning_step_start|>\n<|reasoning_step_name_start|>Add 50"
    )
    assert text.count(fmt.STEP_START) == 3
    assert "<|reasoning_step_end|>\n<|reasoning_backtrack|>\n<|reasoning_step_start|>" in text
    assert text.endswith("<|reasoning_step_end|>\n<|reasoning_end|>\n(50+25)+(7-3)")


def test_parse_round_trip_and_counts():
    trace, errors = parse(render(example_trace()))
    assert errors == []
    assert trace == example_trace()
    assert (trace.n_steps, trace.n_backtracks, trace.finished) == (3, 1, True)


def test_whitespace_between_tokens_is_not_significant():
    text = render(example_trace()).replace("\n", "   \n\t ")
    assert parse(text, strict=True)[0] == example_trace()


def test_strict_mode_raises_with_offset_of_first_problem():
    text = render(example_trace())
    broken = text.replace(fmt.SUMMARY_END, "", 1)
    with pytest.raises(FormatError) as info:
        parse(broken, strict=True)
    assert info.value.offset == broken.index(fmt.REFLECTION_START)
    # lenient mode reports the same problem and still recovers all three steps
    trace, errors = parse(broken)
    assert errors[0].offset == info.value.offset
    assert trace.n_steps == 3 and trace.answer == "(50+25)+(7-3)"


@pytest.mark.parametrize(
    "text, message",
    [
        ("just an answer", "no <|reasoning_start|>"),
        (
            "<|reasoning_start|><|reasoning_step_start|><|reasoning_step_name_start|>x",
            "unterminated step",
        ),
        ("<|reasoning_start|>stray<|reasoning_end|>42", "text outside a step field"),
        (
            "<|reasoning_start|><|reasoning_end|>42<|reasoning_step_start|>",
            "after the final answer",
        ),
    ],
)
def test_lenient_parse_reports_errors(text, message):
    trace, errors = parse(text)
    assert any(message in e.message for e in errors), errors


def test_truncated_trace_keeps_partial_step_and_is_unfinished():
    text = render(example_trace())
    cut = text[: text.index(fmt.THOUGHT_END, text.index("Finish"))]
    trace, errors = parse(cut)
    assert trace.n_steps == 3 and not trace.finished
    assert trace.steps[-1].name == "Finish"
    assert errors


field_text = (
    st.text(min_size=0, max_size=30)
    .map(str.strip)
    .filter(lambda s: "<|" not in s or not any(t in s for t in fmt.SPECIAL_TOKENS))
)
steps_st = st.builds(Step, field_text, field_text, field_text, field_text)


@st.composite
def traces(draw) -> Trace:
    steps = draw(st.lists(steps_st, max_size=6))
    middle = draw(
        st.lists(
            st.sampled_from([Decision.PROCEED, Decision.BACKTRACK]),
            min_size=max(len(steps) - 1, 0),
            max_size=max(len(steps) - 1, 0),
        )
    )
    return Trace(steps, middle + [Decision.END] if steps else [], draw(field_text))


@settings(max_examples=300, deadline=None)
@given(traces())
def test_parse_inverts_render(trace):
    parsed, errors = parse(render(trace))
    assert errors == []
    assert parsed == trace


token_soup = st.lists(
    st.one_of(st.sampled_from(fmt.SPECIAL_TOKENS), st.text(max_size=8)), max_size=40
).map("".join)


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.text(), token_soup))
def test_parse_never_raises(text):
    trace, errors = parse(text)
    assert isinstance(trace, Trace)
    assert all(0 <= e.offset <= len(text) for e in errors)
    if errors:
        with pytest.raises(FormatError):
            parse(text, strict=True)


def test_each_token_is_one_id(tiny_tokenizer):
    for token in fmt.SPECIAL_TOKENS + fmt.CHATML_TOKENS:
        ids = tiny_tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1, token
        assert tiny_tokenizer.decode(ids) == token
    ids = tiny_tokenizer.encode(render(example_trace()), add_special_tokens=False)
    assert ids.count(tiny_tokenizer.convert_tokens_to_ids(fmt.STEP_START)) == 3


def test_add_reasoning_tokens_is_idempotent(tiny_tokenizer):
    assert fmt.add_reasoning_tokens(tiny_tokenizer) == 0


def test_chat_template_renders_chatml_with_generation_mask(tiny_tokenizer):
    answer = render(example_trace())
    messages = [{"role": "user", "content": "Reach 79."}, {"role": "assistant", "content": answer}]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert (
        text
        == f"<|im_start|>user\nReach 79.<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
    )
    prompt = tiny_tokenizer.apply_chat_template(
        messages[:1], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    out = tiny_tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    mask, ids = out["assistant_masks"], out["input_ids"]
    masked = tiny_tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert masked == answer + "<|im_end|>"


def test_chat_template_compacts_earlier_turns(tiny_tokenizer):
    answer = render(example_trace())
    messages = [
        {"role": "user", "content": "Reach 79."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Now reach 80."},
        {"role": "assistant", "content": answer},
    ]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, compact_reasoning=True)
    first, last = text.split("<|im_start|>assistant\n")[1:]
    assert fmt.THOUGHT_START not in first
    assert "left 3 7 75\nleft 4 25 50\nleft 79" in first
    assert first.startswith(fmt.REASONING_START) and "(50+25)+(7-3)<|im_end|>" in first
    assert last.startswith(answer)  # the last turn stays whole
    full = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert full.count(fmt.THOUGHT_START) == 6
