"""Toy 2-D SANA-Sprint: sCD + LADD (discriminator heads on the frozen teacher's features) from a
toy flow teacher with a dense time input.

    python -m launch.train --config configs/toy/teacher.py:gmm \
        --workdir runs/toy_teacher_gmm_dense --config.model.time_scale=0.001
    python -m launch.train --config configs/toy/scm_ladd.py:gmm --workdir runs/toy_scm_ladd_gmm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm_dense

The argument picks the dataset (gmm, checkerboard, moons, spiral; default gmm) and must match
the teacher's. The sCM part is configs/toy/scm.py's. LADD: one StyleGAN-T head (spectral norm,
BatchNormLocal) on the teacher's last block output (width 128 = the toy teacher's hidden size),
hinge losses, re-noising sigma = exp(N(-0.6, 1)), generator inputs at t = pi/2 half of the
time; the generator phase (sCM + 0.5 x adversarial) and the discriminator phase alternate step
by step, each on its own batch (SANA-Sprint's schedule), so 4000 steps are 2000 sCM updates.

About 4 minutes on 2 CPU cores. Expected result (eval.json, SWD over 4096 samples; 3 seeds in
docs/results_toy.md, "sCM + LADD"): the 1-step student closes at least 80% of the teacher's gap
between 1 and 64 Euler steps, 2 steps more.
"""
from configs.toy.scm import get_config as scm_config


def get_config(arg: str = "gmm"):
  c = scm_config(arg)
  c.objective.name = "scm_ladd"
  c.train.steps = 4000
  c.objective.feature_blocks = (-1,)
  c.objective.feature_dim = 128
  c.objective.adv_weight = 0.5
  c.objective.adv_loss = "hinge"
  c.objective.d_p_mean = -0.6
  c.objective.d_p_std = 1.0
  c.objective.max_time_prob = 0.5
  c.objective.alternate = True
  return c
