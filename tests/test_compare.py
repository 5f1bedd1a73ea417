"""fnllama.compare: loss-log formats, error figures against a hand computation, plots, CLI."""

import json
import math
import subprocess
import sys

import pytest

from fnllama.cli import main
from fnllama.compare import PLOT_NAMES, compare, load_losses, plot
from fnllama.errors import DataError

A = {1: 10.0, 2: 8.0, 3: 6.0, 4: 5.0}
B = {1: 10.0, 2: 8.8, 3: 5.0, 4: 5.0, 5: 4.0}     # the reference; step 5 has no partner


def write_jsonl(path, losses):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"iteration": s, "loss": l, "lr": 1e-3}) + "\n" for s, l in losses.items()))
    return path


def test_compare_matches_hand_computation():
    r = compare(A, B)
    assert r.steps == (1, 2, 3, 4)
    # |a-b|: 0, 0.8, 1.0, 0        |a-b|/|b|: 0, 0.8/8.8, 1/5, 0
    assert r.mean_abs_err == pytest.approx((0.8 + 1.0) / 4)
    assert r.max_abs_err == pytest.approx(1.0)
    assert r.mean_rel_err == pytest.approx((0.8 / 8.8 + 0.2) / 4)
    assert r.max_rel_err == pytest.approx(0.2)
    # b is the reference: swapping the runs changes the relative errors
    assert compare(B, A).mean_rel_err == pytest.approx((0.8 / 8.0 + 1.0 / 6.0) / 4)


def test_compare_nan_and_disjoint_steps():
    r = compare({1: math.nan, 2: 1.0}, {1: 1.0, 2: 1.0})
    assert math.isnan(r.max_rel_err) and math.isnan(r.mean_abs_err)
    with pytest.raises(DataError, match=r"share no steps: A has 2 steps 1\.\.2, B has 1 steps 7\.\.7"):
        compare({1: 1.0, 2: 1.0}, {7: 1.0})


def test_load_losses_formats(tmp_path):
    assert load_losses(write_jsonl(tmp_path / "run" / "metrics.jsonl", A)) == A
    assert load_losses(tmp_path / "run") == A                           # a run directory
    (tmp_path / "plain.txt").write_text("# losses\n10.0\n8.0\n\n6.0\n")
    assert load_losses(tmp_path / "plain.txt") == {1: 10.0, 2: 8.0, 3: 6.0}
    (tmp_path / "pairs.csv").write_text("10,2.5\n20, 2.25\n20,2.0\n")     # a repeated step: last wins
    assert load_losses(tmp_path / "pairs.csv") == {10: 2.5, 20: 2.0}
    (tmp_path / "megatron.log").write_text(
        "using world size: 8\n"
        " iteration        1/    1024 | consumed samples:          256 | elapsed time per iteration (ms): 7012.3"
        " | learning rate: 1.000E-06 | global batch size:   256 | lm loss: 1.038861E+01 | loss scale: 1.0 |\n"
        "[Rank 0] (after 1 iterations) memory (MB) | allocated: 1.0\n"
        " iteration        2/    1024 | consumed samples:          512 | lm loss: 9.512340E+00 | grad norm: 3.1 |\n")
    assert load_losses(tmp_path / "megatron.log") == {1: 10.38861, 2: 9.51234}


@pytest.mark.parametrize("content, message", [
    ('{"iteration": 1, "loss": 2.0}\n{"iteration": 2, "loss": \n', r"bad\.jsonl:2: not valid JSON"),
    ('{"iteration": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n', r"bad\.jsonl:2: expected a JSON object with 'iteration'"),
    ('{"iteration": "1", "loss": 2.0}\n', r"bad\.jsonl:1: 'iteration' must be an integer"),
    ("2.0\n1.5\n3 1.0\n", r"bad\.jsonl:3: expected 'loss' like the lines before"),
    ("1 2.0\nhello world\n", r"bad\.jsonl:2: not a number in 'hello world'"),
    ("# only a comment\n", r"bad\.jsonl: no losses found"),
])
def test_load_losses_garbage_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_losses(path)


def test_load_losses_missing_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_losses(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="a directory without metrics.jsonl"):
        load_losses(tmp_path)
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(DataError, match="not a text file"):
        load_losses(tmp_path / "bin")


def test_plot_writes_three_pngs(tmp_path):
    paths = plot(A, B, tmp_path / "plots", labels=("fp32", "bf16"))
    assert [p.name for p in paths] == list(PLOT_NAMES)
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_cli_happy_path_and_threshold(tmp_path, capsys):
    a = write_jsonl(tmp_path / "run_a" / "metrics.jsonl", A)
    write_jsonl(tmp_path / "run_b" / "metrics.jsonl", B)
    out_dir = tmp_path / "out"
    assert main(["compare", str(tmp_path / "run_a"), str(tmp_path / "run_b"), "--output-dir", str(out_dir)]) == 0
    text = capsys.readouterr().out
    assert "4 common steps, 1..4" in text
    assert f"mean relative error: {(0.8 / 8.8 + 0.2) / 4:.6g}" in text
    assert "max relative error:  0.2 (step 3)" in text
    assert "mean absolute error: 0.45" in text and "max absolute error:  1" in text
    assert "(run_a)" in text and "(run_b, reference)" in text
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(PLOT_NAMES)

    args = ["compare", str(a), str(tmp_path / "run_b"), "--output-dir", str(out_dir), "--labels", "x", "y"]
    assert main(args + ["--max-rel-err", "0.25"]) == 0
    assert main(args + ["--max-rel-err", "0.1"]) == 1
    assert "FAIL: max relative error 0.2 > --max-rel-err 0.1" in capsys.readouterr().out


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fnllama.cli", *args], capture_output=True, text=True, timeout=60)


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", A)
    (tmp_path / "bad.txt").write_text("1.0\nxyz\n")
    cases = [
        (["compare", str(good)], "the following arguments are required: RUN_B, --output-dir"),
        (["compare", str(good), str(tmp_path / "missing"), "--output-dir", "o"], "missing: no such file"),
        (["compare", str(good), str(tmp_path / "bad.txt"), "--output-dir", "o"], "bad.txt:2: not a number"),
        (["compare", str(good), str(good), "--output-dir", "o", "--max-rel-err", "x"], "--max-rel-err: invalid float"),
    ]
    for argv, message in cases:
        proc = _run_cli(*argv)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fnllama compare: error:"), proc.stderr
        assert message in lines[0] and "Traceback" not in proc.stderr
