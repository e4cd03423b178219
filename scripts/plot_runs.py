"""Accuracy against rounds and wall-clock time for one or more run directories.

python scripts/plot_runs.py runs/default:8-bit runs/b32:32-bit --out results/curve.png
"""

import argparse

from sflam_jax.plots import plot_accuracy


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="WORKDIR or WORKDIR:LABEL")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    dirs = [r.split(":", 1)[0] for r in args.runs]
    labels = [r.split(":", 1)[1] if ":" in r else r for r in args.runs]
    plot_accuracy(dirs, labels, args.out, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
