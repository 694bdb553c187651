#!/usr/bin/env bash
# Every check of the project, as CI runs it: Rust format/lint/tests, a release wheel installed into a
# fresh virtual environment, stub and type checks, the import rule, ruff, and pytest against the installed
# wheel.
#
#   bash scripts/test.sh            (from a checkout; needs cargo and python3 >= 3.10)
#
# Environment: PYTHON (interpreter for the venv, default python3), EAMET_TEST_VENV (default .venv-test),
# CARGO_TARGET_DIR (build cache; CI points it outside the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${EAMET_TEST_VENV:-.venv-test}
step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --check

# The kernels alone (no PyO3), then with the Python bindings that maturin builds (`python` feature).
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --release -- -D warnings

step "cargo clippy --all-targets --features python -- -D warnings"
cargo clippy --all-targets --release --features python -- -D warnings

step "cargo test --release (kernels, without Python)"
cargo test --release

step "fresh virtual environment in $VENV"
"$PYTHON" -m venv --clear "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install --quiet --upgrade pip
"$VPY" -m pip install --quiet "maturin>=1.9,<2"

step "maturin build --release (abi3 wheel)"
rm -rf dist
"$VENV/bin/maturin" build --release --out dist
WHEEL=$(ls dist/eamet-*.whl)
echo "built $WHEEL"

step "install the wheel with its test and smollm2 extras (the edit extra's torch, transformers + gguf, accelerate)"
"$VPY" -m pip install --quiet "${WHEEL}[test,smollm2]"
# The tests must import the installed wheel, never the source tree.
"$VPY" - <<'PY'
import pathlib, sys, eamet
where = pathlib.Path(eamet.__file__).resolve()
assert "site-packages" in where.parts, f"eamet imported from {where}, not from the installed wheel"
print(f"eamet {eamet.__version__} from {where.parent}")
PY

step "stubtest: python/eamet/_core.pyi against the compiled module"
"$VPY" -m mypy.stubtest eamet._core

step "mypy --strict"
"$VPY" -m mypy

step "lint-imports: the layers' import rule (pyproject.toml, scripts/import_contracts.py)"
PYTHONPATH=scripts "$VENV/bin/lint-imports" --no-logo --no-cache

step "ruff"
"$VENV/bin/ruff" check python tests benches examples scripts
"$VENV/bin/ruff" format --check python tests benches examples scripts

step "pytest"
"$VPY" -m pytest -q

printf '\nall checks passed\n'
