// What a browser app does with Parley: mint a stream token with its key (a backend would, in real life), follow
// the session's events with an EventSource and the token, and read a streamed chat. The test calls these
// functions through playwright-core; `window.report` (exposed by the driver) sends what happens back to it.
"use strict";
const params = new URLSearchParams(location.search);
const API = params.get("api");
const KEY = params.get("key");
const report = (obj) => window.report && window.report(obj);

/** A stream token for the session, minted with the key; and the session's ETag. */
async function mint(sessionId) {
  const r = await fetch(`${API}/sessions/${sessionId}/stream-tokens`, {
    method: "POST",
    headers: { Authorization: `Bearer ${KEY}`, "Content-Type": "application/json" },
    body: JSON.stringify({ ttl_s: 300 }),
  });
  // a response header the page can read only because the API exposes it (Access-Control-Expose-Headers)
  const session = await fetch(`${API}/sessions/${sessionId}`, { headers: { Authorization: `Bearer ${KEY}` } });
  return { status: r.status, body: await r.json(), etag: session.headers.get("ETag") };
}

/** Follow the session's events; every one, and every error (with readyState), is reported. */
function follow(sessionId, token, names) {
  const es = new EventSource(`${API}/sessions/${sessionId}/events?token=${encodeURIComponent(token)}`);
  es.onopen = () => report({ stream: "events", what: "open" });
  es.onerror = () => report({ stream: "events", what: "error", readyState: es.readyState });
  for (const name of names) {
    es.addEventListener(name, (e) => report({ stream: "events", what: "event", type: e.type, id: e.lastEventId, data: JSON.parse(e.data) }));
  }
  return true;
}

/** POST a streamed chat, read its first chunk from the response (to learn the job), stop reading, then follow the
 * chat's stream from its start with an EventSource and the token until [DONE]. */
async function chat(sessionId, text, token) {
  const r = await fetch(`${API}/sessions/${sessionId}/chat`, {
    method: "POST",
    headers: { Authorization: `Bearer ${KEY}`, "Content-Type": "application/json" },
    body: JSON.stringify({ messages: [{ role: "user", content: text }], stream: true }),
  });
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let first = null;
  while (first === null) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`the chat stream ended before its first chunk: ${buffer}`);
    buffer += decoder.decode(value, { stream: true });
    const data = buffer.split("\n\n").slice(0, -1).flatMap((block) => block.split("\n")).find((l) => l.startsWith("data: {"));
    if (data) first = JSON.parse(data.slice(6));
  }
  await reader.cancel(); // the page stops reading the POST's answer; the chat goes on
  return await new Promise((resolve) => {
    const chunks = [];
    const es = new EventSource(`${API}/sessions/${sessionId}/chats/${first.id}/stream?token=${encodeURIComponent(token)}`);
    es.addEventListener("chat.failed", (e) => report({ stream: "chat", what: "failed", data: JSON.parse(e.data) }));
    es.onerror = () => report({ stream: "chat", what: "error", readyState: es.readyState });
    es.onmessage = (e) => {
      if (e.data === "[DONE]") {
        es.close();
        const text = chunks.map((c) => (c.choices[0] && c.choices[0].delta.content) || "").join("");
        resolve({ status: r.status, contentType: r.headers.get("Content-Type"), job: first.id, first, ids: chunks.map((c) => c.id), text });
        return;
      }
      chunks.push(JSON.parse(e.data));
      report({ stream: "chat", what: "message", id: e.lastEventId });
    };
  });
}

/** A fetch-based SSE client (what a page uses when it needs headers) resuming the events after `lastEventId`: the
 * Last-Event-ID header makes the browser preflight the URL, token included. Returns the first event it reads. */
async function resume(sessionId, token, lastEventId) {
  const controller = new AbortController();
  try {
    const r = await fetch(`${API}/sessions/${sessionId}/events?token=${encodeURIComponent(token)}`, {
      headers: { Accept: "text/event-stream", "Last-Event-ID": lastEventId },
      signal: controller.signal,
    });
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    while (!buffer.includes("\ndata: ")) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
    }
    const field = (name) => (buffer.split("\n").find((l) => l.startsWith(`${name}: `)) || "").slice(name.length + 2) || null;
    return { status: r.status, id: field("id"), type: field("event") };
  } catch (e) {
    return { error: String(e) };
  } finally {
    controller.abort();
  }
}
