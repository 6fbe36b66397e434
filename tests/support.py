"""Test support shared by every test module: tiny real checkpoints, adapters and configs built offline in
code, and the libraries' own results (oracles) that ours are checked against."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from qlora_requant.pipeline.config import DEFAULT_MAX_SHARD_BYTES, BaseSection
from qlora_requant.pipeline.context import Inputs, StageContext
from qlora_requant.pipeline.layout import GPTQ_LOSS_LOG, RunLayout
from qlora_requant.pipeline.stages import dequantize
from qlora_requant.pipeline.stages.dequantize import DequantizedBase, bnb_settings
from qlora_requant.quant.calibration import Corpus

TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
# Largest difference allowed between two fp32 computations of one merged weight.
FP32_ROUNDING = 1e-6


def save_model(model, tokenizer, out_dir: Path, dtype: torch.dtype | None = torch.bfloat16, **save_kwargs) -> Path:
    """Save `model` (cast to `dtype`; None keeps it, as a 4-bit model must) and `tokenizer` into `out_dir`."""
    (model if dtype is None else model.to(dtype)).save_pretrained(out_dir, **save_kwargs)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_llama(tokenizer, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{"vocab_size": len(tokenizer), **TINY_LLAMA, **overrides},
    )
    return LlamaForCausalLM(config)


def save_4bit(base_dir: Path, section, out_dir: Path) -> Path:
    """The base as transformers saves it loaded in 4-bit with `section`'s bnb settings (bfloat16)."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=bnb_settings(section).to_transformers(), dtype=torch.bfloat16, device_map="cpu"
    ).save_pretrained(out_dir)
    return out_dir


def save_pickled(base_dir: Path, out_dir: Path) -> Path:
    """A copy of the base whose weights are a PyTorch pickle (pytorch_model.bin), as older checkpoints are."""
    from safetensors.torch import load_file

    out_dir.mkdir()
    shutil.copy(base_dir / "config.json", out_dir)
    torch.save(load_file(base_dir / "model.safetensors"), out_dir / "pytorch_model.bin")
    return out_dir


