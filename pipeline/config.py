"""The run configuration: YAML validated into typed models.

Every section is a strict pydantic model: an unknown key, a wrong type or a missing input path
is a `ConfigError` naming the dotted key. Relative paths resolve against the config file's folder.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from qlora_requant.quant.errors import InputError

if TYPE_CHECKING:
    from qlora_requant.quant.calibration import Corpus

# bitsandbytes' Params4bit default, which BitsAndBytesConfig offers no way to change.
TRANSFORMERS_BNB_BLOCKSIZE = 64
DEFAULT_MAX_SHARD_BYTES = 10**9  # of the checkpoints this tool writes (max_shard_size)
DTypeName = Literal["float16", "bfloat16", "float32"]


class ConfigError(InputError):
    """A config that cannot run: the message names the file and the key."""


def _resolve(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("config_dir", Path.cwd())
    try:
        return (base / path.expanduser()).resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop: RuntimeError before Python 3.13, OSError after
        raise ValueError(
            f"{base / path} cannot be resolved ({exc}); fix the symbolic link or give another path"
        ) from None


def _existing(path: Path, info: ValidationInfo) -> Path:
    path = _resolve(path, info)
    try:
        path.stat()
    except FileNotFoundError:
        raise ValueError(f"path does not exist: {path}") from None
    except OSError as exc:
        raise ValueError(f"{path} cannot be read ({exc.strerror}); fix the path or its permissions") from None
    return path


InputPath = Annotated[Path, AfterValidator(_existing)]
OutputPath = Annotated[Path, AfterValidator(_resolve)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BnbSection(Section):
    """The bitsandbytes settings the base was loaded with during QLoRA training."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: DTypeName = "bfloat16"
    quant_storage: Literal["uint8", "float16", "bfloat16", "float32"] = "uint8"
    skip_modules: list[str] = Field(default_factory=list)

    @field_validator("blocksize")
    @classmethod
    def _transformers_blocksize(cls, value: int) -> int:
        if value != TRANSFORMERS_BNB_BLOCKSIZE:
            raise ValueError(
                f"transformers always loads 4-bit weights with bitsandbytes' blocksize "
                f"{TRANSFORMERS_BNB_BLOCKSIZE}, so the adapter was trained against that; set "
                f"{TRANSFORMERS_BNB_BLOCKSIZE}"
            )
        return value


class BaseSection(Section):
    # Keys no stage output depends on: changing them re-runs nothing.
    not_settings: ClassVar[frozenset[str]] = frozenset({"model_id", "save_dequantized"})

    path: InputPath
    model_id: str | None = None  # hub id of the base, the model card's base_model (default: the folder name)
    dtype: DTypeName | Literal["auto"] = "auto"
    bnb: BnbSection = Field(default_factory=BnbSection)
    # Also write the base as the adapter saw it to RUN_DIR/dequantized (the merge streams it either way).
    save_dequantized: bool = False


class WeightedAdapter(Section):
    path: InputPath
    weight: float = 1.0


class AdapterSection(Section):
    """One adapter (`path`), or several combined as PEFT's add_weighted_adapter does."""

    not_settings: ClassVar[frozenset[str]] = frozenset({"model_id"})

    path: InputPath | None = None
    model_id: str | None = None  # how the model card and reports name the adapter (default: its folder's name)
    combination: Literal["linear", "cat"] | None = None
    adapters: list[WeightedAdapter] = Field(default_factory=list)
    # The fine-tune's tokenizer: auto (the adapter folder's when it holds one, else the base's), base, or
    # a folder. Used for calibration, evaluation and prompts, and written into merged/ and gptq/.
    tokenizer: str = "auto"

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_folder(cls, value: str, info: ValidationInfo) -> str:
        return value if value in ("auto", "base") else str(_existing(Path(value), info))

    @model_validator(mode="after")
    def _one_form(self) -> AdapterSection:
        if self.path is not None and (self.adapters or self.combination):
            raise ValueError("set either 'path' (one adapter) or 'combination' with 'adapters', not both")
        if self.path is None and (len(self.adapters) < 2 or self.combination is None):
            raise ValueError("set 'path', or 'combination' (linear | cat) with two or more 'adapters'")
        return self

    def weighted(self) -> list[tuple[Path, float]]:
        """(path, weight) of every adapter; one adapter has weight 1."""
        if self.path is not None:
            return [(self.path, 1.0)]
        return [(a.path, a.weight) for a in self.adapters]

    def keyed_paths(self) -> list[tuple[str, Path]]:
        """(config key, path) of every adapter directory."""
        if self.path is not None:
            return [("adapter.path", self.path)]
        return [(f"adapter.adapters.{i}.path", a.path) for i, a in enumerate(self.adapters)]

    def describe(self) -> str:
        """How error messages name the adapter(s)."""
        if self.path is not None:
            return str(self.path)
        return f"{self.combination} combination of " + ", ".join(str(a.path) for a in self.adapters)

    def public_names(self) -> list[str]:
        """How published files name the adapter(s): model_id, else each folder's name."""
        if self.model_id:
            return [self.model_id]
        return [path.name for path, _ in self.weighted()]


