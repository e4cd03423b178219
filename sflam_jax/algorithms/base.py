"""State types and pieces shared by the protocols: the protocol value, sampling, the split training
step, FedAvg, the loss, evaluation."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sflam_jax import quant
from sflam_jax.data.batches import ClientRows, client_batch, epoch_orders, local_steps
from sflam_jax.errors import NonFiniteError
from sflam_jax.models import lora
from sflam_jax.models.split import SplitModel


@flax.struct.dataclass
class RoundState:
    """Everything a run carries from one round to the next (checkpointed whole).

    Attributes:
      round: int32 scalar, rounds completed; the next round's key is ``fold_in(seed_key, round)``.
      params_c: global client segment ``w_c``.
      params_s: global server segment ``w_s``.
      sim_time_s: simulated wall-clock so far, the sum of the rounds' T_round (SPEC section 3).
      sim_energy_j: device energy so far, the sum of the rounds' E_round.
    """

    round: jax.Array
    params_c: dict
    params_s: dict
    sim_time_s: jax.Array
    sim_energy_j: jax.Array

    @classmethod
    def create(cls, params_c: dict, params_s: dict) -> RoundState:
        """The state before the first round."""
        # Separate buffers: the jitted round donates the state, and a buffer may be donated once.
        zero = lambda: jnp.zeros((), jnp.float32)  # noqa: E731
        return cls(jnp.zeros((), jnp.int32), params_c, params_s, zero(), zero())


@dataclasses.dataclass(frozen=True)
class Costs:
    """How a protocol's rounds are costed (SPEC section 3).

    Attributes:
      model: latency and device energy of one round (``wireless.costs``, common signature
        ``(devices, steps, power_w, bandwidth_hz, up_bits, workload, params, down_bits)``, plus
        ``counts`` when it names them); it gives the simulated clock. None: the protocol's
        planner (ESFL's) or engine (FTTE's) costs its rounds itself.
      split: whether the round's compute/communication split is reported (the slowest device's,
        meaningful when the round time is one device's finish time).
      workload: ``(model, params_c, params_s, Workload, config) -> workload`` the cost model or
        planner reads (a ``Workload`` subclass, so the comparison protocols' costs still apply);
        needs ``Protocol.build``. None: the split model's ``Workload``.
      loads: ``(devices, steps, up_bits, workload, params, down_bits, counts) -> {compute_s,
        compute_j, up_bits, down_bits}``, the per-device loads of its round in the allocation
        problem's form (``T = A + D / r_up + H / r_dn``, ``E = C + p D / r_up``), so every
        allocator runs on its traffic; None: SFL-V1's (``wireless.costs.round_loads``).
    """

    model: Callable[..., dict] | None = None
    split: bool = False
    workload: Callable[..., Any] | None = None
    loads: Callable[..., dict] | None = None


@dataclasses.dataclass(frozen=True)
class Options:
    """A protocol's options: fields of its config block handed to its hooks. A subclass is a
    frozen dataclass whose fields are keyword arguments of its training class, cost model,
    loads or planner (each hook gets the ones its signature names), built by ``from_config``."""

    @classmethod
    def from_config(cls, config) -> Options:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Everything that defines a training protocol, declared once in its own module and registered
    in ``algorithms.registry`` under ``name`` (the value of ``config.algorithm``). The
    invariants between the hooks are checked when a protocol is declared (``ValueError``).

    Attributes:
      name: the ``config.algorithm`` value.
      make: ``(**SplitTraining fields, **options) -> algorithm``, the protocol's round. An
        algorithm with ``parallel = True`` trains the clients of a chunk side by side
        (``train_chunk``) and is aggregated by the engine's FedAvg; otherwise it trains the
        round's clients in sequence and aggregates them itself (``train_sequence``).
      costs: how its rounds are costed (``Costs``).
      quantized_cut: ``quant.up_bits`` / ``quant.down_bits`` apply; otherwise float32 both ways.
      aqt: ``config.aqt`` applies; otherwise the matmuls are float.
      allocators: the ``allocation.method`` values it accepts.
      optimizes_bits: ``allocation.optimize_bits`` lets the solver choose its cut-layer bits.
      baseline: its latency and energy are reported next to every run's own (SPEC section 3).
      config_block: ``() -> ConfigDict`` of its own fields, set at ``config.<name>``; None: none.
      validate: ``(config) -> None`` raising ``ConfigError`` for a bad field of its block.
      options: its ``Options`` subclass; every field must be a parameter of one of its hooks.
      build: ``(config, ViTConfig) -> model``, its own split of the architecture (with
        ``segments(params, key)``, ``logits(...)``); None: the cut at ``model.cut_layer``.
      planner: its round planner class when it decides more than power, bandwidth and bits
        (ESFL's ``allocation.planner.CutPlanner``: cuts and server shares, and their costs),
        built with ``RoundPlanner``'s fields and the options its fields name; None:
        ``RoundPlanner`` on ``costs.model``.
      engine: ``(config, EngineInputs) -> (engine, initial state, system dict)``, its own
        engine (the asynchronous protocols' event loop, ``sflam_jax.events``): anything with the
        engine interface (``sflam_jax.engine``'s docstring); the trainer's rounds are its steps.
        None: the round engine (``engine.Engine``) with ``make``'s algorithm and the planner.
      run_control: config fields a resumed run may change (they steer the run, not the numbers
        of a step), in addition to ``checkpoint.RUN_CONTROL_FIELDS``.
      adapters: it trains LoRA adapters when ``lora.rank > 0`` (its algorithm takes
        ``SplitTraining.adapters``); otherwise a rank is a config error.
    """

    name: str
    make: Callable[..., Any]
    costs: Costs
    quantized_cut: bool
    aqt: bool
    allocators: tuple[str, ...]
    optimizes_bits: bool = False
    baseline: bool = False
    config_block: Callable[[], Any] | None = None
    validate: Callable[[Any], None] | None = None
    options: type[Options] | None = None
    build: Callable[..., Any] | None = None
    planner: type | None = None
    engine: Callable[..., tuple] | None = None
    run_control: tuple[str, ...] = ()
    adapters: bool = False

    def __post_init__(self):
        def fail(why: str):
            raise ValueError(f"protocol {self.name!r}: {why}")

        if not self.allocators:
            fail("allocators is empty")
        if self.costs.workload is not None and self.build is None:
            fail("costs.workload reads the protocol's own model: set build")
        own_costs = (self.costs.model is not None) + (self.planner is not None)
        if self.engine is not None and own_costs:
            fail("an engine of its own costs its clients: no costs.model or planner")
        if self.engine is None and not own_costs:
            fail("a round needs costs.model or a planner that costs it")
        if self.optimizes_bits and not self.quantized_cut:
            fail("optimizes_bits needs quantized_cut (float traffic has no bits to choose)")
        if self.baseline and (self.quantized_cut or self.aqt or self.costs.model is None):
            fail("a baseline has float traffic and matmuls and a cost model")
        if self.options is not None:
            hooks = [self.make, self.costs.model, self.costs.loads, self.planner]
            named = set().union(*(_parameters(h) for h in hooks if h is not None))
            for field in dataclasses.fields(self.options):
                if field.name not in named:
                    fail(
                        f"option {field.name!r} of {self.options.__name__} is a parameter of "
                        "none of its hooks (make, costs.model, costs.loads, planner)"
                    )

    @property
    def streamable(self) -> bool:
        """It can run host-streamed (``train.stream``) and across several processes: a round
        engine protocol whose clients train side by side."""
        make = getattr(self.make, "func", self.make)
        return self.engine is None and bool(getattr(make, "parallel", False))

    def bind(self, fn: Callable, config) -> Callable:
        """``fn`` (``make``, a cost model, loads or the planner) with the protocol's options for
        ``config`` that its signature names."""
        if self.options is None:
            return fn
        names = _parameters(fn)
        record = self.options.from_config(config)
        kwargs = {
            f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name in names
        }
        return functools.partial(fn, **kwargs) if kwargs else fn

    def cut_bits(self, quant_cfg) -> tuple[int, int]:
        """Uplink and downlink cut-layer bits: the config's, or float (32) both ways."""
        if self.quantized_cut:
            return quant_cfg.up_bits, quant_cfg.down_bits
        return quant.FLOAT_BITS, quant.FLOAT_BITS


def _parameters(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def baseline(name: str, make, cost_model, cost_split: bool, adapters: bool = False):
    """A protocol SFLAM is compared with (SPEC section 1): float cut-layer traffic and matmuls,
    full power on equal bandwidth shares, its costs reported next to every run's."""
    return Protocol(
        name=name,
        make=make,
        costs=Costs(model=cost_model, split=cost_split),
        quantized_cut=False,
        aqt=False,
        allocators=("equal",),
        baseline=True,
        adapters=adapters,
    )


@dataclasses.dataclass(frozen=True)
class EngineInputs:
    """What ``Protocol.engine`` builds an engine from (``experiment.build_experiment``).

    Attributes:
      dataset: the training and test data (``data.datasets.Dataset``).
      parts: the partition, one index array per client.
      model_cfg: the ViT's ``ViTConfig``.
      model: the protocol's split of it (``Protocol.build``, else the cut at ``model.cut_layer``).
      params: the whole ViT's initial parameters.
      preprocess: the input preprocessing.
      init_key: the initialisation key (``streams.init_key``).
    """

    dataset: Any
    parts: list
    model_cfg: Any
    model: Any
    params: dict
    preprocess: Any
    init_key: jax.Array


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """uint8 images -> model inputs (normalisation and resize, see data.batches.preprocess)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    channels: int = 0  # model input channels; grey images are repeated to 3. 0: as the data

    def __call__(self, images: jax.Array) -> jax.Array:
        from sflam_jax.data.batches import preprocess

        return preprocess(images, self.mean, self.std, self.image_size, self.channels)


def sample_clients(key: jax.Array, num_clients: int, per_round: int) -> jax.Array:
    """S of K client ids, uniformly without replacement (SPEC section 1). Returns ``[S]`` int32."""
    return jax.random.choice(key, num_clients, (per_round,), replace=False).astype(jnp.int32)


# The values of ``optimizer.name``.
OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(opt_cfg, learning_rate=None) -> optax.GradientTransformation:
    """The local optimizer of devices and server copies from ``config.optimizer``;
    ``learning_rate`` (a float or a traced scalar, for vectorized sweeps) replaces the config's.

    With ``head_lr_scale != 1`` the classifier (``head/classifier``, on the server segment) steps
    at that multiple of the learning rate, so a new head on a pretrained body can learn faster
    than the body is fine-tuned (the usual fine-tuning recipe).
    """
    lr = opt_cfg.learning_rate if learning_rate is None else learning_rate
    scale = opt_cfg.get("head_lr_scale", 1.0)
    if scale == 1.0:
        return _optimizer(opt_cfg, lr)

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "head" if "classifier" in jax.tree_util.keystr(path) else "body",
            params,
        )

    return optax.multi_transform(
        {"body": _optimizer(opt_cfg, lr), "head": _optimizer(opt_cfg, lr * scale)}, labels
    )


def optimizer_slots(opt_cfg) -> int:
    """Optimizer states per parameter of ``config.optimizer`` (device memory): 2 for Adam, 1 for
    SGD with momentum, 0 for plain SGD."""
    if opt_cfg.name in ("adam", "adamw"):
        return 2
    return int(opt_cfg.momentum > 0)


def _optimizer(opt_cfg, lr) -> optax.GradientTransformation:
    name = opt_cfg.name
    if name == "sgd":
        tx = optax.sgd(lr, momentum=opt_cfg.momentum or None)
    elif name == "adam":
        tx = optax.adam(lr)
    elif name == "adamw":
        return optax.adamw(lr, weight_decay=opt_cfg.weight_decay)
    else:
        raise ValueError(f"optimizer.name={name!r} is unknown; allowed: {', '.join(OPTIMIZERS)}")
    if opt_cfg.weight_decay:
        tx = optax.chain(optax.add_decayed_weights(opt_cfg.weight_decay), tx)
    return tx


@dataclasses.dataclass(frozen=True)
class Adapters:
    """Which parameters of the two segments train under LoRA (SPEC section 8).

    Each segment is in one of three modes: ``"adapters"`` trains its adapters (``B``, and ``A``
    unless ``trains_a`` is False: FFA-LoRA) and its ``head`` (final norm and classifier: a new
    task's head), the rest being the frozen base; ``"frozen"`` (a segment without adapters under
    ``lora.unadapted = "freeze"``) trains only its head, if it holds one; ``"whole"`` trains
    every weight, as without LoRA.

    Attributes:
      client, server: the device's and the server's segment's mode.
      trains_a: whether ``A`` trains (``lora.aggregation = "fedavg"``) or stays at its shared
        random init (``"ffa"``).
    """

    client: str
    server: str
    trains_a: bool = True

    def split(self, params: dict, mode: str) -> tuple[dict, dict]:
        """``(trainable, frozen)`` parts of a segment's parameters in ``mode`` (their union is
        ``params``)."""
        if mode == "whole":
            return params, {}
        flat = lora.flat_paths(params, with_values=True)

        def trains(path):
            adapter = mode == "adapters" and lora.is_adapter(path, self.trains_a)
            return adapter or path.startswith("head/")

        train = {p: v for p, v in flat.items() if trains(p)}
        frozen = {p: v for p, v in flat.items() if not trains(p)}
        return lora.unflatten(train), lora.unflatten(frozen)


@dataclasses.dataclass(frozen=True)
class SplitTraining:
    """One client's local split training (SPEC section 1, step 2), shared by every protocol.

    Attributes:
      model: the split ViT.
      optimizer: local optimizer of devices and server copies (fresh state every round).
      preprocess: uint8 images -> model inputs.
      local_epochs: E.
      batch_size: B.
      down_bits: bits of the downlink gradient (32: float).
      adapters: LoRA (``Adapters``): only the adapters (and the head) of an adapted segment
        train, get optimizer state and are averaged; its frozen base is read from ``frozen``
        (``for_round``), once, not from every client's carry. None: every weight trains.
      frozen: ``(client, server)`` frozen bases of the round's global model (``for_round``).
    """

    model: SplitModel
    optimizer: optax.GradientTransformation
    preprocess: Preprocess
    local_epochs: int
    batch_size: int
    down_bits: int = 32
    adapters: Adapters | None = None
    frozen: Any = None

    def client_loss(self, params_c, params_s, images, labels, mask, up_bits, key):
        """Masked mean loss of one client's batch through the quantized cut.

        Returns ``(loss, (summed loss, correct predictions))``; its gradient with respect to
        ``params_c`` is the device's update direction given the quantized server gradient.
        """
        k_client, k_link, k_server = jax.random.split(key, 3)
        smashed = self.model.client_apply(params_c, self.preprocess(images), k_client)
        received = quant.cut_layer_channel(smashed, up_bits, self.down_bits, k_link)
        logits = self.model.server_apply(params_s, received, k_server)
        loss, total, correct = masked_cross_entropy(logits, labels, mask)
        return loss, (total, correct)

    def trainable(self, params_c, params_s) -> tuple[dict, dict]:
        """The parts of both segments a client trains: whole segments, or with ``adapters`` the
        adapters and heads of the adapted ones."""
        if self.adapters is None:
            return params_c, params_s
        return (
            self.adapters.split(params_c, self.adapters.client)[0],
            self.adapters.split(params_s, self.adapters.server)[0],
        )

    def whole(self, train_c, train_s, frozen=None) -> tuple[dict, dict]:
        """Both segments from their trained parts and the frozen bases (``frozen``, default the
        round's)."""
        if self.adapters is None:
            return train_c, train_s
        frozen_c, frozen_s = self.frozen if frozen is None else frozen
        return lora.combine(frozen_c, train_c), lora.combine(frozen_s, train_s)

    def start_carry(self, params_c, params_s):
        """A client's local-training carry: the trained parts of both segments (``trainable``),
        fresh optimizer states, ``[3]`` stats (summed loss, correct predictions, samples
        seen)."""
        params_c, params_s = self.trainable(params_c, params_s)
        return (
            params_c,
            params_s,
            self.optimizer.init(params_c),
            self.optimizer.init(params_s),
            jnp.zeros((3,), jnp.float32),
        )

    def client_start(self, params_c, params_s, count, key, width: int, rows=None, entry=None):
        """A client's start: ``(carry, orders [E, width], step key)`` from its round key (the
        epoch shuffles and the step noise are separate streams of it). ``rows`` (its samples)
        and ``entry`` (its ``plan_row``) are for protocols whose start does work (SFPrompt's
        pruning and local-loss phase)."""
        del rows, entry
        order_key, step_key = jax.random.split(key)
        orders = epoch_orders(order_key, count, width, self.local_epochs)
        return self.start_carry(params_c, params_s), orders, step_key

    def client_result(self, carry):
        """``(averaged client part, averaged server part, stats [3])`` of a local-training carry:
        the parameters FedAvg averages (``averaged``'s structure), here both whole segments."""
        return carry[0], carry[1], carry[4]

    def frozen_parts(self, params_c, params_s):
        """``(client, server)`` frozen bases of two segments (``adapters`` only)."""
        return (
            self.adapters.split(params_c, self.adapters.client)[1],
            self.adapters.split(params_s, self.adapters.server)[1],
        )

    def for_round(self, state) -> SplitTraining:
        """This training bound to the round's global state: with ``adapters``, its frozen bases,
        which no client lane copies (SFPrompt closes over its frozen parts the same way)."""
        if self.adapters is None:
            return self
        return dataclasses.replace(self, frozen=self.frozen_parts(state.params_c, state.params_s))

    def averaged(self, params_c, params_s):
        """The parts of both segments FedAvg averages (and ``client_result`` returns): what
        trains (``trainable``)."""
        return self.trainable(params_c, params_s)

    def with_averaged(self, params_c, params_s, avg_c, avg_s):
        """The segments with their averaged parts replaced by ``avg_c``, ``avg_s``."""
        if self.adapters is None:
            return avg_c, avg_s
        return self.whole(avg_c, avg_s, self.frozen_parts(params_c, params_s))

    def client_steps(self, counts, entries):
        """``tau_k`` of clients holding ``counts`` samples with these plan entries."""
        del entries
        return local_steps(counts, self.batch_size, self.local_epochs)

    def client_weight(self, counts, entries):
        """FedAvg weights of these clients: their samples ``n_k``."""
        del entries
        return counts

    def plan_row(self, plan: dict, positions: jax.Array):
        """What a client's steps read of the round's plan (``engine.Engine.round_plan``): the
        entries at ``positions`` (any shape), a pytree of arrays of that shape. SFL-V1's: the
        uplink bits; a protocol whose clients differ in more (ESFL's cuts) returns more."""
        return plan["up_bits"][positions]

    def empty_row(self):
        """``plan_row`` of an empty slot or lane (it trains nothing): float traffic."""
        return jnp.float32(quant.FLOAT_BITS)

    def train_chunk(self, params_c, params_s, rows: ClientRows, counts, entries, keys):
        """Local training of C clients side by side from their starting copies (``parallel``
        protocols; the engine's ``"chunks"`` schedule).

        Args:
          params_c: ``[C, ...]`` each client's starting client segment.
          params_s: ``[C, ...]`` each client's starting server copy.
          rows: ``[C, L, ...]`` the clients' padded samples.
          counts: ``[C]`` samples of each (0 for padding slots).
          entries: ``[C, ...]`` their ``plan_row`` (the uplink bits for SFL-V1).
          keys: ``[C]`` per-client keys.

        Returns:
          ``(averaged client parts [C, ...], averaged server parts [C, ...], stats [C, 3])``
          (``client_result``) with stats (summed loss, correct, samples seen). The step loop
          stops at the chunk's largest ``tau_k``; clients that are done earlier keep their
          parameters (masked update).
        """
        width = rows.labels.shape[1]
        carry, orders, step_keys = jax.vmap(
            lambda pc, ps, n, k, r, e: self.client_start(pc, ps, n, k, width, r, e)
        )(params_c, params_s, counts, keys, rows, entries)
        step_fn = jax.vmap(self.client_step, in_axes=(0, 0, 0, 0, 0, 0, None))
        num_steps = jnp.max(self.client_steps(counts, entries))
        carry = jax.lax.fori_loop(
            0,
            num_steps,
            lambda t, carry: step_fn(carry, rows, counts, orders, entries, step_keys, t),
            carry,
        )
        return jax.vmap(self.client_result)(carry)

    def client_step(self, carry, rows: ClientRows, count, orders, up_bits, key, step):
        """One local step of one client and its server copy (``up_bits``: its ``plan_row``); a
        step with no samples is a no-op."""
        params_c, params_s, opt_c, opt_s, stats = carry
        images, labels, mask = client_batch(rows, count, orders, step, self.batch_size)

        def loss(train_c, train_s, *args):
            return self.client_loss(*self.whole(train_c, train_s), *args)

        grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        (_, (total, correct)), (g_c, g_s) = grad_fn(
            params_c, params_s, images, labels, mask, up_bits, jax.random.fold_in(key, step)
        )
        params_c, opt_c = masked_update(self.optimizer, params_c, opt_c, g_c, mask)
        params_s, opt_s = masked_update(self.optimizer, params_s, opt_s, g_s, mask)
        return params_c, params_s, opt_c, opt_s, stats + batch_stats(total, correct, mask)


def keep_if(condition, new, old):
    """``new`` where ``condition`` holds, else ``old``, leaf by leaf (same structure)."""
    return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new, old)


def masked_update(optimizer: optax.GradientTransformation, params, opt_state, grads, mask):
    """The masked local step every protocol's clients take: one optimizer step on ``params``,
    or none (both returned unchanged) when the batch's ``mask`` holds no sample (a client past
    its ``tau_k`` in a padded loop). Returns ``(params, opt_state)``."""
    updates, new_opt = optimizer.update(grads, opt_state, params)
    new = (optax.apply_updates(params, updates), new_opt)
    return keep_if(jnp.any(mask), new, (params, opt_state))


def batch_stats(total, correct, mask) -> jax.Array:
    """``[3]`` summed loss, correct predictions and samples of a masked batch."""
    return jnp.stack([total, correct, jnp.sum(mask.astype(jnp.float32))])


def masked_cross_entropy(
    logits: jax.Array, labels: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Softmax cross-entropy over the valid samples of a batch.

    Args:
      logits: ``[B, classes]``.
      labels: ``[B]`` int.
      mask: ``[B]`` bool, True for real samples.

    Returns:
      ``(mean loss over valid samples (0 if none), summed loss, number of correct predictions)``.
    """
    m = mask.astype(logits.dtype)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    total = jnp.sum(ce * m)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) * m)
    return total / jnp.maximum(jnp.sum(m), 1.0), total, correct


# Metrics key of the per-client finite flags a round returns for the trainer's guard.
HEALTH = "health"
# What the three flags of a round check, and what to change when one fails (the round engine's
# words; an engine may name its own, ``engine.Engine.health_parts``).
HEALTH_PARTS = ("loss", "client segment", "server copy")
HEALTH_ADVICE = "Lower optimizer.learning_rate or raise the quantization bits"


def health_flags(stats: jax.Array, first, second=None) -> jax.Array:
    """``[C, 3]`` finite flags of C trained clients, the one health check of every engine
    (``check_health`` reads them): finite loss (``stats [C, 3]``'s first column), finite
    ``first`` and finite ``second`` (``[C, ...]`` trees: a client's two segments, or its update
    and nothing; a tree without leaves, or None, is finite)."""
    c = stats.shape[0]
    second = {} if second is None else second
    return jnp.stack(
        [jnp.isfinite(stats[:, 0]), finite_per_client(first, c), finite_per_client(second, c)],
        axis=1,
    )


def finite_per_client(trees, clients: int | None = None) -> jax.Array:
    """``[C]`` bool: whether every value of client c's slice of the stacked ``trees`` is finite
    (all True for a tree without leaves, of ``clients`` entries)."""
    leaves = [
        jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1) for x in jax.tree.leaves(trees)
    ]
    if not leaves:
        return jnp.ones((clients,), bool)
    return jnp.all(jnp.stack(leaves), axis=0)


def check_health(
    health, clients, round_index: int, parts=HEALTH_PARTS, advice: str = HEALTH_ADVICE
) -> None:
    """Raises ``NonFiniteError`` naming the round and the first client with a non-finite value.

    Args:
      health: ``[3, S]`` bool from a round's metrics: finite loss, finite client segment (or whole
        model for FL), finite server copy (the shared server segment for SFL-V2 and SL).
      clients: ``[S]`` the sampled client ids.
      round_index: the round's number (1-based, as in metrics.jsonl).
      parts: the names of the three flags (the event protocols flag a client's update).
      advice: what to change before resuming.
    """
    health, clients = np.asarray(health, bool), np.asarray(clients)
    bad = np.flatnonzero(~health.all(axis=0))
    if not len(bad):
        return
    first = bad[0]
    parts = [name for name, ok in zip(parts, health[:, first], strict=True) if not ok]
    if parts == ["server copy"]:
        where = f"the server (its segment for client {int(clients[first])})"
    else:
        where = f"client {int(clients[first])}"
    others = ", ".join(str(int(c)) for c in clients[bad[1:]])
    raise NonFiniteError(
        f"round {round_index}: {where} produced a non-finite {' and '.join(parts)}"
        + (f" (also clients {others})" if others else "")
        + f"; the round was not saved. {advice}, then resume from the last good checkpoint."
    )


def average_or_keep(totals, weight: jax.Array, old):
    """``totals / weight`` leaf by leaf, or ``old`` when the weight is 0 (a round whose sampled
    clients hold no samples leaves the global model as it was)."""
    return jax.tree.map(lambda t, o: jnp.where(weight > 0, t / weight, o), totals, old)


def weighted_sum(trees, weights: jax.Array):
    """``sum_k weights[k] * tree_k`` over the leading axis of stacked trees."""
    return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), trees)


def make_evaluate(
    model: SplitModel, preprocess: Callable, batch_size: int
) -> Callable[[dict, dict, jax.Array, jax.Array], dict[str, jax.Array]]:
    """Returns ``evaluate(params_c, params_s, images, labels) -> {"test_loss", "test_accuracy"}``.

    The global model is evaluated unsplit in effect (``model.logits``: ``server(client(x))``, or
    the U-shaped model's ``tail(body(front(x)))``) with float cut-layer traffic. Call it under
    ``jax.jit``; the test set is padded to whole batches and masked.
    """

    def evaluate(params_c, params_s, images, labels):
        n = images.shape[0]
        pad = (-n) % batch_size
        images = jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
        labels = jnp.concatenate([labels, jnp.zeros((pad,), labels.dtype)])
        mask = jnp.arange(n + pad) < n
        batches = (
            images.reshape(-1, batch_size, *images.shape[1:]),
            labels.reshape(-1, batch_size),
            mask.reshape(-1, batch_size),
        )

        def one(batch):
            x, y, m = batch
            # AQT modules draw their (backward-only) rounding noise from a key even in a forward
            # pass; a fixed one keeps evaluation deterministic.
            key = jax.random.key(0)
            logits = model.logits(params_c, params_s, preprocess(x), key)
            _, loss, correct = masked_cross_entropy(logits, y, m)
            return loss, correct

        losses, correct = jax.lax.map(one, batches)
        return {"test_loss": jnp.sum(losses) / n, "test_accuracy": jnp.sum(correct) / n}

    return evaluate
