"""The ``unetseg`` command: serve, predict, segment, train, evaluate.

``train`` and ``evaluate`` run the training module, which does not need the web stack.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

# How long an idle OpenMP thread of torch's spins before it sleeps, in libgomp's spins (about 100,000 a
# millisecond, by its own estimate): about 0.1 ms. Long enough to span the gaps between one forward pass's
# operations (sleeping at once, OMP_WAIT_POLICY=PASSIVE, made polyp's forward pass on two threads 25% slower
# on a 2-core VM: 95-100 ms against 77-79), short enough that a thread left with no work soon gives its core
# to decoding, encoding and the other processes (libgomp's default, 300,000, took a near-free model's
# requests from about 8 to over 100 CPU-ms each on 2 busy cores).
OMP_SPINCOUNT = "10000"


def omp_wait_defaults() -> None:
    """Set ``GOMP_SPINCOUNT`` unless the environment chose a wait policy itself; before torch is imported
    (libgomp reads it once, when it is loaded)."""
    import os

    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = OMP_SPINCOUNT


def serve(argv: Sequence[str]) -> int:
    omp_wait_defaults()
    from app.config import load_settings
    from app.logs import configure_logging
    from app.main import create_app
    from app.serving import bind

    defaults = load_settings()
    p = argparse.ArgumentParser(prog="unetseg serve", description="Run the HTTP service (settings: UNETSEG_*).")
    p.add_argument("--host", default=defaults.host)
    p.add_argument("--port", type=int, default=defaults.port)
    p.add_argument("--weights-dir", type=Path, help="overrides UNETSEG_WEIGHTS_DIR")
    p.add_argument("--data-dir", type=Path, help="overrides UNETSEG_DATA_DIR")
    p.add_argument("--device", help="overrides UNETSEG_DEVICE")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help="HTTP front-end processes sharing one engine process (default UNETSEG_WORKERS; 0: one per two cores "
        "on a CUDA host, at most 8; 1: one process)",
    )
    p.add_argument("--ray", action="store_true", help="serve as a Ray Serve application (needs the ray extra)")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: HTTP front-end replicas (1 CPU each)")
    p.add_argument(
        "--engines", type=int, default=0, help="with --ray: engine replicas (0, the default: one per GPU, or 1)"
    )
    p.add_argument(
        "--gpus-per-engine", type=float, help="with --ray: GPUs (or a fraction) per engine (default: 1 if it has GPUs)"
    )
    p.add_argument("--cpus-per-replica", type=float, default=1, help="with --ray: CPUs reserved per replica")
    p.add_argument("--ray-address", help="with --ray: join this cluster (default: RAY_ADDRESS, else start one)")
    args = p.parse_args(argv)
    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "weights_dir": args.weights_dir,
            "data_dir": args.data_dir,
            "device": args.device,
        }.items()
        if v is not None
    }
    settings = defaults.model_copy(update=overrides)
    # One line per request, written by the app's middleware in UNETSEG_LOG_FORMAT: uvicorn's own access
    # log is off and its other records go through the same handler.
    configure_logging(settings.log_format, settings.log_level)
    if args.ray:
        if args.replicas < 1 or args.engines < 0 or (args.gpus_per_engine or 0) < 0:
            p.error("--replicas must be at least 1, --engines and --gpus-per-engine at least 0")
        try:
            from app.ray.launch import run
        except ImportError as exc:
            print(f"unetseg serve --ray needs the ray extra (pip install -e '.[ray]'): {exc}", file=sys.stderr)
            return 2
        return run(
            settings,
            args.replicas,
            args.engines,
            args.gpus_per_engine,
            address=args.ray_address,
            cpus_per_replica=args.cpus_per_replica,
            grace_s=args.grace,
        )
    if args.workers < 0:
        p.error("--workers must be at least 0")
    workers = args.workers
    if workers == 0:
        from app.procs.supervisor import default_workers

        workers = default_workers()
    try:  # before anything loads: a port in use is said at once, not after the models are warm
        sock = bind(settings.host, settings.port, reuse_port=workers > 1)
    except OSError as exc:
        print(
            f"unetseg serve: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr
        )
        return 3
    with sock:
        if workers > 1:
            from app.procs.supervisor import run as run_workers

            return run_workers(settings, workers, args.grace, sock)
        from app import serving

        serving.run(create_app(settings), settings, args.grace, sock)
    return 0


def predict(argv: Sequence[str]) -> int:
    from app.config import holds_bundles, load_settings
    from app.engine import Engine, resolve_device
    from app.errors import ServiceError
    from app.pipeline import Ask, predict_sync

    defaults = load_settings()
    p = argparse.ArgumentParser(
        prog="unetseg predict",
        description="Segment image files in this process, or with --url on a running service.",
    )
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument(
        "--model",
        help="model name in --weights-dir, or a bundle folder such as weights/polyp (default: UNETSEG_DEFAULT_MODEL)",
    )
    p.add_argument("--out", type=Path, default=Path("masks"), help="output folder (created)")
    p.add_argument("--format", choices=["png", "overlay"], default="png")
    p.add_argument(
        "--weights-dir",
        type=Path,
        default=defaults.weights_dir,
        help="folder of model bundles (default: UNETSEG_WEIGHTS_DIR, else ./weights, else the shipped bundles)",
    )
    p.add_argument("--device", default=defaults.device)
    remote = p.add_argument_group("on a running service")
    remote.add_argument("--url", help="send the images to the service at this URL (e.g. http://host:8000)")
    remote.add_argument("--api-key", help="the service's API key, when it needs one")
    remote.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    args = p.parse_args(argv)
    first_of: dict[str, Path] = {}
    for path in args.images:  # each mask is OUT/<stem>.png: refuse before writing any
        first = first_of.setdefault(path.stem, path)
        if first != path:
            p.error(f"{first} and {path} would both be written to {args.out / (path.stem + '.png')}; rename one")
    if args.url:
        from app import client

        if args.concurrency < 1:
            p.error("--concurrency must be at least 1")
        return client.main(
            args.images,
            args.url,
            args.out,
            api_key=args.api_key,
            model=args.model,
            format=args.format,
            concurrency=args.concurrency,
        )
    weights_dir = args.weights_dir
    if args.model and (Path(args.model) / "card.json").is_file():  # a bundle folder: served alone
        weights_dir, args.model = Path(args.model), None
    elif args.model and ("/" in args.model or Path(args.model).is_dir()):
        p.error(f"--model {args.model}: not a model bundle (a folder with card.json and model.safetensors)")
    if not holds_bundles(weights_dir):
        print(f"unetseg predict: {weights_dir} holds no model bundle: {WEIGHTS_HINT}", file=sys.stderr)
        return 2
    try:
        engine = Engine.from_folder(
            weights_dir,
            resolve_device(args.device),
            precision=defaults.precision,
            max_batch=defaults.max_batch,
            default_model=defaults.default_model,
            graph=defaults.graph,
        )
    except ValueError as exc:  # a bad bundle, device or precision: the message names it
        print(f"unetseg predict: {exc}", file=sys.stderr)
        return 2
    if args.model and args.model not in engine.models:
        available = ", ".join(sorted(engine.models))
        print(
            f"unetseg predict: unknown model {args.model!r}; available: {available} in {weights_dir} ({WEIGHTS_HINT})"
        )
        engine.stop()
        return 2
    engine.start(warmup=False)
    args.out.mkdir(parents=True, exist_ok=True)
    failures = 0
    try:
        m = engine.get(args.model)
        # The service's own pipeline; bulk=True for the class areas printed below.
        ask = Ask(m.name, args.format, 0.5, defaults.png_compress_level, bulk=True)
        for path in args.images:
            try:
                answer = predict_sync(engine, ask, path.read_bytes(), defaults.max_pixels)
            except (ServiceError, OSError) as exc:
                print(f"{path}: {exc}", file=sys.stderr)
                failures += 1
                continue
            target = args.out / f"{path.stem}.png"
            target.write_bytes(answer.body)
            total = max(1, answer.width * answer.height)
            areas = ", ".join(f"{c.name} {answer.counts[c.id] / total:.1%}" for c in m.card.classes[1:])
            print(f"{path} -> {target} ({areas})")
    finally:
        engine.stop()
    return 1 if failures else 0


WEIGHTS_HINT = "give the folder of bundles with --weights-dir (or UNETSEG_WEIGHTS_DIR), or a bundle folder as --model"

COMMANDS = {
    "serve": "run the HTTP service",
    "predict": "segment image files",
    "segment": "segment a folder or s3:// prefix of images into masks and summary.csv (resumable)",
    "train": "train a model bundle",
    "evaluate": "score a bundle on a dataset",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: unetseg {{{','.join(COMMANDS)}}} ...\n")
        for name, text in COMMANDS.items():
            print(f"  {name:<10}{text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    if cmd in ("serve", "predict", "segment"):
        from app.config import SettingsError

        try:
            if cmd == "serve":
                return serve(rest)
            if cmd == "predict":
                return predict(rest)
            from app.segment import main as segment_main

            return segment_main(rest)
        except SettingsError as exc:  # names the UNETSEG_ variable, without a traceback
            print(f"unetseg {cmd}: {exc}", file=sys.stderr)
            return 2
    if cmd == "train":
        from model.train import main as train_main

        return train_main(rest)
    from model.evaluate import main as evaluate_main

    return evaluate_main(rest)


if __name__ == "__main__":
    sys.exit(main())
