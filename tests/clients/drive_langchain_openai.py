"""Drives AEX with langchain-openai's ChatOpenAI, unchanged; prints JSON.
With a custom base_url, ChatOpenAI streams without stream_options, so the
provider's usage only exists because AEX asked for it upstream.
Usage: drive_langchain_openai.py BASE_URL (token in AEX_TOKEN_OK)."""
import json, os, sys
from langchain_openai import ChatOpenAI

llm = ChatOpenAI(base_url=sys.argv[1], api_key=os.environ["AEX_TOKEN_OK"], model="mock-model", max_retries=0)
out = {}
msg = llm.invoke("hi")
out["invoke"] = {"content": msg.content, "usage": msg.usage_metadata and [msg.usage_metadata["input_tokens"], msg.usage_metadata["output_tokens"]]}
text, usage = "", None
for chunk in llm.stream("hi"):
    text += chunk.content
    if chunk.usage_metadata:
        usage = chunk.usage_metadata
out["stream"] = {"text": text, "client_saw_usage": usage is not None}
print(json.dumps(out))
