"""The image metrics of an evaluation: FID, sFID, Inception Score, precision/recall and CLIP score,
behind the names of `distill.evaluation.METRICS`, with what they need beyond `(samples,
reference)` held by a `MetricSetup` (built from the `eval.*` config keys).

Names (`eval.metrics`) and the keys each one adds to every eval.json row:

    fid    {"fid"}                        FID, pool features of the FID Inception (fid.py)
    sfid   {"sfid"}                       sFID, its spatial features (needs mu_s in the stats)
    is     {"is", "is_std"}               Inception Score over 10 splits (needs >= 10 samples)
    pr     {"pr", "precision", "recall"}  improved precision / recall, k = 3; "pr" is their
                                          harmonic mean (one number to rank by)
    clip   {"clip"}                       CLIP score (clip.py), sample i with prompt row i

One Inception pass per sample set serves every Inception name of the evaluation (the features
of the last scored set are kept, keyed by the array's identity), so `fid,is,pr` costs one pass.

Images. Samples of image data sets (N, H, W, 1 or 3) in [-1, 1] are scored as they would be
saved: clipped to [-1, 1] and rounded to 8 bits (as ADM's evaluator reads PNG samples);
grayscale is repeated to RGB. Latent data sets need `eval.vae`, a diffusers AutoencoderKL
directory: samples and reference latents are decoded with `decode_latents` (the data's scaled
latents -> images) batch by batch, data-parallel over the local devices, and never held as
images all at once. `eval.inception_size` (default 299, the standard) is the side the images
are resized to; smaller sizes (>= 75) are for quick checks only and not comparable with
published numbers.

Reference statistics. The reference of an evaluation is `source.reference(num_samples, seed)`;
its Inception statistics are computed once per process (keyed by what determines them: the
data's content hash, sample count, seed, the Inception weights, input size and the decoder) and,
with `eval.reference_stats`, stored in that .npz (fid.py's keys, with the pool features for
precision/recall and a `meta` record of the key) or read from it when it exists. A file of ours
whose `meta` differs raises one line naming what differs; a published file without `meta`
(pytorch-fid's mu / sigma, an ADM reference batch) is used as it is (precision/recall then need
a file written here, with features), at the standard input size only: with another
`eval.inception_size`, or dimensions other than the FID Inception's, it stops with one line.
Only process 0 writes the file.

Few samples. With fewer samples than feature dimensions (e.g. `eval.num_samples` 256 during
training) the covariances are singular: the FID then goes through the features
(`frechet.frechet_distance_features`, exact and fast; against a published file without
features, `frechet.frechet_distance_features_moments`, the samples' features against its
moments) instead of the 2048 x 2048 square root.
sFID keeps only moments of its features, so it stays on the square root with its eps fallback
(finite, but slow at 299: 2023-d). Minimum sizes are checked before any sampling, with one line
naming `eval.num_samples`.

CLIP score. Pairs sample i with prompt i: token ids (N, 77) from CLIP's tokenizer, given as
`MetricSetup.prompt_tokens` by the caller (e.g. the token ids of the captions the samples were
generated for) or read from `eval.clip_tokens` (a .npy, row i the prompt of sample i, aligned
with the prompt embeddings the sampler uses). Without either the metric stops with one line
naming `eval.clip_tokens`. `distill.evaluation` samples text-to-image data with the prompts of
`Source.conditions` (sample i from prompt i) and passes the `clip_tokens` the data gives for
them as `prompt_tokens` (unless `eval.clip_tokens` is set); so prompts are checked when the
evaluation starts (`check`), not by the config-time file check.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Iterator, Optional, Sequence

import numpy as np

INCEPTION_NAMES = ("fid", "sfid", "is", "pr")
NAMES = INCEPTION_NAMES + ("clip",)
# Score groups of `fid.InceptionMetrics.scores` each name needs.
_GROUPS = {"fid": "fid", "sfid": "sfid", "is": "inception_score", "pr": "precision_recall"}
# Fewest samples each name can score (IS: one per split; P/R: more than k = 3).
_MIN_SAMPLES = {"fid": 2, "sfid": 2, "is": 10, "pr": 4, "clip": 1}
_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


class MetricError(ValueError):
  """A metric cannot run as configured; its message is one line naming the config key."""


# ----------------------------------------------------------------------------------------------
# Identities of the files the numbers depend on.

@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime: int) -> str:
  del size, mtime  # part of the cache key only
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()[:16]


def file_digest(path: str) -> str:
  """sha256 (16 hex digits) of a file's bytes, of a directory's files (sorted by name)."""
  path = os.path.abspath(path)
  if os.path.isdir(path):
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
      full = os.path.join(path, name)
      if os.path.isfile(full):
        h.update(name.encode())
        h.update(file_digest(full).encode())
    return h.hexdigest()[:16]
  st = os.stat(path)
  return _file_digest(path, st.st_size, st.st_mtime_ns)


# ----------------------------------------------------------------------------------------------
# Networks, loaded once per process.

def _quantise(x, xp=np):
  """Images in [-1, 1] -> uint8 [0, 255]: clipped, rounded half to even (`xp`: numpy or
  jax.numpy)."""
  return xp.round(xp.clip((x + 1.0) * 127.5, 0.0, 255.0)).astype(xp.uint8)


@functools.lru_cache(maxsize=2)
def _decoder(path: str, batch_size: int):
  """A data-parallel `decode_latents` of the AutoencoderKL in diffusers directory `path`,
  returning uint8 images."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from models import convert  # pylint: disable=import-outside-toplevel
  from distill.metrics import extract  # pylint: disable=import-outside-toplevel
  module, variables = convert.load_diffusers_dir(path)
  if not hasattr(module, "decode_latents"):
    raise MetricError(f"eval.vae: {path!r} is a {type(module).__name__}, not an AutoencoderKL")

  def fn(v, z):
    return {"images": _quantise(module.apply(v, z, method="decode_latents"), jnp)}
  return extract.FeatureExtractor(fn, variables, batch_size=batch_size)


