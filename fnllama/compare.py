"""Compare two loss curves step by step: relative/absolute error figures and three plots.

    fnllama compare RUN_A RUN_B --output-dir DIR [--max-rel-err X] [--labels A B]

RUN_B is the reference: relative error at a step is |a - b| / |b|. A RUN is a fnllama
metrics JSONL file, a run directory holding `metrics.jsonl`, a plain loss log (one loss per
line, or "step loss" per line), or a Megatron/AscendSpeed training log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fnllama.cli import VerbParser
from fnllama.errors import ConfigError, DataError

# Megatron/AscendSpeed: " iteration       10/    1024 | ... | lm loss: 1.034567E+01 | ..."
_MEGATRON_LINE = re.compile(r"iteration\s+(\d+)\s*/\s*\d+\s*\|.*?lm loss:\s*([-+0-9.eEnaNifINF]+)")


# ---------------------------------------------------------------- reading

def resolve_run(path: str | os.PathLike) -> Path:
    """The loss file of a RUN argument: the file itself, or DIR/metrics.jsonl."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
        if not p.is_file():
            raise DataError(f"{path}: a directory without metrics.jsonl; pass a metrics file or loss log")
    elif not p.is_file():
        raise DataError(f"{path}: no such file or directory")
    return p


def load_losses(path: str | os.PathLike) -> dict[int, float]:
    """{iteration: loss} from a metrics JSONL, a plain loss log or a Megatron log.

    Formats, detected per file:
      - Megatron: any line matching "iteration N/ M | ... lm loss: X"; other lines are ignored.
      - JSONL (first non-blank line starts with "{"): every line an object with integer
        "iteration" and numeric "loss" (fnllama's metrics.jsonl).
      - plain: every non-blank, non-"#" line is "loss" (steps count 1, 2, ...) or "step loss"
        (whitespace or comma separated); the two forms cannot mix.
    A step logged twice (e.g. a resumed run) keeps its last value.

    Raises:
        DataError: naming the file and line, for anything else, or a file with no losses.
    """
    path = resolve_run(path)
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file; expected a metrics JSONL or a loss log") from None
    if any(_MEGATRON_LINE.search(line) for line in lines):
        losses = _parse_megatron(lines)
    else:
        content = [(n, line.strip()) for n, line in enumerate(lines, 1)
                   if line.strip() and not line.lstrip().startswith("#")]
        if content and content[0][1].startswith("{"):
            losses = _parse_jsonl(path, content)
        else:
            losses = _parse_plain(path, content)
    if not losses:
        raise DataError(f"{path}: no losses found; expected a metrics JSONL, a loss log or a Megatron log")
    return losses


def _parse_megatron(lines: list[str]) -> dict[int, float]:
    losses = {}
    for line in lines:
        m = _MEGATRON_LINE.search(line)
        if m:
            losses[int(m.group(1))] = float(m.group(2))
    return losses


def _parse_jsonl(path: Path, content: list[tuple[int, str]]) -> dict[int, float]:
    losses = {}
    for n, line in content:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); expected one metrics record per line") from None
        if not isinstance(record, dict) or "iteration" not in record or "loss" not in record:
            raise DataError(f"{path}:{n}: expected a JSON object with 'iteration' and 'loss'")
        step, loss = record["iteration"], record["loss"]
        if not isinstance(step, int) or isinstance(step, bool) or not isinstance(loss, (int, float)):
            raise DataError(f"{path}:{n}: 'iteration' must be an integer and 'loss' a number, "
                            f"found {step!r} and {loss!r}")
        losses[step] = float(loss)
    return losses


def _parse_plain(path: Path, content: list[tuple[int, str]]) -> dict[int, float]:
    losses, width = {}, None
    for n, line in content:
        fields = line.replace(",", " ").split()
        if len(fields) not in (1, 2) or (width is not None and len(fields) != width):
            expected = "'loss' or 'step loss'" if width is None else ("'loss'" if width == 1 else "'step loss'")
            raise DataError(f"{path}:{n}: expected {expected} like the lines before, found {line[:60]!r}")
        width = len(fields)
        try:
            step = int(fields[0]) if width == 2 else len(losses) + 1
            losses[step] = float(fields[-1])
        except ValueError:
            raise DataError(f"{path}:{n}: not a number in {line[:60]!r}; expected 'loss' or 'step loss'") from None
    return losses


# ---------------------------------------------------------------- comparing

@dataclass(frozen=True)
class CompareResult:
    """Errors of run A against reference run B over their common steps."""

    steps: tuple[int, ...]
    mean_rel_err: float
    max_rel_err: float
    mean_abs_err: float
    max_abs_err: float


