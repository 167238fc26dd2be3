"""Image to image: repaint a picture following a prompt (bundled model, CPU).

    python examples/img2img.py

Draws a starting picture with PIL, then asks for another colour scheme. `strength` says how
much to change: 0 keeps the picture (up to the VAE's round trip), 1 ignores it.
"""

from PIL import Image, ImageDraw

from sd_pipeline import StableDiffusion, save_image

pipe = StableDiffusion.default()
size = pipe.native_size
start = Image.new("RGB", (size, size), "#2563eb")  # a blue background ...
ImageDraw.Draw(start).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), "#dc2626")

for strength in (0.3, 0.6, 0.9):
    image = pipe.img2img(
        "a yellow circle on a green background", start, strength=strength, steps=20, seed=2
    )[0]
    save_image(image, f"img2img-{strength}.png")
    print(f"strength {strength}: wrote img2img-{strength}.png")
