"""CLIP (vision and text towers) in Flax, weights from a transformers `CLIPModel`, and CLIP score.

Vision tower (ViT), images (N, S, S, 3) already preprocessed (see `preprocess`):
    patch conv (p x p, stride p, no bias) -> (N, (S/p)^2, D); prepend the class embedding; add
    the learned position embedding; `pre_layrnorm`; L pre-LN encoder layers; take the class
    token; `post_layernorm`; `visual_projection` (no bias)  -> image embeds (N, P).
Text tower, token ids (N, T), T <= max_position_embeddings (77):
    token + position embeddings; L pre-LN encoder layers with a causal mask; `final_layer_norm`;
    pool the hidden state at the end-of-text token; `text_projection` (no bias) -> (N, P).
    The EOS position is found as transformers does: for configs with the legacy
    `eos_token_id == 2` (the original OpenAI checkpoints) the argmax of the token ids (EOT,
    49407, is the largest id), otherwise the first position equal to `eos_token_id`.
Encoder layer: x + attn(LN1(x)), then x + fc2(act(fc1(LN2(x)))); multi-head attention with
q/k/v/out projections (with bias), scale head_dim^-1/2; act = quick_gelu (x sigmoid(1.702 x))
or gelu (exact, erf), from the config's `hidden_act`.

Tokenisation is not done here: the caller passes token ids from CLIP's tokenizer (e.g.
transformers' `CLIPTokenizer(..., padding="max_length", max_length=77)`). The attention mask
of padded prompts is not needed: with the causal mask the EOS token (pooled) attends only to
the tokens before it, never to the padding after it.

`preprocess(images, size)`: images (N, H, W, 3) in [-1, 1] -> CLIP's input, as
`CLIPImageProcessor`: map to [0, 1]; resize the shorter side to `size` (the other side
int(size * long / short)) with bicubic interpolation (Keys cubic a = -0.5, as PIL's BICUBIC,
widened when shrinking = antialiased, as PIL; `jax.image.resize(method="cubic")`), clipped to
[0, 1] as PIL's 8-bit output is; centre crop `size` x `size` (top = (h - size) // 2); normalise
with CLIP's mean (0.48145466, 0.4578275, 0.40821073) and std (0.26862954, 0.26130258,
0.27577711). It differs from the PIL path only by PIL's 8-bit rounding of the resized image.

CLIP score (torchmetrics' `CLIPScore` definition):
    clip_score = max(100 * mean_i cos(E_img(x_i), E_txt(t_i)), 0)
the mean over pairs of 100 x the cosine similarity of the embeddings, clamped at 0 after
averaging (torchmetrics clamps the mean; the per-pair clamp of Hessel et al.'s CLIP-S is
`np.maximum(pair_scores, 0).mean()` of `clip_scores`).

Weights: `load(dir)` reads a transformers `CLIPModel` directory (config.json +
model.safetensors, sharded safetensors or pytorch_model.bin) without network access;
`from_state_dict(config, state_dict)` and `from_transformers(model)` convert strictly (one
ValueError for every missing, unexpected or mis-shaped key; `position_ids` buffers ignored).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill.metrics import extract
from distill.metrics import weights as weights_lib

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """The architecture (transformers' CLIPConfig fields that matter for inference)."""
  text: TowerConfig = TowerConfig(512, 2048, 12, 8)
  vision: TowerConfig = TowerConfig(768, 3072, 12, 12)
  vocab_size: int = 49408
  max_position_embeddings: int = 77
  eos_token_id: int = 49407
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  projection_dim: int = 512

  @classmethod
  def from_transformers(cls, config: Any) -> "CLIPConfig":
    """From a transformers CLIPConfig or its dict (config.json); absent keys take transformers'
    defaults. Unsupported settings raise."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text = dict(d.get("text_config") or d.get("text_config_dict") or {})
    vision = dict(d.get("vision_config") or d.get("vision_config_dict") or {})
    base = cls()

    def tower(c: dict, default: TowerConfig) -> TowerConfig:
      t = TowerConfig(
          c.get("hidden_size", default.hidden_size),
          c.get("intermediate_size", default.intermediate_size),
          c.get("num_hidden_layers", default.num_hidden_layers),
          c.get("num_attention_heads", default.num_attention_heads),
          c.get("hidden_act", default.hidden_act),
          float(c.get("layer_norm_eps", default.layer_norm_eps)))
      if t.hidden_act not in ACTIVATIONS:
        raise ValueError(f"CLIP hidden_act {t.hidden_act!r} is not supported "
                         f"({sorted(ACTIVATIONS)})")
      if t.hidden_size % t.num_attention_heads:
        raise ValueError(f"hidden_size {t.hidden_size} is not a multiple of "
                         f"num_attention_heads {t.num_attention_heads}")
      return t

    return cls(
        text=tower(text, base.text), vision=tower(vision, base.vision),
        vocab_size=text.get("vocab_size", base.vocab_size),
        max_position_embeddings=text.get("max_position_embeddings",
                                         base.max_position_embeddings),
        eos_token_id=text.get("eos_token_id", base.eos_token_id),
        image_size=vision.get("image_size", base.image_size),
        patch_size=vision.get("patch_size", base.patch_size),
        num_channels=vision.get("num_channels", base.num_channels),
        projection_dim=d.get("projection_dim", base.projection_dim))


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: nn.gelu(x, approximate=False)}


class Attention(nn.Module):
  cfg: TowerConfig
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x, mask=None):
    d, h = self.cfg.hidden_size, self.cfg.num_attention_heads
    dense = lambda name: nn.Dense(d, precision=self.precision, name=name)  # noqa: E731
    split = lambda t: t.reshape(t.shape[:-1] + (h, d // h))  # noqa: E731
    q, k, v = (split(dense(n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision) * (d // h) ** -0.5
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    w = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", w, v, precision=self.precision)
    return dense("out_proj")(out.reshape(x.shape))


class MLP(nn.Module):
  cfg: TowerConfig
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.cfg.intermediate_size, precision=self.precision, name="fc1")(x)
    x = ACTIVATIONS[self.cfg.hidden_act](x)
    return nn.Dense(self.cfg.hidden_size, precision=self.precision, name="fc2")(x)


class EncoderLayer(nn.Module):
  cfg: TowerConfig
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x, mask=None):
    ln = lambda name: nn.LayerNorm(self.cfg.layer_norm_eps, name=name)  # noqa: E731
    x = x + Attention(self.cfg, self.precision, name="self_attn")(ln("layer_norm1")(x), mask)
    return x + MLP(self.cfg, self.precision, name="mlp")(ln("layer_norm2")(x))


class Encoder(nn.Module):
  cfg: TowerConfig
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x, mask=None):
    for i in range(self.cfg.num_hidden_layers):
      x = EncoderLayer(self.cfg, self.precision, name=f"layers_{i}")(x, mask)
    return x


class VisionEmbeddings(nn.Module):
  cfg: CLIPConfig
  precision: Any = "highest"

  @nn.compact
  def __call__(self, pixels):
    c, d = self.cfg, self.cfg.vision.hidden_size
    p = c.patch_size
    x = nn.Conv(d, (p, p), (p, p), padding="VALID", use_bias=False, name="patch_embedding",
                precision=self.precision)(pixels)
    x = x.reshape(x.shape[0], -1, d)
    cls = self.param("class_embedding", nn.initializers.normal(1.0), (d,))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, d)), x], axis=1)
    pos = nn.Embed((c.image_size // p) ** 2 + 1, d, name="position_embedding").embedding
    return x + pos[None]


class VisionTransformer(nn.Module):
  cfg: CLIPConfig
  precision: Any = "highest"

  @nn.compact
  def __call__(self, pixels):
    c = self.cfg
    if pixels.shape[1:] != (c.image_size, c.image_size, c.num_channels):
      raise ValueError(f"CLIP vision input must be (N, {c.image_size}, {c.image_size}, "
                       f"{c.num_channels}) (see clip.preprocess), got {pixels.shape}")
    eps = c.vision.layer_norm_eps
    x = VisionEmbeddings(c, self.precision, name="embeddings")(pixels)
    x = nn.LayerNorm(eps, name="pre_layrnorm")(x)  # transformers' spelling
    x = Encoder(c.vision, self.precision, name="encoder")(x)
    return nn.LayerNorm(eps, name="post_layernorm")(x[:, 0])


class TextEmbeddings(nn.Module):
  cfg: CLIPConfig

  @nn.compact
  def __call__(self, ids):
    d = self.cfg.text.hidden_size
    tok = nn.Embed(self.cfg.vocab_size, d, name="token_embedding")(ids)
    pos = nn.Embed(self.cfg.max_position_embeddings, d, name="position_embedding").embedding
    return tok + pos[None, :ids.shape[1]]


class TextTransformer(nn.Module):
  cfg: CLIPConfig
  precision: Any = "highest"

  @nn.compact
  def __call__(self, ids):
    c = self.cfg
    if ids.ndim != 2 or ids.shape[1] > c.max_position_embeddings:
      raise ValueError(f"token ids must be (N, T) with T <= {c.max_position_embeddings}, got "
                       f"{ids.shape}")
    x = TextEmbeddings(c, name="embeddings")(ids)
    t = ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
    x = Encoder(c.text, self.precision, name="encoder")(x, causal)
    x = nn.LayerNorm(c.text.layer_norm_eps, name="final_layer_norm")(x)
    eos = jnp.argmax(ids, axis=-1) if c.eos_token_id == 2 else jnp.argmax(
        (ids == c.eos_token_id).astype(jnp.int32), axis=-1)
    return x[jnp.arange(x.shape[0]), eos]


class CLIPModel(nn.Module):
  """transformers' CLIPModel for embeddings: `get_image_features(pixels)` (preprocessed, NHWC),
  `get_text_features(ids)`, and `__call__(pixels, ids) -> (image_embeds, text_embeds)`
  (projected, not normalised)."""
  cfg: CLIPConfig = CLIPConfig()
  precision: Any = "highest"

  def setup(self):
    c, p = self.cfg, self.precision
    self.vision_model = VisionTransformer(c, p)
    self.text_model = TextTransformer(c, p)
    self.visual_projection = nn.Dense(c.projection_dim, use_bias=False, precision=p)
    self.text_projection = nn.Dense(c.projection_dim, use_bias=False, precision=p)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), ())

  def get_image_features(self, pixels):
    return self.visual_projection(self.vision_model(jnp.asarray(pixels, jnp.float32)))

  def get_text_features(self, ids):
    return self.text_projection(self.text_model(jnp.asarray(ids, jnp.int32)))

  def __call__(self, pixels, ids):
    return self.get_image_features(pixels), self.get_text_features(ids)


# ----------------------------------------------------------------------------------------------
# Preprocessing and the score.

def preprocess(images, size: int) -> jax.Array:
  """Images (N, H, W, 3) in [-1, 1] -> CLIP's normalised (N, size, size, 3) input (module doc)."""
  x = (jnp.asarray(images, jnp.float32) + 1.0) / 2.0
  n, h, w, ch = x.shape
  if (h, w) != (size, size):
    if h <= w:
      nh, nw = size, int(size * w / h)
    else:
      nh, nw = int(size * h / w), size
    x = jnp.clip(jax.image.resize(x, (n, nh, nw, ch), method="cubic", antialias=True), 0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, top:top + size, left:left + size]
  return (x - jnp.asarray(MEAN)) / jnp.asarray(STD)


def _normalise(e):
  return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def embed_pairs(module: CLIPModel, variables, images, token_ids, *,
                preprocessed: bool = False) -> dict[str, jax.Array]:
  """`{"clip_score": (N,) 100 * cos per pair, "image_embeds", "text_embeds"}` (projected, not
  normalised) of images in [-1, 1] and token ids (pure, jit-able)."""
  pixels = images if preprocessed else preprocess(images, module.cfg.image_size)
  img, txt = module.apply(variables, pixels, token_ids)
  score = 100.0 * jnp.sum(_normalise(img) * _normalise(txt), axis=-1)
  return {"clip_score": score, "image_embeds": img, "text_embeds": txt}


class CLIPScorer:
  """CLIP score of (images, token ids) pairs, data-parallel over the local devices."""

  def __init__(self, module: CLIPModel, variables, *, batch_size: int = 64, devices=None):
    self.module = module

    def fn(v, batch):
      images, ids = batch
      if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 127.5 - 1.0
      return embed_pairs(module, v, images, ids)

    self.extractor = extract.FeatureExtractor(fn, variables, batch_size=batch_size,
                                              devices=devices)

  def outputs(self, images, token_ids) -> dict[str, np.ndarray]:
    """`embed_pairs` of all pairs (images (N, H, W, 3) in [-1, 1] or uint8, ids (N, T))."""
    images, token_ids = np.asarray(images), np.asarray(token_ids, np.int32)
    if len(images) != len(token_ids):
      raise ValueError(f"{len(images)} images but {len(token_ids)} prompts")
    return self.extractor((images, token_ids))

  def pair_scores(self, images, token_ids) -> np.ndarray:
    """(N,) 100 * cos(image, text) per pair."""
    return self.outputs(images, token_ids)["clip_score"]

  def __call__(self, images, token_ids) -> float:
    """torchmetrics' CLIP score: max(mean of `pair_scores`, 0)."""
    return score_from_pairs(self.pair_scores(images, token_ids))


def score_from_pairs(pair_scores) -> float:
  """max(mean(pair scores), 0): torchmetrics clamps the mean, not each pair."""
  return float(max(np.mean(np.asarray(pair_scores, np.float64)), 0.0))


def clip_score(module: CLIPModel, variables, images, token_ids, *, batch_size: int = 64,
               devices=None) -> float:
  """max(100 * mean cos(image, text), 0) over the pairs (torchmetrics' definition)."""
  return CLIPScorer(module, variables, batch_size=batch_size, devices=devices)(images, token_ids)


# ----------------------------------------------------------------------------------------------
# Weights.

def param_shapes(module: CLIPModel) -> dict[tuple, tuple]:
  c = module.cfg
  abstract = jax.eval_shape(
      module.init, jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, c.image_size, c.image_size, c.num_channels), jnp.float32),
      jax.ShapeDtypeStruct((1, 2), jnp.int32))
  return weights_lib.shapes_of(abstract["params"])


