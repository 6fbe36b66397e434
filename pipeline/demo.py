"""The offline demo fixture: a real QLoRA fine-tune built from text every Python install carries.

Two domains come from the standard library: source lines (the base model's pre-training text)
and docstrings (the fine-tuning domain). The fixture is
  tokenizer/      a byte-level BPE trained with `tokenizers`
  base/           a small LLaMA trained briefly on source lines, saved as 16-bit safetensors
  adapter/        a chat fine-tune: a LoRA adapter trained with PEFT on the NF4-loaded base, on conversations
                  built from docstrings (the user asks what a function does, the assistant answers with its
                  docstring), with the tokenizer it adds two ChatML special tokens and a chat template to
  calibration.jsonl  conversations about other docstrings, for GPTQ calibration ({"messages": [...]} per line)
  eval.jsonl      conversations about held-out docstrings, in neither the adapter's training data nor
                  calibration
  tasks/stdlib_names/  an lm-evaluation-harness task on the held-out docstrings: which of four names does a
                  docstring document (multiple choice, scored by accuracy)
  recipe.json     the settings it was built with (a different recipe rebuilds it)
It is built once into a temporary folder and renamed into place.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

from qlora_requant.pipeline.console import console
from qlora_requant.quant.calibration import passage_fingerprints, token_stream

RECIPE = "recipe.json"
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
VOCAB_SIZE = 1024
SEQ_LEN = 128
BASE_MODEL = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    # Tied embeddings leave the next-token mapping to the decoder layers, so their
    # Linear weights (the ones GPTQ quantizes) carry the model.
    tie_word_embeddings=True,
)
# Trained to loss ~3.0 on source lines: far enough that 4-bit noise in its weights shows in PPL.
BASE_TRAINING = dict(steps=900, batch_size=16, lr=4e-3)
ADAPTER_TRAINING = dict(steps=120, batch_size=8, lr=2e-3, r=16, alpha=32)
# bf16 and fp16 matmuls are ~40x slower than fp32 on CPUs without AVX-512 BF16, so the demo's
# QLoRA run loads the bf16 checkpoint in fp32 (an exact upcast) and computes in fp32.
TRAINING_DTYPE = torch.float32
BNB_SETTINGS = dict(quant_type="nf4", double_quant=True, compute_dtype=TRAINING_DTYPE)
SEED = 1234
# The fine-tune is a chat model: ChatML's turn markers, added as special tokens, and its template.
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _bucket(text: str, buckets: int) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % buckets


def stdlib_corpus() -> tuple[list[str], dict[str, str]]:
    """(source lines, {docstring: the name of the module, class or function it documents}) of the standard
    library's top-level modules, in a stable order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines, docstrings = [], {}
    for path in sorted(stdlib.glob("*.py")):
        source = path.read_text(encoding="utf-8", errors="ignore")
        lines += [line.rstrip() for line in source.splitlines() if len(line.strip()) > 40]
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    docstrings.setdefault(doc, path.stem if isinstance(node, ast.Module) else node.name)
    return lines, docstrings


