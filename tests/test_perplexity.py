"""Windowing and perplexity math on cases with known answers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from eval.perplexity import eval_windows, perplexity, window_nll
from quant.calibration import calibration_windows, check_held_out, load_texts
from quant.errors import InputError


class UniformModel(torch.nn.Module):
    """Zero logits over `vocab` tokens: every next token has probability 1/vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    windows = eval_windows(torch.arange(1000) % 50, seq_len=32)
    assert windows.shape == (31, 32)  # remainder of 8 tokens dropped
    nll = window_nll(UniformModel(50), windows, batch_size=4)
    assert perplexity(nll, tokens_per_window=31) == pytest.approx(50.0)


def test_max_windows_caps_and_short_text_is_refused():
    assert len(eval_windows(torch.arange(1000), seq_len=10, max_windows=7)) == 7
    with pytest.raises(InputError, match="fewer than one window of evaluation.seq_len=64"):
        eval_windows(torch.arange(10), seq_len=64, where="eval.txt")


def test_calibration_windows_are_seeded():
    stream = torch.arange(5000)
    first = calibration_windows(stream, n_samples=8, seq_len=64, seed=3)
    again = calibration_windows(stream, n_samples=8, seq_len=64, seed=3)
    other = calibration_windows(stream, n_samples=8, seq_len=64, seed=4)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other))
    assert first[0]["input_ids"].shape == (1, 64) and first[0]["attention_mask"].sum() == 64
    with pytest.raises(InputError, match="fewer than calibration seq_len"):
        calibration_windows(torch.arange(30), n_samples=8, seq_len=64, seed=0)


def test_held_out_check_ignores_short_shared_lines():
    shared = "This paragraph of more than eight words appears in both files, sadly."
    check_held_out(["For example::\n\nsomething else entirely here"], ["For example::"], "eval.txt")
    with pytest.raises(InputError, match=r"evaluation.text \(eval.txt\) shares 1 passage"):
        check_held_out([f"intro\n\n{shared}"], [f"{shared}\n\nother"], "eval.txt")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".txt"])
def test_local_text_files_of_each_format_are_read(tmp_path, suffix):
    import datasets

    texts = ["first document, one line", "second document\nwith two lines"]
    path = tmp_path / f"data{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(texts) + "\n")
    else:
        table = datasets.Dataset.from_dict({"content": texts})
        table.to_json(path) if suffix == ".jsonl" else table.to_parquet(path)
    field = "text" if suffix == ".txt" else "content"
    assert load_texts(path, text_field=field) == texts


def test_missing_text_field_and_unknown_format_are_refused(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"body": "x"}\n')
    with pytest.raises(InputError, match=r"has no field 'text' \(fields: \['body'\]\); set text_field"):
        load_texts(path)
    with pytest.raises(InputError, match="unsupported text file type"):
        load_texts(tmp_path / "data.csv")
