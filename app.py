"""Start the web app: `python app.py` serves it on http://127.0.0.1:7860."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
AUTH_ENV = "LORA_STUDIO_AUTH"
# A dataset zip may hold up to the importer's 4 GB of pictures (datasets_tools.dataset_folder.Limits.total_bytes);
# anything bigger would be refused after filling the disk with it.
MAX_UPLOAD = "4gb"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LoRA Studio: train Stable Diffusion LoRAs from your browser.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs", help="where training runs are kept")
    p.add_argument("--models-dir", type=Path, default=ROOT / "models", help="folder searched for base models")
    p.add_argument("--auth-file", type=Path, help="a file holding one USER:PASSWORD per line")
    p.add_argument("--auth", help=f"a file as --auth-file, or USER:PASSWORD (visible in `ps`: prefer --auth-file "
                                  f"or the {AUTH_ENV} environment variable)")
    p.add_argument("--allowed-hosts", default="", help="more names the app may be reached by, comma-separated "
                                                       "(Host headers; loopback and --host are always allowed)")
    p.add_argument("--max-upload", default=MAX_UPLOAD, help=f"largest file one upload may be (default {MAX_UPLOAD})")
    p.add_argument("--login-failures", type=int, default=5,
                   help="failed logins a client may make before each further one locks it out for longer")
    p.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    return p.parse_args(argv)


def auth_lines(args: argparse.Namespace, environ=os.environ) -> list[str]:
    """USER:PASSWORD lines from --auth-file, --auth (a file, or a pair on the command line) and $LORA_STUDIO_AUTH."""
    on_command_line = bool(args.auth) and not Path(args.auth).is_file()
    files = [args.auth_file] if args.auth_file else []
    if args.auth and not on_command_line:
        files.append(Path(args.auth))
    if missing := [str(p) for p in files if not p.is_file()]:
        sys.exit(f"--auth-file {missing[0]}: no such file")
    lines = [line for p in files for line in p.read_text().splitlines()]
    if on_command_line:
        print(f"Warning: --auth USER:PASSWORD puts the password where every user of this machine sees it (`ps`); "
              f"use --auth-file FILE or {AUTH_ENV}=USER:PASSWORD instead.", file=sys.stderr, flush=True)
        lines.append(args.auth)
    return lines + environ.get(AUTH_ENV, "").splitlines()


def read_auth(args: argparse.Namespace, environ=os.environ) -> list[tuple[str, str]] | None:
    pairs = [tuple(line.strip().split(":", 1)) for line in auth_lines(args, environ) if line.strip()]
    if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        sys.exit("--auth: expected USER:PASSWORD (or a file with one USER:PASSWORD per line)")
    return pairs or None


def check_exposure(args: argparse.Namespace, auth) -> None:
    """Anyone who can reach the app can run code on this GPU's machine: never expose it without a password."""
    if (args.share or args.host not in LOCAL_HOSTS) and not auth:
        where = "a public gradio.live link" if args.share else f"{args.host} (reachable from other machines)"
        sys.exit(f"Refusing to serve on {where} without --auth-file FILE (or {AUTH_ENV}=USER:PASSWORD): anyone "
                 "who reaches the app can start jobs on this machine.")


def guard(args: argparse.Namespace):
    """The request checks of ui.security in front of Gradio: Host, Origin, API routes, failed logins."""
    from starlette.middleware import Middleware

    from ui import security

    hosts = security.allowed_hosts(args.host, args.allowed_hosts.split(","))
    return Middleware(security.Guard, hosts=hosts, host_suffixes=(".gradio.live",) if args.share else (),
                      throttle=security.LoginThrottle(free=args.login_failures))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    auth = read_auth(args)
    check_exposure(args, auth)
    from ui.app import CSS, KEEP_TYPED, build_app

    demo = build_app(runs_dir=args.runs_dir, models_dir=args.models_dir)
    runs = args.runs_dir.resolve()
    print(f"LoRA Studio: open http://{'127.0.0.1' if args.host in LOCAL_HOSTS else args.host}:{args.port}", flush=True)
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth, css=CSS,
                        js=KEEP_TYPED, show_error=True, inbrowser=False, allowed_paths=[str(runs)],
                        blocked_paths=[str(runs / ".browser-secret")], max_file_size=args.max_upload,
                        app_kwargs={"middleware": [guard(args)]})


if __name__ == "__main__":
    main()
