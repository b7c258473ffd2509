"""Chat templates: llama.cpp's built-in formats against the peer's llama_chat_apply_template, the Gemma GGUF's
fallback, and Jinja rendering of a Qwen3-style template against strings derived by hand from its text."""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import gguf
import pytest

from hybridllm.engine.chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    ChatTemplateError,
    builtin_for_architecture,
    detect_builtin,
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "  You are helpful.\n"}, {"role": "user", "content": " Hi there \n"},
     {"role": "assistant", "content": "\tHello! How can I help?  "}, {"role": "user", "content": "A joke\u3000"}],
    [{"role": "system", "content": "sys1"}, {"role": "system", "content": "sys2"},
     {"role": "assistant", "content": "model first"}, {"role": "user", "content": "u"},
     {"role": "tool", "content": "tool output"}],
    [{"role": "user", "content": "日本語 😀 <b>x</b>\n\n"}, {"role": "assistant", "content": ""}],
]


def peer_apply(lcp: Any, name: str, messages: list[dict[str, str]], add_ass: bool) -> str:
    """llama_chat_apply_template(name, ...) through the raw C API."""
    lib, ffi = lcp._cffi_bindings.get_lib(), lcp._cffi_bindings.get_ffi()
    arr = ffi.new("llama_chat_message[]", len(messages))
    keep = []
    for i, m in enumerate(messages):
        keep += [ffi.new("char[]", m["role"].encode()), ffi.new("char[]", m["content"].encode())]
        arr[i].role, arr[i].content = keep[-2], keep[-1]
    n = lib.llama_chat_apply_template(name.encode(), arr, len(messages), add_ass, ffi.NULL, 0)
    assert n >= 0, f"peer does not know template {name!r}"
    buf = ffi.new(f"char[{n + 1}]")
    lib.llama_chat_apply_template(name.encode(), arr, len(messages), add_ass, buf, n + 1)
    return bytes(ffi.buffer(buf, n)).decode()


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_templates_match_peer(peer: Any, name: str) -> None:
    for conv in CONVERSATIONS:
        for add_ass in (True, False):
            assert ChatTemplate(builtin=name).render(conv, add_ass) == peer_apply(peer, name, conv, add_ass)


def test_gemma_model_falls_back_to_gemma_format(peer: Any, gemma_path: Path) -> None:
    lib, ffi = peer._cffi_bindings.get_lib(), peer._cffi_bindings.get_ffi()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(str(gemma_path).encode(), params)
    try:
        assert lib.llama_model_chat_template(model, ffi.NULL) == ffi.NULL  # the GGUF carries no template
        buf = ffi.new("char[64]")
        n = lib.llama_model_meta_val_str(model, b"general.architecture", buf, 64)
        arch = bytes(ffi.buffer(buf, n)).decode()
    finally:
        lib.llama_model_free(model)
    tmpl = ChatTemplate.for_model({"general.architecture": arch, "tokenizer.ggml.model": "llama"})
    assert (arch, tmpl.builtin) == ("gemma3", "gemma")
    for conv in CONVERSATIONS:
        for add_ass in (True, False):
            assert tmpl.render(conv, add_ass) == peer_apply(peer, "gemma", conv, add_ass)
    assert tmpl.render(CONVERSATIONS[0]) == "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"


def test_architecture_fallbacks_and_detection() -> None:
    assert builtin_for_architecture("gemma2") == "gemma"
    assert builtin_for_architecture("qwen3") == "chatml"
    assert builtin_for_architecture("llama", "llama-bpe") == "llama3"
    assert builtin_for_architecture("llama", "default") == "chatml"
    assert detect_builtin(QWEN3_TEMPLATE) == "chatml"
    assert detect_builtin("{{ '<start_of_turn>' }}") == "gemma"
    assert detect_builtin("<|start_header_id|>{{ m }}<|end_header_id|>") == "llama3"
    assert detect_builtin("{% if x %}USER: ASSISTANT: <|start_header_id|><|end_header_id|>") is None  # vicuna
    with pytest.raises(ChatTemplateError):
        ChatTemplate(builtin="nope")


# A Qwen3-style template (the structure of Qwen3's tokenizer_config.json chat_template).
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""


@pytest.fixture
def qwen3() -> ChatTemplate:
    return ChatTemplate(QWEN3_TEMPLATE, bos_token="", eos_token="<|im_end|>")


def test_qwen3_system_user_generation_prompt(qwen3: ChatTemplate) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>&</b>"}]
    assert qwen3.render(msgs) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                  "<|im_start|>user\nHi <b>&</b><|im_end|>\n<|im_start|>assistant\n")
    assert qwen3.render(msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi <b>&</b><|im_end|>\n")
    assert qwen3.render(msgs, enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_qwen3_reasoning_dropped_before_last_query(qwen3: ChatTemplate) -> None:
    msgs = [{"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "<think>\nplan A\n</think>\n\nA1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "<think>plan B</think>A2"}]
    assert qwen3.render(msgs, add_generation_prompt=False) == (
        "<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"          # before the last user turn: reasoning removed
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nplan B\n</think>\n\nA2<|im_end|>\n")


def test_qwen3_tools_and_tool_calls(qwen3: ChatTemplate) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Wetter für <Ort>",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Weather in Zürich?"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Zürich", "n": 1}}}]},
            {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "20C"}]
    out = qwen3.render(msgs, tools=[tool])
    tool_json = ('{"type": "function", "function": {"name": "get_weather", "description": "Wetter für <Ort>", '
                 '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}')
    assert out == (
        "<|im_start|>system\nS\n\n# Tools\n\nYou may call one or more functions to assist with the user query."
        "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + tool_json +
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Zürich?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
        "{\"city\": \"Zürich\", \"n\": 1}}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n20C\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n")


def test_jinja_environment_like_transformers() -> None:
    # trim_blocks + lstrip_blocks: block lines leave no whitespace; raise_exception; strftime_now; loop controls
    src = ("{% for m in messages %}\n    {% if m.role == 'bad' %}{{ raise_exception('no ' + m.role) }}{% endif %}\n"
           "    {% if loop.index > 2 %}{% break %}{% endif %}\n{{ m.content }}|\n{% endfor %}\n"
           "{{ strftime_now('%Y') }}{{ bos_token }}")
    tmpl = ChatTemplate(src, bos_token="<s>")
    msgs = [{"role": "u", "content": c} for c in "abc"]
    assert tmpl.render(msgs) == f"a|\nb|\n{datetime.datetime.now().year}<s>"
    with pytest.raises(ChatTemplateError, match="no bad"):
        tmpl.render([{"role": "bad", "content": ""}])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% for %}")
    with pytest.raises(ChatTemplateError):  # the sandbox forbids mutating objects
        ChatTemplate("{{ messages.append(1) }}").render([])


def test_bos_stripped_when_tokenizer_adds_it(tmp_path: Path) -> None:
    src = "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}"
    kept = ChatTemplate(src, bos_token="<s>", eos_token="</s>")
    stripped = ChatTemplate(src, bos_token="<s>", eos_token="</s>", strip_bos=True, strip_eos=True)
    msgs = [{"role": "user", "content": "x"}]
    assert (kept.render(msgs), stripped.render(msgs)) == ("<s>x</s>", "x")


def test_for_model_reads_template_from_gguf(tmp_path: Path) -> None:
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_chat_template(QWEN3_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmpl = ChatTemplate.for_model(gguf.GGUFReader(path))
    assert tmpl.source == QWEN3_TEMPLATE
    assert tmpl.render([{"role": "user", "content": "x"}]) == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
