"""Draw the shipped catalogue's conditioning pictures: `python data/images/draw_pictures.py [FOLDER]`.

The PNGs beside this script are its output, committed (a few KB each) so that a fresh checkout's
`t2v nightly` finds them without a step before it; run it again to change them. Flat shapes in a
32-colour palette keep the files small and the drawings recognisable at the tiny model's sizes:

- `product-box.png` (400x300): a product box in three-quarter view on a teal backdrop, its front
  carrying a white label, for the `product-box-teaser` template.
- `greeting-card.png` (300x400): a cream card with a red heart and "Happy Birthday", for the
  `greeting-card` template.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
COLOURS = 32
"""Palette size of the saved PNGs: enough for the anti-aliased edges and text, and a few KB a file."""


def product_box() -> Image.Image:
    """A box on a turntable-like floor: front, top and side faces, a label with the product's name."""
    image = Image.new("RGB", (400, 300), (38, 120, 128))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 210, 400, 300), fill=(27, 86, 92))  # the floor
    draw.ellipse((90, 222, 330, 262), fill=(20, 64, 69))  # the box's shadow
    front = [(110, 110), (250, 110), (250, 245), (110, 245)]
    top = [(110, 110), (165, 70), (305, 70), (250, 110)]
    side = [(250, 110), (305, 70), (305, 205), (250, 245)]
    draw.polygon(front, fill=(240, 132, 40), outline=(120, 60, 16))
    draw.polygon(top, fill=(250, 178, 96), outline=(120, 60, 16))
    draw.polygon(side, fill=(196, 96, 24), outline=(120, 60, 16))
    draw.rounded_rectangle((122, 140, 238, 215), radius=8, fill=(255, 255, 255), outline=(60, 60, 60))
    name, line = ImageFont.load_default(size=30), ImageFont.load_default(size=13)
    draw.text((180, 166), "NOVA", fill=(30, 30, 30), font=name, anchor="mm")
    draw.text((180, 196), "wireless buds", fill=(90, 90, 90), font=line, anchor="mm")
    return image


def greeting_card() -> Image.Image:
    """A card on a pink table: a red heart in the middle and a greeting under it."""
    image = Image.new("RGB", (300, 400), (244, 186, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle((36, 36, 272, 372), fill=(214, 150, 166))  # the card's shadow
    draw.rectangle((28, 28, 264, 364), fill=(255, 248, 232), outline=(200, 170, 150), width=2)
    draw.polygon(_heart(centre=(146, 160), size=5.2), fill=(214, 30, 60), outline=(150, 16, 40))
    font = ImageFont.load_default(size=30)
    draw.text((146, 282), "Happy", fill=(150, 16, 40), font=font, anchor="mm")
    draw.text((146, 318), "Birthday", fill=(150, 16, 40), font=font, anchor="mm")
    return image


def _heart(*, centre: tuple[float, float], size: float, points: int = 96) -> list[tuple[float, float]]:
    """The classic heart curve (x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t)."""
    cx, cy = centre
    out = []
    for i in range(points):
        t = 2 * math.pi * i / points
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        out.append((cx + size * x, cy - size * y))
    return out


PICTURES = {"product-box.png": product_box, "greeting-card.png": greeting_card}


def main(folder: Path = HERE) -> list[Path]:
    """Write every picture into `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in PICTURES.items():
        path = folder / name
        draw().quantize(COLOURS, dither=Image.Dither.NONE).save(path, optimize=True)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(f"{path} ({path.stat().st_size} bytes)")
