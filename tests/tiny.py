"""Tiny, randomly initialised causal LMs and in-memory tokenizers for tests: no hub access, no downloads.

Everything is built in memory: `tiny_model(model_type)` instantiates a random causal LM from its config class
(seeded, float32, eval, eager attention, use_cache=False, pad/bos/eos = 0/1/2, max positions 128, 4 heads so
head_dim = hidden/4, 2 KV heads where the family has GQA), and the tokenizers are trained on `corpus()` in a
few milliseconds. Random init (std 0.02) leaves every bias at 0 and every norm weight at 1 (Gemma: 0, i.e.
scale 1+0); perturb them in a test that must tell those apart from identity.

Facts gathered by building each family with transformers 5.24.0 (defaults: hidden 32, ffn 64, 4 layers,
vocab V) and inspecting it; `python tests/tiny.py` re-derives and prints them. Paths are dotted module names:
"blocks" from the model root, "down"/"up" relative to one block. Linear weights are [out, in]; transformers'
Conv1D (gpt2 only, both MLP matrices) stores [in, out]. "returns" is the type a block's forward returns (seen by a forward hook),
with or without output_attentions. Every final norm here is applied right before the unembedding.

  family     | blocks               | down              | down class   | down W   | final norm (class)                         | unembed | tied | block returns
  -----------|----------------------|-------------------|--------------|----------|--------------------------------------------|---------|------|--------------
  gpt2       | transformer.h        | mlp.c_proj        | Conv1D       | [64,32]  | transformer.ln_f (LayerNorm)               | lm_head | yes  | Tensor
  gptj       | transformer.h        | mlp.fc_out        | Linear       | [32,64]  | transformer.ln_f (LayerNorm)               | lm_head | no   | Tensor
  gpt_neox   | gpt_neox.layers      | mlp.dense_4h_to_h | Linear       | [32,64]  | gpt_neox.final_layer_norm (LayerNorm)      | lm_head | no   | Tensor
  llama      | model.layers         | mlp.down_proj     | Linear       | [32,64]  | model.norm (LlamaRMSNorm)                  | lm_head | no   | Tensor
  mistral    | model.layers         | mlp.down_proj     | Linear       | [32,64]  | model.norm (MistralRMSNorm)                | lm_head | no   | Tensor
  qwen2      | model.layers         | mlp.down_proj     | Linear       | [32,64]  | model.norm (Qwen2RMSNorm)                  | lm_head | no   | Tensor
  falcon     | transformer.h        | mlp.dense_4h_to_h | FalconLinear | [32,128] | transformer.ln_f (LayerNorm)               | lm_head | yes  | tuple
  gemma      | model.layers         | mlp.down_proj     | Linear       | [32,64]  | model.norm (GemmaRMSNorm)                  | lm_head | yes  | Tensor
  phi        | model.layers         | mlp.fc2           | Linear       | [32,64]  | model.final_layernorm (LayerNorm)          | lm_head | no   | Tensor
  gpt_neo    | transformer.h        | mlp.c_proj        | Linear       | [32,64]  | transformer.ln_f (LayerNorm)               | lm_head | yes  | tuple
  qwen3      | model.layers         | mlp.down_proj     | Linear       | [32,64]  | model.norm (Qwen3RMSNorm)                  | lm_head | no   | Tensor
  gemma2     | model.layers         | mlp.down_proj     | Linear       | [32,64]  | model.norm (Gemma2RMSNorm)                 | lm_head | yes  | Tensor
  phi3       | model.layers         | mlp.down_proj     | Linear       | [32,64]  | model.norm (Phi3RMSNorm)                   | lm_head | no   | Tensor
  olmo       | model.layers         | mlp.down_proj     | Linear       | [32,64]  | model.norm (OlmoLayerNorm)                 | lm_head | no   | Tensor
  opt        | model.decoder.layers | fc2               | Linear       | [32,64]  | model.decoder.final_layer_norm (LayerNorm) | lm_head | yes  | Tensor
  stablelm   | model.layers         | mlp.down_proj     | Linear       | [32,64]  | model.norm (LayerNorm)                     | lm_head | no   | Tensor
  starcoder2 | model.layers         | mlp.c_proj        | Linear       | [32,64]  | model.norm (LayerNorm)                     | lm_head | yes  | Tensor

  family     | MLP up projection(s) [weight]                | input embedding (class)
  -----------|----------------------------------------------|---------------------------------------------------
  gpt2       | mlp.c_fc [32, 64]                            | transformer.wte (Embedding)
  gptj       | mlp.fc_in [64, 32]                           | transformer.wte (Embedding)
  gpt_neox   | mlp.dense_h_to_4h [64, 32]                   | gpt_neox.embed_in (Embedding)
  llama      | mlp.gate_proj [64, 32], mlp.up_proj [64, 32] | model.embed_tokens (Embedding)
  mistral    | mlp.gate_proj [64, 32], mlp.up_proj [64, 32] | model.embed_tokens (Embedding)
  qwen2      | mlp.gate_proj [64, 32], mlp.up_proj [64, 32] | model.embed_tokens (Embedding)
  falcon     | mlp.dense_h_to_4h [128, 32]                  | transformer.word_embeddings (Embedding)
  gemma      | mlp.gate_proj [64, 32], mlp.up_proj [64, 32] | model.embed_tokens (GemmaTextScaledWordEmbedding)
  phi        | mlp.fc1 [64, 32]                             | model.embed_tokens (Embedding)
  gpt_neo    | mlp.c_fc [64, 32]                            | transformer.wte (Embedding)
  qwen3      | mlp.gate_proj [64, 32], mlp.up_proj [64, 32] | model.embed_tokens (Embedding)
  gemma2     | mlp.gate_proj [64, 32], mlp.up_proj [64, 32] | model.embed_tokens (Gemma2TextScaledWordEmbedding)
  phi3       | mlp.gate_up_proj [128, 32]                   | model.embed_tokens (Embedding)
  olmo       | mlp.gate_proj [64, 32], mlp.up_proj [64, 32] | model.embed_tokens (Embedding)
  opt        | fc1 [64, 32]                                 | model.decoder.embed_tokens (Embedding)
  stablelm   | mlp.gate_proj [64, 32], mlp.up_proj [64, 32] | model.embed_tokens (Embedding)
  starcoder2 | mlp.c_fc [64, 32]                            | model.embed_tokens (Embedding)

Notes for an architecture registry:
  * The unembedding is `lm_head` in all 17 families, including gpt_neox (`embed_out` is gone in
    transformers 5); `model.get_output_embeddings()` finds it. lm_head has a bias in gptj and phi only.
  * falcon: FalconLinear subclasses nn.Linear. The MLP width is `config.ffn_hidden_size`, set here to
    4*hidden (=128, falcon-7b's ratio), so tiny_model's `ffn` does not apply to falcon. Multi-query (1 KV
    head: query_key_value is [hidden + 2*head_dim, hidden] = [48,32]), parallel_attn=True,
    new_decoder_architecture=False, alibi=False, bias=False, one input_layernorm per block, full rotary.
  * Parallel attention+MLP (both read the same block input): gptj, gpt_neox (use_parallel_residual=True),
    falcon, phi. The others are sequential.
  * gemma2: the MLP output goes through `post_feedforward_layernorm` before the residual add, so
    down_proj's output is not the block's MLP residual contribution; it also has pre_feedforward_layernorm,
    final logit softcapping 30 and attention softcapping 50, and alternates sliding/full layers (window 128).
  * gemma/gemma2: embed_tokens itself multiplies by sqrt(hidden) (…TextScaledWordEmbedding, so its output is
    already scaled), and their RMSNorms scale by (1 + weight), weight initialised to 0.
  * qwen3 has q_norm/k_norm inside self_attn; phi3 fuses qkv (`self_attn.qkv_proj`) and gate/up
    (`mlp.gate_up_proj` = [2*ffn, hidden]); olmo's LayerNorm has no parameters.
  * Partial rotary: gptj rotary_dim 4, gpt_neox/phi/stablelm partial_rotary_factor 0.5 (4 of head_dim 8).
  * gpt_neo alternates global/local attention with window_size 128 (= max positions, so non-binding).
  * opt: do_layer_norm_before=True (pre-LN, like opt-125m..66b), learned positions with the OPT offset of 2.
  * falcon and gpt_neo blocks return a tuple (hidden_states, attn_weights) even without
    output_attentions; every other block returns the hidden-states Tensor itself, even with it.
"""  # noqa: E501

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Callable
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerFast

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MAX_POSITIONS = 128
N_HEADS = 4  # hidden=32 -> head_dim 8
N_KV_HEADS = 2  # grouped-query attention for the families that support it
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2, 3 in every tokenizer here


