// Conformance of the loopsync simulator against a Loops client nobody here wrote: the official
// Loops SDK for JavaScript (npm `loops`, pinned in package.json). Every method the SDK offers for
// contacts, events, properties, lists and the API key is called, and each answer is checked
// against loops-api.md (section numbers in the comments).
//
// Run: LOOPSYNC_BIN=target/debug/loopsync node --test tests/js/sdk-conformance.test.mjs
// Each test suite starts its own `loopsync sim --port 0` and stops it at the end.

import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { LoopsClient, APIError, RateLimitExceededError, ValidationError } from "loops";

const BIN = process.env.LOOPSYNC_BIN ?? "target/debug/loopsync";

/** Starts `loopsync sim` on a free port; resolves to { url, root, stop }. */
function startSim(args) {
  return new Promise((resolve, reject) => {
    const child = spawn(BIN, ["sim", "--port", "0", ...args], { stdio: ["ignore", "pipe", "inherit"] });
    child.on("error", reject);
    child.on("exit", (code) => reject(new Error(`loopsync sim exited with ${code}`)));
    const lines = createInterface({ input: child.stdout });
    lines.once("line", (line) => {
      const match = line.match(/(http:\/\/\S+)\/api/);
      if (!match) return reject(new Error(`unexpected first line: ${line}`));
      resolve({
        root: match[1],
        url: `${match[1]}/api/`,
        stop: () => new Promise((done) => { child.removeAllListeners("exit"); child.on("exit", done); child.kill("SIGTERM"); }),
      });
    });
  });
}

function clientFor(sim, key = "test-key") {
  const client = new LoopsClient(key);
  client.apiRoot = sim.url;
  return client;
}

async function inspect(sim, what) {
  const response = await fetch(`${sim.root}/_sim/${what}`);
  return response.json();
}

/** Runs `fn`, expecting it to throw an APIError with this status; returns the error. */
async function apiError(fn, status) {
  try {
    await fn();
  } catch (error) {
    assert.ok(error instanceof APIError, `expected APIError, got ${error}`);
    assert.equal(error.statusCode, status, error.message);
    return error;
  }
  assert.fail(`expected an APIError ${status}`);
}

