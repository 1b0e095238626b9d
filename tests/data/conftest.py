"""Session fixtures of the data tests: a small synthetic corpus, the project's own BPE tokenizer trained on it,
its pad == eos variant, and a hand-made word-level tokenizer whose masks can be written down by hand."""
import copy

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from simnpo_fast.data import synthetic, train_tokenizer


@pytest.fixture(scope="session")
def syn_dir(tmp_path_factory):
    """A 40-author x 10-fact synthetic corpus in the TOFU layout."""
    d = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(str(d), n_authors=40, facts_per_author=10, seed=0)
    return str(d)


@pytest.fixture(scope="session")
def bpe_tok(syn_dir, tmp_path_factory):
    """Byte-level BPE (2000 tokens) trained on the synthetic corpus, saved and reloaded (as the trainer will)."""
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(syn_dir, str(out), vocab_size=2000)
    from simnpo_fast.data import load_tokenizer
    return load_tokenizer(str(out))


@pytest.fixture(scope="session")
def eos_pad_tok(bpe_tok):
    """The same tokenizer with pad token = EOS (like Llama/phi checkpoints set up for fine-tuning)."""
    tok = copy.deepcopy(bpe_tok)
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    return tok


WORDS = ["<pad>", "<s>", "</s>", "Question:", "Who", "wrote", "it?", "Answer:", "Bob", "did.", "[INST]", "[/INST]",
         "Yes.", "What?"]


@pytest.fixture(scope="session")
def word_tok():
    """Whitespace word-level tokenizer: token i is WORDS[i], so expected ids can be written by hand."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="session")
def word_tok_eos_pad(word_tok):
    tok = copy.deepcopy(word_tok)
    tok.pad_token = tok.eos_token
    return tok
