"""What every stage is called with, besides its own settings: one shape for all stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_requant.pipeline.layout import RunLayout

if TYPE_CHECKING:
    from qlora_requant.pipeline.stages.dequantize import DequantizedBase
    from qlora_requant.quant.calibration import Corpus
    from qlora_requant.quant.merge import LoraAdapter


@dataclass(frozen=True)
class Inputs:
    """What the preflight checks read and the stages reuse: nothing is read twice."""

    base: DequantizedBase  # the base as the adapter saw it in training, served tensor by tensor
    adapter: LoraAdapter  # the adapter(s) as PEFT loads them onto the base, checked against its headers
    tokenizer_dir: Path  # the folder holding the fine-tune's tokenizer (adapter.tokenizer)
    calibration: Corpus = field(repr=False)  # calibration texts or conversations
    evaluation: Corpus = field(repr=False)  # evaluation texts or conversations
    warnings: list[str] = field(default_factory=list)  # what a person should look at; also in the report


@dataclass(frozen=True)
class StageContext:
    """A stage's surroundings: where it runs, the run directory, the checked inputs, the safety flags.

    A stage is `run(context, out, **settings)`: it writes into `out` (a temporary folder that is
    renamed into place when the stage completes) and returns a summary for the report.
    """

    device: str  # cpu | cuda
    layout: RunLayout
    inputs: Inputs
    allow_pickle: bool = False  # read .bin checkpoints and adapters with torch's weights-only unpickler
    trust_remote_code: bool = False  # run a tokenizer's own Python code
