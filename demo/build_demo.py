"""Build the demo world: a toy base model that draws shapes, and a dataset of a shape it has never seen.

    python demo/build_demo.py            # both (about 30 minutes on one CPU thread)
    python demo/build_demo.py dataset    # only demo/dataset/ (seconds)
    python demo/build_demo.py OUT VAE_STEPS POOL UNET_STEPS    # an experiment, saved under OUT instead of demo/

The world: 64x64 pictures of a circle, square or triangle, in one of six colours, on a white, black or grey
background, at varied positions and sizes, captioned "a red circle on a white background". A small model of the
SD 1.5 architecture (VAE, UNet, CLIP text encoder with the real CLIP tokenizer) is trained from scratch on such
pictures in fixed numbers of steps, so the result does not depend on the machine's speed: the VAE for 2,400 steps
of 4 fresh pictures (edge-weighted L1 + MSE, MSE of 4x4-pooled colour, a very little KL); then a pool of 10,000
pictures is encoded once; then the UNet and the text encoder for 1,200 steps of 32 latents from the pool (min-SNR-5
weighting, warm-up and cosine decay, EMA). It is saved as `demo/base-model/` (diffusers) and
`demo/base-model.safetensors` (single file, CompVis layout). The demo dataset shows rings (discs with a hole), which
the base model never saw, captioned with the trigger word "zxc". Everything is seeded: the same command gives the
same pictures and, on the same machine and torch version, the same weights.
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "demo"
SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40),
           "purple": (150, 60, 190), "orange": (240, 140, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128)}
TRIGGER = "zxc"
CONCEPT = "ring"


def polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else r * 0.42) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 cy + (r if k % 2 == 0 else r * 0.42) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    raise ValueError(shape)


def draw(shape: str, colour: str, background: str, rng: random.Random, size: int = SIZE) -> Image.Image:
    """One picture: the shape at a random place and size, drawn at 4x and reduced for smooth edges."""
    big = size * 4
    r = rng.uniform(0.22, 0.36) * big
    cx, cy = rng.uniform(r, big - r), rng.uniform(r, big - r)
    im = Image.new("RGB", (big, big), BACKGROUNDS[background])
    d = ImageDraw.Draw(im)
    if shape in ("circle", "ring"):
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
        if shape == "ring":  # a disc with a hole of half its radius
            d.ellipse((cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2), fill=BACKGROUNDS[background])
    else:
        d.polygon(polygon(shape, cx, cy, r), fill=COLOURS[colour])
    return im.resize((size, size), Image.Resampling.LANCZOS)


def caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def sample_world(rng: random.Random, shapes=SHAPES) -> tuple[Image.Image, str]:
    shape, colour, bg = rng.choice(shapes), rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
    if colour == "yellow" and bg == "white" or bg == "black" and colour == "purple":
        bg = "grey"  # keep every shape visible against its background
    return draw(shape, colour, bg, rng), caption(shape, colour, bg)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i, np.float32) for i in images]) / 127.5 - 1).permute(0, 3, 1, 2)


def concept_pictures(seed: int, n: int) -> list[tuple[Image.Image, str]]:
    """The concept in the world's colours and backgrounds: the demo dataset (seed 0) and held-out sets (other seeds)."""
    rng = random.Random(f"concept/{seed}")
    out = []
    for _ in range(n):
        colour, bg = rng.choice(["yellow", "orange", "red"]), rng.choice(["black", "grey"])
        a = "an" if colour[0] in "aeiou" else "a"  # the dataset is what a user reads first
        out.append((draw(CONCEPT, colour, bg, rng), f"{TRIGGER}, {a} {colour} {CONCEPT} on a {bg} background"))
    return out


def write_dataset(folder: Path = DEMO / "dataset", n: int = 10) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("*.png"), *folder.glob("*.txt")]:  # the folder holds this dataset and nothing else
        old.unlink()
    for i, (im, text) in enumerate(concept_pictures(0, n)):
        im.save(folder / f"{CONCEPT}-{i:02d}.png")
        (folder / f"{CONCEPT}-{i:02d}.txt").write_text(text + "\n")
    return folder


# --- the base model ---