def _ignored(key: str) -> bool:
  return key.endswith("position_ids")


def from_state_dict(config: Any, state_dict: Mapping[str, Any], *, what: str = "CLIP state dict",
                    precision: Any = "highest") -> tuple[CLIPModel, dict]:
  """`(module, {"params": ...})` from a transformers CLIPConfig (or dict) and CLIPModel state
  dict, strictly."""
  cfg = config if isinstance(config, CLIPConfig) else CLIPConfig.from_transformers(config)
  module = CLIPModel(cfg, precision)
  params = weights_lib.params_from_state_dict(state_dict, param_shapes(module), what=what,
                                              lists=("layers",), ignore=_ignored)
  return module, {"params": params}


def from_transformers(model, **kwargs) -> tuple[CLIPModel, dict]:
  """From a transformers `CLIPModel` instance."""
  return from_state_dict(model.config, model.state_dict(), **kwargs)


def _state_dict_of_dir(path: str) -> tuple[dict, str]:
  single = os.path.join(path, "model.safetensors")
  index = single + ".index.json"
  if os.path.isfile(single):
    return weights_lib.load_state_dict(single), single
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    sd = {}
    for shard in shards:
      sd.update(weights_lib.load_state_dict(os.path.join(path, shard)))
    return sd, index
  binary = os.path.join(path, "pytorch_model.bin")
  if os.path.isfile(binary):
    return weights_lib.load_state_dict(binary), binary
  raise FileNotFoundError(f"{path}: no model.safetensors, sharded index or pytorch_model.bin "
                          "(CLIP weights are never downloaded; pass a local CLIPModel directory)")


def load(path: str, *, precision: Any = "highest") -> tuple[CLIPModel, dict]:
  """`(module, variables)` from a local transformers CLIPModel directory (no network)."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{path}: no config.json (expected a transformers CLIPModel "
                            "directory; weights are never downloaded)")
  with open(cfg_path) as f:
    config = json.load(f)
  state_dict, file = _state_dict_of_dir(path)
  return from_state_dict(config, state_dict, what=f"{file} (CLIP weights)", precision=precision)


def load_scorer(path: str, *, batch_size: int = 64, devices=None) -> CLIPScorer:
  module, variables = load(path)
  return CLIPScorer(module, variables, batch_size=batch_size, devices=devices)
