"""What a config asks for: the run's stages, in order, as a pure function of the config.

Each stage kind has one builder here and one module in pipeline/stages/ with `run(context, out,
**arguments)`. A builder names the stage's output folder, the config it depends on (its settings:
a change re-runs it), the files it reads (a change of their bytes re-runs it) and how much disk it
needs. Adding a kind of stage: write its module, add its kind to STAGE_KINDS and a builder, and
call the builder from `plan`. Builders import their stage module when called: stage modules bring
torch and the model libraries, which a plan (and `qlora-requant --help`) does not need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from qlora_requant.pipeline.config import ConfigError, GptqSection, RunConfig
from qlora_requant.pipeline.context import StageContext
from qlora_requant.pipeline.layout import RunLayout
from qlora_requant.quant.errors import InputError

# The kinds of stage, in the order they run; `--force KIND` re-runs every stage of a kind.
STAGE_KINDS = ("dequantize", "merge", "requantize", "reference", "score")
# Names that stand for several kinds (`--stages evaluate`: the reference and every scoring stage).
KIND_GROUPS = {"evaluate": ("reference", "score")}
# The kinds of stage that belong to one model, its GPTQ and its scoring: `--models` narrows them to some models.
# The others (the merge, the reference) are shared by every model.
MODEL_KINDS = ("requantize", "score")
# Not a stage: `--stages report` writes the report once every stage is complete (a scheduler's last step).
REPORT_STEP = "report"


def stage_kinds(names: list[str]) -> frozenset[str]:
    """The kinds of stage `--stages` names (a group's kinds for a group; REPORT_STEP), checked."""
    known = (*STAGE_KINDS, *KIND_GROUPS, REPORT_STEP)
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        what = f"{unknown[0]!r} is not a stage" if unknown else "no stage given"
        raise InputError(f"--stages: {what}; give one or more of {', '.join(known)}")
    return frozenset(kind for name in names for kind in KIND_GROUPS.get(name, (name,)))


def _no_disk(context: StageContext) -> int:
    return 0


@dataclass(frozen=True)
class Stage:
    """One stage of a run: its name, what it depends on and produces, and the work itself."""

    name: str  # its record's name: merge, merge_original, ...
    kind: str  # one of STAGE_KINDS
    output: Path  # the folder it publishes in the run directory
    settings: dict[str, Any]  # the config it depends on, as JSON
    inputs: tuple[Path, ...]  # files and folders it reads
    work: Callable[[StageContext, Path], dict]  # writes into a temporary folder; returns a summary
    needed_bytes: Callable[[StageContext], int] = field(default=_no_disk, compare=False)
    model: str | None = None  # the model it writes or scores: merged, gptq_w4g128, ... (not the reference's)

    def reads(self, other: Stage) -> bool:
        """Whether this stage reads `other`'s output."""
        return any(path == other.output or path.is_relative_to(other.output) for path in self.inputs)


def plan(config: RunConfig) -> list[Stage]:
    """The stages `config` asks for, in order: the dequantized base if it is to be saved; per merge base, the
    merge and one requantize stage per GPTQ variant; the reference (the model as trained, scored); one scoring
    stage per model to evaluate."""
    layout = RunLayout(config.output_dir)
    stages = [dequantize_stage(config, layout)] if config.base.save_dequantized else []
    models = []
    for merge_base in config.merge.merge_bases():
        suffix = "" if merge_base == config.merge.merge_base else f"_{merge_base}"
        merged = f"merged{suffix}"
        stages.append(merge_stage(config, layout, merge_base, name=f"merge{suffix}", model=merged))
        models.append(merged)
        for variant, settings in config.requantize.variant_settings().items():
            gptq = gptq_model(variant, suffix)
            stage = requantize_stage_name(gptq)
            stages.append(requantize_stage(config, layout, settings, variant, name=stage, merged=merged, model=gptq))
            models.append(gptq)
    stages.append(reference_stage(config, layout))
    stages += [score_stage(config, layout, model) for model in scored_models(config, models)]
    return stages


def job_models(stages: list[Stage]) -> list[str]:
    """The models `--models` can name, in plan order: those with a stage of their own (their GPTQ, their scoring).
    A job array's task i works on the i-th (qlora-requant validate CONFIG --list-models)."""
    own = {stage.model for stage in stages if stage.kind in MODEL_KINDS}
    return list(dict.fromkeys(stage.model for stage in stages if stage.model in own))


def scored_models(config: RunConfig, models: list[str]) -> list[str]:
    """The models the evaluation scores besides the baseline: evaluation.models, in plan order, or all. At least
    one GPTQ model of the chosen merge base must be among them: the report is about the release."""
    chosen = config.evaluation.models
    if chosen is None:
        return models
    unknown = sorted(set(chosen) - set(models))
    if unknown:
        raise ConfigError(f"evaluation.models: {unknown[0]!r} is not a model of this run ({', '.join(models)})")
    releases = [gptq_model(variant) for variant in config.requantize.variant_settings()]
    if not set(chosen) & set(releases):
        raise ConfigError(f"evaluation.models must name a GPTQ model to release: one of {', '.join(releases)}")
    return [name for name in models if name in chosen]


def gptq_model(variant: str, suffix: str = "") -> str:
    """The name (and folder) of a GPTQ model: gptq, gptq_<variant>, gptq_<merge base>, gptq_<variant>_<base>."""
    return f"gptq{'_' + variant if variant else ''}{suffix}"


def requantize_stage_name(model: str) -> str:
    """The requantize stage that writes the GPTQ model `model` (see gptq_model): requantize, requantize_<...>."""
    return f"requantize{model.removeprefix('gptq')}"


def dequantize_stage(config: RunConfig, layout: RunLayout) -> Stage:
    from qlora_requant.pipeline.stages import dequantize

    return Stage(
        name="dequantize",
        kind="dequantize",
        output=layout.dequantized,
        settings=_json(base=config.base, max_shard_size=config.max_shard_size),
        inputs=(config.base.path,),
        work=partial(dequantize.run, max_shard_size=config.max_shard_size),
        needed_bytes=partial(_base_bytes, dtype=None),
    )


def merge_stage(config: RunConfig, layout: RunLayout, merge_base: str, *, name: str, model: str) -> Stage:
    from qlora_requant.pipeline.stages import merge

    arguments = dict(dtype=config.merge.dtype, merge_base=merge_base, max_shard_size=config.max_shard_size)
    return Stage(
        name=name,
        kind="merge",
        output=layout.model_dir(model),
        settings=_json(base=config.base, adapter=config.adapter, **arguments),
        inputs=(config.base.path, *_adapter_folders(config)),
        work=partial(merge.run, **arguments),
        needed_bytes=partial(_base_bytes, dtype=config.merge.dtype),
        model=model,
    )


def requantize_stage(
    config: RunConfig, layout: RunLayout, settings: GptqSection, variant: str, *, name: str, merged: str, model: str
) -> Stage:
    from qlora_requant.pipeline.stages import requantize

    calibration = config.requantize.calibration
    arguments = dict(gptq=settings, calibration=calibration, merged=merged, variant=variant)
    return Stage(
        name=name,
        kind="requantize",
        output=layout.model_dir(model),
        settings=_json(**arguments),
        inputs=(layout.model_dir(merged), *([calibration.path] if calibration.path else [])),
        work=partial(requantize.run, **arguments),
        needed_bytes=partial(_gptq_bytes, merged_dir=layout.model_dir(merged), bits=settings.bits),
        model=model,
    )


def reference_stage(config: RunConfig, layout: RunLayout) -> Stage:
    from qlora_requant.pipeline.stages import reference

    arguments = dict(evaluation=config.evaluation, adapter=config.adapter)
    eval_text = config.evaluation.text.path
    return Stage(
        name="reference",
        kind="reference",
        output=layout.reference,
        settings=_json(base=config.base, **arguments),
        inputs=(
            config.base.path,
            *_adapter_folders(config),
            *([eval_text] if eval_text else []),
            *_task_folders(config),
        ),
        work=partial(reference.run, **arguments),
    )


def score_stage(config: RunConfig, layout: RunLayout, model: str) -> Stage:
    from qlora_requant.pipeline.stages import score

    return Stage(
        name=score_stage_name(model),
        kind="score",
        output=layout.scores(model),
        settings=_json(evaluation=config.evaluation, model=model),
        inputs=(layout.reference, layout.model_dir(model), *_task_folders(config)),
        work=partial(score.run, evaluation=config.evaluation, model=model),
        model=model,
    )


def score_stage_name(model: str) -> str:
    """The stage that scores the run's model `model`: score_merged, score_gptq_w4g128, ..."""
    return f"score_{model}"


def _task_folders(config: RunConfig) -> list[Path]:
    return [task.path for task in config.evaluation.tasks if task.path]


def _adapter_folders(config: RunConfig) -> list[Path]:
    """The adapter folders, and the tokenizer's folder when it is another."""
    folders = [path for _, path in config.adapter.keyed_paths()]
    if config.adapter.tokenizer not in ("auto", "base"):
        folders.append(Path(config.adapter.tokenizer))
    return folders


def _base_bytes(context: StageContext, dtype: str | None) -> int:
    """Bytes of the base's tensors written in `dtype` (default: the base's load dtype)."""
    from qlora_requant.pipeline.checkpoint import dtype_of

    base = context.inputs.base
    size = dtype_of(dtype).itemsize if dtype else base.dtype.itemsize
    return sum(base.shape(key).numel() * size for key in base.keys())


def _gptq_bytes(context: StageContext, merged_dir: Path, bits: int) -> int:
    from qlora_requant.pipeline.stages.requantize import estimate_gptq_bytes

    return estimate_gptq_bytes(merged_dir, bits)


def _json(**values: Any) -> dict[str, Any]:
    """Settings as recorded in a stage's manifest: config sections as JSON, without the keys that
    change no stage output (a section's `not_settings`)."""
    return {
        key: value.model_dump(mode="json", exclude=set(getattr(value, "not_settings", ())))
        if isinstance(value, BaseModel)
        else value
        for key, value in values.items()
    }
