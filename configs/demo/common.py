"""What every demo distillation config shares: the bundled digits at their own 8x8, the shipped
DiT teacher (configs/demo/teacher_ckpt, made by configs/demo/teacher.py), the training loop and the
evaluation: FD in the digit classifier's features over 898 class-conditional samples (half the
digits, so the data floor compares two disjoint real halves), the student at 1, 2 and 4 steps,
the teacher at 1 and 32 Euler steps."""
import os

from configs.common import distill_config

TEACHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "teacher_ckpt")


def demo_eval(c):
  """The demo's evaluation and sample-grid settings (teacher training shares them)."""
  c.data.name = "digits"
  c.data.size = 8          # the scans' own resolution (the classifier and grids upsample)
  c.eval.num_samples = 898
  c.eval.steps = (1, 2, 4)
  c.eval.teacher_steps = 32
  c.eval.class_conditional = True
  c.sample.num = 100       # a 10 x 10 grid, one digit per column
  return c


def demo_distill_config(objective: str, *, steps: int, lr: float, batch_size: int = 64,
                        b1: float = 0.9, warmup_steps: int = 0, grad_clip: float = 0.0):
  c = demo_eval(distill_config(objective, teacher=TEACHER, steps=steps, batch_size=batch_size,
                               lr=lr, b1=b1, warmup_steps=warmup_steps, grad_clip=grad_clip,
                               log_every=25, checkpoint_every=100))
  # launch.demo sets eval.update_teacher_cache: the teacher rows it computes go into the shipped
  # teacher's cache; a plain `launch.train` of these configs only reads that cache.
  return c
