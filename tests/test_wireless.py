import jax
import jax.numpy as jnp
import numpy as np

from sflam_jax.wireless import channel, costs

P = channel.SystemParams()


def test_noise_and_path_loss_by_hand():
    np.testing.assert_allclose(P.noise_w_per_hz, 10 ** (-20.4), rtol=1e-12)
    np.testing.assert_allclose(channel.path_loss_db(jnp.array([1000.0, 100.0])), [128.1, 90.5])


def test_rate_by_hand_and_limits():
    # beta = 1 MHz, p G / (beta N0) = 3 -> 1e6 * log2(4) = 2e6 bit/s.
    n0 = P.noise_w_per_hz
    gain = 3.0 * 1e6 * n0 / 0.1
    np.testing.assert_allclose(channel.rate_bps(1e6, 0.1, gain, n0), 2e6, rtol=1e-6)
    assert float(channel.rate_bps(0.0, 0.1, gain, n0)) == 0.0
    assert float(channel.rate_bps(1e6, 0.0, gain, n0)) == 0.0
    # More bandwidth or more power never lowers the rate.
    bws = jnp.linspace(1e3, 2e7, 200)
    assert np.all(np.diff(np.asarray(channel.rate_bps(bws, 0.1, gain, n0))) > 0)
    ps = jnp.linspace(1e-4, 0.2, 200)
    assert np.all(np.diff(np.asarray(channel.rate_bps(1e6, ps, gain, n0))) > 0)
    # Infinite bandwidth saturates at p G / (N0 ln 2).
    np.testing.assert_allclose(
        channel.rate_bps(1e12, 0.1, gain, n0), 0.1 * gain / (n0 * np.log(2)), rtol=1e-3
    )


def test_device_draws_follow_the_geometry():
    devices = channel.draw_devices(jax.random.key(0), 20000, P)
    d = np.asarray(devices.distance_m)
    assert d.min() >= 10.0 and d.max() <= 250.0
    # Uniform in area: P(d <= 125 m) = (125^2 - 10^2) / (250^2 - 10^2).
    np.testing.assert_allclose(np.mean(d <= 125.0), (125**2 - 100) / (250**2 - 100), atol=0.01)
    f = np.asarray(devices.cpu_hz)
    assert f.min() >= 0.5e9 and f.max() <= 2e9
    # Shadowing x fading around the path loss: log-gain residual has the right mean and spread.
    resid_db = 10 * np.log10(np.asarray(devices.gain)) + np.asarray(channel.path_loss_db(d))
    # 10 log10 Exp(1) has mean -2.51 dB and std 5.57 dB; shadowing adds N(0, 8^2).
    np.testing.assert_allclose(resid_db.mean(), -2.507, atol=0.2)
    np.testing.assert_allclose(resid_db.std(), np.sqrt(64 + 5.57**2), atol=0.2)
    again = channel.draw_devices(jax.random.key(0), 20000, P)
    np.testing.assert_array_equal(again.gain, devices.gain)


def _one_device(gain=1e-10, cpu=1e9):
    return channel.Devices(
        distance_m=jnp.array([100.0]), gain=jnp.array([gain]), cpu_hz=jnp.array([cpu])
    )


def _hand_terms():
    """WORK's step terms on ``_one_device`` at 0.1 W, 1 MHz, 8 bits up, float down, by hand:
    the two rates, device forward, server step, uplink and downlink times of a step."""
    n0 = P.noise_w_per_hz
    r_up = 1e6 * np.log2(1 + 0.1 * 1e-10 / (1e6 * n0))
    r_dn = 1e6 * np.log2(1 + 1.0 * 1e-10 / (1e6 * n0))
    t_cf = 4 * 2e6 / (16 * 1e9)
    t_srv = 3 * 4 * 8e6 * 1 / 100e12
    return r_up, r_dn, t_cf, t_srv, 4 * (100 * 8 + 64) / r_up, 4 * (32 * 100) / r_dn


WORK = costs.Workload(
    client_flops=2e6, server_flops=8e6, values_per_sample=100, client_params=1000, batch_size=4
)


def test_round_costs_by_hand():
    dev = _one_device()
    out = costs.sflam_round_costs(
        dev, jnp.array([5]), jnp.array([0.1]), jnp.array([1e6]), jnp.array([8.0]), WORK, P
    )
    r_up, r_dn, t_cf, t_srv, t_up, t_dn = _hand_terms()
    agg = 32 * 1000
    latency = 5 * (t_cf + t_up + t_srv + t_dn + 2 * t_cf) + agg / r_up + agg / r_dn
    energy = 5 * (1e-28 * 1e18 * 3 * 4 * 2e6 / 16 + 0.1 * t_up) + 0.1 * agg / r_up
    np.testing.assert_allclose(out["latency_s"], [latency], rtol=1e-5)
    np.testing.assert_allclose(out["energy_j"], [energy], rtol=1e-5)
    # The split: compute is the device's and the server's work, communication the links'.
    np.testing.assert_allclose(out["compute_s"], [5 * (3 * t_cf + t_srv)], rtol=1e-5)
    np.testing.assert_allclose(
        out["comm_s"], [5 * (t_up + t_dn) + agg / r_up + agg / r_dn], rtol=1e-5
    )
    np.testing.assert_allclose(out["compute_energy_j"], [5 * 1e-28 * 1e18 * 3 * 4 * 2e6 / 16])
    np.testing.assert_allclose(out["comm_energy_j"], [0.1 * (5 * t_up + agg / r_up)], rtol=1e-5)


