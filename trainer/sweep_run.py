"""The sweep worker (issue #16): `python -m trainer sweep SWEEP_DIR`, or a sweep made from a run config and trained.

    python -m trainer sweep SWEEP_DIR
        Train (or resume) the sweep in SWEEP_DIR: every unfinished trial continues where it stopped.
    python -m trainer sweep --config RUN_DIR_OR_TOML --runs-dir DIR [--name ID] [--grid key=v1,v2 ...]
                            [--range key=lo:hi[:log] ...] [--trials N] [--search grid|random|tpe] [--parallel K]
                            [--prune none|halving|median] [--seed S] [--set key=value ...] [--no-train]
        Make <runs-dir>/<id>/ (trainer/sweep.py) from the run config and the search space, print its path, train it.

Exit codes as a run's: 0 done (the ranked table is printed), 2 a bad setting (the message names the field),
3 cancelled (SIGINT/SIGTERM: every unfinished trial keeps a resumable state), 4 another worker holds the sweep.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from trainer import config, rundir, sweep, sweep_space
from trainer.config import ConfigError
from trainer.events import EventWriter
from trainer.setup import choose_components
from trainer.sweep_fused import Cursor, Group, Loaded, install, solo_reason, train_group, trial_run
from trainer.train import StopFlag, finish

log = logging.getLogger("trainer.sweep")


def train_sweep(folder: Path, stop: StopFlag) -> str:
    """Train every round of the sweep to its end; "done", or "cancelled" when `stop` was set."""
    folder = Path(folder)
    state = sweep.read(folder)
    study = sweep_space.study(folder, state["search"], state["space"], state["seed"], state["prune"])
    events = EventWriter(folder)
    loaded = None
    while True:
        todo = [t for t in state["trials"] if t["state"] not in sweep.FINAL]
        if not todo and len(state["trials"]) >= state["trials_wanted"]:
            break
        todo = todo or sweep.new_round(folder, state, study)
        loaded = loaded or load(folder, state, events)
        train_round(folder, state, study, todo, loaded, stop, events)
        if stop.requested:
            return "cancelled"
    events.emit("done", path=sweep.SWEEP_FILE)
    return "done"


def load(folder: Path, state: dict, events: EventWriter) -> Loaded:
    """The base, once for the whole sweep (latents and captions are cached into `Loaded.caches` by the first trial
    that needs them, and reused by every other)."""
    from trainer.setup import load_model, make_accelerator

    cfg = config.load(folder / state["base"])
    acc = make_accelerator(cfg)
    base, _, _ = load_model(cfg, acc, events)
    return Loaded(base, acc)


def train_round(folder: Path, state: dict, study, todo: list[dict], loaded: Loaded, stop, events) -> None:
    """The round's trials: those that can share a forward together, then each of the others alone, on one base."""
    locks = [rundir.RunDir(folder / t["name"]).acquire() for t in todo]
    cursors: list[Cursor] = []
    configs = [config.load(rundir.RunDir(folder / t["name"]).config) for t in todo]
    loaded.caches.release_text_encoders = not any(choose_components(c, loaded.base)[1] for c in configs)
    try:
        for t, cfg in zip(todo, configs):
            run_dir = rundir.RunDir(folder / t["name"])
            run_dir.clean_leftovers()
            run_dir.write_status(state="running", pid=os.getpid(), pgid=rundir.own_group(), message="")
            cursors.append(Cursor(t["name"], trial_run(cfg, run_dir.path, loaded)))
        judge = Judge(state, study)
        for members in groups(cursors, todo, events):
            group = Group(loaded.base.denoiser, loaded.acc, members)
            undo = install(loaded.base.denoiser, [c.run for c in members], group.plan)
            try:
                train_group(group, stop, judge)
            finally:
                undo()
            sweep.write(folder, state)  # the halving rungs so far
            if stop.requested:
                break
    finally:
        record(folder, state, study, todo, cursors)
        for lock in locks:
            lock.release()


def groups(cursors: list[Cursor], todo: list[dict], events) -> list[list[Cursor]]:
    """[the trials that share each forward] + [one trial] for each that cannot, with the reason in sweep.json."""
    shared, alone = [], []
    for c, t in zip(cursors, todo):
        t["why_alone"] = solo_reason(c.run.cfg)
        t["group"] = "alone" if t["why_alone"] else "shared"
        (alone if t["why_alone"] else shared).append(c)
    why = "; ".join(f"{t['name']}: {t['why_alone']}" for t in todo if t["why_alone"])
    events.status("training", f"{len(shared)} trial(s) share each forward of the base"
                  + (f"; {len(alone)} train one after another on it ({why})" if alone else ""))
    return ([shared] if shared else []) + [[c] for c in alone]


