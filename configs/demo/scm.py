"""Demo sCM: the shipped digits DiT teacher distilled into a 1-4 step TrigFlow student (sCD).

    python -m launch.train --config configs/demo/scm.py --workdir runs/demo/scm
    python -m launch.demo --objective scm           # the same run, plus the report

The student is the teacher behind `flow_to_trigflow(sigma_data=0.5)`. It is sampled by
deterministic consistency steps (`eval.sampler = "tcd(gamma=0.0)"`: each step re-noises the
denoised estimate with the noise implied by the current state); sCM's own multistep sampler
(`--config.eval.sampler=trigflow`, fresh noise at every step) gives the same 1-step result and
worse 2- and 4-step results on this teacher (docs/results_demo.md).

About 5 minutes on 2 CPU cores (800 steps at ~3.5 steps/s plus compile and evaluation).
Expected result (eval.json, fd over 898 class-conditional samples; teacher 32 steps 20.7, data
floor 8.4): student 1 step ~21.9 (1.06x the teacher), 2 steps ~25.5, 4 steps ~33.5, coverage 1.
"""
from configs.demo.common import demo_distill_config


def get_config(arg: str = ""):
  del arg
  c = demo_distill_config("scm", steps=800, lr=2e-4, warmup_steps=50, grad_clip=1.0)
  c.objective.mode = "scd"
  c.objective.init = "teacher"
  c.objective.sigma_data = 0.5
  c.objective.p_mean = -1.0
  c.objective.p_std = 1.4
  c.objective.tangent_warmup = 100
  c.objective.tangent_norm = 0.1
  c.objective.adaptive_weight = True
  c.objective.guidance_scales = (1.0,)
  c.objective.label_dropout = 0.1
  c.objective.ema_decay = 0.995      # the student is sampled from its EMA (~200-step horizon)
  c.eval.sampler = "tcd(gamma=0.0)"
  return c
