"""Build the CLIP BPE tokenizer files (vocab.json, merges.txt) that ship in trainer/model_configs/clip_tokenizer.

The vocabulary is OpenAI CLIP's, as shipped (MIT licence) inside the `open_clip_torch` wheel as
`bpe_simple_vocab_16e6.txt.gz`. Every Stable Diffusion text encoder (CLIP-L, OpenCLIP-H, OpenCLIP-bigG) uses it, so
no tokenizer is ever downloaded. Run once after `pip install --no-deps open_clip_torch`:

    python scripts/build_tokenizer.py [OUT_DIR]
"""

import gzip
import importlib.util
import json
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "trainer" / "model_configs" / "clip_tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # CLIP keeps the first 48,894 merges
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, [" ".join(p) for p in pairs]


def write(out: Path, bpe_gz: Path) -> None:
    vocab, merges = build(bpe_gz)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def open_clip_vocab() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        sys.exit("open_clip_torch is not installed: pip install --no-deps open_clip_torch")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT, open_clip_vocab())
