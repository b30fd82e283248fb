"""Demo teacher: a small class-conditional rectified-flow DiT on the bundled digits (8x8x1).

    python -m launch.train --config configs/demo/teacher.py --workdir runs/demo_teacher

Trained once and shipped (launch/demo.py keeps it in configs/demo/teacher_ckpt as a converted
Orbax checkpoint with this config and the data hash); `make demo` retrains it only when that
directory is missing or `python -m launch.demo --retrain_teacher` asks.

Architecture: DiT on the 8x8 scans, patch 2 (16 tokens of 2x2 pixels), width 128 (4 heads of
32), 4 blocks, 10 classes + the null class (label dropout 0.1, so CFG and unconditional
sampling work).
The time input is dense (process.timestep_scale = 1: the network sees t in [0, 1]) so that sCM
can differentiate it in time (see distill/objectives/scm.py, "Pitfalls").

About 30-35 minutes on 2 CPU cores. Expected result (fd over 898 class-conditional samples,
data floor 8.4): 32 Euler steps ~20.7 with all ten digits (coverage 1), 1 Euler step ~198.
"""
from configs.demo.common import demo_eval
from distill.config import base_config


def get_config(arg: str = ""):
  del arg
  c = demo_eval(base_config())
  c.seed = 0

  c.objective.name = "denoise"
  c.objective.weighting = "none"
  c.objective.label_dropout = 0.1
  c.objective.ema_decay = 0.999

  c.model.name = "dit"
  c.model.prediction = "flow"
  c.model.in_channels = 1
  c.model.sample_size = 8
  c.model.patch_size = 2
  c.model.num_attention_heads = 4
  c.model.attention_head_dim = 32
  c.model.num_layers = 4
  c.model.num_embeds_ada_norm = 10

  c.process.name = "rectified_flow"
  c.process.timestep_scale = 1.0

  c.train.steps = 3000
  c.train.batch_size = 128
  c.train.log_every = 200
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.optim.schedule = "cosine"
  c.optim.grad_clip = 1.0

  c.checkpoint.every_steps = 1000
  return c
