"""Named chat templates for a merge config's `chat_template:`, and choosing one with `auto`.

mergekit 0.1.5 accepts, besides a Jinja template written out in the config, the names `alpaca`,
`chatml`, `exaone`, `llama3` and `mistral`, and `auto` (the template most of the input models
share). raymerge accepts the same words. The templates below were written for raymerge from the
public descriptions of each prompt format (they are not mergekit's files); each renders the usual
layout of its format with `messages`, `add_generation_prompt`, `bos_token` and `eos_token` as
transformers passes them. The chosen template is written as `chat_template.jinja`, which
transformers (v4.47+) prefers over a `chat_template` key of `tokenizer_config.json`.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional

# ChatML: <|im_start|>role\ncontent<|im_end|>\n per message.
CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Llama 3: a header per message, content trimmed, <|eot_id|> after it; bos_token once at the start.
LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

# Mistral instruct: [INST] ... [/INST] turns; an optional first system message is put in front of
# the first user turn; user and assistant must alternate.
MISTRAL = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system_text = none -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 is even) -%}"
    "{{- raise_exception('mistral chat template: after an optional system message, roles must alternate user, assistant, user, ...') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system_text is not none -%}"
    "{{- ' [INST] ' + system_text + '\\n\\n' + message['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- ' [INST] ' + message['content'] + ' [/INST]' -}}{%- endif -%}"
    "{%- else -%}{{- ' ' + message['content'] + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)

# Alpaca: the last system message as a preamble, then ### Instruction / ### Input / ### Response
# sections separated by blank lines (role `user_context` is the optional ### Input).
ALPACA = (
    "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
    "{%- if systems -%}{{- (systems | last)['content'] | trim -}}{%- endif -%}"
    "{%- set headers = {'user': '### Instruction:', 'user_context': '### Input:', 'assistant': '### Response:'} -%}"
    "{%- for message in messages if message['role'] in headers -%}"
    "{{- '\\n\\n' + headers[message['role']] + '\\n' + (message['content'] | trim) -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and (not messages or messages[-1]['role'] != 'assistant') -%}"
    "{{- '\\n\\n### Response:\\n' -}}"
    "{%- endif -%}"
)

# EXAONE: [|role|]content; a user turn ends with a newline, other turns with [|endofturn|]\n; an
# empty system turn is added when the conversation does not start with one.
EXAONE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}{{- '[|system|][|endofturn|]\\n' -}}{%- endif -%}"
    "{{- '[|' + message['role'] + '|]' + message['content'] -}}"
    "{%- if message['role'] == 'user' -%}{{- '\\n' -}}{%- else -%}{{- '[|endofturn|]\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '[|assistant|]' -}}{%- endif -%}"
)

NAMED_TEMPLATES: dict[str, str] = {
    "alpaca": ALPACA,
    "chatml": CHATML,
    "exaone": EXAONE,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
}

AUTO = "auto"


def is_template_text(text: str) -> bool:
    """Whether `text` is a Jinja template itself (rather than a name)."""
    return "{{" in text or "{%" in text


def model_chat_template(tokenizer_config: Optional[dict], jinja_file: Optional[bytes]) -> Optional[str]:
    """A model's chat template: its `chat_template.jinja`, else `tokenizer_config.json`'s
    `chat_template` (a string, or a list of {name, template} of which `default` is taken)."""
    if jinja_file is not None:
        text = jinja_file.decode("utf-8", errors="replace").strip()
        return text or None
    value = (tokenizer_config or {}).get("chat_template")
    if isinstance(value, list):
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value.strip() if isinstance(value, str) and value.strip() else None


def most_common_template(templates: Iterable[Optional[str]]) -> Optional[str]:
    """`auto`: the template most input models have (the first seen among equals); None when none has one."""
    counts = Counter(t for t in templates if t)
    if not counts:
        return None
    return counts.most_common(1)[0][0]
