"""Rebuild docs/reconstructions.png, the README's picture, from the README's main-job command.

    wetok reconstruct examples/images -o reconstructions --grid
    python docs/make_readme_picture.py reconstructions

Stacks the astronaut and chelsea grids (original | reconstruction | absolute error), each scaled to 200 px high,
on a white 900 px wide canvas.
"""

import sys
from pathlib import Path

from PIL import Image

HEIGHT, WIDTH, GAP = 200, 900, 4


def main(folder: str) -> None:
    grids = [Image.open(Path(folder) / f"{name}_grid.png").convert("RGB") for name in ("astronaut", "chelsea")]
    grids = [g.resize((round(g.width * HEIGHT / g.height), HEIGHT), Image.Resampling.LANCZOS) for g in grids]
    canvas = Image.new("RGB", (WIDTH, len(grids) * HEIGHT + (len(grids) - 1) * GAP), (255, 255, 255))
    for i, g in enumerate(grids):
        canvas.paste(g.crop((0, 0, min(g.width, WIDTH), HEIGHT)), (0, i * (HEIGHT + GAP)))
    out = Path(__file__).with_name("reconstructions.png")
    canvas.save(out, optimize=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "reconstructions")
