"""Model loading switches that need no checkpoint: the attention implementation."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from fedrl_lightning.models import TINY, load_causal_lm, select_attn_implementation


def test_attn_implementation_falls_back_to_sdpa_with_one_log_line(monkeypatch, caplog):
    import fedrl_lightning.models as models_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models_mod, "_ATTN_LOGGED", False)
    with caplog.at_level(logging.INFO, logger="fedrl_lightning.models"):
        assert select_attn_implementation("auto") == "sdpa"
        assert select_attn_implementation() == "sdpa"
    assert sum("using sdpa" in r.getMessage() for r in caplog.records) == 1
    assert select_attn_implementation("eager") == "eager" and select_attn_implementation(None) is None
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        select_attn_implementation("flash_attention_2")
    model, _ = load_causal_lm(TINY)  # the policy's default "auto" lands on sdpa here
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None, reason="needs CUDA + flash_attn"
)
def test_flash_attention_2_selected_and_loads_on_cuda():
    assert select_attn_implementation("auto") == "flash_attention_2"
    model, tokenizer = load_causal_lm(TINY, dtype="bfloat16")  # attn_implementation="auto", as PolicyModule
    model = model.cuda()
    assert model.config._attn_implementation == "flash_attention_2"
    ids = torch.randint(0, len(tokenizer), (2, 8), device="cuda")
    assert model(input_ids=ids).logits.shape == (2, 8, len(tokenizer))
