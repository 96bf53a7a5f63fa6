"""Drives a running llmapi server with the official `openai` Python SDK.

Every endpoint and request option the router supports is sent through the SDK, and every
response is parsed by the SDK's own types. Usage: LLMAPI_BASE_URL=http://HOST:PORT/v1
LLMAPI_API_KEY=KEY LLMAPI_MODEL=NAME python3 test_openai_sdk.py
"""

import json
import os
import sys

import json
from typing import Literal

import openai
from pydantic import BaseModel, Field

BASE = os.environ["LLMAPI_BASE_URL"]
KEY = os.environ.get("LLMAPI_API_KEY", "unused")
MODEL = os.environ.get("LLMAPI_MODEL", "demo")
# A trained model (SmolLM2): free text must be non-empty, and the demo model's nudges are off.
REAL = os.environ.get("LLMAPI_REAL_MODEL") == "1"

client = openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=60)
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1


# /v1/models
models = client.models.list()
check(any(m.id == MODEL for m in models.data), "models lists the served model")

# Completions: every prompt form.
for prompt, n_prompts in [("Hello", 1), (["a", "b"], 2), ([5, 6, 7], 1), ([[5, 6], [7, 8]], 2)]:
    # ignore_eos: the demo model's random weights leave near-ties that batching can tip
    # towards an end-of-sequence token within 3 tokens; the count is what is checked here.
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, extra_body={"ignore_eos": True}
    )
    check(r.object == "text_completion", f"completion object for {prompt!r}")
    check(len(r.choices) == n_prompts, f"one choice per prompt for {prompt!r}")
    check(
        r.usage.completion_tokens == 3 * n_prompts,
        f"usage counts completion tokens for {prompt!r}: {r.usage.completion_tokens}, "
        f"finish reasons {[c.finish_reason for c in r.choices]}",
    )
    check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "total")
    check(r.usage.prompt_tokens_details.cached_tokens >= 0, "cached_tokens present")

# Completions: sampling, stopping and output options.
r = client.completions.create(
    model=MODEL,
    prompt="The weather today",
    max_tokens=5,
    temperature=0.7,
    top_p=0.9,
    n=2,
    seed=7,
    presence_penalty=0.5,
    frequency_penalty=0.5,
    stop=["\n\n", "###"],
    logprobs=2,
    echo=True,
    user="sdk-test",
    extra_body={
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "ignore_eos": True,
        "min_tokens": 1,
        "stop_token_ids": [3],
    },
)
check(len(r.choices) == 2, "n=2 gives two choices")
for c in r.choices:
    check(c.text.startswith("The weather today"), "echo prepends the prompt")
    check(c.finish_reason in ("stop", "length"), "finish_reason")
    check(c.logprobs is not None and len(c.logprobs.tokens) >= 1, "logprobs tokens")
    check(all(t is None or len(t) <= 2 for t in c.logprobs.top_logprobs), "top_logprobs has at most 2")
    # Echo with logprobs: the prompt's tokens come first, the first one without a logprob.
    lp = c.logprobs
    n_prompt = r.usage.prompt_tokens
    check(len(lp.tokens) > n_prompt, "echo logprobs cover the prompt and the completion")
    check(lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, "first prompt token has no logprob")
    check(all(x <= 0.0 for x in lp.token_logprobs[1:]), "prompt and completion logprobs are numbers")
    check(all(t is not None for t in lp.top_logprobs[1:]), "top_logprobs for every later token")
    check(lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset), "offsets from the start")
    check("".join(lp.tokens[:n_prompt]) == "The weather today", "prompt tokens spell the prompt")
    check(len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset), "lengths")

# Seeded sampling is reproducible; greedy is deterministic.
a = client.completions.create(model=MODEL, prompt="Seeded", max_tokens=8, temperature=1.0, seed=42)
b = client.completions.create(model=MODEL, prompt="Seeded", max_tokens=8, temperature=1.0, seed=42)
check(a.choices[0].text == b.choices[0].text, "same seed, same text")

# Completions streaming with usage.
stream = client.completions.create(
    model=MODEL, prompt="Stream me", max_tokens=6, stream=True, stream_options={"include_usage": True}
)
chunks = list(stream)
text = "".join(c.choices[0].text for c in chunks if c.choices)
check(any(c.choices and c.choices[0].finish_reason == "length" for c in chunks), "stream finish")
check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6, "stream usage")
check(isinstance(text, str), "stream text")

