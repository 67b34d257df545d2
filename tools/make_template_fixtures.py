#!/usr/bin/env python3
"""Render the official chat templates with transformers and record the expected strings.

tandem renders chat templates with its own Jinja interpreter (src/tokenizer/jinja*.c).
This script produces the ground truth that tests/test_jinja.c compares against, byte for
byte:

  tests/fixtures/templates/src/<template>.jinja      the template texts (see README.md there)
  tests/fixtures/templates/cases.json                the conversations (shared by all models)
  tests/fixtures/templates/<model>/                  a minimal model directory, as chat_load()
      tokenizer_config.json                          reads it (template inline, as a named list,
      chat_template.jinja (some models)              or in chat_template.jinja) + special tokens
      expected.json                                  {case: {"output": str} | {"error": str}}

Every case is rendered with tokenizer.apply_chat_template(messages, tools=..., tokenize=False,
add_generation_prompt=..., **extra) on a tokenizer object built locally (no hub access) that
carries the same special tokens as the fixture's tokenizer_config.json. Cases that transformers
rejects (a template's raise_exception, an undefined value used, a type error) are recorded as
errors; the C test then expects an error too.

Usage: python3 tools/make_template_fixtures.py   (from the repository root; needs transformers,
tokenizers, jinja2 >= 3.1.6)
"""
import copy
import json
import os
import sys

from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "templates")


