"""Toy 2-D segmented consistency distillation (PCM / MLCM / Hyper-SD TSCD) from a toy flow
teacher.

    python -m launch.train --config configs/toy/teacher.py:gmm --workdir runs/toy_teacher_gmm
    python -m launch.train --config configs/toy/segmented_cm.py:gmm --workdir runs/toy_pcm_gmm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm

The argument picks the dataset (gmm, checkerboard, moons, spiral; default gmm) and must match
the teacher's. Four segments over a 48-step DDIM grid: the student maps every state to its
segment's lower edge, and the 4-step `ddim` sampler walks the edges. Hyper-SD's progressive
8 -> 4 -> 2 -> 1 segments as engine stages (each stage's evaluated student, the EMA, becomes the
next teacher and restarts the student):
`--config.objective.segment_stages="(8,4,2,1)" --config.objective.stage_steps=500`. MLCM's
training states on the teacher's own trajectories: `--config.objective.states=teacher`.

About 1-1.5 minutes on 2 CPU cores. Expected result (eval.json, SWD over 4096 samples; 3 seeds
in docs/results_toy.md): the 4-step student closes 99-100% of the teacher's 1 vs 64-step gap
(gmm 0.122, checkerboard 0.057, spiral 0.096); its 1-step samples are not what it learns.
"""
from configs.toy.common import toy_distill_config


def get_config(arg: str = "gmm"):
  c = toy_distill_config(arg, "segmented_cm", steps=800, lr=1e-4, warmup_steps=100,
                         grad_clip=1.0)
  c.objective.num_ddim_steps = 48
  c.objective.num_segments = 4
  c.objective.target = "ema"
  c.objective.target_decay = 0.95
  c.objective.loss = "l2"
  c.objective.label_dropout = 0.1
  return c
