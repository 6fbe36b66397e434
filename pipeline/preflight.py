"""Every check of a run's inputs that needs no compute, before the run directory is touched.

`qlora-requant validate` runs exactly this. It reads config.json and the shard headers of the base,
the tokenizer, and the calibration and evaluation texts; it writes nothing. What it read is handed
to the stages (`Inputs`), so that nothing is read twice.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from qlora_requant.pipeline.checkpoint import is_bnb_4bit, read_model_config
from qlora_requant.pipeline.config import RunConfig
from qlora_requant.pipeline.context import Inputs
from qlora_requant.pipeline.layout import RunLayout
from qlora_requant.pipeline.run_record import require_run
from qlora_requant.pipeline.safetensors_io import read_header
from qlora_requant.pipeline.stages.dequantize import DequantizedBase, check_base
from qlora_requant.pipeline.stages.merge import (
    load_adapter,
    trained_on_another_base,
    untrained_new_rows,
    vocabulary_rows,
)
from qlora_requant.pipeline.stages.reference import evaluation_windows
from qlora_requant.pipeline.tokenizer import load_tokenizer, tokenizer_folder
from qlora_requant.quant.calibration import Corpus, calibration_samples, check_held_out, require_tokens
from qlora_requant.quant.chat import render_prompt, require_chat_template
from qlora_requant.quant.errors import InputError
from qlora_requant.quant.json_files import read_json_object
from qlora_requant.quant.merge import ADAPTER_WEIGHTS, LoraAdapter

log = logging.getLogger(__name__)


def resolve_device(config: RunConfig) -> str:
    """cpu or cuda: `device: auto` takes CUDA when torch sees it."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise InputError("device: cuda, but torch sees no CUDA device; set device: cpu or auto")
    return "cuda" if config.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def preflight(config: RunConfig, device: str) -> Inputs:
    """Check every input of `config`; return what was read. Raises
    InputError naming the file or key."""
    _refuse_output_inside_inputs(config)
    check_output_dir(config.output_dir)
    base_config = read_model_config(config.base.path)
    check_base(config.base, base_config)
    base = DequantizedBase(config.base, device, config.allow_pickle)  # reads the file headers
    if device == "cpu":
        _refuse_cpu_4bit_shapes(base)
    _check_adapter_headers(config)
    adapter = load_adapter(config.adapter, base, base.model_config, config.allow_pickle)
    warnings = trained_on_another_base(config.adapter, config.base.path, config.base.model_id)
    warnings += _bnb_defaults(config, base) + _no_license(config)
    adapter_dirs = [path for _, path in config.adapter.keyed_paths()]
    for folder in dict.fromkeys([config.base.path, *adapter_dirs]):
        _refuse_tokenizer_code(folder, config.trust_remote_code)
    tokenizer_dir = tokenizer_folder(config.adapter.tokenizer, config.base.path, adapter_dirs, config.trust_remote_code)
    if "original" in config.merge.merge_bases() and is_bnb_4bit(base_config):
        raise InputError(
            f"merge.merge_base: original needs the original 16-bit weights, but {config.base.path} "
            "is a 4-bit checkpoint; use merge_base: nf4"
        )
    if config.evaluation.tasks:
        _require_lm_eval()
    calibration = config.requantize.calibration.load()
    evaluation = config.evaluation.text.load()
    shared = check_held_out(
        evaluation.texts,
        calibration.texts,
        config.evaluation.text.describe(),
        refuse=config.evaluation.overlap == "refuse",
    )
    if shared:
        warnings.append(
            f"evaluation text shares {shared} passage(s) with the calibration text (evaluation.overlap: warn); "
            "its scores favour the GPTQ model"
        )
    for warning in warnings:
        log.warning("%s", warning)
    tokenizer = load_tokenizer(tokenizer_dir, config.trust_remote_code)
    if tokenizer_dir != config.base.path:  # the base's own tokenizer is the base's business
        _check_vocabulary(len(tokenizer), tokenizer_dir, adapter, base)
    lengths = _check_data(config, tokenizer, calibration, evaluation)
    for warning in calibration_warnings(lengths) + _untrained_tokens(adapter, base, tokenizer):
        log.warning("%s", warning)
        warnings.append(warning)
    return Inputs(
        base=base,
        adapter=adapter,
        tokenizer_dir=tokenizer_dir,
        calibration=calibration,
        evaluation=evaluation,
        warnings=warnings,
    )


# gptqmodel 7.6 warns below these (in its loop processor), and drops samples of MIN_CALIBRATION_TOKENS or fewer.
MIN_CALIBRATION_SAMPLES = 256
MIN_CALIBRATION_AVERAGE_TOKENS = 256
MIN_CALIBRATION_TOKENS = 10


