"""Sweeps (issue #16): trials of one base run config over a search space, trained together on one loaded base and
ranked by their held-out loss.

    <runs_dir>/<sweep id>/
        sweep.json       the space, the search, every trial (its params, state, group, held-out loss), the ranking
                         and `best`: the best finished trial's config.toml, ready to start as a full run
        base.toml        the base run config every trial starts from
        optuna.journal   Optuna's study (trainer/sweep_space.py): what was asked and told; a resumed sweep continues it
        events.jsonl     the sweep worker's own events: loading, caching, which trials share a forward and why not
        worker.log       its log; worker.lock is held while a worker trains the sweep (a second one refuses)
        trial-000/ ...   ordinary run directories (trainer.rundir): config.toml = base + the trial's params,
                         events.jsonl, samples/, output/, state/, status.json. The pictures stay where the base
                         config's train_data_dir says. `python -m trainer <sweep>/trial-000` trains one alone.

One worker loads the base and caches latents and caption embeddings once, then trains each round of trials
(trainer/sweep_fused.py): those that can share a forward together, the others one after another on the same base.
Ranking: the final held-out loss, lowest first; pruned trials after the finished ones (theirs is from an earlier
step). Early stopping (`prune`): "halving" is successive halving at the held-out checkpoints, taken
synchronously over the trials training together (`Halving`); "median" is Optuna's MedianPruner, which compares a
trial with the finished trials at the same step, so it acts from the second round on.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from trainer import config, rundir, sweep_space
from trainer.config import ConfigError
from trainer.events import read_all

SWEEP_FILE = "sweep.json"
PRUNERS = ("none", "halving", "median")
FINAL = {"done", "pruned", "failed"}
ETA = 2  # successive halving keeps the best 1/ETA at each rung
log = logging.getLogger("trainer.sweep")


# --- the sweep folder ---

def read(folder: Path) -> dict:
    return json.loads((Path(folder) / SWEEP_FILE).read_text(encoding="utf-8"))


def write(folder: Path, sweep: dict) -> None:
    """sweep.json written whole (a reader never sees half of it), with the ranking as it stands."""
    sweep["ranking"] = ranking(sweep)
    done = [r for r in sweep["ranking"] if r["state"] == "done"]
    sweep["best"] = f"{done[0]['name']}/config.toml" if done else None  # ready to start as a full run
    tmp = Path(folder) / f".{SWEEP_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(sweep, indent=1), encoding="utf-8")
    os.replace(tmp, Path(folder) / SWEEP_FILE)


def base_config(source: Path, overrides: list[str]) -> dict:
    """A run's config (its folder or a TOML file) with overrides, as a dict whose folders are absolute."""
    source = Path(source)
    cfg = config.load(source / "config.toml" if source.is_dir() else source, overrides)
    d = config.to_dict(cfg)
    for key in ("train_data_dir", "validation_dir"):
        if d["data"][key]:
            d["data"][key] = str(Path(d["data"][key]).expanduser().resolve())
    return d


def create(runs_dir: Path, source: Path, space: dict, search: str, trials: int = 0, parallel: int = 0,
           prune: str = "none", seed: int = 0, overrides: list[str] = (), name: str | None = None) -> Path:
    """A new sweep folder (no trial is trained yet); every error names the field."""
    base = base_config(source, list(overrides))
    wanted = sweep_space.check(base, space, search, trials)
    if prune not in PRUNERS:
        raise ConfigError("prune", f"prune = {prune!r}: choose one of {', '.join(PRUNERS)}")
    folder = Path(runs_dir) / (name or rundir.new_id(runs_dir, "sweep"))
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; choose another name")
    folder.mkdir(parents=True)
    config.save(config.from_dict(base), folder / "base.toml")
    sweep = {"version": 1, "id": folder.name, "base": "base.toml", "space": space, "search": search,
             "trials_wanted": wanted, "parallel": max(1, min(parallel or wanted, wanted)), "prune": prune,
             "seed": seed, "trials": [], "halving": {"min_step": None, "rungs": {}, "steps": {}, "judged": []}}
    write(folder, sweep)
    return folder


