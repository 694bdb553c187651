"""The ``eamet`` command line: ``eamet.app.cli.main(argv)`` in-process, plus real runs of the installed
console script to prove the entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import eamet
from eamet.app.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def arrays(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """K.npy (float32) and R.npy (float64) with partly aligned neighbourhoods."""
    rng = np.random.default_rng(7)
    keys = rng.normal(size=(60, 8))
    residuals = keys @ rng.normal(size=(8, 5)) + 0.8 * rng.normal(size=(60, 5))
    keys = keys.astype(np.float32)
    np.save(tmp_path / "K.npy", keys)
    np.save(tmp_path / "R.npy", residuals)
    return tmp_path / "K.npy", tmp_path / "R.npy", keys, residuals


def visible_lines(stream: str) -> list[str]:
    """The lines a terminal would show: text after the last carriage return of each line, non-empty."""
    return [line.rsplit("\r", 1)[-1] for line in stream.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def test_diagnose_writes_json_and_png(
    arrays: tuple[Path, Path, np.ndarray, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """diagnose prints a summary, writes a JSON report whose numbers are eamet.misalignment's on the same
    arrays, and a PNG figure."""
    k_path, r_path, keys, residuals = arrays
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    argv = ["diagnose", str(k_path), str(r_path), "--json", str(out_json), "--plot", str(out_png)]
    code = main([*argv, "--top-m", "5", "--worst", "3", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""
    assert "facts N = 60" in out and "key dim = 8" in out and "residual dim = 5" in out
    assert "worst 3 facts:" in out and f"wrote {out_json}" in out and f"wrote {out_png}" in out

    payload = json.loads(out_json.read_text())
    rep = eamet.misalignment(keys, residuals, top_m=5)
    assert (payload["command"], payload["n"], payload["top_m"], payload["tau"]) == ("diagnose", 60, 5, 0.07)
    assert payload["progressive"] is False
    assert payload["keys"] == str(k_path) and payload["residuals"] == str(r_path)
    # the same computation, up to the thread-order rounding of float64 tile sums (~1e-8 relative)
    assert payload["total"] == pytest.approx(rep.total, rel=1e-6)
    np.testing.assert_allclose(payload["scores"], rep.scores, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(payload["overlap"], rep.overlap, rtol=0, atol=1e-12)
    assert payload["total"] == pytest.approx(sum(payload["scores"]), rel=1e-12)
    scores = np.asarray(payload["scores"])
    assert payload["worst"] == np.lexsort((np.arange(60), -scores))[:3].tolist()
    assert list(payload["quantiles"]) == ["p0", "p25", "p50", "p75", "p90", "p99", "p100"]
    png = out_png.read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_progressive_flag(
    arrays: tuple[Path, Path, np.ndarray, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--progressive switches to the support j < i: fact 0 scores 0 with overlap 1, and the total is
    eamet.misalignment(progressive=True)'s, different from the full support's."""
    k_path, r_path, keys, residuals = arrays
    out_json = tmp_path / "p.json"
    argv = ["diagnose", str(k_path), str(r_path), "--progressive", "--top-m", "5"]
    assert main([*argv, "--json", str(out_json), "--no-progress"]) == 0
    assert "support j < i (progressive)" in capsys.readouterr().out
    payload = json.loads(out_json.read_text())
    assert payload["progressive"] is True
    assert (payload["scores"][0], payload["overlap"][0], payload["topm_mse"][0]) == (0.0, 1.0, 0.0)
    progressive = eamet.misalignment(keys, residuals, top_m=5, progressive=True).total
    full = eamet.misalignment(keys, residuals, top_m=5).total
    assert payload["total"] == pytest.approx(progressive, rel=1e-6)
    assert abs(progressive - full) > 1e-3 * full


