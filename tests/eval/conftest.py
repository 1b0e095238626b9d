"""Fixtures for the evaluation tests: a word-level tokenizer, a bigram LM whose probabilities are known exactly,
a tiny TOFU-layout folder and a tiny Llama."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

WORDS = ["Question:", "Answer:", "who", "what", "is", "a", "b", "c", "d", "e", "f", "g", "x", "y", "z"]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]")


class _Backbone(nn.Module):
    """hidden state at position t = one-hot(input_ids[t]) (d = V): the LM is a pure bigram model."""

    def __init__(self, V):
        super().__init__()
        self.V = V
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids=None, attention_mask=None, **kw):
        return torch.nn.functional.one_hot(input_ids, self.V).to(torch.float64) + 0 * self.dummy.double()


class BigramLM(nn.Module):
    """``p(next = v | prev = u) = table[u, v]`` exactly: head weight ``W[v, u] = log table[u, v]``, so
    ``logits = W @ onehot(u) = log table[u]`` whose log-softmax is ``log table[u]`` (rows sum to one)."""

    base_model_prefix = "model"

    def __init__(self, table: torch.Tensor):
        super().__init__()
        V = table.shape[0]
        self.table = table.double()
        self.model = _Backbone(V)
        self.lm_head = nn.Linear(V, V, bias=False).double()
        with torch.no_grad():
            self.lm_head.weight.copy_(self.table.log().T)

    def get_output_embeddings(self):
        return self.lm_head

    def seq_prob(self, tokens):
        """Oracle: product of table entries along consecutive tokens."""
        p = 1.0
        for u, v in zip(tokens[:-1], tokens[1:]):
            p *= float(self.table[u, v])
        return p


def random_table(V, seed=0, temp=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(V, V, generator=g, dtype=torch.float64) / temp, dim=-1)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


TINY_TOFU = {
    "forget10_perturbed": [
        {"question": "who is a", "answer": "a b", "paraphrased_answer": "b a", "perturbed_answer": ["c", "d e"]},
        {"question": "what is b", "answer": "c d e", "paraphrased_answer": "e", "perturbed_answer": ["x", "y z", "f"]},
        {"question": "who is c", "answer": "g", "paraphrased_answer": "g g", "perturbed_answer": ["a", "b"]},
    ],
    "retain_perturbed": [
        {"question": "who is x", "answer": "x y", "paraphrased_answer": "y x", "perturbed_answer": ["z", "a b"]},
        {"question": "what is y", "answer": "z", "paraphrased_answer": "z z", "perturbed_answer": ["c", "d"]},
    ],
    "real_authors_perturbed": [
        {"question": "who is d", "answer": "d", "perturbed_answer": ["e", "f", "g"]},
        {"question": "who is e", "answer": "e f", "perturbed_answer": ["a", "b c"]},
    ],
    "world_facts_perturbed": [
        {"question": "what is f", "answer": "f", "perturbed_answer": ["x", "y"]},
        {"question": "what is g", "answer": "g a", "perturbed_answer": ["z", "a"]},
    ],
}


@pytest.fixture
def tiny_tofu(tmp_path):
    d = tmp_path / "tofu"
    d.mkdir()
    for name, rows in TINY_TOFU.items():
        write_jsonl(d / f"{name}.json", rows)
    return str(d)


@pytest.fixture
def wtok():
    return word_tokenizer()


def tiny_llama(vocab_size, seed=0, layers=2, d=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg)
    m.eval()
    return m


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster, and immune to a busy shared CPU (spinning OpenMP threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
