"""What each adapter method costs against plain LoRA, on this machine's CPU: step time, trained parameters, file size.

The overhead benchmark's SD1.5-shaped model and pictures, trained through `trainer.train` on the UNet at rank 4
(LoCon adds 3x3 convs at conv rank 4); methods run interleaved, each round in a rotated order, after a warm-up;
medians compared.

    OMP_NUM_THREADS=1 .venv/bin/python bench/methods.py [--steps 20] [--rounds 3]

The last line is machine-readable: <method>_step=<ratio to lora> … for every method.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.overhead import build_images, build_model, our_run  # noqa: E402
from trainer.methods import CATALOG  # noqa: E402

METHODS = tuple(CATALOG)


def settings(kind: str) -> dict:
    """3x3 convs only where the method requires them, so the others are measured on the same layers as LoRA."""
    return {"network_type": kind, "conv_dim": 4 if CATALOG[kind].convs == "required" else 0, "conv_alpha": 2.0}


def trained_parameters(model_dir: Path, kind: str) -> int:
    from trainer import config
    from trainer.loading import load_base
    from trainer.networks import create

    cfg = config.build("character", "sd15", {"network_dim": 4, "network_alpha": 2.0} | settings(kind))
    net = create(cfg.network, "sd1", {"unet": load_base(model_dir).unet}, total_steps=100)
    return sum(p.numel() for p in net.parameters_of("unet"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, images = build_model(root), build_images(root)
        our_run(model_dir, images, root, 4)  # warm-up
        times: dict[str, list[float]] = {kind: [] for kind in METHODS}
        sizes: dict[str, int] = {}
        for r in range(args.rounds):
            for kind in METHODS[r % len(METHODS):] + METHODS[: r % len(METHODS)]:  # each round starts elsewhere
                runs = root / kind
                runs.mkdir(exist_ok=True)
                times[kind] += our_run(model_dir, images, runs, args.steps, extra=settings(kind))[2:]
                sizes[kind] = next(runs.glob("run-*/output/lora.safetensors")).stat().st_size
        medians = {kind: statistics.median(t) for kind, t in times.items()}
        print(f"{'method':10} {'step ms':>8} {'vs lora':>8} {'trained params':>15} {'file KB (fp16)':>15}")
        for kind in METHODS:
            print(f"{kind:10} {medians[kind] * 1000:8.1f} {medians[kind] / medians['lora']:8.2f} "
                  f"{trained_parameters(model_dir, kind):15,d} {sizes[kind] / 1024:15.1f}")
        print(" ".join(f"{kind}_step={medians[kind] / medians['lora']:.3f}" for kind in METHODS))


if __name__ == "__main__":
    main()
