"""Bar charts of per-layer bit widths for the recipe folder (Pillow only)."""

from __future__ import annotations

import io
from collections.abc import Sequence

_PALETTE = {2: (215, 48, 39), 3: (244, 109, 67), 4: (253, 174, 97), 5: (171, 217, 233), 6: (116, 173, 209),
            7: (69, 117, 180), 8: (49, 54, 149), 16: (20, 20, 60)}


def bits_plot(panels: Sequence[tuple[str, Sequence[float]]], title: str, y_max: int) -> bytes:
    """PNG bar chart(s), one panel per (label, per-layer values): layer index on x, bits on y."""
    from PIL import Image, ImageDraw, ImageFont

    n = max((len(v) for _, v in panels), default=0)
    bar = max(4, min(14, 900 // max(n, 1)))
    left, right, top, panel_h, gap = 56, 20, 34, 190, 46
    width = left + right + bar * n
    height = top + len(panels) * (panel_h + gap)
    img = Image.new("RGB", (max(width, 360), height), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((left, 8), title, fill="black", font=font)
    step = 1 if y_max <= 8 else 4
    for p, (label, values) in enumerate(panels):
        y0 = top + p * (panel_h + gap) + 16  # top of the plot area
        y1 = y0 + panel_h - 16  # the x axis

        def y_of(v: float) -> float:
            return y1 - (y1 - y0) * min(v, y_max) / y_max

        d.text((left, y0 - 16), label, fill="black", font=font)
        for t in range(0, y_max + 1, step):
            d.line([(left, y_of(t)), (left + bar * n, y_of(t))], fill=(225, 225, 225))
            d.text((left - 8 - 6 * len(str(t)), y_of(t) - 6), str(t), fill="black", font=font)
        for i, v in enumerate(values):
            x = left + i * bar
            color = _PALETTE.get(int(round(v)), (120, 120, 120))
            d.rectangle([x + 1, y_of(v), x + bar - 1, y1], fill=color)
        d.line([(left, y0), (left, y1), (left + bar * n, y1)], fill="black")
        tick = 10 if n > 20 else 1
        for i in range(0, n, tick):
            x = left + i * bar + bar // 2
            d.line([(x, y1), (x, y1 + 3)], fill="black")
            d.text((x - 3 * len(str(i)), y1 + 5), str(i), fill="black", font=font)
        d.text((left + bar * n // 2 - 30, y1 + 18), "layer index", fill="black", font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
