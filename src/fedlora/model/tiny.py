"""Tiny random Llama models built in code, for tests and the tiny configs (no download, no cache).

* ``build_tiny_model`` -- a random fp32 Llama (hidden 64, 2 layers) with a byte-level BPE
  tokenizer trained on an embedded corpus; weights depend only on the seed.
* ``build_tiny_lm`` -- the same with embeddings scaled by 10, so a LoRA can teach it text.
"""

from __future__ import annotations

import functools
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

_TINY_WORDS = """
the a an of and or to in on at for with by from as is are was were be been has have had not no
yes it this that these those there here what which who when where why how all any some each more
most less few many much very than then so if but because about into over under after before
good bad high low small large big short long young old new first last next same other none
true false positive negative unknown missing normal abnormal medium average mean median worst
error value values row rows column columns feature features label labels class classes table
Question Answer What Is Does Predict Classify patient client customer person record sample
malignant benign diagnosis tumor cell radius texture perimeter area smoothness compactness
concavity concave points symmetry fractal dimension credit amount duration months years age
income savings account checking employment status housing job telephone foreign worker purpose
car furniture education business repairs male female single married divorced own rent free
skilled unskilled management house property installment rate guarantor debtor history paid
delayed critical existing bank stores none year month day week time number count total percent
capital city country France Paris Germany Berlin quick brown fox jumps lazy dog
""".split()


def _tiny_corpus() -> list[str]:
    """Deterministic training text: tabular-style lines, questions, digits and punctuation."""
    rng = random.Random(0)
    values = ["yes", "no", "good", "bad", "malignant", "benign", "high", "low", "unknown"]
    lines = [" ".join(_TINY_WORDS), "0 1 2 3 4 5 6 7 8 9 10 100 1000 0.5 -1 3.14 1e-3"]
    for _ in range(600):
        parts = []
        for _ in range(rng.randint(3, 10)):
            word = rng.choice(_TINY_WORDS)
            roll = rng.random()
            if roll < 0.25:
                word = f"{word} is {rng.choice(values)}"
            elif roll < 0.5:
                number = rng.choice([rng.randint(0, 999), round(rng.uniform(0, 100), 2)])
                word = f"{word} is {number}"
            parts.append(word)
        sep = rng.choice([". ", ", ", "; ", "\n- ", " "])
        lines.append(sep.join(parts) + rng.choice([".", "?", "!", ":", ""]))
        lines.append(f"Question: Is the {rng.choice(['patient', 'client'])} "
                     f"{rng.choice(values)}? Answer: {rng.choice(values)}")
    return lines


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    """Train a byte-level BPE (about 1k tokens) on the embedded corpus; ~20 ms, deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1536,
        min_frequency=2,
        special_tokens=["<|endoftext|>", "<|bos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any UTF-8 text
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer)
    return tok.to_str()


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        eos_token="<|endoftext|>",
        bos_token="<|bos|>",
        pad_token="<|pad|>",
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A random fp32 Llama (hidden 64, 2 layers, 4 heads, 2 KV heads, ~0.2M params) for tests.

    Weights depend only on ``seed``; the global RNG state is left untouched.
    """
    tok = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    return model.eval(), tok


def build_tiny_lm(seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The tiny Llama with its (tied) embeddings scaled by 10: a random LM whose LoRA can learn text.

    The plain tiny model's embeddings (std 0.02) cap every logit near +-1.3, so no LoRA moves its
    next-token loss far below log |V|; scaled, a LoRA on a few modules learns a table's row format
    (column names, separators, a handful of category values) in a few hundred steps (Concordia's
    generator on the tiny model: configs/concordia_tiny.yaml). Columns with many distinct value
    tokens stay hard: random 64-dim embeddings cannot single out 40 ages at once, so a toy
    generator on such a table writes few valid rows (about 10 % after 300 steps).
    """
    model, tok = build_tiny_model(seed)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)  # tied: the LM head scales too
    return model, tok