def test_adapters_and_a_frozen_device_by_hand():
    """LoRA's costs: aggregation moves the adapters (``client_shared``); a frozen device
    segment runs its forward only and receives no gradient, and nothing is aggregated."""
    import dataclasses

    dev = _one_device()
    r_up, r_dn, t_cf, t_srv, t_up, t_dn = _hand_terms()
    args = (dev, jnp.array([5]), jnp.array([0.1]), jnp.array([1e6]), jnp.array([8.0]))
    adapters = costs.sflam_round_costs(*args, dataclasses.replace(WORK, client_shared=40), P)
    agg = 32 * 40
    latency = 5 * (3 * t_cf + t_up + t_srv + t_dn) + agg / r_up + agg / r_dn
    np.testing.assert_allclose(adapters["latency_s"], [latency], rtol=1e-5)
    frozen = dataclasses.replace(WORK, client_shared=0, client_trains=False)
    out = costs.sflam_round_costs(*args, frozen, P)
    np.testing.assert_allclose(out["latency_s"], [5 * (t_cf + t_up + t_srv)], rtol=1e-5)
    energy = 5 * (1e-28 * 1e18 * 4 * 2e6 / 16 + 0.1 * t_up)
    np.testing.assert_allclose(out["energy_j"], [energy], rtol=1e-5)


def test_fl_client_trip_by_hand():
    """An asynchronous protocol's trip (FTTE, FedBuff): the download, the subset's training, the
    upload of its delta, SPEC section 3 by hand."""
    dev = _one_device(gain=2e-10, cpu=1.5e9)
    out = costs.client_trip_costs(
        dev, jnp.array([6]), 2e6, 0.05, 3e6, 4, jnp.array([5000]), 1200, P
    )
    n0 = P.noise_w_per_hz
    r_up = 2e6 * np.log2(1 + 0.05 * 2e-10 / (2e6 * n0))
    r_dn = 2e6 * np.log2(1 + 1.0 * 2e-10 / (2e6 * n0))
    cycles = 6 * 4 * 3e6 / 16
    t_up = 32 * 1200 / r_up
    np.testing.assert_allclose(out["compute_s"], [cycles / 1.5e9], rtol=1e-5)
    np.testing.assert_allclose(out["comm_s"], [32 * 5000 / r_dn + t_up], rtol=1e-5)
    np.testing.assert_allclose(out["time_s"], [cycles / 1.5e9 + 32 * 5000 / r_dn + t_up], rtol=1e-5)
    np.testing.assert_allclose(
        out["energy_j"], [1e-28 * 1.5e9**2 * cycles + 0.05 * t_up], rtol=1e-5
    )
    np.testing.assert_allclose(out["bytes"], [4 * (5000 + 1200)], rtol=1e-6)


def test_round_totals_and_monotone_limits():
    devices = channel.draw_devices(jax.random.key(1), 6, P)
    steps = jnp.arange(1, 7)
    bw = jnp.full(6, P.bandwidth_hz / 6)
    power = jnp.full(6, P.p_max_w)
    bits = jnp.full(6, 8.0)
    out = costs.sflam_round_costs(devices, steps, power, bw, bits, WORK, P)
    np.testing.assert_allclose(out["round_latency_s"], out["latency_s"].max(), rtol=1e-6)
    np.testing.assert_allclose(out["round_energy_j"], out["energy_j"].sum(), rtol=1e-6)
    more_bw = costs.sflam_round_costs(devices, steps, power, bw * 1.5, bits, WORK, P)
    assert np.all(np.asarray(more_bw["latency_s"]) < np.asarray(out["latency_s"]))
    less_power = costs.sflam_round_costs(devices, steps, power / 2, bw, bits, WORK, P)
    assert np.all(np.asarray(less_power["latency_s"]) > np.asarray(out["latency_s"]))
    fewer_bits = costs.sflam_round_costs(devices, steps, power, bw, bits / 2, WORK, P)
    assert np.all(np.asarray(fewer_bits["comm_s"]) < np.asarray(out["comm_s"]))