def split_docstrings(docstrings: list[str]) -> dict[str, list[str]]:
    """Split docstrings by content hash: 70% adapter training, 15% calibration, 15% evaluation.

    Evaluation docstrings that share a passage with the other parts (the standard library repeats
    some paragraphs) are dropped, so the evaluation text is truly held out.
    """
    parts: dict[str, list[str]] = {"adapter": [], "calibration": [], "eval": []}
    for doc in docstrings:
        bucket = _bucket(doc, 20)
        parts["adapter" if bucket < 14 else "calibration" if bucket < 17 else "eval"].append(doc)
    seen = passage_fingerprints(parts["adapter"] + parts["calibration"])
    parts["eval"] = [doc for doc in parts["eval"] if not passage_fingerprints([doc]) & seen]
    return parts


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _train(model, stream: torch.Tensor, steps: int, batch_size: int, lr: float, what: str) -> None:
    """A plain AdamW loop on random windows of `stream`, cosine schedule."""
    generator = torch.Generator().manual_seed(SEED)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - SEQ_LEN, (batch_size,), generator=generator)
        batch = torch.stack([stream[s : s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            console.info("demo fixture: %s step %d/%d loss %.3f", what, step + 1, steps, loss.item())
    model.eval()


def train_base(tokenizer, lines: list[str], out_dir: Path) -> None:
    """Train the small LLaMA base on source lines and save it as bf16 safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **BASE_MODEL,
    )
    model = LlamaForCausalLM(config)
    _train(model, token_stream(tokenizer, lines), what="base", **BASE_TRAINING)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def chat_tokenizer(base_dir: Path):
    """The fine-tune's tokenizer: the base's with ChatML's two special tokens, its chat template, and the end
    of a turn as eos."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def conversations(named_docstrings: dict[str, str]) -> list[list[dict[str, str]]]:
    """Chats about docstrings: the user asks what a function does, the assistant answers with its docstring."""
    return [
        [{"role": "user", "content": f"What does {name} do?"}, {"role": "assistant", "content": doc}]
        for doc, name in named_docstrings.items()
    ]


NAMES_TASK = """task: stdlib_names
dataset_path: json
dataset_kwargs:
  data_files:
    test: stdlib_names.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{docstring}}\\nThe name documented above is"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_names_task(folder: Path, named_docstrings: dict[str, str]) -> None:
    """A local lm-eval task: for each docstring (its first 300 characters), which of four names it documents;
    the three others are drawn, seeded, from the other docstrings' names."""
    folder.mkdir(parents=True)
    rng = random.Random(SEED)
    names = sorted(set(named_docstrings.values()))
    with (folder / "stdlib_names.jsonl").open("w") as file:
        for doc, name in named_docstrings.items():
            choices = [name, *rng.sample([other for other in names if other != name], 3)]
            rng.shuffle(choices)
            record = {"docstring": doc[:300], "choices": choices, "answer": choices.index(name)}
            file.write(json.dumps(record) + "\n")
    (folder / "stdlib_names.yaml").write_text(NAMES_TASK)


def write_chat_data(path: Path, named_docstrings: dict[str, str]) -> None:
    """Conversations as chat data: one {"messages": [...]} record per line."""
    path.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in conversations(named_docstrings)))


def train_adapter(base_dir: Path, named_docstrings: dict[str, str], out_dir: Path) -> None:
    """QLoRA of a chat fine-tune, as TRL's clone_chat_template sets it up: load the base in NF4 with
    bitsandbytes, add the chat tokens (resizing the embeddings), train a LoRA adapter on every Linear and the
    new tokens' rows (trainable_token_indices) with PEFT on conversations, save it with the tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(SEED)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=BNB_SETTINGS["quant_type"],
        bnb_4bit_use_double_quant=BNB_SETTINGS["double_quant"],
        bnb_4bit_compute_dtype=BNB_SETTINGS["compute_dtype"],
    )
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=quantization, dtype=TRAINING_DTYPE, device_map="cpu"
    )
    tokenizer = chat_tokenizer(base_dir)
    model.resize_token_embeddings(len(tokenizer))
    settings = dict(ADAPTER_TRAINING)
    lora = LoraConfig(
        r=settings.pop("r"),
        lora_alpha=settings.pop("alpha"),
        target_modules="all-linear",
        trainable_token_indices=tokenizer.convert_tokens_to_ids(CHAT_TOKENS),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    chats = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in conversations(named_docstrings)]
    _train(model, token_stream(tokenizer, chats), what="adapter", **settings)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def fixture_recipe() -> dict:
    """Everything the fixture is built from; a cached fixture with another recipe is rebuilt."""
    return {
        "vocab_size": VOCAB_SIZE,
        "seq_len": SEQ_LEN,
        "base_model": BASE_MODEL,
        "base_training": BASE_TRAINING,
        "adapter_training": ADAPTER_TRAINING,
        "bnb": {k: str(v) for k, v in BNB_SETTINGS.items()},
        "training_dtype": str(TRAINING_DTYPE),
        "seed": SEED,
        "chat": {"tokens": CHAT_TOKENS, "template": CHAT_TEMPLATE, "new_rows": "trainable_token_indices"},
        "data": "calibration.jsonl, eval.jsonl: chat records; tasks/stdlib_names",
        "python": sys.version.split()[0],
    }


def build_fixture(fixture_dir: Path) -> Path:
    """Build the demo fixture into `fixture_dir` unless the same recipe is already there; return it."""
    recipe_file = fixture_dir / RECIPE
    if recipe_file.is_file() and json.loads(recipe_file.read_text()) == fixture_recipe():
        return fixture_dir
    started = time.perf_counter()
    tmp = fixture_dir.with_name(fixture_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lines, docstrings = stdlib_corpus()
    random.Random(SEED).shuffle(lines)
    parts = split_docstrings(docstrings)
    console.info(
        "demo fixture: building it once (a few minutes on 2 cores) from %d source lines and docstrings %s",
        len(lines),
        {k: len(v) for k, v in parts.items()},
    )
    tokenizer = train_tokenizer(lines + parts["adapter"])
    train_base(tokenizer, lines, tmp / "base")
    train_adapter(tmp / "base", {doc: docstrings[doc] for doc in parts["adapter"]}, tmp / "adapter")
    for part in ("calibration", "eval"):
        write_chat_data(tmp / f"{part}.jsonl", {doc: docstrings[doc] for doc in parts[part]})
    write_names_task(tmp / "tasks" / "stdlib_names", {doc: docstrings[doc] for doc in parts["eval"]})
    (tmp / RECIPE).write_text(json.dumps(fixture_recipe(), indent=2) + "\n")
    shutil.rmtree(fixture_dir, ignore_errors=True)
    tmp.rename(fixture_dir)
    console.info("demo fixture: built in %.0f s at %s", time.perf_counter() - started, fixture_dir)
    return fixture_dir