def calibration_warnings(lengths: list[int]) -> list[str]:
    """gptqmodel's warnings about the calibration data, said before GPTQ runs (and once, not once per variant)."""
    warnings = []
    if len(lengths) < MIN_CALIBRATION_SAMPLES:
        warnings.append(
            f"GPTQ calibrates on {len(lengths)} samples; gptqmodel recommends at least {MIN_CALIBRATION_SAMPLES} "
            "(requantize.calibration.n_samples, and enough records for them): fewer can raise the GPTQ error"
        )
    average = sum(lengths) / max(len(lengths), 1)
    if average < MIN_CALIBRATION_AVERAGE_TOKENS:
        warnings.append(
            f"the calibration samples average {average:.0f} tokens; gptqmodel recommends at least "
            f"{MIN_CALIBRATION_AVERAGE_TOKENS} (requantize.calibration.seq_len, or longer records)"
        )
    short = sum(length <= MIN_CALIBRATION_TOKENS for length in lengths)
    if short:
        warnings.append(
            f"{short} calibration sample(s) of {MIN_CALIBRATION_TOKENS} tokens or fewer: gptqmodel leaves them out"
        )
    return warnings


def _untrained_tokens(adapter: LoraAdapter, base: DequantizedBase, tokenizer) -> list[str]:
    """A warning naming the tokens a fine-tune added whose embedding or output rows training never changed: a token
    whose output row is untrained is one the model cannot learn to emit (an end-of-turn token it never predicts)."""
    tokens = len(tokenizer)  # rows past it pad the vocabulary (pad_to_multiple_of): no token reads them
    untrained = {
        key: [row for row in rows if row < tokens]
        for key, rows in untrained_new_rows(adapter, base, base.model_config).items()
        if any(row < tokens for row in rows)
    }
    if not untrained:
        return []
    layers = "; ".join(
        f"{key}: {', '.join(tokenizer.convert_ids_to_tokens(rows[:5]))}{', ...' if len(rows) > 5 else ''}"
        for key, rows in untrained.items()
    )
    return [
        f"the fine-tune added tokens whose rows training left as initialised ({layers}): the model cannot learn to "
        "emit a token whose output row is untrained, such as an end-of-turn token; train those rows "
        "(trainable_token_indices on both embedding layers, or embed_tokens and lm_head in modules_to_save)"
    ]


def _no_license(config: RunConfig) -> list[str]:
    """A warning when the GPTQ model cards will carry no license: none set, none in the base's own card."""
    from qlora_requant.eval.model_card import base_card_license

    if config.release.license or base_card_license(config.base.path):
        return []
    return [
        "release.license is not set and the base's model card (README.md) names none: the GPTQ model cards will "
        "carry no license; set release.license (the base's license, or one its terms allow)"
    ]


# The bitsandbytes settings that decide the baseline's weights, as `validate` shows them.
BNB_KEYS = ("quant_type", "blocksize", "double_quant", "compute_dtype", "quant_storage")


def training_settings(config: RunConfig, base: DequantizedBase) -> list[tuple[str, str, str]]:
    """The bitsandbytes settings the baseline loads the base with (training's, as far as the run knows them): per
    key its value and where it came from: the config, this tool's default, or the 4-bit checkpoint itself."""
    stored = is_bnb_4bit(base.model_config)
    rows = []
    for key in BNB_KEYS:
        value = getattr(base.settings, key)
        shown = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else str(value).lower()
        given = key in config.base.bnb.model_fields_set
        source = "the 4-bit checkpoint" if stored else "config" if given else "default"
        rows.append((key, shown, source))
    return rows


def _bnb_defaults(config: RunConfig, base: DequantizedBase) -> list[str]:
    """A warning when every base.bnb key is a default: the baseline is the model as trained only if training
    loaded the base that way, and BitsAndBytesConfig's own defaults are others."""
    if is_bnb_4bit(base.model_config) or config.base.bnb.model_fields_set:
        return []
    return [
        "base.bnb: no key is set, so the baseline loads the base with this tool's defaults (nf4, double_quant true, "
        "compute_dtype bfloat16), which are not BitsAndBytesConfig's (fp4, double quant off, compute float32); the "
        "baseline is the model as trained only if training loaded the base so: set base.bnb as training's "
        "BitsAndBytesConfig had it"
    ]


