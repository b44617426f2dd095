"""Builds the tokenizer, chat-template and generation-config fixtures of flare's text tests.

The fixture models of `bench/make_model_fixtures.py` have a vocabulary of 256 ids, so each gets
a tiny byte-level BPE tokenizer trained here with the `tokenizers` library on a fixed corpus:
its alphabet is the bytes the corpus uses (ASCII plus the two- to four-byte UTF-8 sequences of a
few accented, CJK and emoji characters, so that some characters span several tokens), a few
special tokens, and merges up to 256 ids in all. Text with a byte outside the alphabet loses
that byte, which the tests avoid.

- qwen2: Qwen2's normalizer (NFC) and pre-tokenizer (its split regex, then byte-level), which
  transformers' Qwen2Tokenizer imposes whatever tokenizer.json says; `<|endoftext|>`=0, `<|im_start|>`=1, `<|im_end|>`=2; no BOS; Qwen2.5's ChatML chat
  template (with its tools and tool-response blocks) in `tokenizer_config.json`;
  `generation_config.json` with `eos_token_id` a list [2, 0].
- llama: `<unk>`=0, `<s>`=1, `</s>`=2 (the model config's bos/eos), `<|im_start|>`=3,
  `<|im_end|>`=4; a post-processor that prepends `<s>`; a ChatML template of ours using
  `bos_token`, `raise_exception` and Python string methods, in `chat_template.jinja`;
  `generation_config.json` with `eos_token_id` an int.

For each, `tokenizer_golden.json` records what transformers' AutoTokenizer does: `encode` of a
few strings with and without special tokens, `decode` with and without skipping special tokens,
and `apply_chat_template` (text and ids) of a few conversations, with and without the
generation prompt. Only files are added; the model weights and references are not touched.

Run after make_model_fixtures.py (which deletes generation_config.json):
/tmp/peftvenv2/bin/python bench/make_text_fixtures.py (needs transformers, tokenizers).
"""

