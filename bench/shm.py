"""What a request's pixels cost to cross between a front end and the engine process of ``serve --workers``, on
both sides, without the rest of the request: a shared file per array against a block of the front end's arena.

    python -m bench.shm [--requests 2000] [--input 352] [--mask 512]

Per request, as ``app.procs`` does it: the front end makes room for the model's input (``--input`` px square,
3 channels) and the mask (``--mask`` px square), writes the input; the engine process maps both by their
reference, reads the input and writes the mask; the front end copies the mask out and gives both back. One
process plays both sides (the syscalls and page faults are the same); CPU microseconds per request.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from app.procs.protocol import Arena, ArenaArray, SharedArray, attach


def one_request(make: type[SharedArray] | Arena, engine_arena: Arena | None, image: np.ndarray, mask_side: int) -> None:
    arrays: list[SharedArray | ArenaArray] = []
    for shape in (image.shape, (mask_side, mask_side)):
        made = make.allocate(shape, np.uint8) if isinstance(make, Arena) else SharedArray.create(shape, np.uint8)
        assert made is not None and made.array is not None
        arrays.append(made)
    src, dst = arrays
    assert src.array is not None and dst.array is not None
    src.array[:] = image
    seen = attach(src.ref, image.shape, np.uint8, engine_arena).copy()  # the engine process reads the input
    attach(dst.ref, (mask_side, mask_side), np.uint8, engine_arena)[:] = seen[0, 0, 0]  # and writes the mask
    dst.array.copy()
    for array in arrays:
        array.close()
        array.unlink()


def measure(requests: int, input_side: int, mask_side: int) -> dict[str, float]:
    image = np.random.default_rng(0).integers(0, 256, (input_side, input_side, 3), dtype=np.uint8)
    arena = Arena.create()
    engine_arena = Arena.attach(arena.name, arena.size)
    out = {}
    try:
        for label, make, seen in (("file per array", SharedArray, None), ("arena block", arena, engine_arena)):
            for _ in range(50):
                one_request(make, seen, image, mask_side)
            t0 = time.process_time()
            for _ in range(requests):
                one_request(make, seen, image, mask_side)
            out[label] = round((time.process_time() - t0) / requests * 1e6, 1)
    finally:
        engine_arena.close()
        arena.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.shm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--input", type=int, default=352, help="the model input's side (px, 3 channels)")
    ap.add_argument("--mask", type=int, default=512, help="the mask's side (px)")
    a = ap.parse_args(argv)
    result = {"cpu_us_per_request": measure(a.requests, a.input, a.mask), "input": a.input, "mask": a.mask}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
