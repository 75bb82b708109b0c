"""Loading a sweep's results.jsonl for `jtok fit`: one validated record per finished run.

The file is read through `jtok.io.read_jsonl`, the project's one JSON-lines policy (a torn
last line, from a sweep that died while appending, is dropped with a warning; a bad line
anywhere else is an error naming it). On top of that, every field the fits use is checked
here, so a fit never meets a string where it expects a count. Each run also gets what the
fits derive from its record: `seed` (what pairs runs of two variants), and `N_c_all` (N_c as
recorded, input embedding and head included) next to `N_c_non_embedding` (without them,
counted from the run's config; None where the config cannot be counted, with the reason in
`non_embedding_unknown`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jtok.errors import JTokError
from jtok.io import FileFormatError, read_jsonl
from jtok.run.files import RESULTS_FILE

PARAM_COUNTS = ("all", "non-embedding")

LOSS_FIELDS = ("final_val_loss", "best_val_loss")

# Field -> kind. "num?" also takes null; a loss may be NaN (a diverged run, dropped later).
RESULT_FIELDS = {
    "name": "str", "variant": "str", "backbone": "str", "budget": "num?", "N_c": "int",
    "N_c_total": "int", "N_n": "int", "eta": "num", "rho": "num", "tokens": "int",
    "flops": "num", "final_val_loss": "num", "best_val_loss": "num", "curve": "curve",
    "config": "dict",
}  # fmt: skip
_POSITIVE = {"N_c", "N_c_total", "tokens", "flops", "budget"}
_NON_NEGATIVE = {"N_n", "eta", "rho"}


class FitError(JTokError):
    """A mistake in the inputs of `jtok fit` (missing directory, bad results, too few runs)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _field_value(key: str, value: Any, kind: str) -> Any:
    """The normalised value, or raise ValueError with what is wrong."""
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise ValueError("must be a non-empty string")
        return value
    if kind in ("dict", "curve"):
        if kind == "dict" and not isinstance(value, dict):
            raise ValueError("must be an object")
        if kind == "curve" and not (isinstance(value, list) and all(
                isinstance(p, list) and len(p) == 3 and all(map(_is_number, p)) for p in value)):
            raise ValueError("must be a list of [step, tokens, val_loss]")  # fmt: skip
        return value
    if value is None and kind == "num?":
        return None
    if not _is_number(value):
        raise ValueError("must be a number" + (" or null" if kind == "num?" else ""))
    if kind == "int":
        if not float(value).is_integer():
            raise ValueError("must be an integer")
        value = int(value)
    else:
        value = float(value)
    if key in _POSITIVE and not value > 0 or key in _NON_NEGATIVE and not value >= 0:
        raise ValueError("must be " + ("positive" if key in _POSITIVE else "non-negative"))
    return value


def _line_of_record(file: Path, index: int) -> int:
    """The line number of the `index`-th (0-based) record, to name it in an error.

    `read_jsonl` skips blank lines, so record and line numbers can differ; looked up only
    when a record is bad, so that the normal path reads the file once."""
    try:
        lines = file.read_bytes().split(b"\n")
    except OSError:
        return index + 1
    numbers = [number for number, line in enumerate(lines, 1) if line.strip()]
    return numbers[index] if index < len(numbers) else index + 1


def embedding_and_head(config: dict) -> tuple[int | None, str]:
    """Parameters of the input embedding and the output head (once if tied) of a run, counted
    by `jtok.flops.count_params` from the run's recorded config; (None, why) where the config
    holds no model section it can count (runs written by hand, or by an older jtok)."""
    from jtok.config import ModelConfig
    from jtok.flops import count_params

    model = config.get("model")
    if not isinstance(model, dict):
        return None, "its config has no model section"
    try:
        counts = count_params(ModelConfig.from_dict(model))
    except (JTokError, ValueError, TypeError) as err:
        return None, f"its model config cannot be counted ({err})"
    return counts.embedding + counts.head, ""


def _run_seed(record: dict) -> Any:
    """The seed of a run (its config's train.seed, else a "seed" label, else None): runs of
    two variants at one (budget, backbone, seed) saw the same batches, so their noise pairs."""
    train = record.get("config", {}).get("train")
    if isinstance(train, dict) and isinstance(train.get("seed"), int):
        return train["seed"]
    return record.get("labels", {}).get("seed")


def _validated_run(record: dict) -> dict:
    """The run's fields the fits use, normalised; raises ValueError saying what is wrong."""
    run = {}
    for key, kind in RESULT_FIELDS.items():
        if key not in record:
            raise ValueError(f"missing field {key!r}")
        try:
            run[key] = _field_value(key, record[key], kind)
        except ValueError as err:
            raise ValueError(f"field {key!r} {err}") from None
    labels = record.get("labels", {})  # optional: a sweep's axis labels split profiles
    if not isinstance(labels, dict):
        raise ValueError("field 'labels' must be an object")
    run["labels"] = {str(k): str(v) for k, v in labels.items()}
    run["seed"] = _run_seed(run)
    # N_c as recorded counts the input embedding and head; at small widths they are most of
    # it, so the fit can also use N_c without them (`jtok fit --params non-embedding`).
    embedding, why = embedding_and_head(run["config"])
    if embedding is not None and run["N_c"] <= embedding:
        embedding, why = None, (f"its N_c {run['N_c']} is not above the embedding and head "
                                f"its config gives ({embedding})")  # fmt: skip
    run["N_c_all"] = run["N_c"]
    run["N_c_non_embedding"] = None if embedding is None else run["N_c"] - embedding
    run["non_embedding_unknown"] = why  # "" where counted
    return run


def load_results(path: str | Path) -> list[dict]:
    """Runs of DIR/results.jsonl (or of a results file), validated; unknown fields dropped."""
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FitError(f"{file}: no such file" + (" (run `jtok sweep` first)" if
                                                   path.is_dir() else ""))  # fmt: skip
    try:
        records = read_jsonl(file, what="results file")
    except FileFormatError as err:
        # One error class for every bad input of the fit, whatever layer found it.
        raise FitError(str(err)) from None
    runs = []
    for index, record in enumerate(records):
        try:
            runs.append(_validated_run(record))
        except ValueError as err:
            raise FitError(f"{file}:{_line_of_record(file, index)}: {err}") from None
    if not runs:
        raise FitError(f"{file}: holds no results")
    return runs
