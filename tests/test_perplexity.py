"""Windowing, perplexity, KL and top-1 agreement, and the bootstrap, on cases with known answers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from qlora_requant.eval.perplexity import (
    FullReference,
    HiddenReference,
    dense_layer,
    eval_windows,
    perplexity,
    plain_linear,
    score_windows,
)
from qlora_requant.eval.statistics import bootstrap_ppl_change
from qlora_requant.quant.calibration import calibration_windows, check_held_out, load_texts, token_stream
from qlora_requant.quant.errors import InputError


class FixedModel(torch.nn.Module):
    """The same next-token logits at every position: a decoder of constant hidden states and a biased head."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.head = torch.nn.Linear(1, len(logits))
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor(logits))
        self.config = SimpleNamespace(vocab_size=len(logits))

    def get_decoder(self):
        return lambda input_ids, use_cache: SimpleNamespace(last_hidden_state=torch.ones(*input_ids.shape, 1))

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, logits_to_keep=0, use_cache=False):
        logits = self.head(torch.ones(*input_ids.shape, 1))
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    windows = eval_windows(torch.arange(1000) % 50, seq_len=32)
    assert windows.input_ids.shape == (31, 32)  # remainder of 8 tokens dropped
    assert windows.scored_tokens().tolist() == [31] * 31
    nll = score_windows(FixedModel([0.0] * 50), windows, batch_size=4)["nll"]
    assert perplexity(nll, windows.scored_tokens()) == pytest.approx(50.0)


def test_sliding_windows_score_each_token_once_after_the_first_window():
    stream = torch.arange(100)
    windows = eval_windows(stream, seq_len=32, stride=8)
    assert torch.equal(windows.input_ids[1], stream[8:40])
    assert windows.scored_tokens().tolist() == [31] + [8] * 8  # starts 0, 8, ..., 64
    scored_targets = [w[1:][windows.mask(slice(i, i + 1))[0]] for i, w in enumerate(windows.input_ids)]
    assert torch.equal(torch.cat(scored_targets), stream[1:96])


def test_bos_is_prepended_and_every_text_token_scored():
    windows = eval_windows(torch.arange(100) + 5, seq_len=10, bos_id=1)
    assert windows.input_ids.shape == (11, 10) and (windows.input_ids[:, 0] == 1).all()
    assert torch.equal(windows.input_ids[0, 1:], torch.arange(9) + 5)
    assert windows.scored_tokens().tolist() == [9] * 11


def test_max_windows_caps_and_short_text_is_refused():
    capped = eval_windows(torch.arange(1000), seq_len=10, max_windows=7)
    assert len(capped) == 7 and torch.equal(capped.input_ids, torch.arange(70).view(7, 10))  # the first 7
    with pytest.raises(InputError, match="fewer than one window of evaluation.seq_len=64"):
        eval_windows(torch.arange(10), seq_len=64, where="eval.txt")


@pytest.mark.parametrize("kind", [FullReference, HiddenReference])
def test_kl_and_top1_agreement_against_the_reference(tmp_path, kind):
    windows = eval_windows(torch.arange(200) % 3, seq_len=20, stride=10)
    reference = kind(tmp_path / "ref.npy", int(windows.scored_tokens().sum()))
    p, q = [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    score_windows(FixedModel(p), windows, 3, reference, record=True)
    same = score_windows(FixedModel(p), windows, 3, reference)
    other = score_windows(FixedModel(q), windows, 3, reference)
    tokens = windows.scored_tokens().tolist()
    assert sum(same["kl"]) == pytest.approx(0, abs=1e-6) and same["top1_agree"] == tokens
    log_p, log_q = torch.log_softmax(torch.tensor(p), 0), torch.log_softmax(torch.tensor(q), 0)
    expected_kl = (log_p.exp() * (log_p - log_q)).sum().item()
    assert sum(other["kl"]) / sum(tokens) == pytest.approx(expected_kl, rel=1e-5)
    assert other["top1_agree"] == [0] * len(tokens)


def normal_interval_width(nll: list[float], reference: list[float], tokens: list[int]) -> float:
    """Width of the 95% normal-theory interval of the PPL change (in percent) when the windows are resampled in
    pairs: 2 x 1.96 standard errors of the mean per-token NLL difference, through d(100 expm1(x)) = 100 exp(x) dx."""
    change = torch.tensor(nll, dtype=torch.float64) - torch.tensor(reference, dtype=torch.float64)
    per_token = change / torch.tensor(tokens, dtype=torch.float64)
    standard_error = per_token.std(correction=0).item() / math.sqrt(len(nll))
    return 2 * 1.96 * 100 * math.exp(per_token.mean().item()) * standard_error


def test_bootstrap_interval_is_paired_and_reproducible():
    rng = torch.Generator().manual_seed(0)
    reference = (torch.rand(200, generator=rng) * 50 + 100).tolist()
    worse = [n * 1.02 for n in reference]  # every window 2% more NLL
    tokens = [50] * 200
    first = bootstrap_ppl_change(worse, reference, tokens, samples=500, seed=7)
    assert first == bootstrap_ppl_change(worse, reference, tokens, samples=500, seed=7)
    assert first != bootstrap_ppl_change(worse, reference, tokens, samples=500, seed=8)
    point = 100 * math.expm1((sum(worse) - sum(reference)) / sum(tokens))
    assert first[0] < point < first[1]
    # Paired, the interval is only as wide as the spread of the per-window change (about +-0.08 points around
    # +5.07%); resampling the two models' windows independently would make it ~70 times wider. 500 resamples
    # estimate the percentiles to within ~20%.
    assert first[1] - first[0] == pytest.approx(normal_interval_width(worse, reference, tokens), rel=0.2)
    noisy = [n + (torch.rand(1, generator=rng).item() - 0.5) * 40 for n in worse]
    low, high = bootstrap_ppl_change(noisy, reference, tokens, samples=500, seed=7)
    assert low < 100 * math.expm1((sum(noisy) - sum(reference)) / sum(tokens)) < high
    # More window-to-window noise, a wider interval: by as much as the spread of the change grew.
    assert high - low == pytest.approx(normal_interval_width(noisy, reference, tokens), rel=0.2)
    assert high - low > 20 * (first[1] - first[0])


def test_calibration_windows_are_seeded():
    stream = torch.arange(5000)
    first = calibration_windows(stream, n_samples=8, seq_len=64, seed=3)
    again = calibration_windows(stream, n_samples=8, seq_len=64, seed=3)
    other = calibration_windows(stream, n_samples=8, seq_len=64, seed=4)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other))
    assert first[0]["input_ids"].shape == (1, 64) and first[0]["attention_mask"].sum() == 64
    for window in first:  # each a contiguous slice of the stream (here its own positions), wholly inside it
        start = window["input_ids"][0, 0].item()
        assert 0 <= start <= 5000 - 64 and torch.equal(window["input_ids"][0], torch.arange(start, start + 64))
    with pytest.raises(InputError, match="fewer than calibration seq_len"):
        calibration_windows(torch.arange(30), n_samples=8, seq_len=64, seed=0)


