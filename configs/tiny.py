"""A tiny random target (SmolLM2's tokenizer) and drafter: the end-to-end test config.

  python train.py --config=configs/tiny.py --workdir=/tmp/tiny

builds its own small self-distilled dataset from ShareGPT, trains 20 steps,
checkpoints and exports, in well under a minute on 2 CPU cores.
"""
import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  c = common.base_config()
  c.model = "random"
  c.tokenizer = "smollm2-135m-instruct"
  c.dtype = "float32"
  c.random_model = ml_collections.ConfigDict(dict(
      family="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=4,
      num_heads=4, num_kv_heads=2, head_dim=16, max_position=2048, tie_embeddings=True))
  c.drafter.update(num_draft_layers=2, block_size=4, calib_rank=16)
  c.data.num_prompts = 24
  c.data.num_heldout_prompts = 8
  c.data.max_prompt_len = 96
  c.data.max_response_len = 24
  c.data.generate_batch_size = 8
  c.data.generate_if_missing = True
  c.seq_len = 128
  c.batch_size = 4
  c.anchors_per_seq = 4
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 2
  c.num_steps = 20
  c.log_every = 5
  c.save_every = 10
  c.eval_every = 10
  c.eval_batches = 1
  return c
