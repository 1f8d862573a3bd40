"""The scorers: log-likelihood (batched, padded both ways, shared-prefix cache) and generation (greedy, sampling).

Two kinds of models: ``OracleLM`` (:mod:`fedlora.evaluate.testing`), a fake causal LM whose next-token logits are
a known function of the text so far (so the right answer is known), and tiny random transformers (Llama with
rotary positions, GPT-2 with absolute ones), where batched scores must equal one plain forward pass per
(context, continuation) computed independently.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, LogitsProcessorList

from fedlora.evaluate.base import EvalError
from fedlora.evaluate.scoring import (
    ChoiceRequest,
    GumbelSampler,
    Sampling,
    _sampling_processors,
    common_prefix_length,
    encode_choice_requests,
    generate_texts,
    loglik_choices,
    loglik_reference,
    split_trailing_space,
)
from fedlora.evaluate.testing import OracleLM, answer_oracle
from fedlora.models import build_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny_llama(seed=0)
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_gpt2(tiny):
    """A tiny GPT-2: absolute position embeddings, so a wrong position id changes every score."""
    tokenizer = tiny[1]
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).eval()
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation of requests


def test_trailing_space_moves_to_the_continuation():
    assert split_trailing_space("Answer: ", "A") == ("Answer:", " A")
    assert split_trailing_space("Answer:\n  ", "A") == ("Answer:", "\n  A")
    assert split_trailing_space("Answer:", " A") == ("Answer:", " A")


def test_encoded_continuations_are_the_tail_of_the_whole(tiny):
    _, tok = tiny
    (enc,) = encode_choice_requests(tok, [ChoiceRequest("Q: hi\nAnswer: ", ("A", "yes no"))])
    assert enc.context == tok("Q: hi\nAnswer:")["input_ids"]
    assert enc.continuations == [tok(" A")["input_ids"], tok(" yes no")["input_ids"]]


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (ChoiceRequest("ctx", ()), "no continuations"),
        (ChoiceRequest("   ", ("a",)), "context is empty"),
        (ChoiceRequest("ctx", ("",)), "adds no token"),
    ],
)
def test_bad_requests_are_named(tiny, request_, message):
    with pytest.raises(EvalError, match=message):
        encode_choice_requests(tiny[1], [request_])


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[5], [6]]) == 0
    assert common_prefix_length([[1, 2, 3]]) == 3
    assert common_prefix_length([]) == 0


# ----------------------------------------------------------------------------------------------------------------
# Log-likelihood on fabricated items with known answers


QUESTIONS = {
    "What is two plus two?": " B",
    "Capital of France?": " D",
    "Colour of the sky?": " A",
    "Largest planet, a long question to make lengths differ a lot?": " C",
    "Boiling point of water in Celsius?": " B",
}


def _mcq_requests(group: str = "g") -> list[ChoiceRequest]:
    return [
        ChoiceRequest(f"Questions about things.\n\n{q}\nAnswer:", (" A", " B", " C", " D"), group) for q in QUESTIONS
    ]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_loglik_picks_the_known_answer(tiny, padding_side, share_prefix, batch_size):
    _, tok = tiny
    model = OracleLM(tok, answer_oracle(QUESTIONS, "Answer:"))
    scores = loglik_choices(
        model, tok, _mcq_requests(), batch_size=batch_size, padding_side=padding_side, share_prefix=share_prefix
    )
    letters = [" A", " B", " C", " D"]
    peaked = torch.log_softmax(torch.tensor([10.0] + [0.0] * (len(tok) - 1)), 0)
    sure, unsure = peaked[0].item(), peaked[1].item()
    for score, gold in zip(scores, QUESTIONS.values(), strict=True):
        # " X" is two byte tokens: the space (expected for every choice), then the letter (expected for the gold)
        expected = [sure + (sure if letter == gold else unsure) for letter in letters]
        assert score == pytest.approx(expected, abs=1e-5)


def test_loglik_runs_each_context_once_and_the_shared_prefix_once(tiny):
    _, tok = tiny
    requests = _mcq_requests()
    model = OracleLM(tok, answer_oracle(QUESTIONS, "Answer:"))
    loglik_choices(model, tok, requests, batch_size=8, share_prefix=True)
    prefix = common_prefix_length([tok(r.context)["input_ids"] for r in requests])
    assert prefix == len(tok("Questions about things.\n\n")["input_ids"])
    # one pass over the shared prefix, one over the 5 contexts (minus the prefix), then the 5 x 4 letters after
    # the space, one token each, in chunks of batch_size (question, choice) pairs
    assert model.calls[0] == (1, prefix)
    assert model.calls[1][0] == len(requests)
    assert model.calls[2:] == [(8, 1), (8, 1), (4, 1)]


def test_groups_do_not_share_prefixes_across_groups(tiny):
    _, tok = tiny
    requests = [*_mcq_requests("a")[:2], *_mcq_requests("b")[2:]]
    model = OracleLM(tok, answer_oracle(QUESTIONS, "Answer:"))
    scores = loglik_choices(model, tok, requests, batch_size=8)
    assert [max(range(4), key=s.__getitem__) for s in scores] == [1, 3, 0, 2, 1]
    assert sum(1 for batch, _ in model.calls if batch == 1) == 2  # one prefix pass per group


def test_loglik_equals_hand_computed_values_of_a_bigram_oracle(tiny):
    """Scores are exact sums of log-probabilities, not just a right argmax."""
    _, tok = tiny
    model = OracleLM(tok, lambda text: "x" if text.endswith("a") else None)  # after 'a', 'x' gets +10
    (score,) = loglik_choices(model, tok, [ChoiceRequest("ba", ("x", "y", "xa", "xy"))])
    vocab = len(tok)
    p_peaked = torch.log_softmax(torch.tensor([10.0] + [0.0] * (vocab - 1)), 0)
    sure, unsure, flat = p_peaked[0].item(), p_peaked[1].item(), -torch.log(torch.tensor(float(vocab))).item()
    assert score == pytest.approx((sure, unsure, sure + flat, sure + flat), abs=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Batched equals one-at-a-time on a real (tiny) transformer


REQUESTS = [
    ChoiceRequest("The following are questions.\n\nWhat is 2+2?\nAnswer:", (" A", " B", " four", " twenty two"), "g"),
    ChoiceRequest("The following are questions.\n\nWho?\nAnswer:", (" A", " Bob and Alice"), "g"),
    ChoiceRequest("The following are questions.\n\nA much longer question, to pad?\nAnswer: ", ("y", "n"), "g"),
    ChoiceRequest("Another group's context", (" x", " yz"), "h"),
    ChoiceRequest("Another group's other context, longer", (" x", " yz"), "h"),
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_and_reference(request, tiny, tiny_gpt2):
    model, tok = tiny if request.param == "llama" else tiny_gpt2
    reference = [[loglik_reference(model, tok, r.context, c) for c in r.continuations] for r in REQUESTS]
    return model, tok, reference


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_loglik_equals_one_at_a_time(model_and_reference, padding_side, share_prefix, batch_size):
    model, tok, reference = model_and_reference
    got = loglik_choices(
        model, tok, REQUESTS, batch_size=batch_size, padding_side=padding_side, share_prefix=share_prefix
    )
    for ours, ref in zip(got, reference, strict=True):
        assert ours == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_the_padding_test_is_sensitive_to_position_ids(tiny, tiny_gpt2, which):
    """With a cached prefix and a left-padded suffix, positions that ignore the mask change the last logits
    (for RoPE too: the suffix is shifted against the prefix), so the equality test above can fail."""
    model, tok = tiny if which == "llama" else tiny_gpt2
    prefix, suffix = tok("Shared start. ")["input_ids"], tok("Question?\nAnswer:")["input_ids"]
    with torch.inference_mode():
        alone = model(input_ids=torch.tensor([prefix + suffix])).logits[0, -1]
        cache = model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values
        ids = torch.tensor([[tok.pad_token_id] * 3 + suffix])
        mask = torch.tensor([[1] * len(prefix) + [0] * 3 + [1] * len(suffix)])
        naive = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits[0, -1]
        cache = model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        right = model(input_ids=ids, attention_mask=mask, past_key_values=cache, position_ids=positions).logits[0, -1]
    assert torch.allclose(right, alone, atol=1e-4)
    assert not torch.allclose(naive, alone, atol=1e-3)


def test_bad_padding_side_is_an_error(tiny):
    with pytest.raises(EvalError, match="padding_side"):
        loglik_choices(tiny[0], tiny[1], REQUESTS, padding_side="middle")


# ----------------------------------------------------------------------------------------------------------------
# Generation


PROMPTS = ["Hello there, ", "A longer prompt that needs padding: ", "x"]


def test_batched_greedy_generation_equals_one_at_a_time(tiny):
    model, tok = tiny
    batched = generate_texts(model, tok, PROMPTS, max_new_tokens=6, batch_size=3)
    alone = [generate_texts(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    assert batched == alone
    assert all(isinstance(t, str) and t for t in batched)


def test_sampling_is_reproducible_and_independent_of_the_batch(tiny):
    model, tok = tiny
    hot = Sampling(temperature=5.0, top_p=1.0, top_k=0, seed=3)  # hot: samples differ from greedy
    a = generate_texts(model, tok, PROMPTS, max_new_tokens=8, batch_size=3, sampling=hot)
    b = generate_texts(model, tok, PROMPTS, max_new_tokens=8, batch_size=1, sampling=hot)
    c = generate_texts(model, tok, PROMPTS, max_new_tokens=8, batch_size=3, sampling=Sampling(5.0, seed=4))
    greedy = generate_texts(model, tok, PROMPTS, max_new_tokens=8, batch_size=3)
    assert a == b
    assert a != c
    assert a != greedy


def test_gumbel_sampler_draws_from_the_softmax():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    scores = torch.log(probs).expand(20_000, -1).clone()
    draws = GumbelSampler(range(20_000))(torch.zeros((20_000, 1), dtype=torch.long), scores).argmax(-1)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert freq.tolist() == pytest.approx(probs.tolist(), abs=0.015)


def test_sampling_processors_apply_top_k_and_top_p_before_drawing():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1])).expand(5_000, -1).clone()
    ids = torch.zeros((5_000, 1), dtype=torch.long)
    top_k = LogitsProcessorList(_sampling_processors(Sampling(1.0, top_k=2), list(range(5_000))))
    assert set(top_k(ids, logits.clone()).argmax(-1).tolist()) == {0, 1}
    top_p = LogitsProcessorList(_sampling_processors(Sampling(1.0, top_p=0.6), list(range(5_000))))
    assert set(top_p(ids, logits.clone()).argmax(-1).tolist()) == {0, 1}  # 0.4 + 0.3 covers 0.6
    cold = LogitsProcessorList(_sampling_processors(Sampling(0.01), list(range(5_000))))
    assert set(cold(ids, logits.clone()).argmax(-1).tolist()) == {0}


@pytest.mark.parametrize(
    "kwargs", [{"temperature": 0.0}, {"temperature": 1.0, "top_p": 0.0}, {"temperature": 1.0, "top_k": -1}]
)
def test_bad_sampling_settings(kwargs):
    with pytest.raises(EvalError):
        Sampling(**kwargs)


def test_generation_stops_at_the_first_eos(tiny):
    model, tok = tiny
    prompt = torch.tensor([tok("abc")["input_ids"]])
    config = GenerationConfig(do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        ids = model.generate(input_ids=prompt, generation_config=config)[0, prompt.shape[1] :].tolist()
    assert ids[2] not in ids[:2]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = ids[2]  # pretend the third generated token ends the sequence
    try:
        stopped = generate_texts(model, tok, ["abc"], max_new_tokens=6)[0]
    finally:
        model.generation_config.eos_token_id = saved
    assert stopped == tok.decode(ids[:2], skip_special_tokens=True)
