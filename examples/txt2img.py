"""Text to image with the model bundled in sd-pipeline (offline, on a CPU).

    python examples/txt2img.py

Writes txt2img.png (its generation parameters are stored in the PNG, AUTOMATIC1111-style).
"""

from sd_pipeline import StableDiffusion, save_image

pipe = StableDiffusion.default()  # or StableDiffusion.from_checkpoint("v1-5.safetensors")
images = pipe.txt2img(
    "a red circle on a blue background",
    negative_prompt="",
    steps=20,
    guidance_scale=4.0,  # leave out steps/guidance_scale/sampler for the model's own defaults
    sampler="euler",
    seed=1,
    batch_size=4,  # image i uses seed 1 + i
)
for i, image in enumerate(images):
    save_image(image, f"txt2img-{i}.png")
print("wrote", [f"txt2img-{i}.png" for i in range(len(images))])
