"""Per-example answer log-likelihoods across ranks: the rank shares (every example once, the same number of
forwards on every rank) and the values against an fp64 full-logits oracle."""
import pytest
import torch

from simnpo_fast.likelihood import mean_loglik, rank_batches, sequence_logps


@pytest.mark.parametrize("n, batch, world", [(1, 4, 1), (7, 3, 1), (10, 4, 3), (5, 16, 4), (3, 1, 8), (13, 2, 2)])
def test_rank_batches_cover_every_example_once_in_lock_step(n, batch, world):
    shares = [rank_batches(n, batch, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # the same number of forwards on every rank
    flat = [i for s in shares for b in s for i in b]
    assert sorted(flat) == list(range(n))
    assert all(len(b) <= batch for s in shares for b in s)


class _Collator:
    def pad(self, examples):
        T = max(len(e["input_ids"]) for e in examples)
        ids = torch.zeros(len(examples), T, dtype=torch.long)
        labels = torch.full((len(examples), T), -100, dtype=torch.long)
        mask = torch.zeros(len(examples), T, dtype=torch.long)
        for i, e in enumerate(examples):
            L = len(e["input_ids"])
            ids[i, :L] = torch.tensor(e["input_ids"])
            labels[i, :L] = torch.tensor(e["labels"])
            mask[i, :L] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_sequence_logps_match_full_logits_in_fp64():
    from transformers import LlamaConfig, LlamaForCausalLM

    from simnpo_fast.model import UnlearnModel

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2))
    g = torch.Generator().manual_seed(1)
    data = []
    for L in (9, 5, 12, 7, 3):
        ids = torch.randint(1, 50, (L,), generator=g).tolist()
        data.append({"input_ids": ids, "labels": [-100] * (L // 2) + ids[L // 2:]})  # the prompt is masked
    model = UnlearnModel(hf)
    model.train()
    got = sequence_logps(model, data, _Collator(), torch.device("cpu"), batch_size=2)
    assert model.training  # the flag is restored
    want = torch.zeros(len(data), 2, dtype=torch.float64)
    with torch.no_grad():
        hf64 = hf.double()
        for i, e in enumerate(data):
            logits = hf64(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
            tgt = torch.tensor(e["labels"][1:])
            m = tgt != -100
            lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp_min(0)[:, None])[:, 0]
            want[i] = torch.stack([lp[m].sum(), m.sum().double()])
    torch.testing.assert_close(got[:, 1], want[:, 1])
    torch.testing.assert_close(got[:, 0], want[:, 0], rtol=1e-5, atol=1e-5)
    hf.float()
    assert mean_loglik(model, data, _Collator(), torch.device("cpu")) == pytest.approx(
        float(want[:, 0].sum() / want[:, 1].sum()), rel=1e-5)


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))


def _examples(n=7, seed=2, shifted=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = 3 + (5 * i) % 9
        ids = torch.randint(1, 40, (L,), generator=g).tolist()
        labels = [-100] * (1 + i % 3) + ids[1 + i % 3:]
        if i == 3:
            labels = [-100] * L  # no answer token: (0, 0)
        if shifted:  # label t = the target of position t
            labels = labels[1:] + [-100]
        out.append({"input_ids": ids, "labels": labels})
    return out


def _naive_logps(hf, examples, shifted):
    """The oracle: one example at a time, full fp64 logits, log_softmax, gather, fp64 sums."""
    import copy

    ref = copy.deepcopy(hf).double().eval()
    rows = []
    with torch.no_grad():
        for e in examples:
            logits = ref(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            tgt = torch.tensor(e["labels"])
            if not shifted:
                logits, tgt = logits[:-1], tgt[1:]
            m = tgt != -100
            lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp_min(0)[:, None])[:, 0]
            rows.append([float(lp[m].sum()), float(m.sum())])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["plain", "patched", "unlearn"])
@pytest.mark.parametrize("by_length, sharded, shifted, batch", [(False, True, False, 3), (True, True, False, 2),
                                                                (False, False, True, 4), (True, True, True, 16)])
def test_the_one_scorer_matches_full_logits_in_fp64(kind, by_length, sharded, shifted, batch):
    """sequence_logps on every model kind it takes (a plain HF causal LM, a patched one, an UnlearnModel), both
    batch plans, sharded or not, HF-aligned or already shifted labels, against the naive fp64 computation."""
    from simnpo_fast.data import DataCollator
    from simnpo_fast.model import UnlearnModel, patch

    hf = _tiny_llama().double()
    data = _examples(shifted=shifted)
    want = _naive_logps(hf, data, shifted)
    model = {"plain": lambda m: m, "patched": patch, "unlearn": UnlearnModel}[kind](hf)
    model.train()
    got = sequence_logps(model, data, DataCollator(0), batch_size=batch, by_length=by_length, sharded=sharded,
                         shift=not shifted)
    assert model.training and got.dtype == torch.float64 and got.shape == (len(data), 2)
    assert torch.equal(got[:, 1], want[:, 1]) and got[3].tolist() == [0.0, 0.0]
    torch.testing.assert_close(got[:, 0], want[:, 0], rtol=1e-10, atol=1e-10)


def test_the_one_scorer_in_fp32_and_its_batch_step():
    """An fp32 model: within fp32 rounding of the fp64 oracle, and each row equal to batch_logps of its batch."""
    from simnpo_fast.data import DataCollator
    from simnpo_fast.likelihood import batch_logps

    hf = _tiny_llama(seed=1)
    data = _examples(n=5, seed=4)
    got = sequence_logps(hf, data, DataCollator(0), batch_size=2)
    torch.testing.assert_close(got, _naive_logps(hf, data, False), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        lp, n = batch_logps(hf.eval(), DataCollator(0).pad(data[2:4]))
    assert got[2:4].tolist() == torch.stack([lp.double(), n.double()], 1).tolist()