def decode_latents(vae: str, z: np.ndarray, batch_size: int) -> np.ndarray:
  """uint8 images of latents `z` decoded by the AutoencoderKL in diffusers directory `vae`
  (data-parallel over every device, `batch_size` per call)."""
  return _decoder(os.path.abspath(vae), int(batch_size))(np.asarray(z, np.float32))["images"]


@functools.lru_cache(maxsize=2)
def _clip_scorer(path: str, batch_size: int):
  from distill.metrics import clip  # pylint: disable=import-outside-toplevel
  return clip.load_scorer(path, batch_size=batch_size)


# Reference statistics by key (one set at a time: its features can be large), and data floors.
_REFERENCES: dict[str, dict] = {}
_FLOORS: dict[str, dict] = {}


def floor_cache() -> dict:
  """Data-floor rows of setup metrics already computed in this process (by setup and data)."""
  return _FLOORS


# ----------------------------------------------------------------------------------------------
# The setup.

@dataclasses.dataclass
class MetricSetup:
  """What the metrics of one evaluation need beyond `(samples, reference)`.

  `metrics`: every metric name of the evaluation (so one pass computes them all). The file and
  directory fields are the `eval.*` keys of the same names. `bind` records which reference the
  evaluation compares against (its statistics are cached under that key).
  """
  metrics: Sequence[str] = ()
  inception_weights: str = ""
  reference_stats: str = ""
  inception_size: int = 299
  vae: str = ""
  clip: str = ""
  clip_tokens: str = ""
  batch_size: int = 200
  prompt_tokens: Optional[np.ndarray] = None
  reference_meta: Optional[dict] = None
  _last: Optional[tuple] = dataclasses.field(default=None, repr=False)

  @classmethod
  def from_config(cls, eval_cfg, metrics: Sequence[str]) -> "MetricSetup":
    """From the `eval` config section (the keys documented in distill/config.py)."""
    g = eval_cfg.get
    return cls(metrics=tuple(metrics), inception_weights=g("inception_weights", ""),
               reference_stats=g("reference_stats", ""),
               inception_size=int(g("inception_size", 299)), vae=g("vae", ""),
               clip=g("clip", ""), clip_tokens=g("clip_tokens", ""),
               batch_size=int(g("feature_batch", 200)))

  # -- which metrics, checks before any work ---------------------------------------------------

  @property
  def inception_names(self) -> tuple[str, ...]:
    return tuple(m for m in self.metrics if m in INCEPTION_NAMES)

  @property
  def active(self) -> bool:
    """Whether any metric of the evaluation uses this setup."""
    return any(m in NAMES for m in self.metrics)

  def check_files(self) -> None:
    """Raises MetricError (one line naming the key) for missing files the metrics need."""
    if not self.active:
      return
    names = [m for m in self.metrics if m in NAMES]
    if self.inception_names:
      if not self.inception_weights:
        raise MetricError(f"metric {self.inception_names[0]!r} needs eval.inception_weights: "
                          f"the path of pytorch-fid's {_INCEPTION_FILE}")
      if not os.path.isfile(self.inception_weights):
        raise MetricError(f"eval.inception_weights: {self.inception_weights!r} does not exist")
    if "clip" in names:
      if not self.clip:
        raise MetricError("metric 'clip' needs eval.clip: a transformers CLIPModel directory")
      if not os.path.isdir(self.clip):
        raise MetricError(f"eval.clip: {self.clip!r} is not a directory")
      if (self.prompt_tokens is None and self.clip_tokens
          and not os.path.isfile(self.clip_tokens)):
        raise MetricError(f"eval.clip_tokens: {self.clip_tokens!r} does not exist")
    if self.vae and not os.path.isfile(os.path.join(self.vae, "config.json")):
      raise MetricError(f"eval.vae: {self.vae!r} is not a diffusers AutoencoderKL directory "
                        "(no config.json)")

  def check(self, shape: Sequence[int], num_samples: int) -> None:
    """`check_files`, then what would fail later: data that is not images (and no
    `eval.vae`), too few samples, too few prompts."""
    if not self.active:
      return
    self.check_files()
    names = [m for m in self.metrics if m in NAMES]
    if not self.vae and (len(shape) != 3 or shape[-1] not in (1, 3)):
      raise MetricError(f"metric {names[0]!r} scores images (H, W, 1 or 3); the data are "
                        f"{tuple(shape)}: set eval.vae to the AutoencoderKL directory that "
                        "decodes them")
    for m in names:
      if num_samples < _MIN_SAMPLES[m]:
        raise MetricError(f"eval.num_samples: metric {m!r} needs at least {_MIN_SAMPLES[m]} "
                          f"samples, got {num_samples}")
    if "clip" in names:
      if self.prompt_tokens is None and not self.clip_tokens:
        raise MetricError("metric 'clip' needs prompts: the data's CLIP token ids "
                          "(clip_tokens.npy in the caption-embedding directory) or "
                          "eval.clip_tokens, a .npy of token ids (N, 77), row i the prompt of "
                          "sample i")
      tokens = self.tokens()
      if len(tokens) < num_samples:
        raise MetricError(f"eval.clip_tokens: {len(tokens)} prompts for {num_samples} samples "
                          "(row i is the prompt of sample i)")

  def identity(self) -> str:
    """What the metric values depend on besides the samples and the reference data (for the
    teacher row cache and the floor cache); "" when no metric here uses the setup."""
    if not self.active:
      return ""
    ident: dict[str, Any] = {}
    if self.inception_names:
      ident["inception"] = file_digest(self.inception_weights)
      ident["size"] = int(self.inception_size)
      # A file of ours is determined by its meta (data, size, seed, networks: in the row key
      # already); a published one by its content.
      stats = (self._load_stats() if self.reference_stats
               and os.path.isfile(self.reference_stats) else {"meta": None})
      if "meta" not in stats:
        ident["reference"] = hashlib.sha256(
            np.ascontiguousarray(stats["mu"], np.float64).tobytes()).hexdigest()[:16]
    if self.vae:
      ident["vae"] = file_digest(self.vae)
    if "clip" in self.metrics:
      ident["clip"] = file_digest(self.clip)
      ident["prompts"] = hashlib.sha256(np.ascontiguousarray(self.tokens()).tobytes()
                                        ).hexdigest()[:16]
    return json.dumps(ident, sort_keys=True)

  # -- inputs -----------------------------------------------------------------------------------

  def tokens(self) -> np.ndarray:
    if self.prompt_tokens is not None:
      return np.asarray(self.prompt_tokens, np.int32)
    return _load_tokens(self.clip_tokens)

  def image_batches(self, x: np.ndarray) -> Iterator[np.ndarray]:
    """uint8 image batches of samples `x`: decoded with `eval.vae` when set (module doc)."""
    bs = max(1, int(self.batch_size))
    for i in range(0, len(x), bs):
      chunk = np.asarray(x[i:i + bs])
      if self.vae:
        yield decode_latents(self.vae, chunk, bs)
      else:
        yield _quantise(chunk.astype(np.float32))

  def _inception(self):
    from distill.metrics import fid  # pylint: disable=import-outside-toplevel
    options = (("gram", True), ("size", int(self.inception_size)))
    return fid._metrics(os.fspath(self.inception_weights), int(self.batch_size), options)  # pylint: disable=protected-access

  # -- reference statistics ------------------------------------------------------------------------

  def bind(self, *, data_hash: str, num_samples: int, seed: int) -> "MetricSetup":
    """Records the evaluation's reference (`source.reference(num_samples, seed)` of the data
    with `data_hash`): the key of its statistics."""
    self.reference_meta = {"data": data_hash, "num_samples": int(num_samples),
                           "seed": int(seed)}
    return self

  def _stats_meta(self, reference: Optional[np.ndarray]) -> dict:
    meta = dict(self.reference_meta or {})
    if not meta:  # not bound: the reference array's content is the key
      from distill.metrics import fid  # pylint: disable=import-outside-toplevel
      meta = {"reference_sha1": fid.fingerprint(np.asarray(reference)),
              "num_samples": int(len(reference))}
    meta.update(inception=file_digest(self.inception_weights), size=int(self.inception_size),
                decoder=file_digest(self.vae) if self.vae else "")
    return meta

  def _load_stats(self) -> dict:
    from distill.metrics import fid  # pylint: disable=import-outside-toplevel
    try:
      return fid.load_stats(self.reference_stats)
    except (ValueError, OSError) as e:
      raise MetricError(f"eval.reference_stats: {e}") from None

  def reference_statistics(self, reference: Optional[np.ndarray]) -> dict:
    """The reference's Inception statistics: from memory, from `eval.reference_stats` (checked
    against this evaluation's key), or computed from `reference` (and written to the file)."""
    from distill.metrics import fid  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    meta = self._stats_meta(reference)
    key = json.dumps([meta, os.path.abspath(self.reference_stats or "")], sort_keys=True)
    if key in _REFERENCES:
      return _REFERENCES[key]
    path = self.reference_stats
    if path and os.path.exists(path):
      stats = self._load_stats()
      if "meta" in stats and stats["meta"] != meta:
        old = stats["meta"]
        diff = ", ".join(f"{k}: {_short(old.get(k))} vs {_short(meta.get(k))}"
                         for k in sorted(set(old) | set(meta)) if old.get(k) != meta.get(k))
        raise MetricError(f"eval.reference_stats: {path} was computed for other data or "
                          f"settings (file vs this evaluation: {diff}); delete it to recompute "
                          "or point eval.reference_stats elsewhere")
      if "meta" not in stats:
        _check_published(path, stats, int(self.inception_size))
    else:
      if reference is None:
        raise MetricError("eval.reference_stats: no statistics file and no reference data")
      m = self._inception()
      stats = m.reference(self.image_batches(reference), cache=None)
      if path and jax.process_index() == 0:
        fid.save_stats(path, stats, meta)
      stats = dict(stats, meta=meta)
    if "pr" in self.metrics and "features" not in stats:
      raise MetricError(f"eval.reference_stats: {path} has no pool features (published "
                        "statistics): metric 'pr' needs a file written by this project; point "
                        "eval.reference_stats at a new path")
    _REFERENCES.clear()
    _REFERENCES[key] = stats
    return stats

  # -- scores ---------------------------------------------------------------------------------------

  def inception_scores(self, samples: np.ndarray, reference: Optional[np.ndarray]) -> dict:
    """Every Inception score the evaluation asks for, of `samples` against the reference (one
    feature pass; the last set's scores are kept for the other names of the same row)."""
    if self._last is not None and self._last[0] is samples:
      return self._last[1]
    stats = self.reference_statistics(reference)
    m = self._inception()
    groups = [_GROUPS[n] for n in self.inception_names]
    out = m.scores(m.features(self.image_batches(samples)), stats, which=groups)
    scores: dict[str, float] = {}
    if "fid" in out:
      scores["fid"] = out["fid"]
    if "sfid" in self.metrics:
      if "sfid" not in out:
        raise MetricError(f"eval.reference_stats: {self.reference_stats} has no spatial "
                          "statistics (mu_s, sigma_s) for metric 'sfid'")
      scores["sfid"] = out["sfid"]
    if "inception_score" in out:
      scores["is"], scores["is_std"] = out["inception_score"], out["inception_score_std"]
    if "precision" in out:
      p, r = out["precision"], out["recall"]
      scores.update(pr=2 * p * r / (p + r) if p + r > 0 else 0.0, precision=p, recall=r)
    self._last = (samples, scores)
    return scores

  def clip_score(self, samples: np.ndarray) -> float:
    """CLIP score of sample i with prompt row i (torchmetrics' definition, clip.py)."""
    from distill.metrics import clip  # pylint: disable=import-outside-toplevel
    tokens = self.tokens()
    if len(tokens) < len(samples):
      raise MetricError(f"eval.clip_tokens: {len(tokens)} prompts for {len(samples)} samples")
    scorer = _clip_scorer(os.path.abspath(self.clip), int(self.batch_size))
    bs = max(1, int(self.batch_size))
    pairs = []
    for i, images in zip(range(0, len(samples), bs), self.image_batches(samples)):
      pairs.append(scorer.pair_scores(images, tokens[i:i + len(images)]))
    return clip.score_from_pairs(np.concatenate(pairs))


