"""Inpainting: repaint only the white part of a mask (bundled model, CPU).

    python examples/inpaint.py

With an ordinary model (as the bundled one) the unmasked part is kept by latent blending, so
it changes only by the VAE's round trip; a 9-channel SD inpainting checkpoint is conditioned on
the mask natively. `mask_blur` softens the seam.
"""

from PIL import Image, ImageDraw

from sd_pipeline import StableDiffusion, save_image

pipe = StableDiffusion.default()
size = pipe.native_size
picture = Image.new("RGB", (size, size), "#16a34a")  # a green background ...
ImageDraw.Draw(picture).rectangle((8, 8, size // 2, size // 2), "#f5f5f5")  # ... a white square
mask = Image.new("L", (size, size), 0)  # black: keep
ImageDraw.Draw(mask).rectangle((size // 2, size // 2, size - 1, size - 1), 255)  # white: repaint

result = pipe.inpaint(
    "a purple triangle on a green background", picture, mask, mask_blur=2, steps=20, seed=3
)[0]
save_image(picture, "inpaint-before.png")
save_image(result, "inpaint-after.png")
print("wrote inpaint-before.png and inpaint-after.png")