class MergeSection(Section):
    dtype: DTypeName | None = None
    # nf4: merge into the dequantized NF4 weights, the ones the adapter was trained against.
    # original: merge into the base's original 16-bit weights.
    merge_base: Literal["nf4", "original"] = "nf4"
    # Also merge into the other base and re-quantize it, and score both side by side.
    compare_merge_bases: bool = False

    def merge_bases(self) -> list[str]:
        """The merge bases to build, the chosen one first."""
        other = "original" if self.merge_base == "nf4" else "nf4"
        return [self.merge_base, other] if self.compare_merge_bases else [self.merge_base]


class TextSource(Section):
    """Data from a local file (text / jsonl / json / parquet) or, online, a hub dataset: plain text (`format:
    text`, the `text_field` of each record), or conversations (`format: chat`, the `messages_field` of each
    record: [{role, content}, ...], rendered with the fine-tune's chat template, one sample per record)."""

    path: InputPath | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    format: Literal["text", "chat"] = "text"
    text_field: str = "text"
    messages_field: str = "messages"

    def describe(self) -> str:
        """The file or dataset, as messages name it."""
        return str(self.path or self.dataset)

    def public_name(self) -> str:
        """The file's name or the dataset's id, as published files name it."""
        return self.path.name if self.path else str(self.dataset)

    def load(self) -> Corpus:
        """The texts or conversations of this source."""
        from qlora_requant.quant.calibration import load_corpus

        return load_corpus(
            self.path,
            self.format,
            self.text_field,
            self.messages_field,
            self.dataset,
            self.dataset_config,
            self.split,
        )

    @model_validator(mode="after")
    def _one_source(self) -> TextSource:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("set exactly one of 'path' (a local file) or 'dataset' (a hub dataset id)")
        if self.format == "chat" and self.path is not None and self.path.suffix.lower() in (".txt", ".text"):
            raise ValueError(
                f"format: chat needs records with a {self.messages_field!r} field; {self.path.name} is plain text "
                "(give a .jsonl, .json or .parquet file)"
            )
        return self


class CalibrationSection(TextSource):
    n_samples: int = Field(128, gt=0)
    seq_len: int = Field(512, gt=1)
    seed: int = Field(0, ge=0)


class GptqSection(Section):
    """GPTQ settings, each kept within what a standard GPTQ checkpoint can hold (gptqmodel's QuantizeConfig)."""

    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(128, ge=-1)
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = Field(0.01, gt=0, lt=1)
    batch_size: int = Field(8, gt=0)
    # Algorithm options that change the numbers, not the format: GPTAQ (gptqmodel's GPTAQConfig, alpha 0.25),
    # the scale grid search minimizing |error|^mse (0: off; 2.0: squared error), activation-group-aware
    # ordering (null: gptqmodel's default, on where it applies) and groups fixed before quantization.
    gptaq: bool = False
    mse: float = Field(0.0, ge=0)
    act_group_aware: bool | None = None
    static_groups: bool = False
    # Hadamard / random rotation: transformers and vLLM ignore it and compute wrong logits; refused.
    rotation: None = None
    # The dtype of the checkpoint's unquantized tensors (embeddings, norms, head) and of its config.json (runtimes
    # pick kernels by it): auto, the merged model's. GPTQ itself runs in a dtype that is exact and fast (gptq_dtypes).
    dtype: DTypeName | Literal["auto"] = "auto"

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be -1 (one group per output channel) or a positive size such as 128")
        return value

    @field_validator("rotation", mode="before")
    @classmethod
    def _no_rotation(cls, value: Any) -> None:
        if value is not None:
            raise ValueError(
                f"rotation {value!r} is not supported: only gptqmodel's own loader applies the rotation at inference; "
                "transformers, vLLM and TGI load the checkpoint as plain GPTQ and compute wrong logits"
            )
        return None

    @model_validator(mode="after")
    def _act_group_aware_needs_groups(self) -> GptqSection:
        if self.act_group_aware and (self.desc_act or self.group_size == -1):
            raise ValueError("act_group_aware needs desc_act: false and a group_size > 0")
        return self


