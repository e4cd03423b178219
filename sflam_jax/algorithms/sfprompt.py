"""SFPrompt: U-shaped split prompt tuning of a frozen pretrained ViT (SPEC section 6.3).

The device holds the embedding, soft prompts and the first blocks (the front) and the last
blocks with the classifier (the tail); the server holds the frozen body, one copy for every
client (``models.ushape``). Only the prompts and the tail train. One round, for each sampled
client, side by side on the round engine's lanes (``train.chunk_size``; mesh placement and host
streaming as for SFLAM):

1. pruning: every local sample is scored by EL2N, ``||softmax(tail(front(x))) - onehot(y)||_2``
   with the body skipped, and the hardest ``floor(keep n_k)`` are kept (``sfprompt.keep``; the
   first round keeps all unless ``sfprompt.prune_first_round``); static shapes, the kept samples
   are the first entries of a per-client index;
2. local-loss phase: ``sfprompt.local_epochs`` epochs on the kept samples through front -> tail,
   no body, no communication;
3. split phase: ``train.local_epochs`` epochs on the kept samples. Per step the front's output
   goes up through the section 2 quantizer at the device's bits, the body runs forward, its
   output (the class token alone when there are no tail blocks) comes down at ``quant.down_bits``,
   the tail computes the loss on the device and sends its input gradient up (quantized at the
   device's bits), the server back-propagates it through the body (activation gradients only:
   the body's weights are constants of the step, so no weight gradient is formed) and sends the
   front's output gradient down; the device back-propagates it to the prompts;
4. FedAvg of prompts and tail weighted by the kept samples; the embedding, the front blocks and the
   body are not touched, so they stay bit-identical.

One optimizer state per client for the round (fresh each round), shared by both phases.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sflam_jax import fields, quant, streams
from sflam_jax.algorithms.base import (
    Costs,
    Options,
    Protocol,
    SplitTraining,
    batch_stats,
    masked_cross_entropy,
    masked_update,
)
from sflam_jax.allocation import IN_GRAPH
from sflam_jax.data.batches import ClientRows, client_batch, epoch_orders, local_steps
from sflam_jax.errors import ConfigError
from sflam_jax.models.ushape import PROMPTS, UShape
from sflam_jax.quant import FLOAT_BITS, payload_bits
from sflam_jax.wireless.costs import Workload, loads_costs


def config_block() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.prompt_len = 10  # soft prompt tokens, inserted after the class token (0: none)
    c.head_blocks = 1  # blocks on the device before the body
    c.tail_blocks = 0  # blocks on the device after the body (0: the body sends the class token)
    c.keep = 0.5  # EL2N: the hardest floor(keep * n_k) samples of a client train
    c.local_epochs = 1  # epochs of the local-loss phase (front -> tail, no body); 0 = none
    # What the body-skipping path (EL2N scores, local-loss phase) classifies with: "tail" (the
    # paper's head -> tail shortcut) or "separate" (its own averaged classifier; the tail then
    # sees only the body's features).
    c.local_head = "tail"
    c.prune_first_round = False  # the first round keeps all samples unless set
    # What EL2N scores with: "shortcut" (the body-skipping path, on the device alone, the paper's)
    # or "body" (the whole U-shape, a forward through the server at the round's bits: more
    # traffic and server time, the features the tail trains on).
    c.score = "shortcut"
    return c


def validate(cfg) -> None:
    for field, low in (
        ("prompt_len", 0),
        ("head_blocks", 0),
        ("tail_blocks", 0),
        ("local_epochs", 0),
    ):
        fields.integer(cfg, f"sfprompt.{field}", low)
    fields.number(
        cfg, "sfprompt.keep", 0, 1, open_lo=True, why="the fraction of a client's samples kept"
    )
    fields.boolean(cfg, "sfprompt.prune_first_round")
    fields.choice(cfg, "sfprompt.local_head", ("tail", "separate"))
    fields.choice(cfg, "sfprompt.score", ("shortcut", "body"))
    if not cfg.model.pretrained:
        from sflam_jax.models.vit import PRESETS

        check_depth(cfg, PRESETS[cfg.model.preset][1])


def check_depth(cfg, depth: int) -> None:
    """Raises ``ConfigError`` when the head and tail blocks leave the body no block."""
    p = cfg.sfprompt
    if p.head_blocks + p.tail_blocks >= depth:
        source = cfg.model.pretrained or f"model.preset={cfg.model.preset!r}"
        raise ConfigError(
            f"sfprompt.head_blocks={p.head_blocks} + sfprompt.tail_blocks={p.tail_blocks} is "
            f"invalid: must be below the depth of {source} ({depth} blocks), so that the server "
            "holds at least one"
        )


@dataclasses.dataclass(frozen=True)
class PromptOptions(Options):
    """SFPrompt's options: pruning and the local-loss phase."""

    keep: float
    local_loss_epochs: int
    prune_first_round: bool
    score_through_body: bool

    @classmethod
    def from_config(cls, cfg) -> PromptOptions:
        p = cfg.sfprompt
        return cls(float(p.keep), p.local_epochs, p.prune_first_round, p.score == "body")


