"""Compare's exactness (issue #15, point 4) on the demo model, fp32: every cell hot-swapped by trainer.compare
against the same prompt and seed drawn by a freshly loaded pipeline with the file merged by the reference
arithmetic (tests/lora_files.py, as ComfyUI merges), for LoRA, LoCon, LoHa, LoKr and DoRA at strengths 0.5 and 1.
Prints, per cell, [largest pixel difference to the fresh pipeline, largest difference to the base] (0-255).

    OMP_NUM_THREADS=1 .venv/bin/python bench/compare_exact.py /tmp/compare-exact
"""
import json, sys, time
from pathlib import Path
from types import SimpleNamespace
import numpy as np
from PIL import Image
sys.path.insert(0, ".")
from tests.test_compare import adapter_file, write_spec, pixels, fresh_merged, cells_by_key, METHODS
from trainer import compare as engine
from trainer.loading import load_base, DEMO_MODEL
from trainer.sampling import generate

root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/compare-exact"); root.mkdir(parents=True, exist_ok=True)
DRAW = dict(sampler="euler", steps=20, cfg_scale=5.0, clip_skip=1, negative="", width=64, height=64)
prompts = ["a yellow ring on a black background", "a red circle on a white background"]
files = {k: adapter_file(DEMO_MODEL, "sd1", k, root / f"{k}.safetensors") for k in METHODS}
folder = write_spec(root / "c", base=str(DEMO_MODEL), files=[str(files[k]) for k in METHODS], labels=list(METHODS),
                    strengths=[0, 0.5, 1], prompts=prompts, seeds=[5], **DRAW)
t = time.time(); assert engine.compare(folder, SimpleNamespace(requested=False)) == "done"; print("compare s", round(time.time() - t, 1))
cells = cells_by_key(folder)
worst = {}
for p, prompt in enumerate(prompts):
    base = pixels(generate(load_base(DEMO_MODEL), prompt, seed=5, **DRAW))
    worst["base", p] = int(np.abs(pixels(Image.open(cells[(None, 0.0, p, 5)])) - base).max())
    for i, kind in enumerate(METHODS):
        for s in (0.5, 1.0):
            want = pixels(generate(fresh_merged(DEMO_MODEL, files[kind], s), prompt, seed=5, **DRAW))
            got = pixels(Image.open(cells[(i, s, p, 5)]))
            worst[f"{kind}@{s}", p] = (int(np.abs(got - want).max()), int(np.abs(want - base).max()))
print(json.dumps({str(k): v for k, v in worst.items()}))
