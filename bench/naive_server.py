"""The baseline: a FastAPI service as it is commonly written — one forward pass per request.

It loads the same bundle and uses the same precision as the service, so that the comparison measures the
serving design (batching, threads, fast paths), not the model.

Run: python -m bench.naive_server BUNDLE PORT [--dtype bfloat16] [--device cuda]
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import torch
import torch.nn.functional as F
import uvicorn
from fastapi import FastAPI, File, UploadFile
from fastapi.responses import Response
from PIL import Image

from model.bundle import load_bundle


def create(bundle_dir: str, dtype: torch.dtype, device: torch.device) -> FastAPI:
    bundle = load_bundle(bundle_dir)
    model = bundle.model.eval().to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    policy = bundle.card.input
    mean = torch.tensor(policy.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(policy.std, device=device).view(1, -1, 1, 1)
    palette = [v for c in bundle.card.classes for v in c.color]
    app = FastAPI()

    @app.post("/predict")
    def predict(file: UploadFile = File(...)) -> Response:  # noqa: B008 - FastAPI's idiom
        image = Image.open(file.file).convert("RGB" if policy.channels == 3 else "L")
        w, h = image.size
        x = np.asarray(image.resize((policy.size, policy.size), Image.Resampling.BILINEAR), dtype=np.float32) / 255
        t = torch.from_numpy(x.reshape(policy.size, policy.size, -1)).permute(2, 0, 1)[None].to(device)
        t = ((t - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(t).float()
        mask = F.interpolate(logits, size=(h, w), mode="bilinear").argmax(1)[0].to(torch.uint8).cpu().numpy()
        out = Image.fromarray(mask, "L").convert("P")
        out.putpalette(palette)
        buf = io.BytesIO()
        out.save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    return app


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("bundle")
    p.add_argument("port", type=int)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    app = create(a.bundle, getattr(torch, a.dtype), torch.device(a.device))
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning")
