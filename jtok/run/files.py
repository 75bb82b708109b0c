"""The names of a run directory's files: the one place that spells them.

    RUN/
      config.json        the resolved RunConfig the run uses (rewritten only after a
                         validated start or an allowed change on resume); a retrofitted
                         run's has a "retrofit" section in place of "model"
      run.json           where the data is (the path given, resolved, its fingerprint),
                         the changes applied on resume, the jtok version
      tokenizer.json     a copy of the data's tokenizer (for eval / sample / generate)
      metrics.jsonl      one line per log / validation record
      checkpoints/step_XXXXXXXX/   model.safetensors, optimizer.safetensors, state.json
      .jtok.lock         flock'd by the process that trains the run, for its whole life
"""

from __future__ import annotations

from pathlib import Path

from jtok.data.format import MANIFEST_FILE, TOKENIZER_FILE  # the data directory's names

CONFIG_FILE = "config.json"
# The section of a retrofitted run's config.json that stands in for "model" (the HF config
# and the retrofit options: jtok.hf.retrofit_run).
RETROFIT_RECORD_KEY = "retrofit"
RUN_INFO_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".jtok.lock"
TENSORBOARD_DIR = "tensorboard"
# What `--overwrite` replaces (never the lock file: another process may be waiting on it).
RUN_OUTPUTS = (CHECKPOINT_DIR, METRICS_FILE, CONFIG_FILE, RUN_INFO_FILE, TENSORBOARD_DIR,
               TOKENIZER_FILE)  # fmt: skip


# A study directory (jtok sweep OUT, read by jtok fit):
#   OUT/results.jsonl   one line per finished run;  OUT/spec.json   the spec that last ran
#   OUT/runs/<name>/    one run directory per run
RESULTS_FILE = "results.jsonl"
SPEC_COPY_FILE = "spec.json"
STUDY_RUNS_DIR = "runs"


def run_file(run_dir: Path | str, name: str) -> Path:
    return Path(run_dir) / name


# Each kind of jtok folder by the file that marks it (the first file each one writes), and
# what to call it in an error: writers check these before putting files into a folder.
FOLDER_MARKERS = {RUN_INFO_FILE: "a run", MANIFEST_FILE: "prepared data",
                  SPEC_COPY_FILE: "a sweep study"}  # fmt: skip


def owning_jtok_folder(path: Path | str) -> tuple[Path, str] | None:
    """The run, prepared-data or study folder `path` lies in (the nearest, by its
    FOLDER_MARKERS file), with what it is; None outside any. An output file written there
    would replace or sit among that folder's own files."""
    for folder in Path(path).absolute().parents:
        for name, what in FOLDER_MARKERS.items():
            if (folder / name).is_file():
                return folder, what
    return None
