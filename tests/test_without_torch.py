"""eamet works in an environment without torch (torch is an optional dependency)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, as if it were not installed

    import numpy as np
    import eamet

    rng = np.random.default_rng(0)
    keys, residuals = rng.normal(size=(60, 8)), rng.normal(size=(60, 5))
    rep = eamet.misalignment(keys, residuals, top_m=5, progress=False)
    assert rep.scores.shape == (60,) and rep.total > 0
    aligned = eamet.misalignment(keys, keys * 2.0, top_m=5, progress=False)
    assert aligned.total < 1e-6 and (aligned.overlap == 1).all()
    idx, sims = eamet.neighbors(keys, 5)
    assert idx.shape == (60, 5) and (idx != np.arange(60)[:, None]).all()
    acc = eamet.SecondMoment(8)
    acc.update(keys.astype(np.float32))
    acc.update(keys)
    assert acc.count == 120 and acc.input_dtype == "mixed"
    assert np.allclose(acc.moment(), keys.T @ keys / 60, rtol=1e-5, atol=1e-6)
    try:
        eamet.misalignment(keys.astype(int), residuals)
    except eamet.base.errors.DTypeError:
        pass
    else:
        raise AssertionError("integer keys were accepted")
    world = eamet.sandbox.World.generate(seed=0, n_subjects=10)
    assert len(world.cases) == 40
    import json
    with open("facts.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "{} speaks", "subject": "Ada", "target": "Welsh"}))
    (case,) = eamet.load_dataset("jsonl", "facts.jsonl")
    assert case.rewrite.target == "Welsh"
    smollm = eamet.models.known_models()["smollm2-135m"]
    assert eamet.models.resolve("smollm2") is smollm
    try:
        eamet.models.load("smollm2")
    except eamet.base.errors.MissingDependencyError as exc:
        assert smollm.install in str(exc), exc
    else:
        raise AssertionError("eamet.models.load worked without torch")
    assert "torch" not in sys.modules or sys.modules["torch"] is None, "eamet imported torch"
    assert "transformers" not in sys.modules, "eamet imported transformers"
    print("ok without torch")
    """
)


def test_eamet_runs_without_torch(tmp_path: Path) -> None:
    """In a fresh interpreter where `import torch` fails, misalignment, neighbors and SecondMoment all
    work, eamet.models lists its models and says what to install, and nothing imports torch."""
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok without torch"
