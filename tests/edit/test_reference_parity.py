"""Parity with the official code (opt-in): eamet and the reference implementations, run side by side.

Skipped unless the environment names a checkout of a reference:

* ``EAMET_REFERENCE_EAMET=<checkout of ybdai7/EAMET-massive-editing @ 1fe317f>`` (EAMET, and its MEMIT);
* ``EAMET_REFERENCE_MEMIT=<checkout of kmeng01/memit @ 80426fd>`` (the original MEMIT).

Both are MIT licensed and never vendored: each test copies the packages it needs (``util``, ``rome``,
``memit``, and the EAMET repository's ``eamet`` as ``reference_eamet``, so it cannot shadow ours) into a
temporary folder and patches the copy's text. Every patch asserts that its target text is there, so another
version of a reference fails with a message naming the file instead of comparing something else. The patches
adapt the reference to this environment and leave its algorithm alone (``Patch.why`` says why for each); the
one exception sets the reference's hard-coded top-M (50) to the M under test.

The reference edits a copy of the same tiny seeded model (tests/tiny.py: GPT-2 with its Conv1D layout, and
LLaMA) through its own entry point (``apply_eamet_to_model`` / ``apply_memit_to_model``), handed eamet's
context templates (its template cache) and eamet's C (its ``get_cov``), so that only the algorithm is
compared. Recorded from the reference: the keys of every ``compute_ks`` call, z (and δ) of every
``compute_z`` call, the Adam steps of every fact (a counting ``torch.optim.Adam``), the update factors of
every layer and the edited weights; from eamet: ``result.updates[j].keys``, h at l* recomputed with
``eamet.edit.keys.collect`` on the unedited model, ``result.deltas``, ``result.stats[i].steps`` and
``result.updates[j].weight_change()``.

The residual optimisation amplifies float32 noise wherever Adam's steps are large next to the ball the
residual is projected onto, or the loss cannot fall. With the reference's values on these tiny models
(‖h‖ ≈ 0.1-0.2 at l*, so a first Adam step of v_lr·√d ≈ 2.8 overshoots balls of radius 0.1-0.8), eamet
against itself with every weight perturbed by 1e-7 (relative) differs in δ by up to 1e-3 (MEMIT) and 2
(EAMET on LLaMA). So the cases use settings under which that perturbation moves δ by at most ~1e-5
(``CASES`` says which); parity is measured there. docs/parity.md has the command and the differences
observed.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import inspect
import os
import re
import shutil
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from tokenizers import Tokenizer
from torch import nn

from eamet import EditConfig, Fact
from eamet.base.reference import TEMPLATE_SEEDS
from eamet.edit.editor import Editor
from eamet.edit.keys import PromptSet, collect
from eamet.model.parts import ModelParts
from eamet.model.tokens import TokenAdapter
from editing_helpers import CORPUS, PROMPT, SUBJECTS, TARGETS, small_model
from tiny import bpe_tokenizer, sentencepiece_tokenizer

CHECKOUTS = {
    "EAMET_REFERENCE_EAMET": "ybdai7/EAMET-massive-editing @ 1fe317f",
    "EAMET_REFERENCE_MEMIT": "kmeng01/memit @ 80426fd",
}
# Top-level module names the references use; none may leak into (or come from) the rest of the session.
REFERENCE_MODULES = ("util", "rome", "memit", "dsets", "reference_eamet")
# Imported at module level by the references, never used on the paths called here: stubbed, installed or not.
STUBBED_MODULES = (
    "random_word",  # compute_z: RandomWords, for an unused noisy-trigger helper
    "matplotlib",
    "matplotlib.pyplot",  # compute_ks: plotting leftovers
    "matplotlib.style",  # rome/compute_v: `from matplotlib.style import context`
    "sklearn",
    "sklearn.manifold",  # compute_ks: TSNE
    "datasets",  # rome/layer_stats: the Wikipedia loader (C is handed over instead)
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N_STEPS = 25
# Logits of a random init are bounded by ~0.6, so no residual brings the NLL below ~4.9 and nothing could
# stop early. The final norm's weight scaled up lets the tiny model put nearly all probability on one token.
FINAL_NORM_SCALE = 100.0

# Largest allowed max |ours − theirs| / max |theirs| (the batch shapes differ, so float32 rounding does).
TOLERANCE = {"keys": 1e-5, "z": 1e-4, "delta": 1e-4, "ΔW": 1e-4, "W": 1e-4}


# ----------------------------------------------------------------------------------------------------------
# Facts, models, tokenizers


def facts() -> list[Fact]:
    """8 facts: 5 of the helpers' single-token ones (subjects with distinct last tokens), two two-word
    targets, and one with a character outside the tiny vocabularies. On the LLaMA tokenizer that fact's
    decoded target prefix (``" Z<unk>ric"``) re-tokenises differently from its ids (the text after the
    special ``<unk>`` gets a word-boundary piece of its own), so ``teacher_forcing`` matters there.
    """
    chosen = [Fact(PROMPT, SUBJECTS[i], TARGETS[(i + 5) % 16], case_id=i) for i in range(5)]
    chosen.append(Fact(PROMPT, SUBJECTS[5], "Lisbon Moscow", case_id=5))
    chosen.append(Fact(PROMPT, SUBJECTS[6], "English people", case_id=6))
    chosen.append(Fact(PROMPT, SUBJECTS[7], "Zürich", case_id=7))
    return chosen


def retokenises_differently(tokens: TokenAdapter, fact: Fact) -> bool:
    """Whether ``prompt text ⊕ decoded target prefix``, re-tokenised (the reference's teacher-forcing
    input), gives other ids than ``prompt ids ⊕ target ids`` (eamet's default)."""
    y = tokens.target_ids(fact.target)
    as_text = tokens.encode(fact.text + tokens.continuation_text(fact.target, y[:-1]))
    return as_text != tokens.encode(fact.text) + y[:-1]


def confident_model(family: str) -> nn.Module:
    """The helpers' tiny model (vocabulary 256) with its final norm's weight scaled by FINAL_NORM_SCALE."""
    model = small_model(family)
    with torch.no_grad():
        ModelParts(model).final_norm.weight.mul_(FINAL_NORM_SCALE)
    return model.to(DEVICE)


def eamet_tokenizer(family: str) -> Any:
    return sentencepiece_tokenizer() if family == "llama" else bpe_tokenizer(False)


def reference_tokenizer(family: str) -> Any:
    """A fresh tokenizer for the reference, set up as its launcher (experiments/evaluate.py) does:
    ``add_bos_token=False``, right padding. A separate object, because the reference sets
    ``tok.add_bos_token`` and ``tok.padding_side`` on it; the same definition as eamet's, in the class a
    checkpoint of the family loads: the reference recognises LLaMA by ``"llama" in str(type(tok))`` (to drop
    a target's lone "▁" and to count subject tokens), and GPT-2's class returns no ``token_type_ids``
    (which GPT-2 would embed).
    """
    source = eamet_tokenizer(family)
    cls = transformers.LlamaTokenizer if family == "llama" else transformers.GPT2Tokenizer
    tok = cls(
        tokenizer_object=Tokenizer.from_str(source.backend_tokenizer.to_str()),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=False,
    )
    tok.padding_side = "right"
    text = "capital city : Danielle Darrieux"
    assert tok(text)["input_ids"] == source(text, add_special_tokens=False)["input_ids"]
    return tok


# ----------------------------------------------------------------------------------------------------------
# Copying, patching and importing a reference


@dataclass(frozen=True)
class Patch:
    """Replace ``old`` (a regular expression if ``regex``) by ``new`` in ``path`` (relative to the copy);
    exactly ``count`` occurrences must be there (None: at least one)."""

    path: str
    old: str
    new: str
    why: str
    count: int | None = 1
    regex: bool = False


def _device_patch(path: str) -> Patch:
    why = 'it hard-codes "cuda" (and "cuda:0"/"cuda:1" when it sees several GPUs)'
    return Patch(path, r'"cuda(:[0-9])?"', repr(str(DEVICE)), why, count=None, regex=True)


def _block_output_patches(path: str) -> list[Patch]:
    why = "transformers 5 blocks return the hidden-state Tensor, not a tuple holding it at [0]"
    loss_block = "tr[hparams.layer_module_tmp.format(loss_layer)].output"
    return [
        Patch(path, "cur_out[0][0, lookup_idxs[0]]", "cur_out[0, lookup_idxs[0]]", why),
        Patch(path, "cur_out[0][i, idx, :] += delta", "cur_out[i, idx, :] += delta", why),
        Patch(path, f"{loss_block}[0][", f"{loss_block}[", why),
    ]


def _log_norm_patches(path: str) -> list[Patch]:
    why = "log-only products of the update after its Conv1D transpose: (d_ff × d) @ (d_ff × d_ff) crashes"
    return [
        Patch(path, "failure_norm = upd_matrix @", "failure_norm = (resid @ adj_k.T) @", why),
        Patch(path, "locality_norm = upd_matrix @", "locality_norm = (resid @ adj_k.T) @", why),
    ]


def _layout(reference: str, top_m: int) -> tuple[dict[str, str], str, list[Patch]]:
    """({package: its name in the copy}, main module, patches) of ``reference``."""
    if reference == "eamet-repo/eamet":
        patches = [
            _device_patch("reference_eamet/eamet_main.py"),
            _device_patch("reference_eamet/compute_z.py"),
            *_block_output_patches("reference_eamet/compute_z.py"),
            *_log_norm_patches("reference_eamet/eamet_main.py"),
        ]
        if top_m != 50:
            why = "M = 50 is hard-coded; set to the top_m under test"
            patches.append(
                Patch("reference_eamet/compute_z.py", "topk_cs(sim_k, 50)", f"topk_cs(sim_k, {top_m})", why)
            )
        packages = {"eamet": "reference_eamet", "rome": "rome", "util": "util"}
        return packages, "reference_eamet.eamet_main", patches
    patches = [
        _device_patch("memit/memit_main.py"),
        _device_patch("memit/compute_z.py"),
        *_block_output_patches("memit/compute_z.py"),
    ]
    if reference == "eamet-repo/memit":
        patches += _log_norm_patches("memit/memit_main.py")
    return {"memit": "memit", "rome": "rome", "util": "util"}, "memit.memit_main", patches


def _copy_and_patch(checkout: Path, dest: Path, packages: dict[str, str], patches: list[Patch]) -> None:
    for source, name in packages.items():
        if not (checkout / source / "__init__.py").is_file():
            pytest.fail(f"{checkout} has no package {source}/: not a checkout of the reference")
        shutil.copytree(checkout / source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(checkout / "globals.yml", dest / "globals.yml")
    for patch in patches:
        file = dest / patch.path
        text = file.read_text(encoding="utf-8")
        if patch.regex:
            patched, found = re.subn(patch.old, lambda _m, new=patch.new: new, text)
        else:
            patched, found = text.replace(patch.old, patch.new), text.count(patch.old)
        if found == 0 or (patch.count is not None and found != patch.count):
            wanted = "some" if patch.count is None else str(patch.count)
            pytest.fail(
                f"{checkout}: {patch.path} should hold {wanted} occurrence(s) of {patch.old!r} "
                f"({patch.why}), found {found}. The patches are written for "
                f"{' and '.join(CHECKOUTS.values())}; another version needs them revised."
            )
        file.write_text(patched, encoding="utf-8")


def _stub(name: str) -> types.ModuleType:
    def unused(attr: str) -> Callable[..., Any]:
        if attr.startswith("__"):
            raise AttributeError(attr)  # module protocol lookups (__path__, __file__ ...) see a plain module

        def fail(*_args: Any, **_kwargs: Any) -> Any:
            raise AssertionError(f"the reference called {name}.{attr}, stubbed by this test as unused")

        return fail

    module = types.ModuleType(name)
    module.__dict__["__getattr__"] = unused
    return module


@pytest.fixture
def isolated_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Takes the references' module names out of ``sys.modules`` before and after, stubs their unused
    imports, and restores ``sys.path``: nothing of one reference reaches the other or the session."""

    def take_out() -> dict[str, types.ModuleType]:
        found = {n: m for n, m in sys.modules.items() if n.split(".")[0] in REFERENCE_MODULES}
        for name in found:
            del sys.modules[name]
        return found

    before = take_out()
    for name in STUBBED_MODULES:
        monkeypatch.setitem(sys.modules, name, _stub(name))
    path = list(sys.path)
    try:
        yield
    finally:
        take_out()
        sys.modules.update(before)
        sys.path[:] = path


def import_reference(
    checkout: str, dest: Path, reference: str, top_m: int, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """Copies, patches and imports the reference's main module (``eamet_main`` / ``memit_main``)."""
    if importlib.util.find_spec("yaml") is None:
        pytest.fail("the references read their globals.yml with PyYAML: pip install pyyaml")
    packages, main, patches = _layout(reference, top_m)
    _copy_and_patch(Path(checkout), dest, packages, patches)
    sys.path.insert(0, str(dest))
    monkeypatch.chdir(dest)  # util/globals.py opens "globals.yml" in the working directory
    return importlib.import_module(main)


# ----------------------------------------------------------------------------------------------------------
# Running the reference and recording what it computes


@dataclass
class Recorded:
    """What the reference computed, in call order, as float64 on the CPU."""

    keys: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (layer, (N, d_ff)) per compute_ks
    z: list[torch.Tensor] = field(default_factory=list)  # (d,) per fact
    delta: list[torch.Tensor] = field(default_factory=list)  # (d,) per fact, where compute_z returns it
    steps: list[int] = field(default_factory=list)  # Adam steps per fact
    # Per weight name, the update's factors (adj_k (d_ff, N), resid (d, N)): ΔW = resid @ adj_kᵀ.
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def record(main: Any, monkeypatch: pytest.MonkeyPatch) -> Recorded:
    """Wraps the reference's compute_ks, compute_z, execute_* and torch.optim.Adam to record their work."""
    rec = Recorded()
    execute_name = "execute_eamet" if hasattr(main, "execute_eamet") else "execute_memit"
    compute_ks, compute_z, execute = main.compute_ks, main.compute_z, getattr(main, execute_name)

    def ks(*args: Any, **kwargs: Any) -> Any:
        out = compute_ks(*args, **kwargs)
        layer = inspect.signature(compute_ks).bind(*args, **kwargs).arguments["layer"]
        rec.keys.append((int(layer), out.detach().double().cpu()))
        return out

    def z(*args: Any, **kwargs: Any) -> Any:
        out = compute_z(*args, **kwargs)
        target, delta = out if isinstance(out, tuple) else (out, None)  # EAMET returns (z, δ), MEMIT z
        rec.z.append(target.detach().double().cpu())
        if delta is not None:
            rec.delta.append(delta.detach().double().cpu())
        return out

    def run(*args: Any, **kwargs: Any) -> Any:
        out = execute(*args, **kwargs)
        rec.factors = {name: (a.double().cpu(), r.double().cpu()) for name, (a, r) in out.items()}
        return out

    class CountingAdam(torch.optim.Adam):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            rec.steps.append(0)  # one optimiser per fact

        def step(self, closure: Any = None) -> Any:
            rec.steps[-1] += 1
            return super().step(closure)

    monkeypatch.setattr(main, "compute_ks", ks)
    monkeypatch.setattr(main, "compute_z", z)
    monkeypatch.setattr(main, execute_name, run)
    monkeypatch.setattr(torch.optim, "Adam", CountingAdam)
    return rec


def reference_hparams(main: Any, cfg: EditConfig, model: nn.Module, parts: ModelParts) -> Any:
    """The reference's hparams object holding eamet's values. Every field is named, so a reference
    version with other fields fails here."""
    spec = parts.spec
    unembed = model.get_output_embeddings()
    assert unembed is not None
    # The name under which named_parameters() lists the unembedding: GPT-2 ties it to transformer.wte (as
    # the reference's gpt2-xl hparams say), LLaMA's is lm_head.
    unembed_name = next(n for n, p in model.named_parameters() if p is unembed.weight)
    values: dict[str, Any] = {
        "layers": list(cfg.layers),
        "layer_selection": "all",
        "fact_token": cfg.fact_token,
        "v_num_grad_steps": cfg.v_num_grad_steps,
        "v_lr": cfg.v_lr,
        "v_loss_layer": parts.num_layers - 1,  # eamet's default: the model's own logits
        "kl_factor": cfg.kl_factor,
        "mom2_adjustment": False,
        "mom2_dataset": "wikipedia",  # unused: C is handed over
        "mom2_n_samples": cfg.mom2_n_samples,
        "mom2_dtype": cfg.mom2_dtype,
        "rewrite_module_tmp": f"{spec.blocks}.{{}}.{spec.rewrite}",
        "layer_module_tmp": f"{spec.blocks}.{{}}",
        "mlp_module_tmp": f"{spec.blocks}.{{}}.mlp",  # unused
        "attn_module_tmp": f"{spec.blocks}.{{}}.attn",  # unused
        "ln_f_module": spec.final_norm,
        "lm_head_module": unembed_name.removesuffix(".weight"),
    }
    if cfg.method == "eamet":
        values.update(
            ks_bs=len(facts()),
            v_weight_decay=0.0,  # read only by weight_decay_method "norm"
            clamp_norm_factor=0.0,  # read only by weight_decay_method "norm"
            clamp_ks_factor=cfg.clamp_factor,
            cs_factor=cfg.cs_factor,
            mse_factor=cfg.mse_factor,
            tau=cfg.tau,
            norm_factor=cfg.norm_penalty_factor,
            delta_init=cfg.delta_init,
            weight_decay_method="fix_ks",
            mom2_update_weight=list(cfg.mom2_update_weight),
        )
        return main.EAMETHyperParams(**values)
    values.update(v_weight_decay=cfg.norm_penalty_factor, clamp_norm_factor=cfg.clamp_factor)
    if "ks_bs" in {f.name for f in dataclasses.fields(main.MEMITHyperParams)}:
        # The EAMET repository's MEMIT: keys in chunks of ks_bs facts, one λ per layer.
        values.update(ks_bs=len(facts()), mom2_update_weight=list(cfg.mom2_update_weight))
    else:  # kmeng01/memit: one λ for all layers
        assert len(set(cfg.mom2_update_weight)) == 1
        values.update(mom2_update_weight=cfg.mom2_update_weight[0])
    return main.MEMITHyperParams(**values)


# ----------------------------------------------------------------------------------------------------------
# The cases


@dataclass(frozen=True)
class Case:
    """One comparison. ``expect`` names what the run must show, so that it covers what it claims:
    ``ball_binds`` (some δ ends on the ball), ``ball_inactive`` (every δ well inside), ``early_stop``
    (some fact stops before the last iteration), ``stop_between_thresholds`` (a fact stopped at a loss in
    [0.01, 0.05): kmeng01's threshold mattered), ``top_m_subset`` (M < N − 1)."""

    id: str
    reference: str  # "eamet-repo/eamet", "eamet-repo/memit" or "kmeng01/memit"
    family: str
    settings: dict[str, Any]
    expect: frozenset[str]

    @property
    def variable(self) -> str:
        return "EAMET_REFERENCE_MEMIT" if self.reference == "kmeng01/memit" else "EAMET_REFERENCE_EAMET"


def eamet_config(case: Case, model: nn.Module) -> EditConfig:
    """eamet's settings for ``case``: the switches that reproduce the reference (docs/differences.md)."""
    method = "eamet" if case.reference.endswith("/eamet") else "memit"
    values: dict[str, Any] = {
        "v_num_grad_steps": N_STEPS,
        # Row 7: the reference teacher-forces with the re-tokenised prompt text ⊕ decoded target prefix.
        "teacher_forcing": "string",
        # Row 4: its launcher loads tokenizers with add_bos_token=False (all but Gemma's).
        "bos": "never",
        # Rows 1-2 (template sampling) do not matter: the templates are handed over. 5 seed words (as
        # kmeng01/memit) rather than 12 keep the test fast; C over 200 lines is handed over as well.
        "template_seeds": TEMPLATE_SEEDS[:5],
        "mom2_n_samples": 200,
    }
    if case.reference.startswith("eamet-repo"):
        values["solver"] = "inverse"  # row 3: the explicit float64 inverse of λC + KKᵀ
    if case.reference == "kmeng01/memit":
        values["early_stop_loss"] = 0.05  # row 25: kmeng01 stops at 5e-2 (the EAMET repository at 1e-2)
    return EditConfig.for_model(model, method, **{**values, **case.settings})


# Settings chosen where the optimisation is well-conditioned (module docstring): a small Adam step next to
# the ball that binds (v_lr; the EAMET JSON files themselves say 0.04), no essence KL where facts must stop
# early (the subject-final prompt's essence distribution moves with the target), and MEMIT's norm penalty
# scaled to the tiny hidden norms (0.5·‖δ‖/‖h‖² has a gradient of ~25 at ‖h‖ ≈ 0.14).
_STOP_EARLY = {"v_lr": 0.04, "clamp_factor": 1000.0, "kl_factor": 0.0}
_MEMIT = {"norm_penalty_factor": 1e-3}
CASES = [
    Case("eamet-gpt2-ball-binds", "eamet-repo/eamet", "gpt2", {"v_lr": 0.01}, frozenset({"ball_binds"})),
    Case(
        "eamet-gpt2-early-stop-top3",
        "eamet-repo/eamet",
        "gpt2",
        {**_STOP_EARLY, "top_m": 3},
        frozenset({"ball_inactive", "early_stop", "top_m_subset"}),
    ),
    Case(
        "eamet-llama-ball-binds-top3",
        "eamet-repo/eamet",
        "llama",
        {"v_lr": 0.003, "top_m": 3},
        frozenset({"ball_binds", "top_m_subset"}),
    ),
    Case(
        "eamet-llama-early-stop",
        "eamet-repo/eamet",
        "llama",
        _STOP_EARLY,
        frozenset({"ball_inactive", "early_stop"}),
    ),
    Case(
        "memit-gpt2-kmeng01-early-stop",
        "kmeng01/memit",
        "gpt2",
        {**_MEMIT, **_STOP_EARLY, "clamp_factor": 100.0},
        frozenset({"ball_inactive", "early_stop", "stop_between_thresholds"}),
    ),
    Case(
        "memit-gpt2-kmeng01-ball-binds",
        "kmeng01/memit",
        "gpt2",
        {**_MEMIT, "v_lr": 0.01},
        frozenset({"ball_binds"}),
    ),
    Case(
        "memit-gpt2-eamet-repo",
        "eamet-repo/memit",
        "gpt2",
        {**_MEMIT, "v_lr": 0.01},
        frozenset({"ball_binds"}),
    ),
    Case(
        "memit-llama-eamet-repo",
        "eamet-repo/memit",
        "llama",
        {**_MEMIT, "v_lr": 0.01},
        frozenset({"ball_binds"}),
    ),
]


def _params() -> list[Any]:
    out = []
    for case in CASES:
        reason = f"opt-in: set {case.variable}=<checkout of {CHECKOUTS[case.variable]}> to compare with it"
        skip = pytest.mark.skipif(not os.environ.get(case.variable), reason=reason)
        out.append(pytest.param(case, id=case.id, marks=skip))
    return out


# ----------------------------------------------------------------------------------------------------------
# The test


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours − theirs| / max |theirs|."""
    theirs = theirs.double().cpu()
    return float((ours.double().cpu() - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("case", _params())
def test_parity_with_reference(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_imports: None
) -> None:
    model = confident_model(case.family)
    reference_model = copy.deepcopy(model)
    cfg = eamet_config(case, model)
    fact_list = facts()
    editor = Editor(model, eamet_tokenizer(case.family), config=cfg, corpus=CORPUS, cache_dir=tmp_path / "c")
    if case.family == "llama":  # the fixture keeps a fact on which teacher_forcing matters
        assert retokenises_differently(editor.tokens, fact_list[-1])
    parts, l_star = editor.parts, cfg.layers[-1]
    moments = editor.covariance(progress=False)

    # eamet; then h at l* and the unedited keys there, recomputed on the model restored by undo().
    result = editor.edit(fact_list, progress=False)
    edited = {u.layer: parts.rewrite_weight(u.layer).detach().double().cpu() for u in result.updates}
    result.undo()
    prompts = PromptSet.build(editor.tokens, fact_list, result.templates, cfg.fact_token)
    keys_star, hidden = collect(model, parts, editor.tokens, prompts, key_layer=l_star, hidden_layer=l_star)
    assert keys_star is not None and hidden is not None

    # The reference on a copy of the unedited model, with eamet's templates and C.
    main = import_reference(
        os.environ[case.variable], tmp_path / "reference", case.reference, cfg.top_m, monkeypatch
    )
    assert result.templates[0] == "{}"
    monkeypatch.setattr(main, "CONTEXT_TEMPLATES_CACHE", [["{}"], result.templates[1:]])
    by_path = {parts.spec.rewrite_path(layer): c for layer, c in moments.items()}
    monkeypatch.setattr(main, "get_cov", lambda _model, _tok, layer_name, *_a, **_k: by_path[layer_name])
    rec = record(main, monkeypatch)
    requests = [
        {"prompt": f.prompt, "subject": f.subject, "target_new": {"str": f.target}, "case_id": f.case_id}
        for f in fact_list
    ]
    apply = main.apply_eamet_to_model if cfg.method == "eamet" else main.apply_memit_to_model
    hparams = reference_hparams(main, cfg, reference_model, parts)
    apply(reference_model, reference_tokenizer(case.family), requests, hparams)

    diffs: dict[str, float] = {}
    layer_keys = rec.keys
    if cfg.method == "eamet":  # EAMET first takes the unedited keys at l* (key norms, neighbourhoods)
        assert rec.keys[0][0] == l_star
        diffs["keys l* unedited"] = relative(keys_star, rec.keys[0][1])
        layer_keys = rec.keys[1:]
    assert [layer for layer, _ in layer_keys] == list(cfg.layers)
    for update, (_, theirs) in zip(result.updates, layer_keys, strict=True):
        assert update.keys is not None
        diffs[f"keys {update.layer}"] = relative(update.keys, theirs)
    assert len(rec.z) == len(fact_list)
    z = hidden.double().cpu() + result.deltas.double()
    diffs["z"] = max(relative(z[i], theirs) for i, theirs in enumerate(rec.z))
    if rec.delta:
        diffs["delta"] = max(relative(result.deltas[i], theirs) for i, theirs in enumerate(rec.delta))
    reference_weights = dict(reference_model.named_parameters())
    for update in result.updates:
        adj_k, resid = rec.factors[f"{update.path}.weight"]
        diffs[f"ΔW {update.layer}"] = relative(update.weight_change(), resid @ adj_k.T)
        # The weights each side ended with (the reference's through its own shape matching for Conv1D).
        before = parts.rewrite_weight(update.layer).detach().double().cpu()
        theirs = reference_weights[f"{update.path}.weight"].detach().double().cpu()
        diffs[f"W {update.layer} (rel. to ΔW)"] = relative(edited[update.layer] - before, theirs - before)

    steps = [s.steps for s in result.stats]
    print(f"\n{case.id}: Adam steps {steps}; " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert steps == rec.steps, f"Adam steps per fact: eamet {steps}, reference {rec.steps}"
    for name, value in diffs.items():
        tolerance = TOLERANCE[name.split()[0]]
        assert value <= tolerance, f"{case.id}: {name} differs by {value:.2e} (relative) > {tolerance:.0e}"

    # The case covers what it claims.
    on_ball = [abs(s.delta_norm - s.radius) <= 1e-5 * s.radius for s in result.stats]
    if "ball_binds" in case.expect:
        assert any(on_ball), [(s.delta_norm, s.radius) for s in result.stats]
    if "ball_inactive" in case.expect:
        assert all(s.delta_norm < 0.5 * s.radius for s in result.stats)
    if "early_stop" in case.expect:
        assert any(s < N_STEPS - 1 for s in steps), steps
    if "stop_between_thresholds" in case.expect:
        stopped = [s.loss for s in result.stats if s.steps < N_STEPS - 1]
        assert any(0.01 <= loss < 0.05 for loss in stopped), stopped
    if "top_m_subset" in case.expect:
        assert cfg.top_m < len(fact_list) - 1
