// A WHATWG EventSource (npm `eventsource`) following one of Parley's event streams until the stream ends it.
// args: {url, key?, names: [event names to listen for], deadline_ms?}. Reports every connection it makes (with the
// Last-Event-ID it sends) and every event, and ends once the EventSource is CLOSED: after a 204, the only way
// Parley tells an EventSource that nothing can follow.
import { EventSource } from "eventsource";
import { args, emit, run } from "./lib.mjs";

run(
  () =>
    new Promise((resolve) => {
      let connections = 0;
      const es = new EventSource(args.url, {
        fetch: async (input, init) => {
          const n = ++connections;
          const headers = { ...init.headers, ...(args.key ? { Authorization: `Bearer ${args.key}` } : {}) };
          emit({ kind: "connect", n, last_event_id: headers["Last-Event-ID"] ?? null });
          const response = await fetch(input, { ...init, headers });
          emit({ kind: "response", n, status: response.status });
          return response;
        },
      });
      es.onopen = () => emit({ kind: "open", n: connections });
      es.onmessage = (e) => emit({ kind: "message", id: e.lastEventId, data: e.data });
      for (const name of args.names ?? []) {
        es.addEventListener(name, (e) => emit({ kind: "event", type: e.type, id: e.lastEventId, data: e.data }));
      }
      es.onerror = (e) => {
        emit({ kind: "error", readyState: es.readyState, code: e.code ?? null, message: e.message ?? null });
        if (es.readyState === EventSource.CLOSED) resolve({ connections, readyState: es.readyState });
      };
    }),
);
