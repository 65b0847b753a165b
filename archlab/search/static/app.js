// archlab search page: every piece of data is set with textContent (the HTML parser never sees it), so text stays text.
"use strict";

const form = document.getElementById("search-form");
const queryBox = document.getElementById("query");
const statusLine = document.getElementById("status");
const skippedLine = document.getElementById("skipped");
const results = document.getElementById("results");
let current = { generation: 0, controller: new AbortController() };

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function say(text, isError) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", Boolean(isError));
}

function formatScores(hit) {
  const parts = [`score ${hit.score.toFixed(4)}`];
  for (const [stage, value] of Object.entries(hit.stage_scores)) parts.push(`${stage} ${Number(value).toFixed(4)}`);
  return parts.join(" \u00b7 ");
}

function renderHit(hit) {
  const item = element("li", "hit");
  item.dataset.rank = String(hit.rank);
  const heading = element("h2");
  heading.append(element("span", "rank", `${hit.rank}.`), element("span", "title", hit.title || hit.id));
  item.append(heading, element("div", "scores", `${hit.id} \u00b7 ${formatScores(hit)}`));
  const text = element("div", "text");
  for (const segment of hit.segments) {
    text.append(segment.evidence ? element("mark", null, segment.text) : document.createTextNode(segment.text));
  }
  item.append(text);
  return item;
}

// The explanation of each result, one after another, read as Server-Sent Events from a streamed fetch (an
// EventSource would reconnect and explain again when the stream ends).
async function explainNext(searchId, rank, last, generation) {
  if (generation !== current.generation) return;
  if (rank > last) { results.dataset.state = "explained"; return; }
  const item = results.querySelector(`li[data-rank="${rank}"]`);
  const box = element("div", "explanation pending", "explaining\u2026");
  item.append(box);
  let text = "";
  const handlers = {
    piece(data) { text += data.text; box.classList.remove("pending"); box.textContent = text; },
    done(data) {
      box.textContent = data.explanation;
      box.classList.remove("pending");
      if (!data.quotes) box.append(element("span", "guard none", "no quote"));
      else if (data.quotes_ok) box.append(element("span", "guard ok", "\u2713 quotes found in the abstract"));
      else box.append(element("span", "guard bad", `\u2717 not in the abstract: ${data.bad_quotes.map((q) => `"${q}"`).join(", ")}`));
    },
    failed(data) { box.textContent = `no explanation: ${data.error}`; },
  };
  try {
    const response = await fetch(`/api/explain/${encodeURIComponent(searchId)}/${rank}`,
      { signal: current.controller.signal });
    if (!response.ok) throw new Error((await response.json()).error || `HTTP ${response.status}`);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const fields = Object.fromEntries(buffer.slice(0, end).split("\n").map((line) => {
          const colon = line.indexOf(": ");
          return [line.slice(0, colon), line.slice(colon + 2)];
        }));
        buffer = buffer.slice(end + 2);
        const handle = handlers[fields.event];
        if (handle) handle(JSON.parse(fields.data));
      }
    }
  } catch (problem) {
    if (generation !== current.generation) return;  // a newer search took over
    box.textContent = text || `no explanation: ${problem.message}`;
  }
  explainNext(searchId, rank + 1, last, generation);
}

async function search(query) {
  current.generation += 1;
  const generation = current.generation;
  current.controller.abort();  // the explanations of the previous search stop streaming
  current.controller = new AbortController();
  say("searching\u2026");
  skippedLine.hidden = true;
  let answer;
  try {
    const response = await fetch("/api/search", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ query }),
    });
    answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
  } catch (problem) {
    if (generation === current.generation) say(`search failed: ${problem.message}`, true);
    return;
  }
  if (generation !== current.generation) return;
  results.dataset.state = "explaining";
  results.replaceChildren(...answer.hits.map(renderHit));
  const timings = Object.entries(answer.timings_ms).map(([stage, ms]) => `${stage} ${ms.toFixed(0)} ms`).join(", ");
  say(`${answer.hits.length} results for \u201c${answer.query}\u201d (${timings})`);
  // stages asked for but not run (e.g. a re-ranker that keeps the first stage's order), each with the server's reason
  const skipped = Object.entries(answer.skipped || {}).map(([stage, why]) => `${stage} skipped: ${why}`);
  skippedLine.textContent = skipped.join("; ");
  skippedLine.hidden = skipped.length === 0;
  explainNext(answer.search_id, 1, answer.explain, generation);
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const query = queryBox.value.trim();
  if (query) search(query);
});
