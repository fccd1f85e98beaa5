"""proxy/chattemplate.py: the chat template read from a GGUF header and rendered as
llama_cpp.server renders it (pure logic, on small GGUF files written here)."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from proxy.chattemplate import TemplateError, read_chat_template

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if tools %}tools: {{ tools | tojson }}\n{% endif %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def write_gguf(path: Path, template: str | None) -> Path:
    """A GGUF file with a tokenizer (tokens, BOS 1, EOS 2) and, if given, a chat template."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "héllo"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if template is not None:
        writer.add_chat_template(template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_template_and_its_bos_and_eos_texts_come_from_the_gguf_header(tmp_path):
    template = read_chat_template(write_gguf(tmp_path / "m.gguf", TEMPLATE))
    assert template is not None
    body = {"messages": [{"role": "user", "content": "héllo"}]}
    assert template.render(body) == "<s><user>héllo</s>\n<assistant>"


def test_tools_reach_the_template_with_non_ascii_kept_as_llama_cpp_does(tmp_path):
    template = read_chat_template(write_gguf(tmp_path / "m.gguf", TEMPLATE))
    tools = [{"type": "function", "function": {"name": "météo"}}]
    rendered = template.render({"messages": [], "tools": tools})
    assert 'tools: [{"type": "function", "function": {"name": "météo"}}]' in rendered


def test_a_gguf_without_a_template_gives_none(tmp_path):
    assert read_chat_template(write_gguf(tmp_path / "m.gguf", None)) is None


def test_a_file_that_is_not_gguf_is_a_template_error_naming_it(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a model")
    with pytest.raises(TemplateError, match="notes.txt"):
        read_chat_template(path)


def test_a_template_that_raises_is_a_template_error(tmp_path):
    source = "{{ raise_exception('only user messages') }}"
    template = read_chat_template(write_gguf(tmp_path / "m.gguf", source))
    with pytest.raises(TemplateError, match="only user messages"):
        template.render({"messages": [{"role": "system", "content": "x"}]})
