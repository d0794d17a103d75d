// Conformance of the loopsync simulator against a Loops client nobody here wrote: the official
// Loops SDK for JavaScript (npm `loops`). Two releases are installed side by side under npm aliases
// (package.json): `loops6` = loops 6.2.1 and `loops7` = loops 7.3.0, the current release. The same
// suites run once per release; every test name starts with the release it ran on.
//
// Every method the SDK offers for an endpoint the simulator serves (contacts, events, properties,
// lists, the API key) is called, and each answer is checked against loops-api.md (section numbers
// in the comments). Every other method of the SDK is listed as a skipped test with the reason (the
// simulator does not serve that endpoint); a test checks that the two lists together are the SDK's
// whole surface, so a release that adds a method fails here until it is covered or skipped on purpose.
//
// What differs between 6.2.1 and 7.3.0 (see SDKS below):
//   - 7.0.0 renamed the list methods: getCustomProperties → listContactProperties,
//     getMailingLists → listMailingLists, getTransactionalEmails → listTransactionalEmails (which
//     also moved from GET /v1/transactional to GET /v1/transactional-emails);
//   - 6.3.0 added checkContactSuppression / removeContactSuppression (/v1/contacts/suppression);
//   - 6.4.0–7.3.0 added the transactional-email, campaign, content, workflow, event-pattern,
//     group and upload APIs;
//   - the error classes are the same shape but each release has its own, so `instanceof` is
//     checked against the classes of the release under test;
//   - the request layer now sends query parameters on every method (not only GET) and returns
//     `undefined` for a 204; no endpoint the simulator serves is affected.
//
// Run: LOOPSYNC_BIN=target/debug/loopsync node --test tests/js/sdk-conformance.test.mjs
// Each suite starts its own `loopsync sim --port 0` and stops it at the end.

import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { readFileSync } from "node:fs";
import * as loops6 from "loops6";
import * as loops7 from "loops7";

const BIN = process.env.LOOPSYNC_BIN ?? "target/debug/loopsync";
/** How long the simulator may take to print its address. */
const START_DEADLINE_MS = 10_000;
/** How long the simulator may take to exit after SIGTERM before it gets SIGKILL. */
const STOP_DEADLINE_MS = 5_000;
/** Every test and hook; the SDK's own requests carry no timeout, so this bounds them. */
const DEADLINE = { timeout: 30_000 };
const HOOK_DEADLINE = { timeout: START_DEADLINE_MS + 2 * STOP_DEADLINE_MS };

/**
 * Starts `loopsync sim --port 0 ARGS`; resolves to { url, root, stop } once it has printed its
 * address. Rejects, with what the simulator wrote on stderr, if it fails to start, exits, prints
 * something else first, or prints nothing within `deadlineMs` (it is killed then).
 * `command` replaces the whole command line (the harness's own test uses it).
 */
function startSim(args, { command = [BIN, "sim", "--port", "0", ...args], deadlineMs = START_DEADLINE_MS } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(command[0], command.slice(1), { stdio: ["ignore", "pipe", "pipe"] });
    let stderr = "";
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => { stderr = (stderr + chunk).slice(-16_384); });
    const exited = () => child.exitCode !== null || child.signalCode !== null;
    let settled = false;
    const fail = (why, { silent = false } = {}) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (!exited()) child.kill("SIGKILL");
      const error = new Error(`${command.join(" ")}: ${why}\n--- its stderr ---\n${stderr || "(empty)"}`);
      error.silent = silent;
      reject(error);
    };
    const timer = setTimeout(() => fail(`printed no address within ${deadlineMs} ms`, { silent: true }), deadlineMs);
    child.on("error", (error) => fail(`could not start: ${error.message}`));
    // "close", not "exit": by then all of its stderr has been read.
    child.on("close", (code, signal) => fail(`exited (code ${code}, signal ${signal}) before printing its address`));
    createInterface({ input: child.stdout }).once("line", (line) => {
      const match = line.match(/(http:\/\/\S+)\/api/);
      if (!match) return fail(`unexpected first line: ${line}`);
      settled = true;
      clearTimeout(timer);
      resolve({
        root: match[1],
        url: `${match[1]}/api/`,
        stop: () => new Promise((done, failStop) => {
          if (exited()) return done();
          const kill = setTimeout(() => child.kill("SIGKILL"), STOP_DEADLINE_MS);
          const giveUp = setTimeout(() => failStop(new Error("loopsync sim did not exit after SIGKILL")), 2 * STOP_DEADLINE_MS);
          child.once("exit", () => { clearTimeout(kill); clearTimeout(giveUp); done(); });
          child.kill("SIGTERM");
        }),
      });
    });
  });
}

