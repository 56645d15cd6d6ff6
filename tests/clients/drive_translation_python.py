"""Drives AEX across the two APIs with the official SDKs, unchanged: the
Anthropic SDK on a model whose provider speaks OpenAI's API (mock-model),
and the OpenAI SDK on one whose provider speaks Anthropic's (claude-model).
Prints what they saw as JSON. Usage: drive_translation_python.py HOST
(AEX's address without /v1; the token in AEX_TOKEN_OK)."""
import json, os, sys
import anthropic, openai

host = sys.argv[1]
token = os.environ["AEX_TOKEN_OK"]
out = {}
hi = [{"role": "user", "content": "hi"}]
ask = [{"role": "user", "content": "use_tool:weather"}]
schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

a = anthropic.Anthropic(base_url=host, api_key=token)
m = a.messages.create(model="mock-model", max_tokens=50, messages=hi)
out["anthropic_message"] = {"text": m.content[0].text, "stop_reason": m.stop_reason,
                            "usage": [m.usage.input_tokens, m.usage.output_tokens]}
with a.messages.stream(model="mock-model", max_tokens=50, messages=hi) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
out["anthropic_stream"] = {"text": text, "usage": [final.usage.input_tokens, final.usage.output_tokens]}
tools = [{"name": "weather", "description": "The weather in a city", "input_schema": schema}]
with a.messages.stream(model="mock-model", max_tokens=50, messages=ask, tools=tools) as s:
    first = s.get_final_message()
use = next(b for b in first.content if b.type == "tool_use")
with a.messages.stream(model="mock-model", max_tokens=50, tools=tools, messages=ask + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": f"sunny in {use.input['city']}"}]}]) as s:
    answer = "".join(s.text_stream)
out["anthropic_tools"] = {"called": use.name, "input": use.input, "stop_reason": first.stop_reason,
                          "answer": answer}

o = openai.OpenAI(base_url=host + "/v1", api_key=token)
r = o.chat.completions.create(model="claude-model", messages=hi)
out["openai_chat"] = {"text": r.choices[0].message.content, "model": r.model,
                      "usage": [r.usage.prompt_tokens, r.usage.completion_tokens]}
usage, text = None, ""
for chunk in o.chat.completions.create(model="claude-model", messages=hi, stream=True,
                                       stream_options={"include_usage": True}):
    if chunk.usage:
        usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens]
    for ch in chunk.choices:
        text += ch.delta.content or ""
out["openai_stream"] = {"text": text, "usage": usage}
functions = [{"type": "function", "function": {"name": "weather", "parameters": schema}}]
# The tool call streamed, put together by the SDK's own stream helper.
with o.chat.completions.stream(model="claude-model", messages=ask, tools=functions) as s:
    first = s.get_final_completion()
call = first.choices[0].message.tool_calls[0]
r = o.chat.completions.create(model="claude-model", tools=functions, messages=ask + [
    first.choices[0].message.model_dump(exclude_none=True, exclude={"parsed"}),
    {"role": "tool", "tool_call_id": call.id, "content": f"sunny in {json.loads(call.function.arguments)['city']}"}])
out["openai_tools"] = {"called": call.function.name, "arguments": json.loads(call.function.arguments),
                       "finish_reason": first.choices[0].finish_reason,
                       "answer": r.choices[0].message.content}
print(json.dumps(out))
