// The official npm `openai` SDK pointed at a Parley session, driven the way its own docs drive it.
// args: {api, key, session, scenario, text}; every request body the SDK sends is reported back (`sent`), so a
// test can show what the SDK echoed (the fields OpenAI ignores and Parley must ignore too).
import OpenAI from "openai";
import { args, command, emit, run } from "./lib.mjs";

const sent = [];
const client = new OpenAI({
  baseURL: `${args.api}/sessions/${args.session}`,
  apiKey: args.key,
  maxRetries: 0, // each answer is seen as it is
  timeout: 30000,
  fetch: async (url, init) => {
    if (init?.body) sent.push(JSON.parse(init.body));
    return fetch(url, init);
  },
});
const MODEL = "gpt-4o-mini";
const user = (content) => ({ role: "user", content });

const scenarios = {
  /** `stream()` and its `finalMessage()` (which carries `parsed`), appended to the next request as the docs do. */
  async stream_final_message() {
    const messages = [user(args.text)];
    const stream = client.chat.completions.stream({ model: MODEL, messages });
    const deltas = [];
    stream.on("content", (delta) => deltas.push(delta));
    const final = await stream.finalMessage();
    messages.push(final, user(`${args.text} again`));
    const next = await client.chat.completions.create({ model: MODEL, messages });
    return { final, deltas, next: next.choices[0].message, ids: [(await stream.finalChatCompletion()).id, next.id], sent };
  },

  /** `runTools()` with two tools: the SDK calls them as the model asks and resends the conversation each round;
   * then the conversation goes on from `runner.messages` (which carry `parsed` and `parsed_arguments`). */
  async run_tools() {
    const called = [];
    const tool = (name, answer) => ({
      type: "function",
      function: {
        name,
        description: `${name} of a city`,
        parameters: { type: "object", properties: { input: { type: "string" } }, required: ["input"], additionalProperties: false },
        strict: true,
        parse: JSON.parse,
        function: (a) => {
          called.push({ name, args: a });
          return answer(a.input);
        },
      },
    });
    const runner = client.chat.completions.runTools({
      model: MODEL,
      messages: [user(args.text)],
      tools: [tool("get_weather", (c) => `sunny in ${c}`), tool("get_time", (c) => `noon in ${c}`)],
    });
    const content = await runner.finalContent();
    const rounds = sent.length;
    const next = await client.chat.completions.create({ model: MODEL, messages: [...runner.messages, user("thanks")] });
    return { content, called, rounds, messages: runner.messages, next: next.choices[0].message, sent };
  },

  /** `models.retrieve(id)` and `models.list()`. */
  async models() {
    return { retrieved: await client.models.retrieve(args.text), listed: (await client.models.list()).data };
  },

  /** A stream stopped after its first delta ("stop generating"), then the conversation resent with the part the
   * client got, once the test says the job is over. */
  async stop_and_resend() {
    const first = user(args.text);
    const stream = await client.chat.completions.create({ model: MODEL, messages: [first], stream: true });
    let partial = "";
    let job = null;
    for await (const chunk of stream) {
      job = chunk.id;
      partial += chunk.choices[0]?.delta?.content ?? "";
      if (partial) break; // leaving the loop aborts the request
    }
    emit({ kind: "stopped", job, partial });
    const go = await command();
    if (go?.do !== "resend") throw new Error(`unexpected command ${JSON.stringify(go)}`);
    const messages = [first, { role: "assistant", content: partial }, user(`${args.text} again`)];
    const next = await client.chat.completions.create({ model: MODEL, messages });
    return { job, partial, next: next.choices[0].message, next_id: next.id, sent };
  },
};

run(scenarios[args.scenario]);
