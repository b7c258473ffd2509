"""Chat prompts: render a GGUF's `tokenizer.chat_template` (Jinja) like HF transformers / llama.cpp, or, for a
model without one, llama.cpp's built-in template for its architecture (src/llama-chat.cpp).

    tmpl = ChatTemplate.for_model(meta, tokenizer)          # meta: GGUF metadata mapping or GGUFReader
    prompt = tmpl.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = tokenizer.tokenize(prompt, add_special=True, parse_special=True)

Jinja runs in an immutable sandbox with trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now` and a
`tojson` that does not HTML-escape (as transformers does). Like llama.cpp's server, a leading BOS (trailing
EOS) text is removed from the result when the tokenizer adds that token itself, and `enable_thinking`
defaults to true.
"""
from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Message = Mapping[str, Any]
_ASCII_SPACE = " \t\n\v\f\r"


class ChatTemplateError(ValueError):
    """The template cannot be compiled or rendered (bad syntax, raise_exception(), unsupported messages)."""


def _trim(text: str) -> str:
    return text.strip(_ASCII_SPACE)  # llama.cpp trims with C isspace: ASCII whitespace only


def _content(message: Message) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    raise ChatTemplateError(f"message content must be a string or a list of parts, got {type(content).__name__}")


# --- llama.cpp's built-in (non-Jinja) templates -----------------------------------------------------------

def _chatml(msgs: Sequence[Message], add_ass: bool) -> str:
    out = [f"<|im_start|>{m['role']}\n{_content(m)}<|im_end|>\n" for m in msgs]
    return "".join(out) + ("<|im_start|>assistant\n" if add_ass else "")


def _gemma(msgs: Sequence[Message], add_ass: bool) -> str:
    # Gemma has no system role: system text is prepended to the next non-model turn.
    out, system = [], ""
    for m in msgs:
        if m["role"] == "system":
            system += _trim(_content(m))
            continue
        role = "model" if m["role"] == "assistant" else m["role"]
        out.append(f"<start_of_turn>{role}\n")
        if system and role != "model":
            out.append(system + "\n\n")
            system = ""
        out.append(_trim(_content(m)) + "<end_of_turn>\n")
    return "".join(out) + ("<start_of_turn>model\n" if add_ass else "")


def _llama3(msgs: Sequence[Message], add_ass: bool) -> str:
    out = [f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{_trim(_content(m))}<|eot_id|>" for m in msgs]
    return "".join(out) + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_ass else "")


def _llama2(system: bool, bos_inside: bool, strip: bool) -> Callable[[Sequence[Message], bool], str]:
    def render(msgs: Sequence[Message], add_ass: bool) -> str:
        out, inside = ["[INST] "], True  # the first [INST] follows the tokenizer's BOS
        for m in msgs:
            content = _trim(_content(m)) if strip else _content(m)
            if not inside:
                inside = True
                out.append("<s>[INST] " if bos_inside else "[INST] ")
            if m["role"] == "system":
                out.append(f"<<SYS>>\n{content}\n<</SYS>>\n\n" if system else content + "\n")
            elif m["role"] == "user":
                out.append(content + " [/INST]")
            else:
                out.append(content + "</s>")
                inside = False
        return "".join(out)
    return render


def _mistral(lead: str, trail: str, trim_assistant: bool) -> Callable[[Sequence[Message], bool], str]:
    def render(msgs: Sequence[Message], add_ass: bool) -> str:
        out, inside = [], False
        for m in msgs:
            if not inside:
                out.append(f"{lead}[INST]{trail}")
                inside = True
            content = _content(m)
            if m["role"] == "system":
                out.append(content + "\n\n")
            elif m["role"] == "user":
                out.append(f"{content}{lead}[/INST]")
            else:
                out.append(f"{trail}{_trim(content) if trim_assistant else content}</s>")
                inside = False
        return "".join(out)
    return render


def _mistral_v7(space: str) -> Callable[[Sequence[Message], bool], str]:
    def render(msgs: Sequence[Message], add_ass: bool) -> str:
        out = []
        for m in msgs:
            content = _content(m)
            if m["role"] == "system":
                out.append(f"[SYSTEM_PROMPT]{space}{content}[/SYSTEM_PROMPT]")
            elif m["role"] == "user":
                out.append(f"[INST]{space}{content}[/INST]")
            else:
                out.append(f"{space}{content}</s>")
        return "".join(out)
    return render


