"""Toy 2-D teacher: a class-conditional rectified-flow MLP trained by the `denoise` objective.

    python -m launch.train --config configs/toy/teacher.py --workdir runs/toy_teacher
    python -m launch.train --config configs/toy/teacher.py:spiral --workdir runs/toy_spiral

The argument picks the dataset (gmm, checkerboard, moons, spiral; default gmm). About a minute
on 2 CPU cores. Expected result (eval.json, SWD over 2048 samples, gmm): the 64-step Euler
teacher scores ~0.12 against a data floor of ~0.06 (two independent real samples), while one
Euler step from noise is ~10x worse (~1.3: it collapses onto the data mean's neighbourhood) --
that gap is what distillation closes (docs/results_toy.md lists the other datasets).
"""
from distill.config import base_config


def get_config(arg: str = "gmm"):
  c = base_config()
  c.seed = 0
  c.data.name = arg or "gmm"
  c.objective.name = "denoise"
  c.objective.weighting = "none"
  c.objective.label_dropout = 0.1
  c.objective.ema_decay = 0.999

  c.model.name = "mlp"
  c.model.prediction = "flow"
  c.model.hidden = 128
  c.model.depth = 3

  c.process.name = "rectified_flow"

  c.train.steps = 3000
  c.train.batch_size = 256
  c.train.log_every = 100
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.optim.grad_clip = 1.0

  c.checkpoint.every_steps = 1000
  c.eval.num_samples = 2048
  c.eval.teacher_steps = 64
  c.sample.num = 1024
  return c
