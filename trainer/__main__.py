"""The training worker's command line.

    python -m trainer RUN_DIR [--set key=value ...]
        Train the run whose config.toml is in RUN_DIR, resuming from its newest state if it has one.
    python -m trainer new --base MODEL --images DIR --preset NAME --runs-dir DIR [--set key=value ...] [--no-train]
                          [--kohya TOML] [--clip-l FILE] [--clip-g FILE] [--t5xxl FILE] [--vae/--ae FILE]
                          [--t5-tokenizer DIR]
        Make a run directory from a base model, a folder of images (with optional .txt/.caption captions), a
        preset and overrides; the pictures are imported as the Dataset tab imports them (skipped files and health
        warnings printed); print its path; then train it. --kohya takes a kohya sd-scripts training TOML's settings
        over the preset's. An SD 3.5 / FLUX.1 transformer file as --base takes its
        other parts (ComfyUI's split layout) as --clip-l, --clip-g (SD 3.5), --t5xxl and --vae (or --ae).
    python -m trainer resize SRC DST [--rank N] [--energy F] [--drop F] [--precision fp16|bf16|float]
        Shrink a kohya LoRA/LoCon file: cut each module to rank N and/or to the smallest rank keeping a fraction F
        of its energy (Σσ²), drop the fraction F of modules whose update is smallest; print a summary.
    python -m trainer compare FOLDER
    python -m trainer compare --base MODEL --files F [F ...] --prompts P [P ...] --out FOLDER [--labels L ...]
                              [--strengths 0,0.5,1] [--seeds 1,2] [--steps N] [--sampler S] [--cfg-scale X]
                              [--width W --height H] [--negative TEXT] [--clip-skip N] [--precision fp32|fp16|bf16]
                              [--clip-l FILE] [--clip-g FILE] [--t5xxl FILE] [--vae/--ae FILE] [--t5-tokenizer DIR]
        Draw LoRA files × strengths × prompts × seeds on one loaded base (trainer.compare): the cells, then
        FOLDER/grid.png. The first form runs FOLDER/compare.json; the second writes it, then runs it. A file that
        does not fit the base is skipped with its problem named; none fitting exits 2, as a bad setting does.
        SD 3.5 / FLUX.1: --sampler euler, and a transformer file as --base takes its split layout's other files.
    python -m trainer sweep SWEEP_DIR
    python -m trainer sweep --config RUN --runs-dir DIR [--grid key=v1,v2 ...] [--range key=lo:hi[:log] ...]
                            [--trials N] [--search grid|random|tpe] [--parallel K] [--prune none|halving|median]
        Train several trials of one run config on one loaded base, ranked by held-out loss (trainer/sweep.py); the
        second form makes the sweep folder first. Exits 0/2/3/4 as a run does.

Several GPUs: `accelerate launch --multi_gpu --num_processes N -m trainer RUN_DIR`.
Cancel: SIGINT or SIGTERM saves a resumable state and exits (code 3); a second signal ends it at once. A compare
stops after the cell it is drawing, keeping the cells drawn (code 3).
One worker per run: the worker holds RUN_DIR/worker.lock while it lives; a second one refuses (code 4).
A full disk stops the run with a message saying what is intact (code 5); it resumes when there is space.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

EXIT_CANCELLED = 3
EXIT_LOCKED = 4
EXIT_DISK_FULL = 5


def parse(argv: list[str]) -> argparse.Namespace:
    if argv and argv[0] == "new":
        p = argparse.ArgumentParser(prog="python -m trainer new", description="Make a run directory and train it.")
        p.add_argument("--base", required=True, help="diffusers folder, .safetensors/.ckpt file, hub id, or 'demo'")
        p.add_argument("--images", required=True, type=Path, help="folder of images with optional .txt/.caption captions")
        p.add_argument("--preset", required=True, help="character, style, scene or lokr")
        p.add_argument("--runs-dir", type=Path, default=Path("runs"))
        p.add_argument("--name", help="run folder name (default: date-time and preset)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--no-train", action="store_true", help="only make the run directory")
        p.add_argument("--kohya", type=Path, metavar="TOML", help="a kohya sd-scripts training TOML: its settings "
                       "over the preset's (--set wins); what has no effect here is printed")
        add_part_arguments(p)
        args = p.parse_args(argv[1:])
        args.command = "new"
        return args
    if argv and argv[0] == "resize":
        return parse_resize(argv[1:])
    if argv and argv[0] == "compare":
        return parse_compare(argv[1:])
    if argv and argv[0] == "sweep":
        from trainer.sweep_run import parse_args

        return parse_args(argv[1:])
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a run directory holding config.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    args.command = "train"
    return args


def add_part_arguments(p: argparse.ArgumentParser) -> None:
    """The split layout of SD 3.5 / FLUX.1 (--base the transformer file), named as kohya's sd-scripts names them;
    each sets the [model] field of the same name (trainer/config.py)."""
    from trainer.config import field_help

    g = p.add_argument_group("SD 3.5 / FLUX.1 split layout (with --base a transformer file)")
    for flags, name in ((("--clip-l", "--clip_l"), "clip_l"), (("--clip-g", "--clip_g"), "clip_g"),
                        (("--t5xxl",), "t5xxl"), (("--vae", "--ae"), "vae"),
                        (("--t5-tokenizer", "--t5_tokenizer"), "t5_tokenizer")):
        g.add_argument(*flags, dest=name, type=Path, metavar="FILE", help=field_help(name)["help"])


def part_overrides(args: argparse.Namespace) -> list[str]:
    """--clip-l FILE ... as `model.clip_l="/abs/FILE"` overrides (absolute: the run may resume from elsewhere)."""
    from trainer.config import PART_FIELDS

    given = {name: getattr(args, name) for name in PART_FIELDS if getattr(args, name, None) is not None}
    return [f"{name}={json.dumps(os.path.abspath(path.expanduser()))}" for name, path in given.items()]


def parse_resize(argv: list[str]) -> argparse.Namespace:
    from trainer.resize import ResizeError, check_args

    p = argparse.ArgumentParser(prog="python -m trainer resize", description="Shrink a kohya LoRA/LoCon file.")
    p.add_argument("src", type=Path, help="a kohya LoRA/LoCon .safetensors file")
    p.add_argument("dst", type=Path, help="where to write the reduced file")
    p.add_argument("--rank", type=int, help="new rank of every module (a cap, with --energy)")
    p.add_argument("--energy", type=float, help="keep the smallest rank holding this fraction of Σσ², in (0, 1]")
    p.add_argument("--drop", type=float, default=0.0,
                   help="fraction of modules to remove, least ‖ΔW‖ first, [0, 1)")
    p.add_argument("--precision", choices=["fp16", "bf16", "float"], default="fp16")
    args = p.parse_args(argv)
    try:
        check_args(args.rank, args.energy, args.drop)
    except ResizeError as e:
        p.error(str(e))  # exits 2
    args.command = "resize"
    return args


def resize(args: argparse.Namespace) -> int:
    from trainer.resize import ResizeError, resize_file, summary

    try:
        report = resize_file(args.src, args.dst, args.rank, args.energy, args.drop, args.precision)
    except ResizeError as e:
        print(f"python -m trainer resize: {e}", file=sys.stderr)
        return 2
    print(summary(report, args.src, args.dst))
    return 0


def parse_compare(argv: list[str]) -> argparse.Namespace:
    """Either FOLDER (holding compare.json), or the settings and --out FOLDER, where compare.json is written."""
    from trainer.compare_spec import CompareError, checked
    from trainer.config import PART_FIELDS

    p = argparse.ArgumentParser(prog="python -m trainer compare",
                                description="Compare LoRA files × strengths × prompts × seeds on one loaded base.")
    p.add_argument("folder", type=Path, nargs="?", help="a compare folder holding compare.json")
    p.add_argument("--base", help="the base model: diffusers folder, checkpoint file, hub id or 'demo'")
    p.add_argument("--files", nargs="+", type=Path, help="kohya LoRA/LyCORIS .safetensors files, one row each")
    p.add_argument("--labels", nargs="+", help="one per file (default: the file names)")
    p.add_argument("--strengths", help="comma-separated, each in [-2, 2]; 0 is the base (default 0,0.5,0.75,1)")
    p.add_argument("--prompts", nargs="+")
    p.add_argument("--seeds", help="comma-separated (default 1234)")
    p.add_argument("--steps", type=int)
    p.add_argument("--sampler")
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--negative")
    p.add_argument("--clip-skip", type=int)
    p.add_argument("--precision")
    p.add_argument("--out", type=Path, help="the folder to write compare.json, the cells and grid.png into")
    add_part_arguments(p)
    args = p.parse_args(argv)
    args.command = "compare"
    if (args.folder is None) == (args.out is None):
        p.error("give a compare FOLDER, or the settings with --out FOLDER")  # exits 2
    if args.folder is not None:
        return args
    if (args.out / "events.jsonl").exists():
        p.error(f"{args.out} already holds a compare: choose a new folder")
    settings = {"base": args.base, "files": [str(f.resolve()) for f in args.files or []], "labels": args.labels,
                "prompts": args.prompts} | {k: getattr(args, k) for k in (
                    "strengths", "seeds", "steps", "sampler", "cfg_scale", "width", "height", "negative",
                    "clip_skip", "precision")}
    settings["parts"] = {name: os.path.abspath(getattr(args, name).expanduser()) for name in PART_FIELDS
                         if getattr(args, name, None) is not None}  # the split layout's files, stored absolute
    try:
        args.spec = checked(settings)
    except CompareError as e:
        p.error(str(e))
    args.folder = args.out
    return args


def compare(args: argparse.Namespace) -> int:
    """Run a compare (writing its compare.json first in the --out form); record a failure as the worker records
    its end: an error event, status.json failed, the message on stderr."""
    from trainer.compare import compare as run_compare
    from trainer.compare_spec import SPEC_FILE, CompareError
    from trainer.events import EventWriter
    from trainer.rundir import RunDir
    from trainer.single_file import CheckpointError
    from trainer.train import StopFlag

    folder = args.folder
    if getattr(args, "spec", None) is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SPEC_FILE).write_text(json.dumps(args.spec, indent=1), encoding="utf-8")
    if not (folder / SPEC_FILE).is_file():
        print(f"{folder}: no {SPEC_FILE} (write one, or give the settings with --out)", file=sys.stderr)
        return 2
    setup_logging(folder)
    stop = StopFlag()
    install_signals(stop)
    try:
        ended = run_compare(folder, stop)
    except Exception as e:
        logging.getLogger("trainer").error("compare failed:\n%s", traceback.format_exc())
        message = user_message(e)
        quietly(EventWriter(folder).emit)("error", message=message)
        quietly(RunDir(folder).write_status)(state="failed", message=message, pid=None)
        print(f"python -m trainer compare: {message}", file=sys.stderr)
        return 2 if isinstance(e, (CompareError, CheckpointError)) else 1
    print(folder / "grid.png" if ended == "done" else f"{folder}: cancelled")
    return EXIT_CANCELLED if ended == "cancelled" else 0


HARMLESS = ("requires torchvision (not installed)",  # transformers: the PIL image processors serve (no torchvision)
            "that should be kept in float32: [].")  # diffusers: a model with no such module, cast as asked


def harmless(record: logging.LogRecord) -> bool:
    """False for a library warning that says nothing a user can act on here (the log is shown in the Monitor)."""
    return not any(text in record.getMessage() for text in HARMLESS)


def quiet_libraries() -> None:
    """Leave the HARMLESS warnings out of what transformers and diffusers print (each has a handler of its own);
    before anything imports their models, which is when the first of them come."""
    import diffusers.utils.logging
    import transformers.utils.logging

    for library in (transformers.utils.logging, diffusers.utils.logging):
        library.get_logger()  # makes the library's handler
        for handler in logging.getLogger(library.__name__.split(".")[0]).handlers:
            handler.addFilter(harmless)


def setup_logging(run_dir: Path) -> None:
    handler = logging.FileHandler(run_dir / "worker.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler, logging.StreamHandler()], force=True)
    logging.captureWarnings(True)
    for h in logging.getLogger().handlers:
        h.addFilter(harmless)


def install_signals(stop) -> None:
    def handler(signum, frame):
        if stop.requested:  # the second signal: end now
            logging.getLogger("trainer").warning("second %s: exiting at once", signal.Signals(signum).name)
            os._exit(128 + signum)
        stop.requested = True
        logging.getLogger("trainer").info("%s: stopping at the next safe point", signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def run(run_dir: Path, overrides: list[str]) -> int:
    """Train the run, holding its lock throughout: a second worker on the same run refuses (exit 4)."""
    from trainer import config
    from trainer.events import EventWriter
    from trainer.guards import DiskFull, disk_full, full_message
    from trainer.rundir import RunDir, RunLocked, own_group
    from trainer.train import StopFlag, train

    run_dir = RunDir(run_dir)
    main_process = int(os.environ.get("RANK", "0")) == 0
    try:
        lock = run_dir.acquire() if main_process else None
    except RunLocked as e:
        print(f"python -m trainer: {e}", file=sys.stderr)
        return EXIT_LOCKED
    setup_logging(run_dir.path)
    if main_process:
        for path in run_dir.clean_leftovers():
            logging.getLogger("trainer").info("removed %s, left by a worker that stopped mid-save", path.name)
    stop = StopFlag()
    install_signals(stop)
    events = EventWriter(run_dir.path, enabled=main_process)
    record = quietly(run_dir.write_status) if main_process else (lambda **fields: None)
    record(state="running", pid=os.getpid(), pgid=own_group(), message="", started=time.time(), refused=False)
    try:
        cfg = config.load(run_dir.config, overrides)
        final = train(cfg, run_dir.path, stop)
        if final is None:
            record(state="cancelled", message="stopped; resumable", pid=None)
            return EXIT_CANCELLED
        record(state="done", message="", pid=None)
    except Exception as e:
        logging.getLogger("trainer").error("training failed:\n%s", traceback.format_exc())
        if not isinstance(e, DiskFull) and disk_full(e, run_dir.path):  # outside a save: the event log, a sample
            e = DiskFull(full_message(Path(e.filename).name if getattr(e, "filename", None) else "a file",
                                      run_dir.path))
        message = user_message(e)
        quietly(events.emit)("error", message=message)  # on a full disk these may fail too: the exit code tells
        record(state="failed", message=message, pid=None, refused=refused(e))
        print(f"python -m trainer: {message}", file=sys.stderr)
        return EXIT_DISK_FULL if isinstance(e, DiskFull) else 1
    finally:
        if lock is not None:
            lock.release()
    print(final)
    return 0


def quietly(write):
    """`write`, but an OSError (a full disk) is logged instead of raised: the worker must still end cleanly."""
    def call(*args, **kwargs):
        try:
            return write(*args, **kwargs)
        except OSError as e:
            logging.getLogger("trainer").error("could not record %s: %s", args or kwargs, e)
    return call


def refused(e: Exception) -> bool:
    """A run that failed on its settings or its pictures: training it again from its folder fails the same way."""
    from trainer.config import ConfigError
    from trainer.data import DatasetError

    return isinstance(e, (ConfigError, DatasetError))


def user_message(e: Exception) -> str:
    from trainer.checkpoint import StateError
    from trainer.compare_spec import CompareError
    from trainer.config import ConfigError
    from trainer.loss import TrainingError
    from trainer.optim import OptimizerUnavailable
    from trainer.quantize import QuantizationUnavailable
    from trainer.single_file import CheckpointError

    if isinstance(e, (ConfigError, TrainingError, CheckpointError, OptimizerUnavailable, QuantizationUnavailable,
                      StateError, CompareError)):
        return str(e)
    if "out of memory" in str(e).lower():
        return ("The GPU ran out of memory. Lower train_batch_size or resolution, turn on gradient_checkpointing, "
                "or use cache_latents. Details are in worker.log.")
    return f"{type(e).__name__}: {e} (the full traceback is in the run's worker.log, listed with its files)"


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    quiet_libraries()
    if args.command == "resize":
        return resize(args)
    if args.command == "compare":
        return compare(args)
    if args.command == "sweep":
        from trainer.sweep_run import cli

        return cli(args)
    if args.command == "new":
        from trainer.config import ConfigError
        from trainer.new_run import create_run

        try:
            run_dir = create_run(args.runs_dir, args.base, args.images, args.preset,
                                 part_overrides(args) + args.overrides, args.name, kohya=args.kohya).path
        except ConfigError as e:  # a bad setting, named by field: no run is made
            print(f"python -m trainer new: {e}", file=sys.stderr)
            return 2
        print(run_dir, flush=True)
        return 0 if args.no_train else run(run_dir, [])
    if not (args.run_dir / "config.toml").is_file():
        print(f"{args.run_dir}: no config.toml (make a run with `python -m trainer new ...`)", file=sys.stderr)
        return 2
    return run(args.run_dir, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
