"""What every toy 2-D distillation config shares: the dataset argument, the teacher slot (a toy
teacher run directory, configs/toy/teacher.py, given on the command line), the training loop
(batch 256), checkpoints and the evaluation (SWD over 4096 unconditional samples; student at
1, 2 and 4 steps; teacher at 1 and 64 steps)."""
from configs.common import distill_config


def toy_distill_config(arg: str, objective: str, *, steps: int, lr: float = 1e-4,
                       b1: float = 0.9, warmup_steps: int = 0, grad_clip: float = 0.0):
  c = distill_config(objective, teacher="", steps=steps, batch_size=256, lr=lr, b1=b1,
                     warmup_steps=warmup_steps, grad_clip=grad_clip)
  c.data.name = arg or "gmm"
  c.eval.num_samples = 4096
  c.eval.steps = (1, 2, 4)
  c.eval.teacher_steps = 64
  c.sample.num = 1024
  return c
