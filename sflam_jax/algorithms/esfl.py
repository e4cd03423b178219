"""ESFL: per-device cut layers and server compute shares (SPEC section 6.2).

Device k holds the embedding and blocks ``[0, l_k)`` with its own cut ``l_k`` from a candidate
set (``esfl.cuts``; default every block boundary); its server copy holds the rest (SFL-V1). Each
round the planner chooses the cuts and the server's per-device compute shares from the devices'
clocks, channels and memory limits (``allocation.cuts``: ``esfl_exact``, the global optimum of
ESFL's problem by bisection on the deadline, or ``esfl_ao``, the paper's alternating
optimisation), and the devices train at those cuts.

Training: every client runs SFL-V1's local training at its own cut, written as one forward of the
whole model with the cut-layer channel (``quant.cut_layer_channel``: the uplink at the device's
bits, the gradient downlink at ``quant.down_bits``) applied at the client's block boundary and
the device's matmuls (AQT per ``aqt.*``) on the blocks before it, so clients with different cuts
share one compiled program (``models.split.VariableCut``). The device and server optimizers are
elementwise, so one optimizer over the whole model is SFL-V1's pair of them. FedAvg of the full
models (client part + its server copy) by samples. Without quantization (32-bit traffic, float
matmuls) the training does not depend on the cuts: they change latency, energy and memory only.

The clients are independent, so they run on the round engine's lanes (``train.chunk_size``, the
lanes schedule, mesh placement and host streaming) like SFLAM's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from sflam_jax import fields, quant
from sflam_jax.algorithms.base import (
    Costs,
    Options,
    Protocol,
    SplitTraining,
    batch_stats,
    masked_cross_entropy,
    masked_update,
    optimizer_slots,
)
from sflam_jax.allocation.cuts import CutWorkload
from sflam_jax.allocation.planner import CUT_SOLVERS, CutPlanner
from sflam_jax.data.batches import ClientRows, client_batch
from sflam_jax.errors import ConfigError
from sflam_jax.models import split as split_lib
from sflam_jax.models.split import VariableCut
from sflam_jax.wireless.costs import Workload, device_memory_bytes


def config_block() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # candidate cut layers (a tuple of blocks on the device); None = every boundary 0..depth
    c.cuts = ml_collections.config_dict.placeholder(tuple)
    c.memory_min_bytes = 2.0**30  # device training memory ~ U[min, max]
    c.memory_max_bytes = 2.0**30
    c.alternations = 10  # rounds of the esfl_ao solver
    return c


def validate(cfg) -> None:
    low = fields.positive(cfg, "esfl.memory_min_bytes")
    high = fields.positive(cfg, "esfl.memory_max_bytes")
    if low > high:
        fields.fail("esfl.memory_min_bytes", low, f"must be <= esfl.memory_max_bytes={high!r}")
    fields.integer(cfg, "esfl.alternations", 1)
    if cfg.allocation.optimize_bits and cfg.allocation.method != "joint":
        raise ConfigError(
            f"allocation.optimize_bits=True is invalid with allocation.method="
            f"{cfg.allocation.method!r}: it keeps every device at quant.up_bits (it chooses cuts "
            "and server shares only); allowed: allocation.method='joint' (cuts, shares, power, "
            "bandwidth and bits) or allocation.optimize_bits=False"
        )
    if not cfg.model.pretrained:
        from sflam_jax.models.vit import PRESETS

        candidates(cfg, PRESETS[cfg.model.preset][1])


def candidates(cfg, depth: int) -> tuple[int, ...]:
    """The candidate cuts of ``esfl.cuts`` (sorted, distinct), checked against ``depth``."""
    if cfg.esfl.cuts is None:
        return tuple(range(depth + 1))
    cuts = tuple(cfg.esfl.cuts)
    if not cuts:
        raise ConfigError(
            "esfl.cuts=() is invalid: the candidate set is empty; give at least one cut layer, "
            "or None for every block boundary"
        )
    bad = [c for c in cuts if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= depth]
    if bad:
        source = cfg.model.pretrained or f"model.preset={cfg.model.preset!r}"
        raise ConfigError(
            f"esfl.cuts={cuts!r} is invalid: {bad[0]!r} is not a cut layer of {source}; allowed: "
            f"integers in [0, {depth}] (blocks on the device)"
        )
    if cfg.model.cut_layer not in cuts:
        raise ConfigError(
            f"esfl.cuts={cuts!r} is invalid: it must include model.cut_layer="
            f"{cfg.model.cut_layer} (the cut of the references and of the comparison protocols)"
        )
    return tuple(sorted(set(cuts)))


@dataclasses.dataclass(frozen=True)
class CutOptions(Options):
    """ESFL's options: the devices' memory range, ``esfl_ao``'s rounds."""

    memory_bytes: tuple[float, float]
    alternations: int

    @classmethod
    def from_config(cls, cfg) -> CutOptions:
        e = cfg.esfl
        return cls((float(e.memory_min_bytes), float(e.memory_max_bytes)), e.alternations)


