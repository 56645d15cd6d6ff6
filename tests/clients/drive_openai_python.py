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

# 429: first use up SLOW's burst with retries off, until AEX refuses one (a
# count of calls would race the refill on a slow machine). The SDK's own call
# right after is refused too; it must wait exactly what AEX said and succeed.
probe = openai.OpenAI(base_url=base, api_key=tok("SLOW"), max_retries=0)
burned = 0
for _ in range(200):
    try:
        probe.chat.completions.create(model="sim", messages=[{"role": "user", "content": "x"}])
        burned += 1
    except openai.RateLimitError:
        break
attempts = []
hooks = {
    "request": [lambda req: attempts.append({"sent": time.monotonic()})],
    "response": [lambda resp: attempts[-1].update(
        status=resp.status_code, answered=time.monotonic(),
        retry_after_ms=resp.headers.get("retry-after-ms"), retry_after=resp.headers.get("retry-after"))],
}
slow = openai.OpenAI(base_url=base, api_key=tok("SLOW"), http_client=openai.DefaultHttpxClient(event_hooks=hooks))
slow.chat.completions.create(model="sim", messages=[{"role": "user", "content": "x"}])
out["429"] = {
    "burned": burned,
    "statuses": [a.get("status") for a in attempts],
    "retry_after_ms": [a.get("retry_after_ms") for a in attempts],
    "retry_after": [a.get("retry_after") for a in attempts],
    # How long the SDK waited between the 429 and its retry.
    "waited_ms": [round((b["sent"] - a["answered"]) * 1000) for a, b in zip(attempts, attempts[1:])],
}
print(json.dumps(out))
