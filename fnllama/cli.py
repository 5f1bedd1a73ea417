"""The `fnllama` command: one verb per job, each implemented by `cli_main(argv)` in its module.

User errors (`fnllama.errors.UserError`) print one line and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fnllama.errors import ConfigError, UserError

class VerbParser(argparse.ArgumentParser):
    """argparse for a verb's flags: a bad flag raises ConfigError (one line, exit 2) instead of exiting."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


# verb -> (module with `cli_main(argv: list[str]) -> int`, or "module:function", one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "preprocess": ("fnllama.data.preprocess", "tokenize parquet/json into a Megatron indexed dataset"),
    "train": ("fnllama.train_cli", "train a model: Megatron-style flags or an experiments/*.py config"),
    "compare": ("fnllama.compare", "compare two runs' loss curves: error figures and plots"),
    "plan": ("fnllama.plan", "per-device memory and FLOPs/step of a model x devices x ZeRO stage"),
    "convert-hf": ("fnllama.convert:cli_main_convert", "HF LLaMA directory -> params-only checkpoint (train --load it)"),
    "export-hf": ("fnllama.convert:cli_main_export", "checkpoint (any dp/ZeRO stage) -> HF LLaMA directory"),
}


def _usage() -> str:
    lines = ["usage: fnllama [--debug] VERB [options]", "", "verbs:"]
    lines += [f"  {verb:<12} {help_}" for verb, (_, help_) in VERBS.items()]
    lines += ["", "fnllama VERB --help shows a verb's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"fnllama: unknown verb {verb!r}; known verbs: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    module_name, _, function = VERBS[verb][0].partition(":")
    entry = getattr(importlib.import_module(module_name), function or "cli_main")
    try:
        return int(entry(rest) or 0)
    except UserError as e:
        if debug:
            raise
        print(f"fnllama {verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
