"""GGUF model files: resolving a name to a path, and reading their metadata."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from proxy.ggufheader import HeaderError, read_header

GGUF_MAGIC = b"GGUF"


class ModelError(Exception):
    """A model is missing or unreadable; the message says what to do."""


@dataclass(frozen=True)
class ModelInfo:
    """What `models` shows for one file, read from its GGUF header."""

    path: Path
    size_bytes: int
    architecture: str
    quantization: str
    context_length: int | None

    @property
    def name(self) -> str:
        return self.path.name


def resolve_model(value: str, models_dir: Path) -> Path:
    """Turn LLAMA_MODEL (a path, or a file name in models/) into an existing file's path."""
    if "/" in value:
        path = Path(value).expanduser()
        if path.is_file():
            return path.resolve()
        raise ModelError(f"model file {path} does not exist; check LLAMA_MODEL or the --model path")
    for candidate in (models_dir / value, models_dir / f"{value}.gguf"):
        if candidate.is_file():
            return candidate.resolve()
    available = ", ".join(p.name for p in list_model_files(models_dir)) or "none"
    raise ModelError(
        f"model {value!r} is not in {models_dir} (available: {available}); "
        f"see ./console.sh models, or fetch one with ./console.sh pull REPO"
    )


def find_readable_model(value: str, models_dir: Path) -> Path:
    """resolve_model, then check that the file is a readable GGUF; raise ModelError."""
    path = resolve_model(value, models_dir)
    read_model_info(path)
    return path


def list_model_files(models_dir: Path) -> list[Path]:
    return sorted(models_dir.glob("*.gguf")) if models_dir.is_dir() else []


def read_model_info(path: Path) -> ModelInfo:
    """Read architecture, quantisation and context length; raise ModelError if corrupt."""
    _check_magic(path)
    # Imported here: gguf pulls in numpy, which only these commands need.
    from gguf import LlamaFileType

    try:
        header = read_header(path)
        is_whole = path.stat().st_size >= header.data_bytes_needed
    except (HeaderError, OSError) as error:
        raise ModelError(
            f"{path} is not a readable GGUF file ({error}); "
            f"download it again or remove it with ./console.sh rm"
        ) from None
    if not is_whole:
        raise ModelError(
            f"{path} is not a readable GGUF file (its tensors need "
            f"{header.data_bytes_needed} bytes, it has {path.stat().st_size}: cut short); "
            f"download it again or remove it with ./console.sh rm"
        )
    fields = header.fields
    architecture = str(fields.get("general.architecture", "unknown"))
    file_type = fields.get("general.file_type")
    try:
        quantization = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        quantization = "unknown"
    context = fields.get(f"{architecture}.context_length")
    return ModelInfo(
        path=path,
        size_bytes=path.stat().st_size,
        architecture=architecture,
        quantization=quantization,
        context_length=int(context) if context is not None else None,
    )


def _check_magic(path: Path) -> None:
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise ModelError(f"cannot read model {path}: {error.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelError(
            f"{path} is not a GGUF file (it does not start with 'GGUF'); "
            f"download it again or remove it with ./console.sh rm"
        )
