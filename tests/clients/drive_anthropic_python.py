"""Drives AEX with the official Anthropic Python SDK, unchanged; prints what
it saw as JSON. Usage: drive_anthropic_python.py BASE_URL (AEX's address,
without /v1, as the SDK takes Anthropic's; tokens in AEX_TOKEN_*)."""
import json, os, sys
import anthropic
import aex_probe

base = sys.argv[1]
tok = lambda name: os.environ["AEX_TOKEN_" + name]
client = lambda name, **kw: anthropic.Anthropic(base_url=base, api_key=tok(name), **kw)
out = {"version": anthropic.__version__}
hi = [{"role": "user", "content": "hi"}]
usage_of = lambda u: [u.input_tokens, u.output_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens]

c = client("OK")
m = c.messages.create(model="claude-model", max_tokens=50, messages=hi,
                      extra_headers={"x-mock-cached": "80,20"})
out["message"] = {"text": m.content[0].text, "usage": usage_of(m.usage), "stop_reason": m.stop_reason}

with c.messages.stream(model="claude-model", max_tokens=50, messages=hi) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
out["stream"] = {"text": text, "usage": usage_of(final.usage), "stop_reason": final.stop_reason}

# A tool round trip: the model asks for the tool, the client answers it.
tools = [{"name": "weather", "description": "The weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
ask = [{"role": "user", "content": "use_tool:weather"}]
r = c.messages.create(model="claude-model", max_tokens=50, messages=ask, tools=tools)
use = next(b for b in r.content if b.type == "tool_use")
r2 = c.messages.create(model="claude-model", max_tokens=50, tools=tools, messages=ask + [
    {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                  "content": f"sunny in {use.input['city']}"}]}])
out["tools"] = {"called": use.name, "stop_reason": r.stop_reason, "answer": r2.content[0].text}
with c.messages.stream(model="claude-model", max_tokens=50, messages=ask, tools=tools) as s:
    final = s.get_final_message()
out["tools_stream"] = {"name": final.content[0].name, "input": final.content[0].input}

counted = c.messages.count_tokens(model="claude-model", messages=hi, extra_headers={"x-mock-usage": "42,0"})
out["count"] = counted.input_tokens
out["models"] = sorted(m.id for m in c.models.list())
out["retrieved"] = c.models.retrieve("claude-model").id


def error_of(name):
    try:
        client(name).messages.create(model="claude-model", max_tokens=50, messages=hi)
        return {"error": None}
    except anthropic.APIStatusError as err:
        return {"error": type(err).__name__, "status": err.status_code, "type": err.body["error"]["type"]}


out["402"] = error_of("POOR")
out["403"] = error_of("FENCED")
out["401"] = error_of("BAD")

# 429: the SDK's call right after the burst is used up is refused; it must
# wait exactly what AEX said and succeed.
burned = aex_probe.use_up_burst(base + "/v1", tok("SLOW"))
seen = aex_probe.Attempts()
slow = anthropic.Anthropic(base_url=base, api_key=tok("SLOW"), http_client=seen.sync_client())
slow.messages.create(model="sim", max_tokens=10, messages=[{"role": "user", "content": "x"}])
out["429"] = seen.report(burned)
print(json.dumps(out))
