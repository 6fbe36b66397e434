"""Greedy continuations of a few prompts, to put the models' outputs side by side."""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The greedy continuation of each prompt (new text only), generated one prompt at a time."""
    device = next(model.parameters()).device
    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    # Every model stops where the fine-tune's tokenizer ends a turn (the baseline's generation config is the
    # base's, which does not know a chat template's end-of-turn token), and at its own eos.
    own = model.generation_config.eos_token_id
    own = own if isinstance(own, list) else [] if own is None else [own]
    stops = list(dict.fromkeys([*([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []), *own]))
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        generated = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=stops or None,
        )
        outputs.append(tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True))
    return outputs