def _ids() -> dict[str, int]:
    return {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


def _rope(partial: float | None = None) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}
    if partial is not None:
        rope["partial_rotary_factor"] = partial
    return rope


def _llama_like(v: int, n: int, d: int, f: int, **extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": v,
        "hidden_size": d,
        "intermediate_size": f,
        "num_hidden_layers": n,
        "num_attention_heads": N_HEADS,
        "num_key_value_heads": N_KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        **extra,
    }


def _gpt_neo_layers(n: int) -> list[Any]:
    layers: list[Any] = [[["global", "local"], n // 2]]
    if n % 2:
        layers.append([["global"], 1])
    return layers


# model_type -> (config class name, kwargs builder(vocab, n_layer, hidden, ffn)).
_BUILDERS: dict[str, tuple[str, Callable[[int, int, int, int], dict[str, Any]]]] = {
    "gpt2": (
        "GPT2Config",
        lambda v, n, d, f: {
            "vocab_size": v,
            "n_positions": MAX_POSITIONS,
            "n_embd": d,
            "n_layer": n,
            "n_head": N_HEADS,
            "n_inner": f,
        },
    ),
    "gptj": (
        "GPTJConfig",
        lambda v, n, d, f: {
            "vocab_size": v,
            "n_positions": MAX_POSITIONS,
            "n_embd": d,
            "n_layer": n,
            "n_head": N_HEADS,
            "n_inner": f,
            "rotary_dim": d // N_HEADS // 2,  # partial rotary: half of head_dim
        },
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        lambda v, n, d, f: {
            "vocab_size": v,
            "hidden_size": d,
            "num_hidden_layers": n,
            "num_attention_heads": N_HEADS,
            "intermediate_size": f,
            "max_position_embeddings": MAX_POSITIONS,
            "rope_parameters": _rope(0.5),
            "use_parallel_residual": True,
        },
    ),
    "llama": (
        "LlamaConfig",
        lambda v, n, d, f: _llama_like(v, n, d, f, head_dim=d // N_HEADS, rope_parameters=_rope()),
    ),
    "mistral": (
        "MistralConfig",
        lambda v, n, d, f: _llama_like(
            v, n, d, f, head_dim=d // N_HEADS, sliding_window=None, rope_parameters=_rope()
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        lambda v, n, d, f: _llama_like(
            v, n, d, f, use_sliding_window=False, max_window_layers=n, rope_parameters=_rope()
        ),
    ),
    "falcon": (
        "FalconConfig",
        lambda v, n, d, f: {  # falcon-7b layout; the MLP width is ffn_hidden_size, set to 4*hidden as in 7b
            "vocab_size": v,
            "hidden_size": d,
            "num_hidden_layers": n,
            "num_attention_heads": N_HEADS,
            "num_kv_heads": 1,
            "new_decoder_architecture": False,
            "multi_query": True,
            "parallel_attn": True,
            "alibi": False,
            "bias": False,
            "ffn_hidden_size": 4 * d,
            "max_position_embeddings": MAX_POSITIONS,
            "rope_parameters": _rope(),
        },
    ),
    "gemma": (
        "GemmaConfig",
        lambda v, n, d, f: _llama_like(v, n, d, f, head_dim=d // N_HEADS, rope_parameters=_rope()),
    ),
    "phi": (
        "PhiConfig",
        lambda v, n, d, f: {
            **_llama_like(v, n, d, f, rope_parameters=_rope(0.5)),
            "num_key_value_heads": N_HEADS,
        },
    ),
    "gpt_neo": (
        "GPTNeoConfig",
        lambda v, n, d, f: {
            "vocab_size": v,
            "max_position_embeddings": MAX_POSITIONS,
            "hidden_size": d,
            "num_layers": n,
            "attention_types": _gpt_neo_layers(n),
            "num_heads": N_HEADS,
            "intermediate_size": f,
            "window_size": MAX_POSITIONS,  # local layers see the whole (<=128 token) context
        },
    ),
    "qwen3": (
        "Qwen3Config",
        lambda v, n, d, f: _llama_like(
            v,
            n,
            d,
            f,
            head_dim=d // N_HEADS,
            use_sliding_window=False,
            max_window_layers=n,
            rope_parameters=_rope(),
        ),
    ),
    "gemma2": (
        "Gemma2Config",
        lambda v, n, d, f: _llama_like(
            v,
            n,
            d,
            f,
            head_dim=d // N_HEADS,
            query_pre_attn_scalar=d // N_HEADS,
            sliding_window=MAX_POSITIONS,
            rope_parameters=_rope(),
        ),
    ),
    "phi3": (
        "Phi3Config",
        lambda v, n, d, f: _llama_like(
            v,
            n,
            d,
            f,
            original_max_position_embeddings=MAX_POSITIONS,
            sliding_window=None,
            rope_parameters=_rope(),
        ),
    ),
    "olmo": ("OlmoConfig", lambda v, n, d, f: _llama_like(v, n, d, f, rope_parameters=_rope())),
    "opt": (
        "OPTConfig",
        lambda v, n, d, f: {
            "vocab_size": v,
            "hidden_size": d,
            "num_hidden_layers": n,
            "ffn_dim": f,
            "max_position_embeddings": MAX_POSITIONS,
            "num_attention_heads": N_HEADS,
            "word_embed_proj_dim": d,
            "do_layer_norm_before": True,
        },
    ),
    "stablelm": (
        "StableLmConfig",
        lambda v, n, d, f: _llama_like(v, n, d, f, rope_parameters=_rope(0.5)),
    ),
    "starcoder2": (
        "Starcoder2Config",
        lambda v, n, d, f: _llama_like(v, n, d, f, sliding_window=None, rope_parameters=_rope()),
    ),
}

TINY_FAMILIES: tuple[str, ...] = tuple(_BUILDERS)


def tiny_config(
    model_type: str, *, vocab_size: int = 128, n_layer: int = 4, hidden: int = 32, ffn: int = 64
) -> transformers.PretrainedConfig:
    """The config `tiny_model` builds from (eager attention, no KV cache, pad/bos/eos = 0/1/2)."""
    if model_type not in _BUILDERS:
        raise ValueError(f"unknown tiny family {model_type!r}; known: {TINY_FAMILIES}")
    if hidden % (2 * N_HEADS):
        raise ValueError(f"hidden={hidden} must be a multiple of {2 * N_HEADS} (head_dim even for rotary)")
    cls_name, build = _BUILDERS[model_type]
    config_cls = getattr(transformers, cls_name)
    config = config_cls(**build(vocab_size, n_layer, hidden, ffn), **_ids(), use_cache=False)
    config._attn_implementation = "eager"
    assert config.model_type == model_type, (config.model_type, model_type)
    return config


def tiny_model(
    model_type: str,
    *,
    seed: int = 0,
    vocab_size: int = 128,
    n_layer: int = 4,
    hidden: int = 32,
    ffn: int = 64,
) -> PreTrainedModel:
    """A randomly initialised float32 causal LM in eval mode, identical for identical arguments.

    `model_type` is one of TINY_FAMILIES (= config.model_type). 4 attention heads (head_dim = hidden/4; hidden
    must be a multiple of 8), 2 KV heads for the GQA-capable families (llama, mistral, qwen2/3, gemma/2, phi3,
    olmo, stablelm, starcoder2), 1 for falcon (multi-query), max positions 128, pad/bos/eos = 0/1/2, eager
    attention, config.use_cache False. `ffn` is the MLP width (n_inner / intermediate_size / ffn_dim) in
    every family except falcon, whose MLP is always 4*hidden (ffn_hidden_size, as in falcon-7b).
    """
    config = tiny_config(model_type, vocab_size=vocab_size, n_layer=n_layer, hidden=hidden, ffn=ffn)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    model.config.use_cache = False
    return model.float().eval()


# ----------------------------------------------------------------------------------------------
# Tokenizers

_FIRST = ["Danielle", "Marie", "Pierre", "John", "Anna", "Louis", "Sophie", "Thomas", "Emma", "Paul"]
_LAST = ["Darrieux", "Curie", "Martin", "Smith", "Dubois", "Bernard", "Moreau", "Laurent", "Brown", "Miller"]
_PLACES = [
    ("France", "Paris", "French"),
    ("England", "London", "English"),
    ("Germany", "Berlin", "German"),
    ("Italy", "Rome", "Italian"),
    ("Spain", "Madrid", "Spanish"),
    ("Japan", "Tokyo", "Japanese"),
    ("Russia", "Moscow", "Russian"),
    ("Portugal", "Lisbon", "Portuguese"),
]
_TEMPLATES = [
    "The capital city of {country} is {city}.",
    "{city} is the capital of {country}.",
    "The mother tongue of {person} is {lang}.",
    "{person} was born in {city}, the capital city of {country}.",
    "{person} speaks {lang} and English.",
    "capital city : {city}",
    "mother tongue : {lang}",
    "{person} lives in the city of {city}.",
    "In {city}, people speak {lang}.",
    "The official language of {country} is {lang}.",
    "{person} is a citizen of {country}.",
    "{person} works in {city} as a teacher.",
]


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """A deterministic corpus of ~400 short English-like sentences (the tokenizers' training data)."""
    rng = random.Random(0)
    people = [f"{a} {b}" for a, b in itertools.product(_FIRST, _LAST)]
    lines = [
        "Danielle Darrieux",
        "capital city : Danielle Darrieux",
        "The mother tongue of Danielle Darrieux",
    ]
    for template, (country, city, lang) in itertools.product(_TEMPLATES, _PLACES):
        for _ in range(4):
            lines.append(template.format(country=country, city=city, lang=lang, person=rng.choice(people)))
    return tuple(lines)


def _wrap(tk: Tokenizer) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    return tok


def _bos_processor() -> processors.TemplateProcessing:
    return processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )


def _trainer(vocab_size: int, alphabet: list[str]) -> trainers.BpeTrainer:
    return trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )


@functools.lru_cache(maxsize=8)
def _bpe_core(vocab_size: int) -> str:
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    # Printable ASCII (byte-level mapped: space -> "Ġ") is always in the alphabet; other bytes become <unk>.
    trainer = _trainer(vocab_size, [chr(c) for c in range(33, 127)] + ["Ġ"])
    tk.train_from_iterator(corpus(), trainer=trainer)
    return tk.to_str()


@functools.lru_cache(maxsize=8)
def bpe_tokenizer(add_bos: bool, vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE (no prefix space) trained on `corpus()`; `len(tok) <= vocab_size`.

    The alphabet is printable ASCII only (other bytes map to <unk>=3, one per byte), so the whole vocabulary
    fits a `tiny_model(..., vocab_size=vocab_size)`. With `add_bos` a post-processor prepends <s>=1, else
    nothing is added (like GPT-2). Cached: callers must not mutate the returned tokenizer.

    With the default vocab_size=256 (4 specials + 95 printable-ASCII bytes + 157 merges):
      tok(" Paris", add_special_tokens=False): ["ĠParis"], offsets [(0, 6)]
      tok("capital city : Danielle Darrieux"): ["capital", "Ġcity", "Ġ:", "ĠD", "an", "ie", "l", "le",
        "ĠDarrieux"], offsets [(0, 7), (7, 12), (12, 14), (14, 16), (16, 18), (18, 20), (20, 21), (21, 23),
        (23, 32)]; with add_bos=True, "<s>" with offsets (0, 0) comes first. Offsets include the leading
        space ("Ġcity" is (7, 12)), as GPT-2's do (trim_offsets=False).
    """
    tk = Tokenizer.from_str(_bpe_core(vocab_size))
    tk.post_processor = _bos_processor() if add_bos else processors.ByteLevel(trim_offsets=False)
    tok = _wrap(tk)
    assert len(tok) <= vocab_size
    return tok


@functools.lru_cache(maxsize=8)
def sentencepiece_tokenizer(vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """A LLaMA-2-like SentencePiece-style BPE (Metaspace "▁", BOS prepended) trained on `corpus()`.

    Like LLaMA-2's sentencepiece (add_dummy_prefix), a "▁" is always prepended, even to text that starts with
    a space, so `tok(" Paris", add_special_tokens=False)` gives ["▁", "▁Paris"] with offsets [(0, 1), (0, 6)]
    (the lone "▁" is the dummy prefix, aligned to the space; the pieces' offsets overlap), and "Paris" gives
    ["▁Paris"] with offsets [(0, 5)]. A Metaspace pre-tokenizer alone cannot do this in tokenizers 0.23:
    with prepend_scheme="always" (or "first") it prepends only when the text does not already start with
    "▁", so " Paris" -> ["▁Paris"] whatever `split` is (split=False additionally lets BPE training merge
    across words). Hence: normalizer Prepend("▁") + Replace(" ", "▁") (transformers 4's legacy LLaMA
    converter), pre-tokenizer Metaspace(prepend_scheme="never", split=True) only to cut before each "▁",
    decoder Metaspace(prepend_scheme="always") which drops the one leading space ("▁", "▁Paris" decode to
    " Paris"). Note transformers 5's LlamaTokenizer, where it builds the pipeline itself, sets normalizer=None
    and Metaspace(prepend_scheme="first", split=False), which does not give the lone "▁" (not checked against
    a hub checkpoint's tokenizer.json: none can be downloaded here).
      tok("capital city : Danielle Darrieux"): ["<s>", "▁capital", "▁city", "▁:", "▁D", "an", "ie", "l",
        "le", "▁Darrieux"], offsets [(0, 0), (0, 7), (7, 12), (12, 14), (14, 16), (16, 18), (18, 20),
        (20, 21), (21, 23), (23, 32)].
    Printable ASCII is always in the alphabet; other characters become <unk>=3. Cached: do not mutate.
    """
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    # sentencepiece's add_dummy_prefix: always prepend "▁", even when the text already starts with a space.
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Only splits (every piece starts at a "▁"), so no merge crosses a word boundary; never prepends again.
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = _trainer(vocab_size, [chr(c) for c in range(33, 127)] + ["▁"])
    tk.train_from_iterator(corpus(), trainer=trainer)
    tk.post_processor = _bos_processor()
    tok = _wrap(tk)
    assert len(tok) <= vocab_size
    return tok


# ----------------------------------------------------------------------------------------------
# Self-check: python tests/tiny.py


def _find_facts(model: PreTrainedModel) -> dict[str, Any]:
    from transformers.pytorch_utils import Conv1D

    cfg = model.config
    n_layer = cfg.num_hidden_layers
    names = dict(model.named_modules())
    blocks_path = next(
        n for n, m in names.items() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layer
    )
    blocks = names[blocks_path]
    assert isinstance(blocks, torch.nn.ModuleList)
    block = blocks[0]
    hidden = cfg.hidden_size
    downs, ups = [], []
    for n, m in block.named_modules():
        if isinstance(m, Conv1D):
            d_in, d_out = m.weight.shape
        elif isinstance(m, torch.nn.Linear):
            d_out, d_in = m.weight.shape
        else:
            continue
        if d_out == hidden and d_in != hidden:
            downs.append((n, m))
        elif d_in == hidden and d_out != hidden and "att" not in n:
            ups.append(f"{n}{tuple(m.weight.shape)}")
    assert len(downs) == 1, [n for n, _ in downs]
    down_name, down = downs[0]
    unembed = model.get_output_embeddings()
    unembed_path = next(n for n, m in names.items() if m is unembed)
    embed = model.get_input_embeddings()
    embed_path = next(n for n, m in names.items() if m is embed)
    norms = [
        n
        for n, m in names.items()
        if "norm" in type(m).__name__.lower() and not n.startswith(blocks_path + ".") and n
    ]
    assert len(norms) == 1, norms
    out: list[Any] = []
    handle = block.register_forward_hook(lambda _m, _i, o: out.append(o))
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 11, 12]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    handle.remove()
    assert logits.shape == (2, 5, cfg.vocab_size) and torch.isfinite(logits).all()
    ret = out[0]
    ret_s = "Tensor" if isinstance(ret, torch.Tensor) else f"{type(ret).__name__}[{len(ret)}]"
    return {
        "blocks": blocks_path,
        "block_cls": type(block).__name__,
        "down": down_name,
        "down_cls": type(down).__name__
        + ("(nn.Linear)" if type(down) is not torch.nn.Linear and not isinstance(down, Conv1D) else ""),
        "down_w": tuple(down.weight.shape),
        "up": ", ".join(ups),
        "norm": f"{norms[0]} ({type(names[norms[0]]).__name__})",
        "embed": f"{embed_path} ({type(embed).__name__})",
        "unembed": unembed_path,
        "tied": unembed.weight is embed.weight,
        "returns": ret_s,
    }


def _main() -> None:
    import time

    rows = []
    for family in TINY_FAMILIES:
        t0 = time.perf_counter()
        model = tiny_model(family)
        again = tiny_model(family)
        other = tiny_model(family, seed=1)
        for (n, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
            assert p.dtype == torch.float32 or not p.is_floating_point(), (family, n, p.dtype)
            assert torch.equal(p, q), (family, n)
        assert any(not torch.equal(p, r) for p, r in zip(model.parameters(), other.parameters(), strict=True))
        assert not model.training and model.config.use_cache is False
        facts = _find_facts(model)
        ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 11, 12]])
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
        rows.append((family, facts, time.perf_counter() - t0))
    keys = ["blocks", "down", "down_cls", "down_w", "up", "norm", "unembed", "tied", "embed", "returns"]
    print("| family | " + " | ".join(keys) + " |")
    for family, facts, dt in rows:
        print(f"| {family} | " + " | ".join(str(facts[k]) for k in keys) + f" |  ({dt:.2f}s)")

    for name, make in [
        ("bpe(add_bos=False)", lambda: bpe_tokenizer(False)),
        ("bpe(add_bos=True)", lambda: bpe_tokenizer(True)),
        ("sentencepiece()", sentencepiece_tokenizer),
    ]:
        t0 = time.perf_counter()
        tok = make()
        dt = time.perf_counter() - t0
        print(f"\n{name}: len={len(tok)} built in {dt:.2f}s")
        assert dt < 2.0
        for text, special in [
            (" Paris", False),
            ("Paris", False),
            ("capital city : Danielle Darrieux", False),
            ("capital city : Danielle Darrieux", True),
            ("The mother tongue of Danielle Darrieux is", True),
        ]:
            enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
            pieces = tok.convert_ids_to_tokens(enc["input_ids"])
            print(f"  {text!r} special={special}:")
            print(f"    ids={enc['input_ids']}")
            print(f"    pieces={pieces}")
            print(f"    offsets={enc['offset_mapping']}")
            print(f"    decode={tok.decode(enc['input_ids'], skip_special_tokens=True)!r}")
    assert bpe_tokenizer(True)("x")["input_ids"][0] == BOS_ID
    assert bpe_tokenizer(False)("x")["input_ids"][0] != BOS_ID
    assert sentencepiece_tokenizer()("x")["input_ids"][0] == BOS_ID
    print("\nall good")


class BigramModel(nn.Module):
    """A causal LM whose next-token logits depend only on the current token: ``table[input_ids]``."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone(), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        class Out:
            logits = self.table[input_ids]

        return Out()


if __name__ == "__main__":
    _main()
