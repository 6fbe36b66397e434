"""Stage 5, score_<model>: one checkpoint of the run (merged, or a GPTQ variant) scored against the reference.

Reads the reference stage's folder (windows, the baseline's hidden states and output layer, the prompts) and the
model's folder; loads the model as a user would (plain transformers; a GPTQ mixture-of-experts model through
gptqmodel's loader, see eval/models.py), in a process of its own, and writes evaluation/<model>/scores.json:
per window its NLL, KL and top-1 agreement against the baseline, its continuations of the prompts, its tasks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qlora_requant.eval.models import evaluation_placement, plain_dtype
from qlora_requant.pipeline.checkpoint import read_model_config
from qlora_requant.pipeline.config import EvaluationSection
from qlora_requant.pipeline.context import StageContext
from qlora_requant.pipeline.isolated import Reporter, run_isolated
from qlora_requant.pipeline.layout import OFFLOAD, REFERENCE_PROTOCOL, SCORES, WINDOWS
from qlora_requant.pipeline.metrics import model_memory
from qlora_requant.pipeline.model_checks import gptq_loader
from qlora_requant.pipeline.stages.reference import scoring_settings


def run(context: StageContext, out: Path, *, evaluation: EvaluationSection, model: str) -> dict:
    """Score the run's checkpoint `model` on the reference's windows into `out`."""
    layout = context.layout
    model_config = read_model_config(layout.model_dir(model))
    prompts = json.loads((layout.reference / REFERENCE_PROTOCOL).read_text())["prompts"]
    spec = {
        "what": f"the score_{model} stage",
        "out": out,
        "name": model,
        "model_dir": layout.model_dir(model),
        "reference": layout.reference,
        "dtype": plain_dtype(evaluation.dtype, context.device),
        "loader": gptq_loader(model_config) if "quantization_config" in model_config else "transformers",
        "placement": evaluation_placement(evaluation, context.device, out / OFFLOAD),
        "settings": scoring_settings(evaluation, prompts),
        "trust_remote_code": context.trust_remote_code,
    }
    return run_isolated(score_checkpoint, spec, layout.log)


def score_checkpoint(spec: dict, reporter: Reporter) -> dict:
    """In the stage's own process: load the checkpoint, score it, write scores.json."""
    from qlora_requant.eval.models import load_checkpoint, placed
    from qlora_requant.eval.perplexity import HiddenReference, Windows, input_device
    from qlora_requant.eval.scoring import score_model
    from qlora_requant.pipeline.tokenizer import load_tokenizer

    name, out, where = spec["name"], spec["out"], spec["placement"]
    reporter.say(f"score_{name}: loading {spec['model_dir'].name}")
    model = load_checkpoint(spec["model_dir"], where, spec["dtype"], spec["loader"])
    memory = model_memory(model)
    windows = Windows.load(spec["reference"] / WINDOWS)
    reference = HiddenReference.open(spec["reference"], input_device(model))
    tokenizer = load_tokenizer(spec["model_dir"], spec["trust_remote_code"])
    scores = score_model(
        name,
        model,
        placed(model, where),
        windows,
        reference,
        spec["settings"],
        tokenizer,
        on_windows=lambda done: reporter.progress(f"score_{name}", done, len(windows), "windows"),
    )
    shutil.rmtree(out / OFFLOAD, ignore_errors=True)
    (out / SCORES).write_text(json.dumps(scores, indent=1) + "\n")
    entry = scores["models"][name]
    return {"model": name, "loader": spec["loader"], "ppl": entry["ppl"], "process": memory}
