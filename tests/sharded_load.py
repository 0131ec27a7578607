"""Loads small HF folders into shards on 8 simulated CPU devices and compares with `load_hf`.

Run by tests/test_weights_sharded.py in a subprocess (the device count is fixed
at JAX start-up): python tests/sharded_load.py FOLDER...  Prints one JSON line.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from flexdraft_jax import sharding, weights  # noqa: E402


def main(folders):
  out = {}
  for folder in folders:
    cfg, dense = weights.load_hf(folder, "float32", "float32")
    for shape in ((2, 2, 2), (1, 1, 8)):
      mesh = sharding.make_mesh(shape)
      _, sharded = weights.load_hf_sharded(
          folder, lambda p: sharding.param_shardings(p, mesh), "float32", "float32")
      flat = jax.tree_util.tree_leaves_with_path(sharded)
      dense_flat = dict(jax.tree_util.tree_leaves_with_path(dense))
      split = 0
      for path, leaf in flat:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(dense_flat[path]),
                                      err_msg=f"{folder} {shape} {jax.tree_util.keystr(path)}")
        assert leaf.sharding.mesh.shape == mesh.shape
        split += leaf.addressable_shards[0].data.shape != leaf.shape
      out[f"{os.path.basename(folder)} {shape}"] = {"leaves": len(flat), "split": split}
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1:])
