"""Derive the CLIP tokenizer files (`vocab.json`, `merges.txt`) from the BPE list.

The OpenAI CLIP byte-level BPE ships inside PyPI packages as
`bpe_simple_vocab_16e6.txt.gz` (open-clip-torch, clip-anytorch; MIT licence). Hugging Face's
`CLIPTokenizer` wants the same BPE as a `vocab.json` (token -> id) plus a `merges.txt`. This script
was run once to produce `jax_refine/assets/tokenizer/`; it is kept so the files can be re-derived:

    python tools/make_clip_vocab.py path/to/bpe_simple_vocab_16e6.txt.gz jax_refine/assets/tokenizer
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary is 49408 = 256 bytes * 2 + merges + 2 specials


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for the bytes 0..255, in id order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    order = printable + extra
    symbol = {b: chr(b) for b in printable}
    symbol.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return [symbol[b] for b in order]


def main(bpe_gz: str, out_dir: str) -> None:
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
