"""runtime/modelfiles.py: GGUF metadata, corrupt files, and resolving LLAMA_MODEL."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import link_or_copy

from runtime.modelfiles import ModelError, read_model_info, resolve_model
from runtime.settings import FALLBACK_MODEL_NAME


def test_fallback_model_metadata_is_read_from_its_header(fallback_model):
    info = read_model_info(fallback_model)
    assert info.name == FALLBACK_MODEL_NAME
    assert info.architecture == "llama"
    assert info.quantization == "Q4_1"
    assert info.context_length == 8192
    assert info.size_bytes > 90_000_000


def test_file_of_random_bytes_is_refused(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(65536))
    with pytest.raises(ModelError) as error:
        read_model_info(junk)
    assert str(junk) in str(error.value) and "GGUF" in str(error.value)


def test_truncated_model_is_refused(tmp_path, fallback_model):
    truncated = tmp_path / "truncated.gguf"
    with open(fallback_model, "rb") as source:
        truncated.write_bytes(source.read(1 << 20))
    assert truncated.read_bytes()[:4] == b"GGUF"
    with pytest.raises(ModelError) as error:
        read_model_info(truncated)
    assert str(truncated) in str(error.value)


def test_model_cut_short_inside_its_tensor_data_is_refused(tmp_path, fallback_model):
    # The header is whole: only the size its tensor table asks for shows the loss.
    cut = tmp_path / "cut.gguf"
    shutil.copyfile(fallback_model, cut)
    os.truncate(cut, fallback_model.stat().st_size - 4096)
    with pytest.raises(ModelError) as error:
        read_model_info(cut)
    assert str(cut) in str(error.value) and "cut short" in str(error.value)


def test_empty_file_is_refused(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelError):
        read_model_info(empty)


@pytest.fixture
def models_dir(tmp_path: Path, fallback_model: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    link_or_copy(fallback_model, directory / FALLBACK_MODEL_NAME)
    (directory / "second.gguf").write_bytes(b"GGUF")
    return directory


def test_model_is_resolved_by_file_name(models_dir):
    path = resolve_model(FALLBACK_MODEL_NAME, models_dir)
    assert path == (models_dir / FALLBACK_MODEL_NAME).resolve()


def test_model_is_resolved_by_name_without_gguf(models_dir):
    path = resolve_model(FALLBACK_MODEL_NAME.removesuffix(".gguf"), models_dir)
    assert path == (models_dir / FALLBACK_MODEL_NAME).resolve()


def test_model_is_resolved_by_path_outside_models(tmp_path, models_dir):
    elsewhere = tmp_path / "elsewhere" / "mine.gguf"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"GGUF")
    assert resolve_model(str(elsewhere), models_dir) == elsewhere.resolve()


def test_missing_path_is_refused_naming_it(tmp_path, models_dir):
    missing = tmp_path / "nowhere" / "gone.gguf"
    with pytest.raises(ModelError) as error:
        resolve_model(str(missing), models_dir)
    assert str(missing) in str(error.value)


def test_unknown_name_is_refused_listing_the_models_and_the_command(models_dir):
    with pytest.raises(ModelError) as error:
        resolve_model("no-such-model", models_dir)
    message = str(error.value)
    assert "no-such-model" in message
    assert FALLBACK_MODEL_NAME in message and "second.gguf" in message
    assert "./console.sh models" in message


def test_unknown_name_with_no_models_says_none(tmp_path):
    with pytest.raises(ModelError) as error:
        resolve_model("x.gguf", tmp_path / "no-models-dir")
    assert "available: none" in str(error.value)
