"""The trainer, read top to bottom: config -> mesh -> experiment (``experiment.build_run``: data,
model split, protocol, engine, jitted round) -> resume -> loop -> metrics and checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import jax
import ml_collections
from tqdm.auto import tqdm

from sflam_jax.algorithms.base import HEALTH, check_health, make_evaluate
from sflam_jax.checkpoint import Checkpointer, to_record
from sflam_jax.experiment import build_run
from sflam_jax.metrics import MetricWriter, atomic_write_text, read_jsonl, to_python
from sflam_jax.sharding import initialize_distributed, set_cpu_devices
from sflam_jax.validation import validate

# What a run writes into its workdir; ``fresh=True`` deletes these before starting.
RUN_OUTPUTS = (
    "checkpoints",
    "corrupt_checkpoints",
    "metrics.jsonl",
    "timing.jsonl",
    "tensorboard",
    "config.json",
    "system.json",
)


def discard_outputs(workdir: str) -> None:
    """Deletes a run's checkpoints and metrics (``--fresh``); other files are left alone."""
    for name in RUN_OUTPUTS:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def evaluate_state(evaluate, state, images, labels) -> dict:
    """Test loss and accuracy of the global model, as host values."""
    return jax.device_get(evaluate(state.params_c, state.params_s, images, labels))