/**
 * startSim for a suite. A simulator that stays silent past the deadline would stay silent for
 * the next suite too: after one has, the later suites fail at once with that first failure
 * instead of each waiting out its own deadline.
 */
let silentSim = null;
async function startSuiteSim(args) {
  if (silentSim) throw new Error(`not started, an earlier suite's simulator never printed its address:\n${silentSim.message}`);
  try {
    return await startSim(args);
  } catch (error) {
    if (error.silent) silentSim = error;
    throw error;
  }
}

/** The simulator's inspection endpoints (`/_sim/*`), not part of the Loops API. */
async function inspect(sim, what) {
  const response = await fetch(`${sim.root}/_sim/${what}`, { signal: AbortSignal.timeout(10_000) });
  return response.json();
}

function installedVersion(alias) {
  const manifest = new URL(`node_modules/${alias}/package.json`, import.meta.url);
  return JSON.parse(readFileSync(manifest, "utf8")).version;
}

// Methods of each release that call an endpoint the simulator serves; all are exercised below.
const CONTACT_METHODS = ["testApiKey", "createContact", "updateContact", "findContact", "deleteContact", "createContactProperty", "sendEvent"];

const TRANSACTIONAL_REASON =
  "the simulator does not serve the transactional endpoints (/v1/transactional, /v1/transactional-emails, " +
  "/v1/transactional-groups): loopsync syncs contacts and sends events, never transactional email";

/**
 * One entry per installed release: its module, the names it gives to the methods that were
 * renamed, and the methods it has that call endpoints the simulator does not serve, grouped, each
 * group with the reason and one harmless read (`probe`) showing that the simulator indeed answers
 * 404 "Not found." there (if it stops doing so, the endpoint was implemented: test it instead).
 */
const SDKS = [
  {
    label: "loops 6.2.1",
    alias: "loops6",
    sdk: loops6,
    listContactProperties: "getCustomProperties",
    listMailingLists: "getMailingLists",
    notServed: [
      {
        reason: TRANSACTIONAL_REASON,
        methods: ["sendTransactionalEmail", "getTransactionalEmails"],
        probe: (loops) => loops.getTransactionalEmails(),
      },
    ],
  },
  {
    label: "loops 7.3.0",
    alias: "loops7",
    sdk: loops7,
    listContactProperties: "listContactProperties",
    listMailingLists: "listMailingLists",
    notServed: [
      {
        reason: "the simulator does not serve /v1/contacts/suppression (GET, DELETE): loopsync never reads or lifts suppressions",
        methods: ["checkContactSuppression", "removeContactSuppression"],
        probe: (loops) => loops.checkContactSuppression({ email: "nobody@example.com" }),
      },
      {
        reason: TRANSACTIONAL_REASON,
        methods: [
          "sendTransactionalEmail", "listTransactionalEmails", "getTransactionalEmail", "createTransactionalEmail",
          "updateTransactionalEmail", "ensureTransactionalEmailDraft", "publishTransactionalEmail",
          "listTransactionalGroups", "createTransactionalGroup", "getTransactionalGroup", "updateTransactionalGroup",
        ],
        probe: (loops) => loops.listTransactionalEmails(),
      },
      {
        reason: "the simulator does not serve the campaign and content APIs (loops-api.md §3.5: not needed for contact sync)",
        methods: [
          "listDedicatedSendingIps", "listAudienceSegments", "getAudienceSegment", "createAudienceSegment",
          "listThemes", "getTheme", "createTheme", "updateTheme",
          "listComponents", "getComponent", "createComponent", "updateComponent",
          "listCampaigns", "createCampaign", "getCampaign", "updateCampaign",
          "listCampaignGroups", "createCampaignGroup", "getCampaignGroup", "updateCampaignGroup",
          "getEmailMessage", "updateEmailMessage", "sendEmailMessagePreview", "runEmailMessageGuardian",
          "createUpload", "completeUpload",
        ],
        probe: (loops) => loops.listCampaigns(),
      },
      {
        reason: "the simulator does not serve the workflow and event-pattern APIs: it only records which " +
          "workflow triggers would fire (/_sim/workflows), and loopsync never edits workflows",
        methods: [
          "listEventPatterns", "getEventPattern", "getEventPatternByName",
          "listWorkflows", "createWorkflow", "getWorkflow", "updateWorkflow", "deleteWorkflow",
          "changeWorkflowMailingList", "createWorkflowNode", "getWorkflowNode", "updateWorkflowNode",
          "deleteWorkflowNode", "addWorkflowBranch", "rerouteWorkflowNode", "deleteWorkflowNodesRecursive",
        ],
        probe: (loops) => loops.listWorkflows(),
      },
    ],
  },
];