def build_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4,
                        norm_num_groups=32, sample_size=SIZE, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=256, num_attention_heads=1,
                                        num_hidden_layers=2, max_position_embeddings=77, vocab_size=49408,
                                        hidden_act="quick_gelu", projection_dim=64, bos_token_id=0, eos_token_id=2,
                                        pad_token_id=1))
    unet = UNet2DConditionModel(block_out_channels=(64, 128), layers_per_block=2, cross_attention_dim=64,
                                attention_head_dim=8, sample_size=SIZE // 8, norm_num_groups=32,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    with torch.no_grad():  # start the latents' log-variance at -8: nearly deterministic codes from the first step
        vae.quant_conv.bias[vae.config.latent_channels:] = -8.0
    return vae, text, unet


def schedule(opt, steps: int, warmup: int):
    """Linear warm-up, then cosine decay to a tenth of the learning rate."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps))))


def edge_weight(x: torch.Tensor) -> torch.Tensor:
    """1 on flat colour, 5 on and beside the shape's outline: the outline is what tells the shapes apart."""
    dy = torch.nn.functional.pad((x[..., 1:, :] - x[..., :-1, :]).abs().sum(1, keepdim=True), (0, 0, 0, 1))
    dx = torch.nn.functional.pad((x[..., :, 1:] - x[..., :, :-1]).abs().sum(1, keepdim=True), (0, 1, 0, 0))
    return 1 + 4 * torch.nn.functional.max_pool2d(((dx + dy) > 0.1).float(), 3, 1, 1)


def train_vae(vae, steps: int, log, batch: int = 4) -> None:
    """Edge-weighted L1 + MSE reconstruction, MSE of 4x4-pooled colour and a very little KL, on fresh pictures every
    step (small batches: more updates per second, which is what a VAE on one CPU thread is short of)."""
    rng = random.Random("vae")
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    lr = schedule(opt, steps, warmup=30)
    for step in range(1, steps + 1):
        x = to_tensor([sample_world(rng)[0] for _ in range(batch)])
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        loss = ((recon - x).abs() * edge_weight(x)).mean() + torch.nn.functional.mse_loss(recon, x)
        pool = torch.nn.functional.avg_pool2d  # colour: the decoder's GroupNorm layers make flat colour hard to learn
        loss = loss + 4 * torch.nn.functional.mse_loss(pool(recon, 4), pool(x, 4))
        loss = loss + 1e-6 * dist.kl().mean() / x[0].numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        lr.step()
        if step % 200 == 0:
            log(f"vae step {step}/{steps}: loss {loss.item():.4f}")


@torch.no_grad()
def check_vae(vae, out: Path | None = None) -> str:
    """How many of 36 reconstructed pictures the detector still reads as the shape drawn."""
    rng = random.Random("check")
    drawn = [(draw(s, c, "grey" if c in ("yellow", "purple") else b, rng), s)
             for s in SHAPES for c in COLOURS for b in ("white", "black")]
    x = to_tensor([im for im, _ in drawn])
    y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    pictures = [Image.fromarray(((p.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()) for p in y]
    right = sum(judge(p)["shape"] == s for p, (_, s) in zip(pictures, drawn))
    if out is not None:
        grid = Image.new("RGB", (SIZE * 12, SIZE * 6))
        for k, (p, (im, _)) in enumerate(zip(pictures, drawn)):
            grid.paste(im, ((k % 12) * SIZE, (k // 12) * 2 * SIZE))
            grid.paste(p, ((k % 12) * SIZE, (k // 12 * 2 + 1) * SIZE))
        out.mkdir(parents=True, exist_ok=True)
        grid.save(out / "vae-check.png")
    return f"vae reconstructions: shape right on {right}/{len(drawn)}, mean abs error {(y - x).abs().mean():.3f}"


@torch.no_grad()
def encode_pool(vae, tokenizer, n: int, log) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """A fixed pool of n pictures, encoded once: latent means and deviations, token ids, captions."""
    from trainer.text import tokenize

    rng = random.Random("pool")
    means, stds, captions = [], [], []
    for start in range(0, n, 64):
        batch = [sample_world(rng) for _ in range(min(64, n - start))]
        dist = vae.encode(to_tensor([im for im, _ in batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        captions += [c for _, c in batch]
    log(f"encoded a pool of {n} pictures")
    return torch.cat(means), torch.cat(stds), tokenize(tokenizer, captions), captions


def train_diffusion(text, unet, pool, empty: torch.Tensor, steps: int, log, batch: int = 32) -> None:
    """epsilon prediction with min-SNR-5 weighting, 10 % empty captions (for guidance), EMA of the UNet."""
    from diffusers import DDPMScheduler

    from trainer.loss import DenoisingLoss

    means, stds, ids = pool
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    loss_fn = DenoisingLoss(sched, "epsilon", min_snr_gamma=5.0)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    lr = schedule(opt, steps, warmup=100)
    ema = [p.detach().clone() for p in unet.parameters()]
    gen = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        pick = torch.randint(0, len(means), (batch,), generator=gen)
        latents = means[pick] + stds[pick] * torch.randn(means[pick].shape, generator=gen)
        tokens = torch.where(torch.rand(batch, 1, generator=gen) < 0.1, empty, ids[pick])
        loss = loss_fn(unet, latents, text(tokens).last_hidden_state, generator=gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        lr.step()
        decay = min(0.995, step / (step + 10))
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 50 == 0:
            log(f"unet step {step}/{steps}: loss {loss.item():.4f}")
    with torch.no_grad():
        for e, p in zip(ema, unet.parameters()):
            p.copy_(e)


VAE_STEPS, POOL, UNET_STEPS = 2_400, 10_000, 1_200


def build_base(out: Path = DEMO, vae_steps: int = VAE_STEPS, pool: int = POOL, unet_steps: int = UNET_STEPS) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from tests.tiny_models import to_single_file, tokenizer as clip_tokenizer
    from trainer.loading import load_base

    torch.set_num_threads(1)
    start = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - start:6.0f}s] {message}", flush=True)

    vae, text, unet = build_models()
    tokenizer = clip_tokenizer()
    scratch = out.resolve() != DEMO  # an experiment: keep the VAE (reused by the next run there) and its pictures
    cache = out / "vae-cache.safetensors"
    if scratch and cache.exists():
        vae.load_state_dict(load_file(str(cache)))
    else:
        train_vae(vae, vae_steps, log)
        if scratch:
            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(cache))
    vae.requires_grad_(False)
    log(check_vae(vae, out if scratch else None))
    means, stds, ids, _ = encode_pool(vae, tokenizer, pool, log)
    scale = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scale)
    log(f"vae scaling factor {scale:.4f}")
    train_diffusion(text, unet, (means * scale, stds * scale, ids), tokenize_empty(tokenizer), unet_steps, log)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    pipe.save_pretrained(out / "base-model")
    to_single_file(pipe, "sd1", out / "base-model.safetensors")
    log(f"saved {out / 'base-model'} and {out / 'base-model.safetensors'}")
    log(f"samples of the saved model: {score(load_base(out / 'base-model'))}")


def tokenize_empty(tokenizer) -> torch.Tensor:
    from trainer.text import tokenize

    return tokenize(tokenizer, [""])


# --- judging pictures by the drawing rules ---

def world_prompts() -> list[tuple[str, str, str]]:
    """Every shape in every colour once, on backgrounds in turn (yellow and purple on grey, where both show)."""
    out = []
    for i, shape in enumerate(SHAPES):
        for j, colour in enumerate(COLOURS):
            background = "grey" if colour in ("yellow", "purple") else ["white", "black", "grey"][(i + j) % 3]
            out.append((shape, colour, background))
    return out


@torch.no_grad()
def score(model, prompts=None, seeds=(0, 1), sampler: str = "euler") -> dict:
    """How often a loaded base model (trainer.loading) draws the shape and the colour asked (default: every
    prompt of world_prompts())."""
    from trainer.sampling import generate

    counts = {"shape": 0, "colour": 0, "both": 0, "of": 0} | {s: 0 for s in SHAPES}
    for shape, colour, background in prompts or world_prompts():
        for seed in seeds:
            seen = judge(generate(model, caption(shape, colour, background), sampler=sampler, steps=20, cfg_scale=5.0,
                                  seed=seed, width=SIZE, height=SIZE))
            counts["shape"] += seen["shape"] == shape
            counts[shape] += seen["shape"] == shape
            counts["colour"] += seen["colour"] == colour
            counts["both"] += seen["shape"] == shape and seen["colour"] == colour
            counts["of"] += 1
    return counts


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of integer (x, y) points (Andrew's monotone chain, then the shoelace formula)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    x, y = np.array(hull, dtype=float).T
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def spikes(mask: np.ndarray, bins: int = 72, prominence: float = 0.35) -> int:
    """Points sticking out of the shape: peaks of its radius around the centroid that rise well above the
    valleys beside them (a star has 5, a triangle 3; a square's corners rise only 0.29, a blob's hardly at all)."""
    ys, xs = np.nonzero(mask)
    dy, dx = ys - ys.mean(), xs - xs.mean()
    angle = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * bins).astype(int) % bins
    radius = np.zeros(bins)
    np.maximum.at(radius, angle, np.hypot(dy, dx))
    radius = np.convolve(np.concatenate([radius[-1:], radius, radius[:1]]), np.ones(3) / 3, "valid")
    radius /= max(radius.max(), 1e-6)
    window = bins // 10
    count = 0
    for i in range(bins):
        around = np.take(radius, range(i - window, i + window + 1), mode="wrap")
        if radius[i] == around.max() and radius[i] - around.min() > prominence:
            count += 1
    return count


def largest_piece(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected part of a mask (a shape is one piece; specks of noise elsewhere are not part of it)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        p = np.pad(labels, 1)
        h, w = mask.shape
        spread = np.maximum.reduce([p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
        spread = np.where(mask, spread, 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    if not mask.any():
        return mask
    values, counts = np.unique(labels[mask], return_counts=True)
    return labels == values[counts.argmax()]


def template(shape: str, cx: float, cy: float, area: float, size: int = SIZE) -> np.ndarray:
    """The mask of a shape as `draw` draws it (circle; upright square; triangle pointing up) with its centre at
    pixel (cx, cy) and the given area in pixels."""
    big = size * 4
    radius = {"circle": math.sqrt(area / math.pi), "square": math.sqrt(area) / 2,
              "triangle": math.sqrt(area / (3 * math.sqrt(3) / 4))}[shape] * 4
    x, y = (cx + 0.5) * 4, (cy + 0.5) * 4
    im = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(im)
    if shape == "circle":
        d.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    else:
        d.polygon(polygon(shape, x, y, radius), fill=255)
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR)) > 127


FIT = 0.7  # the least overlap (IoU) with its template for a piece to count as that shape; drawn pictures score > 0.96


def judge(image: Image.Image) -> dict:
    """What a picture shows, by the rules it was drawn with: the background is the colour of the border, the
    shape is the largest piece that differs from it; a ring has background at its centre, a star is far from convex
    (solidity) with five points; otherwise the piece is the circle, square or triangle whose template of the same
    centre and area it overlaps most, if that overlap (`fit`) is at least FIT, and a "blob" if not."""
    a = np.asarray(image.convert("RGB"), dtype=float)
    border = np.concatenate([a[2], a[-3], a[:, 2], a[:, -3]])  # just inside the edge, where decoders smear
    background = np.median(border, axis=0)
    mask = largest_piece(np.abs(a - background).sum(-1) > 90)
    area = int(mask.sum())
    if area < 0.02 * mask.size:
        return {"shape": "none", "colour": "none", "solidity": 0.0, "spikes": 0, "fit": 0.0, "area": area}
    ys, xs = np.nonzero(mask)
    solidity = area / max(_hull_area(np.stack([xs, ys], 1)), 1.0)
    points = spikes(mask)
    cy, cx = int(round(ys.mean())), int(round(xs.mean()))
    hole = not mask[max(cy - 1, 0):cy + 2, max(cx - 1, 0):cx + 2].any()  # background all round the centroid
    fits = {}
    for candidate in SHAPES:
        t = template(candidate, xs.mean(), ys.mean(), area, mask.shape[0])
        fits[candidate] = float((t & mask).sum() / (t | mask).sum())
    best = max(fits, key=fits.get)
    if hole and solidity < 0.9:
        shape = "ring"
    elif points >= 4 and solidity < 0.8:
        shape = "star"
    else:
        shape = best if fits[best] >= FIT else "blob"
    mean = a[mask].mean(0)
    colour = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - mean).sum())
    return {"shape": shape, "colour": colour, "solidity": round(float(solidity), 3), "spikes": points,
            "fit": round(fits[best], 3), "area": area}


if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["dataset"]:
        write_dataset()
    elif args:  # an experiment: python demo/build_demo.py OUT VAE_STEPS POOL UNET_STEPS
        build_base(Path(args[0]), *map(int, args[1:]))
    else:
        write_dataset()
        build_base()