def test_held_out_check_ignores_short_shared_lines():
    shared = "This paragraph of more than eight words appears in both files, sadly."
    check_held_out(["For example::\n\nsomething else entirely here"], ["For example::"], "eval.txt")
    with pytest.raises(InputError, match=r"evaluation.text \(eval.txt\) shares 1 passage") as refused:
        check_held_out([f"intro\n\n{shared}"], [f"{shared}\n\nother"], "eval.txt")
    assert str(refused.value).endswith(f"the first: {shared!r}")  # quoted, so that it can be found


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


def test_the_compact_reference_gives_the_full_distributions_kl_and_top1(tmp_path, tiny_base, tokenizer, text_files):
    """The baseline kept as its final hidden states and output layer (here with LoRA on lm_head) scores another
    model exactly as its stored full log-probabilities do, at a fraction of the bytes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from support import random_adapter

    adapter = random_adapter(tiny_base, tmp_path / "adapter", target_modules=["q_proj", "lm_head"])
    baseline = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), adapter)
    other = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    texts = load_texts(text_files["eval"])
    windows = eval_windows(token_stream(tokenizer, texts), seq_len=64, max_windows=12, stride=32)
    tokens = int(windows.scored_tokens().sum())
    scores = {}
    for kind in (FullReference, HiddenReference):
        reference = kind(tmp_path / f"{kind.__name__}.npy", tokens)
        recorded = score_windows(baseline.eval(), windows, 5, reference, record=True)
        scores[kind] = score_windows(other.eval(), windows, 5, reference)
    full, hidden = scores[FullReference], scores[HiddenReference]
    assert sum(full["kl"]) > 0.01 and sum(hidden["kl"]) == pytest.approx(sum(full["kl"]), rel=1e-5)
    assert hidden["kl"] == pytest.approx(full["kl"], rel=1e-5) and hidden["top1_agree"] == full["top1_agree"]
    assert hidden["nll"] == full["nll"] and len(recorded["nll"]) == 12
    sizes = {kind: (tmp_path / f"{kind.__name__}.npy").stat().st_size for kind in scores}
    assert sizes[HiddenReference] < sizes[FullReference] * 128 / len(tokenizer) * 1.1  # hidden 128 vs vocab 512


def test_the_reference_output_layer_is_kept_as_one_matrix():
    """A plain head is kept as it is; a head with LoRA on it (PEFT) as its effective matrix, equal within rounding."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    plain = torch.nn.Linear(16, 40, bias=False)
    weight, bias = dense_layer(plain)
    assert torch.equal(weight, plain.weight) and bias is None
    holder = torch.nn.Module()
    holder.head = torch.nn.Linear(16, 40, bias=True)
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["head"], init_lora_weights=False), holder)
    weight, bias = dense_layer(holder.head)
    x = torch.randn(8, 16)
    assert torch.allclose(plain_linear(weight, bias)(x), holder.head(x), atol=1e-5)
    assert torch.equal(bias, holder.head.base_layer.bias.detach())
