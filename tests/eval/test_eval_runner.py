"""Model-side primitives on a tiny Llama: fused likelihoods vs full logits, per-token log p, batched greedy
generation vs HF ``generate`` one prompt at a time, the length-sorted global batching."""
import pytest
import torch

from simnpo_fast.eval import runner as R

from .conftest import tiny_llama


def _examples(V, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = 4 + i * 2
        ids = torch.randint(3, V, (L,), generator=g).tolist()
        p = 2 + i % 3
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def _naive(model, ex):
    ids = torch.tensor([ex["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    toks = [float(lp[t - 1, ex["input_ids"][t]]) for t in range(1, len(ex["labels"])) if ex["labels"][t] != -100]
    return toks


def test_fused_logprobs_match_full_logits():
    V = 50
    model = tiny_llama(V, seed=1)
    exs = _examples(V)
    got = R.logprobs(model, exs, pad_id=0, batch_size=2)
    per_tok = R.token_logprobs(model, exs, pad_id=0, batch_size=3)
    for ex, (s, n), toks in zip(exs, got, per_tok):
        ref = _naive(model, ex)
        assert n == len(ref)
        assert s == pytest.approx(sum(ref), abs=1e-4)
        assert toks == pytest.approx(ref, abs=1e-4)


def test_batched_greedy_matches_hf_generate_unbatched():
    V = 40
    model = tiny_llama(V, seed=2)
    prompts = [[1, 5, 9], [1, 7], [1, 3, 4, 5, 6, 8], [1, 20, 21, 22]]
    got = R.generate(model, prompts, max_new_tokens=6, pad_id=0, eos_id=2, batch_size=4)
    for p, g in zip(prompts, got):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2)[0, len(p):].tolist()
        if 2 in ref:
            ref = ref[: ref.index(2)]
        assert g == ref


def test_global_batches_independent_of_world_and_sorted():
    b = R.global_batches([3, 9, 9, 1, 5], 2)
    assert b == [[1, 2], [4, 0], [3]]
    with pytest.raises(ValueError):
        R.global_batches([1], 0)


def test_prompt_of():
    assert R.prompt_of({"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}) == [1, 2]


def test_per_prompt_generation_limits_equal_hf_generate():
    """One budget per prompt (TOFU's per-batch max_length): each prompt's tokens equal HF greedy with that budget."""
    V = 40
    model = tiny_llama(V, seed=3)
    prompts = [[1, 5, 9], [1, 7], [1, 3, 4, 5, 6, 8], [1, 20, 21, 22]]
    limits = [4, 0, 7, 1]
    got = R.generate(model, prompts, max_new_tokens=limits, pad_id=0, eos_id=None, batch_size=3)
    for p, lim, g in zip(prompts, limits, got):
        assert len(g) == lim
        if lim:
            ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=lim, do_sample=False, pad_token_id=0, eos_token_id=None)
            assert g == ref[0, len(p):].tolist()
    with pytest.raises(ValueError, match="3 generation limits for 4 prompts"):
        R.generate(model, prompts, max_new_tokens=[1, 2, 3], pad_id=0, eos_id=None)
