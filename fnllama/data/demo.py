"""Embedded demo data: an Alpaca-format parquet of templated tasks and a sentencepiece model.

No download: the records are generated from a seed (arithmetic, sorting, reversing, copying,
counting, case changes...), so a tiny model's loss falls clearly on them. The whole flow the
quickstart uses, from nothing to batches:

    from fnllama.data import demo, preprocess, gpt_dataset, loader
    paths = demo.prepare_demo("~/.cache/fnllama/demo", seed=0)       # parquet + tokenizer.model
    stats = preprocess.preprocess(paths.parquet, paths.directory + "/alpaca",
                                  tokenizer_type="SentencePieceTokenizer",
                                  tokenizer_path=paths.tokenizer_model,
                                  append_eod=True, workers=2)
    prefix = stats["text"].prefix                                   # .../alpaca_text_document
    ds = gpt_dataset.build_split([prefix], seq_length=128, split="969,30,1", which="train", seed=0)
    batches = loader.Loader(ds, micro_batch_size=8)                 # dicts of [8, 128] tensors

or in one call: `prefix = demo.build_demo_dataset(cache_dir, seed=0, workers=2)`.
Both calls are idempotent: the second one reuses the cache (keyed by seed and size).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fnllama", "demo")
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                "provides further context. Write a response that appropriately completes the "
                "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                "### Response:\n{output}")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                   "### Response:\n{output}")
WORDS = """apple river stone cloud garden window tiger planet silver forest candle orange
bridge music paper rocket winter summer yellow purple dragon castle ocean mountain pencil
basket butter coffee honey lemon mirror rabbit shadow thunder valley wizard anchor bottle
circle desert engine falcon guitar harbor island jacket kettle ladder marble needle
pepper puzzle quartz saddle ticket umbrella velvet walnut zebra cactus donkey feather
glacier helmet igloo jungle kitten lantern meadow nickel oyster parrot quiver rainbow
spider tomato violin whistle yogurt badge camera dollar eagle fabric goblin hammer
insect jelly koala lizard magnet noodle olive pirate robot sugar turtle unicorn vessel""".split()


@dataclass(frozen=True)
class DemoPaths:
    directory: str
    parquet: str
    tokenizer_model: str


def _nums(rng: random.Random, n: int, hi: int = 99) -> list[int]:
    return [rng.randint(0, hi) for _ in range(n)]


def _task(rng: random.Random) -> tuple[str, str, str]:
    """One (instruction, input, output) triple from a randomly chosen template."""
    kind = rng.randrange(12)
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    xs = _nums(rng, rng.randint(3, 7))
    ws = rng.sample(WORDS, rng.randint(2, 6))
    w = rng.choice(WORDS)
    join = ", ".join
    if kind == 0:
        return "Add the two numbers.", f"{a} + {b}", str(a + b)
    if kind == 1:
        return "Subtract the second number from the first.", f"{a} - {b}", str(a - b)
    if kind == 2:
        x, y = a % 13, b % 13
        return "Multiply the two numbers.", f"{x} * {y}", str(x * y)
    if kind == 3:
        return "Sort the numbers in ascending order.", join(map(str, xs)), join(map(str, sorted(xs)))
    if kind == 4:
        return "Sort the words alphabetically.", join(ws), join(sorted(ws))
    if kind == 5:
        return "Reverse the letters of the word.", w, w[::-1]
    if kind == 6:
        return "Reverse the order of the words.", " ".join(ws), " ".join(reversed(ws))
    if kind == 7:
        return "Repeat the input exactly.", " ".join(ws), " ".join(ws)
    if kind == 8:
        return "Write the word in capital letters.", w, w.upper()
    if kind == 9:
        return "Find the largest number.", join(map(str, xs)), str(max(xs))
    if kind == 10:
        return "Count the words.", " ".join(ws), str(len(ws))
    n = rng.randint(2, 9)
    return f"Count from 1 to {n}.", "", join(str(i) for i in range(1, n + 1))


def make_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` Alpaca-format records; the same seed always gives the same records."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        instruction, input_, output = _task(rng)
        template = PROMPT_INPUT if input_ else PROMPT_NO_INPUT
        text = template.format(instruction=instruction, input=input_, output=output)
        records.append({"instruction": instruction, "input": input_, "output": output,
                        "text": text})
    return records


def write_parquet(records: list[dict[str, str]], path: str, row_group_size: int = 1024) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ("instruction", "input", "output", "text")
    table = pa.table({c: pa.array([r[c] for r in records], pa.string()) for c in columns})
    pq.write_table(table, path, row_group_size=row_group_size)


def train_tokenizer(texts: list[str], model_path: str, vocab_size: int = 2048) -> str:
    """Trains a LLaMA-style sentencepiece BPE model (byte fallback, split digits) into
    `model_path`. Single-threaded, unshuffled and path-free (the proto would otherwise record
    the output path), so the file's bytes depend only on the texts."""
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(texts), model_writer=buffer, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        shuffle_input_sentence=False, minloglevel=2,
    )
    with open(model_path, "wb") as f:
        f.write(buffer.getvalue())
    return model_path


def prepare_demo(cache_dir: str = DEFAULT_CACHE, seed: int = 0, num_records: int = 6000,
                 vocab_size: int = 2048) -> DemoPaths:
    """Generates (or reuses) the demo parquet and tokenizer under `cache_dir`.

    Returns:
      DemoPaths(directory, parquet, tokenizer_model). The directory appears atomically: a
      crash mid-way leaves nothing that a later call would mistake for a finished cache.
    """
    cache_dir = os.path.expanduser(cache_dir)
    name = f"alpaca-demo-seed{seed}-n{num_records}-v{vocab_size}"
    final = os.path.join(cache_dir, name)
    paths = DemoPaths(final, os.path.join(final, "alpaca_demo.parquet"),
                      os.path.join(final, "tokenizer.model"))
    if os.path.isfile(paths.parquet) and os.path.isfile(paths.tokenizer_model):
        return paths
    os.makedirs(cache_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=name + ".tmp-", dir=cache_dir)
    try:
        records = make_records(num_records, seed)
        write_parquet(records, os.path.join(work, "alpaca_demo.parquet"))
        train_tokenizer([r["text"] for r in records], os.path.join(work, "tokenizer.model"),
                        vocab_size)
        try:
            os.rename(work, final)
        except OSError:  # another process finished first: keep theirs
            if not os.path.isfile(paths.tokenizer_model):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return paths


def build_demo_dataset(cache_dir: str = DEFAULT_CACHE, seed: int = 0, workers: int = 1) -> str:
    """`prepare_demo` + preprocess (with EOD); returns the indexed-dataset prefix. Idempotent."""
    from fnllama.data.preprocess import output_prefix_for, preprocess

    paths = prepare_demo(cache_dir, seed)
    prefix = output_prefix_for(os.path.join(paths.directory, "alpaca"), "text")
    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        preprocess(paths.parquet, os.path.join(paths.directory, "alpaca"),
                   tokenizer_type="SentencePieceTokenizer", tokenizer_path=paths.tokenizer_model,
                   append_eod=True, workers=workers, log_interval=0, log=lambda _: None)
    return prefix
