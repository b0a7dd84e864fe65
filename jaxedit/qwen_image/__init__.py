"""Qwen-Image-Edit: its pipeline, sampling and Qwen2.5-VL conditioning (the family: `jaxedit.families.qwen_image`)."""