def random_adapter(model_dir: Path, out_dir: Path, seed: int = 0, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter with random A and B (init_lora_weights=False), saved as safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    settings = dict(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    settings.update(lora_kwargs)
    peft_model = get_peft_model(model, LoraConfig(**settings))
    peft_model.save_pretrained(out_dir)
    return out_dir


def base_section(base: Path, **settings) -> dict:
    """The config's base section for the tiny fixtures (fp32 throughout: fast on CPU)."""
    return {"path": str(base), "dtype": "float32", "bnb": {"compute_dtype": "float32"}, **settings}


def write_config(
    path: Path, base_dir: Path, adapter_dir: Path, texts: dict[str, Path], output_dir: Path, **sections
) -> Path:
    """A valid YAML run config for the tiny fixtures; `sections` replace whole top-level sections."""
    import yaml

    config = {
        "output_dir": str(output_dir),
        "device": "cpu",
        "base": base_section(base_dir),
        "adapter": {"path": str(adapter_dir)},
        "merge": {"dtype": "float16"},
        "requantize": {
            "bits": 4,
            "group_size": 64,
            "batch_size": 4,
            "calibration": {"path": str(texts["calibration"]), "n_samples": 16, "seq_len": 64},
        },
        "evaluation": {
            "text": {"path": str(texts["eval"])},
            "seq_len": 64,
            "max_windows": 24,
            "prompts": ["The quick", "Return the"],
            "max_new_tokens": 6,
        },
    }
    config.update(sections)
    path.write_text(yaml.safe_dump(config))
    return path


def started_and_skipped(log_text: str) -> tuple[list[str], list[str]]:
    """Stages started and stages skipped, from run.log lines."""
    started = [line.split("stage ")[1].split(":")[0] for line in log_text.splitlines() if ": start (" in line]
    skipped = [line.split("stage ")[1].split(":")[0] for line in log_text.splitlines() if ": skipped," in line]
    return started, skipped


def scores_file(run_dir: Path, model: str) -> Path:
    """The scores.json holding `model`'s scores: the reference's for baseline and base_nf4, else its own stage's."""
    layout = RunLayout(run_dir)
    folder = layout.reference if model in ("baseline", "base_nf4") else layout.scores(model)
    return folder / "scores.json"


def model_scores(run_dir: Path, model: str) -> dict:
    """A model's per-window scores as its scoring stage wrote them."""
    import json

    return json.loads(scores_file(run_dir, model).read_text())["models"][model]


def stage_context(section: BaseSection, run_dir: Path, device: str = "cpu") -> StageContext:
    """What the stages are called with, for a run directory `run_dir` of the base in `section` (no adapter)."""
    return StageContext(
        device=device,
        layout=RunLayout(run_dir),
        inputs=Inputs(
            base=DequantizedBase(section, device),
            adapter=None,
            tokenizer_dir=section.path,
            calibration=Corpus("none", []),
            evaluation=Corpus("none", []),
        ),
    )


def dequantize_to(section: BaseSection, out: Path, max_shard_size: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """The dequantize stage writing the base of `section` into the existing folder `out`."""
    return dequantize.run(stage_context(section, out.parent), out, max_shard_size=max_shard_size)


def library_dequantized(model_dir, section: BaseSection, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """dequantize_4bit of every Linear4bit that transformers builds at load, before any forward pass."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
    from transformers import AutoModelForCausalLM

    quantization = bnb_settings(section).to_transformers()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quantization, dtype=dtype, device_map="cpu"
    )
    return {
        f"{name}.weight": bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }


def peft_merged(model_dir, adapter_dir, weights=None, combination=None) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload on the fp32 model; several adapters go through add_weighted_adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapter_dirs = adapter_dir if isinstance(adapter_dir, list) else [adapter_dir]
    peft_model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name="a0")
    if len(adapter_dirs) > 1:
        names = [f"a{i}" for i in range(len(adapter_dirs))]
        for name, path in zip(names[1:], adapter_dirs[1:]):
            peft_model.load_adapter(path, adapter_name=name)
        peft_model.add_weighted_adapter(names, weights, "combined", combination_type=combination)
        peft_model.set_adapter("combined")
    return peft_model.merge_and_unload().state_dict()


REPORT_SCHEMA = Path(__file__).resolve().parents[1] / "report.schema.json"


def validate_report(report_json_path: Path) -> None:
    """Check a report.json against report.schema.json at the repository root (JSON Schema 2020-12, as pydantic
    writes it); raises jsonschema.ValidationError where it does not match."""
    import json

    import jsonschema

    schema = json.loads(REPORT_SCHEMA.read_text())
    jsonschema.validate(json.loads(Path(report_json_path).read_text()), schema, cls=jsonschema.Draft202012Validator)


# Chat fine-tunes: special tokens added, embeddings resized, the tokenizer saved next to the adapter.
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_LAYOUTS = (
    "modules_to_save",
    "modules_to_save_plain",
    "trainable_tokens",
    "trainable_tokens_dict",
    "trl",
    "embedding_lora",
)


def chat_tokenizer(base_dir: Path):
    """The base's tokenizer with the ChatML special tokens, chat template and `<|im_end|>` as eos."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def resized_base(base_dir: Path, n_tokens: int, pad_to_multiple_of: int | None = None):
    """The fp32 base with its embeddings resized to `n_tokens` the way training does it; the new rows are drawn
    (normal, std initializer_range) under a fixed seed, so every call gives the same rows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model.resize_token_embeddings(n_tokens, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    return model


def chat_lora_config(layout: str, tied: bool, new_tokens: list[int]):
    from peft import LoraConfig

    heads = ["embed_tokens"] if tied else ["embed_tokens", "lm_head"]
    settings = {
        "modules_to_save": dict(target_modules="all-linear", modules_to_save=heads),
        "modules_to_save_plain": dict(target_modules="all-linear", modules_to_save=heads),
        "trainable_tokens": dict(target_modules=["q_proj", "v_proj"], trainable_token_indices=new_tokens),
        "trainable_tokens_dict": dict(
            target_modules="all-linear", trainable_token_indices={"embed_tokens": new_tokens}
        ),
        "trl": dict(
            target_modules="all-linear",
            trainable_token_indices={"embed_tokens": new_tokens},
            modules_to_save=["lm_head"],
        ),
        "embedding_lora": dict(target_modules=["q_proj", "v_proj", *heads]),
    }[layout]
    return LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **settings)


def perturb_trainables(peft_model, seed: int) -> None:
    """Move every trainable tensor off its init: noise on full / per-token embedding rows; the random
    (init_lora_weights=False) embedding LoRA factors scaled down so that B @ A stays near the embeddings' scale."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name or "trainable_tokens_delta" in name:
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
            elif "lora_embedding_" in name:
                param.mul_(0.05)


def chat_finetune(base_dir: Path, layout: str, tied: bool, seed: int = 0, pad_to_multiple_of: int | None = None):
    """(PEFT model in eval mode, tokenizer) of a chat fine-tune of the base in `base_dir`, see chat_adapter."""
    from peft import get_peft_model

    tokenizer = chat_tokenizer(base_dir)
    model = resized_base(base_dir, len(tokenizer), pad_to_multiple_of)
    if model.config.tie_word_embeddings != tied:
        raise ValueError(f"{base_dir} has tie_word_embeddings={model.config.tie_word_embeddings}, asked tied={tied}")
    torch.manual_seed(seed)
    new_tokens = tokenizer.convert_tokens_to_ids(CHAT_TOKENS)
    peft_model = get_peft_model(model, chat_lora_config(layout, tied, new_tokens))
    perturb_trainables(peft_model, seed)
    return peft_model.eval(), tokenizer


def to_plain_layout(adapter_dir: Path) -> None:
    """Rewrite a modules_to_save adapter as older PEFT saved it: only the plain `...embed_tokens.weight` /
    `...lm_head.weight` keys, without PEFT >= 0.14's `.original_module.` / `.modules_to_save.` copies."""
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    copies = (".original_module.", ".modules_to_save.")
    tensors = {k: v for k, v in load_file(path).items() if not any(copy in k for copy in copies)}
    save_file(tensors, path, metadata={"format": "pt"})


def chat_adapter(
    base_dir: Path,
    out_dir: Path,
    layout: str,
    tied: bool,
    seed: int = 0,
    pad_to_multiple_of: int | None = None,
    save_embedding_layers: bool | str = "auto",
) -> Path:
    """A chat fine-tune's adapter folder as the trainers save it: tokenizer with `<|im_start|>`/`<|im_end|>` and a
    ChatML template (tokenizer.json, tokenizer_config.json, chat_template.jinja) next to adapter_config.json and
    adapter_model.safetensors, on the base resized to the new vocabulary. `layout`:
    - "modules_to_save": axolotl / unsloth (lora_modules_to_save) training embed_tokens (+ lm_head when untied) fully;
      PEFT 0.21 writes `X.weight`, `X.modules_to_save.weight` and `X.original_module.weight` for each;
    - "modules_to_save_plain": the same as older PEFT wrote it, only `X.weight`;
    - "trainable_tokens": only the new rows trained (trainable_token_indices as a list), on q_proj and v_proj;
    - "trainable_tokens_dict": the same with the dict form TRL writes, {"embed_tokens": [...]}, on all-linear;
    - "trl": TRL's clone_chat_template setup: the dict form, all-linear, and lm_head in modules_to_save;
    - "embedding_lora": LoRA on embed_tokens (+ lm_head when untied), unsloth's "embed_tokens" target.
    Every trainable tensor is moved off its init, so a merge that drops one is visibly wrong. PEFT saves the
    resized embedding layers unless `save_embedding_layers` is False."""
    peft_model, tokenizer = chat_finetune(base_dir, layout, tied, seed, pad_to_multiple_of)
    peft_model.save_pretrained(out_dir, save_embedding_layers=save_embedding_layers)
    tokenizer.save_pretrained(out_dir)
    if layout == "modules_to_save_plain":
        to_plain_layout(out_dir)
    return out_dir


def peft_chat_model(base_dir: Path, adapter_dir: Path, pad_to_multiple_of: int | None = None):
    """PEFT's own load of a chat adapter: the fp32 base resized as in training, then PeftModel.from_pretrained."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    n_tokens = len(AutoTokenizer.from_pretrained(adapter_dir))
    return PeftModel.from_pretrained(resized_base(base_dir, n_tokens, pad_to_multiple_of), adapter_dir).eval()


def peft_reference_logits(
    base_dir: Path, adapter_dir: Path, input_ids: torch.Tensor, pad_to_multiple_of: int | None = None
) -> torch.Tensor:
    """Logits of the unmerged PEFT model for `input_ids` (the reference a merge must reproduce)."""
    with torch.no_grad():
        return peft_chat_model(base_dir, adapter_dir, pad_to_multiple_of)(input_ids=input_ids).logits


def peft_merged_resized(base_dir: Path, adapter_dir: Path, pad_to_multiple_of: int | None = None):
    """PEFT's merge_and_unload of the same model. Beware: with tie_word_embeddings and LoRA on embed_tokens, PEFT
    merges the embedding delta into the shared matrix, so lm_head changes too and this no longer matches the logits."""
    return peft_chat_model(base_dir, adapter_dir, pad_to_multiple_of).merge_and_unload()


def descendants(pid: int) -> list[int]:
    """Every process started by `pid`, and by those, recursively (Linux)."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            queue += children
    return found


def assert_gone(pids: list[int], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]
        time.sleep(0.1)
    assert not alive, f"still running after the run was killed: {alive}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def failing_work(spec: dict, reporter) -> dict:
    """A stage's work that fails with spec["failure"], in the stage's own process (see pipeline/isolated.py)."""
    raise spec["failure"]


def copy_run(run: tuple[Path, Path], folder: Path) -> tuple[Path, Path]:
    """A copy of a run directory in `folder`, and its config pointing there: (config, run directory)."""
    import yaml

    config, run_dir = run
    copy = folder / "run"
    shutil.copytree(run_dir, copy)
    tree = yaml.safe_load(config.read_text())
    tree["output_dir"] = str(copy)
    (folder / "run.yaml").write_text(yaml.safe_dump(tree))
    return folder / "run.yaml", copy


def same_files(run_dir: Path, other: Path) -> bool:
    """Whether every file the stages of two runs wrote is the same, byte for byte, from their reports' hashes
    (gptqmodel's log of GPTQ losses aside: it also holds the time each module took)."""
    hashes = [
        {
            stage: {path: sha for path, sha in outputs.items() if not path.endswith(f"/{GPTQ_LOSS_LOG}")}
            for stage, outputs in json.loads((run / "report.json").read_text())["output_sha256"].items()
        }
        for run in (run_dir, other)
    ]
    return hashes[0] == hashes[1]