def run_rounds(
    round_fn,
    state,
    start: int,
    end: int,
    *,
    num_rounds: int,
    eval_every: int,
    evaluate,
    eval_from: int = 0,
    split,
    check,
    write,
    after=None,
    finished=lambda state: False,
    bar=None,
):
    """The round loop of every trainer (``train_and_evaluate``, and the vectorized sweep's points
    side by side): round-0 evaluation, rounds, health check, evaluation cadence, records.

    Args:
      round_fn: ``(state, r) -> (state, metrics)``, round ``r`` (0-based).
      state: the state after ``start`` rounds.
      start, end: the rounds ``[start, end)`` to run.
      num_rounds: the run's length; its last round is always evaluated.
      eval_every: test metrics every that many rounds (0: only the last) and, from round 0, of
        the starting model.
      evaluate: ``state -> [dict]`` test metrics, one dict per run (the sweep's points).
      eval_from: no evaluation before this round (round 0 included when it is above 0); the last
        round is evaluated all the same.
      split: host metrics -> ``[dict]``, one per run.
      check: ``(health, metrics, round) -> None``; raises to stop before the round is written.
      write: ``(records, timing) -> None``.
      after: ``(state, done) -> None`` after each round is written (checkpoints).
      finished: ``state -> bool``, the engine's own stop rule.
      bar: a progress bar advanced every round (the first run's loss and accuracy shown).

    Returns:
      ``(state, the last round's records)`` (None when no round ran or was evaluated).
    """
    t_start = time.perf_counter()
    records, last_eval = None, [{}]
    if start == 0 and eval_every and eval_from == 0:
        # Round 0: the starting model (the checkpoint's accuracy when fine-tuning).
        last_eval = evaluate(state)
        records = [{"round": 0, **e} for e in last_eval]
        write(records, {"eval_s": time.perf_counter() - t_start, "elapsed_s": 0.0})
    for r in range(start, end):
        t0 = time.perf_counter()
        state, metrics = round_fn(state, r)
        metrics = jax.device_get(metrics)
        check(metrics.pop(HEALTH), metrics, r + 1)
        t1 = time.perf_counter()
        records = [{"round": r + 1, **m} for m in split(metrics)]
        done = r + 1 == num_rounds or finished(state)
        if done or (eval_every and r + 1 >= eval_from and (r + 1) % eval_every == 0):
            last_eval = evaluate(state)
            for record, e in zip(records, last_eval, strict=True):
                record.update(e)
        t2 = time.perf_counter()
        write(records, {"round_s": t1 - t0, "eval_s": t2 - t1, "elapsed_s": t2 - t_start})
        if after is not None:
            after(state, done)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{float(records[0]['train_loss']):.3f}",
                acc=f"{float(last_eval[0].get('test_accuracy', float('nan'))):.3f}",
            )
        if done:
            break
    return state, records


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, fresh: bool = False
) -> dict:
    """Runs (or resumes) the experiment of ``config`` in ``workdir``.

    Writes ``workdir/metrics.jsonl`` (one record per round; with ``eval_every`` a round-0 record
    of the starting model's test metrics first), ``timing.jsonl``, ``config.json`` and
    orbax checkpoints under ``workdir/checkpoints``. Returns the last round's record.

    Args:
      config: the experiment (validated here).
      workdir: the run directory; a run already there is resumed from its newest good checkpoint.
      fresh: delete the run's checkpoints and metrics first instead of resuming.

    Raises:
      ConfigError: a bad config field (named in the message).
      CheckpointMismatchError: ``workdir`` holds checkpoints of another config.
      NonFiniteError: a round produced a non-finite loss or parameter (round and client named).
    """
    validate(config)
    set_cpu_devices(config.sharding)
    initialize_distributed(config.distributed)
    primary = jax.process_index() == 0
    if fresh and primary:
        discard_outputs(workdir)
    os.makedirs(workdir, exist_ok=True)

    run = build_run(config)
    initial, layout, round_fn = run.initial, run.layout, run.round_fn
    test_images = layout.replicate(run.dataset.test_images)
    test_labels = layout.replicate(run.dataset.test_labels)

    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        config.checkpoint.every,
        config.checkpoint.max_to_keep,
        to_record(config),
        run_control=run.protocol.run_control,
    )
    try:
        state = checkpointer.restore_or_init(initial)
    except BaseException:
        checkpointer.close()
        raise
    start = int(state.round)
    # Process 0 writes the run's files; the others compute alongside it.
    writer = None
    if primary:
        # Written once the checkpoints are known to belong to this config.
        atomic_write_text(
            os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2)
        )
        atomic_write_text(os.path.join(workdir, "system.json"), json.dumps(run.system, indent=2))
        # Records after the restored round are dropped (those rounds run again); a run
        # restarting from round 0 also rewrites its round-0 evaluation.
        writer = MetricWriter(workdir, start if start else -1, config.metrics.tensorboard)
    write = writer.write if writer is not None else lambda *_: None

    evaluate = jax.jit(
        make_evaluate(run.model, run.preprocess, config.train.eval_batch_size),
        in_shardings=(
            run.state_shardings.params_c,
            run.state_shardings.params_s,
            layout.replicated,
            layout.replicated,
        ),
        out_shardings=layout.replicated,
    )

    previous = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    record: dict = previous[-1] if previous else {}
    bar = tqdm(
        total=config.num_rounds,
        initial=start,
        desc=f"{config.algorithm} rounds",
        unit="round",
        disable=not (config.metrics.progress and primary),
        dynamic_ncols=True,
    )
    engine = run.engine
    # An engine may stop before num_rounds (the event protocols on their simulated clock); a
    # resumed run that had already stopped trains nothing more.
    end = start if engine.finished(state) else config.num_rounds

    def check(health, metrics, round_index):
        # Stops before anything of this round is written; the last checkpoint stays good.
        check_health(
            health, metrics["clients"], round_index, engine.health_parts, engine.health_advice
        )
        short = int(metrics.get("memory_infeasible_device", -1))
        if short >= 0 and primary:
            tqdm.write(
                f"round {round_index}: the memory of client {int(metrics['clients'][short])} "
                "fits no candidate cut (esfl.cuts, esfl.memory_*_bytes); it trained at the "
                "least-memory cut",
                file=sys.stderr,
            )

    try:
        _, records = run_rounds(
            round_fn,
            state,
            start,
            end,
            num_rounds=config.num_rounds,
            eval_every=config.eval_every,
            eval_from=config.eval_from,
            evaluate=lambda st: [evaluate_state(evaluate, st, test_images, test_labels)],
            split=lambda metrics: [metrics],
            check=check,
            write=lambda records, timing: write(records[0], timing),
            after=lambda st, done: checkpointer.maybe_save(st, force=done),
            finished=engine.finished,
            bar=bar,
        )
        if records:
            record = records[0]
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        checkpointer.close()
    return to_python(record)
