"""Drives AEX with the official OpenAI Python SDK, unchanged; prints what it
saw as JSON. Usage: drive_openai_python.py BASE_URL (tokens in AEX_TOKEN_*)."""
import json, os, sys, time
import openai

base = sys.argv[1]
tok = lambda name: os.environ["AEX_TOKEN_" + name]
client = lambda name: openai.OpenAI(base_url=base, api_key=tok(name))
out = {"version": openai.__version__}

c = client("OK")
r = c.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "hi"}])
out["chat"] = {"content": r.choices[0].message.content, "usage": [r.usage.prompt_tokens, r.usage.completion_tokens]}

usage = None
text = ""
for chunk in c.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "hi"}],
                                       stream=True, stream_options={"include_usage": True}):
    if chunk.usage:
        usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens]
    for ch in chunk.choices:
        text += ch.delta.content or ""
out["stream"] = {"text": text, "usage": usage}

r = c.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "weather?"}],
                              tools=[{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}])
out["tools"] = {"finish_reason": r.choices[0].finish_reason}

r = c.responses.create(model="mock-model", input="hi")
out["responses"] = {"text": r.output_text, "usage": [r.usage.input_tokens, r.usage.output_tokens]}
kinds = [e.type for e in c.responses.create(model="mock-model", input="hi", stream=True)]
out["responses_stream"] = {"last": kinds[-1], "deltas": kinds.count("response.output_text.delta")}

e = c.embeddings.create(model="mock-model", input="hello")
out["embeddings"] = {"vector": [round(x, 3) for x in e.data[0].embedding], "usage": e.usage.prompt_tokens}
out["models"] = sorted(m.id for m in c.models.list())

def error_of(name, **kw):
    started = time.monotonic()
    try:
        client(name).chat.completions.create(model=kw.get("model", "mock-model"), messages=[{"role": "user", "content": "hi"}])
        return {"error": None, "seconds": time.monotonic() - started}
    except openai.APIStatusError as err:
        return {"error": type(err).__name__, "status": err.status_code, "code": err.code,
                "seconds": time.monotonic() - started}

out["402"] = error_of("POOR")
out["403"] = error_of("FENCED")
out["401"] = error_of("BAD")
# 30 RPM: 30 quick calls use the burst; the next gets 429 with Retry-After
# about 2 s, and the SDK retries after exactly that and succeeds.
for _ in range(30):
    client("SLOW").chat.completions.create(model="sim", messages=[{"role": "user", "content": "x"}])
out["429"] = error_of("SLOW", model="sim")
print(json.dumps(out))
