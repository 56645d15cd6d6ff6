"""Drives AEX with OpenAI Agents (Python) on its default path, the Responses
API, with a function tool; prints what it saw as JSON.
Usage: drive_openai_agents.py BASE_URL (tokens in AEX_TOKEN_*)."""
import asyncio, json, os, sys
import openai
from agents import Agent, Runner, function_tool, set_default_openai_client, set_tracing_disabled
from agents import __version__ as agents_version
import aex_probe

base = sys.argv[1]
tok = lambda name: os.environ["AEX_TOKEN_" + name]
# Nothing leaves for OpenAI's trace backend.
set_tracing_disabled(True)


@function_tool
def weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def agent_for(name, model="mock-model", **client_options):
    client = openai.AsyncOpenAI(base_url=base, api_key=tok(name), **client_options)
    set_default_openai_client(client, use_for_tracing=False)
    return Agent(name="forecaster", instructions="Answer with the tool's words.", model=model, tools=[weather])


async def main():
    out = {"version": agents_version}
    result = await Runner.run(agent_for("OK"), "use_tool:weather")
    usage = result.context_wrapper.usage
    out["run"] = {"final": result.final_output, "requests": usage.requests,
                  "usage": [usage.input_tokens, usage.output_tokens],
                  "items": [item.type for item in result.new_items]}

    streamed = Runner.run_streamed(agent_for("OK"), "use_tool:weather")
    kinds = []
    async for event in streamed.stream_events():
        if event.type == "raw_response_event":
            kinds.append(event.data.type)
    usage = streamed.context_wrapper.usage
    out["streamed"] = {"final": streamed.final_output, "requests": usage.requests,
                       "usage": [usage.input_tokens, usage.output_tokens],
                       "completed": kinds.count("response.completed")}

    for status, name in (("402", "POOR"), ("403", "FENCED"), ("401", "BAD")):
        try:
            await Runner.run(agent_for(name), "hi")
            out[status] = {"error": None}
        except openai.APIStatusError as err:
            out[status] = {"error": type(err).__name__, "status": err.status_code, "code": err.code}

    burned = aex_probe.use_up_burst(base, tok("SLOW"))
    seen = aex_probe.Attempts()
    await Runner.run(agent_for("SLOW", model="sim", http_client=seen.async_client()), "hi")
    out["429"] = seen.report(burned)
    print(json.dumps(out))


asyncio.run(main())
