"""A sweep's search space: which config fields vary and how (issue #16), and the Optuna study that picks the trials.

    --grid key=v1,v2,...      a list: every combination of the lists is a trial (search "grid"); with "random" or
                              "tpe" a list is a categorical choice
    --range key=lo:hi[:log]   a range for "random" or "tpe" (integer fields draw integers; `log` draws on a log scale)

Optuna (https://optuna.org) draws the trials: GridSampler, RandomSampler, or TPESampler (Bergstra et al. 2011: a
Bayesian search that models good and bad regions from the trials told so far), all seeded, with its study in a
journal file in the sweep folder, so a resumed sweep continues the same study. Trials are asked in rounds of
`parallel`; TPE learns from each round's held-out losses before it asks the next.

Fields that change the base model, the data shapes or the held-out pictures cannot vary inside a sweep: the trials
share one loaded base, one set of cached latents and one held-out set. They are refused, naming the field.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from trainer import config
from trainer.config import ConfigError

SEARCHES = ("grid", "random", "tpe")
SHARED = "the trials share one loaded base"
REFUSED = {  # field -> why it cannot vary inside one sweep
    **{f: f"{SHARED}: make one sweep per base model setting" for f in (
        "pretrained_model_name_or_path", "prediction_type", "mixed_precision", "unet_quantization", "attention",
        "gradient_checkpointing")},
    **{f: f"the trials share the cached caption embeddings, which {f} changes: one sweep per {f}" for f in (
        "clip_skip", "max_token_length")},
    **{f: "the trials share one set of cached latents of one shape: one sweep per data setting" for f in (
        "train_data_dir", "resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_no_upscale",
        "caption_extension", "cache_latents", "cache_latents_to_disk", "cache_text_encoder_outputs")},
    **{f: "the trials are ranked on the same held-out pictures: set it in the base config" for f in (
        "validation_split", "validation_dir", "validation_every_n_steps")},
    "num_gpus": "a sweep trains its trials in one process",
}


def parse_grid(item: str) -> tuple[str, dict]:
    """"network_dim=4,8,16" -> ("network_dim", {"values": [4, 8, 16]})."""
    key, sep, raw = item.partition("=")
    if not sep or not raw.strip():
        raise ConfigError(item, f"{item!r}: expected a field and its values, key=v1,v2,...")
    key = field_name(key)
    values = [config._coerce(key, v.strip()) for v in raw.split(",") if v.strip()]
    return key, {"values": values}


def parse_range(item: str) -> tuple[str, dict]:
    """"learning_rate=1e-5:1e-3:log" -> ("learning_rate", {"low": 1e-05, "high": 0.001, "log": True})."""
    key, sep, raw = item.partition("=")
    parts = raw.split(":")
    if not sep or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
        raise ConfigError(item, f"{item!r}: a range is key=low:high or key=low:high:log")
    key = field_name(key)
    low, high = (config._coerce(key, p.strip()) for p in parts[:2])
    if not isinstance(low, (int, float)) or isinstance(low, bool):
        raise ConfigError(key, f"{key} is not a number: give it a list of values (a, b), not a range")
    if not low < high or (len(parts) == 3 and low <= 0):
        raise ConfigError(key, f"{key}={raw}: a range needs low < high (and low > 0 on a log scale)")
    return key, {"low": low, "high": high, "log": len(parts) == 3}


def field_name(key: str) -> str:
    name = key.strip().split(".")[-1]
    if name not in config.SECTION_OF:
        raise config._unknown(name)
    if name in REFUSED:
        raise ConfigError(f"{config.SECTION_OF[name]}.{name}", f"{config.SECTION_OF[name]}.{name} cannot vary in a "
                                                              f"sweep: {REFUSED[name]}")
    return name


def check(base: dict, space: dict, search: str, trials: int) -> int:
    """Validate the space against the base config (every value, each range's ends); returns the trial count."""
    if search not in SEARCHES:
        raise ConfigError("search", f"search = {search!r}: choose one of {', '.join(SEARCHES)}")
    if not space:
        raise ConfigError("space", "the search space is empty: give a field its values (key=v1,v2) or a range "
                                   "(key=low:high)")
    cfg = config.from_dict(base)
    if not (cfg.data.validation_split or cfg.data.validation_dir):
        raise ConfigError("data.validation_split", "a sweep ranks its trials by the held-out loss: set "
                                                   "data.validation_split (e.g. 0.2) or data.validation_dir")
    if cfg.model.unet_quantization == "fp8":
        raise ConfigError("model.unet_quantization", "model.unet_quantization = 'fp8': each trial's adapter is "
                                                     "injected into a copy sharing the base's weights, which the fp8 "
                                                     "casting would change under the others; sweep with \"none\"")
    if "seed" in space and cfg.data.validation_split:
        raise ConfigError("training.seed", "training.seed chooses the held-out pictures of data.validation_split, "
                                           "so trials of other seeds would be ranked on other pictures: vary the "
                                           "seed with data.validation_dir")
    for key in space:
        field_name(key)
    if "learning_rate" in space and cfg.optimizer.unet_lr and "unet_lr" not in space:
        raise ConfigError("optimizer.learning_rate", f"optimizer.learning_rate would change nothing: the base config "
                                                     f"sets optimizer.unet_lr = {cfg.optimizer.unet_lr}, which the "
                                                     "UNet trains at; vary unet_lr instead")
    for key, spec in space.items():
        for value in spec.get("values", [spec.get("low"), spec.get("high")]):
            config.from_dict(config.deep_merge(base, {key: value}))  # raises, naming the field
    if search == "grid":
        ranged = [k for k, s in space.items() if "values" not in s]
        if ranged:
            raise ConfigError(ranged[0], f"{ranged[0]}: a grid search takes lists of values; for a range, "
                                         "choose the random or tpe search")
        return math.prod(len(s["values"]) for s in space.values())
    if trials < 1:
        raise ConfigError("trials", f"a {search} search needs a number of trials, 1 or more")
    return trials


# --- Optuna ---

def study(folder: Path, search: str, space: dict, seed: int, pruner: str):
    """The sweep's Optuna study, created or loaded from its journal (minimising the held-out loss)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(Path(folder) / "optuna.journal")))
    pruners = {"median": optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)}
    return optuna.create_study(storage=storage, study_name="sweep", direction="minimize", load_if_exists=True,
                               sampler=optuna.samplers.RandomSampler(seed=seed),  # ask() sets each round's
                               pruner=pruners.get(pruner, optuna.pruners.NopPruner()))


def sampler(search: str, space: dict, seed: int):
    import optuna

    if search == "grid":
        return optuna.samplers.GridSampler({k: s["values"] for k, s in space.items()}, seed=seed)
    if search == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)


def ask(study, space: dict, search: str, seed: int, count: int) -> list:
    """`count` new Optuna trials with their parameters suggested; the sampler is seeded by `seed` (the round's; the
    sweep's own for a grid, whose order it shuffles), so a resumed sweep asks what the uninterrupted one would have."""
    import optuna

    study.sampler = sampler(search, space, seed)
    out = []
    for _ in range(count):
        trial = study.ask()
        for key, spec in space.items():
            suggest(trial, key, spec)
        out.append(trial)
    # the round's sampler only asks: GridSampler's after_trial calls study.stop() once the grid is used up, which
    # Optuna allows inside study.optimize only; told results are read by the next round's sampler from the storage
    study.sampler = optuna.samplers.RandomSampler(seed=seed)
    return out


def suggest(trial, key: str, spec: dict):
    if "values" in spec:
        return trial.suggest_categorical(key, spec["values"])
    if isinstance(spec["low"], int) and isinstance(spec["high"], int) and not isinstance(spec["low"], bool) and \
            config._field(key).type in (int, "int"):
        return trial.suggest_int(key, spec["low"], spec["high"], log=spec["log"])
    return trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=spec["log"])


def grid_points(space: dict) -> list[dict]:
    """Every combination of a grid, in order (for counting and for tests)."""
    keys = list(space)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k]["values"] for k in keys))]
