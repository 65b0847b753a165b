// archlab search page: every piece of data is set with textContent (the HTML parser never sees it), so text stays text.
"use strict";

const form = document.getElementById("search-form");
const queryBox = document.getElementById("query");
const statusLine = document.getElementById("status");
const results = document.getElementById("results");
let current = { generation: 0, source: null };

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

function explainNext(searchId, rank, last, generation) {
  if (rank > last || generation !== current.generation) return;
  const item = results.querySelector(`li[data-rank="${rank}"]`);
  const box = element("div", "explanation pending", "explaining\u2026");
  item.append(box);
  let text = "";
  const source = new EventSource(`/api/explain/${encodeURIComponent(searchId)}/${rank}`);
  current.source = source;
  const finish = () => { source.close(); explainNext(searchId, rank + 1, last, generation); };
  source.addEventListener("piece", (event) => {
    text += JSON.parse(event.data).text;
    box.classList.remove("pending");
    box.textContent = text;
  });
  source.addEventListener("done", (event) => {
    const done = JSON.parse(event.data);
    box.textContent = done.explanation;
    box.classList.remove("pending");
    const guard = done.quotes_ok
      ? element("span", "guard ok", "\u2713 quotes found in the abstract")
      : element("span", "guard bad", `\u2717 not in the abstract: ${done.bad_quotes.map((q) => `"${q}"`).join(", ")}`);
    box.append(guard);
    finish();
  });
  source.addEventListener("failed", (event) => {
    box.textContent = `no explanation: ${JSON.parse(event.data).error}`;
    finish();
  });
  source.onerror = () => {  // the connection broke (an EventSource would reconnect and explain again)
    if (source.readyState !== EventSource.CLOSED) {
      box.textContent = text || "no explanation: the connection was lost";
      finish();
    }
  };
}

async function search(query) {
  current.generation += 1;
  const generation = current.generation;
  if (current.source) current.source.close();
  say("searching\u2026");
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
  results.replaceChildren(...answer.hits.map(renderHit));
  const timings = Object.entries(answer.timings_ms).map(([stage, ms]) => `${stage} ${ms.toFixed(0)} ms`).join(", ");
  say(`${answer.hits.length} results for \u201c${answer.query}\u201d (${timings})`);
  explainNext(answer.search_id, 1, answer.explain, generation);
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const query = queryBox.value.trim();
  if (query) search(query);
});
