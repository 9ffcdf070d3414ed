"""The chat templates of real model families, exactly as their tokenizer_config.json ships them, and tiny
tokenizers that carry them.

Sources (stored public copies, read through the code index):
- LLAMA2: meta-llama/Llama-2-13b-chat-hf (the 7b-chat template is the same string), MISTRAL:
  mistralai/Mistral-7B-Instruct-v0.1, GEMMA: google/gemma-7b-it (Gemma-2's is identical: trl's
  chat_templates/README.md says so and its gemma.jinja is this string): all as quoted by
  EricLBuehler/mistral.rs, mistralrs-core/src/pipeline/chat_template.rs (`test_chat_templates`, one comment per model).
- QWEN2: the ChatML template of Qwen/Qwen2-0.5B (base; its EOS is `<|endoftext|>`, not `<|im_end|>`), as in a
  printed Qwen2Tokenizer config in the same index.
- LLAMA3 (meta-llama/Meta-Llama-3-8B-Instruct), PHI3 (microsoft/Phi-3-mini-4k-instruct), QWEN3 (Qwen/Qwen3-*):
  huggingface/trl, trl/chat_templates/{llama3,phi3,qwen3}.jinja, byte-identical copies trl compares tokenizers
  against (trl 1.16.0).
- LLAMA3_GENERATION: huggingface/trl, trl/chat_templates/llama3_training.jinja: Llama-3's template with
  `{% generation %}` markers around each answer and its `<|eot_id|>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LLAMA2 = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
MISTRAL = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
GEMMA = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
QWEN2 = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
LLAMA3 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
PHI3 = "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
QWEN3 = '{%- if tools %}\n    {{- \'<|im_start|>system\\n\' }}\n    {%- if messages[0].role == \'system\' %}\n        {{- messages[0].content + \'\\n\\n\' }}\n    {%- endif %}\n    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n    {%- for tool in tools %}\n        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n{%- else %}\n    {%- if messages[0].role == \'system\' %}\n        {{- \'<|im_start|>system\\n\' + messages[0].content + \'<|im_end|>\\n\' }}\n    {%- endif %}\n{%- endif %}\n{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n{%- for message in messages[::-1] %}\n    {%- set index = (messages|length - 1) - loop.index0 %}\n    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith(\'<tool_response>\') and message.content.endswith(\'</tool_response>\')) %}\n        {%- set ns.multi_step_tool = false %}\n        {%- set ns.last_query_index = index %}\n    {%- endif %}\n{%- endfor %}\n{%- for message in messages %}\n    {%- if message.content is string %}\n        {%- set content = message.content %}\n    {%- else %}\n        {%- set content = \'\' %}\n    {%- endif %}\n    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}\n        {{- \'<|im_start|>\' + message.role + \'\\n\' + content + \'<|im_end|>\' + \'\\n\' }}\n    {%- elif message.role == "assistant" %}\n        {%- set reasoning_content = \'\' %}\n        {%- if message.reasoning_content is string %}\n            {%- set reasoning_content = message.reasoning_content %}\n        {%- else %}\n            {%- if \'</think>\' in content %}\n                {%- set reasoning_content = content.split(\'</think>\')[0].rstrip(\'\\n\').split(\'<think>\')[-1].lstrip(\'\\n\') %}\n                {%- set content = content.split(\'</think>\')[-1].lstrip(\'\\n\') %}\n            {%- endif %}\n        {%- endif %}\n        {%- if loop.index0 > ns.last_query_index %}\n            {%- if loop.last or (not loop.last and reasoning_content) %}\n                {{- \'<|im_start|>\' + message.role + \'\\n<think>\\n\' + reasoning_content.strip(\'\\n\') + \'\\n</think>\\n\\n\' + content.lstrip(\'\\n\') }}\n            {%- else %}\n                {{- \'<|im_start|>\' + message.role + \'\\n\' + content }}\n            {%- endif %}\n        {%- else %}\n            {{- \'<|im_start|>\' + message.role + \'\\n\' + content }}\n        {%- endif %}\n        {%- if message.tool_calls %}\n            {%- for tool_call in message.tool_calls %}\n                {%- if (loop.first and content) or (not loop.first) %}\n                    {{- \'\\n\' }}\n                {%- endif %}\n                {%- if tool_call.function %}\n                    {%- set tool_call = tool_call.function %}\n                {%- endif %}\n                {{- \'<tool_call>\\n{"name": "\' }}\n                {{- tool_call.name }}\n                {{- \'", "arguments": \' }}\n                {%- if tool_call.arguments is string %}\n                    {{- tool_call.arguments }}\n                {%- else %}\n                    {{- tool_call.arguments | tojson }}\n                {%- endif %}\n                {{- \'}\\n</tool_call>\' }}\n            {%- endfor %}\n        {%- endif %}\n        {{- \'<|im_end|>\\n\' }}\n    {%- elif message.role == "tool" %}\n        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}\n            {{- \'<|im_start|>user\' }}\n        {%- endif %}\n        {{- \'\\n<tool_response>\\n\' }}\n        {{- content }}\n        {{- \'\\n</tool_response>\' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n            {{- \'<|im_end|>\\n\' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- \'<|im_start|>assistant\\n\' }}\n    {%- if enable_thinking is defined and enable_thinking is false %}\n        {{- \'<think>\\n\\n</think>\\n\\n\' }}\n    {%- endif %}\n{%- endif %}'
LLAMA3_GENERATION = "{#- Training variant of the Llama 3 chat template (see llama3.jinja for the original).\n    Modifications vs the original:\n    - Added {% generation %} / {% endgeneration %} around assistant message output to support\n      assistant-only loss masking in SFT training.\n-#}\n{%- for message in messages %}\n    {%- if loop.index0 == 0 %}{{- bos_token }}{%- endif %}\n    {%- if message['role'] == 'assistant' %}\n        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n        {%- generation %}\n        {{- message['content'] | trim + '<|eot_id|>' }}\n        {%- endgeneration %}\n    {%- else %}\n        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"

# Templates that skip messages with empty content, as some do (ChatML and Phi-3 written so): an answer emptied to find
# its span would vanish with its header.
CHATML_SKIP_EMPTY = ("{% for m in messages %}{% if m['content'] %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                     "<|im_end|>\n{% endif %}{% endfor %}")
PHI3_SKIP_EMPTY = ("{% for m in messages %}{% if m['content'] %}{{ '<|' + m['role'] + '|>\n' + m['content'] + "
                   "'<|end|>\n' }}{% endif %}{% endfor %}{{ eos_token }}")


@dataclass(frozen=True)
class Family:
    template: str
    bos: str | None
    eos: str
    end: str  # the token that closes an answer: EOS or the template's end-of-turn token
    special: tuple[str, ...] = ()  # further special tokens of the family


FAMILIES = {
    "llama2": Family(LLAMA2, "<s>", "</s>", "</s>"),
    "llama3": Family(LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                     ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "mistral": Family(MISTRAL, "<s>", "</s>", "</s>"),
    "qwen2": Family(QWEN2, None, "<|endoftext|>", "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "qwen3": Family(QWEN3, None, "<|im_end|>", "<|im_end|>", ("<|im_start|>", "<|endoftext|>")),
    "gemma": Family(GEMMA, "<bos>", "<eos>", "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>")),
    "phi3": Family(PHI3, "<s>", "<|endoftext|>", "<|end|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    "llama3_generation": Family(LLAMA3_GENERATION, "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                                ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
}


def family_tokenizer(tiny_model: Path, name: str):
    """The repo's tiny byte-level BPE (scripts/build_tiny_model.py, as saved in `tiny_model`) dressed as family
    `name` by `with_template`."""
    from transformers import AutoTokenizer

    return with_template(AutoTokenizer.from_pretrained(tiny_model), name)


def with_template(base, name: str):
    """A copy of tokenizer `base` (the tiny byte-level BPE) with family `name`'s special tokens, BOS, EOS and chat
    template; nothing is prepended on encoding (the templates write BOS themselves)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    family = FAMILIES[name]
    backend = Tokenizer.from_str(base.backend_tokenizer.to_str())
    backend.post_processor = None
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    named = [t for t in (family.bos, family.eos) if t]
    tok.add_special_tokens({"additional_special_tokens": [t for t in (*named, *family.special) if t not in tok.get_vocab()]})
    tok.bos_token, tok.eos_token = family.bos, family.eos
    tok.chat_template = family.template
    return tok


def trained_runs(tok, labels: list[int]) -> list[str]:
    """The decoded texts of the runs of consecutive trained labels (not -100) of one sample, in order."""
    runs, run = [], []
    for label in [*labels, -100]:
        if label != -100:
            run.append(label)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs
