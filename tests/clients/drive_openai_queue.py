"""Eight concurrent streams of about 2 s each through an agent allowed two
calls at once (issue #33): the official OpenAI Python SDK, unchanged, its
default retries. Prints each call's outcome as JSON.
Usage: drive_openai_queue.py BASE_URL (the agent's token in AEX_TOKEN_NARROW)."""
import json, os, sys, threading, time
import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key=os.environ["AEX_TOKEN_NARROW"])
results = [None] * 8


def call(i):
    started = time.monotonic()
    try:
        text = ""
        # Nine events 250 ms apart: about 2.2 s.
        for chunk in client.chat.completions.create(
                model="mock-model", messages=[{"role": "user", "content": f"call {i}"}], stream=True,
                extra_headers={"x-mock-delay-ms": "250"}):
            for choice in chunk.choices:
                text += choice.delta.content or ""
        results[i] = {"ok": True, "text": text}
    except openai.APIStatusError as e:
        results[i] = {"ok": False, "status": e.status_code, "message": str(e)}
    results[i]["seconds"] = round(time.monotonic() - started, 2)


threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(results))