def test_uplink_energy_floor_as_power_vanishes():
    # E = p * bits / r(p) -> bits N0 ln2 / G as p -> 0 (per bit: N0 ln 2 / G).
    gain, bits = 1e-11, 1e6
    n0 = P.noise_w_per_hz
    p = jnp.array([1e-3, 1e-6, 1e-9], dtype=jnp.float32)
    energy = p * bits / channel.rate_bps(1e6, p, gain, n0)
    floor = bits * n0 * np.log(2) / gain
    assert np.all(np.diff(np.asarray(energy)) < 0)
    np.testing.assert_allclose(energy[-1], floor, rtol=1e-3)
    assert np.all(np.asarray(energy) >= floor * (1 - 1e-4))


def test_vectorised_over_scenarios():
    keys = jax.random.split(jax.random.key(2), 5)
    devices = jax.vmap(lambda k: channel.draw_devices(k, 4, P))(keys)
    ones = jnp.ones((5, 4))
    out = jax.vmap(
        lambda d: costs.sflam_round_costs(
            d, ones[0] * 3, ones[0] * 0.2, ones[0] * 5e6, ones[0] * 8, WORK, P
        )
    )(devices)
    assert out["round_latency_s"].shape == (5,) and out["latency_s"].shape == (5, 4)
    single = costs.sflam_round_costs(
        jax.tree.map(lambda x: x[3], devices),
        ones[0] * 3,
        ones[0] * 0.2,
        ones[0] * 5e6,
        ones[0] * 8,
        WORK,
        P,
    )
    np.testing.assert_allclose(out["round_energy_j"][3], single["round_energy_j"], rtol=1e-6)


def test_fl_costs_by_hand():
    work = costs.Workload(
        client_flops=2e6,
        server_flops=8e6,
        values_per_sample=100,
        client_params=1000,
        batch_size=4,
        server_params=9000,
    )
    out = costs.fl_round_costs(
        _one_device(), jnp.array([5]), jnp.array([0.1]), jnp.array([1e6]), jnp.array([8.0]), work, P
    )
    n0 = P.noise_w_per_hz
    r_up = 1e6 * np.log2(1 + 0.1 * 1e-10 / (1e6 * n0))
    r_dn = 1e6 * np.log2(1 + 1.0 * 1e-10 / (1e6 * n0))
    cycles = 3 * 4 * 10e6 / 16
    bits = 32 * 10000
    np.testing.assert_allclose(
        out["latency_s"], [5 * cycles / 1e9 + bits / r_up + bits / r_dn], rtol=1e-5
    )
    np.testing.assert_allclose(
        out["energy_j"], [5 * 1e-28 * 1e18 * cycles + 0.1 * bits / r_up], rtol=1e-5
    )


def test_sl_serialises_devices_with_the_whole_band():
    devices = channel.draw_devices(jax.random.key(3), 4, P)
    steps, power, bits = jnp.full(4, 3.0), jnp.full(4, 0.2), jnp.full(4, 8.0)
    sl = costs.sl_round_costs(devices, steps, power, jnp.full(4, 1e6), bits, WORK, P)
    np.testing.assert_allclose(sl["round_latency_s"], sl["latency_s"].sum(), rtol=1e-6)
    # Device k alone: all of B and an unshared server.
    single = costs.sflam_round_costs(
        jax.tree.map(lambda x: x[:1], devices),
        steps[:1],
        power[:1],
        jnp.array([P.bandwidth_hz]),
        bits[:1],
        WORK,
        P,
    )
    np.testing.assert_allclose(sl["latency_s"][0], single["latency_s"][0], rtol=1e-6)
    sfl = costs.sflam_round_costs(
        devices, steps, power, jnp.full(4, P.bandwidth_hz / 4), bits, WORK, P
    )
    assert float(sl["round_latency_s"]) > float(sfl["round_latency_s"])


def test_device_memory_of_the_split_is_below_fl():
    from sflam_jax.models import split as split_lib
    from sflam_jax.models import vit

    cfg = vit.vit_config("mini", image_size=28, channels=1, num_classes=10)
    params = vit.init_params(cfg, jax.random.key(0))
    pc0, _ = split_lib.split_params(params, 0, cfg.depth)
    cut0 = split_lib.split(cfg, 0)
    act_cut0 = split_lib.activation_bytes(cut0.client_apply, pc0, (32, 28, 28, 1))
    act_full = split_lib.activation_bytes(
        lambda p, x, k: vit.ViT(cfg).apply({"params": p}, x), params, (32, 28, 28, 1)
    )
    assert 0 < act_cut0 < act_full
    sflam_mem = costs.device_memory_bytes(split_lib.num_params(pc0), act_cut0)
    fl_mem = costs.device_memory_bytes(split_lib.num_params(params), act_full)
    assert sflam_mem < fl_mem
    np.testing.assert_allclose(costs.device_memory_bytes(10, 0.0, optimizer_slots=2), 4 * 10 * 4)