def added(content):
    """A special token the way DeepSeek's tokenizer_config.json writes it."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


# layout: "inline" = tokenizer_config.json "chat_template": str; "list" = [{name, template}];
#         "jinja" = chat_template.jinja next to tokenizer_config.json
MODELS = [
    dict(name="qwen3-30b-a3b", src="qwen3.jinja", layout="inline",
         tokens={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    dict(name="qwen2.5-7b-instruct", src="qwen2.5.jinja", layout="inline",
         tokens={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    dict(name="deepseek-v3", src="deepseek-v3.jinja", layout="inline",
         tokens={"bos_token": added("<｜begin▁of▁sentence｜>"), "eos_token": added("<｜end▁of▁sentence｜>"),
                 "pad_token": added("<｜end▁of▁sentence｜>")}),
    dict(name="deepseek-v3.1", src="deepseek-v3.1.jinja", layout="inline",
         tokens={"bos_token": added("<｜begin▁of▁sentence｜>"), "eos_token": added("<｜end▁of▁sentence｜>"),
                 "pad_token": added("<｜end▁of▁sentence｜>")}),
    dict(name="kimi-k2-instruct", src="kimi-k2.jinja", layout="jinja",
         tokens={"bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]", "pad_token": "[PAD]"}),
    dict(name="kimi-k2-tools", src="kimi-k2-tools.jinja", layout="list",
         tokens={"bos_token": "[BOS]", "eos_token": "<|im_end|>"}),
    dict(name="mixtral-8x7b-instruct", src="mixtral.jinja", layout="inline",
         tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    dict(name="glm-4.5", src="glm-4.5.jinja", layout="jinja",
         tokens={"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}),
]

# ---- conversations ------------------------------------------------------------------------------

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. \"Paris\""},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search",
        "description": "Sök på webben — 検索 the web; returns up to `limit` results.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string"},
            "limit": {"type": "integer", "minimum": 1, "maximum": 10},
            "score": {"type": "number", "default": 0.5},
            "tags": {"type": "array", "items": {"type": "string"}},
            "safe": {"type": "boolean", "default": True},
            "extra": {"type": ["string", "null"]}},
            "required": ["query"]}}},
]

SYS = {"role": "system", "content": "You are a helpful assistant."}
SYS2 = {"role": "system", "content": "Answer briefly."}
U1 = {"role": "user", "content": "What's the weather like in Paris today?"}
A1 = {"role": "assistant", "content": "It is sunny and 21 °C in Paris."}
U2 = {"role": "user", "content": "And in Tokyo?"}
A_FINAL = {"role": "assistant", "content": "It is 18 °C and cloudy in Tokyo."}


def call(cid, name, args, as_string):
    return {"id": cid, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args) if as_string else args}}


TC_DICT = {"role": "assistant", "content": "",
           "tool_calls": [call("call_0", "get_weather", {"city": "Tokyo", "unit": "celsius"}, False)]}
TC_STR = {"role": "assistant", "content": "",
          "tool_calls": [call("call_0", "get_weather", {"city": "Tokyo", "unit": "celsius"}, True)]}
TC_NULL = {"role": "assistant", "content": None,
           "tool_calls": [call("functions.get_weather:0", "get_weather", {"city": "Tokyo"}, True)]}
TC_TWO = {"role": "assistant", "content": "Let me check both.",
          "tool_calls": [call("call_1", "get_weather", {"city": "Tokyo"}, False),
                         call("call_2", "search", {"query": "Tokyo weather", "limit": 3, "score": 0.25,
                                                   "tags": ["météo", "天気"], "safe": False, "extra": None}, False)]}
T1 = {"role": "tool", "tool_call_id": "call_0", "name": "get_weather",
      "content": "{\"temperature\": 18, \"condition\": \"cloudy\"}"}
T2 = {"role": "tool", "tool_call_id": "call_2", "name": "search", "content": "1. Tokyo: cloudy, 18 °C"}
A_REASON = {"role": "assistant", "content": "The answer is 4.", "reasoning_content": "2 + 2 = 4, simple arithmetic."}
A_THINK = {"role": "assistant", "content": "<think>\nLet me think about it.\n</think>\n\nThe answer is 4."}
A_ALIAS = {"role": "assistant", "content": "Four.", "reasoning": "Counting: one, two, three, four."}
UQ = {"role": "user", "content": "What is 2 + 2?"}
UNI = ("Ünïcödé — 日本語, emoji 😀🚀, quotes \"double\" 'single', backslash \\ and a tab\tand\n"
       "newline, zero-width\u200b, NBSP\u00a0and control \u0001 chars.")
PARTS = {"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "text", "text": " this, please."}]}


def long_chat(n):
    out = [SYS]
    for i in range(n):
        out.append({"role": "user", "content": "Question %d: %s" % (i, "x" * (i % 7))})
        out.append({"role": "assistant", "content": "Answer %d." % i})
    out.append({"role": "user", "content": "Last question."})
    return out


CASES = [
    dict(name="user", messages=[U1], add_generation_prompt=False),
    dict(name="user_gen", messages=[U1], add_generation_prompt=True),
    dict(name="system_user_gen", messages=[SYS, U1], add_generation_prompt=True),
    dict(name="multi_turn_gen", messages=[SYS, U1, A1, U2], add_generation_prompt=True),
    dict(name="multi_turn_no_gen", messages=[SYS, U1, A1, U2, A_FINAL], add_generation_prompt=False),
    dict(name="no_system_multi_turn", messages=[U1, A1, U2], add_generation_prompt=True),
    dict(name="tools_gen", messages=[SYS, U1], tools=TOOLS, add_generation_prompt=True),
    dict(name="tools_no_system", messages=[U1], tools=TOOLS, add_generation_prompt=True),
    dict(name="tools_empty_list", messages=[U1], tools=[], add_generation_prompt=True),
    dict(name="tool_calls_dict_args", messages=[SYS, U1, TC_DICT, T1], tools=TOOLS, add_generation_prompt=True),
    dict(name="tool_calls_string_args", messages=[U1, TC_STR, T1], tools=TOOLS, add_generation_prompt=True),
    dict(name="tool_calls_null_content", messages=[U1, TC_NULL, T1, A_FINAL, U2], tools=TOOLS,
         add_generation_prompt=True),
    dict(name="tool_calls_parallel", messages=[SYS, U1, TC_TWO, T1, T2, A_FINAL], tools=TOOLS,
         add_generation_prompt=False),
    dict(name="multi_step_tools", messages=[U2, TC_DICT, T1, TC_TWO, T2,
                                            dict(A_FINAL, reasoning_content="Both tools answered.")],
         tools=TOOLS, add_generation_prompt=False),
    dict(name="reasoning_history", messages=[UQ, A_REASON, U2], add_generation_prompt=True),
    dict(name="reasoning_last", messages=[UQ, A_REASON], add_generation_prompt=False),
    dict(name="think_in_content", messages=[UQ, A_THINK, U2], add_generation_prompt=True),
    dict(name="think_in_content_last", messages=[UQ, A_THINK], add_generation_prompt=False),
    dict(name="reasoning_alias", messages=[UQ, A_ALIAS], add_generation_prompt=False),
    dict(name="enable_thinking_false", messages=[SYS, UQ], add_generation_prompt=True,
         extra={"enable_thinking": False}),
    dict(name="enable_thinking_true", messages=[UQ], add_generation_prompt=True, extra={"enable_thinking": True}),
    dict(name="enable_thinking_false_history", messages=[UQ, A_REASON, U2], add_generation_prompt=True,
         extra={"enable_thinking": False}),
    dict(name="thinking_true", messages=[SYS, UQ], add_generation_prompt=True, extra={"thinking": True}),
    dict(name="unicode", messages=[{"role": "system", "content": UNI}, {"role": "user", "content": UNI},
                                   {"role": "assistant", "content": UNI}, {"role": "user", "content": "ok"}],
         add_generation_prompt=True),
    dict(name="multiple_systems", messages=[SYS, SYS2, U1], add_generation_prompt=True),
    dict(name="content_parts", messages=[PARTS], add_generation_prompt=True),
    dict(name="empty_assistant", messages=[U1, {"role": "assistant", "content": ""}], add_generation_prompt=False),
    dict(name="empty_messages", messages=[], add_generation_prompt=True),
    dict(name="extra_vars", messages=[U1], add_generation_prompt=True,
         extra={"custom_var": "x", "bos_token": "<BOS-OVERRIDE>", "eos_token": "<EOS-OVERRIDE>"}),
    dict(name="user_after_user", messages=[U1, U2], add_generation_prompt=True),
    dict(name="long_conversation", messages=long_chat(40), add_generation_prompt=True),
]


def make_tokenizer(tokens, template):
    kw = {}
    for k, v in tokens.items():
        if v is not None:
            kw[k] = v["content"] if isinstance(v, dict) else v
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                  **kw)
    tok.chat_template = template
    return tok


def render(tok, case):
    try:
        out = tok.apply_chat_template(copy.deepcopy(case["messages"]), tools=copy.deepcopy(case.get("tools")),
                                      add_generation_prompt=case["add_generation_prompt"], tokenize=False,
                                      **copy.deepcopy(case.get("extra", {})))
        return {"output": out}
    except Exception as e:  # the template (or transformers) rejected the conversation
        return {"error": "%s: %s" % (type(e).__name__, e)}


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def main():
    write_json(os.path.join(ROOT, "cases.json"), {"cases": CASES})
    summary = []
    for m in MODELS:
        with open(os.path.join(ROOT, "src", m["src"]), encoding="utf-8") as f:
            template = f.read()
        d = os.path.join(ROOT, m["name"])
        os.makedirs(d, exist_ok=True)
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 131072}
        cfg.update(m["tokens"])
        jpath = os.path.join(d, "chat_template.jinja")
        if m["layout"] == "inline":
            cfg["chat_template"] = template
        elif m["layout"] == "list":
            cfg["chat_template"] = [{"name": "rag", "template": "{{ 'unused' }}"},
                                    {"name": "default", "template": template}]
        if m["layout"] == "jinja":
            with open(jpath, "w", encoding="utf-8", newline="") as f:
                f.write(template)
        elif os.path.exists(jpath):
            os.remove(jpath)
        write_json(os.path.join(d, "tokenizer_config.json"), cfg)
        tok = make_tokenizer(m["tokens"], template)
        expected = {c["name"]: render(tok, c) for c in CASES}
        write_json(os.path.join(d, "expected.json"), expected)
        errs = sum("error" in v for v in expected.values())
        summary.append("%-24s %2d cases, %2d expected errors" % (m["name"], len(expected), errs))
    print("\n".join(summary))


if __name__ == "__main__":
    sys.exit(main())