def _check_published(path: str, stats: dict, size: int) -> None:
  """A published statistics file (no `meta`: pytorch-fid's, an ADM reference batch) holds the
  FID Inception's features of 299 x 299 inputs: 2048 pool dimensions (and 2023 spatial ones).
  Another `eval.inception_size`, or a file of other features, stops with one line (its
  numbers would not be FIDs against that file)."""
  from distill.metrics import inception  # pylint: disable=import-outside-toplevel
  dims = {"mu": inception.POOL_DIM, "mu_s": 2023}   # 2023: 17 x 17 x 7 spatial features
  got = {k: tuple(np.shape(stats[k])) for k in dims if k in stats}
  bad = [f"{k} {got[k]} (expected ({n},))" for k, n in dims.items() if k in got
         and got[k] != (n,)]
  if bad:
    raise MetricError(f"eval.reference_stats: {path} holds no FID Inception statistics of "
                      f"299 x 299 images: {', '.join(bad)}")
  if size != inception.SIZE:
    raise MetricError(f"eval.reference_stats: {path} is a published statistics file (no meta "
                      f"record), measured at the standard {inception.SIZE} x {inception.SIZE} "
                      f"Inception input; eval.inception_size={size} is not comparable with it "
                      f"(use {inception.SIZE}, or a statistics path of your own that the "
                      "evaluation writes)")


