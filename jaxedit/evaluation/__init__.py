"""Measuring edits: benchmark copies on disk (`benchmarks`: GEdit-Bench, ImgEdit Basic, jaxedit's pairs), judges
(`judges`: a Qwen2.5-VL judge folder or a Python function), the job of `jaxedit eval` (`run`) and its tables and
HTML report (`report`), and the usual metrics (`metrics`: L1, CLIP image and text similarity)."""
