"""Runs the CLI and SIGKILLs it at a chosen point of a chosen round (for test_faults.py).

    python tests/preempt.py POINT ROUND --config=... --workdir=...

POINT:
  round       after round ROUND's computation, before anything of it is written;
  eval        while round ROUND's evaluation runs;
  metrics     halfway through writing round ROUND's metrics.jsonl line;
  checkpoint  after orbax wrote round ROUND's checkpoint files, before it commits them.
"""

import asyncio
import os
import signal
import sys


def _die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install(point: str, at: int) -> None:
    from sflam_jax import metrics, train

    if point == "round":
        check = train.check_health

        def check_then_die(health, clients, round_index, *words):
            check(health, clients, round_index, *words)
            if round_index == at:
                _die()

        train.check_health = check_then_die
    elif point == "eval":
        evaluate_state = train.evaluate_state

        def evaluate_and_die(evaluate, state, images, labels):
            if int(state.round) == at:
                evaluate(state.params_c, state.params_s, images, labels)  # dispatched, not done
                _die()
            return evaluate_state(evaluate, state, images, labels)

        train.evaluate_state = evaluate_and_die
    elif point == "metrics":
        write = metrics.JsonlWriter.write

        def write_half_and_die(self, record):
            if self.path.endswith("metrics.jsonl") and record["round"] == at:
                line = metrics.json.dumps(metrics.to_python(record)) + "\n"
                self._file.write(line[: len(line) // 2])
                self._file.flush()
                os.fsync(self._file.fileno())
                _die()
            write(self, record)

        metrics.JsonlWriter.write = write_half_and_die
    elif point == "checkpoint":
        from orbax.checkpoint._src.path import atomicity

        finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def die_before_commit(self):
            if self.get_final().name == str(at):
                await asyncio.sleep(0)
                _die()
            await finalize(self)

        atomicity.AtomicRenameTemporaryPath.finalize = die_before_commit
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    point, at = sys.argv[1], int(sys.argv[2])
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    _install(point, at)
    from absl import app

    from sflam_jax import main

    app.run(main.main)
