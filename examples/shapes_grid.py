"""A grid of pictures from the bundled model, as shown in the README, each checked by the
deterministic analyser that the evaluation uses.

    python examples/shapes_grid.py [out.png]

Writes shapes-grid.png (two rows of eight: the top row from combinations seen in training, the
bottom row from combinations held out of it) and prints what the analyser reads in each.
"""

import sys

from sd_pipeline import StableDiffusion, image_grid, save_image
from sd_pipeline.training.evaluate import analyse
from sd_pipeline.training.shapes import COLORS, SHAPES, caption, is_held_out

pipe = StableDiffusion.default()
scenes = [(c, s, b) for s in SHAPES for c in COLORS for b in COLORS if c != b]
seen = [scene for scene in scenes if not is_held_out(*scene)][::37][:8]
held_out = [scene for scene in scenes if is_held_out(*scene)][::4][:8]
prompts = [caption(*scene) for scene in seen + held_out]
images = pipe.txt2img(prompts, seed=0, progress=False)  # the model's default steps and sampler
for scene, image in zip(seen + held_out, images):
    reading = analyse(image)
    got = (reading.color, reading.shape, reading.background)
    tag = "held out" if is_held_out(*scene) else "seen"
    print(f"{caption(*scene):<45} {tag:<9} read as {' / '.join(map(str, got))}")
out = sys.argv[1] if len(sys.argv) > 1 else "shapes-grid.png"
save_image(image_grid(images, cols=8), out)
print("wrote", out)
