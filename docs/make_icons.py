"""Draw the module icon (128x128) and the "Random forest" effect icon (21x21) with Pillow.

    .venv/bin/python docs/make_icons.py
"""

from pathlib import Path

from PIL import Image, ImageDraw

MODULE = Path(__file__).resolve().parents[1] / "FetalAnnotate"


def draw(size):
    """A segmented fetus (orange) in amniotic fluid with a green and a blue paint stroke."""
    scale = 8 * size / 128  # draw large, then downsample for smooth edges
    canvas = Image.new("RGBA", (8 * size, 8 * size), (0, 0, 0, 0))
    pen = ImageDraw.Draw(canvas)

    def box(x0, y0, x1, y1):
        return [x0 * scale, y0 * scale, x1 * scale, y1 * scale]

    pen.rounded_rectangle(box(2, 2, 126, 126), radius=22 * scale, fill=(34, 40, 58, 255))
    pen.ellipse(box(14, 18, 114, 112), fill=(88, 100, 128, 255))
    pen.ellipse(box(26, 30, 102, 100), fill=(230, 158, 0, 255))
    pen.ellipse(box(60, 34, 96, 68), fill=(246, 196, 80, 255))
    pen.line([(18 * scale, 108 * scale), (40 * scale, 116 * scale), (70 * scale, 114 * scale)],
              fill=(86, 180, 233, 255), width=int(7 * scale), joint="curve")
    pen.line([(44 * scale, 78 * scale), (58 * scale, 62 * scale), (78 * scale, 54 * scale)],
              fill=(0, 170, 120, 255), width=int(8 * scale), joint="curve")
    return canvas.resize((size, size), Image.LANCZOS)


if __name__ == "__main__":
    draw(128).save(MODULE / "Resources" / "Icons" / "FetalAnnotate.png", optimize=True)
    draw(21).save(MODULE / "SegmentEditorRandomForest" / "SegmentEditorEffect.png", optimize=True)
