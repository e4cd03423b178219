"""SFL-V2, SL and FL against plain-Python references of the same protocols (SPEC section 1)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracles import LR, MOMENTUM, B, E, engine_of, oracle_round, setup

from sflam_jax.algorithms.base import Preprocess, sample_clients
from sflam_jax.algorithms.sfl_v2 import SharedServer
from sflam_jax.algorithms.sflam import SFLV1
from sflam_jax.data.batches import epoch_orders
from sflam_jax.models import split as split_lib
from sflam_jax.models import vit

PRE = Preprocess(mean=(0.5,), std=(0.5,), image_size=14)
SIZES = [7, 13, 3, 10, 5]


def _algorithm(cls, model, per_round=3, **kw):
    return engine_of(model, PRE, per_round=per_round, cls=cls, **kw)


@pytest.mark.parametrize(("relay", "cut"), [(False, 1), (True, 0)], ids=["sfl_v2", "sl"])
def test_sequential_protocols_match_python_loop(relay, cut):
    model, state, data, images, labels, parts = setup(SIZES, cut)
    key = jax.random.key(7)
    clients, ref_c, ref_s, ref_loss = oracle_round(
        model, state, images, labels, parts, key, 3, [32] * 3, 32, PRE, True, relay
    )
    alg = _algorithm(SharedServer, model, relay_client=relay)
    new, metrics = jax.jit(alg.round)(state, data, key)
    np.testing.assert_array_equal(metrics["clients"], clients)
    chex.assert_trees_all_close(new.params_c, ref_c, atol=1e-5)
    chex.assert_trees_all_close(new.params_s, ref_s, atol=1e-5)
    np.testing.assert_allclose(metrics["train_loss"], ref_loss, rtol=1e-5)
    # Not SFL-V1: the shared server (and for SL the relayed client) give another model.
    v1, _ = jax.jit(_algorithm(SFLV1, model).round)(state, data, key, 32)
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new.params_s, v1.params_s)
    assert max(jax.tree.leaves(diff)) > 1e-4


def test_one_client_per_round_makes_the_protocols_coincide():
    model, state, data, *_ = setup(SIZES, 1)
    key = jax.random.key(3)
    results = [
        jax.jit(_algorithm(cls, model, per_round=1, **kw).round)(state, data, key)[0]
        for cls, kw in [
            (SFLV1, {}),
            (SharedServer, {"relay_client": False}),
            (SharedServer, {"relay_client": True}),
        ]
    ]
    for other in results[1:]:
        chex.assert_trees_all_close(other.params_c, results[0].params_c, atol=1e-6)
        chex.assert_trees_all_close(other.params_s, results[0].params_s, atol=1e-6)


def test_fl_round_is_fedavg_of_the_whole_model():
    """``fl`` runs the float SFL-V1 round; a FedAvg loop over the unsplit ViT (one optimizer on
    the whole model, no cut at all) gives the same global model."""
    cut = 1
    model, state, data, images, labels, parts = setup(SIZES, cut)
    cfg = vit.vit_config("tiny", image_size=14, channels=1, num_classes=3, patch_size=7)
    full = vit.ViT(cfg)
    key = jax.random.key(11)
    sample_key, train_key = jax.random.split(key)
    clients = np.asarray(sample_clients(sample_key, len(parts), 3))
    width = -(-max(len(p) for p in parts) // B) * B
    start = split_lib.merge_params(state.params_c, state.params_s)
    tx = optax.sgd(LR, momentum=MOMENTUM)

    @jax.jit
    def sgd_step(params, opt, x, y):
        def loss_fn(params):
            logits = full.apply({"params": params}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        updates, opt = tx.update(jax.grad(loss_fn)(params), opt, params)
        return optax.apply_updates(params, updates), opt

    finals, sizes = [], []
    for k in clients:
        n = len(parts[k])
        order_key, _ = jax.random.split(jax.random.fold_in(train_key, int(k)))
        orders = np.asarray(epoch_orders(order_key, jnp.int32(n), width, E))
        params, opt = start, tx.init(start)
        for e in range(E):
            for t in range(-(-n // B)):
                rows = parts[k][orders[e][:n][t * B : (t + 1) * B]]
                x = PRE(jnp.asarray(images[rows]))
                params, opt = sgd_step(params, opt, x, jnp.asarray(labels[rows]))
        finals.append(params)
        sizes.append(n)
    rho = np.asarray(sizes) / np.sum(sizes)
    fedavg = jax.tree.map(lambda *xs: sum(r * x for r, x in zip(rho, xs, strict=True)), *finals)

    new, _ = jax.jit(_algorithm(SFLV1, model, down_bits=32).round)(state, data, key, 32)
    chex.assert_trees_all_close(
        split_lib.merge_params(new.params_c, new.params_s), fedavg, atol=1e-5
    )


@pytest.mark.parametrize("name", ["sfl", "sfl_v2", "sl", "fl"])
def test_every_protocol_trains_through_the_trainer(name, tiny_config, tmp_path):
    """Each protocol learns, trains float whatever ``aqt`` says, and reports its own cost model's
    latency and energy as the round's (and the simulated clock's)."""
    from conftest import assert_learned

    from sflam_jax import train
    from sflam_jax.algorithms import registry

    cfg = tiny_config
    cfg.algorithm, cfg.num_rounds, cfg.eval_every = name, 1, 1
    cfg.aqt.enabled = True  # ignored by the baselines (float models)
    record = train.train_and_evaluate(cfg, str(tmp_path))
    # The sequential protocols overshoot in their first round at this learning rate.
    assert_learned(tmp_path, improved=name in ("sfl", "fl"))
    assert record["bits_mean"] == 32
    assert record["round_latency_s"] == record[f"{name}_round_latency_s"]
    assert record["round_energy_j"] == record[f"{name}_round_energy_j"]
    # The split into compute and communication is reported where the round is one device's.
    assert ("round_compute_s" in record) == registry.get(name).costs.split
    # AQT off for the baselines: the model built with aqt enabled is the float one.
    from sflam_jax import experiment
    from sflam_jax.data.datasets import load_dataset

    dataset = load_dataset(cfg.data)
    key = jax.random.key(0)
    model_cfg, model, params, pre = experiment.build_model(cfg, dataset, key)
    cfg.aqt.enabled = False
    _, float_model, _, _ = experiment.build_model(cfg, dataset, key)
    params_c, _ = split_lib.split_params(params, cfg.model.cut_layer, model_cfg.depth)
    x = pre(jnp.asarray(dataset.train_images[:4]))
    np.testing.assert_array_equal(
        model.client_apply(params_c, x, key), float_model.client_apply(params_c, x, key)
    )


def test_protocols_costs_differ(tiny_config, tmp_path):
    """The four baselines' costs of the same round are four different numbers (their own
    models), and SFLAM's 8-bit round is cheaper to send than SFL's 32-bit one."""
    from sflam_jax import train

    cfg = tiny_config
    cfg.num_rounds, cfg.eval_every = 1, 0
    record = train.train_and_evaluate(cfg, str(tmp_path))
    names = ("sfl", "sfl_v2", "sl", "fl")
    assert len({record[f"{n}_round_latency_s"] for n in names}) == 4
    assert record["round_latency_s"] < record["sfl_round_latency_s"]


def test_a_protocol_declaration_checks_its_hooks():
    """A protocol's hooks are checked when it is declared: an option no hook takes (a misspelt
    field), a workload without the model it reads, an engine beside a cost model, free bits
    without a quantized cut; each is a ``ValueError`` naming the protocol and what is wrong."""
    import dataclasses

    from sflam_jax.algorithms.base import Costs, Options, Protocol
    from sflam_jax.algorithms.gsfl import GroupOptions
    from sflam_jax.wireless.costs import sflam_round_costs

    @dataclasses.dataclass(frozen=True)
    class Misspelt(Options):
        chunk_sise: int = 0

    def declare(**fields):
        base = dict(
            name="x",
            make=SFLV1,
            costs=Costs(model=sflam_round_costs),
            quantized_cut=True,
            aqt=False,
            allocators=("equal",),
        )
        return Protocol(**{**base, **fields})

    declare()  # the base declaration is valid
    with pytest.raises(ValueError, match="protocol 'x': option 'chunk_sise' of Misspelt"):
        declare(options=Misspelt)
    with pytest.raises(ValueError, match="option 'groups'"):
        declare(options=GroupOptions)  # SFLV1 and the SFL-V1 costs take no groups
    with pytest.raises(ValueError, match="costs.workload .* set build"):
        declare(costs=Costs(model=sflam_round_costs, workload=lambda *a: None))
    with pytest.raises(ValueError, match="an engine of its own"):
        declare(engine=lambda config, inputs: None)
    with pytest.raises(ValueError, match="needs costs.model or a planner"):
        declare(costs=Costs())
    with pytest.raises(ValueError, match="optimizes_bits needs quantized_cut"):
        declare(quantized_cut=False, optimizes_bits=True)
