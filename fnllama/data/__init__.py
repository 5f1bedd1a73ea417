"""Data pipeline: tokenizer -> preprocess -> Megatron indexed dataset -> packed loader.

Modules (each importable on its own; nothing heavy is imported here):
  tokenizer    `load_tokenizer(type, path)`: sentencepiece `.model`, HF dirs (tokenizer.model
               or tokenizer.json); encode / decode / bos_id / eos_id / pad_id / vocab_size.
  indexed      Megatron MMIDIDX `.bin`/`.idx`: `IndexedDatasetWriter`, `IndexedDataset`.
  sources      streaming readers for .parquet / .jsonl / .json inputs.
  preprocess   `preprocess(...)` and `fnllama preprocess` (Megatron's flags).
  gpt_dataset  packed samples: `build_split(prefixes, seq_length=, split=, which=, seed=)`.
  loader       `Loader(dataset, micro_batch_size=, dp_rank=, dp_size=)` -> dicts of [B, T]
               tensors; `state()` / `restore(state)` to resume.
  demo         `prepare_demo(cache_dir)` / `build_demo_dataset(cache_dir)`: embedded data.
See fnllama/data/demo.py for the end-to-end flow in five lines.
"""