# Streamed echo with logprobs: the first chunk is the prompt with its tokens' logprobs.
stream = client.completions.create(
    model=MODEL, prompt="Echo me", max_tokens=3, echo=True, logprobs=1, stream=True,
    stream_options={"include_usage": True},
)
chunks = list(stream)
first = chunks[0].choices[0]
check(first.text == "Echo me", "streamed echo comes first")
check(first.logprobs.token_logprobs[0] is None, "streamed echo: first prompt token has no logprob")
check(len(first.logprobs.tokens) == chunks[-1].usage.prompt_tokens, "streamed echo covers the prompt")
gen = [c.choices[0] for c in chunks[1:] if c.choices and c.choices[0].text]
check(all(g.logprobs.text_offset[0] >= len("Echo me") for g in gen), "generated offsets follow the echo")

# Chat: plain, multi-part content, logprobs, n, stop, max_completion_tokens.
messages = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "text", "text": "Say hi"}]},
]
r = client.chat.completions.create(
    model=MODEL,
    messages=messages,
    max_completion_tokens=5,
    temperature=0,
    logprobs=True,
    top_logprobs=2,
    n=2,
    stop="\n\n",
    seed=1,
)
check(r.object == "chat.completion", "chat object")
check(len(r.choices) == 2, "chat n=2")
check(r.choices[0].message.role == "assistant", "assistant role")
check(r.choices[0].logprobs.content[0].top_logprobs is not None, "chat top_logprobs")
check(r.usage.prompt_tokens > 0, "chat usage")
r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
check(r.choices[0].finish_reason in ("stop", "length"), "chat with max_tokens")
if REAL:
    check(bool((r.choices[0].message.content or "").strip()), "a trained model answers in text")

# Chat with a pre-tokenized prompt (trtllm-serve's prompt_token_ids extension).
r = client.chat.completions.create(
    model=MODEL, messages=[], max_tokens=3, extra_body={"prompt_token_ids": [5, 6, 7, 8]}
)
check(r.usage.prompt_tokens == 4, "chat prompt_token_ids are the whole prompt")
check(r.choices[0].message.role == "assistant", "chat prompt_token_ids answer parses")

# Chat streaming.
stream = client.chat.completions.create(
    model=MODEL, messages=messages, max_tokens=6, stream=True, stream_options={"include_usage": True}
)
chunks = list(stream)
check(chunks[0].choices[0].delta.role == "assistant", "first delta carries the role")
check(chunks[-1].usage is not None, "chat stream usage chunk")
check(any(c.choices and c.choices[0].finish_reason for c in chunks), "chat stream finish")

# logit_bias: +100 on one token makes every generated token that one, greedy and sampled.
for temperature in (0, 1):
    r = client.completions.create(
        model=MODEL, prompt=[300], max_tokens=4, temperature=temperature, echo=True, logprobs=0,
        logit_bias={"300": 100},
    )
    toks = r.choices[0].logprobs.tokens
    check(len(toks) == 5 and all(t == toks[0] for t in toks), f"logit_bias forces its token at T={temperature}")
try:
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, logit_bias={"x": 1})
    check(False, "a logit_bias key that is not a token id raises")
except openai.BadRequestError as e:
    check(e.param == "logit_bias", "400 naming logit_bias")

# Structured outputs: parse() sends the pydantic model's JSON schema as response_format, and
# every output parses into the model, greedy and sampled (bounded fields keep it short).
class Thing(BaseModel):
    name: str = Field(max_length=8)
    color: Literal["red", "green", "blue"]
    count: int = Field(ge=0, le=999)


# parse() left the beta namespace in later 1.x releases; requirements.txt allows both.
parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
for temperature in (0, 1):
    r = parse(
        model=MODEL, messages=messages, max_tokens=64, temperature=temperature, seed=3,
        response_format=Thing,
    )
    thing = r.choices[0].message.parsed
    check(isinstance(thing, Thing), f"parse() fills the pydantic model at T={temperature}")
# The demo model never closes a free string on its own: a bias towards `"` (id 6) and `}` (id
# 97) lets the object end within max_tokens; the grammar still decides what is valid. A
# trained model closes it unaided when asked for a short object.
json_ask = [{"role": "user", "content": 'Reply with a JSON object: {"greeting": "<one word>"}'}]
nudge = {"messages": json_ask, "temperature": 0} if REAL else {"messages": messages, "logit_bias": {"6": 8, "97": 8}}
r = client.chat.completions.create(
    model=MODEL, max_tokens=64, response_format={"type": "json_object"}, **nudge
)
check(isinstance(json.loads(r.choices[0].message.content), dict), "json_object output is an object")
r = client.chat.completions.create(
    model=MODEL, messages=messages, max_tokens=8, extra_body={"guided_choice": ["yes", "no"]}
)
check(r.choices[0].message.content in ("yes", "no"), "guided_choice picks a choice")
try:
    client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, extra_body={"guided_regex": "(unclosed"}
    )
    check(False, "an invalid regex raises")
