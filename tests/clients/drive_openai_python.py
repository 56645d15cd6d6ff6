"""Drives AEX with the official OpenAI Python SDK, unchanged; prints what it
saw as JSON. Usage: drive_openai_python.py BASE_URL (tokens in AEX_TOKEN_*)."""
import json, os, sys
import openai
import aex_probe

base = sys.argv[1]
tok = lambda name: os.environ["AEX_TOKEN_" + name]
client = lambda name: openai.OpenAI(base_url=base, api_key=tok(name))
out = {"version": openai.__version__}

c = client("OK")
r = c.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "hi"}])
out["chat"] = {"content": r.choices[0].message.content, "usage": [r.usage.prompt_tokens, r.usage.completion_tokens],
               "model": r.model}

usage = None
text = ""
models = set()
for chunk in c.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "hi"}],
                                       stream=True, stream_options={"include_usage": True}):
    models.add(chunk.model)
    if chunk.usage:
        usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens]
    for ch in chunk.choices:
        text += ch.delta.content or ""
out["stream"] = {"text": text, "usage": usage, "models": sorted(models)}

# A tool round trip: the model asks for the tool, the client answers it.
tools = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ask = [{"role": "user", "content": "use_tool:weather"}]
r = c.chat.completions.create(model="mock-model", messages=ask, tools=tools)
call = r.choices[0].message.tool_calls[0]
city = json.loads(call.function.arguments)["city"]
r = c.chat.completions.create(model="mock-model", tools=tools, messages=ask + [
    r.choices[0].message.model_dump(exclude_none=True),
    {"role": "tool", "tool_call_id": call.id, "content": f"sunny in {city}"}])
out["tools"] = {"called": call.function.name, "answer": r.choices[0].message.content}

r = c.responses.create(model="mock-model", input="hi")
out["responses"] = {"text": r.output_text, "usage": [r.usage.input_tokens, r.usage.output_tokens],
                    "model": r.model}
kinds, final = [], None
for e in c.responses.create(model="mock-model", input="hi", stream=True):
    kinds.append(e.type)
    if e.type == "response.completed":
        final = e.response
out["responses_stream"] = {"last": kinds[-1], "deltas": kinds.count("response.output_text.delta"),
                           "text": final.output_text, "usage": [final.usage.input_tokens, final.usage.output_tokens],
                           "model": final.model}

e = c.embeddings.create(model="mock-model", input="hello")
out["embeddings"] = {"vector": [round(x, 3) for x in e.data[0].embedding], "usage": e.usage.prompt_tokens,
                     "model": e.model}
out["models"] = sorted(m.id for m in c.models.list())
out["retrieved"] = c.models.retrieve("mock-model").id
try:
    client("FENCED").models.retrieve("mock-model")
    out["retrieve_fenced"] = None
except openai.NotFoundError as err:
    out["retrieve_fenced"] = err.code

def error_of(name):
    try:
        client(name).chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "hi"}])
        return {"error": None}
    except openai.APIStatusError as err:
        return {"error": type(err).__name__, "status": err.status_code, "code": err.code}

out["402"] = error_of("POOR")
out["403"] = error_of("FENCED")
out["401"] = error_of("BAD")

# 429: the SDK's call right after the burst is used up is refused; it must
# wait exactly what AEX said and succeed.
burned = aex_probe.use_up_burst(base, tok("SLOW"))
seen = aex_probe.Attempts()
slow = openai.OpenAI(base_url=base, api_key=tok("SLOW"), http_client=seen.sync_client())
slow.chat.completions.create(model="sim", messages=[{"role": "user", "content": "x"}])
out["429"] = seen.report(burned)
print(json.dumps(out))
