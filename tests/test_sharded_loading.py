"""Converted and restored parameters land straight in their target shardings (8 fake devices)."""

from __future__ import annotations

import numpy as np

from checkpoints_convert import load_transformer, mesh_placer
from checkpoints_convert.mapping import flatten
from jaxedit.checkpoint import load_params, save_params
from jaxedit.models.flux import abstract_params
from jaxedit.parallel import sharding as sh
from jaxedit.presets import get
from tests.test_convert import tiny_bfl_file

CFG = get("flux-kontext-tiny").transformer  # hidden 48: divisible by the 8-way fsdp axis


def assert_sharded_like(tree, shardings):
    want = flatten(shardings)
    for path, a in flatten(tree).items():
        s = want[path]
        assert a.sharding.is_equivalent_to(s, a.ndim), path
        if any(sh.effective_spec(s.spec, s.mesh)):
            # really split: no single device holds the whole array
            assert max(sh_.data.size for sh_ in a.addressable_shards) < a.size, path


def test_converter_places_each_tensor_on_the_mesh(tmp_path):
    mesh = sh.make_mesh(sh.MeshConfig.parse("fsdp=4,tensor=2"))
    shardings = sh.shardings(abstract_params(CFG, boxed=True), mesh)
    path = tiny_bfl_file(tmp_path, CFG)
    placed = load_transformer(path, CFG, place=mesh_placer(shardings))
    assert_sharded_like(placed, shardings)
    plain = load_transformer(path, CFG)
    flat_plain = flatten(plain)
    for k, a in flatten(placed).items():
        np.testing.assert_array_equal(np.asarray(a), np.asarray(flat_plain[k]))


def test_orbax_restore_into_target_shardings(tmp_path):
    path = tiny_bfl_file(tmp_path, CFG)
    params = load_transformer(path, CFG)
    save_params(tmp_path / "ckpt", params)
    mesh = sh.make_mesh(sh.MeshConfig.parse("fsdp=8"))
    boxed = abstract_params(CFG, boxed=True)
    target = sh.abstract_with_shardings(boxed, mesh)
    restored = load_params(tmp_path / "ckpt", target)
    assert_sharded_like(restored, sh.shardings(boxed, mesh))
    flat_params = flatten(params)
    for k, a in flatten(restored).items():
        np.testing.assert_array_equal(np.asarray(a), np.asarray(flat_params[k]))