def build(cfg, model_cfg) -> VariableCut:
    """The whole model with a per-client cut; the global state is split at ``model.cut_layer``."""
    candidates(cfg, model_cfg.depth)
    client_dg, server_dg = quant.segment_dot_generals(cfg.aqt)
    return VariableCut(model_cfg, cfg.model.cut_layer, client_dg, server_dg)


@dataclasses.dataclass(frozen=True)
class PerDeviceCuts(SplitTraining):
    """ESFL local training (module docstring); fields as ``SplitTraining``. ``model`` is a
    ``VariableCut``; the plan's ``cuts`` (``[S]`` layers) say where each client's link sits
    (default: the model's ``cut_layer``). Its clients are independent, so the engine trains them
    side by side (lanes or chunks, on the mesh) and averages them; each client's carry holds the
    whole model and one optimizer over it."""

    parallel = True

    def loss(self, params, images, labels, mask, up_bits, cut, key):
        """Masked mean loss of one batch through the whole model with the link at ``cut``."""
        # The key layout of ``SplitTraining.client_loss``: device, link, server.
        k_model, k_link, _ = jax.random.split(key, 3)

        def link(x):
            return quant.cut_layer_channel(x, up_bits, self.down_bits, k_link)

        logits = self.model.apply(params, self.preprocess(images), cut, link, k_model)
        loss, total, correct = masked_cross_entropy(logits, labels, mask)
        return loss, (total, correct)

    def plan_row(self, plan: dict, positions):
        """A client's uplink bits and cut (the model's ``cut_layer`` without a planner)."""
        cuts = plan.get("cuts")
        cut = (
            jnp.full(positions.shape, self.model.cut_layer, jnp.int32)
            if cuts is None
            else cuts[positions].astype(jnp.int32)
        )
        return plan["up_bits"][positions], cut

    def empty_row(self):
        return jnp.float32(quant.FLOAT_BITS), jnp.int32(self.model.cut_layer)

    def start_carry(self, params_c, params_s):
        """The whole model, one optimizer state over it, ``[3]`` stats."""
        whole = split_lib.merge_params(params_c, params_s)
        return whole, self.optimizer.init(whole), jnp.zeros((3,), jnp.float32)

    def client_result(self, carry):
        params_c, params_s = self.model.segments(carry[0])
        return params_c, params_s, carry[2]

    def client_step(self, carry, rows: ClientRows, count, orders, entry, key, step):
        """One local step at the client's cut (``entry``: its bits and cut); a step with no
        samples is a no-op."""
        up_bits, cut = entry
        params, opt, stats = carry
        images, labels, mask = client_batch(rows, count, orders, step, self.batch_size)
        (_, (total, correct)), grads = jax.value_and_grad(self.loss, has_aux=True)(
            params, images, labels, mask, up_bits, cut, jax.random.fold_in(key, step)
        )
        params, opt = masked_update(self.optimizer, params, opt, grads, mask)
        return params, opt, stats + batch_stats(total, correct, mask)


def cut_workload(model: VariableCut, params_c, params_s, base: Workload, cfg) -> CutWorkload:
    """Every candidate cut's FLOPs, smashed-data size, device parameters and device training
    memory, from XLA's cost and memory analyses of the float segments at that cut (shapes
    suffice: nothing is computed)."""
    mcfg = model.cfg
    whole = split_lib.merge_params(params_c, params_s)
    image = (mcfg.image_size, mcfg.image_size, mcfg.channels)
    batch = (cfg.train.batch_size, *image)
    slots = optimizer_slots(cfg.optimizer)
    rows = []
    for cut in candidates(cfg, mcfg.depth):
        at = split_lib.split(mcfg, cut)
        pc, ps = split_lib.split_params(whole, cut, mcfg.depth)
        client_flops, server_flops = split_lib.segment_flops(at, pc, ps, image)
        params = split_lib.num_params(pc)
        activations = split_lib.activation_bytes(at.client_apply, pc, batch)
        memory = device_memory_bytes(params, activations, slots)
        rows.append((cut, client_flops, server_flops, at.values_per_sample, params, memory))
    cuts, client, server, values, params, memory = zip(*rows, strict=True)
    return CutWorkload(
        **dataclasses.asdict(base),
        cut_layer=model.cut_layer,
        cuts=cuts,
        cut_client_flops=client,
        cut_server_flops=server,
        cut_values=values,
        cut_client_params=params,
        cut_memory_bytes=memory,
    )


PROTOCOL = Protocol(
    name="esfl",
    make=PerDeviceCuts,
    # The planner (``CutPlanner``) costs ESFL's rounds at the cuts and shares it chooses.
    costs=Costs(split=True, workload=cut_workload),
    quantized_cut=True,
    aqt=True,
    allocators=CUT_SOLVERS,
    # ``joint`` chooses bits with ``allocation.optimize_bits``; esfl_exact / esfl_ao cannot
    # (``CutPlanner`` says so).
    optimizes_bits=True,
    config_block=config_block,
    validate=validate,
    options=CutOptions,
    build=build,
    planner=CutPlanner,
)
