"""One pipeline run, read top to bottom: setup, the four model stages, then the report.

Each stage writes into a temporary folder in the run directory and is renamed into place only
when complete, so a reader never sees a half-written checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch

from eval.report import REPORT_FILES, write_atomically
from pipeline.checkpoint import CheckpointReader, dtype_of, is_bnb_4bit, read_model_config
from pipeline.config import RunConfig
from pipeline.metrics import measure
from pipeline.stages.dequantize import DequantizedBase, check_base, run_dequantize
from pipeline.stages.evaluate import run_evaluate
from pipeline.stages.merge import run_merge
from pipeline.stages.report import RUN_RECORD, STAGE_RECORDS, write_reports
from pipeline.stages.requantize import run_requantize
from quant.calibration import check_held_out, require_tokens
from quant.errors import InputError

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "gptqmodel", "safetensors", "datasets")
LOG_FILE = "run.log"


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a completed stage folder into place, replacing an older one."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


class Pipeline:
    """dequantize -> merge -> requantize -> evaluate -> report, for one RunConfig."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.run_dir = config.output_dir
        self.device = "cpu"
        self.calibration_texts: list[str] = []
        self.eval_texts: list[str] = []
        self.models: dict[str, Path] = {}  # plain checkpoints to score: merged, gptq (and other merge base)
        self._log_handler: logging.Handler | None = None

    def check(self) -> None:
        """Every check of the inputs that needs reading them, writing nothing (what `validate` runs)."""
        config = self.config
        for key, path in [("base.path", config.base.path), *config.adapter.keyed_paths()]:
            if self.run_dir == path or path in self.run_dir.parents:
                raise InputError(f"output_dir {self.run_dir} is inside {key} {path}; choose another output_dir")
        base_config = read_model_config(config.base.path)
        check_base(config.base, base_config)
        if "original" in config.merge.merge_bases() and is_bnb_4bit(base_config):
            raise InputError(f"merge.merge_base: original needs the original 16-bit weights, but {config.base.path} "
                             "is a 4-bit checkpoint; use merge_base: nf4")
        if config.device == "cuda" and not torch.cuda.is_available():
            raise InputError("device: cuda, but torch sees no CUDA device; set device: cpu or auto")
        self.device = "cuda" if config.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        self.calibration_texts = config.requantize.calibration.load()
        self.eval_texts = config.evaluation.text.load()
        check_held_out(self.eval_texts, self.calibration_texts, config.evaluation.text.describe())
        self._check_text_lengths()

    def setup(self) -> None:
        """Check the inputs, then create the run directory (dropping a previous run's report)."""
        self.check()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in REPORT_FILES:
            (self.run_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(self.run_dir / STAGE_RECORDS, ignore_errors=True)
        (self.run_dir / STAGE_RECORDS).mkdir()
        run = {"config": self.config.model_dump(mode="json"), "device": self.device,
               "versions": {name: version(name) for name in LIBRARIES}}
        write_atomically(self.run_dir / RUN_RECORD, json.dumps(run, indent=2) + "\n")
        self._log_handler = logging.FileHandler(self.run_dir / LOG_FILE, mode="w")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(self._log_handler)
        log.info("run %s on %s", self.run_dir, self.device)

    def _check_text_lengths(self) -> None:
        """Refuse calibration or eval text too short for one window, before any stage runs."""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.config.base.path)
        except (OSError, ValueError):
            raise InputError(f"{self.config.base.path}: has no tokenizer files; save the tokenizer used in "
                             "training beside the base (tokenizer.json / tokenizer_config.json)") from None
        calibration, evaluation = self.config.requantize.calibration, self.config.evaluation
        require_tokens(tokenizer, self.calibration_texts, calibration.seq_len + 1,
                       f"{calibration.describe()} (requantize.calibration.seq_len={calibration.seq_len})")
        require_tokens(tokenizer, self.eval_texts, evaluation.seq_len,
                       f"{evaluation.text.describe()} (evaluation.seq_len={evaluation.seq_len})")

    def run(self) -> None:
        """Run the model stages in order: merge (dequantizing on the fly) and requantize, once per merge
        base, then evaluate. With base.save_dequantized, the dequantized base is written first."""
        config = self.config
        if config.base.save_dequantized:
            self._stage("dequantize", self.run_dir / "dequantized", lambda out: run_dequantize(
                config.base, out, config.max_shard_size, self.device))
        for merge_base in config.merge.merge_bases():
            suffix = "" if merge_base == config.merge.merge_base else f"_{merge_base}"
            merged, gptq = self.run_dir / f"merged{suffix}", self.run_dir / f"gptq{suffix}"
            self._stage(f"merge{suffix}", merged, lambda out, merge_base=merge_base: self._merge(merge_base, out))
            self._stage(f"requantize{suffix}", gptq, lambda out, merged=merged: run_requantize(
                config.requantize, self.calibration_texts, merged, self.device, out))
            self.models.update({merged.name: merged, gptq.name: gptq})
        self._stage("evaluate", self.run_dir / "evaluation",
                    lambda out: run_evaluate(config, self.device, self.models, self.eval_texts, out))

    def _merge(self, merge_base: str, out: Path) -> dict:
        """Merge into the NF4 round trip of the base, streamed from the base checkpoint, or into the
        original 16-bit weights; the merged dtype defaults to the base's load dtype."""
        config = self.config
        base = DequantizedBase(config.base, self.device)
        dtype = dtype_of(config.merge.dtype) if config.merge.dtype else base.dtype
        source = base if merge_base == "nf4" else CheckpointReader(config.base.path)
        summary = run_merge(source, base.model_config, config.adapter, dtype, out, config.max_shard_size, self.device)
        if merge_base == "nf4":
            summary["base"] = {**base.describe(), "roundtrip_error": base.roundtrip_errors}
        return summary

    def save(self) -> dict:
        """Write report.json, report.md, report.html and the GPTQ model card; return the report."""
        return write_reports(self.run_dir)

    def close(self) -> None:
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()

    def _stage(self, name: str, final: Path, work: Callable[[Path], dict]) -> None:
        tmp = self.run_dir / f".{final.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        log.info("stage %s: start", name)
        try:
            with measure() as record:
                summary = work(tmp)
            _replace_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        stage_record = {"stage": name, "finished": time.time(), **record, **summary}
        write_atomically(self.run_dir / STAGE_RECORDS / f"{name}.json", json.dumps(stage_record, indent=1) + "\n")
        log.info("stage %s: done in %.1f s, peak RSS %.0f MB", name, record["seconds"], record["peak_rss_mb"])
