"""Bad config fields and flags: a one-line error that names them, exit 2, no traceback.

Every field is checked in process (`train_config.validate`, `engine.check_prefill_chunk`,
`prefill.check_chunk`); a few representative cases go through train.py and decode.py
themselves, since each subprocess costs seconds of imports.
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from flexdraft_jax import train_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny():
  from configs import tiny
  return tiny.get_config()


# (field, bad value, text the one-line message must contain)
BAD_FIELDS = [
    ("model", "", "config.model must be"),
    ("model", "/no/such/model", "config.model='/no/such/model' is neither"),
    ("tokenizer", "", "config.tokenizer must name a tokenizer for model='random'"),
    ("dtype", "float16", "config.dtype must be one of"),
    ("export_dtype", "int8", "config.export_dtype must be one of"),
    ("random_model.family", "gpt2", "config.random_model.family must be one of"),
    ("random_model.hidden_size", 0, "config.random_model.hidden_size must be an integer >= 1"),
    ("random_model.num_heads", 3, "config.random_model: num_heads=3 is not a multiple of"),
    ("drafter.num_draft_layers", 0, "config.drafter.num_draft_layers must be an integer >= 1"),
    ("drafter.block_size", 1, "config.drafter.block_size must be an integer >= 2"),
    ("drafter.calib_rank", -1, "config.drafter.calib_rank must be an integer >= 0"),
    ("drafter.calib_target", "both", "config.drafter.calib_target must be one of 'logits', 'hidden'"),
    ("data.responses", "bogus", "config.data.responses must be one of 'self', 'original'"),
    ("data.num_prompts", 0, "config.data.num_prompts must be an integer >= 1"),
    ("data.num_heldout_prompts", -1, "config.data.num_heldout_prompts must be an integer >= 0"),
    ("data.num_heldout_prompts", 0, "config.data.num_heldout_prompts must be >= 1 when eval_every"),
    ("data.max_prompt_len", 0, "config.data.max_prompt_len must be an integer >= 1"),
    ("data.max_response_len", 0, "config.data.max_response_len must be an integer >= 1"),
    ("data.generate_batch_size", 0, "config.data.generate_batch_size must be an integer >= 1"),
    ("data.train_dir", "/no/such/dir", "config.data.train_dir='/no/such/dir' does not exist"),
    ("data.archive", "/no/such.npz", "config.data.archive='/no/such.npz' does not exist"),
    ("init_from", "/tmp", "config.init_from='/tmp' is not an exported drafter"),
    ("data.kv_dtype", "float16", "config.data.kv_dtype must be one of 'bfloat16', 'float32'"),
    ("seq_len", 1, "config.seq_len must be an integer >= 2"),
    ("seq_len", 4, "config.seq_len=4 is below drafter.block_size + 1 = 5"),
    ("batch_size", 0, "config.batch_size must be an integer >= 1, got 0"),
    ("anchors_per_seq", 0, "config.anchors_per_seq must be an integer >= 1"),
    ("optim.learning_rate", -1.0, "config.optim.learning_rate must be > 0, got -1.0"),
    ("optim.learning_rate", 0.0, "config.optim.learning_rate must be > 0"),
    ("optim.warmup_steps", -1, "config.optim.warmup_steps must be an integer >= 0"),
    ("optim.total_steps", -5, "config.optim.total_steps must be an integer >= 0"),
    ("optim.weight_decay", -0.1, "config.optim.weight_decay must be a number >= 0"),
    ("optim.clip_norm", 0.0, "config.optim.clip_norm must be > 0"),
    ("optim.b1", 1.0, "config.optim.b1 must be in [0.0, 1.0)"),
    ("optim.b2", -0.5, "config.optim.b2 must be in [0.0, 1.0)"),
    ("loss.slot_decay", 0.0, "config.loss.slot_decay must be > 0"),
    ("loss.calib_weight", -1.0, "config.loss.calib_weight must be a number >= 0"),
    ("loss.labels", "argmax", "config.loss.labels must be one of 'data', 'target_argmax'"),
    ("num_steps", 0, "config.num_steps must be an integer >= 1"),
    ("time_limit_s", -1.0, "config.time_limit_s must be a number >= 0"),
    ("log_every", 0, "config.log_every must be an integer >= 1"),
    ("save_every", 0, "config.save_every must be an integer >= 1"),
    ("eval_every", -1, "config.eval_every must be an integer >= 0"),
    ("eval_batches", 0, "config.eval_batches must be an integer >= 1"),
    ("seed", -1, "config.seed must be an integer >= 0"),
    ("mesh", "1,2", "config.mesh must be 'auto' or three positive 'data,fsdp,tensor' sizes"),
    ("mesh", "0,1,1", "config.mesh must be 'auto' or three positive"),
    ("mesh", "a,b,c", "config.mesh must be 'auto' or three positive"),
    ("mesh", "3,1,1", "config.batch_size=4 must be a multiple of data*fsdp=3"),
    ("hbm_gib", -1.0, "config.hbm_gib must be a number >= 0"),
    ("decode_batch_size", -1, "config.decode_batch_size must be an integer >= 0"),
    ("decode_context", -1, "config.decode_context must be an integer >= 0"),
]


def _set(config, field, value):
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


@pytest.mark.parametrize("field, value, message", BAD_FIELDS)
def test_each_bad_field_is_named_in_one_line(field, value, message):
  config = _tiny()
  if field in ("model", "data.train_dir"):
    config.tokenizer = "smollm2-135m-instruct"
    config.data.generate_if_missing = False
  if field == "tokenizer":
    config.model = "random"
  _set(config, field, value)
  with pytest.raises(train_config.ConfigError) as err:
    train_config.validate(config, "train")
  assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("name, mode", [("tiny", "train"), ("smollm2_135m", "train"),
                                        ("llama3_8b", "memory"), ("qwen3_8b", "memory")])
def test_shipped_configs_pass(name, mode):
  config = __import__(f"configs.{name}", fromlist=["get_config"]).get_config()
  train_config.validate(config, mode)


def test_mesh_against_the_devices():
  config = _tiny()
  config.mesh = "2,2,1"
  with pytest.raises(train_config.ConfigError, match=r"config.mesh='2,2,1' needs 4 devices, 1 are"):
    train_config.check_devices(config, 1)
  config.mesh = "auto"
  with pytest.raises(train_config.ConfigError, match=r"config.batch_size=4 must be a multiple of "
                                                     r"the 3 devices of config.mesh='auto'"):
    train_config.check_devices(config, 3)
  train_config.check_devices(config, 2)


def test_unknown_override_keeps_the_suggestion():
  error = AttributeError('\'\\\'mode\\\'\\nDid you mean "model" instead of "mode"?\'')
  assert train_config.unknown_override(error, ["train.py", "--config.mode=bogus"]) == (
      "--config.mode: the config has no field 'mode' (did you mean 'model'?)")


def test_prefill_chunk_and_prompt_bounds():
  from flexdraft_jax import engine, prefill
  with pytest.raises(ValueError, match=r"^--prefill_chunk must be >= 1, got 0$"):
    engine.check_prefill_chunk(0, 8192)
  with pytest.raises(ValueError, match=r"^--prefill_chunk=9000 is above the KV cache capacity: "
                                       r"the cache holds at most the model's max_position=8192"):
    engine.check_prefill_chunk(9000, 8192)
  assert engine.check_prefill_chunk(None, 8192) == prefill.DEFAULT_CHUNK
  assert engine.check_prefill_chunk(None, 100) == 100  # the default never exceeds the model
  with pytest.raises(ValueError, match=r"^a prompt padded to 640 tokens is longer than the KV "
                                       r"cache \(capacity 512\)$"):
    prefill.check_chunk(64, 640, 512)


def test_prompt_longer_than_the_model_is_one_line():
  """Engine refuses a prompt beyond the model's positions (its cache's most) before compiling."""
  import jax

  from flexdraft_jax import engine, model, resources
  from flexdraft_jax.model_config import ModelConfig
  cfg = ModelConfig(family="llama", vocab_size=49152, hidden_size=16, intermediate_size=32,
                    num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, max_position=64,
                    tie_embeddings=True)
  params = model.init_params(cfg, jax.random.key(0))
  e = engine.Engine("random", target=(cfg, params), tokenizer=resources.SMOLLM2_NAME,
                    chat_template=False, costs="none", prefill_chunk=16)
  with pytest.raises(ValueError, match=r"^a prompt of \d+ tokens plus max_new_tokens=4 exceeds "
                                       r"the model's 64 positions$"):
    e.generate(["word " * 100], max_new_tokens=4, batch_size=1)


def _run(script, *args):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _assert_one_line_error(r, message):
  log = re.compile(r"^[IWE]\d{4} ")  # absl's log lines (decode.py logs "loading ...")
  lines = [line for line in r.stderr.splitlines() if line.strip() and not log.match(line)]
  assert r.returncode == 2, r.stderr[-2000:]  # cli.EXIT_USER, whenever the error is found
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  assert len(lines) == 1 and message in lines[0], r.stderr[-2000:]


@pytest.mark.parametrize("override, message", [
    ("--config.batch_size=0", "train.py: error: config.batch_size must be an integer >= 1, got 0"),
    ("--config.mode=bogus", "--config.mode: the config has no field 'mode' (did you mean "
                            "'model'?)"),
    ("--config.optim.learning_rate=-1", "config.optim.learning_rate must be > 0, got -1.0"),
    ("--config.batch_size=abc", "flag --config.batch_size=abc: invalid literal for int()"),
])
def test_train_py(tmp_path, override, message):
  r = _run("train.py", f"--config={ROOT}/configs/tiny.py", f"--workdir={tmp_path}", override)
  _assert_one_line_error(r, message)
  assert not (tmp_path / "data").exists()  # refused before any data was built


@pytest.mark.parametrize("flag, message", [
    ("--prefill_chunk=0", "decode.py: error: --prefill_chunk must be >= 1, got 0"),
    ("--prefill_chunk=x", "decode.py: error: flag --prefill_chunk=x: invalid literal for int()"),
    ("--prefill_chunk=100000", "--prefill_chunk=100000 is above the KV cache capacity"),
    ("--draft_vocab=-1", "decode.py: error: flag --draft_vocab=-1: -1 is not a non-negative integer"),
])
def test_decode_py(flag, message):
  _assert_one_line_error(_run("decode.py", "--prompt=a", "--drafter=none", flag), message)
