//! Every timing and limit of loopsync, in one place, each with the reason for its value. The
//! crates that use one name it from here; a config key that overrides one (`loops.max_attempts`,
//! `nats.ack_wait_seconds`) takes its default from here.

use std::time::Duration;

/// Attempts per operation before it is dead-lettered (`loops.max_attempts`): with
/// [`BACKOFF_BASE`] and [`BACKOFF_CAP`], the seven waits between eight attempts add up to
/// 31–62 s of Loops failing (429s, 5xx, timeouts): longer than a rate-limit window or a deploy
/// of theirs, short enough that a record that cannot go through is said in the run's report.
pub const MAX_ATTEMPTS: u32 = 8;

/// The first retry's delay (then doubled per attempt, with jitter): long enough for a 429's
/// window to move on, short enough that a one-off failure costs little.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);

/// The longest delay between two attempts: Loops' rate limit is per second, and an outage that
/// lasts longer is ridden out by the attempts' number, not by one long sleep.
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// How long a delivered message may stay unacknowledged before JetStream gives it to another
/// replica (`nats.ack_wait_seconds`): a worker at work says so a third of it apart (see
/// [`progress_every`]), so this only bounds how long a dead worker's messages wait; 30 s is
/// JetStream's own default.
pub const ACK_WAIT: Duration = Duration::from_secs(30);

/// How long JetStream (and the in-process bus) remembers a message id to drop a repeat of it:
/// above [`ACK_WAIT`] plus [`BACKOFF_CAP`], so a publish retried after an unanswered first try
/// is still found a duplicate.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// How often a handler at work tells the bus it is still at work: well within the ack wait
/// (a third of it), so that a long extraction or a wait for the rate budget is not redelivered.
pub fn progress_every(ack_wait: Duration) -> Duration {
    ack_wait / 3
}

/// How long a run in progress may go without a sign of life from the process that waits for it
/// before the next run of its sync closes it as `interrupted`: six heartbeats, so a process
/// that is slow (a GC pause, a busy warehouse) is not taken for dead, and one that died frees
/// its sync within half a minute.
pub const LEASE: Duration = Duration::from_secs(30);

/// How often a process that waits for a run says it is alive: well within [`LEASE`].
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// On shutdown, how long in-flight handlers may still run before they are dropped and their
/// messages nak'd: well below the 10 s in which a signal stops any command (PRODUCT.md).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// On shutdown of a pipeline whose bus is in memory, how long its checkpointer may still take
/// the outcomes its loaders published while they wound down (else lost with the process: the
/// records would be sent again, and past Loops' 24 hours of keys their events fire again).
/// With the stages' [`SHUTDOWN_GRACE`] before it and the checkpointer's own after it, within
/// [`COMMAND_GRACE`].
pub const CHECKPOINTER_DRAIN: Duration = Duration::from_secs(1);

/// How long a command may wind down after the first signal before it is abandoned: its
/// workers' [`SHUTDOWN_GRACE`], its checkpointer's [`CHECKPOINTER_DRAIN`], then closing its
/// runs as `interrupted` ([`CLOSE_DEADLINE`]), within the 10 s PRODUCT.md allows.
pub const COMMAND_GRACE: Duration = Duration::from_secs(7);

/// The deadline of the write that closes a stopped command's runs as `interrupted`: short, as
/// the lease closes them later if the warehouse does not answer.
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(2);

/// How long a request to Loops may go unanswered before the user is told what is waited for
/// (a line on stderr): a Loops that does not answer is said within seconds, not after the
/// request's whole timeout and its retries.
pub const LOOPS_SLOW_ANSWER: Duration = Duration::from_secs(2);

/// At most one such line per this long per process: under an outage every request would say it.
pub const LOOPS_SLOW_ANSWER_EVERY: Duration = Duration::from_secs(10);

/// Attempts of `loopsync check`'s requests to Loops: a diagnosis says quickly that Loops
/// cannot be reached (three attempts, some two seconds of backoff) rather than retry as long as
/// a run would.
pub const CHECK_ATTEMPTS: u32 = 3;

/// Attempts of a run request: enough for the extractor to wait out a warehouse outage of some
/// ten minutes (backoff capped at [`BACKOFF_CAP`]), after which the run fails.
pub const EXTRACTOR_ATTEMPTS: u32 = 30;

/// How long a request of a run waits for the sync's run in progress to end, or for its lease
/// to lapse, before it gives up: [`LEASE`] plus two [`HEARTBEAT`]s for the holder's last sign
/// of life to age out. A process killed mid-run leaves its run open, and a supervisor that
/// restarts it at once (systemd, Kubernetes, cron) must get a run, not an error.
pub const RUN_IN_PROGRESS_WAIT: Duration =
    Duration::from_secs(LEASE.as_secs() + 2 * HEARTBEAT.as_secs());

/// How long a loader may hold a record's claim, from its first request to its ledger write, so
/// that no other version of the record is sent meanwhile: long enough for the three requests
/// one attempt may make (a re-key's write and removal, an event's 409 and its follow-up write)
/// at [`MAX_REQUEST_TIMEOUT`] each, with room for the rate budget's waits. A request starts only
/// while the claim still covers its whole timeout.
pub const CLAIM: Duration = Duration::from_secs(60);

/// The longest `loops.timeout_seconds`: three requests of one attempt within [`CLAIM`].
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a run request, change or operation waits in its work queue before NATS drops it (a
/// week: a backlog older than that is stale — the next run extracts what was not confirmed).
/// Outcomes have no age limit: a confirmation must reach the state.
pub const WORK_QUEUE_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long a client of one of loopsync's HTTP listeners (the metrics endpoint, the
/// simulator) may take to send a request's headers before the connection is closed: a client
/// that sends half a request and waits must not hold a connection, and its task, for ever.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest answer body read from Loops: its answers are a few hundred bytes (a page of
/// contact properties some kilobytes), so a longer body is not Loops', and is refused before it
/// is held in memory whole.
pub const MAX_LOOPS_BODY_BYTES: usize = 1024 * 1024;

/// The most characters of Loops' `message` kept in an error, and so in a record's reason.
pub const MAX_LOOPS_MESSAGE_CHARS: usize = 200;

/// The most bytes a work-queue stream (run requests, changes, operations, outcomes) holds on
/// the NATS server (`nats.max_queue_bytes`): 1 GiB, some two million operations of a few hundred
/// bytes — a first sync of a million contacts waits in the operations queue for the loader,
/// held to the team's rate (28 hours at 10 requests a second). A full queue refuses new
/// messages (JetStream's `DiscardPolicy::New`): the stage that publishes retries, and past its
/// attempts the record is dead-lettered and sent by the next run; nothing waiting is dropped.
/// JetStream reserves a stream's `max_bytes` of its store when the stream is made, so the
/// server needs room for four of these per installation.
pub const WORK_QUEUE_MAX_BYTES: u64 = 1 << 30;

/// The most bytes of the dead-letter stream: 256 MiB. Its copies are for inspection (every dead
/// letter is also a record's outcome in the state, which `loopsync dlq` works from), so when
/// full the oldest go (`DiscardPolicy::Old`), as they do after 30 days.
pub const DEAD_LETTER_MAX_BYTES: u64 = 256 << 20;

/// The most bytes of the stream of the server's max-deliveries advisories: 64 MiB, some hundred
/// thousand advisories of a few hundred bytes. A stage's workers take each within seconds, so
/// when full the oldest (taken long ago) go first.
pub const ADVISORY_MAX_BYTES: u64 = 64 << 20;
