"""Step1X-Edit: the editing pipeline, its sampling loop (CFG, fixed reference tokens) and its
Qwen2.5-VL text conditioning."""
