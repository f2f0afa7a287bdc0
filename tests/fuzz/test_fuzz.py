"""A bounded, seeded atheris run of the ingest checks and the mapping (tests/fuzz/fuzz_ingest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_the_ingest_fuzz_target_finds_nothing(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(HERE / "corpus", corpus)
    result = subprocess.run(
        [
            sys.executable,
            str(HERE / "fuzz_ingest.py"),
            "-runs=100000",
            "-seed=1",
            "-max_len=2048",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done 100000 runs" in result.stderr