class Judge:
    """Early stopping after each fused step: reads each trial's new held-out loss and stops those behind."""

    def __init__(self, state: dict, study):
        self.prune, self.study = state["prune"], study
        self.halving = sweep.Halving(state["halving"])
        self.ids = {t["name"]: t["optuna_id"] for t in state["trials"]}
        self.seen: dict[str, int] = {}

    def __call__(self, cursors: list[Cursor]) -> None:
        for c in cursors:  # a trial the user stopped (the Sweeps tab): out, as a pruned one
            if c.state == "training" and rundir.RunDir(c.run.run_dir).stop_file.exists():
                self.stop(c, f"stopped at step {c.run.progress.step}, as asked")
        if self.prune == "none":
            return
        fresh = []
        for c in cursors:
            held = c.run.held_out
            if held is None or held.step is None or held.step == 0 or self.seen.get(c.name) == held.step:
                continue
            self.seen[c.name] = held.step
            fresh.append(c)
            self.halving.report(c.name, held.step, held.value)
            if self.prune == "median":
                self.trial(c).report(held.value, held.step)
        training = [c for c in cursors if c.state == "training"]
        if self.prune == "halving":
            losers = dict(self.halving.losers([c.name for c in training]))
        else:
            losers = {c.name: f"pruned at step {c.run.progress.step}: held-out loss above the median of the "
                              "finished trials" for c in training if c in fresh and self.trial(c).should_prune()}
        for c in training:
            if c.name in losers:
                self.stop(c, losers[c.name])

    @staticmethod
    def stop(c: Cursor, why: str) -> None:
        """The trial ends here as pruned: its file saved as it is, ranked by its last held-out loss."""
        c.state, c.message = "pruned", why
        c.run.events.status("pruned", why)
        finish(c.run)

    def trial(self, c: Cursor):
        import optuna

        return optuna.trial.Trial(self.study, self.ids[c.name])


def record(folder: Path, state: dict, study, todo: list[dict], cursors: list[Cursor]) -> None:
    """Each trial's state, held-out loss and status after a round (or a stop); Optuna is told the finished ones."""
    from optuna.trial import TrialState

    ended = {"done": "done", "pruned": "pruned", "failed": "failed"}
    for t, c in zip(todo, cursors):
        t["state"] = ended.get(c.state, "cancelled")
        t["value"], t["step"] = sweep.held_out(folder / t["name"])
        t["message"] = c.message
        run_state = {"pruned": "done", "cancelled": "cancelled"}.get(t["state"], t["state"])
        rundir.RunDir(folder / t["name"]).write_status(state=run_state, pid=None,
                                                       message=c.message or ("stopped; resumable"
                                                                             if run_state == "cancelled" else ""))
        if t["state"] == "done":
            study.tell(t["optuna_number"], t["value"])
        elif t["state"] in ("pruned", "failed"):
            study.tell(t["optuna_number"], state=TrialState.PRUNED if t["state"] == "pruned" else TrialState.FAIL)
    for t in todo[len(cursors):]:  # never opened (the round stopped while opening them)
        t["state"] = "cancelled"
        rundir.RunDir(folder / t["name"]).write_status(state="cancelled", pid=None, message="stopped; resumable")
    sweep.write(folder, state)


# --- the command line ---

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, nargs="?", help="a sweep folder holding sweep.json")
    p.add_argument("--config", type=Path, help="the base: a run directory or a run config TOML")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--name", help="sweep folder name (default: date-time-sweep)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2")
    p.add_argument("--range", dest="ranges", action="append", default=[], metavar="KEY=LO:HI[:log]")
    p.add_argument("--trials", type=int, default=0, help="trials of a random or tpe search")
    p.add_argument("--search", choices=sweep_space.SEARCHES, default=None,
                   help="grid (default with only --grid) | random | tpe (default with --range)")
    p.add_argument("--parallel", type=int, default=0, help="trials trained together per round (default: all)")
    p.add_argument("--prune", choices=sweep.PRUNERS, default="none")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-train", action="store_true", help="only make the sweep folder")
    args = p.parse_args(argv)
    if (args.folder is None) == (args.config is None):
        p.error("give a sweep folder, or --config with a search space (not both)")
    args.command = "sweep"
    return args


def cli(args: argparse.Namespace) -> int:
    if args.folder is None:
        try:
            space = dict(sweep_space.parse_grid(g) for g in args.grid) | dict(
                sweep_space.parse_range(r) for r in args.ranges)
            search = args.search or ("tpe" if args.ranges else "grid")
            args.folder = sweep.create(args.runs_dir, args.config, space, search, args.trials, args.parallel,
                                       args.prune, args.seed, args.overrides, args.name)
        except (ConfigError, FileExistsError) as e:
            print(f"python -m trainer sweep: {e}", file=sys.stderr)
            return 2
        print(args.folder, flush=True)
        if args.no_train:
            return 0
    if not (Path(args.folder) / sweep.SWEEP_FILE).is_file():
        print(f"{args.folder}: no {sweep.SWEEP_FILE} (make a sweep with --config ...)", file=sys.stderr)
        return 2
    return work(Path(args.folder))


def work(folder: Path) -> int:
    from trainer.__main__ import EXIT_CANCELLED, EXIT_LOCKED, install_signals, setup_logging, user_message

    try:
        lock = rundir.RunDir(folder).acquire()
    except rundir.RunLocked as e:
        print(f"python -m trainer sweep: {e}", file=sys.stderr)
        return EXIT_LOCKED
    setup_logging(folder)
    stop = StopFlag()
    install_signals(stop)
    try:
        ended = train_sweep(folder, stop)
    except Exception as e:
        log.error("the sweep failed:\n%s", traceback.format_exc())
        print(f"python -m trainer sweep: {user_message(e)}", file=sys.stderr)
        return 2 if isinstance(e, (ConfigError, rundir.RunLocked)) else 1
    finally:
        lock.release()
    print(sweep.table(sweep.read(folder)))
    if ended == "cancelled":
        print(f"{folder}: cancelled; `python -m trainer sweep {folder}` resumes every unfinished trial")
        return EXIT_CANCELLED
    return 0