except openai.BadRequestError as e:
    check(e.param == "guided_regex", "400 naming guided_regex")

# best_of: of best_of sampled choices, the n best come back; it cannot be streamed above n.
r = client.completions.create(model=MODEL, prompt="Best", max_tokens=4, n=2, best_of=3, temperature=1, seed=5)
check([c.index for c in r.choices] == [0, 1], "best_of returns n choices")
try:
    list(client.completions.create(model=MODEL, prompt="Best", max_tokens=2, best_of=2, stream=True))
    check(False, "streaming best_of above n raises")
except openai.BadRequestError as e:
    check(e.param == "best_of", "400 naming best_of")

# The model may be named by its path, too.
r = client.completions.create(model=os.environ.get("LLMAPI_MODEL_PATH", MODEL), prompt="x", max_tokens=1)
check(len(r.choices) == 1, "model path accepted")

# Errors surface as the SDK's typed exceptions.
try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    check(False, "unknown model raises")
except openai.NotFoundError as e:
    check(e.status_code == 404, "404 for unknown model")
try:
    client.completions.create(model=MODEL, prompt="", max_tokens=1)
    check(False, "empty prompt raises")
except openai.BadRequestError as e:
    check(e.status_code == 400, "400 for empty prompt")
try:
    client.chat.completions.create(model=MODEL, messages=messages, temperature=9)
    check(False, "bad temperature raises")
except openai.BadRequestError as e:
    check("temperature" in str(e), "error names the field")
# Tools default to tool_choice "auto", which needs --tool_parser (this server has none).
try:
    client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=3,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    )
    check(False, "tools without a tool parser raise")
except openai.BadRequestError as e:
    check(e.param == "tool_choice" and "--tool_parser" in str(e), "400 naming tool_choice and the flag")
# Fields the server does not implement are refused by name, never silently dropped.
try:
    client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body={"frobnicate": 1})
    check(False, "an unknown field raises")
except openai.BadRequestError as e:
    check(e.param == "frobnicate", "400 naming the unknown field")
r = client.chat.completions.create(
    model=MODEL, messages=messages, max_tokens=3, response_format={"type": "text"}, tool_choice="none"
)
check(len(r.choices) == 1, "fields that ask for nothing are accepted")

# Tool calling: a named tool, its result sent back with role "tool", a streamed call put
# together from its deltas, and "required". The demo model's random weights write valid
# arguments only because the worker holds its output to the schema (guided decoding): the
# arguments are checked against it with jsonschema.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            # Bounded so that the random demo model's string ends within max_tokens.
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
ask = [{"role": "user", "content": "What is the weather in Oslo?"}]


def check_arguments(text, what):
    import jsonschema

    jsonschema.validate(json.loads(text), WEATHER["function"]["parameters"])
    check(True, what)


r = client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], tool_choice=NAMED, max_tokens=48)
call = (r.choices[0].message.tool_calls or [None])[0]
check(len(r.choices[0].message.tool_calls or []) == 1, "a named tool choice returns one call")
check(call.type == "function" and call.function.name == "get_weather", "the call names the function")
check(call.id.startswith("call_"), "the call has an id")
check_arguments(call.function.arguments, "named call arguments follow the schema")
arguments = call.function.arguments
answered = ask + [
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}],
    },
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": -3})},
]
r2 = client.chat.completions.create(model=MODEL, messages=answered, tools=[WEATHER], tool_choice="none", max_tokens=4)
check(r2.choices[0].message.tool_calls is None, "tool_choice none answers in text")
check(r2.usage.prompt_tokens > r.usage.prompt_tokens, "the call and its result reach the prompt")
streamed = {}
for chunk in client.chat.completions.create(
    model=MODEL, messages=ask, tools=[WEATHER], tool_choice=NAMED, max_tokens=48, stream=True
):
    for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
        c = streamed.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
        c["arguments"] += d.function.arguments or ""
