"""Every check of a run's inputs that needs no compute, before the run directory is touched.

`qlora-requant validate` runs exactly this. It reads config.json and the shard headers of the base,
the tokenizer, and the calibration and evaluation texts; it writes nothing. What it read is handed
to the stages (`Inputs`), so that nothing is read twice.
"""

from __future__ import annotations

import json
import logging

import torch

from qlora_requant.pipeline.checkpoint import is_bnb_4bit, read_model_config
from qlora_requant.pipeline.config import RunConfig
from qlora_requant.pipeline.context import Inputs
from qlora_requant.pipeline.stages.dequantize import DequantizedBase, check_base
from qlora_requant.quant.calibration import check_held_out, require_tokens
from qlora_requant.quant.errors import InputError

log = logging.getLogger(__name__)


def resolve_device(config: RunConfig) -> str:
    """cpu or cuda: `device: auto` takes CUDA when torch sees it."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise InputError("device: cuda, but torch sees no CUDA device; set device: cpu or auto")
    return "cuda" if config.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def preflight(config: RunConfig, device: str) -> Inputs:
    """Check every input of `config`; return what was read. Raises InputError naming the file or key."""
    _refuse_output_inside_inputs(config)
    base_config = read_model_config(config.base.path)
    check_base(config.base, base_config)
    base = DequantizedBase(config.base, device, config.allow_pickle)  # reads the file headers
    _refuse_tokenizer_code(config)
    if "original" in config.merge.merge_bases() and is_bnb_4bit(base_config):
        raise InputError(
            f"merge.merge_base: original needs the original 16-bit weights, but {config.base.path} "
            "is a 4-bit checkpoint; use merge_base: nf4"
        )
    calibration_texts = config.requantize.calibration.load()
    eval_texts = config.evaluation.text.load()
    shared = check_held_out(
        eval_texts,
        calibration_texts,
        config.evaluation.text.describe(),
        refuse=config.evaluation.overlap == "refuse",
    )
    if shared:
        log.warning(
            "evaluation text shares %d passage(s) with the calibration text (evaluation.overlap: warn); "
            "its scores favour the GPTQ model",
            shared,
        )
    _check_text_lengths(config, calibration_texts, eval_texts)
    return Inputs(base=base, calibration_texts=calibration_texts, eval_texts=eval_texts)


def _refuse_output_inside_inputs(config: RunConfig) -> None:
    run_dir = config.output_dir
    for key, path in [("base.path", config.base.path), *config.adapter.keyed_paths()]:
        if run_dir == path or path in run_dir.parents:
            raise InputError(f"output_dir {run_dir} is inside {key} {path}; choose another output_dir")


def _refuse_tokenizer_code(config: RunConfig) -> None:
    """A tokenizer that ships Python code (auto_map) runs only with trust_remote_code: true."""
    path = config.base.path / "tokenizer_config.json"
    if config.trust_remote_code or not path.is_file():
        return
    try:
        custom = "auto_map" in json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); re-save the tokenizer") from None
    if custom:
        raise InputError(
            f"{path}: the tokenizer ships its own Python code (auto_map), which qlora-requant "
            "does not run unless trust_remote_code: true; set it if you trust it"
        )


def _check_text_lengths(config: RunConfig, calibration_texts: list[str], eval_texts: list[str]) -> None:
    """Refuse calibration or eval text too short for one window, before any stage runs."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.base.path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError):
        raise InputError(
            f"{config.base.path}: has no tokenizer files; save the tokenizer used in "
            "training beside the base (tokenizer.json / tokenizer_config.json)"
        ) from None
    calibration, evaluation = config.requantize.calibration, config.evaluation
    require_tokens(
        tokenizer,
        calibration_texts,
        calibration.seq_len + 1,
        f"{calibration.describe()} (requantize.calibration.seq_len={calibration.seq_len})",
    )
    require_tokens(
        tokenizer,
        eval_texts,
        evaluation.seq_len,
        f"{evaluation.text.describe()} (evaluation.seq_len={evaluation.seq_len})",
    )
    if evaluation.bos and tokenizer.bos_token_id is None:
        raise InputError(
            f"evaluation.bos is true but the tokenizer of {config.base.path} has no BOS token; "
            "set evaluation.bos: false"
        )
