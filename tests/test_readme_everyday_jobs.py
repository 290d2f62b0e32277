"""The README's "Everyday jobs" commands run as written (slow tier): annotate, perturb and gene-embeddings on the real
CellBench / PBMC files, with a randomly initialised panfoma-tiny, each in a fresh folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def everyday_commands() -> list[str]:
    """The shell commands of the first bash block of README's "Everyday jobs" section (continuations joined)."""
    section = README.read_text().split("## Everyday jobs", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.slow
def test_everyday_jobs_commands_run_as_written(shared_data, tmp_path):
    commands = everyday_commands()
    assert [c.split()[1] for c in commands if c.startswith("panfoma ")] == [
        "annotate", "perturb", "gene-embeddings", "gene-embeddings"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for command in commands:
        command = command.replace("../shared/data", str(shared_data))
        command = re.sub(r"^panfoma ", f"{sys.executable} -m panfoma.cli ", command)
        command = re.sub(r"^python ", f"{sys.executable} ", command)
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, env=env,
                              timeout=900)
        assert done.returncode == 0, (command, done.stderr[-3000:])
        assert "Traceback" not in done.stderr, command
    for name in ("query.annotated.h5ad", "query.annotated.annotation.json", "perturb.csv", "perturb_cells.csv",
                 "genes_input.parquet", "genes_context.csv", "attention.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    import json

    report = json.loads((tmp_path / "query.annotated.annotation.json").read_text())
    # Drop-seq lacks two of the five CEL-seq2 lines (A549, H838) and has no line the reference lacks.
    absent = set(report["reference_types_absent_from_query"])
    assert absent and absent <= {"A549", "H838"}
    assert report["query_types_absent_from_reference"] == []