check(list(streamed) == [0], "one streamed call")
check(streamed[0]["name"] == "get_weather" and streamed[0]["id"].startswith("call_"), "streamed call header")
check_arguments(streamed[0]["arguments"], "streamed call arguments follow the schema")
r = client.chat.completions.create(
    model=MODEL, messages=ask, tools=[WEATHER], tool_choice="required", max_tokens=64, parallel_tool_calls=False
)
check(r.choices[0].message.role == "assistant", "required answers")
calls = r.choices[0].message.tool_calls or []
check(len(calls) == 1 and calls[0].function.name == "get_weather", "required makes one call")
check_arguments(calls[0].function.arguments, "required call arguments follow the schema")
try:
    client.chat.completions.create(
        model=MODEL, messages=ask, tools=[WEATHER], max_tokens=1,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    check(False, "a named tool that is not in tools raises")
except openai.BadRequestError as e:
    check(e.param == "tool_choice", "400 naming tool_choice")

# Responses API: plain, streamed, and a follow-up continuing the stored conversation.
resp = client.responses.create(
    model=MODEL, input="Hello", instructions="Answer briefly.", max_output_tokens=4, metadata={"run": "sdk"}
)
check(resp.object == "response" and resp.id.startswith("resp_"), "a response object")
check(resp.status in ("completed", "incomplete"), f"response status {resp.status}")
check(resp.output[-1].type == "message" and resp.output[-1].role == "assistant", "a message item")
check(resp.output[-1].content[0].type == "output_text", "output_text content")
check(isinstance(resp.output_text, str), "the SDK joins the output text")
if REAL:
    check(bool(resp.output_text.strip()), "a trained model's response has text")
check(0 < resp.usage.output_tokens <= 4, f"usage.output_tokens {resp.usage.output_tokens}")
check(resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens, "response usage total")
check(resp.metadata == {"run": "sdk"}, "metadata echoed")
kinds, text, completed = [], "", None
for event in client.responses.create(model=MODEL, input="Hello", max_output_tokens=4, stream=True):
    kinds.append(event.type)
    if event.type == "response.output_text.delta":
        text += event.delta
    if event.type in ("response.completed", "response.incomplete"):
        completed = event.response
check(kinds[:2] == ["response.created", "response.in_progress"], f"stream opens: {kinds[:2]}")
check(kinds[-1] in ("response.completed", "response.incomplete"), f"stream closes: {kinds[-1]}")
check(completed is not None and completed.output_text == text, "streamed deltas make the final text")
follow = client.responses.create(model=MODEL, input="And then?", previous_response_id=resp.id, max_output_tokens=4)
check(follow.previous_response_id == resp.id, "previous_response_id echoed")
alone = client.responses.create(model=MODEL, input="And then?", max_output_tokens=4)
check(follow.usage.input_tokens > alone.usage.input_tokens, "the follow-up's prompt holds the first exchange")
check(client.responses.retrieve(resp.id).id == resp.id, "a stored response is retrieved")
client.responses.delete(resp.id)
try:
    client.responses.retrieve(resp.id)
    check(False, "a deleted response is gone")
except openai.NotFoundError:
    check(True, "404 for a deleted response")

if REAL:
    # Answers a small instruct model gets right, through the SDK's own parsing.
    france = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=MODEL, messages=france, max_tokens=24, temperature=0)
    check("Paris" in r.choices[0].message.content, f"the capital of France: {r.choices[0].message.content!r}")
    check(r.choices[0].finish_reason == "stop", "the answer ends on the end-of-turn token")

    class Capital(BaseModel):
        country: str = Field(max_length=16)
        capital: str = Field(max_length=16)

    ask_json = [{"role": "user", "content": "What is the capital of France? Answer in JSON with the keys country and capital."}]
    r = parse(model=MODEL, messages=ask_json, max_tokens=48, temperature=0, response_format=Capital)
    parsed = r.choices[0].message.parsed
    check(isinstance(parsed, Capital) and "Paris" in parsed.capital, f"parse() holds the right answer: {parsed!r}")
    r = client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], tool_choice=NAMED, max_tokens=48, temperature=0)
    city = json.loads(r.choices[0].message.tool_calls[0].function.arguments)["city"]
    check("Oslo" in city, f"the named call's argument comes from the question: {city!r}")
    resp = client.responses.create(model=MODEL, input="What is the capital of France?", max_output_tokens=24, temperature=0)
    check("Paris" in resp.output_text, f"the Responses API answers: {resp.output_text!r}")

if KEY != "unused":
    bad = openai.OpenAI(base_url=BASE, api_key="wrong", max_retries=0)
    try:
        bad.models.list()
        check(False, "wrong key raises")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, "401 for a wrong key")

print(f"ok: {checks} checks with openai {openai.__version__}")
