"""A transformers Qwen2.5-VL folder -> a judge folder for `jaxedit eval --judge` (`python -m checkpoints_convert
qwen-vl SRC OUT`)."""

from __future__ import annotations

import json
from pathlib import Path

from checkpoints_convert.qwen import QWEN_PROCESSOR_NEEDED, copy_qwen_processor, read_config


def convert_judge(src: str | Path, dst: str | Path, *, dtype=None, force: bool = False, log=print) -> Path:
    """A transformers Qwen2.5-VL folder -> a judge folder for `jaxedit eval --judge`: dst/judge.json (the
    architecture), dst/qwen/ (the weights, Orbax, sealed), dst/qwen_processor/ (tokenizer, image processor, chat
    template). Written beside as .DST.new and renamed into place."""
    from checkpoints_convert import load_part
    from jaxedit.checkpoint import prepare_destination, recover_dir, save_params
    from jaxedit.qwen_vl import QWEN_PROCESSOR
    from jaxedit.staged import staged_dir, write_file

    src, dst = Path(src), Path(dst).absolute()
    cfg = read_config(src)
    missing = [f for f in QWEN_PROCESSOR_NEEDED if not (src / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{src}: missing {', '.join(missing)} (Qwen2.5-VL tokenizer / image processor)")
    recover_dir(dst, complete="judge.json")
    prepare_destination(dst, force=force, replaceable=lambda p: (p / "judge.json").is_file(), what="judge folder")
    with staged_dir(dst) as new:
        params = load_part("qwen", src, cfg, dtype=dtype)
        save_params(new / "qwen", params)
        copy_qwen_processor(src, new / QWEN_PROCESSOR)
        write_file(new / "judge.json", json.dumps({"kind": "qwen2.5-vl", "model": cfg.to_dict()}, indent=1) + "\n")
    log(f"wrote judge folder {dst}")
    return dst
