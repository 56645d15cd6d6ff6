// Drives AEX with the official OpenAI npm SDK (v7), unchanged; prints what it
// saw as JSON. Usage: node drive_openai_node.mjs BASE_URL NODE_MODULES_DIR
// (tokens in AEX_TOKEN_*).
import { createRequire } from "node:module";

const [base, modules] = process.argv.slice(2);
const require = createRequire(modules + "/");
const { default: OpenAI } = require("openai");
const tok = (name) => process.env["AEX_TOKEN_" + name];
const client = (name, options = {}) => new OpenAI({ baseURL: base, apiKey: tok(name), ...options });
const { VERSION } = require("openai/version");
const out = { version: VERSION };
const hi = [{ role: "user", content: "hi" }];

const c = client("OK");
let r = await c.chat.completions.create({ model: "mock-model", messages: hi });
out.chat = { content: r.choices[0].message.content, usage: [r.usage.prompt_tokens, r.usage.completion_tokens] };

let text = "";
let usage = null;
const stream = await c.chat.completions.create({
  model: "mock-model", messages: hi, stream: true, stream_options: { include_usage: true },
});
for await (const chunk of stream) {
  if (chunk.usage) usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens];
  for (const choice of chunk.choices) text += choice.delta.content ?? "";
}
out.stream = { text, usage };

// A tool round trip: the model asks for the tool, the client answers it.
const tools = [{ type: "function", function: { name: "weather",
  parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] } } }];
const ask = [{ role: "user", content: "use_tool:weather" }];
r = await c.chat.completions.create({ model: "mock-model", messages: ask, tools });
const call = r.choices[0].message.tool_calls[0];
r = await c.chat.completions.create({
  model: "mock-model", tools,
  messages: [...ask, r.choices[0].message,
    { role: "tool", tool_call_id: call.id, content: `sunny in ${JSON.parse(call.function.arguments).city}` }],
});
out.tools = { called: call.function.name, answer: r.choices[0].message.content };

r = await c.responses.create({ model: "mock-model", input: "hi" });
out.responses = { text: r.output_text, usage: [r.usage.input_tokens, r.usage.output_tokens] };
const events = [];
let final = null;
for await (const e of await c.responses.create({ model: "mock-model", input: "hi", stream: true })) {
  events.push(e.type);
  if (e.type === "response.completed") final = e.response;
}
out.responses_stream = { last: events.at(-1), deltas: events.filter((t) => t === "response.output_text.delta").length,
  // Streamed events carry the raw response: no output_text helper there.
  text: final?.output.flatMap((item) => item.content ?? []).map((part) => part.text).join("") ?? null,
  usage: final ? [final.usage.input_tokens, final.usage.output_tokens] : null };

async function errorOf(name, model = "mock-model") {
  try {
    await client(name).chat.completions.create({ model, messages: hi });
    return { error: null };
  } catch (err) {
    return { error: err.constructor.name, status: err.status, code: err.code ?? null };
  }
}
out["402"] = await errorOf("POOR");
out["403"] = await errorOf("FENCED");
out["401"] = await errorOf("BAD");

// 429: use up SLOW's burst with retries off until AEX refuses one, then the
// SDK's own call must wait what AEX said and succeed.
const probe = client("SLOW", { maxRetries: 0 });
let burned = 0;
for (let i = 0; i < 200; i++) {
  try {
    await probe.chat.completions.create({ model: "sim", messages: hi });
    burned++;
  } catch (err) {
    if (err.status === 429) break;
    throw err;
  }
}
const attempts = [];
const recordingFetch = async (url, init) => {
  const attempt = { sent: performance.now() };
  attempts.push(attempt);
  const response = await fetch(url, init);
  Object.assign(attempt, { status: response.status, answered: performance.now(),
    retry_after_ms: response.headers.get("retry-after-ms"), retry_after: response.headers.get("retry-after") });
  return response;
};
await client("SLOW", { fetch: recordingFetch }).chat.completions.create({ model: "sim", messages: hi });
out["429"] = {
  burned,
  statuses: attempts.map((a) => a.status),
  retry_after_ms: attempts.map((a) => a.retry_after_ms),
  retry_after: attempts.map((a) => a.retry_after),
  waited_ms: attempts.slice(1).map((b, i) => Math.round(b.sent - attempts[i].answered)),
};
console.log(JSON.stringify(out));
