"""What every toy 2-D distillation config shares: the dataset argument, the teacher slot, the
training loop, checkpoints and the evaluation (SWD over 4096 unconditional samples; student
at 1, 2 and 4 steps; teacher at 1 and 64 steps)."""
from distill.config import base_config


def toy_distill_config(arg: str, objective: str, *, steps: int, lr: float = 1e-4,
                       b1: float = 0.9, warmup_steps: int = 0, grad_clip: float = 0.0):
  c = base_config()
  c.seed = 0
  c.data.name = arg or "gmm"
  c.objective.name = objective

  c.teacher.checkpoint = ""   # a toy teacher run directory (configs/toy/teacher.py)
  c.teacher.params = "ema"

  c.train.steps = steps
  c.train.batch_size = 256
  c.train.log_every = 100
  c.optim.lr = lr
  c.optim.b1 = b1
  c.optim.warmup_steps = warmup_steps
  c.optim.schedule = "constant"
  c.optim.grad_clip = grad_clip

  c.checkpoint.every_steps = 1000
  c.eval.num_samples = 4096
  c.eval.steps = (1, 2, 4)
  c.eval.teacher_steps = 64
  c.sample.num = 1024
  return c