import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..", "crates", "flare", "tests", "fixtures", "models")
VOCAB = 256

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello, world! How are you today?",
    "You are a helpful assistant. Answer the question in one short sentence, please.",
    "A transformer model reads tokens and writes the next token, one at a time.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024; symbols: ( ) [ ] { } < > = + - * / _ # @ & % $ ' \" : ; ? !",
    "Caf\u00e9, na\u00efve, \u00fcber, se\u00f1or, gar\u00e7on; \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8; emoji \U0001F642 \U0001F680.",
    "def main():\n    print('hello')\n\tindented\twith\ttabs\n",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz `~ ^ | \\",
] * 20

QWEN2_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Ours: BOS first, roles checked with raise_exception, contents stripped with Python's
# str.strip(), a system line made with str.upper() and str.startswith(), and a plain for/if
# body so that trim_blocks/lstrip_blocks matter.
LLAMA_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Conversation roles must be system, user or assistant, got ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'system' and message['content'].startswith('!') %}
<|im_start|>system
{{ message['content'][1:].strip().upper() }}<|im_end|>
    {% else %}
<|im_start|>{{ message['role'] }}
{{ message['content'].strip() }}<|im_end|>
    {% endif %}
    {% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

ENCODE_TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "Caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001F642",
    "line one\nline two\n\ttabbed",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, how are you?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "  It is 4.  "},
        {"role": "user", "content": "And 3 + 3?"},
    ],
    [
        {"role": "system", "content": "!be brief"},
        {"role": "user", "content": "Caf\u00e9 \u65e5\u672c\u8a9e \U0001F642"},
    ],
]

QWEN2_EXTRA_CONVERSATIONS = [
    [
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": "Let me check."},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "tool", "content": "{\"sky\": \"clear\"}"},
    ],
]


# Qwen2's pre-tokenizer regex (transformers' Qwen2Tokenizer rebuilds its pipeline with it, so
# the fixture's tokenizer.json uses it too): digits one by one, a space joined to the next word.
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


# Chat templates of well-known model families (written out here, in their published form or
# close to it), rendered by transformers with the llama fixture tokenizer's special tokens, so
# that flare's minijinja environment is checked against Jinja2 on the constructs real templates
# use: `| trim` binding tighter than `+`, `loop.index0`, `namespace`, `messages[::-1]`,
# `.split()[-1]`, `.strip('\n')`, `.startswith()`, `is defined`, `raise_exception`, `tojson`.
EXTRA_TEMPLATES = {
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
        "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
        "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
        "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
        "roles are supported!') }}{% endif %}{% endfor %}"
    ),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
        "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}"
        "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
    ),
    "qwen3_like": """{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
""",
    "context": (
        "{{ tools is defined }}|{{ tools }}|{{ documents is none }}|{{ add_generation_prompt }}|"
        "{{ messages|length }}|{{ 7 // 2 }}|{{ messages[0].role|capitalize }}|"
        "{{ 'a-b-c'.split('-') | join(',') }}|{{ messages[-1]['content'] | length }}|"
        "{{ messages[0].content.replace(' ', '_') }}|"
        "{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}|"
        "{{ messages | selectattr('role', 'equalto', 'user') | list | length }}|"
        "{{ messages[0].role.title() }}|{{ messages[0].content.upper() }}|{{ eos_token }}|{{ unk_token }}"
    ),
    "generation_tag": (
        "{%- for message in messages %}\n    {%- if message['role'] == 'assistant' %}\n"
        "        {%- generation %}<A>{{ message['content'] }}</A>\n{% endgeneration %}\n"
        "    {%- else %}<{{ message['role'] }}>{{ message['content'] }}\n    {% endif %}\n"
        "{%- endfor %}"
    ),
    "json": "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ {'k': [1, 2.5, none, true], 'html': '<a href=\"x\">&amp;</a>'} | tojson }}",
}

EXTRA_CONVERSATIONS = [
    [{"role": "user", "content": "  Hello there!  "}],
    [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nIt is 4."},
    ],
    [
        {"role": "user", "content": "Caf\u00e9 \u65e5\u672c\u8a9e \U0001F642"},
        {"role": "assistant", "content": "Oui."},
        {"role": "user", "content": "<tool_response>{\"a\": 1}</tool_response>"},
    ],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
]


def golden_templates(hf):
    out = []
    for name, tpl in EXTRA_TEMPLATES.items():
        for messages in EXTRA_CONVERSATIONS:
            for gen in [False, True]:
                case = {"name": name, "template": tpl, "messages": messages, "add_generation_prompt": gen}
                try:
                    case["text"] = hf.apply_chat_template(messages, chat_template=tpl, tokenize=False, add_generation_prompt=gen)
                except Exception as e:  # the template's raise_exception
                    case["error"] = str(e)
                out.append(case)
    return out


def train(specials, qwen2_pipeline=False):
    tok = Tokenizer(models.BPE())
    if qwen2_pipeline:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, initial_alphabet=[], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    return tok


def golden(d, conversations, templates=False):
    hf = AutoTokenizer.from_pretrained(d)
    print(d, type(hf).__name__, hf._tokenizer.pre_tokenizer)
    out = {"encode": [], "decode": [], "chat": []}
    for text in ENCODE_TEXTS:
        for special in [True, False]:
            ids = hf.encode(text, add_special_tokens=special)
            assert all(i < VOCAB for i in ids)
            out["encode"].append({"text": text, "add_special_tokens": special, "ids": ids})
    for text in ENCODE_TEXTS:
        ids = hf.encode(text, add_special_tokens=True)
        for skip in [False, True]:
            out["decode"].append({"ids": ids, "skip_special_tokens": skip, "text": hf.decode(ids, skip_special_tokens=skip)})
    for messages in conversations:
        for gen in [False, True]:
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            ids = hf.encode(text, add_special_tokens=False)
            out["chat"].append({"messages": messages, "add_generation_prompt": gen, "text": text, "ids": ids})
    if templates:
        out["templates"] = golden_templates(hf)
    out["vocab_size"] = len(hf)
    out["bos_token_id"] = hf.bos_token_id
    out["eos_token_id"] = hf.eos_token_id
    out["pad_token_id"] = hf.pad_token_id
    with open(os.path.join(d, "tokenizer_golden.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    return out


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def qwen2():
    d = os.path.join(ROOT, "qwen2")
    tok = train(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], qwen2_pipeline=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(os.path.join(d, "tokenizer.json"))
    write_json(
        os.path.join(d, "tokenizer_config.json"),
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "clean_up_tokenization_spaces": False,
            "model_max_length": 4096,
            "chat_template": QWEN2_TEMPLATE,
        },
    )
    write_json(
        os.path.join(d, "generation_config.json"),
        {"bos_token_id": 0, "eos_token_id": [2, 0], "pad_token_id": 0, "do_sample": False, "repetition_penalty": 1.05, "max_new_tokens": 40},
    )
    return golden(d, CONVERSATIONS + QWEN2_EXTRA_CONVERSATIONS)


def llama():
    d = os.path.join(ROOT, "llama")
    tok = train(["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(d, "tokenizer.json"))
    write_json(
        os.path.join(d, "tokenizer_config.json"),
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "clean_up_tokenization_spaces": False,
            "model_max_length": 4096,
        },
    )
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write(LLAMA_TEMPLATE)
    write_json(
        os.path.join(d, "generation_config.json"),
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_length": 64},
    )
    return golden(d, CONVERSATIONS, templates=True)


def main():
    for name, f in [("qwen2", qwen2), ("llama", llama)]:
        out = f()
        print(name, "vocab", out["vocab_size"], "chat[0]", repr(out["chat"][1]["text"]))


if __name__ == "__main__":
    main()