def _tagged(open_fmt: str, close: str, gen: str) -> Callable[[Sequence[Message], bool], str]:
    """Templates of the form <open(role)>content<close> per message, then a generation prompt."""
    def render(msgs: Sequence[Message], add_ass: bool) -> str:
        out = [open_fmt.format(role=m["role"]) + _content(m) + close for m in msgs]
        return "".join(out) + (gen if add_ass else "")
    return render


BUILTIN_TEMPLATES: dict[str, Callable[[Sequence[Message], bool], str]] = {
    "chatml": _chatml,
    "gemma": _gemma,
    "llama3": _llama3,
    "llama2": _llama2(system=False, bos_inside=False, strip=False),
    "llama2-sys": _llama2(system=True, bos_inside=False, strip=False),
    "llama2-sys-bos": _llama2(system=True, bos_inside=True, strip=False),
    "llama2-sys-strip": _llama2(system=True, bos_inside=False, strip=True),
    "mistral-v1": _mistral(" ", " ", trim_assistant=False),
    "mistral-v3": _mistral("", " ", trim_assistant=True),
    "mistral-v3-tekken": _mistral("", "", trim_assistant=False),
    "mistral-v7": _mistral_v7(" "),
    "mistral-v7-tekken": _mistral_v7(""),
    "phi3": _tagged("<|{role}|>\n", "<|end|>\n", "<|assistant|>\n"),
    "phi4": _tagged("<|im_start|>{role}<|im_sep|>", "<|im_end|>", "<|im_start|>assistant<|im_sep|>"),
    "zephyr": _tagged("<|{role}|>\n", "<|endoftext|>\n", "<|assistant|>\n"),
    "falcon3": _tagged("<|{role}|>\n", "\n", "<|assistant|>\n"),
}


def detect_builtin(source: str) -> str | None:
    """llama.cpp's heuristic name for a Jinja template's format, among the built-ins we implement."""
    if source in BUILTIN_TEMPLATES:
        return source
    has = source.__contains__
    if has("<|im_start|>"):
        return "phi4" if has("<|im_sep|>") else None if has("<end_of_utterance>") else "chatml"
    if source.startswith("mistral") or has("[INST]"):
        if has("[SYSTEM_PROMPT]"):
            return "mistral-v7"
        if has("' [INST] ' + system_message") or has("[AVAILABLE_TOOLS]"):
            return "mistral-v1" if has(" [INST]") else "mistral-v3-tekken" if has('"[INST]"') else "mistral-v3"
        if has("content.strip()"):
            return "llama2-sys-strip"
        if has("bos_token + '[INST]"):
            return "llama2-sys-bos"
        return "llama2-sys" if has("<<SYS>>") else "llama2"
    if has("<|assistant|>") and has("<|end|>"):
        return "phi3"
    if has("[gMASK]<sop>"):
        return None  # chatglm4
    if has("<|assistant|>") and has("<|user|>"):
        return "falcon3" if has("</s>") and not has("<|tool_declare|>") else None
    if has("<|{{ item['role'] }}|>") and has("<|begin_of_image|>"):
        return None  # glmedge
    if has("<|user|>") and has("<|endoftext|>"):
        return "zephyr"
    if has("bos_token + message['role']"):
        return None  # monarch
    if has("<start_of_turn>"):
        return "gemma"
    if (has("'\\n\\nAssistant: ' + eos_token") or has("GPT4 Correct ") or (has("USER: ") and has("ASSISTANT: "))
            or (has("### Instruction:") and has("<|EOT|>"))
            or (has("<|START_OF_TURN_TOKEN|>") and has("<|USER_TOKEN|>"))):
        return None  # orion, openchat, vicuna, deepseek, command-r
    if has("<|start_header_id|>") and has("<|end_header_id|>"):
        return "llama3"
    return None


def builtin_for_architecture(arch: str, pre: str = "") -> str:
    """The built-in template to use when a GGUF carries none (llama.cpp's own default is chatml)."""
    if arch.startswith("gemma"):
        return "gemma"
    if arch in ("llama", "llama4") and pre in ("llama3", "llama-v3", "llama-bpe"):
        return "llama3"
    if arch in ("phi3",):
        return "phi3"
    return "chatml"


# --- Jinja -------------------------------------------------------------------------------------------------

def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def compile_jinja(source: str) -> Any:
    """Compile a chat template in transformers' sandboxed environment."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers): render the body unchanged."""
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"invalid chat template: {exc}") from exc


class ChatTemplate:
    """A Jinja chat template (source) or one of llama.cpp's built-in formats (builtin name)."""

    def __init__(self, source: str | None = None, *, builtin: str | None = None, bos_token: str = "",
                 eos_token: str = "", strip_bos: bool = False, strip_eos: bool = False) -> None:
        if (source is None) == (builtin is None):
            raise ChatTemplateError("give exactly one of a Jinja source or a built-in template name")
        if builtin is not None and builtin not in BUILTIN_TEMPLATES:
            raise ChatTemplateError(f"unknown built-in chat template {builtin!r} "
                                    f"(known: {', '.join(sorted(BUILTIN_TEMPLATES))})")
        self.source, self.builtin = source, builtin
        self.bos_token, self.eos_token = bos_token, eos_token
        self.strip_bos, self.strip_eos = strip_bos, strip_eos
        self._compiled = compile_jinja(source) if source is not None else None

    @classmethod
    def for_model(cls, meta: Any, tokenizer: Any = None) -> ChatTemplate:
        """The model's template: `tokenizer.chat_template` if present, else its architecture's built-in.
        meta is a GGUF metadata mapping, an object with a `metadata` mapping, or a `gguf.GGUFReader`;
        tokenizer (optional) supplies BOS/EOS."""
        meta = _metadata(meta)
        bos = eos = ""
        add_bos = add_eos = False
        if tokenizer is not None:
            v = tokenizer.vocab
            bos = tokenizer.token_to_piece(v.bos, special=True).decode("utf-8", "replace") if v.bos >= 0 else ""
            eos = tokenizer.token_to_piece(v.eos, special=True).decode("utf-8", "replace") if v.eos >= 0 else ""
            add_bos, add_eos = v.add_bos, v.add_eos
        source = meta.get("tokenizer.chat_template")
        if isinstance(source, str) and source and source != "chatml":
            if source in BUILTIN_TEMPLATES:
                return cls(builtin=source, bos_token=bos, eos_token=eos)
            return cls(source, bos_token=bos, eos_token=eos, strip_bos=add_bos, strip_eos=add_eos)
        name = "chatml" if source == "chatml" else builtin_for_architecture(
            str(meta.get("general.architecture", "")), str(meta.get("tokenizer.ggml.pre", "")))
        return cls(builtin=name, bos_token=bos, eos_token=eos)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any) -> str:
        """The prompt text for messages ({'role', 'content', ...}); extra kwargs become template variables."""
        if self.builtin is not None:
            for m in messages:
                if "role" not in m:
                    raise ChatTemplateError("every message needs a 'role'")
            return BUILTIN_TEMPLATES[self.builtin](messages, add_generation_prompt)
        import jinja2

        context: dict[str, Any] = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                                   "enable_thinking": True}
        context.update(kwargs)
        assert self._compiled is not None
        try:
            text = self._compiled.render(messages=list(messages), tools=list(tools) if tools else None,
                                         documents=None, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template error: {exc}") from exc
        if self.strip_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]  # the tokenizer adds BOS itself
        if self.strip_eos and self.eos_token and text.endswith(self.eos_token):
            text = text[:-len(self.eos_token)]
        return text


def _metadata(meta: Any) -> Mapping[str, Any]:
    if isinstance(meta, Mapping):
        return meta
    if isinstance(getattr(meta, "metadata", None), Mapping):
        return meta.metadata
    out: dict[str, Any] = {}
    for key in ("tokenizer.chat_template", "general.architecture", "tokenizer.ggml.pre"):
        fld = meta.fields.get(key)
        if fld is not None and fld.data:
            out[key] = bytes(fld.parts[fld.data[0]]).decode("utf-8", "replace")
    return out