def check_output_dir(run_dir: Path) -> None:
    """Refuse an output_dir this tool may not write into: a file, an unwritable place, or an existing
    folder that is not a run of this tool (which it would otherwise fill and clean up in), even one with a
    run.json of another tool."""
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"output_dir {run_dir} is a file; give a folder (a new one, or the output_dir of a run)")
    layout = RunLayout(run_dir)
    if layout.run_record.exists():
        require_run(layout)
    elif run_dir.is_dir():
        ours = (layout.locks, layout.log, run_dir / ".lock")  # .lock: the whole-run lock of earlier versions
        foreign = sorted(path.name for path in run_dir.iterdir() if path not in ours)
        if foreign:
            raise InputError(
                f"output_dir {run_dir} is not empty and not a qlora-requant run (no run.json; it holds "
                f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); qlora-requant writes only into "
                "a new or empty folder or a run's own: choose another output_dir"
            )
    existing = next(folder for folder in (run_dir, *run_dir.parents) if folder.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(
            f"output_dir {run_dir}: {existing} cannot be written (a read-only file system, or no permission); "
            "choose a writable output_dir"
        )


def _check_vocabulary(tokens: int, tokenizer_dir: Path, adapter: LoraAdapter, base: DequantizedBase) -> None:
    """A fine-tune that added tokens must have saved their embedding rows: without them no merge (and no
    baseline) can have the vectors the fine-tune learned or drew for them."""
    rows = vocabulary_rows(adapter, base, base.model_config)
    if tokens > rows:
        base_rows = base.model_config.get("vocab_size", rows)
        raise InputError(
            f"{tokenizer_dir}: the fine-tune added {tokens - base_rows} token(s) (its tokenizer has {tokens}, the "
            f"base's vocabulary {base_rows}) but the adapter saved no embedding rows for them; save the adapter "
            "with the resized embeddings (PEFT: modules_to_save or save_embedding_layers=True)"
        )


def _check_adapter_headers(config: RunConfig) -> None:
    """Each adapter's safetensors header, checked as the base's shards are (safetensors' own errors may name no
    tensor)."""
    for _, folder in config.adapter.keyed_paths():
        if (folder / ADAPTER_WEIGHTS).is_file():
            read_header(folder / ADAPTER_WEIGHTS)


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise InputError(
            "evaluation.tasks needs lm-evaluation-harness, which is not installed: pip install 'qlora-requant[tasks]'"
        ) from None


def _refuse_cpu_4bit_shapes(base: DequantizedBase) -> None:
    """bitsandbytes' CPU kernel runs a 4-bit Linear only when its in_features is a multiple of its blocksize;
    the baseline (the base in 4-bit, as trained) could not be scored, after merge and GPTQ had run."""
    blocksize = base.settings.blocksize
    odd = [key for key in base.quantized_weights() if base.in_features(key) % blocksize]
    if odd:
        raise InputError(
            f"{base.model_dir}: bitsandbytes' CPU kernel cannot run 4-bit Linear layers whose in_features is not "
            f"a multiple of {blocksize} ({len(odd)} here, e.g. {odd[0]} with {base.in_features(odd[0])}), so the "
            "baseline cannot be scored on CPU; run with device: cuda (GPU kernels have no such limit)"
        )


def _refuse_output_inside_inputs(config: RunConfig) -> None:
    run_dir = config.output_dir
    for key, path in [("base.path", config.base.path), *config.adapter.keyed_paths()]:
        if run_dir == path or path in run_dir.parents:
            raise InputError(f"output_dir {run_dir} is inside {key} {path}; choose another output_dir")


def _refuse_tokenizer_code(folder: Path, trust_remote_code: bool) -> None:
    """A tokenizer that ships Python code (auto_map) runs only with trust_remote_code: true."""
    path = folder / "tokenizer_config.json"
    if trust_remote_code or not path.is_file():
        return
    if "auto_map" in read_json_object(path):
        raise InputError(
            f"{path}: the tokenizer ships its own Python code (auto_map), which qlora-requant "
            "does not run unless trust_remote_code: true; set it if you trust it"
        )


def _check_data(config: RunConfig, tokenizer, calibration: Corpus, evaluation: Corpus) -> list[int]:
    """Refuse calibration or eval text too short for one window, and chat data the fine-tune's tokenizer cannot
    render (no chat template, a template that fails), before any stage runs. Returns the calibration samples'
    lengths in tokens."""
    settings = config.requantize.calibration
    lengths = [settings.seq_len] * settings.n_samples  # text: windows of seq_len tokens
    # Chat data is rendered here as the stages will render it (tokenizing only), so that a record the template
    # cannot render, or nothing to score, is refused before any stage runs.
    if calibration.chat:
        require_chat_template(tokenizer, calibration.where)
        samples = calibration_samples(tokenizer, calibration, settings.n_samples, settings.seq_len, settings.seed)
        lengths = [sample["input_ids"].shape[-1] for sample in samples]
    else:
        require_tokens(
            tokenizer,
            calibration.texts,
            settings.seq_len + 1,
            f"{calibration.where} (requantize.calibration.seq_len={settings.seq_len})",
        )
    if evaluation.chat:
        require_chat_template(tokenizer, evaluation.where)
        evaluation_windows(config.evaluation, evaluation, tokenizer)
    else:
        require_tokens(
            tokenizer,
            evaluation.texts,
            config.evaluation.seq_len,
            f"{evaluation.where} (evaluation.seq_len={config.evaluation.seq_len})",
        )
    for index, prompt in enumerate(config.evaluation.prompts):
        if isinstance(prompt, list):
            require_chat_template(tokenizer, f"evaluation.prompts.{index}")
            render_prompt(tokenizer, [message.model_dump() for message in prompt], f"evaluation.prompts.{index}")
    if config.evaluation.bos and tokenizer.bos_token_id is None:
        raise InputError(
            f"evaluation.bos is true but the tokenizer ({tokenizer.name_or_path}) has no BOS token; "
            "set evaluation.bos: false"
        )
    return lengths