describe("Loops JS SDK against loopsync sim", () => {
  let sim;
  let loops;
  before(async () => {
    sim = await startSim(["--rate-limit", "1000", "--list", "cm_news=Newsletter", "--list", "cm_beta=Beta"]);
    loops = clientFor(sim);
  });
  after(async () => sim?.stop());

  test("testApiKey: 200 with teamName (§1)", async () => {
    const answer = await loops.testApiKey();
    assert.deepEqual(answer, { success: true, teamName: "Simulated Team" });
  });

  test("a bad key: 401 with error and message, read by the SDK (§1)", async () => {
    const error = await apiError(() => clientFor(sim, "not-the-key").testApiKey(), 401);
    assert.equal(error.json.success, false);
    assert.equal(error.json.error, "Invalid API key");
    assert.equal(error.message, "401 - Invalid API key");
  });

  test("createContactProperty and getCustomProperties (§3.1)", async () => {
    assert.deepEqual(await loops.createContactProperty("planName", "string"), { success: true });
    assert.deepEqual(await loops.createContactProperty("signedUpAt", "date"), { success: true });
    const duplicate = await apiError(() => loops.createContactProperty("planName", "string"), 400);
    assert.equal(duplicate.json.success, false);
    await apiError(() => loops.createContactProperty("teamId", "string"), 400); // reserved
    await apiError(() => loops.createContactProperty("plan_name", "string"), 400); // not camelCase
    await apiError(() => loops.createContactProperty("seats", "integer"), 400);
    const custom = await loops.getCustomProperties("custom");
    assert.deepEqual(custom, [
      { key: "planName", label: "Plan Name", type: "string" },
      { key: "signedUpAt", label: "Signed Up At", type: "date" },
    ]);
    const all = await loops.getCustomProperties();
    const keys = all.map((p) => p.key);
    for (const key of ["firstName", "lastName", "email", "notes", "source", "userGroup", "userId", "subscribed", "createdAt"]) {
      assert.ok(keys.includes(key), `default property ${key}`);
    }
    assert.equal(all.find((p) => p.key === "subscribed").type, "boolean");
  });

  test("getMailingLists (§3.2)", async () => {
    const lists = await loops.getMailingLists();
    assert.deepEqual(lists.map((l) => l.id), ["cm_news", "cm_beta"]);
    for (const list of lists) {
      assert.equal(typeof list.name, "string");
      assert.ok("description" in list && "isPublic" in list);
    }
  });

  test("createContact: 200 with id; 409 on the same email or userId; 400 without a valid email (§2.2)", async () => {
    const created = await loops.createContact({
      email: "ada@example.com",
      properties: { firstName: "Ada", userId: "u-ada", planName: "free", signedUpAt: 1704713466 },
      mailingLists: { cm_news: true },
    });
    assert.equal(created.success, true);
    assert.match(created.id, /^c[a-z0-9]{24}$/);
    await apiError(() => loops.createContact({ email: "ADA@example.com" }), 409);
    await apiError(() => loops.createContact({ email: "other@example.com", properties: { userId: "u-ada" } }), 409);
    await apiError(() => loops.createContact({ email: "not-an-email" }), 400);
  });

  test("findContact by email and by userId: an array, defaults as documented (§2.1, §2.2)", async () => {
    const [byEmail] = await loops.findContact({ email: "ada@example.com" });
    const [byUser] = await loops.findContact({ userId: "u-ada" });
    assert.deepEqual(byEmail, byUser);
    assert.equal(byEmail.firstName, "Ada");
    assert.equal(byEmail.lastName, null);
    assert.equal(byEmail.source, "API");
    assert.equal(byEmail.subscribed, true);
    assert.equal(byEmail.userGroup, "");
    assert.equal(byEmail.optInStatus, null);
    assert.deepEqual(byEmail.mailingLists, { cm_news: true });
    assert.equal(byEmail.signedUpAt, "2024-01-08T11:31:06.000Z");
    assert.deepEqual(await loops.findContact({ email: "nobody@example.com" }), []);
    await assert.rejects(loops.findContact({ email: "a@b.co", userId: "x" }), ValidationError);
  });

  test("updateContact: upsert by email, change email through userId, null clears, lists (§2.3, §2.6)", async () => {
    const created = await loops.updateContact({ email: "grace@example.com", properties: { firstName: "Grace" } });
    assert.equal(created.success, true);
    const [grace] = await loops.findContact({ email: "grace@example.com" });
    assert.equal(grace.id, created.id);

    const ada = (await loops.findContact({ userId: "u-ada" }))[0];
    const moved = await loops.updateContact({
      userId: "u-ada",
      email: "ada@newmail.example",
      properties: { firstName: null, planName: "pro" },
      mailingLists: { cm_news: false, cm_beta: true },
    });
    assert.equal(moved.id, ada.id);
    const [after] = await loops.findContact({ userId: "u-ada" });
    assert.equal(after.email, "ada@newmail.example");
    assert.equal(after.firstName, null);
    assert.equal(after.planName, "pro");
    assert.deepEqual(after.mailingLists, { cm_beta: true });
    assert.deepEqual(await loops.findContact({ email: "ada@example.com" }), []);
  });

  test("updateContact refusals: unknown userId alone, identity conflict, types, length, reserved (§2.3–§2.5, §9)", async () => {
    await apiError(() => loops.updateContact({ userId: "u-nobody", properties: { firstName: "X" } }), 400);
    const conflict = await apiError(() => loops.updateContact({ email: "grace@example.com", userId: "u-ada" }), 400);
    assert.equal(conflict.json.message, "Multiple contacts found for the given criteria");
    await apiError(() => loops.updateContact({ email: "grace@example.com", properties: { planName: 3 } }), 400);
    await apiError(() => loops.updateContact({ email: "grace@example.com", properties: { signedUpAt: "last tuesday" } }), 400);
    await apiError(() => loops.updateContact({ email: "grace@example.com", properties: { planName: "x".repeat(501) } }), 400);
    await apiError(() => loops.updateContact({ email: "grace@example.com", properties: { teamId: "t" } }), 400);
    await apiError(() => loops.updateContact({ email: "grace@example.com", properties: { favouriteColour: "red" } }), 400);
    await apiError(() => loops.updateContact({ email: "grace@example.com", mailingLists: { cm_missing: true } }), 400);
    await assert.rejects(loops.updateContact({ properties: {} }), ValidationError);
    const [grace] = await loops.findContact({ email: "grace@example.com" });
    assert.equal(grace.planName, null, "no refused request changed anything");
  });

  test("sendEvent: creates the contact, writes contact properties, Idempotency-Key repeat is 409 (§3.3, §5)", async () => {
    const first = await loops.sendEvent({
      email: "linus@example.com",
      eventName: "contactCreated",
      contactProperties: { firstName: "Linus", planName: "team" },
      eventProperties: { seats: 5, trial: true, startedAt: "2024-03-07T10:09:23Z" },
      headers: { "Idempotency-Key": "conformance-key-1" },
    });
    assert.deepEqual(first, { success: true });
    const repeat = await apiError(
      () => loops.sendEvent({ email: "linus@example.com", eventName: "contactCreated", headers: { "Idempotency-Key": "conformance-key-1" } }),
      409,
    );
    assert.equal(repeat.json.success, false);
    await apiError(
      () => loops.sendEvent({ email: "linus@example.com", eventName: "x", headers: { "Idempotency-Key": "k".repeat(101) } }),
      400,
    );
    // An empty key is not sent by the SDK, so the request goes through.
    assert.deepEqual(await loops.sendEvent({ userId: "u-ada", eventName: "pinged", headers: { "Idempotency-Key": "" } }), { success: true });
    await apiError(() => loops.sendEvent({ userId: "u-nobody", eventName: "pinged" }), 400);
    await apiError(() => loops.sendEvent({ email: "linus@example.com", eventName: "bad:name" }), 400);

    const [linus] = await loops.findContact({ email: "linus@example.com" });
    assert.equal(linus.firstName, "Linus");
    assert.equal(linus.planName, "team");
    const events = await inspect(sim, "events");
    const created = events.filter((e) => e.eventName === "contactCreated");
    assert.equal(created.length, 1, "a repeated key is not applied twice");
    assert.deepEqual(created[0].eventProperties, { seats: 5, trial: true, startedAt: "2024-03-07T10:09:23Z" });
    assert.equal(created[0].idempotencyKey, "conformance-key-1");
    assert.equal(events.find((e) => e.eventName === "pinged").email, "ada@newmail.example");
  });

  test("deleteContact: by email or userId, 404 when missing (§2.2)", async () => {
    assert.deepEqual(await loops.deleteContact({ email: "grace@example.com" }), { success: true, message: "Contact deleted." });
    const missing = await apiError(() => loops.deleteContact({ email: "grace@example.com" }), 404);
    assert.equal(missing.json.message, "Contact not found.");
    assert.deepEqual(await loops.deleteContact({ userId: "u-ada" }), { success: true, message: "Contact deleted." });
    assert.deepEqual(await loops.findContact({ userId: "u-ada" }), []);
  });

  test("the workflow log saw each change once (§6, §7 checklist 9)", async () => {
    const workflows = await inspect(sim, "workflows");
    const count = (kind) => workflows.filter((w) => w.kind === kind).length;
    // ada (create), grace (update-create), linus (event-create).
    assert.equal(count("contact_added"), 3);
    // ada moved email and plan; linus's event wrote no change over its own create.
    assert.equal(count("contact_updated"), 1);
    // ada to cm_news at create, to cm_beta later.
    assert.equal(count("added_to_list"), 2);
    assert.equal(count("event_received"), 2);
    const stats = await inspect(sim, "stats");
    assert.ok(stats.total_requests > 20);
    assert.ok(stats.by_endpoint["PUT /v1/contacts/update"]["400"] >= 8);
  });
});

describe("Loops JS SDK and the rate limit (§4)", () => {
  let sim;
  before(async () => { sim = await startSim(["--rate-limit", "10"]); });
  after(async () => sim?.stop());

  test("a burst past the limit is seen by the SDK as RateLimitExceededError", async () => {
    const loops = clientFor(sim);
    const results = await Promise.allSettled(Array.from({ length: 40 }, () => loops.testApiKey()));
    const ok = results.filter((r) => r.status === "fulfilled").length;
    const limited = results.filter((r) => r.status === "rejected" && r.reason instanceof RateLimitExceededError);
    assert.equal(ok + limited.length, 40, "every answer is 200 or 429");
    assert.ok(ok >= 10 && ok <= 20, `accepted ${ok}`);
    assert.ok(limited.length >= 20);
    for (const { reason } of limited) {
      assert.equal(reason.limit, 10);
      assert.equal(reason.remaining, 0);
    }
    const stats = await inspect(sim, "stats");
    assert.ok(stats.max_accepted_in_one_second <= 10, JSON.stringify(stats));
    assert.equal(stats.rate_limited, limited.length);
  });
});
