// Drives AEX with the official Anthropic npm SDK, unchanged; prints what it
// saw as JSON. Usage: node drive_anthropic_node.mjs BASE_URL NODE_MODULES_DIR
// (BASE_URL is AEX's address without /v1, as the SDK takes Anthropic's;
// tokens in AEX_TOKEN_*).
import { createRequire } from "node:module";

const [base, modules] = process.argv.slice(2);
const require = createRequire(modules + "/");
const { default: Anthropic } = require("@anthropic-ai/sdk");
const tok = (name) => process.env["AEX_TOKEN_" + name];
const client = (name, options = {}) => new Anthropic({ baseURL: base, apiKey: tok(name), ...options });
const { VERSION } = require("@anthropic-ai/sdk/version");
const out = { version: VERSION };
const hi = [{ role: "user", content: "hi" }];
const usageOf = (u) => [u.input_tokens, u.output_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens];

const c = client("OK");
let m = await c.messages.create({ model: "claude-model", max_tokens: 50, messages: hi },
  { headers: { "x-mock-cached": "80,20" } });
out.message = { text: m.content[0].text, usage: usageOf(m.usage), stop_reason: m.stop_reason };

let text = "";
const stream = c.messages.stream({ model: "claude-model", max_tokens: 50, messages: hi });
stream.on("text", (t) => { text += t; });
let final = await stream.finalMessage();
out.stream = { text, usage: usageOf(final.usage), stop_reason: final.stop_reason };

// A tool round trip: the model asks for the tool, the client answers it.
const tools = [{ name: "weather", description: "The weather in a city",
  input_schema: { type: "object", properties: { city: { type: "string" } }, required: ["city"] } }];
const ask = [{ role: "user", content: "use_tool:weather" }];
const r = await c.messages.create({ model: "claude-model", max_tokens: 50, messages: ask, tools });
const use = r.content.find((b) => b.type === "tool_use");
const r2 = await c.messages.create({ model: "claude-model", max_tokens: 50, tools, messages: [...ask,
  { role: "assistant", content: r.content },
  { role: "user", content: [{ type: "tool_result", tool_use_id: use.id, content: `sunny in ${use.input.city}` }] }] });
out.tools = { called: use.name, stop_reason: r.stop_reason, answer: r2.content[0].text };
final = await c.messages.stream({ model: "claude-model", max_tokens: 50, messages: ask, tools }).finalMessage();
out.tools_stream = { name: final.content[0].name, input: final.content[0].input };

const counted = await c.messages.countTokens({ model: "claude-model", messages: hi },
  { headers: { "x-mock-usage": "42,0" } });
out.count = counted.input_tokens;
const models = [];
for await (const model of c.models.list()) models.push(model.id);
out.models = models.sort();

async function errorOf(name) {
  try {
    await client(name).messages.create({ model: "claude-model", max_tokens: 50, messages: hi });
    return { error: null };
  } catch (err) {
    return { error: err.constructor.name, status: err.status, type: err.error?.error?.type ?? null };
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
    await probe.messages.create({ model: "sim", max_tokens: 10, messages: hi });
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
await client("SLOW", { fetch: recordingFetch }).messages.create({ model: "sim", max_tokens: 10, messages: hi });
out["429"] = {
  burned,
  statuses: attempts.map((a) => a.status),
  retry_after_ms: attempts.map((a) => a.retry_after_ms),
  retry_after: attempts.map((a) => a.retry_after),
  waited_ms: attempts.slice(1).map((b, i) => Math.round(b.sent - attempts[i].answered)),
};
console.log(JSON.stringify(out));
