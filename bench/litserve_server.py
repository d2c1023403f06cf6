"""A real peer: LitServe serving the same bundle with its own dynamic batching.

Same model, same precision, same pre- and post-processing as the naive baseline, batched by LitServe
(``max_batch_size`` and ``batch_timeout`` matching the service's ``UNETSEG_MAX_BATCH`` and
``UNETSEG_MAX_WAIT_MS``). Requests are JSON with the image base64-encoded and responses carry the mask PNG
base64-encoded, LitServe's usual way of moving images (its worker processes receive requests through a
queue, so uploaded files are not passed through).

Run: python -m bench.litserve_server BUNDLE PORT [--dtype bfloat16] [--device cuda] [--max-batch 8] [--wait-s 0.005]
"""

from __future__ import annotations

import argparse
import base64
import io
from typing import Any

import litserve as ls
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from app.engine import stream_threads
from model.bundle import load_bundle


class UNetAPI(ls.LitAPI):  # type: ignore[misc]
    def __init__(self, bundle_dir: str, dtype: torch.dtype, threads: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bundle_dir = bundle_dir
        self.dtype = dtype
        self.threads = threads

    def setup(self, device: str) -> None:
        self.dev = torch.device(device)
        if self.threads and self.dev.type == "cpu":
            torch.set_num_threads(self.threads)  # workers are processes: each takes its share of the cores
        bundle = load_bundle(self.bundle_dir)
        self.model = bundle.model.eval().to(self.dev, memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.policy = bundle.card.input
        self.mean = torch.tensor(self.policy.mean, device=self.dev).view(1, -1, 1, 1)
        self.std = torch.tensor(self.policy.std, device=self.dev).view(1, -1, 1, 1)
        self.palette = [v for c in bundle.card.classes for v in c.color]

    def decode_request(self, request: dict[str, str]) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.policy
        image = Image.open(io.BytesIO(base64.b64decode(request["image"]))).convert("RGB" if p.channels == 3 else "L")
        w, h = image.size
        x = np.asarray(image.resize((p.size, p.size), Image.Resampling.BILINEAR), dtype=np.float32) / 255
        t = torch.from_numpy(x.reshape(p.size, p.size, -1)).permute(2, 0, 1)
        return t, (h, w)

    def batch(self, inputs: list[tuple[torch.Tensor, tuple[int, int]]]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        return torch.stack([t for t, _ in inputs]), [s for _, s in inputs]

    def predict(self, batch: tuple[torch.Tensor, list[tuple[int, int]]]) -> list[np.ndarray]:
        x, sizes = batch
        x = ((x.to(self.dev) - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(self.dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32),
        ):
            logits = self.model(x).float()
        return [
            F.interpolate(logits[i : i + 1], size=s, mode="bilinear").argmax(1)[0].to(torch.uint8).cpu().numpy()
            for i, s in enumerate(sizes)
        ]

    def unbatch(self, output: list[np.ndarray]) -> list[np.ndarray]:
        return output

    def encode_response(self, mask: np.ndarray) -> dict[str, str]:
        out = Image.fromarray(mask, "L").convert("P")
        out.putpalette(self.palette)
        buf = io.BytesIO()
        out.save(buf, format="PNG")
        return {"mask": base64.b64encode(buf.getvalue()).decode()}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("bundle")
    p.add_argument("port", type=int)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--wait-s", type=float, default=0.005)
    p.add_argument("--workers", type=int, default=1, help="workers_per_device (on CPU they share the threads)")
    a = p.parse_args()
    threads = stream_threads(a.workers)
    api = UNetAPI(a.bundle, getattr(torch, a.dtype), threads, max_batch_size=a.max_batch, batch_timeout=a.wait_s)
    server = ls.LitServer(api, accelerator=a.device, devices=1, workers_per_device=a.workers, timeout=120)
    server.run(port=a.port, generate_client_file=False, log_level="warning")