# A variant overrides any GPTQ setting; the others come from the requantize section.
VariantSection = create_model(
    "VariantSection",
    __base__=Section,
    name=(str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")),
    **{key: (field.annotation | None, None) for key, field in GptqSection.model_fields.items()},
)
RESERVED_VARIANT_NAMES = frozenset({"nf4", "original"})  # gptq_<merge base> names the other merge base's GPTQ


class RequantizeSection(GptqSection):
    calibration: CalibrationSection
    # Several GPTQ checkpoints of the same merge, each a partial override of the settings above, written to
    # gptq_<name>/ and scored on the same windows; the report picks the smallest that passes every gate.
    variants: list[VariantSection] = Field(default_factory=list)

    @model_validator(mode="after")
    def _variants_valid(self) -> RequantizeSection:
        names = [variant.name for variant in self.variants]
        for index, name in enumerate(names):
            if name in RESERVED_VARIANT_NAMES or name in names[:index]:
                why = "reserved for the other merge base's GPTQ folder" if name in RESERVED_VARIANT_NAMES else "taken"
                raise ValueError(f"variants.{index}.name {name!r} is {why}; give each variant its own name")
        self.variant_settings()  # each variant's settings validate as a whole
        return self

    def gptq_settings(self) -> GptqSection:
        return GptqSection.model_validate(self.model_dump(include=set(GptqSection.model_fields)))

    def variant_settings(self) -> dict[str, GptqSection]:
        """The GPTQ settings of each variant by name; without variants, {"": these settings}."""
        if not self.variants:
            return {"": self.gptq_settings()}
        base = self.gptq_settings().model_dump()
        settings = {}
        for index, variant in enumerate(self.variants):
            overrides = variant.model_dump(exclude={"name"}, exclude_none=True)
            try:
                settings[variant.name] = GptqSection.model_validate({**base, **overrides})
            except ValidationError as exc:
                raise ValueError(f"variants.{index} ({variant.name}): {_describe(exc).strip()}") from None
        return settings


class TaskSection(Section):
    """An lm-evaluation-harness task: one registered by `name` (its data comes from the hub: online only), or a
    local task folder (`path`: one YAML task config and its data files; works offline)."""

    name: str | None = None
    path: InputPath | None = None
    limit: int | None = Field(None, gt=0)  # samples scored (the task's first ones); null: all
    num_fewshot: int | None = Field(None, ge=0)
    chat_template: bool = False  # render each prompt with the fine-tune's chat template

    @model_validator(mode="after")
    def _one_task(self) -> TaskSection:
        if (self.name is None) == (self.path is None):
            raise ValueError("set exactly one of 'name' (a registered lm-eval task) or 'path' (a local task folder)")
        if self.path is not None:
            self.config()
        return self

    def config(self) -> dict | str:
        """What lm-eval is given: the task's name, or the local folder's task config with its data files'
        paths made absolute (lm-eval would resolve them against the working directory)."""
        if self.path is None:
            return self.name
        configs = sorted(self.path.glob("*.yaml")) if self.path.is_dir() else []
        if len(configs) != 1:
            raise ValueError(
                f"{self.path}: a local task folder holds exactly one .yaml task config, found {len(configs)}"
            )
        try:
            config = yaml.load(configs[0].read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
        except yaml.YAMLError as exc:
            raise ValueError(
                f"{configs[0]}: not plain YAML ({str(exc).splitlines()[0]}); task configs with !function (Python "
                "code) are not run"
            ) from None
        if not isinstance(config, dict) or not isinstance(config.get("task"), str):
            raise ValueError(f"{configs[0]}: has no 'task' name")
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        if files is not None:

            def absolute(value):
                return [absolute(v) for v in value] if isinstance(value, list) else str(self.path / value)

            resolved = {k: absolute(v) for k, v in files.items()} if isinstance(files, dict) else absolute(files)
            config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": resolved}
        return config

    def task_name(self) -> str:
        config = self.config()
        return config if isinstance(config, str) else config["task"]


class ChatMessage(Section):
    role: str
    content: str


class EvaluationSection(Section):
    # Used by the checks, the plan or the report only: changing them re-scores nothing (`models` chooses which
    # scoring stages there are).
    not_settings: ClassVar[frozenset[str]] = frozenset({"bootstrap_samples", "seed", "overlap", "models"})

    text: TextSource
    seq_len: int = Field(512, gt=1)
    # null: non-overlapping windows (GPTQ paper); a number: sliding windows every `stride` tokens,
    # scoring only the new tokens of each (Hugging Face perplexity guide).
    stride: int | None = Field(None, gt=0)
    bos: bool = False  # prepend the tokenizer's BOS token to every window
    # Evaluation text sharing passages with the calibration text: refuse the run, or warn and go on.
    overlap: Literal["refuse", "warn"] = "refuse"
    max_windows: int | None = Field(None, gt=0)
    batch_size: int = Field(4, gt=0)
    # Compute dtype of the 16-bit and GPTQ models: "auto" is float32 on CPU (16-bit matmuls are
    # slow there) and the checkpoint's dtype on GPU. The baseline computes as in training.
    dtype: DTypeName | Literal["auto"] = "auto"
    bootstrap_samples: int = Field(1000, ge=100)  # paired bootstrap over windows for the PPL-change interval
    seed: int = Field(0, ge=0)  # of the bootstrap
    # Greedy continuations shown side by side: texts, or conversations rendered with the chat template.
    prompts: list[str | list[ChatMessage]] = Field(default_factory=list)
    max_new_tokens: int = Field(32, gt=0)
    # With chat data: score every token of each conversation, or only the assistant turns' (as SFT trains).
    score: Literal["all", "assistant"] = "all"
    # Which models to score besides the baseline and base_nf4 (default: every merged and GPTQ model).
    models: list[str] | None = None
    # Where each model is placed: on the run's device (single), or spread by accelerate (auto) over the GPUs,
    # the CPU and, past max_memory, the disk (an offload folder inside the run directory).
    device_map: Literal["single", "auto"] = "single"
    max_memory: dict[str | int, str | int] | None = None  # accelerate's format: {0: 70GiB, 1: 70GiB, cpu: 200GiB}
    # lm-evaluation-harness tasks scored for the baseline, the merged and every GPTQ model, on the same samples.
    tasks: list[TaskSection] = Field(default_factory=list)

    @model_validator(mode="after")
    def _placement(self) -> EvaluationSection:
        if self.max_memory is not None and self.device_map != "auto":
            raise ValueError("max_memory applies to device_map: auto; set device_map: auto or remove max_memory")
        for key, size in (self.max_memory or {}).items():
            if not (key == "cpu" or str(key).isdigit()):
                raise ValueError(f"max_memory key {key!r} is not a GPU index or 'cpu'")
            if isinstance(size, str):
                parse_size(size)
        return self

    def accelerate_max_memory(self) -> dict[str | int, int] | None:
        """max_memory as accelerate takes it: GPU indices as ints, sizes in bytes."""
        if self.max_memory is None:
            return None
        return {key if key == "cpu" else int(key): parse_size(size) for key, size in self.max_memory.items()}

    @model_validator(mode="after")
    def _chat_scoring(self) -> EvaluationSection:
        if self.text.format == "chat" and (self.stride is not None or self.bos):
            raise ValueError("chat data is scored one conversation per window: stride and bos do not apply")
        if self.score == "assistant" and self.text.format != "chat":
            raise ValueError("score: assistant needs chat data (text.format: chat)")
        return self

    @model_validator(mode="after")
    def _stride_below_window(self) -> EvaluationSection:
        if self.stride is not None and self.stride > self.seq_len - 1 - self.bos:
            raise ValueError(
                f"stride {self.stride} must be at most seq_len - 1{' - 1 (BOS)' if self.bos else ''}; "
                "use stride: null for non-overlapping windows"
            )
        return self


class GateSection(Section):
    """Release gates on the GPTQ model against the baseline; every gate set must pass."""

    # PPL increase in percent, judged on the upper bound of its 95% bootstrap interval.
    max_ppl_increase_pct: float | None = Field(None, ge=0)
    max_kl: float | None = Field(None, ge=0)  # mean token KL(baseline || GPTQ), nats
    min_top1_agreement: float | None = Field(None, ge=0, le=1)  # share of tokens with the same top-1 prediction
    # Task score drop against the baseline in points (percentage points of accuracy), judged on the lower bound of
    # the paired 95% interval: one limit for every task, or {task name: limit}.
    max_task_drop: float | dict[str, float] | None = None

    @field_validator("max_task_drop")
    @classmethod
    def _non_negative(cls, value):
        limits = value.values() if isinstance(value, dict) else [] if value is None else [value]
        if any(limit < 0 for limit in limits):
            raise ValueError("drops are given as positive points, e.g. 2.0")
        return value


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(value: int | str) -> int:
    """A size as an int of bytes, or a string such as '500MB' or '2GiB'."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        if not match or match.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"{value!r} is not a size; write bytes or e.g. '500MB', '5GB', '2GiB'")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size <= 0:
        raise ValueError("must be a positive size")
    return size


ByteSize = Annotated[int | str, AfterValidator(parse_size)]


class ReleaseSection(Section):
    """How the GPTQ checkpoints are published: what their model cards (README.md) say. Changes no stage's output."""

    # The Hub repository each GPTQ checkpoint is published to, for the card's loading example; {variant} stands for
    # the GPTQ model's name (gptq_w4g128, ...). Unset: the card says to replace a placeholder.
    repo_id: str | None = None
    # The published merged 16-bit model, when there is one: the cards then say they are its quantization. Unset:
    # they say they are a fine-tune of the base (a quantized base they are not).
    merged_model_id: str | None = None
    license: str | None = None  # the cards' license; unset: the base's model card's, else a warning
    datasets: list[str] = Field(default_factory=list)  # the fine-tune's training data, as Hub dataset ids


class RunConfig(Section):
    output_dir: OutputPath
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Read base and adapter weights saved only as PyTorch pickles (.bin), with torch's weights-only
    # unpickler. Off: only safetensors are read.
    allow_pickle: bool = False
    # Run a tokenizer's own Python code shipped with the base (tokenizer_config.json auto_map). Off:
    # such a base is refused. Model code is never run: only built-in architectures are supported.
    trust_remote_code: bool = False
    max_shard_size: ByteSize = DEFAULT_MAX_SHARD_BYTES  # of the dequantized and merged checkpoints
    # How far a re-run trusts recorded file hashes. fast: a file whose size and modification time are as
    # recorded keeps its hash, but every file of the run a stage is about to read is hashed again; full:
    # every file is hashed again on every run.
    verify: Literal["fast", "full"] = "fast"
    base: BaseSection
    adapter: AdapterSection
    merge: MergeSection = Field(default_factory=MergeSection)
    requantize: RequantizeSection
    evaluation: EvaluationSection
    gate: GateSection = Field(default_factory=GateSection)
    release: ReleaseSection = Field(default_factory=ReleaseSection)

    @model_validator(mode="after")
    def _tasks_named_once(self) -> RunConfig:
        names = [task.task_name() for task in self.evaluation.tasks]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"evaluation.tasks: task {twice[0]!r} is listed twice")
        drops = self.gate.max_task_drop
        unknown = sorted(set(drops) - set(names)) if isinstance(drops, dict) else []
        if unknown:
            raise ValueError(f"gate.max_task_drop: {unknown[0]!r} is not a task of evaluation.tasks ({names})")
        return self


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `--set key.path=value` to a raw config tree; the value is parsed as YAML.

    A number in the path indexes a list (`adapter.adapters.1.weight=0.3`).
    """
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    parts = key.split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {assignment!r}: {part!r} is not an index of that list (0 to {len(node) - 1})")
            index: int | str = int(part)
        elif isinstance(node, dict):
            index = part
        else:
            raise ConfigError(f"--set {assignment!r}: {parts[depth - 1]!r} is not a section")
        if depth == len(parts) - 1:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({exc})") from None
            node[index] = _from_working_directory(value, _annotation_at(parts))
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            node = node[index]


# Fields that hold a path although typed as text: a tokenizer folder, unless auto or base.
_TEXT_PATHS = {("AdapterSection", "tokenizer"): ("auto", "base")}


def _annotation_at(keys: list[str]) -> Any:
    """The type a dotted config key holds (a number indexes a list), or None where the key is unknown."""
    annotation: Any = RunConfig
    owner = None
    for key in keys:
        annotation = _unwrapped(annotation)
        if get_origin(annotation) is list and key.isdigit():
            annotation = get_args(annotation)[0]
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and key in annotation.model_fields:
            owner, annotation = annotation, annotation.model_fields[key].annotation
            if (owner.__name__, key) in _TEXT_PATHS:
                return (owner.__name__, key)
        else:
            return None
    return annotation


def _from_working_directory(value: Any, annotation: Any) -> Any:
    """A `--set` value with its relative paths made absolute from the working directory, as on any command line
    (paths in the config file stay relative to the file)."""
    if annotation in _TEXT_PATHS:
        keep = _TEXT_PATHS[annotation]
        return str(Path.cwd() / value) if isinstance(value, str) and value not in keep else value
    annotation = _unwrapped(annotation)
    if annotation is Path:
        return str(Path.cwd() / Path(value).expanduser()) if isinstance(value, str) else value
    if get_origin(annotation) is list and isinstance(value, list):
        return [_from_working_directory(item, get_args(annotation)[0]) for item in value]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
        fields = annotation.model_fields
        return {
            key: _from_working_directory(item, (annotation.__name__, key))
            if (annotation.__name__, key) in _TEXT_PATHS
            else _from_working_directory(item, fields[key].annotation)
            if key in fields
            else item
            for key, item in value.items()
        }
    return value


def _unwrapped(annotation: Any) -> Any:
    """The one type an annotation holds besides None (Annotated and Optional removed)."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) in (Union, UnionType):
            members = [member for member in get_args(annotation) if member is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key written twice in one mapping (yaml.safe_load keeps the last silently).

    Checked as the mapping is composed, before `<<` merge keys are flattened in (the constructor sees merged
    keys beside the mapping's own), so that a key overriding a merged one stays allowed, as YAML defines.
    """

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        lines: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            line, first = key.start_mark.line + 1, lines.get((key.tag, key.value))
            if first is not None:
                raise yaml.YAMLError(
                    f"key {key.value!r} is given twice in one mapping (lines {first} and {line}); keep one of them"
                )
            lines[(key.tag, key.value)] = line
        return node


ConfigSource = str | os.PathLike | Mapping[str, Any] | RunConfig
# `--set` assignments (key.path=value, the value read as YAML), or the same as a mapping of key paths to values
Overrides = Sequence[str] | Mapping[str, Any]


def load_config(source: ConfigSource, overrides: Overrides = ()) -> RunConfig:
    """A validated RunConfig, with `overrides` applied, from:

    - a YAML file's path: its relative paths are relative to its folder;
    - a mapping of the same sections: relative paths are relative to the working directory;
    - a RunConfig (returned as is without overrides).
    """
    if isinstance(source, RunConfig):
        if not overrides:
            return source
        tree, where, folder = source.model_dump(mode="json", exclude_unset=True), "the RunConfig", Path.cwd()
    elif isinstance(source, Mapping):
        tree, where, folder = copy.deepcopy(dict(source)), "the config mapping", Path.cwd()
    else:
        path = Path(source)
        tree, where, folder = _read_yaml(path), str(path), path.resolve().parent
    for assignment in assignments(overrides):
        apply_override(tree, assignment)
    try:
        return RunConfig.model_validate(tree, context={"config_dir": folder})
    except ValidationError as exc:
        raise ConfigError(f"{where}: invalid config\n{_describe(exc)}") from None


def assignments(overrides: Overrides) -> list[str]:
    """Overrides as `--set` assignments: a mapping's values are written as JSON, which YAML reads back unchanged."""
    if isinstance(overrides, str):
        return [overrides]
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value, default=str)}" for key, value in overrides.items()]
    return list(overrides)


def _read_yaml(path: Path) -> dict[str, Any]:
    """A config file's tree of sections."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the config as UTF-8"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return tree
