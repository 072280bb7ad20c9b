"""Build the demo world: a toy base model that draws shapes, and a dataset of a shape it has never seen.

    python demo/build_demo.py            # both (about 25 minutes on one CPU thread)
    python demo/build_demo.py dataset    # only demo/dataset/ (seconds)

The world: 64x64 pictures of a circle, square or triangle, in one of six colours, on a white, black or grey
background, at varied positions and sizes, captioned "a red circle on a white background". A small model of the
SD 1.5 architecture (VAE, UNet, CLIP text encoder with the real CLIP tokenizer) is trained from scratch on an
endless stream of such pictures and saved as `demo/base-model/` (diffusers) and `demo/base-model.safetensors`
(single file, CompVis layout). The demo dataset shows stars, which the base model never saw, captioned with the
trigger word "zxc". Everything is seeded: the same command gives the same pictures and, on the same machine and
torch version, the same weights.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "demo"
SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40),
           "purple": (150, 60, 190), "orange": (240, 140, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128)}
TRIGGER = "zxc"
CONCEPT = "star"


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
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
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
    """Stars in the world's colours and backgrounds: the demo dataset (seed 0) and held-out sets (other seeds)."""
    rng = random.Random(f"concept/{seed}")
    out = []
    for _ in range(n):
        colour, bg = rng.choice(["yellow", "orange", "red"]), rng.choice(["black", "grey"])
        out.append((draw(CONCEPT, colour, bg, rng), f"{TRIGGER}, a {colour} {CONCEPT} on a {bg} background"))
    return out


def write_dataset(folder: Path = DEMO / "dataset", n: int = 10) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (im, text) in enumerate(concept_pictures(0, n)):
        im.save(folder / f"star-{i:02d}.png")
        (folder / f"star-{i:02d}.txt").write_text(text + "\n")
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
    return vae, text, unet


def train_vae(vae, minutes: float, log) -> float:
    """Reconstruction + a little KL, on fresh pictures every step. Returns the latents' scaling factor."""
    rng = random.Random("vae")
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    end, step = time.time() + minutes * 60, 0
    while time.time() < end:
        x = to_tensor([sample_world(rng)[0] for _ in range(16)])
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        kl = dist.kl().mean() / (SIZE * SIZE * 3)
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-4 * kl
        loss.backward()
        opt.step()
        opt.zero_grad()
        step += 1
        if step % 50 == 0:
            log(f"vae step {step}: loss {loss.item():.4f}")
    with torch.no_grad():
        x = to_tensor([sample_world(random.Random(f"std/{i}"))[0] for i in range(64)])
        return float(1.0 / vae.encode(x).latent_dist.mean.std())


def train_diffusion(vae, text, unet, tokenizer, minutes: float, log) -> None:
    from diffusers import DDPMScheduler

    from trainer.text import tokenize

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    vae.requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    ema = [p.detach().clone() for p in unet.parameters()]
    rng = random.Random("unet")
    end, step = time.time() + minutes * 60, 0
    while time.time() < end:
        batch = [sample_world(rng) for _ in range(32)]
        captions = [c if rng.random() > 0.1 else "" for _, c in batch]  # unconditional too, for guidance
        with torch.no_grad():
            latents = vae.encode(to_tensor([im for im, _ in batch])).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
        hidden = text(tokenize(tokenizer, captions)).last_hidden_state
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (len(batch),))
        pred = unet(sched.add_noise(latents, noise, t), t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                e.lerp_(p, 0.02 if step > 200 else 1.0)
        step += 1
        if step % 50 == 0:
            log(f"unet step {step}: loss {loss.item():.4f}")
    with torch.no_grad():
        for e, p in zip(ema, unet.parameters()):
            p.copy_(e)


def build_base(vae_minutes: float = 6, unet_minutes: float = 18) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from tests.tiny_models import to_single_file, tokenizer as clip_tokenizer

    torch.set_num_threads(1)
    start = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - start:6.0f}s] {message}", flush=True)

    vae, text, unet = build_models()
    tokenizer = clip_tokenizer()
    vae.register_to_config(scaling_factor=train_vae(vae, vae_minutes, log))
    log(f"vae scaling factor {vae.config.scaling_factor:.4f}")
    train_diffusion(vae, text, unet, tokenizer, unet_minutes, log)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    pipe.save_pretrained(DEMO / "base-model")
    to_single_file(pipe, "sd1", DEMO / "base-model.safetensors")
    log("saved demo/base-model and demo/base-model.safetensors")


if __name__ == "__main__":
    write_dataset()
    if sys.argv[1:] != ["dataset"]:
        build_base()


# --- judging pictures by the drawing rules ---

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


def judge(image: Image.Image) -> dict:
    """What a picture shows, by the rules it was drawn with: the background is the colour of the border, the
    shape is what differs from it; a star is far from convex (solidity), a square fills its box, a circle ~79 %."""
    a = np.asarray(image.convert("RGB"), dtype=float)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    background = np.median(border, axis=0)
    mask = np.abs(a - background).sum(-1) > 90
    area = int(mask.sum())
    if area < 0.02 * mask.size:
        return {"shape": "none", "colour": "none", "solidity": 0.0, "spikes": 0, "area": area}
    ys, xs = np.nonzero(mask)
    solidity = area / max(_hull_area(np.stack([xs, ys], 1)), 1.0)
    fill = area / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))
    points = spikes(mask)
    if points >= 4 and solidity < 0.8:
        shape = "star"
    elif points >= 4:
        shape = "square" if fill > 0.9 else "circle" if fill > 0.68 else "triangle"
    else:
        shape = "square" if fill > 0.9 else "circle" if fill > 0.68 else "triangle"
    mean = a[mask].mean(0)
    colour = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - mean).sum())
    return {"shape": shape, "colour": colour, "solidity": round(float(solidity), 3), "spikes": points, "area": area}
