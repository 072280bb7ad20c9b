"""Start the web app: `python app.py` serves it on http://127.0.0.1:7860."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LoRA Studio: train Stable Diffusion LoRAs from your browser.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs", help="where training runs are kept")
    p.add_argument("--models-dir", type=Path, default=ROOT / "models", help="folder searched for base models")
    p.add_argument("--auth", help="USER:PASSWORD, or a file holding one USER:PASSWORD per line")
    p.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    return p.parse_args(argv)


def read_auth(value: str | None) -> list[tuple[str, str]] | None:
    if not value:
        return None
    lines = Path(value).read_text().splitlines() if Path(value).is_file() else [value]
    pairs = [tuple(line.strip().split(":", 1)) for line in lines if line.strip()]
    if not pairs or any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        sys.exit("--auth: expected USER:PASSWORD (or a file with one USER:PASSWORD per line)")
    return pairs


def check_exposure(args: argparse.Namespace, auth) -> None:
    """Anyone who can reach the app can run code on this GPU's machine: never expose it without a password."""
    if (args.share or args.host not in LOCAL_HOSTS) and not auth:
        where = "a public gradio.live link" if args.share else f"{args.host} (reachable from other machines)"
        sys.exit(f"Refusing to serve on {where} without --auth USER:PASSWORD: anyone who reaches the app "
                 "can start jobs on this machine.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    auth = read_auth(args.auth)
    check_exposure(args, auth)
    from ui.app import build_app

    demo = build_app(runs_dir=args.runs_dir, models_dir=args.models_dir)
    print(f"LoRA Studio: open http://{'127.0.0.1' if args.host in LOCAL_HOSTS else args.host}:{args.port}", flush=True)
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                        show_error=True, inbrowser=False, allowed_paths=[str(args.runs_dir.resolve())])


if __name__ == "__main__":
    main()