def errors(a: dict[int, float], b: dict[int, float]) -> tuple[list[int], list[float], list[float]]:
    """(common steps, absolute errors, relative errors); relative to b, the reference."""
    steps = sorted(set(a) & set(b))
    if not steps:
        raise DataError(f"the runs share no steps: A has {_span(a)}, B has {_span(b)}")
    abs_err = [abs(a[s] - b[s]) for s in steps]
    rel_err = [e / abs(b[s]) if b[s] != 0 else (0.0 if e == 0 else math.inf) for e, s in zip(abs_err, steps)]
    return steps, abs_err, rel_err


def compare(a: dict[int, float], b: dict[int, float]) -> CompareResult:
    """Mean and max relative (|a-b|/|b|) and absolute (|a-b|) loss errors on common steps.

    A NaN loss at any common step makes every figure NaN, so thresholds fail loudly.
    """
    steps, abs_err, rel_err = errors(a, b)
    n = len(steps)
    return CompareResult(tuple(steps), sum(rel_err) / n, _max(rel_err), sum(abs_err) / n, _max(abs_err))


def _max(values: list[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def _span(losses: dict[int, float]) -> str:
    return "no steps" if not losses else f"{len(losses)} steps {min(losses)}..{max(losses)}"


# ---------------------------------------------------------------- plots

PLOT_NAMES = ("loss_compare.png", "loss_relative_error.png", "loss_absolute_error.png")


def plot(a: dict[int, float], b: dict[int, float], output_dir: str | os.PathLike, *,
         labels: tuple[str, str] = ("A", "B")) -> list[Path]:
    """Write the three PNGs: both losses; loss with relative error; loss with absolute error."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps, abs_err, rel_err = errors(a, b)
    paths = []
    for name, err, err_label in ((PLOT_NAMES[0], None, None),
                                 (PLOT_NAMES[1], rel_err, f"relative error |{labels[0]}-{labels[1]}|/|{labels[1]}|"),
                                 (PLOT_NAMES[2], abs_err, f"absolute error |{labels[0]}-{labels[1]}|")):
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        ax.plot(steps, [a[s] for s in steps], label=labels[0], linewidth=1)
        ax.plot(steps, [b[s] for s in steps], label=labels[1], linewidth=1, linestyle="--")
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        handles, names = ax.get_legend_handles_labels()
        if err is not None:
            twin = ax.twinx()                                   # errors on their own scale
            twin.plot(steps, err, color="tab:red", alpha=0.6, linewidth=0.8, label=err_label)
            twin.set_ylabel(err_label.split(" |")[0])
            h2, n2 = twin.get_legend_handles_labels()
            handles, names = handles + h2, names + n2
        ax.legend(handles, names, loc="upper right")
        ax.set_title(f"loss: {labels[0]} vs {labels[1]}" + ("" if err is None else f" ({err_label.split(' |')[0]})"))
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        paths.append(out / name)
    return paths


# ---------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = VerbParser(prog="fnllama compare", description=__doc__.split("\n")[0])
    p.add_argument("run_a", metavar="RUN_A", help="metrics.jsonl, a run directory, or a loss log")
    p.add_argument("run_b", metavar="RUN_B", help="the reference run (same forms)")
    p.add_argument("--output-dir", required=True, help="where the three PNG plots go")
    p.add_argument("--max-rel-err", type=float, default=None,
                   help="exit 1 when the max relative error exceeds this (for CI)")
    p.add_argument("--labels", nargs=2, metavar=("A", "B"), default=None, help="legend names of the runs")
    return p


def cli_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.max_rel_err is not None and not args.max_rel_err >= 0:
        raise ConfigError(f"--max-rel-err {args.max_rel_err}: expected a number >= 0")
    path_a, path_b = resolve_run(args.run_a), resolve_run(args.run_b)
    a, b = load_losses(path_a), load_losses(path_b)
    labels = tuple(args.labels) if args.labels else (_label(path_a), _label(path_b))
    result = compare(a, b)
    _, _, rel_err = errors(a, b)
    at_max = result.steps[max(range(len(rel_err)), key=lambda i: math.inf if math.isnan(rel_err[i]) else rel_err[i])]
    print(f"A = {path_a} ({labels[0]}), B = {path_b} ({labels[1]}, reference)")
    print(f"{len(result.steps)} common steps, {result.steps[0]}..{result.steps[-1]}")
    print(f"mean relative error: {result.mean_rel_err:.6g}")
    print(f"max relative error:  {result.max_rel_err:.6g} (step {at_max})")
    print(f"mean absolute error: {result.mean_abs_err:.6g}")
    print(f"max absolute error:  {result.max_abs_err:.6g}")
    for path in plot(a, b, args.output_dir, labels=labels):
        print(f"wrote {path}")
    if args.max_rel_err is not None and not result.max_rel_err <= args.max_rel_err:
        print(f"FAIL: max relative error {result.max_rel_err:.6g} > --max-rel-err {args.max_rel_err:g}")
        return 1
    return 0


def _label(path: Path) -> str:
    """A short legend name: the run directory for metrics.jsonl, else the file stem."""
    return path.parent.name if path.name == "metrics.jsonl" and path.parent.name else path.stem