def build(cfg, model_cfg) -> UShape:
    """The U-shaped split of the config's architecture."""
    check_depth(cfg, model_cfg.depth)
    p = cfg.sfprompt
    return UShape(model_cfg, p.prompt_len, p.head_blocks, p.tail_blocks, p.local_head == "separate")


def el2n(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``||softmax(logits) - onehot(labels)||_2`` per sample: ``[B, classes] -> [B]``."""
    error = jax.nn.softmax(logits, -1) - jax.nn.one_hot(labels, logits.shape[-1])
    return jnp.sqrt(jnp.sum(error**2, axis=-1))


def hardest_first(scores: jax.Array, count: jax.Array) -> jax.Array:
    """``[L]`` positions of a client's rows, its ``count`` real samples by descending score (ties:
    the lower position), then the padding rows."""
    real = jnp.arange(scores.shape[0]) < count
    return jnp.argsort(jnp.where(real, -scores, jnp.inf), stable=True).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class PromptTuning(SplitTraining):
    """SFPrompt's round (module docstring); ``model`` is a ``models.ushape.UShape``. Its
    clients are independent, so the engine trains them side by side (lanes or chunks, on the
    mesh) and averages the prompts and the tail (``averaged``) by kept samples. A client's start
    (``client_start``) does its pruning and its local-loss phase; its steps are the split
    phase's.

    Attributes (besides ``SplitTraining``'s; ``local_epochs`` are the split phase's):
      keep: EL2N keep fraction.
      local_loss_epochs: epochs of the local-loss phase.
      prune_first_round: prune in the first round too.
      score_through_body: EL2N through the whole U-shape (front up at the round's bits, body,
        down, tail) instead of the body-skipping path.
      shared: ``(params_c, params_s)`` of the round's global model (``for_round``): the frozen
        front and body every client reads, held once instead of in every lane.
      first_round: whether this is the run's first round (``for_round``).
    """

    keep: float = 0.5
    local_loss_epochs: int = 1
    prune_first_round: bool = False
    score_through_body: bool = False
    shared: Any = None
    first_round: Any = False
    parallel = True

    def for_round(self, state) -> PromptTuning:
        return dataclasses.replace(
            self, shared=(state.params_c, state.params_s), first_round=state.round == 0
        )

    def kept(self, counts: jax.Array, first_round=None) -> jax.Array:
        """Samples a client trains on: ``floor(keep n_k)``, or all in an unpruned first round."""
        first_round = self.first_round if first_round is None else first_round
        pruned = jnp.floor(self.keep * counts.astype(jnp.float32) + 1e-6).astype(jnp.int32)
        if self.prune_first_round:
            return pruned
        return jnp.where(first_round, counts, pruned)

    def scores(self, params_c, rows, count, width: int, up_bits=None, key=None) -> jax.Array:
        """EL2N of one client's ``[width]`` rows (padding rows: -inf), a batch at a time: through
        the body-skipping path, or with ``score_through_body`` through the U-shape with its two
        forward crossings (``up_bits`` up, ``down_bits`` down; ``key`` folded with the batch's
        start)."""
        b = self.batch_size
        body = self.shared[1] if self.score_through_body else None

        def batch(start):
            images, labels = rows.take(start + jnp.arange(b))
            x = self.preprocess(images)
            if body is None:
                return el2n(self.model.local_logits(params_c, x), labels)
            k_up, k_down = jax.random.split(jax.random.fold_in(key, start))
            sent = quant.stochastic_quantize(self.model.front(params_c, x), up_bits, k_up)
            out = self.model.body(body, sent)
            back = quant.stochastic_quantize(out, self.down_bits, k_down)
            return el2n(self.model.tail(params_c, back), labels)

        scores = jax.lax.map(batch, jnp.arange(0, width, b)).reshape(-1)
        return jnp.where(jnp.arange(width) < count, scores, -jnp.inf)

    def local_loss(self, trainable, frozen, images, labels, mask, up_bits, key):
        """Masked loss of a batch through front -> tail (the local-loss phase)."""
        del up_bits, key
        params = {**frozen, **trainable}
        logits = self.model.local_logits(params, self.preprocess(images))
        loss, total, correct = masked_cross_entropy(logits, labels, mask)
        return loss, (total, correct)

    def split_loss(self, trainable, frozen, body, images, labels, mask, up_bits, key):
        """Masked loss of a batch through the U-shape with its four cut crossings: front output
        up (``up_bits``) and its gradient down (``down_bits``), body output down (``down_bits``)
        and its gradient up (``up_bits``)."""
        k_front, k_back = jax.random.split(key)
        params = {**frozen, **trainable}
        front = self.model.front(params, self.preprocess(images))
        received = quant.cut_layer_channel(front, up_bits, self.down_bits, k_front)
        out = self.model.body(body, received)
        returned = quant.cut_layer_channel(out, self.down_bits, up_bits, k_back)
        logits = self.model.tail(params, returned)
        loss, total, correct = masked_cross_entropy(logits, labels, mask)
        return loss, (total, correct)

    def _step(self, loss_fn, carry, rows, count, orders, up_bits, key, t, record: bool):
        """One optimizer step of ``loss_fn`` on batch ``t`` of ``orders``; no-op without
        samples."""
        trainable, opt, stats = carry
        images, labels, mask = client_batch(rows, count, orders, t, self.batch_size)
        (_, (total, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, images, labels, mask, up_bits, jax.random.fold_in(key, t)
        )
        trainable, opt = masked_update(self.optimizer, trainable, opt, grads, mask)
        if record:
            stats = stats + batch_stats(total, correct, mask)
        return trainable, opt, stats

    def _frozen(self):
        params_c, params_s = self.shared
        return self.model.pick(params_c, self.model.frozen_keys), params_s

    def start_carry(self, params_c, params_s):
        """The prompts and tail, a fresh optimizer state over them, ``[3]`` stats."""
        del params_s
        trainable = self.model.pick(params_c, self.model.trainable_keys)
        return trainable, self.optimizer.init(trainable), jnp.zeros((3,), jnp.float32)

    def client_start(self, params_c, params_s, count, key, width: int, rows=None, entry=None):
        """Pruning (EL2N of every sample, the hardest ``kept`` first) and the local-loss phase;
        returns ``(carry, split-phase orders [E, width] over the kept samples, step key)``."""
        frozen, _ = self._frozen()
        k_local, k_split, k_local_steps, k_split_steps = jax.random.split(key, 4)
        kept = self.kept(count)
        carry = self.start_carry(params_c, params_s)
        if self.keep < 1:
            score_key = streams.stream(key, streams.EL2N_CUT)
            scores = self.scores({**frozen, **carry[0]}, rows, count, width, entry, score_key)
            order = hardest_first(scores, count)
        else:  # nothing is pruned: no scores (the valid rows come first)
            order = jnp.arange(width)
        if self.local_loss_epochs:

            def local(tr, *batch):
                return self.local_loss(tr, frozen, *batch)

            orders = order[epoch_orders(k_local, kept, width, self.local_loss_epochs)]
            steps = local_steps(kept, self.batch_size, self.local_loss_epochs)
            carry = jax.lax.fori_loop(
                0,
                steps,
                lambda t, c: self._step(
                    local, c, rows, kept, orders, entry, k_local_steps, t, False
                ),
                carry,
            )
        orders = order[epoch_orders(k_split, kept, width, self.local_epochs)]
        return carry, orders, k_split_steps

    def client_step(self, carry, rows: ClientRows, count, orders, entry, key, step):
        """One split-phase step on the kept samples (``entry``: the uplink bits)."""
        frozen, body = self._frozen()

        def split(tr, *batch):
            return self.split_loss(tr, frozen, body, *batch)

        return self._step(split, carry, rows, self.kept(count), orders, entry, key, step, True)

    def client_result(self, carry):
        """The trained prompts and tail (the averaged part); nothing of the server."""
        return carry[0], {}, carry[2]

    def averaged(self, params_c, params_s):
        del params_s
        return self.model.pick(params_c, self.model.trainable_keys), {}

    def with_averaged(self, params_c, params_s, avg_c, avg_s):
        del avg_s
        return {**params_c, **avg_c}, params_s

    def client_steps(self, counts, entries):
        """Split-phase steps on the kept samples (the local-loss phase runs in the start)."""
        del entries
        return local_steps(self.kept(counts), self.batch_size, self.local_epochs)

    def client_weight(self, counts, entries):
        """FedAvg by kept samples."""
        del entries
        return self.kept(counts)


# -- costs ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptWorkload(Workload):
    """``Workload`` (the comparison protocols' split of the same backbone at ``model.cut_layer``)
    plus SFPrompt's own per-sample FLOPs and sizes, all from XLA's cost analysis.

    Attributes:
      score_flops: the device's FLOPs of scoring one sample: front -> tail forward with the
        body skipped, or with ``score_body`` the front's and the tail's forwards.
      server_score_flops: the body's forward of one scored sample (``score_body`` only).
      local_flops: one local-loss training step (forward and backward to prompts and tail).
      device_split_flops: the device's part of a split step: front forward and backward to the
        prompts, tail forward and backward.
      server_split_flops: the body's forward and its activation-only backward.
      up_values: values of the front's output (sent up; its gradient comes down).
      down_values: values of the body's output the tail takes (sent down; its gradient goes up).
      trainable_params: prompts and tail (aggregated each way once per round).
      full_train_flops: one training step of the whole model (federated full fine-tuning).
      full_params: the whole model's parameters.
      keep, epochs, local_loss_epochs: the round's pruning and epochs (samples are scored only
        when ``keep < 1``).
      score_body: EL2N scores through the body: each scored sample crosses the cut once up
        (``up_values`` at the device's bits) and once down.
    """

    score_flops: float = 0.0
    server_score_flops: float = 0.0
    local_flops: float = 0.0
    device_split_flops: float = 0.0
    server_split_flops: float = 0.0
    up_values: int = 0
    down_values: int = 0
    trainable_params: int = 0
    full_train_flops: float = 0.0
    full_params: int = 0
    keep: float = 0.5
    epochs: int = 1
    local_loss_epochs: int = 1
    score_body: bool = False

    @property
    def budget_values(self) -> int:
        """The device quantizes two crossings per split sample: the front's output and the
        gradient of the body's output (the learning budget's Gamma)."""
        return self.up_values + self.down_values


def prompt_workload(model: UShape, params_c, params_s, base: Workload, cfg) -> PromptWorkload:
    """SFPrompt's per-sample costs of ``model`` from XLA's cost analysis of each piece compiled
    for one sample (parameter shapes are enough: nothing is computed)."""
    from sflam_jax.models.split import compiled_flops as _flops
    from sflam_jax.models.split import num_params
    from sflam_jax.models.vit import ViT

    shape = (1, model.cfg.image_size, model.cfg.image_size, model.cfg.channels)
    image = jax.ShapeDtypeStruct(shape, jnp.float32)
    up = jax.ShapeDtypeStruct((1, *model.up_shape), jnp.float32)
    down = jax.ShapeDtypeStruct((1, *model.down_shape), jnp.float32)
    label = jax.ShapeDtypeStruct((1,), jnp.int32)
    tr = model.pick(params_c, model.trainable_keys)
    fr = model.pick(params_c, model.frozen_keys)

    def ce(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()

    def score(tr, fr, x):
        return model.local_logits({**fr, **tr}, x)

    def front_forward(tr, fr, x):
        return model.front({**fr, **tr}, x)

    def tail_forward(tr, fr, z):
        return model.tail({**fr, **tr}, z)

    def local_grad(tr, fr, x, y):
        return jax.grad(lambda tr: ce(model.local_logits({**fr, **tr}, x), y))(tr)

    def front_grad(tr, fr, x, g):
        return jax.vjp(lambda tr: model.front({**fr, **tr}, x), tr)[1](g)

    def tail_grad(tr, fr, z, y):
        return jax.grad(lambda tr, z: ce(model.tail({**fr, **tr}, z), y), argnums=(0, 1))(tr, z)

    def body_grad(body, x, g):
        return jax.vjp(lambda x: model.body(body, x), x)[1](g)

    whole = {k: v for k, v in {**params_c, **params_s}.items() if k != PROMPTS}

    def full_grad(w, x, y):
        return jax.grad(lambda w: ce(ViT(model.cfg).apply({"params": w}, x), y))(w)

    p = cfg.sfprompt
    body = p.score == "body"
    if body:
        score_flops = _flops(front_forward, tr, fr, image) + _flops(tail_forward, tr, fr, down)
    else:
        score_flops = _flops(score, tr, fr, image)
    return PromptWorkload(
        **dataclasses.asdict(base),
        score_flops=score_flops,
        server_score_flops=_flops(model.body, params_s, up) if body else 0.0,
        local_flops=_flops(local_grad, tr, fr, image, label),
        device_split_flops=_flops(front_grad, tr, fr, image, up)
        + _flops(tail_grad, tr, fr, down, label),
        server_split_flops=_flops(body_grad, params_s, up, down),
        up_values=math.prod(model.up_shape),
        down_values=math.prod(model.down_shape),
        trainable_params=num_params(tr),
        full_train_flops=_flops(full_grad, whole, image, label),
        full_params=num_params(whole),
        keep=float(p.keep),
        epochs=cfg.train.local_epochs,
        local_loss_epochs=p.local_epochs,
        score_body=body,
    )


def round_loads(
    devices,
    steps,
    up_bits,
    workload: PromptWorkload,
    params,
    down_bits=FLOAT_BITS,
    counts=None,
) -> dict:
    """An SFPrompt round's channel-independent loads per device (``[S]`` each), from the clients'
    sample counts (``steps`` are the full-data ``tau_k``, unused): ``compute_s`` (device cycles
    over its clock plus the body's share of the server), ``compute_j`` (``kappa f^2`` cycles),
    ``up_bits`` (per split sample the front's output and the body output's gradient at the
    device's bits, and the prompts and tail once) and ``down_bits`` (their counterparts at
    ``down_bits``, and the model once), the form of ``wireless.costs.round_loads``; ``flops`` are
    the device FLOPs. Samples are scored only when the round prunes (``keep < 1``); scores
    through the body add the body's forward to the server and one crossing each way per sample."""
    del steps
    w = workload
    n = jnp.asarray(counts, jnp.float32)
    kept = jnp.floor(w.keep * n + 1e-6)
    split = w.epochs * kept
    scored = n if w.keep < 1 else jnp.zeros_like(n)
    flops = scored * w.score_flops + w.local_loss_epochs * kept * w.local_flops
    flops = flops + split * w.device_split_flops
    cycles = flops / params.flops_per_cycle
    server = split * w.server_split_flops + scored * w.server_score_flops
    server_s = server * n.shape[-1] / params.server_flops
    agg = float(FLOAT_BITS) * w.trainable_params
    up = split * (payload_bits(up_bits, w.up_values) + payload_bits(up_bits, w.down_values)) + agg
    down = (
        split * (payload_bits(down_bits, w.down_values) + payload_bits(down_bits, w.up_values))
        + agg
    )
    if w.score_body:
        up = up + scored * payload_bits(up_bits, w.up_values)
        down = down + scored * payload_bits(down_bits, w.down_values)
    return {
        "compute_s": cycles / devices.cpu_hz + server_s,
        "compute_j": params.kappa * devices.cpu_hz**2 * cycles,
        "up_bits": up,
        "down_bits": down,
        "flops": flops,
    }


def round_costs(
    devices,
    steps,
    power_w,
    bandwidth_hz,
    up_bits,
    workload: PromptWorkload,
    params,
    down_bits=FLOAT_BITS,
    counts=None,
) -> dict:
    """Latency and device energy of an SFPrompt round, per device and in total (``round_loads``
    on the channel). Keys as ``wireless.costs.sflam_round_costs``; ``extra``: ``device_flops`` and
    ``air_bytes`` of the round (all devices, both directions), the same for federated full
    fine-tuning of the backbone (``fl_device_flops``, ``fl_air_bytes``: the whole model trained on
    the devices, the whole model up and down) and their ratios (``device_compute_ratio``,
    ``traffic_ratio``)."""
    w = workload
    loads = round_loads(devices, steps, up_bits, w, params, down_bits, counts)
    costs = loads_costs(loads, devices, power_w, bandwidth_hz, params)
    n = jnp.asarray(counts, jnp.float32)
    fl_flops = w.epochs * n * w.full_train_flops
    fl_bits = 2.0 * float(FLOAT_BITS) * w.full_params * n.shape[-1]
    device_flops = jnp.sum(loads["flops"])
    air_bytes = jnp.sum(loads["up_bits"] + loads["down_bits"]) / 8.0
    costs["extra"] = {
        "device_flops": device_flops,
        "air_bytes": air_bytes,
        "fl_device_flops": jnp.sum(fl_flops),
        "fl_air_bytes": fl_bits / 8.0,
        "device_compute_ratio": device_flops / jnp.maximum(jnp.sum(fl_flops), 1.0),
        "traffic_ratio": air_bytes / (fl_bits / 8.0),
    }
    return costs


PROTOCOL = Protocol(
    name="sfprompt",
    make=PromptTuning,
    costs=Costs(model=round_costs, split=True, workload=prompt_workload, loads=round_loads),
    quantized_cut=True,
    aqt=False,
    allocators=tuple(IN_GRAPH),
    optimizes_bits=True,
    config_block=config_block,
    validate=validate,
    options=PromptOptions,
    build=build,
)
