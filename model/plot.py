"""Training curves as a PNG, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

SERIES = (("train_loss", (220, 60, 50), "train loss"), ("val_dice", (30, 110, 220), "val dice"))


def plot_curves(
    rows: Sequence[dict[str, Any]],
    path: Path,
    title: str,
    width: int = 720,
    height: int = 400,
    series: Sequence[tuple[str, tuple[int, int, int], str]] = SERIES,
    xlabel: str = "epoch",
) -> None:
    """Line chart of each series' values against ``epoch``; the y axis spans 0..max(1, largest value)."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 16, 32, height - 40
    draw.text((left, 10), title, fill="black")
    xs = [float(r["epoch"]) for r in rows]
    ymax = max([1.0] + [float(r[k]) for r in rows for k, _, _ in series if k in r])
    xmax = max(xs, default=1.0)
    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    for i in range(5):
        v = ymax * i / 4
        y = bottom - (bottom - top) * i / 4
        draw.line((left, y, right, y), fill=(230, 230, 230))
        draw.text((8, y - 6), f"{v:.2f}", fill="black")
    draw.text((right - 40, bottom + 12), f"{xlabel} {xmax:.0f}", fill="black")

    def point(x: float, v: float) -> tuple[float, float]:
        return (left + (right - left) * x / max(xmax, 1.0), bottom - (bottom - top) * v / ymax)

    n = 0  # legend slot; a series with an empty label is drawn thin and left out of the legend
    for key, color, label in series:
        pts = [point(x, float(r[key])) for x, r in zip(xs, rows, strict=True) if key in r]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2 if label else 1)
        if label:
            for p in pts[-1:]:
                draw.ellipse((p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3), fill=color)
            draw.text((left + 10 + 130 * n, bottom + 12), label, fill=color)
            n += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)
