"""Model glue: backbone_of / final_hidden, head losses computed inside UnlearnModel's head, FrozenReference."""
import copy
import functools

import pytest
import torch

import simnpo_fast as sf
from simnpo_fast.model import FrozenReference, UnlearnModel, backbone_of, final_hidden, logprob_head


def _tiny(vocab=50, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def _data(rows=4, T=9, vocab=50, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, T), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, torch.ones_like(ids), labels


def test_backbone_of_and_final_hidden():
    hf = _tiny()
    assert backbone_of(hf) is hf.model
    ids, mask, _ = _data()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(final_hidden(hf, ids, mask), want)

    class Wrapped(torch.nn.Module):  # base_model_prefix missing: falls back to .model
        def __init__(self):
            super().__init__()
            self.model = hf.model

    assert backbone_of(Wrapped()) is hf.model
    with pytest.raises(TypeError, match="cannot find the backbone of Linear"):
        backbone_of(torch.nn.Linear(2, 2))


def test_head_losses_run_inside_the_head():
    hf = _tiny()
    model = UnlearnModel(copy.deepcopy(hf))
    ids, mask, labels = _data()
    with torch.no_grad():
        h = final_hidden(hf, ids, mask)
        W = hf.lm_head.weight
        got = model(ids, mask, logprob_head, labels=labels)
        want = sf.sequence_logprob(h, W, labels)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])
    crit = sf.UnlearningLoss("simnpo", retain_weight=0.5)
    batch = sf.ForgetRetainBatch(ids, mask, labels, 2)
    counts = sf.StepCounts.of([batch], crit.method)
    out = model(ids, mask, functools.partial(crit.batch_loss, batch=batch, counts=counts))
    torch.testing.assert_close(out.loss, crit.batch_loss(W, None, h, batch, counts).loss)


def test_frozen_reference_feeds_the_retain_kl():
    ref_hf = _tiny(seed=3)
    ref = FrozenReference(UnlearnModel(copy.deepcopy(ref_hf)))
    ids, mask, labels = _data(rows=3)
    head = ref(ids, mask)
    assert isinstance(head, sf.ReferenceHead) and not head.hidden.requires_grad
    torch.testing.assert_close(head.hidden, final_hidden(ref_hf, ids, mask).detach())
    assert torch.equal(head.weight, ref_hf.lm_head.weight) and head.weight.data_ptr() != ref_hf.lm_head.weight.data_ptr()
    assert ref(ids, mask).weight is head.weight  # copied once
    policy = UnlearnModel(_tiny(seed=4))
    crit = sf.UnlearningLoss("simnpo", retain_loss="kl", retain_weight=1.0)
    batch = sf.ForgetRetainBatch(ids, mask, labels, 1)
    reference = ref(*batch.retain_inputs())
    out = policy(ids, mask, functools.partial(crit.batch_loss, batch=batch, reference=reference))
    with torch.no_grad():
        h = final_hidden(policy.lm, ids, mask)
    kl = sf.kl_loss(h[1:], policy.lm.lm_head.weight, labels[1:], reference.hidden, reference.weight)
    torch.testing.assert_close(out.terms["retain_loss"], kl.detach())
