"""Stage 4, reference: the model as trained, scored once, and what every other model is compared with.

The model as trained is the NF4 base + the adapter unmerged through PEFT (the baseline); with its adapter
disabled it is also scored as base_nf4, what the fine-tune improved on. Output (evaluation/reference/):
  windows.safetensors   the token windows every model is scored on, and which predictions count
  hidden.npy, output_layer.safetensors, output_layer.json
                        the baseline's final hidden states at the scored tokens and its output layer, which
                        recompute its exact log-probabilities while another model is scored (KL, top-1)
  reference.json        the window protocol and the prompts as rendered for generation
  scores.json           baseline's and base_nf4's per-window scores, the baseline's continuations and tasks
The model work runs in a process of its own (pipeline/isolated.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qlora_requant.eval.models import evaluation_placement, plain_dtype
from qlora_requant.eval.perplexity import HiddenReference, Windows, conversation_windows, eval_windows
from qlora_requant.eval.scoring import ScoringSettings
from qlora_requant.pipeline.checkpoint import is_bnb_4bit
from qlora_requant.pipeline.config import AdapterSection, EvaluationSection
from qlora_requant.pipeline.context import StageContext
from qlora_requant.pipeline.files import require_free_space
from qlora_requant.pipeline.isolated import Reporter, run_isolated
from qlora_requant.pipeline.layout import OFFLOAD, REFERENCE_PROTOCOL, SCORES, WINDOWS
from qlora_requant.pipeline.metrics import model_memory
from qlora_requant.pipeline.stages.merge import vocabulary_rows
from qlora_requant.pipeline.tokenizer import load_tokenizer
from qlora_requant.quant.calibration import Corpus, token_stream
from qlora_requant.quant.chat import marks_generation, render_conversation, render_prompt


def run(context: StageContext, out: Path, *, evaluation: EvaluationSection, adapter: AdapterSection) -> dict:
    """Cut the windows, then score the baseline (recorded as the reference) and base_nf4 on them into `out`."""
    section, base, corpus = evaluation, context.inputs.base, context.inputs.evaluation
    tokenizer = load_tokenizer(context.inputs.tokenizer_dir, context.trust_remote_code)
    windows = evaluation_windows(section, corpus, tokenizer)
    tokens, hidden = int(windows.scored_tokens().sum()), hidden_size(base.model_config)
    require_free_space(
        out,
        tokens * hidden * 4,
        f"the baseline's final hidden states ({tokens} scored tokens x {hidden}, float32; lower "
        "evaluation.max_windows to shrink it)",
    )
    windows.save(out / WINDOWS)
    prompts = [
        p if isinstance(p, str) else render_prompt(tokenizer, [m.model_dump() for m in p]) for p in section.prompts
    ]
    protocol = {
        "kind": "conversations" if corpus.chat else "sliding windows" if section.stride else "non-overlapping windows",
        "seq_len": section.seq_len,
        "stride": section.stride,
        "bos": section.bos,
        "score": section.score,
        "assistant_tokens": assistant_rule(section, corpus, tokenizer),
        "windows": len(windows),
        "tokens": tokens,
        "compute_dtype": str(plain_dtype(section.dtype, context.device)).removeprefix("torch."),
        "text": section.text.public_name(),
        "documents": len(corpus.texts),
    }
    reference = {"protocol": protocol, "prompts": prompts, "max_new_tokens": section.max_new_tokens}
    (out / REFERENCE_PROTOCOL).write_text(json.dumps(reference, indent=1) + "\n")
    prequantized = is_bnb_4bit(base.model_config)  # a 4-bit save loads with its own quantization_config
    spec = {
        "what": "the reference stage",
        "out": out,
        "base_dir": base.model_dir,
        "vocabulary": vocabulary_rows(context.inputs.adapter, base, base.model_config),
        "adapters": adapter.weighted(),
        "combination": adapter.combination,
        "quantization": None if prequantized else base.settings,
        "dtype": "auto" if prequantized else base.dtype,
        "placement": evaluation_placement(section, context.device, out / OFFLOAD),
        "settings": scoring_settings(section, prompts),
        "tokenizer_dir": context.inputs.tokenizer_dir,
        "trust_remote_code": context.trust_remote_code,
    }
    summary = run_isolated(record_reference, spec, context.layout.log)
    return {"windows": len(windows), "tokens": tokens, **summary}


def record_reference(spec: dict, reporter: Reporter) -> dict:
    """In the stage's own process: load the model as trained, score it into the reference, then with its adapter
    disabled; write scores.json."""
    from qlora_requant.eval.models import load_separate_adapter, placed
    from qlora_requant.eval.scoring import joined, score_model

    out, where = spec["out"], spec["placement"]
    windows = Windows.load(out / WINDOWS)
    reporter.say("reference: loading the NF4 base and the adapter (the model as trained)")
    quantization = spec["quantization"].to_transformers() if spec["quantization"] is not None else None
    separate = load_separate_adapter(
        spec["vocabulary"],
        spec["base_dir"],
        spec["adapters"],
        spec["combination"],
        quantization,
        spec["dtype"],
        where,
    )
    memory = model_memory(separate)
    tokenizer = load_tokenizer(spec["tokenizer_dir"], spec["trust_remote_code"])
    reference = HiddenReference(out / HiddenReference.HIDDEN, int(windows.scored_tokens().sum()))
    placement = placed(separate.get_base_model(), where)

    def shown(name: str):
        return lambda done: reporter.progress(f"reference: {name}", done, len(windows), "windows")

    settings = spec["settings"]
    baseline = score_model(
        "baseline", separate, placement, windows, reference, settings, tokenizer, shown("baseline"), record=True
    )
    with separate.disable_adapter():
        base_nf4 = score_model(
            "base_nf4", separate, placement, windows, reference, settings, tokenizer, shown("base_nf4"), outputs=False
        )
    reference.save_output_layer(out)
    shutil.rmtree(out / OFFLOAD, ignore_errors=True)
    (out / SCORES).write_text(json.dumps(joined(baseline, base_nf4), indent=1) + "\n")
    return {"models": ["baseline", "base_nf4"], "process": memory}


def scoring_settings(section: EvaluationSection, prompts: list[str]) -> ScoringSettings:
    return ScoringSettings(section.batch_size, prompts, section.max_new_tokens, section.tasks, section.seed)


def evaluation_windows(section: EvaluationSection, corpus: Corpus, tokenizer) -> Windows:
    """The evaluation windows: cut from the joined text, or one per conversation."""
    if corpus.chat:
        marked = section.score == "assistant"
        samples = [
            render_conversation(tokenizer, c, section.seq_len, marked, f"{corpus.where}: record {number}")
            for number, c in enumerate(corpus.conversations, 1)
        ]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return conversation_windows(samples, section.score, pad or 0, section.max_windows, corpus.where)
    return eval_windows(
        token_stream(tokenizer, corpus.texts),
        section.seq_len,
        section.max_windows,
        section.stride,
        tokenizer.bos_token_id if section.bos else None,
        where=corpus.where,
    )


def assistant_rule(section: EvaluationSection, corpus: Corpus, tokenizer) -> str | None:
    """How the scored assistant tokens were found (see quant/chat.py): the chat template's generation blocks, or the
    assistant turns; None when every token is scored."""
    if not (corpus.chat and section.score == "assistant"):
        return None
    return "generation blocks" if marks_generation(tokenizer) else "assistant turns"


def hidden_size(model_config: dict) -> int:
    """Width of the final hidden states, under the names configs give it."""
    return next(model_config[key] for key in ("hidden_size", "n_embd", "d_model") if key in model_config)
