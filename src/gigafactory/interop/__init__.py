"""Other formats in and out, without changing the model's math.

- `grok1`: the released Grok-1 checkpoint (``ckpt-0/tensorNNNNN_000`` pickles, 8-bit weights), read with an
  allow-listed unpickler; `from_original_params` for weights under the release's Haiku names; a writer that
  produces the same format (for tests and for handing weights back to the original code).
- `hf`: Hugging Face layout (sharded safetensors, ``config.json``, tokenizer files) with the names and config
  keys of the public Grok-1 / Grok-2 ports, both ways.
- `int8`: per-channel 8-bit weights with scales (the release's scheme) for serving.
- `runs`: writing an imported model as a run directory that chat and the server read.

Formats are documented with their name mappings in docs/interop.md.
"""
