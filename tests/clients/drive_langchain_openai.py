"""Drives AEX with langchain-openai's ChatOpenAI, unchanged; prints JSON.
With a custom base_url, ChatOpenAI streams without stream_options, so the
provider's usage only exists because AEX asked for it upstream.
Usage: drive_langchain_openai.py BASE_URL (tokens in AEX_TOKEN_*)."""
import json, os, sys
import openai
from langchain_openai import ChatOpenAI
import aex_probe

base = sys.argv[1]
tok = lambda name: os.environ["AEX_TOKEN_" + name]
llm = ChatOpenAI(base_url=base, api_key=tok("OK"), model="mock-model")
out = {}
msg = llm.invoke("hi")
out["invoke"] = {"content": msg.content, "usage": msg.usage_metadata and [msg.usage_metadata["input_tokens"], msg.usage_metadata["output_tokens"]]}
text, usage = "", None
for chunk in llm.stream("hi"):
    text += chunk.content
    if chunk.usage_metadata:
        usage = chunk.usage_metadata
out["stream"] = {"text": text, "client_saw_usage": usage is not None}

# Denials come through LangChain as the OpenAI SDK's errors.
for status, name in (("402", "POOR"), ("403", "FENCED"), ("401", "BAD")):
    try:
        ChatOpenAI(base_url=base, api_key=tok(name), model="mock-model").invoke("hi")
        out[status] = {"error": None}
    except openai.APIStatusError as err:
        out[status] = {"error": type(err).__name__, "status": err.status_code, "code": err.code}

burned = aex_probe.use_up_burst(base, tok("SLOW"))
seen = aex_probe.Attempts()
ChatOpenAI(base_url=base, api_key=tok("SLOW"), model="sim", http_client=seen.sync_client()).invoke("x")
out["429"] = seen.report(burned)
print(json.dumps(out))