for (const release of SDKS) {
  const { label, sdk } = release;
  const { LoopsClient, APIError, RateLimitExceededError, ValidationError } = sdk;
  const LIST_PROPERTIES = release.listContactProperties;
  const LIST_LISTS = release.listMailingLists;
  /** A test whose name says which release it ran on. */
  const t = (name, fn) => test(`[${label}] ${name}`, DEADLINE, fn);

  function clientFor(sim, key = "test-key") {
    const client = new LoopsClient(key);
    client.apiRoot = sim.url;
    return client;
  }

  /** Runs `fn`, expecting it to throw this release's APIError with this status; returns the error. */
  async function apiError(fn, status) {
    try {
      await fn();
    } catch (error) {
      assert.ok(error instanceof APIError, `expected ${label}'s APIError, got ${error}`);
      assert.equal(error.statusCode, status, error.message);
      return error;
    }
    assert.fail(`expected an APIError ${status}`);
  }

  describe(`${label} against loopsync sim`, () => {
    let sim;
    let loops;
    before(async () => {
      sim = await startSuiteSim(["--rate-limit", "1000", "--list", "cm_news=Newsletter", "--list", "cm_beta=Beta"]);
      loops = clientFor(sim);
    }, HOOK_DEADLINE);
    after(async () => sim?.stop(), HOOK_DEADLINE);

    t(`the installed package is ${label}`, () => {
      assert.equal(`loops ${installedVersion(release.alias)}`, label);
    });

    t("testApiKey: 200 with teamName (§1)", async () => {
      const answer = await loops.testApiKey();
      assert.deepEqual(answer, { success: true, teamName: "Simulated Team" });
    });

    t("a bad key: 401 with error and message, read by the SDK (§1)", async () => {
      const error = await apiError(() => clientFor(sim, "not-the-key").testApiKey(), 401);
      assert.equal(error.json.success, false);
      assert.equal(error.json.error, "Invalid API key");
      assert.equal(error.message, "401 - Invalid API key");
    });

    t(`createContactProperty and ${LIST_PROPERTIES} (§3.1)`, async () => {
      assert.deepEqual(await loops.createContactProperty("planName", "string"), { success: true });
      assert.deepEqual(await loops.createContactProperty("signedUpAt", "date"), { success: true });
      const duplicate = await apiError(() => loops.createContactProperty("planName", "string"), 400);
      assert.equal(duplicate.json.success, false);
      await apiError(() => loops.createContactProperty("teamId", "string"), 400); // reserved
      await apiError(() => loops.createContactProperty("plan_name", "string"), 400); // not camelCase
      await apiError(() => loops.createContactProperty("seats", "integer"), 400);
      const custom = await loops[LIST_PROPERTIES]("custom");
      assert.deepEqual(custom, [
        { key: "planName", label: "Plan Name", type: "string" },
        { key: "signedUpAt", label: "Signed Up At", type: "date" },
      ]);
      const all = await loops[LIST_PROPERTIES]();
      const keys = all.map((p) => p.key);
      for (const key of ["firstName", "lastName", "email", "notes", "source", "userGroup", "userId", "subscribed", "createdAt"]) {
        assert.ok(keys.includes(key), `default property ${key}`);
      }
      assert.equal(all.find((p) => p.key === "subscribed").type, "boolean");
    });

    t(`${LIST_LISTS} (§3.2)`, async () => {
      const lists = await loops[LIST_LISTS]();
      assert.deepEqual(lists.map((l) => l.id), ["cm_news", "cm_beta"]);
      for (const list of lists) {
        assert.equal(typeof list.name, "string");
        assert.ok("description" in list && "isPublic" in list);
      }
    });

    t("createContact: 200 with id; 409 on the same email or userId; 400 without a valid email (§2.2)", async () => {
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

    t("findContact by email and by userId: an array, defaults as documented (§2.1, §2.2)", async () => {
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

    t("updateContact: upsert by email, change email through userId, null clears, lists (§2.3, §2.6)", async () => {
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

    t("updateContact refusals: unknown userId alone, identity conflict, types, length, reserved (§2.3–§2.5, §9)", async () => {
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

    t("sendEvent: creates the contact, writes contact properties, Idempotency-Key repeat is 409 (§3.3, §5)", async () => {
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
      await assert.rejects(loops.sendEvent({ eventName: "pinged" }), ValidationError);

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

    t("deleteContact: by email or userId, 404 when missing (§2.2)", async () => {
      assert.deepEqual(await loops.deleteContact({ email: "grace@example.com" }), { success: true, message: "Contact deleted." });
      const missing = await apiError(() => loops.deleteContact({ email: "grace@example.com" }), 404);
      assert.equal(missing.json.message, "Contact not found.");
      assert.deepEqual(await loops.deleteContact({ userId: "u-ada" }), { success: true, message: "Contact deleted." });
      assert.deepEqual(await loops.findContact({ userId: "u-ada" }), []);
      await assert.rejects(loops.deleteContact({ email: "a@b.co", userId: "x" }), ValidationError);
    });

    t("the workflow log saw each change once (§6, §7 checklist 9)", async () => {
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

  describe(`${label} and the rate limit (§4)`, () => {
    let sim;
    before(async () => { sim = await startSuiteSim(["--rate-limit", "10"]); }, HOOK_DEADLINE);
    after(async () => sim?.stop(), HOOK_DEADLINE);

    t("a burst past the limit is seen by the SDK as RateLimitExceededError", async () => {
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

  describe(`${label}: the methods the simulator does not serve`, () => {
    let sim;
    before(async () => { sim = await startSuiteSim([]); }, HOOK_DEADLINE);
    after(async () => sim?.stop(), HOOK_DEADLINE);

    t("every SDK method is covered above or skipped below", () => {
      const methods = Object.getOwnPropertyNames(LoopsClient.prototype)
        .filter((name) => name !== "constructor" && !name.startsWith("_"))
        .sort();
      const accounted = [
        ...CONTACT_METHODS, LIST_PROPERTIES, LIST_LISTS,
        ...release.notServed.flatMap((group) => group.methods),
      ].sort();
      assert.deepEqual(methods, accounted, `${label}'s methods changed: cover or skip the new ones`);
    });

    for (const group of release.notServed) {
      // Not silently dropped: each shows in the report as skipped, with its reason.
      test(`[${label}] ${group.methods.join(", ")}`, { skip: group.reason }, () => {});

      const probed = group.probe.toString().replace(/^\(loops\) => loops\./, "");
      t(`${probed}: the simulator answers 404 "Not found." (why ${group.methods[0]}… are skipped)`, async () => {
        const error = await apiError(() => group.probe(clientFor(sim)), 404);
        assert.equal(error.json.message, "Not found.");
      });
    }
  });
}

describe("test harness (no SDK)", () => {
  test("a simulator that never prints its address fails within the deadline, with its stderr", DEADLINE, async () => {
    const silent = [process.execPath, "-e", "process.stderr.write('listening nowhere\\n'); setTimeout(() => {}, 60_000)"];
    const started = Date.now();
    await assert.rejects(startSim([], { command: silent, deadlineMs: 500 }), (error) => {
      assert.match(error.message, /printed no address within 500 ms/);
      assert.match(error.message, /listening nowhere/);
      return true;
    });
    assert.ok(Date.now() - started < 5_000);
  });

  test("a simulator that exits at once fails at once, with its stderr", DEADLINE, async () => {
    const crashing = [process.execPath, "-e", "process.stderr.write('bad config\\n'); process.exit(2)"];
    await assert.rejects(startSim([], { command: crashing }), /exited \(code 2[\s\S]*bad config/);
  });
});
