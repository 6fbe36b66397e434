"""Seeded fuzzing of the inputs a run reads: the base's and the adapter's safetensors headers, the base's
config.json, adapter_config.json and the YAML config, each damaged one way at a time.

Every case runs `qlora-requant run` against a finished run of the same config. The run is stopped where the
first stage would start (the inputs passed every check): what is asserted is that bad input is refused with
exit 2 and one message, never a traceback, and that a refused case leaves the previous run's files as they were.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from qlora_requant.pipeline.cli import EXIT_BAD_INPUT, EXIT_OK, main
from qlora_requant.pipeline.runner import Run

from support import write_config

CASES_PER_INPUT = 80
SEED = 20261202
ODD_VALUES = (None, "x", "", -1, 0, 1, 3, 2**40, 1.5, True, [], {}, [1, "a"], {"k": 1})


class Accepted(Exception):
    """Raised where the first stage would start: the inputs passed every check."""


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory, tiny_base, tiny_adapter, text_files) -> tuple[Path, Path, Path, Path]:
    """A finished merge of copies of the tiny base and adapter: (config, run directory, base, adapter)."""
    folder = tmp_path_factory.mktemp("fuzz")
    base, adapter = folder / "base", folder / "adapter"
    shutil.copytree(tiny_base, base)
    shutil.copytree(tiny_adapter, adapter)
    config = write_config(folder / "run.yaml", base, adapter, text_files, folder / "run")
    assert main(["run", str(config), "--stages", "merge"]) == EXIT_OK
    return config, folder / "run", base, adapter


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def odd(rng: random.Random):
    return rng.choice(ODD_VALUES)


def mutated_header(data: bytes, rng: random.Random) -> bytes:
    """A safetensors file whose header lies in one way (the tensor data kept as it was)."""
    length = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8 : 8 + length]), data[8 + length :]
    name = rng.choice(sorted(key for key in header if key != "__metadata__"))
    entry = header[name]
    begin, end = entry["data_offsets"]
    kind = rng.randrange(9)
    if kind == 0:
        entry["dtype"] = rng.choice(["F16", "BF16", "F32", "F64", "I8", "U8", "BOOL", "F4", 7, None])
    elif kind == 1:
        shape = entry["shape"]
        entry["shape"] = rng.choice(
            [[], [0], [-1, 4], shape[::-1], [*shape, 1], [shape[0] * 2, *shape[1:]], "4", [1.5]]
        )
    elif kind == 2:
        entry["data_offsets"] = rng.choice([[end, begin], [begin, end + 8], [begin], "0", [-8, end], [begin, 2**40]])
    elif kind == 3:
        header[name] = odd(rng)
    elif kind == 4:
        del header[name]
    elif kind == 5:
        header[f"{name}.extra"] = header.pop(name)
    elif kind == 6:
        header = rng.choice([[], [header], "header", 1, None])
    elif kind == 7:
        header = {**header, "__metadata__": rng.choice([[1], "x", {"format": 1}, None])}
    else:
        cut = rng.choice([0, 4, 8 + length // 2, len(data) - 1])
        return data[:cut]
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob + body


def mutated_json(data: bytes, rng: random.Random, keys: dict[str, list]) -> bytes:
    """A JSON object file with one key removed, given an odd or plausible value, or the file broken."""
    tree = json.loads(data)
    kind = rng.randrange(5)
    if kind == 0:
        del tree[rng.choice(sorted(tree))]
    elif kind == 1:
        tree[rng.choice(sorted(tree))] = odd(rng)
    elif kind == 2:
        key = rng.choice(sorted(keys))
        tree[key] = rng.choice(keys[key])
    elif kind == 3:
        tree["unheard_of_key"] = odd(rng)
    else:
        return rng.choice([b"", b"[1, 2]", b"{not json", data[: len(data) // 2], b"\xff\xfe"])
    return json.dumps(tree).encode()


BASE_CONFIG_VALUES = {
    "model_type": ["foo", "", "llama4", "mistral", "gpt2", "bert"],
    "architectures": [["FooForCausalLM"], [], "LlamaForCausalLM", ["BertModel"]],
    "vocab_size": [2048, 1, 0, -5, 100000],
    "hidden_size": [64, 48, 4096, 0, -1],
    "num_attention_heads": [3, 1, 64, 0],
    "num_key_value_heads": [1, 3, 7],
    "num_hidden_layers": [1, 3, 40, 10**9, 0],
    "intermediate_size": [1, 200, 10**6],
    "head_dim": [1, 7, 1024],
    "tie_word_embeddings": [True, False, "yes"],
    "dtype": ["float16", "int8", "float99", None],
    "quantization_config": [{"load_in_4bit": True}, {"quant_method": "gptq"}, "x"],
}
ADAPTER_CONFIG_VALUES = {
    "peft_type": ["IA3", "LOHA", "PROMPT_TUNING", "XX", None],
    "r": ["8", -1, 0, 4, 10**6, 2.5],
    "lora_alpha": ["16", -5, 0, 10**9],
    "target_modules": ["q_proj", ["nonexistent"], "all-linear", "(", 5, [], ["embed_tokens"]],
    "modules_to_save": [["lm_head"], "lm_head", 5, ["nope"], ["embed_tokens"]],
    "use_dora": [True, "yes"],
    "use_rslora": [True, 3],
    "fan_in_fan_out": [True],
    "rank_pattern": [{"q_proj": 4}, {"(": 2}, "x"],
    "alpha_pattern": [{"v_proj": 1000}, [1]],
    "layers_to_transform": [[0], [99], "x", 1],
    "layers_pattern": ["layers", "nope", 5],
    "trainable_token_indices": [[1, 2], {"embed_tokens": [1]}, {"nope": [1]}, [10**6], "x"],
    "target_parameters": [["mlp.experts.gate_up_proj"], ["nope"], "x"],
    "bias": ["all", "lora_only", "x"],
    "base_model_name_or_path": [5, "someone/else", ""],
    "task_type": ["SEQ_CLS", "nope"],
}


def mutated_yaml(text: str, rng: random.Random) -> str:
    """The YAML config with one key removed, given an odd value, an unknown key added, a key given twice, or
    the document broken."""
    tree = yaml.safe_load(text)
    kind = rng.randrange(6)
    if kind == 4:
        line = rng.choice([line for line in text.splitlines() if ":" in line and not line.strip().startswith("-")])
        return text + line + "\n" if not line.startswith(" ") else text.replace(line, f"{line}\n{line}", 1)
    if kind == 5:
        return rng.choice([text + "\n\t- broken", text.replace(":", "", 1), "[" + text, text + "\n...\n---\nx: 1\n"])
    node, path = tree, []
    while isinstance(node, dict) and node and (not path or rng.random() < 0.6):
        key = rng.choice(sorted(node))
        path.append(key)
        if not isinstance(node[key], dict):
            break
        node = node[key]
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if kind == 0:
        del parent[path[-1]]
    elif kind in (1, 2):
        parent[path[-1]] = odd(rng)
    else:
        parent[f"{path[-1]}_typo"] = odd(rng)
    return yaml.safe_dump(tree)


def cases(config: Path, base: Path, adapter: Path) -> list[tuple[str, Path, Callable[[bytes, random.Random], bytes]]]:
    """(what is damaged, the file, how) for each kind of input."""
    return [
        ("base header", base / "model.safetensors", mutated_header),
        ("adapter header", adapter / "adapter_model.safetensors", mutated_header),
        ("config.json", base / "config.json", lambda data, rng: mutated_json(data, rng, BASE_CONFIG_VALUES)),
        (
            "adapter_config.json",
            adapter / "adapter_config.json",
            lambda data, rng: mutated_json(data, rng, ADAPTER_CONFIG_VALUES),
        ),
        ("YAML", config, lambda data, rng: mutated_yaml(data.decode(), rng).encode()),
    ]


def test_damaged_inputs_are_refused_cleanly_and_leave_the_previous_run(previous_run, monkeypatch, capsys):
    config, run_dir, base, adapter = previous_run

    def stop_before_the_stages(run: Run) -> None:
        raise Accepted

    monkeypatch.setattr(Run, "execute", stop_before_the_stages)
    rng = random.Random(SEED)
    outcomes: dict[str, list[int]] = {}
    for what, path, mutate in cases(config, base, adapter):
        original = path.read_bytes()
        for number in range(CASES_PER_INPUT):
            damaged = mutate(original, rng)
            path.write_bytes(damaged)
            before = snapshot(run_dir)
            try:
                code = main(["run", str(config)])
            except Accepted:
                code = EXIT_OK
            except Exception as exc:  # a traceback: the case, to reproduce it
                pytest.fail(f"{what} case {number}: {type(exc).__name__}: {exc}\n{damaged[:600]!r}")
            finally:
                path.write_bytes(original)
            err = capsys.readouterr().err
            assert code in (EXIT_OK, EXIT_BAD_INPUT), f"{what} case {number}: exit {code}\n{err[-800:]}"
            assert "Traceback" not in err, f"{what} case {number}\n{err[-2000:]}"
            if code == EXIT_BAD_INPUT:
                messages = [line for line in err.splitlines() if line.startswith("error: ")]
                assert len(messages) == 1, f"{what} case {number}: one message\n{err[-2000:]}"
                assert snapshot(run_dir) == before, f"{what} case {number} changed the previous run"
            outcomes.setdefault(what, []).append(code)
    for what, codes in outcomes.items():  # the damage is real: many cases of every input are refused
        assert codes.count(EXIT_BAD_INPUT) > len(codes) // 4, (what, codes)
