"""What every distillation recipe sets the same way: the objective, the teacher slot (its EMA
weights), the training loop with a constant learning rate after an optional warm-up, and the
checkpoint interval. Recipe families (configs/toy, configs/demo) add their data and evaluation."""
from distill.config import base_config


def distill_config(objective: str, *, teacher: str, steps: int, batch_size: int, lr: float,
                   b1: float = 0.9, warmup_steps: int = 0, grad_clip: float = 0.0,
                   log_every: int = 100, checkpoint_every: int = 1000):
  c = base_config()
  c.seed = 0
  c.objective.name = objective
  c.teacher.checkpoint = teacher
  c.teacher.params = "ema"

  c.train.steps = steps
  c.train.batch_size = batch_size
  c.train.log_every = log_every
  c.optim.lr = lr
  c.optim.b1 = b1
  c.optim.warmup_steps = warmup_steps
  c.optim.schedule = "constant"
  c.optim.grad_clip = grad_clip
  c.checkpoint.every_steps = checkpoint_every
  return c