@functools.lru_cache(maxsize=2)
def _load_tokens(path: str) -> np.ndarray:
  ids = np.load(path)
  if ids.ndim != 2:
    raise MetricError(f"eval.clip_tokens: expected token ids (N, 77), got shape {ids.shape}")
  return ids.astype(np.int32)


def _short(v) -> str:
  return repr(v[:12] + "..." if isinstance(v, str) and len(v) > 16 else v)


def _need(setup: Optional[MetricSetup], name: str) -> MetricSetup:
  if setup is None:
    raise MetricError(f"metric {name!r} needs the evaluation's MetricSetup (eval.* keys)")
  if name not in setup.metrics:
    setup = dataclasses.replace(setup, metrics=tuple(setup.metrics) + (name,), _last=None)
  return setup


# ----------------------------------------------------------------------------------------------
# The registered metric functions (distill/evaluation.py registers them by name).

def fid_metric(samples, reference, setup: Optional[MetricSetup] = None) -> dict:
  """{"fid"} (distill/metrics/fid.py)."""
  return {"fid": _need(setup, "fid").inception_scores(samples, reference)["fid"]}


def sfid_metric(samples, reference, setup: Optional[MetricSetup] = None) -> dict:
  """{"sfid"}: FID of the spatial features (mixed_6/conv)."""
  return {"sfid": _need(setup, "sfid").inception_scores(samples, reference)["sfid"]}


def is_metric(samples, reference, setup: Optional[MetricSetup] = None) -> dict:
  """{"is", "is_std"}: the Inception Score (the reference is not used)."""
  out = _need(setup, "is").inception_scores(samples, reference)
  return {"is": out["is"], "is_std": out["is_std"]}


def pr_metric(samples, reference, setup: Optional[MetricSetup] = None) -> dict:
  """{"pr", "precision", "recall"}; "pr" is the harmonic mean of precision and recall."""
  out = _need(setup, "pr").inception_scores(samples, reference)
  return {k: out[k] for k in ("pr", "precision", "recall")}


def clip_metric(samples, reference, setup: Optional[MetricSetup] = None) -> dict:
  """{"clip"}: CLIP score with the prompts of the setup (the reference is not used)."""
  del reference
  return {"clip": _need(setup, "clip").clip_score(samples)}


METRIC_FUNCTIONS = {"fid": fid_metric, "sfid": sfid_metric, "is": is_metric, "pr": pr_metric,
                    "clip": clip_metric}