def new_round(folder: Path, sweep: dict, study) -> list[dict]:
    """Ask Optuna for the next round of trials and make their run directories."""
    count = min(sweep["parallel"], sweep["trials_wanted"] - len(sweep["trials"]))
    rnd = max((t["round"] for t in sweep["trials"]), default=-1) + 1
    base = config.to_dict(config.load(folder / sweep["base"]))
    made = []
    seed = sweep["seed"] + (0 if sweep["search"] == "grid" else rnd)  # a grid is shuffled by it: one order for all
    for trial in sweep_space.ask(study, sweep["space"], sweep["search"], seed, count):
        name = f"trial-{len(sweep['trials']):03d}"
        cfg = config.from_dict(config.deep_merge(base, trial.params))
        run = rundir.RunDir(folder / name)
        run.path.mkdir()
        config.save(cfg, run.config)
        run.write_status(state="created", message=f"trial of sweep {sweep['id']}")
        entry = {"name": name, "round": rnd, "params": trial.params, "optuna_number": trial.number,
                 "optuna_id": trial._trial_id, "state": "created", "value": None, "step": None, "group": "",
                 "why_alone": "", "message": ""}
        sweep["trials"].append(entry)
        made.append(entry)
    write(folder, sweep)
    return made


# --- ranking ---

def held_out(run_dir: Path) -> tuple[float | None, int | None]:
    """(the last held-out loss, its step) of a trial, from its events."""
    found = [e for e in read_all(run_dir) if e["type"] == "validation"]
    return (found[-1]["loss"], found[-1]["step"]) if found else (None, None)


def ranking(sweep: dict) -> list[dict]:
    """Trials with a held-out loss, lowest first: the finished ones, then the pruned ones, those that lasted longest
    first (their losses are from earlier steps)."""
    scored = [t for t in sweep["trials"] if t["value"] is not None and t["state"] in ("done", "pruned")]
    scored.sort(key=lambda t: (t["state"] != "done", -t["step"], t["value"]))
    return [{"rank": i + 1, "name": t["name"], "state": t["state"], "value": t["value"], "step": t["step"],
             "params": t["params"]} for i, t in enumerate(scored)]


def table(sweep: dict) -> str:
    rows = [f"{'rank':>4}  {'trial':<10} {'state':<9} {'held-out':>10} {'step':>6}  params"]
    ranked = {r["name"]: r["rank"] for r in sweep["ranking"]}
    for t in sorted(sweep["trials"], key=lambda t: (ranked.get(t["name"], math.inf), t["name"])):
        value = f"{t['value']:.6f}" if t["value"] is not None else "-"
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())
        note = f"  ({t['message']})" if t["message"] else ""
        rows.append(f"{ranked.get(t['name'], '-'):>4}  {t['name']:<10} {t['state']:<9} {value:>10} "
                    f"{t['step'] if t['step'] is not None else '-':>6}  {params}{note}")
    return "\n".join(rows)


# --- early stopping ---

class Halving:
    """Successive halving (Jamieson & Talwalkar 2016; Li et al.'s ASHA, which Optuna's SuccessiveHalvingPruner
    implements) at the held-out checkpoints. Rung r is a trial's first held-out loss at or after min_step·ETA^r
    steps (min_step: the sweep's first checkpoint after step 0). A trial is judged at a rung once every trial
    training beside it has reached the rung: it stops unless its loss is among the best ⌈n/ETA⌉ of the n trials
    (of every round) that reached it. Its state lives in sweep.json, so a resumed sweep judges the same way; `steps`
    keeps the step each rung's loss was measured at, for the message (a sweep made before it says the rung's step)."""

    def __init__(self, state: dict):
        self.state = state

    def report(self, name: str, step: int, value: float) -> None:
        if step <= 0:
            return
        st = self.state
        st["min_step"] = st["min_step"] or step
        r = 0
        while st["min_step"] * ETA ** r <= step:
            st["rungs"].setdefault(str(r), {}).setdefault(name, value)
            st.setdefault("steps", {}).setdefault(f"{name}@{r}", step)
            r += 1

    def losers(self, training: list[str]) -> list[tuple[str, str]]:
        """(trial, why) for the trials that stop now."""
        out = []
        for r, values in sorted(self.state["rungs"].items(), key=lambda kv: int(kv[0])):
            if not all(n in values for n in training):
                break
            keep = sorted(values, key=values.get)[: math.ceil(len(values) / ETA)]
            for n in training:
                if f"{n}@{r}" not in self.state["judged"]:
                    self.state["judged"].append(f"{n}@{r}")
                    if n not in keep and n not in (x for x, _ in out):
                        step = self.state.get("steps", {}).get(f"{n}@{r}", self.state["min_step"] * ETA ** int(r))
                        out.append((n, f"pruned at step {step}: held-out {values[n]:.4g}, not in the best "
                                       f"{len(keep)} of {len(values)}"))
        return out
