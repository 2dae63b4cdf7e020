#!/usr/bin/env bash
# Downloads, into .whl/ (ignored by git), the wheels the device check needs and the device
# machine's image lacks, at this checkout's versions (read from .venv), for its Python 3.12.
# The image holds torch, transformers, tokenizers, huggingface_hub, aiohttp, anyio, numpy,
# pillow, rich and scipy; not diffusers, pydantic or polars. polars (~55 MB with its
# runtime) is not carried: the check's datasets are JSON.
#
#   bash bench/device_wheels.sh        # from the repository root, where pip can download
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
packages=(diffusers pydantic pydantic_core annotated_types typing_inspection typing_extensions)
pins=()
for name in "${packages[@]}"; do
  version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))")
  pins+=("$name==$version")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
ls -l .whl
