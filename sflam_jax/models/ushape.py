"""The U-shaped split of a ViT for split prompt tuning (SFPrompt, SPEC section 6.3).

The device holds both ends of the model, the server the middle:

- device, front: the embedding, ``prompt_len`` soft prompt tokens inserted after the class token
  (after the position embedding, as in visual prompt tuning) and the first ``head_blocks`` blocks;
- server, body: the blocks between, frozen, one copy for every client;
- device, back ("tail"): the last ``tail_blocks`` blocks, the final norm and the classifier.

Only the prompts and the tail train. Parameters keep the ViT's names, plus ``"prompts"``
``[prompt_len, D]``: the device's tree is ``{"embedding", "prompts", head blocks, tail blocks,
"head"}`` and the server's the body blocks, so a pretrained checkpoint splits without renaming.
With ``local_head`` the device also holds ``"local_head"``, a second final norm + classifier
(started as a copy of ``"head"``) that reads the front's class token: the body-skipping path
(``local_logits``: EL2N scores, the local-loss phase) goes through it instead of the tail, so the
tail's classifier only ever sees the body's features.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from sflam_jax.models.vit import Block, Embedding, Head, ViTConfig, block_names

PROMPTS = "prompts"
LOCAL_HEAD = "local_head"


@dataclasses.dataclass(frozen=True)
class UShape:
    """The U-shaped split of ``cfg`` (module docstring); every apply is a pure function.

    Attributes:
      cfg: the architecture.
      prompt_len: soft prompt tokens.
      head_blocks: blocks on the device before the body.
      tail_blocks: blocks on the device after the body.
      local_head: the body-skipping path has its own classifier (module docstring); False: it
        goes through the tail (the paper's head -> tail shortcut).
    """

    cfg: ViTConfig
    prompt_len: int
    head_blocks: int
    tail_blocks: int
    local_head: bool = False

    def __post_init__(self):
        if self.head_blocks < 0 or self.tail_blocks < 0:
            raise ValueError(
                f"sfprompt.head_blocks={self.head_blocks} and sfprompt.tail_blocks="
                f"{self.tail_blocks} must be >= 0"
            )
        if self.head_blocks + self.tail_blocks >= self.cfg.depth:
            raise ValueError(
                f"sfprompt.head_blocks + sfprompt.tail_blocks = "
                f"{self.head_blocks + self.tail_blocks} must be below the model's depth "
                f"{self.cfg.depth} (the server needs at least one block)"
            )

    # -- parameter trees ------------------------------------------------------------------

    @property
    def head_names(self) -> list[str]:
        return block_names(self.cfg.depth)[: self.head_blocks]

    @property
    def body_names(self) -> list[str]:
        return block_names(self.cfg.depth)[self.head_blocks : self.cfg.depth - self.tail_blocks]

    @property
    def tail_names(self) -> list[str]:
        return block_names(self.cfg.depth)[self.cfg.depth - self.tail_blocks :]

    @property
    def trainable_keys(self) -> list[str]:
        """The device entries that train: prompts, tail blocks, final norm and classifier (and
        the local classifier)."""
        prompts = [PROMPTS] if self.prompt_len else []
        return [*prompts, *self.tail_names, "head", *([LOCAL_HEAD] if self.local_head else [])]

    @property
    def frozen_keys(self) -> list[str]:
        """The device entries that stay as loaded: the embedding and the head blocks."""
        return ["embedding", *self.head_names]

    def init_prompts(self, key: jax.Array) -> jax.Array:
        """``[prompt_len, D]`` uniform in ``+-sqrt(6 / (patch_dim + D))`` (visual prompt
        tuning's Xavier-style initialisation over the patch projection's fan-in and fan-out)."""
        patch_dim = self.cfg.patch_size**2 * self.cfg.channels
        bound = math.sqrt(6.0 / (patch_dim + self.cfg.hidden_size))
        shape = (self.prompt_len, self.cfg.hidden_size)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

    def segments(self, params: dict, key: jax.Array) -> tuple[dict, dict]:
        """``(device tree, body tree)`` from a whole ViT tree; the prompts are drawn from
        ``key``."""
        device = {k: params[k] for k in (*self.frozen_keys, *self.tail_names, "head")}
        if self.prompt_len:  # no entry without prompts (checkpoints hold no empty arrays)
            device[PROMPTS] = self.init_prompts(key)
        if self.local_head:
            device[LOCAL_HEAD] = params["head"]
        return device, {k: params[k] for k in self.body_names}

    @staticmethod
    def pick(tree: dict, keys) -> dict:
        return {k: tree[k] for k in keys}

    # -- shapes -----------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        """Tokens between the device and the server: class token, prompts, patches."""
        return self.cfg.num_tokens + self.prompt_len

    @property
    def up_shape(self) -> tuple[int, int]:
        """One sample's head output (sent up, its gradient sent down)."""
        return (self.num_tokens, self.cfg.hidden_size)

    @property
    def down_shape(self) -> tuple[int, int]:
        """One sample's body output the tail needs (sent down, its gradient sent up): the class
        token alone when there are no tail blocks."""
        return (1 if self.tail_blocks == 0 else self.num_tokens, self.cfg.hidden_size)

    # -- the pieces -------------------------------------------------------------------------

    def front(self, params_c: dict, images: jax.Array) -> jax.Array:
        """Embedding, prompts and head blocks: ``[B, H, W, C] -> [B, T + prompts, D]``."""
        x = Embedding(self.cfg).apply({"params": params_c["embedding"]}, images)
        if self.prompt_len:
            prompts = params_c[PROMPTS]
            prompts = jnp.broadcast_to(prompts, (x.shape[0], *prompts.shape)).astype(x.dtype)
            x = jnp.concatenate([x[:, :1], prompts, x[:, 1:]], axis=1)
        return self._blocks(params_c, self.head_names, x)

    def body(self, params_s: dict, x: jax.Array) -> jax.Array:
        """The server's blocks; returns what the tail needs (``down_shape`` per sample)."""
        x = self._blocks(params_s, self.body_names, x)
        return x[:, :1] if self.tail_blocks == 0 else x

    def tail(self, params_c: dict, x: jax.Array) -> jax.Array:
        """Tail blocks, final norm and classifier on the class token: logits ``[B, classes]``."""
        x = self._blocks(params_c, self.tail_names, x)
        return Head(self.cfg).apply({"params": params_c["head"]}, x)

    def _blocks(self, params: dict, names, x: jax.Array) -> jax.Array:
        block = Block(self.cfg)
        for name in names:
            x = block.apply({"params": params[name]}, x)
        return x

    def logits(self, params_c: dict, params_s: dict, images: jax.Array, key=None) -> jax.Array:
        """The whole prompted model, ``tail(body(front(x)))`` (evaluation; no quantization)."""
        del key
        return self.tail(params_c, self.body(params_s, self.front(params_c, images)))

    def local_logits(self, params_c: dict, images: jax.Array) -> jax.Array:
        """``tail(front(x))`` with the body skipped (EL2N scores and the local-loss phase); with
        ``local_head``, the local classifier on the front's class token instead."""
        x = self.front(params_c, images)
        if self.local_head:
            return Head(self.cfg).apply({"params": params_c[LOCAL_HEAD]}, x)
        return self.tail(params_c, x[:, :1] if self.tail_blocks == 0 else x)
