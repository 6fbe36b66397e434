"""Every path in a run directory, named in one place.

RUN_DIR/
  run.json              the resolved config, device, library versions and planned stages of the last run
  run.log               what every run did (appended), library output included
  .locks/               a lock per stage and one for the run's own files, held by the jobs working here (lock.py)
  stages/<stage>.json   each completed stage's record (manifest, summary, output hashes)
  dequantized/          with base.save_dequantized: the base as the adapter saw it
  merged/ gptq/         the merged 16-bit and the GPTQ checkpoints (merged_<base>/, gptq_<base>/ for
                        the other merge base); a GPTQ folder also holds README.md (the model card)
                        and quant_log.csv (gptqmodel's per-module loss log)
  evaluation/reference/ the reference stage's: the windows, the baseline's hidden states at the scored tokens
                        and its output layer, the prompts, scores.json of baseline and base_nf4
  evaluation/<model>/   each score_<model> stage's scores.json: per window its NLL, KL and top-1 agreement
  logs/                 gptqmodel's own log files
  report.json report.md report.html
  .<folder>.partial/ .<folder>.old/   a stage's output while it is written or replaced
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Files that are not a checkpoint's content: the report writes the model card after the evaluation
# read the folder, and gptqmodel's log holds timings that differ between identical runs.
MODEL_CARD = "README.md"
GPTQ_LOSS_LOG = "quant_log.csv"
NOT_CONTENT = (MODEL_CARD, GPTQ_LOSS_LOG)

SCORES = "scores.json"  # in each scoring stage's folder, the reference's included: see eval/scoring.py
WINDOWS = "windows.safetensors"  # in the reference's folder: every model is scored on these
REFERENCE_PROTOCOL = "reference.json"  # there too: the window protocol and the prompts as rendered
OFFLOAD = ".offload"  # in a scoring stage's temporary folder: accelerate's offload folder (device_map: auto)
REPORT_FILES = ("report.json", "report.md", "report.html")


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory."""

    root: Path

    @property
    def run_record(self) -> Path:
        return self.root / "run.json"

    @property
    def log(self) -> Path:
        return self.root / "run.log"

    @property
    def locks(self) -> Path:
        return self.root / ".locks"

    @property
    def run_lock(self) -> Path:
        """Held while a job writes run.json or the reports, or removes stages the plan no longer has."""
        return self.locks / "run.lock"

    def stage_lock(self, stage: str) -> Path:
        """Held by the job running the stage, and shared by the jobs reading its output."""
        return self.locks / f"{stage}.lock"

    @property
    def stage_records(self) -> Path:
        return self.root / "stages"

    def stage_record(self, stage: str) -> Path:
        return self.stage_records / f"{stage}.json"

    @property
    def dequantized(self) -> Path:
        return self.root / "dequantized"

    def model_dir(self, model: str) -> Path:
        """The checkpoint folder of a scored model: merged, gptq, merged_original, gptq_original."""
        return self.root / model

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def reference(self) -> Path:
        return self.evaluation / "reference"

    def scores(self, model: str) -> Path:
        """The folder of a model's scoring stage."""
        return self.evaluation / model

    @property
    def gptq_logs(self) -> Path:
        return self.root / "logs"

    def report_file(self, name: str) -> Path:
        return self.root / name

    def partial(self, output: Path) -> Path:
        """Where a stage writes `output` until it is complete: beside it."""
        return output.with_name(f".{output.name}.partial")

    def stage_leftovers(self, stage: str, output: Path) -> list[Path]:
        """What an interrupted job may have left of a stage: the temporary and replaced copies of its output
        folder and of its record, and nothing else. Removed only by a job holding the stage's lock."""
        return _existing([*_temporary(output), self.stage_record(stage).with_name(f".{stage}.json.partial")])

    def run_leftovers(self) -> list[Path]:
        """What an interrupted job may have left of run.json and the reports. Removed under the run lock."""
        return _existing(
            [path for name in REPORT_FILES for path in _temporary(self.report_file(name))]
            + [*_temporary(self.run_record)]
        )

    def relative(self, path: Path) -> str:
        """How records name a path: relative to the run directory when inside it (so that a moved run
        directory keeps its records), else absolute."""
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)


def _temporary(path: Path) -> list[Path]:
    """The temporary and replaced copies a write of `path` makes (see files.py)."""
    return [path.with_name(f".{path.name}.{state}") for state in ("partial", "old")]


def _existing(paths: list[Path]) -> list[Path]:
    return [path for path in paths if path.exists() or path.is_symlink()]