@pytest.mark.parametrize("argv", [["--help"], ["diagnose", "--help"]], ids=["eamet", "diagnose"])
def test_help_exits_zero(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """--help prints usage and exits 0, for the program and for the subcommand."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: eamet")
    assert ("diagnose" in out) if argv == ["--help"] else ("--top-m" in out and "--progressive" in out)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the package version."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"eamet {eamet.__version__}\n"


def test_usage_errors_exit_two(capsys: pytest.CaptureFixture[str]) -> None:
    """A missing positional argument is a usage error (exit 2), as argparse does."""
    with pytest.raises(SystemExit) as info:
        main(["diagnose", "only-one.npy"])
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def write_bad_input(tmp_path: Path, case: str) -> list[str]:
    """The argv of a diagnose run whose input is broken in the way ``case`` names."""
    rng = np.random.default_rng(8)
    good = tmp_path / "good.npy"
    np.save(good, rng.normal(size=(30, 4)))
    bad = tmp_path / "bad.npy"
    if case == "missing-file":
        return ["diagnose", str(tmp_path / "absent.npy"), str(good)]
    if case == "mismatched-n":
        np.save(bad, rng.normal(size=(29, 4)))
        return ["diagnose", str(good), str(bad)]
    if case == "nan-row":
        x = rng.normal(size=(30, 4))
        x[17, 2] = np.nan
        np.save(bad, x)
        return ["diagnose", str(bad), str(good)]
    if case == "one-dimensional":
        np.save(bad, rng.normal(size=30))
        return ["diagnose", str(bad), str(good)]
    if case == "int64":
        np.save(bad, np.ones((30, 4), dtype=np.int64))
        return ["diagnose", str(good), str(bad)]
    if case == "not-npy":
        bad.write_text("hello")
        return ["diagnose", str(bad), str(good)]
    if case == "top-m-zero":
        return ["diagnose", str(good), str(good), "--top-m", "0"]
    if case == "negative-threads":
        return ["diagnose", str(good), str(good), "--threads", "-1"]
    if case == "negative-worst":
        return ["diagnose", str(good), str(good), "--worst", "-1"]
    raise AssertionError(case)


BAD_INPUTS = {
    # case: what the one error line must mention
    "missing-file": "absent.npy",
    "mismatched-n": "residuals",
    "nan-row": "row 17",
    "one-dimensional": "2-D",
    "int64": "int64",
    "not-npy": "pickle",  # numpy refuses a file that is not .npy (it would need unpickling)
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_exit_one_with_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    """Broken inputs exit 1 and print exactly one line, ``eamet: error: ...``, naming the problem."""
    code = main([*write_bad_input(tmp_path, case), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("eamet: error: ")
    assert BAD_INPUTS[case] in err


@pytest.mark.parametrize(
    ("case", "option"),
    [("negative-threads", "--threads"), ("negative-worst", "--worst"), ("top-m-zero", "--top-m")],
)
def test_bad_option_values_name_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_threads: None, case: str, option: str
) -> None:
    """An out-of-range option value is reported under the option's name (not an internal parameter
    name such as ``n`` or ``k``), either as a one-line runtime error (exit 1) or as argparse's usage
    error (exit 2)."""
    try:
        code = main([*write_bad_input(tmp_path, case), "--no-progress"])
    except SystemExit as exit_:
        code = int(exit_.code or 0)
        assert code == 2
    out, err = capsys.readouterr()
    assert code in (1, 2) and out == ""
    if code == 1:
        assert err.startswith("eamet: error: ") and err.count("\n") == 1, err
    assert option in err, err


def test_error_is_the_only_visible_line_with_the_progress_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --no-progress the (cleared) bar may precede the error, but a terminal shows one line."""
    code = main(write_bad_input(tmp_path, "nan-row"))
    err = capsys.readouterr().err
    assert code == 1
    assert visible_lines(err) == ["eamet: error: keys: row 17 contains a NaN or infinite value"]


def test_threads_option(
    arrays: tuple[Path, Path, np.ndarray, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    restore_threads: None,
) -> None:
    """--threads 1 computes the same report."""
    k_path, r_path, keys, residuals = arrays
    out_json = tmp_path / "t.json"
    assert (
        main(
            ["diagnose", str(k_path), str(r_path), "--threads", "1", "--json", str(out_json), "--no-progress"]
        )
        == 0
    )
    capsys.readouterr()
    payload = json.loads(out_json.read_text())
    assert payload["total"] == pytest.approx(eamet.misalignment(keys, residuals).total, rel=1e-6)


def console_script() -> Path:
    """The ``eamet`` script installed beside this interpreter (the venv's bin directory)."""
    script = Path(sys.executable).parent / "eamet"
    assert script.is_file(), f"no console script at {script}"
    return script


def test_console_script_entry_point(
    arrays: tuple[Path, Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """The installed ``eamet`` command runs diagnose end to end, and reports errors on one line."""
    k_path, r_path, keys, residuals = arrays
    out_json = tmp_path / "cli.json"
    argv = ["diagnose", str(k_path), str(r_path), "--top-m", "5", "--json", str(out_json), "--no-progress"]
    run = subprocess.run(
        [str(console_script()), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "misalignment A(i)" in run.stdout
    total = json.loads(out_json.read_text())["total"]
    assert total == pytest.approx(eamet.misalignment(keys, residuals, top_m=5).total, rel=1e-6)

    bad = subprocess.run(
        [str(console_script()), *write_bad_input(tmp_path, "nan-row"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    assert bad.stderr == "eamet: error: keys: row 17 contains a NaN or infinite value\n"

    version = subprocess.run([str(console_script()), "--version"], capture_output=True, text=True, timeout=60)
    assert (version.returncode, version.stdout) == (0, f"eamet {eamet.__version__}\n")
