"""One pipeline run, read top to bottom: setup, the model stages, then the report.

Each stage writes into a temporary folder in the run directory and is renamed into place only
when complete, so a reader never sees a half-written checkpoint. Each completed stage leaves a
record in RUN_DIR/stages/ with its manifest (the settings it used, the hashes of the files it
read, the library versions) and the hashes of what it wrote. A re-run skips every stage whose
manifest still matches and whose outputs are intact, so a run killed at any moment and started
again redoes only the unfinished work. A lock refuses a second run on the same directory.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from eval.report import REPORT_FILES
from pipeline.checkpoint import CheckpointReader, dtype_of, is_bnb_4bit, read_model_config
from pipeline.config import RunConfig
from pipeline.files import publish_dir, require_free_space, write_atomically
from pipeline.lock import RunLock
from pipeline.manifest import file_records, hashes
from pipeline.metrics import measure
from pipeline.stages.dequantize import DequantizedBase, check_base, run_dequantize
from pipeline.stages.evaluate import EVALUATION_DIR, run_evaluate
from pipeline.stages.merge import run_merge
from pipeline.stages.report import RUN_RECORD, STAGE_RECORDS, write_reports
from pipeline.stages.requantize import estimate_gptq_bytes, run_requantize
from quant.calibration import check_held_out, require_tokens
from quant.errors import InputError

log = logging.getLogger(__name__)

LIBRARIES = ("qlora-requant", "torch", "transformers", "peft", "bitsandbytes", "gptqmodel", "safetensors",
             "datasets")
LOG_FILE = "run.log"
# Used by the checks or the report only: changing them re-scores nothing.
REPORT_ONLY_EVALUATION_KEYS = {"bootstrap_samples", "seed", "overlap"}


@dataclass
class Stage:
    """One stage of this run: what it depends on, how much disk it needs, and the work itself."""

    name: str  # its record's name: merge, merge_original, ...
    kind: str  # one of STAGE_ORDER (what --force names)
    output: Path
    settings: dict  # the config slice the stage depends on
    inputs: list[Path]  # files and folders it reads
    work: Callable[[Path], dict]  # writes into a temporary folder; returns the summary
    needed_bytes: Callable[[], int] = lambda: 0


class Pipeline:
    """dequantize -> merge -> requantize -> evaluate -> report, for one RunConfig."""

    def __init__(self, config: RunConfig, force: set[str] | None = None):
        self.config = config
        self.force = force or set()
        self.run_dir = config.output_dir
        self.device = "cpu"
        self.calibration_texts: list[str] = []
        self.eval_texts: list[str] = []
        self.models: dict[str, Path] = {}  # plain checkpoints to score: merged, gptq (and other merge base)
        self.versions = {name: version(name) for name in LIBRARIES}
        self.skipped: list[str] = []
        self.base: DequantizedBase | None = None  # the base as the adapter saw it; set by check()
        self._file_records: dict[str, dict] = {}  # every file hashed in this run, by absolute path
        self._lock = RunLock(self.run_dir)
        self._log_handler: logging.Handler | None = None

    def check(self) -> None:
        """Every check of the inputs that needs reading them, writing nothing (what `validate` runs)."""
        config = self.config
        for key, path in [("base.path", config.base.path), *config.adapter.keyed_paths()]:
            if self.run_dir == path or path in self.run_dir.parents:
                raise InputError(f"output_dir {self.run_dir} is inside {key} {path}; choose another output_dir")
        base_config = read_model_config(config.base.path)
        check_base(config.base, base_config)
        if config.device == "cuda" and not torch.cuda.is_available():
            raise InputError("device: cuda, but torch sees no CUDA device; set device: cpu or auto")
        self.device = "cuda" if config.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        self.base = DequantizedBase(config.base, self.device, config.allow_pickle)  # reads the file headers
        self._refuse_tokenizer_code()
        if "original" in config.merge.merge_bases() and is_bnb_4bit(base_config):
            raise InputError(f"merge.merge_base: original needs the original 16-bit weights, but {config.base.path} "
                             "is a 4-bit checkpoint; use merge_base: nf4")
        self.calibration_texts = config.requantize.calibration.load()
        self.eval_texts = config.evaluation.text.load()
        shared = check_held_out(self.eval_texts, self.calibration_texts, config.evaluation.text.describe(),
                                refuse=config.evaluation.overlap == "refuse")
        if shared:
            log.warning("evaluation text shares %d passage(s) with the calibration text (evaluation.overlap: warn); "
                        "its scores favour the GPTQ model", shared)
        self._check_text_lengths()

    def setup(self) -> None:
        """Check the inputs, then take the run directory: lock it, clear what an interrupted run left."""
        self.check()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        for leftover in [*self.run_dir.glob(".*.partial"), *self.run_dir.glob(".*.old")]:
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        for stale in REPORT_FILES:
            (self.run_dir / stale).unlink(missing_ok=True)
        (self.run_dir / STAGE_RECORDS).mkdir(exist_ok=True)
        self._log_handler = logging.FileHandler(self.run_dir / LOG_FILE, mode="a")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(self._log_handler)
        log.info("run %s on %s", self.run_dir, self.device)
        run = {"config": self.config.model_dump(mode="json"), "device": self.device, "versions": self.versions}
        write_atomically(self.run_dir / RUN_RECORD, json.dumps(run, indent=2) + "\n")

    def _refuse_tokenizer_code(self) -> None:
        """A tokenizer that ships Python code (auto_map) runs only with trust_remote_code: true."""
        path = self.config.base.path / "tokenizer_config.json"
        if self.config.trust_remote_code or not path.is_file():
            return
        try:
            custom = "auto_map" in json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc}); re-save the tokenizer") from None
        if custom:
            raise InputError(f"{path}: the tokenizer ships its own Python code (auto_map), which qlora-requant "
                             "does not run unless trust_remote_code: true; set it if you trust it")

    def _check_text_lengths(self) -> None:
        """Refuse calibration or eval text too short for one window, before any stage runs."""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.config.base.path,
                                                      trust_remote_code=self.config.trust_remote_code)
        except (OSError, ValueError):
            raise InputError(f"{self.config.base.path}: has no tokenizer files; save the tokenizer used in "
                             "training beside the base (tokenizer.json / tokenizer_config.json)") from None
        calibration, evaluation = self.config.requantize.calibration, self.config.evaluation
        require_tokens(tokenizer, self.calibration_texts, calibration.seq_len + 1,
                       f"{calibration.describe()} (requantize.calibration.seq_len={calibration.seq_len})")
        require_tokens(tokenizer, self.eval_texts, evaluation.seq_len,
                       f"{evaluation.text.describe()} (evaluation.seq_len={evaluation.seq_len})")
        if evaluation.bos and tokenizer.bos_token_id is None:
            raise InputError(f"evaluation.bos is true but the tokenizer of {self.config.base.path} has no BOS token; "
                             "set evaluation.bos: false")

    def run(self) -> None:
        """Run the model stages in order, skipping those already complete and unchanged."""
        stages = self.plan()
        planned = {stage.name for stage in stages}
        for record in (self.run_dir / STAGE_RECORDS).glob("*.json"):
            if record.stem not in planned:
                record.unlink()
        for stage in stages:
            self._stage(stage)

    def plan(self) -> list[Stage]:
        """The stages this config asks for, in order: merge (dequantizing on the fly) and requantize,
        once per merge base, then evaluate. With base.save_dequantized, the dequantized base first."""
        config = self.config
        common = {"device": self.device, "max_shard_size": config.max_shard_size}
        base = config.base.model_dump(mode="json", exclude={"model_id", "save_dequantized"})
        adapter_dirs = [path for _, path in config.adapter.keyed_paths()]
        stages = []
        if config.base.save_dequantized:
            stages.append(Stage("dequantize", "dequantize", self.run_dir / "dequantized", {**common, "base": base},
                                [config.base.path], lambda out: run_dequantize(config.base, out, config.max_shard_size,
                                                                               self.device, config.allow_pickle),
                                lambda: self._output_bytes(None)))
        for merge_base in config.merge.merge_bases():
            suffix = "" if merge_base == config.merge.merge_base else f"_{merge_base}"
            merged, gptq = self.run_dir / f"merged{suffix}", self.run_dir / f"gptq{suffix}"
            stages.append(Stage(
                f"merge{suffix}", "merge", merged,
                {**common, "base": base, "adapter": config.adapter.model_dump(mode="json"),
                 "dtype": config.merge.dtype, "merge_base": merge_base},
                [config.base.path, *adapter_dirs], lambda out, merge_base=merge_base: self._merge(merge_base, out),
                lambda: self._output_bytes(config.merge.dtype)))
            calibration = config.requantize.calibration.path
            stages.append(Stage(
                f"requantize{suffix}", "requantize", gptq,
                {"device": self.device, "requantize": config.requantize.model_dump(mode="json")},
                [merged, *([calibration] if calibration else [])],
                lambda out, merged=merged: run_requantize(config.requantize, self.calibration_texts, merged,
                                                          self.device, out, config.trust_remote_code),
                lambda merged=merged: estimate_gptq_bytes(merged, config.requantize.bits)))
            self.models.update({merged.name: merged, gptq.name: gptq})
        eval_text = config.evaluation.text.path
        stages.append(Stage(
            "evaluate", "evaluate", self.run_dir / EVALUATION_DIR,
            {"device": self.device, "base": base,
             "evaluation": config.evaluation.model_dump(mode="json", exclude=REPORT_ONLY_EVALUATION_KEYS),
             "adapter": config.adapter.model_dump(mode="json"), "models": list(self.models)},
            [config.base.path, *adapter_dirs, *self.models.values(), *([eval_text] if eval_text else [])],
            lambda out: run_evaluate(config, self.device, self.models, self.eval_texts, out)))
        return stages

    def _merge(self, merge_base: str, out: Path) -> dict:
        """Merge into the NF4 round trip of the base, streamed from the base checkpoint, or into the
        original 16-bit weights; the merged dtype defaults to the base's load dtype."""
        config, base = self.config, self.base
        dtype = dtype_of(config.merge.dtype) if config.merge.dtype else base.dtype
        source = base if merge_base == "nf4" else CheckpointReader(config.base.path, config.allow_pickle)
        summary = run_merge(source, base.model_config, config.adapter, dtype, out, config.max_shard_size, self.device,
                            config.allow_pickle)
        if merge_base == "nf4":
            summary["base"] = {**base.describe(), "roundtrip_error": base.roundtrip_errors}
        return summary

    def _output_bytes(self, dtype_name: str | None) -> int:
        """Bytes of the base's tensors written in `dtype_name` (default: the base's load dtype)."""
        size = dtype_of(dtype_name).itemsize if dtype_name else self.base.dtype.itemsize
        return sum(self.base.shape(key).numel() * size for key in self.base.keys())

    def save(self) -> dict:
        """Write report.json, report.md, report.html and the GPTQ model card; return the report."""
        report = write_reports(self.run_dir)
        log.info("report written; stages skipped as complete: %s", ", ".join(self.skipped) or "none")
        return report

    def close(self) -> None:
        self._lock.release()
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()

    def _stage(self, stage: Stage) -> None:
        record_path = self.run_dir / STAGE_RECORDS / f"{stage.name}.json"
        previous = json.loads(record_path.read_text()) if record_path.is_file() else None
        if previous is not None and "summary" not in previous:
            previous = None  # written by an older version of this tool: not a record to trust
        known = {**self._file_records, **(previous["input_files"] if previous else {})}
        input_files: dict[str, dict] = {}
        for path in stage.inputs:
            input_files.update(file_records(path, known))
        self._file_records.update(input_files)
        manifest = {"settings": stage.settings, "versions": self.versions, "inputs": hashes(input_files)}
        reason = self._rerun_reason(stage, previous, manifest)
        if reason is None:
            log.info("stage %s: skipped, complete and unchanged (%s)", stage.name, stage.output)
            self.skipped.append(stage.name)
            return
        log.info("stage %s: start (%s)", stage.name, reason)
        require_free_space(self.run_dir, stage.needed_bytes(), f"the {stage.name} stage")
        record_path.unlink(missing_ok=True)
        tmp = self.run_dir / f".{stage.output.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            with measure() as measured:
                summary = stage.work(tmp)
            publish_dir(tmp, stage.output)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        outputs = file_records(stage.output, relative_to=self.run_dir)
        self._file_records.update({str(self.run_dir / path): entry for path, entry in outputs.items()})
        record = {"stage": stage.name, "finished": time.time(), "measures": measured, "summary": summary,
                  "manifest": manifest, "input_files": input_files, "outputs": outputs}
        write_atomically(record_path, json.dumps(record, indent=1) + "\n")
        log.info("stage %s: done in %.1f s, peak RSS %.0f MB", stage.name, measured["seconds"],
                 measured["peak_rss_mb"])

    def _rerun_reason(self, stage: Stage, previous: dict | None, manifest: dict) -> str | None:
        """Why the stage must run, or None when its recorded result still stands."""
        if stage.kind in self.force:
            return f"--force {stage.kind}"
        if previous is None:
            return "not run before"
        for part, what in (("settings", "settings changed"), ("versions", "library versions changed"),
                           ("inputs", "inputs changed")):
            if previous["manifest"][part] != manifest[part]:
                return what
        recorded = previous["outputs"]
        current = file_records(stage.output, recorded, self.run_dir) if stage.output.is_dir() else {}
        if hashes(current) != hashes(recorded):
            return "outputs missing or modified"
        return None
