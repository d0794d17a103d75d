// deploy/grafana and deploy/prometheus, checked without Grafana or Prometheus: every query names
// series that docs/operations.md lists (tests/operable.rs checks the same names against a live
// scrape), every panel and rule says what it is, and the alerts the operator needs exist.
// promtool checks the rules' syntax and behaviour (scripts/test.sh: `promtool test rules`).
//
// Run: node --test tests/js/monitoring.test.mjs   (from the repository root)

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { parse } from "yaml";

const root = new URL("../../", import.meta.url);
const read = (path) => readFileSync(new URL(path, root), "utf8");
const dashboard = JSON.parse(read("deploy/grafana/loopsync.json"));
const rules = parse(read("deploy/prometheus/alerts.yml")).groups.flatMap((g) => g.rules);

// The series of docs/operations.md's Metrics table: `| \`loopsync_…\` | type | …`.
const documented = new Map(
  [...read("docs/operations.md").matchAll(/^\| `(loopsync_[a-z_]+)` \| (counter|gauge|histogram) \|/gm)].map(
    (m) => [m[1], m[2]],
  ),
);

// The loopsync series a PromQL expression reads, with a histogram's suffix checked against its type.
function seriesOf(expr) {
  return [...expr.matchAll(/\bloopsync_[a-z_]+/g)].map(([name]) => {
    const base = name.replace(/_(bucket|count|sum)$/, "");
    if (base !== name) {
      assert.equal(documented.get(base), "histogram", `${name}: ${base} is a documented histogram`);
      return base;
    }
    return name;
  });
}

test("the docs list the series (the check below is not vacuous)", () => {
  assert.ok(documented.size >= 8, [...documented.keys()].join(", "));
  assert.throws(() => seriesOf("rate(loopsync_no_such_total[5m])").forEach((s) => assert.ok(documented.has(s))));
  assert.throws(() => seriesOf("loopsync_records_total_bucket"));
});

test("every dashboard panel queries documented series through the data source variable", () => {
  assert.ok(dashboard.panels.length >= 8);
  const titles = new Set();
  for (const panel of dashboard.panels) {
    assert.ok(panel.title && panel.description, `panel ${panel.id} has a title and a description`);
    assert.ok(!titles.has(panel.title), `one panel titled ${panel.title}`);
    titles.add(panel.title);
    assert.equal(panel.datasource.uid, "${datasource}", panel.title);
    assert.ok(panel.targets.length > 0, panel.title);
    for (const target of panel.targets) {
      for (const series of seriesOf(target.expr)) {
        assert.ok(documented.has(series), `${panel.title}: ${series} is in docs/operations.md`);
      }
    }
  }
  const variables = dashboard.templating.list.map((v) => v.name);
  assert.deepEqual(variables, ["datasource", "sync"]);
  const perSync = dashboard.panels.filter((p) => p.targets.some((t) => t.expr.includes('sync=~"$sync"')));
  assert.ok(perSync.length >= 4, "the sync variable filters the per-sync panels");
});

test("the dashboard shows runs, records, dead letters, requests, 429s, the budget and the queues", () => {
  const exprs = dashboard.panels.flatMap((p) => p.targets.map((t) => t.expr)).join("\n");
  for (const series of [
    "loopsync_run_seconds_count",
    "loopsync_run_seconds_bucket",
    "loopsync_records_total",
    'outcome="dead_lettered"',
    "loopsync_loops_requests_total",
    "loopsync_loops_rate_limited_total",
    "loopsync_rate_budget_acquired_total",
    "loopsync_consumer_pending",
    "loopsync_diff_seconds_bucket",
  ]) {
    assert.ok(exprs.includes(series), series);
  }
});

test("alerts: failed and degraded runs, dead letters, consumer lag, 429s, a process down", () => {
  const byName = new Map(rules.map((r) => [r.alert, r]));
  for (const [name, needle] of [
    ["LoopsyncRunFailed", 'status=~"failed|interrupted"'],
    ["LoopsyncRunDegraded", 'status="degraded"'],
    ["LoopsyncDeadLetters", 'outcome="dead_lettered"'],
    ["LoopsyncConsumerStuck", "loopsync_consumer_pending"],
    ["LoopsyncConsumerLag", "loopsync_consumer_pending"],
    ["LoopsyncRateLimited", "loopsync_loops_rate_limited_total"],
    ["LoopsyncDown", 'up{job="loopsync"}'],
  ]) {
    assert.ok(byName.has(name), name);
    assert.ok(byName.get(name).expr.includes(needle), `${name} reads ${needle}`);
  }
  for (const rule of rules) {
    assert.match(rule.labels.severity, /^(critical|warning)$/, rule.alert);
    assert.ok(rule.annotations.summary && rule.annotations.description, rule.alert);
    for (const series of seriesOf(rule.expr)) {
      assert.ok(documented.has(series), `${rule.alert}: ${series} is in docs/operations.md`);
    }
  }
});

test("the compose stack's Prometheus scrapes the workers and loads these rules", () => {
  const config = parse(read("deploy/prometheus/prometheus.yml"));
  assert.deepEqual(config.rule_files, ["alerts.yml"]);
  const job = config.scrape_configs.find((j) => j.job_name === "loopsync");
  assert.ok(job, "a job named loopsync (the rules' up{job=\"loopsync\"})");
  const names = job.dns_sd_configs.flatMap((d) => d.names);
  const compose = parse(read("docker-compose.yml"), { merge: true });
  for (const name of names) {
    const service = compose.services[name];
    assert.ok(service, `${name} is a compose service`);
    const i = service.command.indexOf("--metrics-addr");
    assert.ok(i > 0 && service.command[i + 1].endsWith(`:${job.dns_sd_configs[0].port}`), `${name} serves metrics on the scraped port`);
  }
});
